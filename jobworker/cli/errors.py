"""One place where both executables turn every way of failing into one line and an exit code.

Exit codes (sysexits-like where a convention exists):
    0   success (jobctl run and wait: the job's own exit code instead; stop of a job that
        had already ended is a success too, said on stderr)
    1   the server refused or failed the request (job not found, permission denied, a name
        already taken, a job that has ended for kill, ...)
    2   the request itself is wrong: usage errors, malformed or out-of-range values (also when
        the server is the one to say so: INVALID_ARGUMENT, OUT_OF_RANGE), arguments that are
        not valid UTF-8; configuration, connection or TLS problems; server startup problems
    70  an internal error: a bug in jobworker (the one line names the exception)
    127 jobctl start/run/wait: the job could not be created (command not found, bad working
        directory), as a shell and docker say it
    130 interrupted by Ctrl-C where that has no more specific meaning

Messages are one line on stderr, with control characters shown as escapes (`printable`): they
may quote a job's command or name, which another user chose.

An internal error prints its traceback too when JOBWORKER_DEBUG is set.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from cyclopts import CycloptsError

from .terminal import printable

EXIT_RPC = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_NOT_CREATED = 127
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """Stop the command: print `message` after the program's name and exit `exit_code`."""

    def __init__(
        self, message: str, exit_code: int = EXIT_USAGE, *, answered: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        # The server answered the request (refused it, or found it malformed): a command
        # working through several jobs reports this one and goes on with the next.
        self.answered = answered


def run_cli(
    program: str,
    launch: Callable[[], Any],
    *,
    hint: Callable[[CycloptsError], str] | None = None,
) -> int:
    """Run `launch` (which parses and runs a command) and return the process's exit code.

    Never lets a traceback out: usage errors and CliError become their one line; anything
    else is a bug, reported in one line with exit code 70.
    """
    try:
        result = launch()
    except CycloptsError as exc:
        message = _first_line(str(exc)) or type(exc).__name__
        extra = hint(exc) if hint is not None else ""
        say(program, f"{message.rstrip('.')} ({extra})" if extra else message)
        return EXIT_USAGE
    except CliError as exc:
        say(program, exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        single = _sole(group)
        if isinstance(single, CliError):
            say(program, single.message)
            return single.exit_code
        interrupts, others = group.split(KeyboardInterrupt)
        if interrupts is not None and others is None:
            return EXIT_INTERRUPTED
        say(program, f"internal error: {_describe(single)}")
        if os.environ.get("JOBWORKER_DEBUG"):
            traceback.print_exception(group)
        return EXIT_INTERNAL
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        say(program, f"internal error: {_describe(exc)}")
        if os.environ.get("JOBWORKER_DEBUG"):
            traceback.print_exc()
        return EXIT_INTERNAL
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def say(program: str, message: str) -> None:
    if not message:
        return  # a quiet exit (the reader of our output went away)
    try:
        sys.stderr.write(f"{program}: {printable(message)}\n")
        sys.stderr.flush()
    except OSError:
        pass  # stderr is gone; nothing else to tell


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def _sole(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _describe(exc: BaseException) -> str:
    text = _first_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
