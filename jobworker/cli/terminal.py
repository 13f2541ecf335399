"""Text that is safe to print on a terminal.

Jobs belong to other people: a command, a job name, a certificate's CN or an error message that
quotes them may hold control characters. Printed raw, `\\e]0;pwned\\a\\e[2J` retitles and clears
an admin's terminal, and a newline forges a line of `jobctl list`. So everything jobctl writes
for a human (status, list, top, its one-line messages) goes through `printable`, which shows
each such character as a visible escape; the JSON output and the job's own output stay exact.

What is escaped: C0 controls (newline and tab included: our layouts are one line per field),
DEL, C1 controls (U+0080 to U+009F: some terminals act on U+009B as on ESC [), the bytes that
were not UTF-8 in our own arguments (surrogate-escaped by Python: shown as the byte, ``\\xff``),
the Unicode line and paragraph separators, and the bidirectional overrides and isolates
(which reorder what follows them on screen: CVE-2021-42574, "Trojan Source"). An escape
sequence needs its ESC, so escaping ESC defuses the whole sequence.
"""

from __future__ import annotations

import re
import shlex

__all__ = ["printable", "shell_word"]

_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_NAMED = {
    "\a": "\\a",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\v": "\\v",
    "\f": "\\f",
    "\r": "\\r",
    "\x1b": "\\e",
}


def _escape(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0x7F:  # C0 and DEL
        return f"\\x{code:02x}"
    # C1 and the rest as code points: \u0085 is the character, \x85 would be the raw byte
    return f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with every character a terminal would act on shown as a visible escape."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda match: _escape(match.group()), text)


def shell_word(word: str) -> str:
    """One word of a command line as a shell would need it typed: shlex's quoting, or, for a
    word holding characters `printable` escapes, bash's ANSI-C quoting (``$'a\\nb'``), which is
    both visible and exact when pasted back."""
    if _UNSAFE.search(word) is None:
        return shlex.quote(word)
    body = word.replace("\\", "\\\\").replace("'", "\\'")
    return "$'" + _UNSAFE.sub(lambda match: _escape(match.group()), body) + "'"
