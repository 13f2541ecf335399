"""The memory BIO engine: TLS over any trio stream (memory streams in tests, a proxy's stream).

Theory of operation
-------------------
An ``OpenSSL.SSL.Connection`` made without a socket reads ciphertext from one memory buffer (the
incoming BIO, which we fill with ``bio_write``) and writes ciphertext to another (the outgoing BIO,
which we empty with ``bio_read``). Its operations never block: when one needs bytes from the peer it
raises ``WantReadError``. Every public method reduces to ``_retry(operation)``, a loop of:

1. call the non-blocking OpenSSL operation (``do_handshake``, ``send``, ``recv``);
2. drain the outgoing BIO, with no ``await`` between 1 and 2, so no other task ever sees the
   Connection with ciphertext produced but not yet claimed;
3. await exactly one thing: if there are bytes to send, send them; otherwise, if OpenSSL wants
   input, receive once from the transport into the incoming BIO;
4. retry until the operation succeeds (sending is never retried: a write completes at step 1).

The transport has two sides and each has its lock. HTTP/2 runs a reader task and a writer task, and
in TLS 1.3 reading can produce output (a KeyUpdate answer), so a reader may need to send. The send
lock is strictly FIFO: drained bytes go out in the order OpenSSL produced them. A task that wants to
receive while another one already is just waits for it and retries the operation: the bytes it
needed may have arrived. Any failure while sending leaves an unknown amount of ciphertext on the
wire, so the stream is marked broken and later calls raise `trio.BrokenResourceError`. Cancelling a
receive is harmless; cancelling a send breaks the stream.

Session tickets: OpenSSL's server writes them the moment its handshake completes; we hold them
back and send them with the server's next write (trio's fix for python-trio/trio#819), otherwise
a server's handshake over an unbuffered transport would wait for the client to read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio
from OpenSSL import SSL

from .config import NoH2Offered, TLSConfig
from .stream import CLOSE_NOTIFY_TIMEOUT_S, RECEIVE_BYTES, TLSStream, acquire, receive_limit

# send_all() encrypts and sends at most this much at a time, bounding the ciphertext held in memory.
SEND_CHUNK_BYTES = 96 * 1024
# Why not larger: measured over loopback, 256 KiB reads or send chunks make every buffer cross
# glibc's mmap/trim thresholds: up to 200k page faults per GB, up to 2.5x the CPU per byte.
# A full send chunk's ciphertext (records add 22 bytes per 16 KiB) fits in one bio_read, and the
# buffer bio_read allocates stays under 128 KiB, glibc's initial mmap threshold.
_DRAIN_BYTES = SEND_CHUNK_BYTES + 16 * 1024
_T = TypeVar("_T")


class MemoryTLSStream(TLSStream):
    """TLS between memory BIOs and any `trio.abc.Stream` (see the module docstring)."""

    def __init__(self, transport: trio.abc.Stream, config: TLSConfig) -> None:
        self._setup(transport, config, None)
        self._delayed_outgoing = b""  # the server's session tickets, until its first write
        self._receive_count = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._sending:
            self._check_status()
            if not self._handshake_done:
                await self._ensure_handshake()
            view = memoryview(data)
            if view.ndim != 1 or view.format not in ("B", "b", "c"):
                view = view.cast("B")
            if not view.nbytes:
                await trio.lowlevel.checkpoint()
                return
            for start in range(0, view.nbytes, SEND_CHUNK_BYTES):
                await self._retry(self._encrypter(view[start : start + SEND_CHUNK_BYTES]))

    def send_nowait(self, data: bytes | memoryview) -> int:
        """Takes nothing: every write of this engine goes through the transport's `send_all`,
        which may wait. (The socket engine's `send_nowait` writes what the socket takes.)"""
        self._check_status()
        return 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receiving:
            max_bytes = receive_limit(max_bytes)
            self._check_status()
            if not self._handshake_done:
                await self._ensure_handshake()
            return await self._retry(lambda: self._decrypt(max_bytes))

    async def _retry(
        self, operation: Callable[[], _T], *, hold_back: bool = False, yielded: bool = False
    ) -> _T:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            want_read = False
            failure: BaseException | None = None
            try:
                result = operation()
            except SSL.WantReadError:
                want_read = True
            except (SSL.Error, NoH2Offered) as exc:
                failure = exc
            if failure is not None:
                await self._fail(failure)
            to_send = self._drain()
            if hold_back and not want_read:
                self._delayed_outgoing += to_send
                to_send = b""
            if to_send:
                yielded = True
                await self._send_raw(to_send)
            elif want_read:
                yielded = True
                await self._receive_raw()
            if not want_read:
                break
        if not yielded:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return result

    def _drain(self) -> bytes:
        try:
            data = self._conn.bio_read(_DRAIN_BYTES)
        except SSL.WantReadError:
            return b""
        if len(data) < _DRAIN_BYTES:
            return data
        parts = [data]
        while True:
            try:
                parts.append(self._conn.bio_read(_DRAIN_BYTES))
            except SSL.WantReadError:
                return b"".join(parts)

    async def _send_raw(self, data: bytes) -> None:
        lock = self._send_lock
        try:
            await acquire(lock)  # the transport's send is our checkpoint
            try:
                if self._delayed_outgoing:
                    data, self._delayed_outgoing = self._delayed_outgoing + data, b""
                await self._transport.send_all(data)
            finally:
                lock.release()
        except BaseException:
            # Some unknown part of `data` may be on the wire: nothing can follow it safely.
            self._mark_broken()
            raise

    async def _receive_raw(self) -> None:
        seen = self._receive_count
        lock = self._receive_lock
        await acquire(lock)
        try:
            if seen != self._receive_count:
                return  # another task received meanwhile: retry the operation first
            try:
                data = await self._transport.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, OSError):
                self._mark_broken()
                raise
            if data:
                self._conn.bio_write(data)
            else:
                self._conn.bio_shutdown()  # transport EOF: OpenSSL reads EOF from now on
            self._receive_count += 1
        finally:
            lock.release()

    async def _send_close_notify(self) -> None:
        # Another task mid-send would interleave its ciphertext with ours: skip, close uncleanly.
        if self._send_lock.locked():
            return
        try:
            self._conn.shutdown()  # queue close_notify; we don't wait for the peer's
        except SSL.Error:
            return
        data = self._delayed_outgoing + self._drain()
        self._delayed_outgoing = b""
        if data:
            try:
                async with self._send_lock:
                    await self._transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer went first; that's allowed

    async def _send_alert(self) -> None:
        alert = self._drain()
        if alert and not self._send_lock.locked():
            with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT_S):
                try:
                    async with self._send_lock:
                        await self._transport.send_all(self._delayed_outgoing + alert)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
