"""Everything tls relies on inside pyOpenSSL that pyOpenSSL does not promise: the one place to
look when pyOpenSSL changes.

Reading plaintext. ``Connection.recv()`` returns at most one TLS record (16 KiB of plaintext),
and costs, per record: a fresh buffer, the SSL_read, a check of three callback helpers and of
SSL_get_error, and a copy into a new ``bytes``; a 256 KiB read is sixteen of those, joined with
one more copy. In a stream of jobctl logs this was the client's largest cost after the
decryption itself. `read_plaintext` runs OpenSSL's SSL_read straight into a buffer that the
caller reuses, record after record, and only when SSL_read returns no data lets pyOpenSSL turn
the result into the exception ``recv()`` would have raised, with the same errno at hand (cffi
keeps the errno of its last call).

Each function below names the pyOpenSSL behaviour it assumes; tests/purgatory/test_tls.py checks
them against the installed pyOpenSSL. Where an attribute is missing (a pyOpenSSL that moved
it), ``FAST_READ`` is False and the stream reads through ``recv()`` as before: slower, never
wrong.
"""

from __future__ import annotations

import threading
from typing import Any

from OpenSSL import SSL

try:
    _lib: Any = SSL._lib  # type: ignore[attr-defined]
    _ffi: Any = SSL._ffi  # type: ignore[attr-defined]
    _SSL_read = _lib.SSL_read
    _raise_ssl_error = SSL.Connection._raise_ssl_error  # type: ignore[attr-defined]
    FAST_READ = True
except AttributeError:  # pragma: no cover - a pyOpenSSL that moved its internals
    FAST_READ = False

__all__ = ["FAST_READ", "read_plaintext", "scratch"]


class _Scratch(threading.local):
    """One reusable read buffer per thread: reads are synchronous (no await between SSL_read
    and the copy out), so every stream of a thread can share it, and an idle connection holds
    no buffer of its own."""

    buffer: bytearray | None = None
    address: Any = None


_scratch = _Scratch()


def scratch(size: int) -> tuple[bytearray, Any]:
    """This thread's read buffer, at least `size` bytes, and its address for OpenSSL (assumes:
    ``_ffi.from_buffer`` gives a ``char[]`` whose address arithmetic is byte arithmetic, and
    keeps the buffer alive while it lives)."""
    buffer = _scratch.buffer
    if buffer is None or len(buffer) < size:
        buffer = _scratch.buffer = bytearray(size)
        _scratch.address = _ffi.from_buffer(buffer)
    return buffer, _scratch.address


def read_plaintext(conn: SSL.Connection, address: Any, max_bytes: int) -> int:
    """SSL_read into `address` (at most `max_bytes`, at most one record): the bytes read, or
    the exception ``conn.recv()`` raises for the same result (assumes: ``Connection._ssl`` is
    the ``SSL *`` that ``recv()`` passes to ``_lib.SSL_read``, and ``_raise_ssl_error(ssl,
    result)`` is what ``recv()`` calls on the result). Returns 0 only when OpenSSL returned no
    data and reported no error, which OpenSSL does not do."""
    ssl = conn._ssl  # type: ignore[attr-defined]
    result = _SSL_read(ssl, address, max_bytes)
    if result > 0:
        return result
    _raise_ssl_error(conn, ssl, result)
    return 0
