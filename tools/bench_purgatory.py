#!/usr/bin/env python3
"""Benchmark purgatory, jobworker's gRPC transport, against its peers, side by side in one run.

The same tiny service runs on four servers: purgatory (Trio, h2, pyOpenSSL), grpcio sync
(`grpc.server` on a ThreadPoolExecutor), grpcio aio (`grpc.aio.server`) and grpclib (asyncio,
h2, `ssl`). Its two methods:

- ``/bench.Bench/Echo``: unary; a `BytesValue` of 32 bytes comes back as it went;
- ``/bench.Bench/Stream``: server streaming; the request names a count, the answer is that many
  `BytesValue` messages of 64 KiB (one message object, serialized per send by each server).

Every server runs in a process of its own (this script re-invoked with ``--serve KIND``), over
mutual TLS 1.3 with ECDSA P-256 certificates (a throwaway CA, a server certificate for
127.0.0.1, a client certificate "alice"; all in a TemporaryDirectory) on loopback. A control
thread in each server answers "usage" on a pipe with the process's getrusage CPU time (all
threads, microsecond resolution), VmRSS and open descriptors, so server CPU is measured around
exactly each phase. One grpcio client (C-core, in this process) drives every server, so client
costs are equal; its own CPU is reported too, to show when the client is the bottleneck.

Figures, each the median of interleaved rounds (every round runs all servers, in an order
rotated per round, figure by figure; absolute numbers drift on a shared 2-core machine, so
compare the ratios):

1. unary, 1 in flight: a sync stub calling in a loop; calls/s and p50 / p99 latency (µs);
2. unary, 32 in flight on one connection: a grpc.aio channel with 32 tasks calling in a loop;
   calls/s, and the server's CPU per call (µs) over the same window;
3. one server stream of 64 KiB messages (1 GiB per round, --quick 128 MiB): a sync stub
   iterating raw bytes (no client-side parsing) and discarding them; MB/s (10^6 B of payload
   per second) and the server's CPU seconds per GB (10^9 B of payload);
4. memory per idle connection: a fresh server process per round; after a warm-up connection,
   1,000 grpcio channels (each on a connection of its own: local subchannel pools) each complete
   one call and stay open; (server VmRSS with them - before) / 1000, in KiB. The server's
   descriptor count is checked to have grown by one per connection. As a by-product, the time
   from creating a channel to its first answer (new connection + 1 call) is reported.

The streaming limit is measured in the same rounds (skip it with --no-raw): the same bytes as
plain TLS 1.3 records, a pyOpenSSL sender on a blocking socket (64 KiB writes, no memory BIO, no
HTTP/2) to a Python `ssl` receiver; MB/s and the sender's CPU seconds per GB, as in ANCHORS.md.

Then the ratios to grpclib and to grpcio sync, and the issue's bar for purgatory: at least on par
with grpclib on every figure, and at most 0.6 server CPU-s per GB streamed (the raw pyOpenSSL
TLS sender costs 0.51 on the anchor machine).

Cleans up after itself: every server process is stopped (stdin closed, then killed), every
channel closed, the certificates' directory removed; the end reports left-overs and the load
average.

    .venv/bin/python tools/bench_purgatory.py [--quick] [--only unary1,unary32,stream,memory]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Run the checkout this file is in, whatever the environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from benchlib import (  # tools/benchlib.py
    loadavg,
    own_children,
    percentile,
    progress,
    rotated,
)
from google.protobuf.wrappers_pb2 import BytesValue

KINDS = ("purgatory", "grpcio-sync", "grpcio-aio", "grpclib")
LABELS = {
    "purgatory": "purgatory (trio, h2)",
    "grpcio-sync": "grpcio sync",
    "grpcio-aio": "grpcio aio",
    "grpclib": "grpclib (asyncio, h2)",
}
ECHO = "/bench.Bench/Echo"
STREAM = "/bench.Bench/Stream"
ECHO_BYTES = 32
CHUNK_BYTES = 64 * 2**10
MiB = 2**20
GRPCIO_SYNC_WORKERS = 64  # more than the 32 calls in flight: the pool is never the limit
MAX_MESSAGE_BYTES = 8 * MiB
STARTUP_TIMEOUT_S = 60.0
CONTROL_TIMEOUT_S = 30.0
BAR_CPU_S_PER_GB = 0.6


# =============================================================================================
# The servers: each in its own process, `bench_purgatory.py --serve KIND --certs DIR`


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> CertFiles:
        return cls(
            ca=directory / "test-ca.crt",
            server_cert=directory / "localhost.crt",
            server_key=directory / "localhost.key",
            client_cert=directory / "alice.crt",
            client_key=directory / "alice.key",
        )


_SERVER_FACTS: dict[str, str] = {}  # what a server learned about its connections (the cipher)


def _vmrss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _control(port: int) -> None:
    """Announce the port, then answer "usage" lines until stdin closes; then exit at once."""
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if line.strip() == "usage":
            ru = resource.getrusage(resource.RUSAGE_SELF)
            print(
                json.dumps(
                    {
                        "cpu_s": ru.ru_utime + ru.ru_stime,
                        "rss_kib": _vmrss_kib(),
                        "fds": len(os.listdir("/proc/self/fd")),
                        **_SERVER_FACTS,
                    }
                ),
                flush=True,
            )
    os._exit(0)  # the bench is gone or done with us: no graceful shutdown to measure


def _start_control(port: int) -> None:
    threading.Thread(target=_control, args=(port,), name="bench-control", daemon=True).start()


def _chunk() -> BytesValue:
    return BytesValue(value=bytes(range(256)) * (CHUNK_BYTES // 256))


def serve_purgatory(certs: CertFiles) -> None:
    import trio

    from jobworker.purgatory import RpcMethod, Server
    from jobworker.purgatory.tls import TLSConfig

    chunk = _chunk()

    async def echo(request: BytesValue, call) -> BytesValue:
        return BytesValue(value=request.value)

    async def stream(request: BytesValue, call) -> None:
        for _ in range(int(request.value)):
            await call.send(chunk)

    async def main() -> None:
        server = Server(
            [
                RpcMethod(ECHO, BytesValue, BytesValue, echo),
                RpcMethod(STREAM, BytesValue, BytesValue, stream, server_streaming=True),
            ],
            tls=TLSConfig.server(
                cert_file=certs.server_cert, key_file=certs.server_key, ca_files=[certs.ca]
            ),
            max_receive_message_bytes=MAX_MESSAGE_BYTES,
            # The memory figure holds every idle connection from one client certificate, and
            # the other servers cap nothing: lift the connection caps (a defence, not a cost).
            max_connections=100_000,
            max_connections_per_identity=100_000,
        )
        async with trio.open_nursery() as nursery:
            ((_, port),) = await nursery.start(server.serve, "127.0.0.1", 0)
            _SERVER_FACTS["cipher"] = "TLS_AES_128_GCM_SHA256 (policy: preferred)"
            _start_control(port)

    trio.run(main)


def _grpcio_handlers(grpc, echo, stream):
    return grpc.method_handlers_generic_handler(
        "bench.Bench",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo,
                request_deserializer=BytesValue.FromString,
                response_serializer=BytesValue.SerializeToString,
            ),
            "Stream": grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=BytesValue.FromString,
                response_serializer=BytesValue.SerializeToString,
            ),
        },
    )


def _grpcio_credentials(grpc, certs: CertFiles):
    return grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca.read_bytes(),
        require_client_auth=True,
    )


_GRPCIO_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def serve_grpcio_sync(certs: CertFiles) -> None:
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    chunk = _chunk()

    def echo(request: BytesValue, context) -> BytesValue:
        return BytesValue(value=request.value)

    def stream(request: BytesValue, context):
        for _ in range(int(request.value)):
            yield chunk

    server = grpc.server(
        ThreadPoolExecutor(max_workers=GRPCIO_SYNC_WORKERS), options=_GRPCIO_SERVER_OPTIONS
    )
    server.add_generic_rpc_handlers((_grpcio_handlers(grpc, echo, stream),))
    port = server.add_secure_port("127.0.0.1:0", _grpcio_credentials(grpc, certs))
    server.start()
    _SERVER_FACTS["cipher"] = "BoringSSL default (AES-128-GCM first with AES-NI)"
    _start_control(port)
    server.wait_for_termination()


def serve_grpcio_aio(certs: CertFiles) -> None:
    import grpc
    import grpc.aio

    chunk = _chunk()

    async def echo(request: BytesValue, context) -> BytesValue:
        return BytesValue(value=request.value)

    async def stream(request: BytesValue, context):
        for _ in range(int(request.value)):
            yield chunk

    async def main() -> None:
        server = grpc.aio.server(options=_GRPCIO_SERVER_OPTIONS)
        server.add_generic_rpc_handlers((_grpcio_handlers(grpc, echo, stream),))
        port = server.add_secure_port("127.0.0.1:0", _grpcio_credentials(grpc, certs))
        await server.start()
        _SERVER_FACTS["cipher"] = "BoringSSL default (AES-128-GCM first with AES-NI)"
        _start_control(port)
        await server.wait_for_termination()

    asyncio.run(main())


def serve_grpclib(certs: CertFiles) -> None:
    import socket
    import ssl

    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server

    chunk = _chunk()

    def note_cipher(stream) -> None:
        if "cipher" not in _SERVER_FACTS:
            # grpclib exposes the transport only privately; this is for the report alone.
            transport = getattr(getattr(stream, "peer", None), "_transport", None)
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            _SERVER_FACTS["cipher"] = ssl_object.cipher()[0] if ssl_object else "unknown"

    class Bench:
        async def echo(self, stream) -> None:
            request = await stream.recv_message()
            note_cipher(stream)
            await stream.send_message(BytesValue(value=request.value))

        async def stream(self, stream) -> None:
            request = await stream.recv_message()
            for _ in range(int(request.value)):
                await stream.send_message(chunk)

        def __mapping__(self):
            return {
                ECHO: Handler(self.echo, Cardinality.UNARY_UNARY, BytesValue, BytesValue),
                STREAM: Handler(self.stream, Cardinality.UNARY_STREAM, BytesValue, BytesValue),
            }

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(certs.server_cert, certs.server_key)
    context.load_verify_locations(certs.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    # Python's server contexts prefer their own cipher order (AES-256-GCM first in TLS 1.3);
    # follow the client's instead, as the other servers do, so all of them run AES-128-GCM.
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE

    async def main() -> None:
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says
        # TCP, and accepted sockets inherit it; with proto 0 every answer waits out Nagle and
        # the client's delayed ACK (about 40 ms a call).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = Server([Bench()])
        await server.start(sock=sock, ssl=context, backlog=1024)
        _start_control(sock.getsockname()[1])
        await server.wait_closed()
        await asyncio.Event().wait()  # wait_closed returns at once on some versions

    asyncio.run(main())


def serve_raw_tls(certs: CertFiles) -> None:
    """The limit, not a gRPC server: pyOpenSSL on a blocking socket (no memory BIO, no HTTP/2),
    one connection at a time; the client sends a count, we send that many 64 KiB writes."""
    import socket

    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.set_tls13_ciphersuites(b"TLS_AES_128_GCM_SHA256")
    context.use_certificate_file(str(certs.server_cert))
    context.use_privatekey_file(str(certs.server_key))
    context.load_verify_locations(str(certs.ca))
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *_: True)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    _start_control(listener.getsockname()[1])
    chunk = _chunk().value
    while True:
        sock, _ = listener.accept()
        with sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = SSL.Connection(context, sock)
            conn.set_accept_state()
            try:
                conn.do_handshake()
                _SERVER_FACTS["cipher"] = conn.get_cipher_name() or "?"
                for _ in range(int(conn.recv(32))):
                    conn.sendall(chunk)
                conn.shutdown()
            except (SSL.Error, OSError, ValueError) as exc:
                print(f"raw-tls: {exc!r}", file=sys.stderr)


SERVERS = {
    "raw-tls": serve_raw_tls,
    "purgatory": serve_purgatory,
    "grpcio-sync": serve_grpcio_sync,
    "grpcio-aio": serve_grpcio_aio,
    "grpclib": serve_grpclib,
}


# =============================================================================================
# The bench process: server handles and the one grpcio client


class BenchError(Exception):
    """A server misbehaved (a wrong answer, a stall): the figures would be meaningless."""


class ServerProcess:
    """A server in its own process, with its control pipe."""

    def __init__(self, kind: str, certs_dir: Path) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--certs", str(certs_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            start_new_session=True,  # Ctrl-C reaches the bench only; it stops its servers
        )
        self._buffer = b""
        hello = self._read_line(STARTUP_TIMEOUT_S)
        self.port: int = hello["port"]
        self.pid: int = self.proc.pid
        self.target = f"127.0.0.1:{self.port}"

    def _read_line(self, timeout_s: float) -> dict:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.kind} server: no answer within {timeout_s:g} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                data = os.read(self.proc.stdout.fileno(), 4096)
                if not data:
                    raise BenchError(f"{self.kind} server exited ({self.proc.wait()})")
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def usage(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"usage\n")
        return self._read_line(CONTROL_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # the control thread exits the process on EOF
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@contextlib.contextmanager
def running_servers(kinds: Sequence[str], certs_dir: Path) -> Iterator[dict[str, ServerProcess]]:
    servers: dict[str, ServerProcess] = {}
    try:
        for kind in kinds:
            servers[kind] = ServerProcess(kind, certs_dir)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@dataclass
class Client:
    """The one grpcio client: credentials and channel options shared by every phase."""

    certs: CertFiles
    options: list[tuple[str, object]] = field(
        default_factory=lambda: [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # One channel, one connection of its own: never a subchannel shared across channels.
            ("grpc.use_local_subchannel_pool", 1),
        ]
    )

    def credentials(self):
        import grpc

        return grpc.ssl_channel_credentials(
            root_certificates=self.certs.ca.read_bytes(),
            private_key=self.certs.client_key.read_bytes(),
            certificate_chain=self.certs.client_cert.read_bytes(),
        )


ECHO_REQUEST = BytesValue(value=b"e" * ECHO_BYTES)


def cpu_self_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def check_echo(reply: BytesValue, kind: str) -> None:
    if reply.value != ECHO_REQUEST.value:
        raise BenchError(f"{kind}: echo answered {reply.value[:40]!r}")


# --- figure 1: unary, 1 in flight ----------------------------------------------------------


def phase_unary1(client: Client, server: ServerProcess, calls: int, warmup: int) -> dict:
    import grpc

    with grpc.secure_channel(server.target, client.credentials(), client.options) as channel:
        echo = channel.unary_unary(
            ECHO,
            request_serializer=BytesValue.SerializeToString,
            response_deserializer=BytesValue.FromString,
        )
        for _ in range(warmup):
            check_echo(echo(ECHO_REQUEST, timeout=30), server.kind)
        latencies = []
        clock = time.perf_counter
        before, client_before = server.usage(), cpu_self_s()
        start = clock()
        for _ in range(calls):
            t0 = clock()
            echo(ECHO_REQUEST, timeout=30)
            latencies.append(clock() - t0)
        elapsed = clock() - start
        client_cpu, after = cpu_self_s() - client_before, server.usage()
    return {
        "rate": calls / elapsed,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": percentile(latencies, 99) * 1e6,
        "server_cpu_us": (after["cpu_s"] - before["cpu_s"]) / calls * 1e6,
        "client_cpu_us": client_cpu / calls * 1e6,
    }


# --- figure 2: unary, 32 in flight on one connection ---------------------------------------


def phase_unary32(client: Client, server: ServerProcess, duration_s: float, in_flight: int) -> dict:
    import grpc
    import grpc.aio

    async def run() -> dict:
        async with grpc.aio.secure_channel(
            server.target, client.credentials(), client.options
        ) as channel:
            echo = channel.unary_unary(
                ECHO,
                request_serializer=BytesValue.SerializeToString,
                response_deserializer=BytesValue.FromString,
            )
            for reply in await asyncio.gather(*(echo(ECHO_REQUEST) for _ in range(in_flight))):
                check_echo(reply, server.kind)
            calls = 0
            stop = False

            async def caller() -> None:
                nonlocal calls
                while not stop:
                    await echo(ECHO_REQUEST, timeout=30)
                    calls += 1

            # Warm-up at full concurrency, then the measured window.
            warm = [asyncio.create_task(caller()) for _ in range(in_flight)]
            await asyncio.sleep(min(0.5, duration_s / 4))
            stop = True
            await asyncio.gather(*warm)
            calls, stop = 0, False
            before, client_before = server.usage(), cpu_self_s()
            start = time.perf_counter()
            tasks = [asyncio.create_task(caller()) for _ in range(in_flight)]
            await asyncio.sleep(duration_s)
            stop = True
            await asyncio.gather(*tasks)
            elapsed = time.perf_counter() - start
            client_cpu, after = cpu_self_s() - client_before, server.usage()
            return {
                "rate": calls / elapsed,
                "server_cpu_us": (after["cpu_s"] - before["cpu_s"]) / calls * 1e6,
                "client_cpu_us": client_cpu / calls * 1e6,
            }

    return asyncio.run(run())


# --- figure 3: one server stream of 64 KiB messages -----------------------------------------


def phase_stream(client: Client, server: ServerProcess, total_bytes: int) -> dict:
    import grpc

    messages = max(1, total_bytes // CHUNK_BYTES)
    payload_bytes = messages * CHUNK_BYTES
    wire_bytes = len(_chunk().SerializeToString())
    with grpc.secure_channel(server.target, client.credentials(), client.options) as channel:
        # No deserializer: the client takes raw bytes and drops them (no parsing on our side).
        stream = channel.unary_stream(STREAM, request_serializer=BytesValue.SerializeToString)
        warm = sum(len(m) for m in stream(BytesValue(value=b"64"), timeout=60))
        if warm != 64 * wire_bytes:
            raise BenchError(f"{server.kind}: warm-up stream gave {warm} bytes")
        before, client_before = server.usage(), cpu_self_s()
        start = time.perf_counter()
        received = count = 0
        for message in stream(BytesValue(value=str(messages).encode()), timeout=600):
            received += len(message)
            count += 1
        elapsed = time.perf_counter() - start
        client_cpu, after = cpu_self_s() - client_before, server.usage()
    if count != messages or received != messages * wire_bytes:
        raise BenchError(f"{server.kind}: stream gave {count} messages, {received} bytes")
    return {
        "mbps": payload_bytes / elapsed / 1e6,
        "server_cpu_s_per_gb": (after["cpu_s"] - before["cpu_s"]) / (payload_bytes / 1e9),
        "client_cpu_s_per_gb": client_cpu / (payload_bytes / 1e9),
    }


def phase_raw_stream(certs: CertFiles, server: ServerProcess, total_bytes: int) -> dict:
    """The limit: the same bytes as figure 3, as plain TLS records (Python ssl receiving)."""
    import socket
    import ssl

    messages = max(1, total_bytes // CHUNK_BYTES)
    payload_bytes = messages * CHUNK_BYTES
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(certs.ca)
    context.load_cert_chain(certs.client_cert, certs.client_key)
    buffer = bytearray(256 * 2**10)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
            before = server.usage()
            start = time.perf_counter()
            tls.sendall(str(messages).encode())
            received = 0
            while received < payload_bytes:
                n = tls.recv_into(buffer)
                if not n:
                    break
                received += n
            elapsed = time.perf_counter() - start
            after = server.usage()
    if received != payload_bytes:
        raise BenchError(f"raw TLS gave {received} of {payload_bytes} bytes")
    return {
        "mbps": payload_bytes / elapsed / 1e6,
        "server_cpu_s_per_gb": (after["cpu_s"] - before["cpu_s"]) / (payload_bytes / 1e9),
        "cipher": after.get("cipher", "?"),
    }


# --- figure 4: memory per idle connection ----------------------------------------------------


def phase_memory(client: Client, kind: str, certs_dir: Path, connections: int) -> dict:
    """A fresh server; RSS before and with `connections` idle connections (one call each)."""
    import grpc

    credentials = client.credentials()
    with running_servers([kind], certs_dir) as servers:
        server = servers[kind]
        # Warm-up: one connection, a few calls, closed: lazy imports and first-call allocations
        # are not counted as per-connection memory.
        with grpc.secure_channel(server.target, credentials, client.options) as channel:
            echo = channel.unary_unary(
                ECHO,
                request_serializer=BytesValue.SerializeToString,
                response_deserializer=BytesValue.FromString,
            )
            for _ in range(20):
                check_echo(echo(ECHO_REQUEST, timeout=30), kind)
        time.sleep(0.5)
        before = server.usage()
        channels = []
        setup_s = []
        try:
            for _ in range(connections):
                t0 = time.perf_counter()
                channel = grpc.secure_channel(server.target, credentials, client.options)
                channels.append(channel)
                echo = channel.unary_unary(
                    ECHO,
                    request_serializer=BytesValue.SerializeToString,
                    response_deserializer=BytesValue.FromString,
                )
                check_echo(echo(ECHO_REQUEST, timeout=30), kind)
                setup_s.append(time.perf_counter() - t0)
            time.sleep(1.0)  # idle: let every connection settle (SETTINGS ACKs, pings, buffers)
            after = server.usage()
        finally:
            for channel in channels:
                channel.close()
    fds = after["fds"] - before["fds"]
    if fds < connections * 0.95:
        raise BenchError(f"{kind}: {connections} channels made only {fds} server connections")
    return {
        "kib_per_conn": (after["rss_kib"] - before["rss_kib"]) / connections,
        "rss_before_mib": before["rss_kib"] / 1024,
        "fds_per_conn": fds / connections,
        "connect_p50_ms": statistics.median(setup_s) * 1e3,
        "cipher": after.get("cipher", "?"),
    }


# =============================================================================================
# Rounds and the report


def make_certs(directory: Path) -> CertFiles:
    from jobworker.purgatory.testing import make_cert_set

    make_cert_set(directory)  # ECDSA P-256: the one key type grpcio and everyone else share
    return CertFiles.in_dir(directory)


Results = dict[str, dict[str, list[dict]]]  # figure -> kind -> per-round results


def run_bench(args: argparse.Namespace, certs_dir: Path, samples: list[str]) -> Results:
    certs = make_certs(certs_dir)
    client = Client(certs)
    kinds: list[str] = args.kinds
    results: Results = {fig: {k: [] for k in kinds} for fig in ("unary1", "unary32", "stream")}
    results["memory"] = {k: [] for k in kinds}
    results["raw"] = {"raw-tls": []}
    timed = [f for f in ("unary1", "unary32", "stream") if f in args.only]
    raw = "stream" in args.only and not args.no_raw
    if timed:
        with running_servers([*kinds, *(["raw-tls"] if raw else [])], certs_dir) as servers:
            progress(
                "servers: "
                + ", ".join(f"{k} pid {s.pid} port {s.port}" for k, s in servers.items())
            )
            for r in range(args.rounds):
                order = rotated(kinds, r)
                progress(f"round {r + 1}/{args.rounds}: order {', '.join(order)}; load {loadavg()}")
                samples.append(loadavg())
                for figure in timed:
                    for kind in order:
                        server = servers[kind]
                        if figure == "unary1":
                            res = phase_unary1(client, server, args.unary_calls, args.warmup_calls)
                            note = f"{res['rate']:.0f}/s p50 {res['p50_us']:.0f} µs"
                        elif figure == "unary32":
                            res = phase_unary32(client, server, args.unary32_s, args.in_flight)
                            note = f"{res['rate']:.0f}/s, server {res['server_cpu_us']:.0f} µs/call"
                        else:
                            res = phase_stream(client, server, args.stream_mib * MiB)
                            note = (
                                f"{res['mbps']:.0f} MB/s, server "
                                f"{res['server_cpu_s_per_gb']:.2f} CPU-s/GB"
                            )
                        results[figure][kind].append(res)
                        progress(f"  {figure:8} {kind:12} {note}")
                if raw:
                    res = phase_raw_stream(certs, servers["raw-tls"], args.stream_mib * MiB)
                    results["raw"]["raw-tls"].append(res)
                    progress(
                        f"  raw TLS  sender       {res['mbps']:.0f} MB/s,"
                        f" {res['server_cpu_s_per_gb']:.2f} CPU-s/GB"
                    )
    if "memory" in args.only:
        for r in range(args.memory_rounds):
            for kind in rotated(kinds, r):
                progress(
                    f"memory round {r + 1}/{args.memory_rounds}: {kind},"
                    f" {args.connections} connections"
                )
                res = phase_memory(client, kind, certs_dir, args.connections)
                results["memory"][kind].append(res)
                progress(
                    f"  memory   {kind:12} {res['kib_per_conn']:.1f} KiB/conn,"
                    f" connect+call p50 {res['connect_p50_ms']:.2f} ms"
                )
        samples.append(loadavg())
    return results


@dataclass(frozen=True)
class Row:
    figure: str
    key: str
    label: str
    fmt: str
    higher_is_better: bool
    extra: bool = False  # informative, not one of the figures


INT, TWO = "{:.0f}", "{:.2f}"
UP, DOWN = True, False  # higher is better / lower is better
ROWS = (
    Row("unary1", "rate", "unary, 1 in flight, calls/s", INT, UP),
    Row("unary1", "p50_us", "unary, 1 in flight, p50 µs", INT, DOWN),
    Row("unary1", "p99_us", "unary, 1 in flight, p99 µs", INT, DOWN),
    Row("unary1", "server_cpu_us", "(server CPU per call at 1 in flight, µs)", INT, DOWN, True),
    Row("unary32", "rate", "unary, 32 in flight on one connection, calls/s", INT, UP),
    Row("unary32", "server_cpu_us", "server CPU per unary call at 32 in flight, µs", INT, DOWN),
    Row("unary32", "client_cpu_us", "(client CPU per call at 32 in flight, µs)", INT, DOWN, True),
    Row("stream", "mbps", "one server stream of 64 KiB messages, MB/s", INT, UP),
    Row("stream", "server_cpu_s_per_gb", "server CPU per GB streamed, s", TWO, DOWN),
    Row("stream", "client_cpu_s_per_gb", "(client CPU per GB streamed, s)", TWO, DOWN, True),
    Row("memory", "kib_per_conn", "memory per idle connection, KiB", INT, DOWN),
    Row("memory", "connect_p50_ms", "(new connection + 1 call, p50 ms)", TWO, DOWN, True),
)


def median_of(results: Results, row: Row, kind: str) -> float | None:
    values = [r[row.key] for r in results[row.figure].get(kind, [])]
    return statistics.median(values) if values else None


def spread(results: Results, row: Row, kind: str) -> str:
    values = [r[row.key] for r in results[row.figure].get(kind, [])]
    if len(values) < 2:
        return ""
    mid = statistics.median(values)
    return f"±{(max(values) - min(values)) / 2 / mid * 100:.0f}%" if mid else ""


def report(results: Results, args: argparse.Namespace) -> list[str]:
    kinds: list[str] = args.kinds
    rows = [row for row in ROWS if results[row.figure] and any(results[row.figure].values())]
    lines = [
        "| figure | " + " | ".join(LABELS[k] for k in kinds) + " |",
        "|---|" + "---:|" * len(kinds),
    ]
    for row in rows:
        cells = []
        for kind in kinds:
            value = median_of(results, row, kind)
            cells.append("-" if value is None else row.fmt.format(value))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += ["", "Spread (half the min-max range over rounds, relative to the median):", ""]
    lines.append("| figure | " + " | ".join(LABELS[k] for k in kinds) + " |")
    lines.append("|---|" + "---:|" * len(kinds))
    for row in rows:
        if not row.extra:
            lines.append(
                f"| {row.label} | "
                + " | ".join(spread(results, row, k) or "-" for k in kinds)
                + " |"
            )
    for base in ("grpclib", "grpcio-sync"):
        if base not in kinds:
            continue
        lines += [
            "",
            f"RATIOS to {LABELS[base]} (x = server ÷ {base}; ↑ = higher is better, ↓ = lower is):",
            "",
            "| figure | " + " | ".join(LABELS[k] for k in kinds if k != base) + " |",
            "|---|" + "---:|" * (len(kinds) - 1),
        ]
        for row in rows:
            b = median_of(results, row, base)
            cells = []
            for kind in kinds:
                if kind == base:
                    continue
                v = median_of(results, row, kind)
                cells.append("-" if v is None or not b else f"{v / b:.2f}x")
            arrow = "↑" if row.higher_is_better else "↓"
            lines.append(f"| {row.label} {arrow} | " + " | ".join(cells) + " |")
    raw = results["raw"]["raw-tls"]
    if raw:
        raw_mbps = statistics.median(r["mbps"] for r in raw)
        raw_cpu = statistics.median(r["server_cpu_s_per_gb"] for r in raw)
        lines += [
            "",
            f"Limit measured in the same run: raw TLS 1.3 over loopback ({raw[0]['cipher']}),"
            f" pyOpenSSL sender on a blocking socket with 64 KiB writes, Python ssl receiver:"
            f" {raw_mbps:.0f} MB/s, sender {raw_cpu:.2f} CPU-s/GB (ANCHORS.md: 1890 MB/s, 0.51).",
        ]
    if "purgatory" in kinds:
        lines += ["", "The issue's bar for purgatory:", ""]
        if "grpclib" in kinds:
            for row in rows:
                if row.extra:
                    continue
                p, g = median_of(results, row, "purgatory"), median_of(results, row, "grpclib")
                if p is None or g is None:
                    continue
                ok = p >= g if row.higher_is_better else p <= g
                lines.append(
                    f"- {row.label}: purgatory {row.fmt.format(p)} vs grpclib {row.fmt.format(g)}"
                    f" ({p / g:.2f}x): {'on par or better' if ok else 'WORSE'}"
                )
        cpu_row = next(r for r in ROWS if r.key == "server_cpu_s_per_gb")
        cpu = median_of(results, cpu_row, "purgatory")
        if cpu is not None:
            lines.append(
                f"- server CPU per GB streamed ≤ {BAR_CPU_S_PER_GB}: purgatory {cpu:.2f}:"
                f" {'met' if cpu <= BAR_CPU_S_PER_GB else 'NOT MET'}"
            )
    ciphers = {k: r[0]["cipher"] for k, r in results["memory"].items() if r}
    if ciphers:
        lines += ["", "Ciphers: " + "; ".join(f"{k}: {c}" for k, c in ciphers.items()) + "."]
    return lines


def env_header() -> str:
    import grpc
    import grpclib
    import h2
    import OpenSSL
    import trio

    openssl = OpenSSL.SSL.OpenSSL_version(OpenSSL.SSL.OPENSSL_VERSION).decode()
    return (
        f"env: Linux {platform.release()} {platform.machine()} · Python {platform.python_version()}"
        f" · {os.cpu_count()} CPUs · trio {trio.__version__} · h2 {h2.__version__} · pyOpenSSL"
        f" {OpenSSL.__version__} ({openssl})"
        f" · grpcio {grpc.__version__} · grpclib {grpclib.__version__}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark purgatory against grpcio (sync, aio) and grpclib.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    p.add_argument("--only", default="unary1,unary32,stream,memory", help="figures to run")
    p.add_argument("--kinds", default=",".join(KINDS), help="servers to run")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    p.add_argument("--unary-calls", type=int, default=3000, help="calls per unary-1 round")
    p.add_argument("--warmup-calls", type=int, default=200, help="warm-up calls, not counted")
    p.add_argument("--unary32-s", type=float, default=3.0, help="seconds per unary-32 round")
    p.add_argument("--in-flight", type=int, default=32, help="concurrent calls for unary-32")
    p.add_argument("--stream-mib", type=int, default=1024, help="MiB streamed per round")
    p.add_argument("--connections", type=int, default=1000, help="idle connections")
    p.add_argument("--memory-rounds", type=int, default=3, help="memory rounds (median)")
    p.add_argument(
        "--no-raw", action="store_true", help="skip the raw TLS sender (the streaming limit)"
    )
    p.add_argument("--serve", choices=tuple(SERVERS), help=argparse.SUPPRESS)
    p.add_argument("--certs", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.unary_calls, args.warmup_calls = 1, 500, 50
        args.unary32_s, args.stream_mib = 1.0, 128
        args.connections, args.memory_rounds = 200, 1
    args.only = [f for f in args.only.split(",") if f]
    args.kinds = [k for k in args.kinds.split(",") if k]
    for name, chosen, allowed in (
        ("--only", args.only, ("unary1", "unary32", "stream", "memory")),
        ("--kinds", args.kinds, KINDS),
    ):
        unknown = set(chosen) - set(allowed)
        if unknown:
            p.error(f"unknown {name}: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        SERVERS[args.serve](CertFiles.in_dir(args.certs))
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # children inherit it: servers need a descriptor per connection too
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    load_start = loadavg()
    samples: list[str] = []
    failed = False
    results: Results | None = None
    started = time.monotonic()
    certs_dir = None
    try:
        with tempfile.TemporaryDirectory(prefix="bench-purgatory-") as tmp:
            certs_dir = tmp
            results = run_bench(args, Path(tmp), samples)
    except BenchError as exc:
        failed = True
        print(f"BENCH FAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        failed = True
        print("interrupted", file=sys.stderr)
    children = own_children()
    for pid in children:  # never expected: running_servers stops its servers on every path
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    temps = [certs_dir] if certs_dir and os.path.exists(certs_dir) else []
    print(f"# purgatory gRPC bench{' (--quick)' if args.quick else ''}")
    print(env_header())
    print(
        "mutual TLS 1.3, ECDSA P-256, loopback; one grpcio client (sync stubs; grpc.aio for"
        " unary-32) in this process;"
        f" {args.rounds} interleaved round(s): unary-1 {args.unary_calls} calls, unary-32"
        f" {args.unary32_s:g} s at {args.in_flight} in flight, stream {args.stream_mib} MiB;"
        f" memory: {args.connections} connections x {args.memory_rounds} fresh server(s) each."
    )
    if results is not None:
        print()
        print("\n".join(report(results, args)))
    print()
    print(
        f"Load average: {load_start} at start; per round {' / '.join(samples) or '-'};"
        f" {loadavg()} at end. Took {time.monotonic() - started:.0f} s."
    )
    print(
        f"Hygiene: server processes left: {len(children)}"
        + (f" {children} (killed)" if children else "")
        + f"; temp dirs left: {len(temps)}."
    )
    return 1 if failed or children or temps else 0


if __name__ == "__main__":
    sys.exit(main())
