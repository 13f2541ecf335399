"""`TLSStream`: mutual TLS 1.3 as a `trio.abc.Stream`, and what its two engines share.

Two engines
-----------
Constructing a `TLSStream` picks its engine once, by the transport, and the object is of that
engine's class from then on, so no hot path asks which engine it runs:

- over a `trio.SocketStream` (production), `SocketTLSStream` (socket_engine.py): OpenSSL reads
  and writes the socket's descriptor itself, and we wait for the descriptor with trio;
- over any other stream (memory streams in tests, a proxy's stream), `MemoryTLSStream`
  (memory_engine.py): OpenSSL works between two memory BIOs, and we move the ciphertext between
  them and the transport.

Shared here: the state (ok, broken, closed), the handshake, reading plaintext out of OpenSSL,
turning failures into typed errors (config.py), and closing.

The handshake runs in whichever task first calls `do_handshake` (or sends, or receives): the
connection's own task, never ``accept()``. It runs under ``trio.fail_after(handshake_timeout_s)``,
so a peer that says nothing, or stalls halfway, costs bounded time. In TLS 1.3 the client's
handshake ends when it sends its Finished; the server checks the client certificate after that, so a
rejected certificate reaches the client as an alert on its first *read*. We name it there
("certificate not accepted by server: unknown ca", a `TLSCertificateRejected` with ``by_peer``).
When a handshake fails we flush OpenSSL's alert (best effort, bounded) before raising, so the peer
learns why.

End of stream: `receive_some` returns b"" on the peer's close_notify and also on a transport EOF
without one (trio's ``https_compatible=True``): HTTP/2 and gRPC mark their own ends (END_STREAM,
trailers, GOAWAY), so a truncation is caught a layer up. `aclose` sends close_notify without waiting
for the peer's, bounded by CLOSE_NOTIFY_TIMEOUT_S and skipped if another task is mid-send, then
closes the transport.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, NoReturn, TypeVar

import trio
from cryptography import x509
from OpenSSL import SSL

from .config import (
    Findings,
    TLSCertificateRejected,
    TLSConfig,
    TLSError,
    TLSHandshakeTimeout,
    check_negotiated,
    failure_of,
    parse_ip,
    subject_of,
)
from .openssl_internals import FAST_READ, read_plaintext, scratch

if TYPE_CHECKING:
    from socket import socket as _Socket

__all__ = ["CLOSE_NOTIFY_TIMEOUT_S", "RECEIVE_BYTES", "TLSStream"]

# receive_some() without max_bytes returns up to this much plaintext, and each transport read asks
# for this much ciphertext: a 64 KiB gRPC message is one read, not four or more.
RECEIVE_BYTES = 128 * 1024
CLOSE_NOTIFY_TIMEOUT_S = 1.0
MAX_RECORD_PLAINTEXT = 16384  # one SSL_read returns at most one record's plaintext
_T = TypeVar("_T")


class _State(Enum):
    OK = "ok"
    BROKEN = "broken"
    CLOSED = "closed"


class _ConflictDetector:
    """Raise BusyResourceError when two tasks use one side of the stream at once (the check
    trio does with its private ``trio._util.ConflictDetector``)."""

    __slots__ = ("held", "_message")

    def __init__(self, message: str) -> None:
        self._message = message
        self.held = False

    def __enter__(self) -> None:
        if self.held:
            raise trio.BusyResourceError(self._message)
        self.held = True

    def __exit__(self, *exc_info: object) -> None:
        self.held = False


async def acquire(lock: trio.Lock | trio.StrictFIFOLock) -> None:
    """Take `lock`; uncontended (the common case), without the scheduling point that
    `async with` costs: the I/O that follows is the caller's checkpoint."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def receive_limit(max_bytes: int | None) -> int:
    if max_bytes is None:
        return RECEIVE_BYTES
    max_bytes = operator.index(max_bytes)
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    return max_bytes


class TLSStream(trio.abc.Stream):
    """TLS over ``transport``, as the server or the client according to ``config``.

    Call `do_handshake` first, in the connection's own task; sending or receiving before that
    runs the handshake implicitly. One task may send while another receives.

    ``TLSStream(transport, config)`` returns the engine's subclass (see the module docstring).
    """

    def __new__(cls, transport: trio.abc.Stream, config: TLSConfig) -> TLSStream:
        if cls is TLSStream:
            if isinstance(transport, trio.SocketStream):
                from .socket_engine import SocketTLSStream as cls
            else:
                from .memory_engine import MemoryTLSStream as cls
        return super().__new__(cls)

    def __init__(self, transport: trio.abc.Stream, config: TLSConfig) -> None:
        self._setup(transport, config, None)

    def _setup(self, transport: trio.abc.Stream, config: TLSConfig, socket: _Socket | None) -> None:
        """The shared state; `socket`: the descriptor OpenSSL uses itself, or None (BIOs)."""
        self._transport = transport
        self._config = config
        self._findings = Findings()
        conn = SSL.Connection(config.context, socket)
        conn.set_app_data(self._findings)
        if config.server_side:
            conn.set_accept_state()
        else:
            conn.set_connect_state()
            assert config.server_name is not None
            if parse_ip(config.server_name) is None:
                conn.set_tlsext_host_name(config.server_name.encode("ascii"))
        self._conn = conn
        self._state = _State.OK
        self._handshake_started = False
        self._handshake_done = False
        self._handshake_finished = trio.Event()
        self._send_lock = trio.StrictFIFOLock()  # the transport's send side
        self._receive_lock = trio.Lock()  # the transport's receive side
        self._read_eof = False
        # Set when a read stopped because OpenSSL had nothing more (only the socket engine
        # looks: its next read waits for the descriptor first).
        self._socket_drained = False
        self._read_error: SSL.Error | None = None  # met after returning data; raised next time
        self._peer_certificate: x509.Certificate | None = None
        self._sending = _ConflictDetector("another task is sending on this TLSStream")
        self._receiving = _ConflictDetector("another task is receiving on this TLSStream")

    # -- what the handshake settled

    @property
    def transport(self) -> trio.abc.Stream:
        return self._transport

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's verified leaf certificate; None before the handshake completes."""
        return self._peer_certificate

    @property
    def presented_subject(self) -> str | None:
        """The subject (RFC 4514, raw: unverified, escape it before logging) of the leaf
        certificate the peer presented, even one the handshake then rejected; None when it
        presented none, or verification never reached its leaf (a chain rejected at an
        issuer). Formatted when asked, not during the handshake."""
        presented = self._findings.presented
        return subject_of(presented) if presented is not None else None

    @property
    def alpn_protocol(self) -> str | None:
        if not self._handshake_done:
            return None
        return self._conn.get_alpn_proto_negotiated().decode("ascii") or None

    @property
    def tls_version(self) -> str:
        """E.g. "TLSv1.3". Raises RuntimeError before the handshake completes."""
        self._require_handshake("tls_version")
        return self._conn.get_protocol_version_name()

    @property
    def cipher(self) -> str:
        """E.g. "TLS_AES_128_GCM_SHA256". Raises RuntimeError before the handshake completes."""
        self._require_handshake("cipher")
        return self._conn.get_cipher_name() or ""

    def _require_handshake(self, what: str) -> None:
        if not self._handshake_done:
            raise RuntimeError(f"{what} is known only after the TLS handshake")

    # -- the handshake

    async def do_handshake(self) -> None:
        """Run the handshake (once; later calls return at once, concurrent ones wait for it).

        Raises TLSHandshakeTimeout after ``handshake_timeout_s``, TLSError if it fails. Either
        way the stream is broken afterwards: close it.
        """
        self._check_status()
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        await self._ensure_handshake()

    async def _ensure_handshake(self) -> None:
        if self._handshake_started:
            await self._handshake_finished.wait()
            if not self._handshake_done:
                self._check_status()
                raise trio.BrokenResourceError("the TLS handshake failed")
            return
        self._handshake_started = True
        timeout_s = self._config.handshake_timeout_s
        try:
            with trio.fail_after(timeout_s):
                # The server's last handshake step writes only session tickets: hold them back.
                await self._retry(self._conn.do_handshake, hold_back=self._config.server_side)
            check_negotiated(self._conn, server_side=self._config.server_side)
        except trio.TooSlowError:
            self._mark_broken()
            raise TLSHandshakeTimeout(
                f"TLS handshake did not complete within {timeout_s:g} s"
            ) from None
        except BaseException:
            self._mark_broken()
            raise
        else:
            try:
                certificate = self._conn.get_peer_certificate(as_cryptography=True)
            except ValueError:
                # Verified by OpenSSL, yet cryptography cannot read it (an encoding OpenSSL
                # is lenient about): nothing could use it, so it is refused like any other.
                self._mark_broken()
                raise TLSCertificateRejected(
                    "peer certificate not accepted: it cannot be parsed", by_peer=False
                ) from None
            self._handshake_done = True
            self._peer_certificate = certificate
        finally:
            self._handshake_finished.set()

    # -- Stream (send_all, send_nowait and receive_some are the engines')

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            self._check_status()
            # Waiting on the transport is a send-side operation: a receive_some that must send
            # (a KeyUpdate answer) cannot overlap it.
            async with self._send_lock:
                await self._transport.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if self._state is _State.CLOSED:
            await trio.lowlevel.checkpoint()
            return
        say_goodbye = self._state is _State.OK and self._handshake_done
        self._state = _State.CLOSED
        try:
            if say_goodbye:
                with trio.move_on_after(CLOSE_NOTIFY_TIMEOUT_S):
                    await self._send_close_notify()
        finally:
            await self._transport.aclose()

    # -- what the engines provide

    async def _retry(
        self, operation: Callable[[], _T], *, hold_back: bool = False, yielded: bool = False
    ) -> _T:
        """Run ``operation`` until it stops asking for I/O. ``hold_back``: keep what it writes
        for the next write (the server's session tickets); ``yielded``: the caller has already
        been through a checkpoint for this operation."""
        raise NotImplementedError

    def _drain(self) -> bytes:
        """Ciphertext OpenSSL produced that we must send ourselves (none on a socket)."""
        raise NotImplementedError

    async def _send_close_notify(self) -> None:
        raise NotImplementedError

    async def _send_alert(self) -> None:
        """After a failure: get OpenSSL's alert to the peer, best effort, bounded."""
        raise NotImplementedError

    # -- shared by the engines

    def _check_status(self) -> None:
        if self._state is _State.BROKEN:
            raise trio.BrokenResourceError("this TLSStream is broken")
        if self._state is _State.CLOSED:
            raise trio.ClosedResourceError("this TLSStream is closed")

    def _mark_broken(self) -> None:
        if self._state is _State.OK:
            self._state = _State.BROKEN

    def _encrypter(self, view: memoryview) -> Callable[[], None]:
        written = 0

        def encrypt() -> None:
            # A memory BIO takes everything, so SSL_write normally consumes all of `view` in one
            # call. Keep count anyway: a retry after WantReadError must resume, not repeat.
            nonlocal written
            while written < len(view):
                written += self._conn.send(view[written:])

        return encrypt

    def _decrypt(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` of plaintext: every whole record OpenSSL can give without waiting,
        read into this thread's scratch buffer (see openssl_internals) and copied out once."""
        if self._read_eof:
            return b""
        if self._read_error is not None:
            error, self._read_error = self._read_error, None
            raise error
        if not FAST_READ:  # pragma: no cover - see openssl_internals
            return self._decrypt_by_records(max_bytes)
        buffer, address = scratch(max_bytes)
        conn = self._conn
        total = 0
        while total < max_bytes:
            try:
                got = read_plaintext(conn, address + total, max_bytes - total)
            except Exception as exc:
                if self._read_failed(exc, bool(total)):
                    break
                raise
            if not got:
                break
            total += got
        return bytes(memoryview(buffer)[:total])

    def _decrypt_by_records(self, max_bytes: int) -> bytes:
        recv = self._conn.recv
        chunks: list[bytes] = []
        total = 0
        while total < max_bytes:
            try:
                chunk = recv(min(max_bytes - total, MAX_RECORD_PLAINTEXT))
            except Exception as exc:
                if self._read_failed(exc, bool(chunks)):
                    break
                raise
            chunks.append(chunk)
            total += len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _read_failed(self, exc: Exception, have_data: bool) -> bool:
        """A read that met `exc`: True to return what was read so far (maybe nothing, at the
        end of the stream), False to raise `exc`; raises a TLSError itself for a lost
        connection."""
        if isinstance(exc, SSL.WantReadError):
            if have_data:
                self._socket_drained = True
                return True
            return False
        if isinstance(exc, SSL.ZeroReturnError):  # close_notify
            self._read_eof = True
            return True
        if isinstance(exc, SSL.SysCallError):
            if exc.args and isinstance(exc.args[0], int) and exc.args[0] > 0:
                # The socket engine met a socket error (ECONNRESET...): not an EOF.
                self._mark_broken()
                raise TLSError(f"connection lost: {os.strerror(exc.args[0])}") from None
            # The transport ended without close_notify: EOF too (see "End of stream").
            # OpenSSL queues an alert about it; the peer is gone, so drop it.
            self._read_eof = True
            self._drain()
            return True
        if isinstance(exc, SSL.Error) and have_data:
            self._read_error = exc  # hand over what we have; fail on the next call
            return True
        return False

    async def _fail(self, exc: BaseException) -> NoReturn:
        """Mark broken, get any alert OpenSSL queued to the peer, raise the TLSError."""
        self._mark_broken()
        error = self._error(exc)
        await self._send_alert()
        raise error from exc

    def _error(self, exc: BaseException) -> TLSError:
        return failure_of(
            exc,
            self._findings,
            server_side=self._config.server_side,
            handshake_done=self._handshake_done,
        )
