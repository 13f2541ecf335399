#!/usr/bin/env python3
"""Fuzz the receive path of purgatory's server connection with mutated real client byte streams.

Theory of operation
-------------------
An *input* is a 4-byte control word followed by the bytes a client sends on one connection. The
control word says how the harness behaves, so that every input replays exactly: how the stream
is chopped into reads (one read, small reads, large reads, byte by byte), and how the "server"
answers (drains its output after every read or never — a peer that does not read —, holds
messages unacknowledged like a slow handler, resets some streams, streams answers back, runs with
limits scaled down so that small inputs reach them).

The harness plays `server.py`'s part with the public commands only: a fresh `ServerConnection`,
`initiate()`, then `receive_data()` per read; RequestReceived may get early headers or a reset,
MessageReceived is acknowledged (or held), InputEnded is answered with a message and trailers,
and commands are only given to a stream while `stream_open()` says so, as the server does.

Invariants, checked on every input (a violation is a *finding*, saved with a reproducer):

- `receive_data()` raises nothing but `ConnectionBroken`; a command on an open stream raises
  nothing; after `ConnectionBroken` the pending output ends with a GOAWAY frame and further
  reads yield no events;
- output is proportional to input: bytes written ≤ OUTPUT_FACTOR x input + OUTPUT_SLACK;
- a peer that never reads cannot queue more than `--max-queued-acks` PING/SETTINGS
  acknowledgements (the budget Go's net/http2 keeps for queued control frames);
- open streams ≤ the MAX_CONCURRENT_STREAMS the connection announced;
- messages delivered and not yet acknowledged, per stream, ≤ one stream window + one message
  (what flow control promises: the peer cannot push more than the window we gave back);
- `tracemalloc` peak during the input ≤ MEMORY_FACTOR x input + MEMORY_SLACK.

CPU time per input (`time.process_time`) is measured, not asserted: timing is noise on a shared
machine. The worst input per byte and in absolute terms is reported, and inputs above
`--slow-s` + `--slow-us-per-byte` x length are saved as "slow" for a look, not counted as
failures.

Engines: the builtin one (deterministic from `--seed`, no dependency) mutates the structure of
the stream — frames split out of the seeds, their headers, lengths, flags, stream ids and types
changed, frames dropped, duplicated, reordered, flooded, spliced across seeds, synthetic frames
and HPACK blocks inserted, gRPC message prefixes and HPACK bytes flipped — and keeps an input
that shows a behaviour not seen before (a new event, error code or error message shape) as a
new parent. With `--engine atheris` (if installed), libFuzzer's coverage guidance over h2, hpack
and purgatory chooses the parents, and mutates with the same structure-aware mutator half of the
time, its own byte mutations otherwise.

Seeds (`--make-corpus` regenerates them in tools/fuzz_corpus/): what a grpcio client sends to
purgatory's h2c server over loopback, and what purgatory's own ClientConnection sends to a
ServerConnection in memory, in the scenarios named by the file names.

Usage::

    python tools/fuzz_purgatory.py --seconds 1800 [--seed N] [--jobs 1] [--corpus DIR]
    python tools/fuzz_purgatory.py --replay FILE        # run one saved input, show its trace
    python tools/fuzz_purgatory.py --minimize FILE      # shrink it, keeping the same finding
    python tools/fuzz_purgatory.py --make-corpus        # regenerate tools/fuzz_corpus/
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import os
import random
import re
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CORPUS = HERE / "fuzz_corpus"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CONTROL_BYTES = 4

# Bounds of the invariants. Output: a HEADERS frame of a few indexed bytes may earn a full
# trailers-only answer plus a RST_STREAM, hence a large factor; what it catches is output that
# grows faster than input (amplification) or without it.
OUTPUT_FACTOR = 64
OUTPUT_SLACK = 256 * 2**10
MEMORY_FACTOR = 64
MEMORY_SLACK = 4 * 2**20
MAX_QUEUED_ACKS = 10_000  # Go's net/http2 maxQueuedControlFrames

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
FRAME_NAMES = {
    0: "DATA",
    1: "HEADERS",
    2: "PRIORITY",
    3: "RST",
    4: "SETTINGS",
    5: "PUSH_PROMISE",
    6: "PING",
    7: "GOAWAY",
    8: "WINDOW_UPDATE",
    9: "CONTINUATION",
}
FLAG_END_STREAM, FLAG_ACK, FLAG_END_HEADERS, FLAG_PADDED, FLAG_PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
_HEADER = struct.Struct(">IBI")  # 24-bit length and type, flags, stream id

# The wire is imported lazily: under atheris, h2, hpack and purgatory must be imported inside
# its instrumentation context to be coverage-guided.
wire: dict[str, object] = {}


def load_wire() -> None:
    if wire:
        return
    from jobworker.purgatory.wire import ConnectionBroken, ServerConnection, Status

    wire.update(
        ServerConnection=ServerConnection,
        ConnectionBroken=ConnectionBroken,
        Status=Status,
    )


# --- frames ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes
    length: int | None = None  # a lie in the header, when set

    def serialize(self) -> bytes:
        length = len(self.payload) if self.length is None else self.length
        return (
            _HEADER.pack(
                (length & 0xFFFFFF) << 8 | (self.type & 0xFF),
                self.flags & 0xFF,
                self.stream_id & 0xFFFFFFFF,
            )
            + self.payload
        )


@dataclasses.dataclass
class Stream:
    """A byte stream split into the preface, whole frames, and a tail that is no whole frame."""

    prefix: bytes
    frames: list[Frame]
    tail: bytes = b""

    def serialize(self) -> bytes:
        return self.prefix + b"".join(f.serialize() for f in self.frames) + self.tail


def split_frames(data: bytes) -> Stream:
    prefix = PREFACE if data.startswith(PREFACE) else b""
    pos, frames = len(prefix), []
    while len(data) - pos >= 9:
        word, flags, stream_id = _HEADER.unpack_from(data, pos)
        end = pos + 9 + (word >> 8)
        if end > len(data):
            break
        frames.append(Frame(word & 0xFF, flags, stream_id, data[pos + 9 : end]))
        pos = end
    return Stream(prefix, frames, data[pos:])


def describe(data: bytes, limit: int = 40) -> str:
    """A one-line summary of a byte stream: its frames, as a reader of the hex would want."""
    stream = split_frames(data)
    parts = ["PREFACE"] if stream.prefix else []
    for frame in stream.frames[:limit]:
        name = FRAME_NAMES.get(frame.type, f"type{frame.type}")
        parts.append(f"{name}(s{frame.stream_id},f{frame.flags:#x},{len(frame.payload)}B)")
    if len(stream.frames) > limit:
        parts.append(f"... {len(stream.frames) - limit} more frames")
    if stream.tail:
        parts.append(f"+{len(stream.tail)} bytes not a whole frame")
    return " ".join(parts)


def output_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, flags, first bytes of payload) of each whole frame of our own output."""
    frames, pos = [], 0
    while len(data) - pos >= 9:
        word, flags, _ = _HEADER.unpack_from(data, pos)
        end = pos + 9 + (word >> 8)
        frames.append((word & 0xFF, flags, data[pos + 9 : min(end, pos + 17)]))
        pos = end
    return frames


# --- the harness -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Control:
    chunking: int  # 0 one read, 1 reads of 1-64 bytes, 2 of 1-16 KiB, 3 byte by byte
    never_drain: bool  # a peer that never reads: output is taken only at the end
    hold_messages: bool  # messages acknowledged only when the request ended
    reset_some: bool
    early_headers: bool
    stream_answers: bool
    small_limits: bool
    seed: int

    @classmethod
    def parse(cls, word: bytes) -> Control:
        word = word.ljust(CONTROL_BYTES, b"\0")
        bits = word[1]
        return cls(
            chunking=word[0] % 4,
            never_drain=bool(bits & 1),
            hold_messages=bool(bits & 2),
            reset_some=bool(bits & 4),
            early_headers=bool(bits & 8),
            stream_answers=bool(bits & 16),
            small_limits=bool(bits & 32),
            seed=int.from_bytes(word[2:4], "big"),
        )


SMALL_LIMITS = dict(
    max_message_bytes=64 * 2**10,
    stream_window_bytes=32 * 2**10,
    connection_window_bytes=96 * 2**10,
    max_concurrent_streams=8,
)
DEFAULT_LIMITS = dict(
    max_message_bytes=4 * 2**20,
    stream_window_bytes=1 * 2**20,
    connection_window_bytes=8 * 2**20,
    max_concurrent_streams=100,
)


@functools.cache
def _accepted_keywords() -> frozenset[str] | None:
    """The ServerConnection keywords we may pass (they may change under us); None: any."""
    try:
        parameters = inspect.signature(wire["ServerConnection"]).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return None
    return frozenset(parameters)


def _make_connection(limits: dict[str, int]) -> tuple[object, dict[str, int]]:
    """A ServerConnection with those of the limits it accepts."""
    cls = wire["ServerConnection"]
    accepted = _accepted_keywords()
    kwargs = {k: v for k, v in limits.items() if accepted is None or k in accepted}
    try:
        connection = cls(**kwargs)
    except TypeError:
        connection, kwargs = cls(), {}
    effective = dict(DEFAULT_LIMITS)
    effective.update(kwargs)
    return connection, effective


@dataclasses.dataclass
class Finding:
    kind: str  # "exception", "command-exception", "no-goaway", "output", ...
    detail: str
    trace: str = ""

    def signature(self) -> str:
        """What makes two findings the same: the kind and, for exceptions, the type and the
        innermost frames in code we care about; numbers are taken out of messages."""
        if self.trace:
            frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', self.trace)
            ours = [
                f"{Path(f).name}:{fn}"
                for f, _line, fn in frames
                if any(p in f for p in ("jobworker", "/h2/", "/hpack/", "/hyperframe/"))
            ]
            last = self.trace.strip().splitlines()[-1].split(":")[0]
            return f"{self.kind}|{last}|{'>'.join(ours[-3:])}"
        return f"{self.kind}|{re.sub(r'[0-9]+', 'N', self.detail)[:80]}"


@dataclasses.dataclass
class Result:
    findings: list[Finding]
    features: set[str]
    cpu_s: float
    peak_bytes: int
    output_bytes: int
    length: int
    trace: list[str]


class Harness:
    """Runs one input against a fresh ServerConnection and checks the invariants."""

    def __init__(self, *, max_queued_acks: int = MAX_QUEUED_ACKS, measure_memory: bool = True):
        load_wire()
        self.max_queued_acks = max_queued_acks
        self.measure_memory = measure_memory

    def run(self, data: bytes, *, tracing: bool = False) -> Result:
        control = Control.parse(data[:CONTROL_BYTES])
        stream = data[CONTROL_BYTES:]
        if self.measure_memory:
            if not tracemalloc.is_tracing():
                tracemalloc.start()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
        started = time.process_time()
        run = _Run(control, stream, self.max_queued_acks, tracing)
        try:
            run.go()
        except Exception as exc:  # a path the checks above missed: still the wire's doing
            run.fail("escaped", f"the harness caught {exc!r}", _format(exc))
        cpu_s = time.process_time() - started
        peak = 0
        if self.measure_memory:
            peak = max(0, tracemalloc.get_traced_memory()[1] - base)
            bound = MEMORY_FACTOR * len(data) + MEMORY_SLACK
            if peak > bound:
                run.fail("memory", f"tracemalloc peak {peak} B > {bound} B for {len(data)} B in")
        return Result(
            run.findings, run.features, cpu_s, peak, run.output_bytes, len(data), run.trace
        )


class _Run:
    def __init__(self, control: Control, stream: bytes, max_queued_acks: int, tracing: bool):
        self.control = control
        self.stream = stream
        self.max_queued_acks = max_queued_acks
        self.rng = random.Random(control.seed)
        self.findings: list[Finding] = []
        self.features: set[str] = set()
        self.output_bytes = 0
        self.held: dict[int, list[int]] = {}  # stream -> flow-controlled bytes not acknowledged
        self.tracing = tracing
        self.trace: list[str] = []

    def fail(self, kind: str, detail: str, trace: str = "") -> None:
        self.findings.append(Finding(kind, detail, trace))
        self.features.add(f"finding:{kind}")

    def chunks(self) -> Iterator[bytes]:
        data, mode, rng = self.stream, self.control.chunking, self.rng
        if mode == 3 and len(data) > 4096:
            mode = 1
        if mode == 1 and len(data) > 64 * 2**10:  # thousands of reads: slow, nothing new
            mode = 2
        if mode == 0:
            yield data
            return
        pos = 0
        while pos < len(data):
            size = {1: lambda: rng.randint(1, 64), 2: lambda: rng.randint(1, 16384)}.get(
                mode, lambda: 1
            )()
            yield data[pos : pos + size]
            pos += size

    def take_output(self, final: bool = False) -> bytes:
        if self.control.never_drain:
            if not final:
                # Not even asked: the transport calls data_to_send() only once the previous
                # batch has left, and this peer never takes it.
                return b""
            out = self.connection.data_to_send()
            self.check_queued_acks(out)
        else:
            out = self.connection.data_to_send()
        self.output_bytes += len(out)
        for frame_type, flags, head in output_frames(out):
            name = FRAME_NAMES.get(frame_type, f"type{frame_type}")
            if frame_type in (GOAWAY,) and len(head) >= 8:
                self.features.add(f"out:GOAWAY:{struct.unpack('>I', head[4:8])[0]}")
            elif frame_type == RST_STREAM and len(head) >= 4:
                self.features.add(f"out:RST:{struct.unpack('>I', head[:4])[0]}")
            else:
                self.features.add(f"out:{name}:{flags}")
        return out

    def go(self) -> None:
        limits = SMALL_LIMITS if self.control.small_limits else DEFAULT_LIMITS
        self.connection, self.limits = _make_connection(limits)
        broken_type = wire["ConnectionBroken"]
        self.connection.initiate()
        self.take_output()
        broken = False
        try:
            for chunk in self.chunks():
                if broken:
                    self.after_broken(chunk)
                    continue
                try:
                    events = self.connection.receive_data(chunk)
                except broken_type as exc:
                    broken = True
                    self.on_broken(exc)
                    continue
                except Exception as exc:
                    self.fail("exception", f"receive_data raised {exc!r}", _format(exc))
                    return
                for event in events:
                    self.on_event(event)
                self.check_streams()
                self.take_output()
            self.take_output(final=True)
            budget = OUTPUT_FACTOR * (len(self.stream) + CONTROL_BYTES) + OUTPUT_SLACK
            if self.output_bytes > budget:
                self.fail("output", f"{self.output_bytes} B out for {len(self.stream)} B in")
        finally:
            dispose = getattr(self.connection, "dispose", None)
            if callable(dispose):
                try:
                    dispose()
                except Exception as exc:
                    self.fail("dispose", f"dispose() raised {exc!r}", _format(exc))

    def on_broken(self, exc: Exception) -> None:
        message = re.sub(r"[0-9]+", "N", str(exc))[:70]
        self.features.add(f"broken:{message}")
        if self.tracing:
            self.trace.append(f"ConnectionBroken: {exc}")
        out = self.take_output(final=True)
        frames = output_frames(out)
        if not frames or frames[-1][0] != GOAWAY:
            last = FRAME_NAMES.get(frames[-1][0], "?") if frames else "nothing"
            self.fail("no-goaway", f"after ConnectionBroken({exc}) the output ends with {last}")

    def after_broken(self, chunk: bytes) -> None:
        try:
            events = self.connection.receive_data(chunk)
        except Exception as exc:
            self.fail(
                "after-broken", f"receive_data after ConnectionBroken raised {exc!r}", _format(exc)
            )
            return
        if events:
            self.fail("after-broken", f"events after ConnectionBroken: {events[:3]!r}")

    def check_queued_acks(self, out: bytes) -> None:
        acks = sum(
            1
            for frame_type, flags, _ in output_frames(out)
            if frame_type in (PING, SETTINGS) and flags & FLAG_ACK
        )
        if acks > self.max_queued_acks:
            self.fail(
                "queued-acks",
                f"{acks} PING/SETTINGS acknowledgements queued for a peer that never reads "
                f"(budget {self.max_queued_acks})",
            )

    def check_streams(self) -> None:
        open_streams = getattr(self.connection, "open_streams", None)
        limit = self.limits["max_concurrent_streams"]
        if isinstance(open_streams, int) and open_streams > limit:
            self.fail("streams", f"{open_streams} open streams > MAX_CONCURRENT_STREAMS {limit}")
        window = self.limits["stream_window_bytes"] + self.limits["max_message_bytes"] + 5
        for stream_id, held in self.held.items():
            if sum(held) > window:
                self.fail(
                    "inbound-buffer",
                    f"stream {stream_id}: {sum(held)} B delivered unacknowledged > "
                    f"window + one message ({window} B)",
                )

    # -- the server's part --

    def command(self, name: str, stream_id: int, *args: object, always: bool = False) -> None:
        """A command, given only while the stream is open (as server.py does), except those
        documented as harmless on any stream (`reset`, `acknowledge`): `always`."""
        connection = self.connection
        if not always and not connection.stream_open(stream_id):
            return
        try:
            getattr(connection, name)(stream_id, *args)
        except Exception as exc:
            where = "any stream" if always else "an open stream"
            self.fail(
                "command-exception",
                f"{name}(stream {stream_id}) on {where} raised {exc!r}",
                _format(exc),
            )

    def on_event(self, event: object) -> None:
        kind = type(event).__name__
        rng = self.rng
        stream_id = getattr(event, "stream_id", None)
        if self.tracing:
            self.trace.append(_short(event))
        if kind == "StreamFailed":
            self.features.add(f"ev:StreamFailed:{re.sub(r'[0-9]+', 'N', event.message)[:50]}")
        else:
            self.features.add(f"ev:{kind}")
        if kind == "RequestReceived":
            self.held[stream_id] = []
            if self.control.reset_some and rng.random() < 0.25:
                self.held.pop(stream_id, None)
                self.command("reset", stream_id, always=True)
            elif self.control.early_headers and rng.random() < 0.5:
                self.command("send_headers", stream_id, (("x-fuzz", "early"),))
        elif kind == "MessageReceived":
            if self.control.hold_messages and stream_id in self.held:
                self.held[stream_id].append(event.flow_controlled_bytes)
            else:
                self.command("acknowledge", stream_id, event.flow_controlled_bytes, always=True)
            if self.control.stream_answers:
                self.command("send_message", stream_id, event.payload[: rng.randint(0, 64)])
        elif kind == "InputEnded":
            for flow_bytes in self.held.pop(stream_id, []):
                self.command("acknowledge", stream_id, flow_bytes, always=True)
            if self.control.reset_some and rng.random() < 0.1:
                self.command("reset", stream_id, always=True)
                return
            self.command("send_message", stream_id, b"answer")
            self.command("send_trailers", stream_id, wire["Status"].OK)
        elif kind == "StreamFailed":
            self.held.pop(stream_id, None)  # its handler is cancelled: nothing acknowledged


def _short(event: object) -> str:
    fields = []
    for field in dataclasses.fields(event) if dataclasses.is_dataclass(event) else ():
        value = getattr(event, field.name)
        if isinstance(value, bytes) and len(value) > 16:
            value = f"<{len(value)} B>"
        fields.append(f"{field.name}={value!r}")
    return f"{type(event).__name__}({', '.join(fields)})"


def _format(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


# --- the mutator -------------------------------------------------------------------------------

INTERESTING_32 = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x3FFF,
    0x4000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
]
SETTING_IDS = [1, 2, 3, 4, 5, 6, 8, 9, 0, 0xFF, 0xFFFF]


def _hpack_block(rng: random.Random) -> bytes:
    """A header block for a request, valid or subtly not: the validation paths' seeds."""
    import hpack

    headers = [
        (":method", rng.choice(["POST", "POST", "GET", "post", ""])),
        (":scheme", rng.choice(["http", "https", "ftp"])),
        (":path", rng.choice(["/fuzz.Echo/Unary", "/a/b", "/", "//", "/a/b/c", "x", "/%00/\xff"])),
        (":authority", rng.choice(["localhost", "", "a" * 300])),
        ("te", rng.choice(["trailers", "trailers", "gzip", ""])),
        (
            "content-type",
            rng.choice(
                [
                    "application/grpc",
                    "application/grpc+proto",
                    "application/grpc;x",
                    "application/json",
                    "",
                ]
            ),
        ),
    ]
    extras = [
        (
            "grpc-timeout",
            rng.choice(["1S", "100m", "99999999H", "0n", "1", "S", "123456789S", "-1S"]),
        ),
        ("grpc-encoding", rng.choice(["identity", "gzip", "deflate", "br", "GZIP", ""])),
        ("grpc-accept-encoding", "gzip,identity"),
        ("x-bin", rng.choice(["AAEC", "not base64!", "====", ""])),
        ("x-data-bin", "QUJD"),
        ("user-agent", "fuzz/" + "x" * rng.choice([1, 100, 5000])),
        ("connection", "keep-alive"),
        ("Upper-Case", "x"),
        ("x-meta", rng.choice(["value", "\x00", "a\r\nb", " padded "])),
        (":status", "200"),
        ("grpc-status", "0"),
        ("x-big", "v" * rng.choice([10, 16_000, 70_000])),
    ]
    headers += rng.sample(extras, rng.randint(0, 4))
    if rng.random() < 0.2:
        rng.shuffle(headers)
    if rng.random() < 0.1:
        headers += [(f"x-many-{i}", "y") for i in range(rng.choice([100, 2000]))]
    encoder = hpack.Encoder()
    if rng.random() < 0.3:
        encoder.header_table_size = rng.choice([0, 100, 4096, 65536])
    return encoder.encode(headers, huffman=rng.random() < 0.5)


def _synthetic_frame(rng: random.Random, stream_id: int) -> Frame:
    choice = rng.randrange(12)
    if choice == 0:
        return Frame(
            PING,
            rng.choice([0, FLAG_ACK]),
            rng.choice([0, 0, 1]),
            rng.randbytes(rng.choice([8, 8, 8, 0, 9])),
        )
    if choice == 1:
        body = b"".join(
            struct.pack(">HI", rng.choice(SETTING_IDS), rng.choice(INTERESTING_32))
            for _ in range(rng.randint(0, 4))
        )
        if rng.random() < 0.1:
            body += b"\0"
        return Frame(SETTINGS, rng.choice([0, 0, FLAG_ACK]), rng.choice([0, 0, 1]), body)
    if choice == 2:
        increment = rng.choice([0, 1, 1024, 65535, 2**31 - 1, 2**31, rng.getrandbits(31)])
        return Frame(WINDOW_UPDATE, 0, rng.choice([0, stream_id]), struct.pack(">I", increment))
    if choice == 3:
        return Frame(RST_STREAM, 0, stream_id, struct.pack(">I", rng.choice(range(15))))
    if choice == 4:
        dependency = rng.choice([0, stream_id, stream_id + 2, 0x80000000 | stream_id])
        return Frame(PRIORITY, 0, stream_id, struct.pack(">IB", dependency, rng.getrandbits(8)))
    if choice == 5:
        body = struct.pack(">II", rng.choice([0, stream_id, 2**31 - 1]), rng.choice(range(14)))
        return Frame(GOAWAY, 0, rng.choice([0, 0, 1]), body + rng.randbytes(rng.randint(0, 8)))
    if choice == 6:
        return Frame(
            CONTINUATION,
            rng.choice([0, FLAG_END_HEADERS]),
            stream_id,
            _hpack_block(rng)[: rng.randint(0, 40)],
        )
    if choice == 7:
        return Frame(
            PUSH_PROMISE,
            FLAG_END_HEADERS,
            stream_id,
            struct.pack(">I", stream_id + 1) + _hpack_block(rng),
        )
    if choice == 8:
        return Frame(
            rng.choice([10, 11, 12, 0x42, 0xFF]),
            rng.getrandbits(8),
            stream_id,
            rng.randbytes(rng.randint(0, 20)),
        )
    if choice in (9, 10):
        flags = FLAG_END_HEADERS | rng.choice([0, 0, FLAG_END_STREAM])
        block = _hpack_block(rng)
        if rng.random() < 0.2:
            flags |= FLAG_PRIORITY
            block = struct.pack(">IB", rng.choice([0, stream_id]), 16) + block
        return Frame(HEADERS, flags, stream_id, block)
    size = rng.choice([0, 1, 5, 100, 70_000])
    compressed = rng.choice([0, 0, 1, 2])
    declared = rng.choice([size, size + 1, max(0, size - 1), 0, 2**32 - 1, 5 * 2**20])
    return Frame(
        DATA,
        rng.choice([0, FLAG_END_STREAM]),
        stream_id,
        struct.pack(">BI", compressed, declared) + rng.randbytes(size),
    )


def _flip(payload: bytes, rng: random.Random) -> bytes:
    if not payload:
        return payload
    data = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        r = rng.random()
        if r < 0.4:
            data[i] ^= 1 << rng.randrange(8)
        elif r < 0.7:
            data[i] = rng.choice([0x00, 0x7F, 0x80, 0xFF, 0x3F, 0x40, 0x20, 0x0F])
        else:
            data[i] = rng.getrandbits(8)
    return bytes(data)


def mutate(data: bytes, rng: random.Random, others: list[bytes], max_len: int) -> bytes:
    """One mutant of `data` (control word + stream): a few stacked structure-aware mutations."""
    control = bytearray(data[:CONTROL_BYTES].ljust(CONTROL_BYTES, b"\0"))
    if rng.random() < 0.15:
        control[rng.randrange(CONTROL_BYTES)] = rng.getrandbits(8)
    stream = split_frames(data[CONTROL_BYTES:])
    frames = stream.frames
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4, 6])):
        _mutate_once(stream, rng, others, max_len)
    out = stream.serialize()
    if rng.random() < 0.05:
        out = _byte_mutation(out, rng)
    del frames
    return bytes(control) + out[:max_len]


def _stream_ids(stream: Stream) -> list[int]:
    return [f.stream_id for f in stream.frames if f.stream_id] or [1]


def _mutate_once(stream: Stream, rng: random.Random, others: list[bytes], max_len: int) -> None:
    frames = stream.frames
    op = rng.randrange(18)
    if not frames and op < 14:
        op = 14
    if op < 14:
        index = rng.randrange(len(frames))
        frame = frames[index]
    if op == 0:
        frame.flags ^= 1 << rng.randrange(8)
    elif op == 1:
        frame.flags = rng.choice(
            [
                0,
                FLAG_END_STREAM,
                FLAG_END_HEADERS,
                FLAG_PADDED,
                FLAG_PRIORITY,
                0xFF,
                rng.getrandbits(8),
            ]
        )
    elif op == 2:
        frame.type = rng.choice([*range(10), rng.getrandbits(8)])
    elif op == 3:
        ids = _stream_ids(stream)
        frame.stream_id = rng.choice(
            [
                0,
                1,
                2,
                3,
                frame.stream_id + 2,
                max(0, frame.stream_id - 2),
                2**31 - 1,
                0x80000000 | frame.stream_id,
                rng.randrange(1, 400, 2),
                rng.choice(ids),
            ]
        )
    elif op == 4:
        frame.length = (
            rng.choice(
                [
                    len(frame.payload) + rng.randint(-9, 9),
                    0,
                    2**14,
                    2**14 + 1,
                    2**20,
                    2**20 + 1,
                    2**24 - 1,
                    rng.getrandbits(24),
                ]
            )
            & 0xFFFFFF
        )
    elif op in (5, 6):  # HPACK and payload bytes; headers are where the parsers are
        candidates = [f for f in frames if f.type in (HEADERS, CONTINUATION)] or [frame]
        target = rng.choice(candidates) if op == 5 else frame
        target.payload = _flip(target.payload, rng)
    elif op == 7:
        cut = rng.randint(0, len(frame.payload))
        frame.payload = (
            frame.payload[:cut]
            if rng.random() < 0.6
            else (frame.payload[:cut] + rng.randbytes(rng.randint(1, 32)) + frame.payload[cut:])
        )
    elif op == 8:
        frames.insert(rng.randint(0, len(frames)), dataclasses.replace(frame))
    elif op == 9:
        del frames[index]
    elif op == 10:
        other = rng.randrange(len(frames))
        frames[index], frames[other] = frames[other], frames[index]
    elif op == 11:  # flood: the same small frame many times
        if len(frame.payload) <= 64:
            count = rng.choice([10, 100, 1000, 12_000])
            count = min(count, max(1, (max_len // 2) // (9 + len(frame.payload))))
            frames[index + 1 : index + 1] = [dataclasses.replace(frame) for _ in range(count)]
    elif op == 12:  # the gRPC message prefix of a DATA frame
        data_frames = [f for f in frames if f.type == DATA and len(f.payload) >= 5]
        if data_frames:
            target = rng.choice(data_frames)
            compressed, declared = struct.unpack_from(">BI", target.payload)
            compressed = rng.choice([compressed, 1, 2, 0xFF])
            declared = rng.choice(
                [declared + 1, max(0, declared - 1), 0, 2**31, 2**32 - 1, rng.getrandbits(24)]
            )
            target.payload = (
                struct.pack(">BI", compressed, declared & 0xFFFFFFFF) + target.payload[5:]
            )
    elif op == 13:  # a header block split into HEADERS + CONTINUATION, or padded
        if frame.type == HEADERS and len(frame.payload) > 1:
            cut = rng.randint(1, len(frame.payload) - 1)
            rest = Frame(
                CONTINUATION, frame.flags & FLAG_END_HEADERS, frame.stream_id, frame.payload[cut:]
            )
            frame.payload, frame.flags = frame.payload[:cut], frame.flags & ~FLAG_END_HEADERS
            frames.insert(index + 1, rest)
        elif frame.type in (HEADERS, DATA):
            pad = rng.choice([0, 1, 255])
            frame.flags |= FLAG_PADDED
            frame.payload = bytes([pad]) + frame.payload + b"\0" * rng.choice([pad, 0, pad // 2])
    elif op == 14:
        frames.insert(
            rng.randint(0, len(frames)),
            _synthetic_frame(rng, rng.choice([*_stream_ids(stream), rng.randrange(1, 400, 2)])),
        )
    elif op == 15:  # splice a run of frames from another input
        if others:
            donor = split_frames(rng.choice(others)[CONTROL_BYTES:]).frames
            if donor:
                start = rng.randrange(len(donor))
                run = donor[start : start + rng.randint(1, 8)]
                at = rng.randint(0, len(frames))
                frames[at:at] = [dataclasses.replace(f) for f in run]
    elif op == 16:
        if rng.random() < 0.3:
            stream.prefix = rng.choice([b"", PREFACE[:-1], PREFACE.replace(b"2.0", b"1.1")])
        else:
            stream.tail = rng.randbytes(rng.randint(1, 12))
    else:  # a fresh request in the middle: a new stream id, headers and a message
        sid = max(_stream_ids(stream)) + 2
        at = rng.randint(0, len(frames))
        frames[at:at] = [
            Frame(HEADERS, FLAG_END_HEADERS, sid, _hpack_block(rng)),
            Frame(DATA, FLAG_END_STREAM, sid, struct.pack(">BI", 0, 3) + b"abc"),
        ]


def _byte_mutation(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    data = bytearray(data)
    i = rng.randrange(len(data))
    r = rng.randrange(4)
    if r == 0:
        data[i] ^= 1 << rng.randrange(8)
    elif r == 1:
        del data[i : i + rng.randint(1, 16)]
    elif r == 2:
        data[i:i] = rng.randbytes(rng.randint(1, 16))
    else:
        j = rng.randrange(len(data))
        data[i:i] = data[j : j + rng.randint(1, 64)]
    return bytes(data)


# --- the engine --------------------------------------------------------------------------------


def load_corpus(directory: Path) -> list[bytes]:
    """Seeds with a few control words each: every seed read in several ways."""
    seeds = [p.read_bytes() for p in sorted(directory.glob("*.bin"))]
    if not seeds:
        raise SystemExit(f"no seeds in {directory}: run with --make-corpus")
    words = [
        bytes([c, b, 0, i])
        for i, (c, b) in enumerate(
            [(0, 0), (1, 0), (2, 2), (1, 1), (0, 32), (2, 34), (1, 20), (3, 12)]
        )
    ]
    return [word + seed for seed in seeds for word in words]


@dataclasses.dataclass
class Stats:
    inputs: int = 0
    input_bytes: int = 0
    worst_cpu_s: float = 0.0
    worst_cpu_len: int = 0
    worst_cpu_per_byte_us: float = 0.0
    worst_cpu_per_byte_len: int = 0
    peak_bytes: int = 0
    peak_len: int = 0
    worst_output_ratio: float = 0.0
    slow: int = 0
    failures: int = 0
    distinct: dict[str, int] = dataclasses.field(default_factory=dict)
    corpus: int = 0

    def add(self, result: Result) -> None:
        self.inputs += 1
        self.input_bytes += result.length
        if result.cpu_s > self.worst_cpu_s:
            self.worst_cpu_s, self.worst_cpu_len = result.cpu_s, result.length
        per_byte = result.cpu_s / max(result.length, 1) * 1e6
        if result.length >= 256 and per_byte > self.worst_cpu_per_byte_us:
            self.worst_cpu_per_byte_us, self.worst_cpu_per_byte_len = per_byte, result.length
        if result.peak_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_len = result.peak_bytes, result.length
        if result.length >= 256:
            ratio = result.output_bytes / result.length
            self.worst_output_ratio = max(self.worst_output_ratio, ratio)

    def merge(self, other: Stats) -> None:
        for name in ("inputs", "input_bytes", "slow", "failures", "corpus"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.worst_cpu_s > self.worst_cpu_s:
            self.worst_cpu_s, self.worst_cpu_len = other.worst_cpu_s, other.worst_cpu_len
        if other.worst_cpu_per_byte_us > self.worst_cpu_per_byte_us:
            self.worst_cpu_per_byte_us = other.worst_cpu_per_byte_us
            self.worst_cpu_per_byte_len = other.worst_cpu_per_byte_len
        if other.peak_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_len = other.peak_bytes, other.peak_len
        self.worst_output_ratio = max(self.worst_output_ratio, other.worst_output_ratio)
        for sig, count in other.distinct.items():
            self.distinct[sig] = self.distinct.get(sig, 0) + count

    def line(self, elapsed_s: float) -> str:
        return (
            f"[{elapsed_s:7.0f} s] {self.inputs} inputs "
            f"({self.inputs / max(elapsed_s, 1e-9):.0f}/s,"
            f" {self.input_bytes / 2**20:.1f} MiB), corpus {self.corpus}; worst CPU "
            f"{self.worst_cpu_s * 1e3:.1f} ms ({self.worst_cpu_len} B), "
            f"{self.worst_cpu_per_byte_us:.2f} µs/B ({self.worst_cpu_per_byte_len} B); peak "
            f"memory {self.peak_bytes / 2**20:.2f} MiB ({self.peak_len} B); output ≤ "
            f"{self.worst_output_ratio:.1f}x input; {self.failures} failing inputs, "
            f"{len(self.distinct)} distinct; {self.slow} slow"
        )


class Recorder:
    """Saves failing (and slow) inputs with a reproducer; counts distinct findings."""

    PER_SIGNATURE = 5  # inputs kept per distinct finding

    def __init__(self, directory: Path, stats: Stats) -> None:
        self.directory = directory
        self.stats = stats
        directory.mkdir(parents=True, exist_ok=True)

    def record(self, data: bytes, result: Result, slow_bound_s: float) -> None:
        if result.cpu_s > slow_bound_s:
            self.stats.slow += 1
            if self.stats.slow <= 20:
                self._save(
                    "slow",
                    data,
                    [f"{result.cpu_s:.3f} CPU-s for {len(data)} B (bound {slow_bound_s:.3f})"],
                )
        if not result.findings:
            return
        self.stats.failures += 1
        for finding in result.findings:
            signature = finding.signature()
            count = self.stats.distinct.get(signature, 0) + 1
            self.stats.distinct[signature] = count
            if count <= self.PER_SIGNATURE:
                tag = hashlib.sha1(signature.encode()).hexdigest()[:10]
                self._save(
                    f"{finding.kind}-{tag}",
                    data,
                    [f"signature: {signature}", finding.detail, finding.trace],
                )
                if count == 1:
                    print(f"NEW FINDING {finding.kind}: {finding.detail[:200]}", flush=True)

    def _save(self, stem: str, data: bytes, notes: list[str]) -> None:
        digest = hashlib.sha1(data).hexdigest()[:12]
        path = self.directory / f"{stem}-{digest}.bin"
        path.write_bytes(data)
        text = "\n".join(
            [
                *[n for n in notes if n],
                f"input: {describe(data[CONTROL_BYTES:])}",
                f"control: {Control.parse(data[:CONTROL_BYTES])}",
                f"reproduce: {sys.executable} {Path(__file__).resolve()} --replay {path}",
                "",
            ]
        )
        path.with_suffix(".txt").write_text(text)


def slow_bound(length: int, args: argparse.Namespace) -> float:
    return args.slow_s + args.slow_us_per_byte * 1e-6 * length


def fuzz_builtin(
    seconds: float,
    seed: int,
    corpus_dir: Path,
    recorder: Recorder,
    args: argparse.Namespace,
    *,
    max_inputs: int | None = None,
    report: Callable[[Stats, float], None] | None = None,
) -> Stats:
    harness = Harness(max_queued_acks=args.max_queued_acks, measure_memory=not args.no_memory)
    rng = random.Random(seed)
    seeds = load_corpus(corpus_dir)
    corpus = list(seeds)
    seen: set[str] = set()
    stats = recorder.stats
    started = time.monotonic()
    last_report = started
    for data in seeds:  # the seeds themselves first: they must pass
        result = harness.run(data)
        seen |= result.features
        stats.add(result)
        recorder.record(data, result, slow_bound(len(data), args))
    while True:
        now = time.monotonic()
        if now - started >= seconds or (max_inputs is not None and stats.inputs >= max_inputs):
            break
        if report is not None and now - last_report >= args.report_every:
            last_report = now
            stats.corpus = len(corpus)
            report(stats, now - started)
        pool = corpus if rng.random() < 0.7 else seeds
        parent = rng.choice(pool)
        if rng.random() < 0.7:  # mostly small parents: many more inputs per second
            parent = min(parent, rng.choice(pool), rng.choice(pool), key=len)
        data = mutate(parent, rng, corpus, args.max_len)
        result = harness.run(data)
        stats.add(result)
        recorder.record(data, result, slow_bound(len(data), args))
        new = result.features - seen
        if new:
            seen |= new
            if len(corpus) >= args.max_corpus:
                corpus[rng.randrange(len(seeds), len(corpus))] = data
            else:
                corpus.append(data)
    stats.corpus = len(corpus)
    return stats


def fuzz_atheris(
    seconds: float, seed: int, corpus_dir: Path, recorder: Recorder, args: argparse.Namespace
) -> None:
    import atheris

    with atheris.instrument_imports(include=["h2", "hpack", "hyperframe", "jobworker"]):
        load_wire()
    harness = Harness(max_queued_acks=args.max_queued_acks, measure_memory=not args.no_memory)
    stats = recorder.stats
    seeds = load_corpus(corpus_dir)
    work = Path(tempfile.mkdtemp(prefix="fuzz-purgatory-atheris-"))
    for i, data in enumerate(seeds):
        (work / f"seed-{i:04d}").write_bytes(data)
    started = time.monotonic()
    clock = {"last": started}

    def test_one_input(data: bytes) -> None:
        now = time.monotonic()
        if now - started >= seconds:
            stats.corpus = len(list(work.iterdir()))
            finish(stats, now - started, recorder.directory, args)
            sys.stdout.flush()
            os._exit(1 if stats.distinct else 0)
        if now - clock["last"] >= args.report_every:
            clock["last"] = now
            stats.corpus = len(list(work.iterdir()))
            print(stats.line(now - started), flush=True)
        result = harness.run(data)
        stats.add(result)
        recorder.record(data, result, slow_bound(len(data), args))

    def custom_mutator(data: bytes, max_size: int, mutator_seed: int) -> bytes:
        rng = random.Random(mutator_seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return mutate(data, rng, seeds, min(max_size, args.max_len))

    libfuzzer_args = [
        sys.argv[0],
        str(work),
        f"-seed={seed or 1}",
        f"-max_len={args.max_len}",
        "-rss_limit_mb=4096",
        "-timeout=60",
        "-print_final_stats=1",
        f"-max_total_time={int(seconds) + 60}",
    ]
    print(f"atheris: working corpus {work}", flush=True)
    atheris.Setup(libfuzzer_args, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def finish(stats: Stats, elapsed_s: float, crashes: Path, args: argparse.Namespace) -> None:
    print(stats.line(elapsed_s))
    print(
        f"\nsummary: {stats.inputs} inputs in {elapsed_s:.0f} s, "
        f"{stats.input_bytes / 2**20:.1f} MiB fed"
    )
    print(
        f"  worst CPU per input: {stats.worst_cpu_s * 1e3:.1f} ms ({stats.worst_cpu_len} B); "
        f"worst per byte: {stats.worst_cpu_per_byte_us:.2f} µs "
        f"({stats.worst_cpu_per_byte_len} B)"
    )
    print(
        f"  peak tracemalloc: {stats.peak_bytes / 2**20:.2f} MiB ({stats.peak_len} B input); "
        f"worst output/input: {stats.worst_output_ratio:.1f}"
    )
    print(f"  failing inputs: {stats.failures}; slow inputs: {stats.slow}")
    for signature, count in sorted(stats.distinct.items(), key=lambda kv: -kv[1]):
        print(f"  {count:7d} x {signature}")
    print(f"  saved inputs and reproducers: {crashes}")


def _worker(seed: int, args: argparse.Namespace, queue: object) -> None:
    stats = Stats()
    recorder = Recorder(Path(args.crashes), stats)

    def report(current: Stats, _elapsed: float) -> None:
        queue.put(("progress", seed, dataclasses.replace(current, distinct=dict(current.distinct))))

    fuzz_builtin(args.seconds, seed, Path(args.corpus), recorder, args, report=report)
    queue.put(("done", seed, stats))


def run_jobs(args: argparse.Namespace) -> Stats:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    seeds = [args.seed + i for i in range(args.jobs)]
    workers = [context.Process(target=_worker, args=(s, args, queue)) for s in seeds]
    for worker in workers:
        worker.start()
    latest: dict[int, Stats] = {}
    done: set[int] = set()
    started = time.monotonic()
    while len(done) < len(workers):
        kind, seed, stats = queue.get()
        latest[seed] = stats
        if kind == "done":
            done.add(seed)
        elif kind == "progress" and seed == seeds[0]:
            total = Stats()
            for each in latest.values():
                total.merge(each)
            print(total.line(time.monotonic() - started), flush=True)
    for worker in workers:
        worker.join()
    total = Stats()
    for each in latest.values():
        total.merge(each)
    return total


# --- replay and minimize -----------------------------------------------------------------------


def replay(path: Path, args: argparse.Namespace) -> int:
    data = path.read_bytes()
    harness = Harness(max_queued_acks=args.max_queued_acks, measure_memory=not args.no_memory)
    result = harness.run(data, tracing=True)
    print(f"input: {len(data)} B, {Control.parse(data[:CONTROL_BYTES])}")
    print(f"frames: {describe(data[CONTROL_BYTES:])}")
    for line in result.trace[:200]:
        print(f"  {line}")
    print(
        f"CPU {result.cpu_s * 1e3:.1f} ms, tracemalloc peak {result.peak_bytes} B, "
        f"output {result.output_bytes} B"
    )
    for finding in result.findings:
        print(f"\nFINDING {finding.kind}: {finding.detail}\n{finding.trace}")
    if not result.findings:
        print("no finding")
    return 1 if result.findings else 0


def minimize(path: Path, args: argparse.Namespace) -> int:
    """Drop frames, then shorten payloads, while the input still shows the same finding."""
    harness = Harness(max_queued_acks=args.max_queued_acks, measure_memory=not args.no_memory)
    data = path.read_bytes()
    target = {f.signature() for f in harness.run(data).findings}
    if not target:
        print("the input shows no finding")
        return 1
    wanted = sorted(target)[0] if not args.signature else args.signature
    print(f"keeping: {wanted}")

    def still(candidate: bytes) -> bool:
        return wanted in {f.signature() for f in harness.run(candidate).findings}

    control, stream = data[:CONTROL_BYTES], split_frames(data[CONTROL_BYTES:])
    if stream.tail and still(control + Stream(stream.prefix, stream.frames).serialize()):
        stream.tail = b""
    chunk = max(1, len(stream.frames) // 2)
    while chunk >= 1:
        i = 0
        while i < len(stream.frames):
            trial = Stream(
                stream.prefix, stream.frames[:i] + stream.frames[i + chunk :], stream.tail
            )
            if still(control + trial.serialize()):
                stream = trial
            else:
                i += chunk
        chunk //= 2
    for frame in stream.frames:  # shorter payloads where the finding allows
        for cut in (0, len(frame.payload) // 2):
            if cut < len(frame.payload):
                saved = frame.payload
                frame.payload = saved[:cut]
                if not still(control + stream.serialize()):
                    frame.payload = saved
    # Then bytes, for what is no frame (a broken preface, a torn tail) or is too small to split.
    raw = stream.serialize()
    if len(raw) <= 4096:
        chunk = max(1, len(raw) // 2)
        while chunk >= 1:
            i = 0
            while i < len(raw):
                trial = raw[:i] + raw[i + chunk :]
                if trial and still(control + trial):
                    raw = trial
                else:
                    i += chunk
            chunk //= 2
        stream = split_frames(raw)
    # Simpler harness settings, where the finding allows: one read, drain, no tricks.
    for simpler in (bytes(4), bytes([0, control[1], 0, 0])):
        if still(simpler + stream.serialize()):
            control = simpler
            break
    result = control + stream.serialize()
    out = path.with_suffix(".min.bin")
    out.write_bytes(result)
    print(f"{len(data)} B -> {len(result)} B: {out}")
    print(f"control: {Control.parse(control)}")
    print(f"frames: {describe(result[CONTROL_BYTES:])}")
    print(f"hex (control word first): {result.hex()}")
    return 0


# --- seeds -------------------------------------------------------------------------------------


def make_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    seeds = {**_purgatory_seeds(), **_grpcio_seeds()}
    for name, data in sorted(seeds.items()):
        (directory / f"{name}.bin").write_bytes(data)
        print(f"{name}.bin: {len(data)} B, {describe(data, limit=12)}")


class _Pair:
    """purgatory's ClientConnection against a ServerConnection in memory, recording what the
    client sends; the server side answers as server.py would."""

    def __init__(self, **server_limits: int) -> None:
        from jobworker.purgatory.wire import ClientConnection, ServerConnection

        self.client = ClientConnection(authority="localhost")
        self.server = ServerConnection(**server_limits)
        self.sent = bytearray()
        self.events: list[object] = []
        self.client.initiate()
        self.server.initiate()
        self.pump()

    def pump(self, answer: Callable[[object], None] | None = None) -> None:
        for _ in range(1000):
            to_server = self.client.data_to_send()
            to_client = self.server.data_to_send()
            if not to_server and not to_client:
                return
            if to_server:
                self.sent += to_server
                for event in self.server.receive_data(to_server):
                    (answer or self.answer)(event)
            if to_client:
                for event in self.client.receive_data(to_client):
                    self.events.append(event)
                    if type(event).__name__ == "MessageReceived":
                        self.client.acknowledge(event.stream_id, event.flow_controlled_bytes)

    def answer(self, event: object) -> None:
        from jobworker.purgatory.wire import Status

        kind, server = type(event).__name__, self.server
        if kind == "MessageReceived":
            server.acknowledge(event.stream_id, event.flow_controlled_bytes)
        elif kind == "InputEnded" and server.stream_open(event.stream_id):
            server.send_message(event.stream_id, b"ok")
            server.send_trailers(event.stream_id, Status.OK)


def _purgatory_seeds() -> dict[str, bytes]:
    from hyperframe.frame import PriorityFrame, SettingsFrame, WindowUpdateFrame

    from jobworker.purgatory.wire import Status

    seeds = {}
    pair = _Pair()
    sid = pair.client.start_call("/fuzz.Echo/Unary", (("x-user", "alice"),), timeout_s=5)
    pair.client.send_message(sid, b"\x0a\x05hello")
    pair.client.end_input(sid)
    pair.pump()
    seeds["purgatory-unary"] = bytes(pair.sent)

    pair = _Pair()

    def stream_answer(event: object) -> None:
        kind, server = type(event).__name__, pair.server
        if kind == "MessageReceived":
            server.acknowledge(event.stream_id, event.flow_controlled_bytes)
        elif kind == "InputEnded":
            for i in range(40):
                server.send_message(event.stream_id, bytes([i]) * 4000)
            server.send_trailers(event.stream_id, Status.OK)

    sid = pair.client.start_call("/fuzz.Echo/Stream")
    pair.client.send_message(sid, b"\x08\x28")
    pair.client.end_input(sid)
    pair.pump(stream_answer)
    pair.client.ping(b"pingpong")
    pair.pump()
    seeds["purgatory-server-streaming"] = bytes(pair.sent)

    # A message larger than the stream window: only the release of a partial message's bytes
    # lets it through (see wire/core.py), so the client sends it across WINDOW_UPDATEs.
    pair = _Pair(stream_window_bytes=32 * 2**10, connection_window_bytes=96 * 2**10)
    sid = pair.client.start_call("/fuzz.Echo/Unary")
    pair.client.send_message(sid, bytes(range(256)) * 400)  # 100 KiB
    pair.client.end_input(sid)
    for _ in range(20):
        pair.pump()
    seeds["purgatory-large-message"] = bytes(pair.sent)

    pair = _Pair()
    ids = []
    for i in range(24):
        sid = pair.client.start_call(f"/fuzz.Echo/M{i % 3}", (("x-n", str(i)),))
        pair.client.send_message(sid, bytes([i]) * (i * 50))
        ids.append(sid)
    for sid in ids[::2]:
        pair.client.end_input(sid)
    pair.pump()
    for sid in ids[1::2]:
        pair.client.reset(sid)  # cancellations, mid-call
    pair.pump()
    seeds["purgatory-many-streams-cancel"] = bytes(pair.sent)

    pair = _Pair()
    sid = pair.client.start_call("/fuzz.Echo/Unary", (("trace-bin", b"\x00\x01\xff"),))
    pair.client.ping(b"12345678")
    extra = SettingsFrame(0)
    extra.settings = {
        SettingsFrame.INITIAL_WINDOW_SIZE: 2**20,
        SettingsFrame.HEADER_TABLE_SIZE: 0,
        SettingsFrame.MAX_FRAME_SIZE: 2**20,
    }
    update = WindowUpdateFrame(0)
    update.window_increment = 2**24
    stream_update = WindowUpdateFrame(sid)
    stream_update.window_increment = 4096
    priority = PriorityFrame(sid)
    priority.depends_on, priority.stream_weight = 0, 200
    pair.pump()
    pair.sent += extra.serialize() + update.serialize() + stream_update.serialize()
    pair.sent += priority.serialize()
    pair.client.send_message(sid, b"")
    pair.client.end_input(sid)
    pair.client.ping(b"87654321")
    pair.pump()
    seeds["purgatory-control-frames"] = bytes(pair.sent)
    return seeds


def _grpcio_seeds() -> dict[str, bytes]:
    """What a grpcio client sends, recorded at purgatory's plaintext server on loopback."""
    import trio

    return trio.run(_grpcio_capture)


async def _grpcio_capture() -> dict[str, bytes]:
    import grpc
    import trio
    from google.protobuf.wrappers_pb2 import BytesValue

    from jobworker.purgatory import RpcMethod, Server

    async def unary(request: BytesValue, call: object) -> BytesValue:
        return BytesValue(value=request.value[:64])

    async def stream(request: BytesValue, call: object) -> None:
        for i in range(len(request.value) or 1):
            await call.send(BytesValue(value=bytes([i]) * 2000))

    server = Server(
        [
            RpcMethod("/fuzz.Echo/Unary", BytesValue, BytesValue, unary),
            RpcMethod("/fuzz.Echo/Stream", BytesValue, BytesValue, stream, server_streaming=True),
        ],
        tls=None,
    )

    class Recording(trio.abc.Stream):
        def __init__(self, inner: trio.abc.Stream, record: bytearray) -> None:
            self.inner, self.record = inner, record

        async def send_all(self, data: bytes) -> None:
            await self.inner.send_all(data)

        async def wait_send_all_might_not_block(self) -> None:
            await self.inner.wait_send_all_might_not_block()

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            data = await self.inner.receive_some(max_bytes)
            self.record += data
            return data

        async def aclose(self) -> None:
            await self.inner.aclose()

    def ser(b: bytes) -> bytes:
        return BytesValue(value=b).SerializeToString()

    def scenario_unary(channel: grpc.Channel) -> None:
        call = channel.unary_unary(
            "/fuzz.Echo/Unary", request_serializer=ser, response_deserializer=BytesValue.FromString
        )
        call(b"hello", metadata=(("x-user", "alice"), ("x-trace-bin", b"\x00\xff")), timeout=10)
        call(b"again", timeout=10)

    def scenario_streaming(channel: grpc.Channel) -> None:
        call = channel.unary_stream(
            "/fuzz.Echo/Stream", request_serializer=ser, response_deserializer=BytesValue.FromString
        )
        assert len(list(call(b"x" * 30, timeout=10))) == 30

    def scenario_large(channel: grpc.Channel) -> None:
        call = channel.unary_unary(
            "/fuzz.Echo/Unary", request_serializer=ser, response_deserializer=BytesValue.FromString
        )
        call(bytes(range(256)) * 600, timeout=10)  # 150 KiB

    def scenario_concurrent_cancel(channel: grpc.Channel) -> None:
        unary_call = channel.unary_unary(
            "/fuzz.Echo/Unary", request_serializer=ser, response_deserializer=BytesValue.FromString
        )
        futures = [unary_call.future(bytes([i]) * i, timeout=10) for i in range(12)]
        for future in futures:
            future.result()
        stream_call = channel.unary_stream(
            "/fuzz.Echo/Stream", request_serializer=ser, response_deserializer=BytesValue.FromString
        )
        responses = stream_call(b"y" * 200, timeout=10)
        next(responses)
        responses.cancel()

    def scenario_gzip(channel: grpc.Channel) -> None:
        call = channel.unary_unary(
            "/fuzz.Echo/Unary", request_serializer=ser, response_deserializer=BytesValue.FromString
        )
        call(b"z" * 3000, timeout=10, compression=grpc.Compression.Gzip)

    scenarios = {
        "grpcio-unary": scenario_unary,
        "grpcio-server-streaming": scenario_streaming,
        "grpcio-large-message": scenario_large,
        "grpcio-concurrent-cancel": scenario_concurrent_cancel,
        "grpcio-gzip": scenario_gzip,
    }
    seeds = {}
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def serve_one(record: bytearray, served: trio.Event) -> None:
        accepted = await listeners[0].accept()
        await server.serve_stream(Recording(accepted, record))
        served.set()

    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        for name, scenario in scenarios.items():
            record = bytearray()

            served = trio.Event()
            nursery.start_soon(serve_one, record, served)

            def client(run: Callable[[grpc.Channel], None] = scenario) -> None:
                options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
                with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                    run(channel)

            await trio.to_thread.run_sync(client)
            with trio.fail_after(10):  # the channel's close ends the connection
                await served.wait()
            seeds[name] = bytes(record)
        nursery.cancel_scope.cancel()
    for listener in listeners:
        await listener.aclose()
    return seeds


# --- CLI ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    parser.add_argument("--crashes", default=None, help="where failing inputs go (default: temp)")
    parser.add_argument("--engine", choices=["builtin", "atheris"], default="builtin")
    parser.add_argument("--max-len", type=int, default=256 * 2**10)
    parser.add_argument("--max-corpus", type=int, default=4000)
    parser.add_argument("--max-queued-acks", type=int, default=MAX_QUEUED_ACKS)
    parser.add_argument("--slow-s", type=float, default=0.5)
    parser.add_argument("--slow-us-per-byte", type=float, default=50.0)
    parser.add_argument("--report-every", type=float, default=30.0)
    parser.add_argument("--no-memory", action="store_true", help="skip tracemalloc (faster)")
    parser.add_argument("--replay", type=Path)
    parser.add_argument("--minimize", type=Path)
    parser.add_argument("--signature", help="with --minimize: the finding to keep")
    parser.add_argument("--make-corpus", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.setrecursionlimit(10_000)
    if args.make_corpus:
        make_corpus(Path(args.corpus))
        return 0
    if args.replay:
        return replay(args.replay, args)
    if args.minimize:
        return minimize(args.minimize, args)
    args.crashes = args.crashes or tempfile.mkdtemp(prefix="fuzz-purgatory-")
    crashes = Path(args.crashes)
    print(
        f"fuzzing for {args.seconds:.0f} s, engine {args.engine}, seed {args.seed}, "
        f"{args.jobs} job(s), corpus {args.corpus}, crashes {crashes}",
        flush=True,
    )
    started = time.monotonic()
    if args.engine == "atheris":
        fuzz_atheris(args.seconds, args.seed, Path(args.corpus), Recorder(crashes, Stats()), args)
        return 0  # not reached: atheris exits through test_one_input
    if args.jobs > 1:
        stats = run_jobs(args)
    else:
        stats = Stats()
        fuzz_builtin(
            args.seconds,
            args.seed,
            Path(args.corpus),
            Recorder(crashes, stats),
            args,
            report=lambda s, elapsed: print(s.line(elapsed), flush=True),
        )
    finish(stats, time.monotonic() - started, crashes, args)
    return 1 if stats.distinct else 0


if __name__ == "__main__":
    sys.exit(main())
