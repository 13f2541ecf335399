"""Prometheus metrics of one server, on a registry of its own, served over plain HTTP by Trio.

Where each figure comes from:

* RPCs: the transport's call observer (`Metrics.observe_call`, given every `CallEnded`),
  refused calls included. Named as go-grpc-prometheus names them (``grpc_server_handled_total``
  by service, method, type and code; ``grpc_server_handling_seconds``, a histogram by service,
  method and type), so the usual gRPC dashboards and alerts work unchanged. A path that is not
  a registered method counts as method "unknown": a client cannot grow the label set.
* Jobs started and ended (by final state), jobs the OOM killer struck, jobs that hit their
  pids limit: counted by the service where it records a start and an end (`job_started`,
  `job_ended`), which is where the event log says so too.
* Output bytes jobs wrote, and output bytes sent to GetJobLogs readers (`output_streamed`).
* At scrape time, by a collector: running jobs, each running job's CPU time and memory, open
  connections and calls. The per-job series carry ``job_id`` and ``owner`` labels for running
  jobs only — at most max-jobs of them — and vanish when the job ends (its totals live on in
  the store and `jobctl status`): the label set is bounded by what runs, never by history.
  (``job_id``, not ``job``: Prometheus gives every scraped series a ``job`` label of its own.)

The registry is the server's own, not prometheus_client's global one: two servers in one
process (tests) do not share or collide, and nothing else in the process leaks into a scrape.

`serve_metrics` answers ``GET /metrics`` with the text exposition format (or OpenMetrics, if
the scraper asks): a tiny HTTP/1.1 responder in the server's nursery — one request per
connection, a few at once, a deadline for each — rather than prometheus_client's own server,
which runs in a thread of its own that nobody owns and that would read job state from outside
the Trio thread.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from jobworker.supervisor import Job, JobState, JobStatus

if TYPE_CHECKING:
    from jobworker.purgatory import CallEnded, Server, Status

log = logging.getLogger("jobworker.metrics")

# Calls last from a millisecond (a status read) to hours (a follower, a WaitJob).
RPC_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800,
)  # fmt: skip
_ENDED_STATES = [state.value for state in JobState if state.ended]
_UNKNOWN = "unknown"

# The HTTP responder's budgets: the request head, the time a scraper has to read the answer
# once it has asked, and scrapes collected at once (more wait for their turn).
MAX_REQUEST_HEAD_BYTES = 8192
SCRAPE_TIMEOUT_S = 10.0
MAX_SCRAPES = 8
# A scraper sends its request head at once. Connections still waiting for theirs are few and
# short-lived, and when too many wait, the oldest is dropped: an idle or trickling client
# (a slowloris) can never hold the door shut on Prometheus, only make itself be dropped.
HEAD_TIMEOUT_S = 2.0
MAX_WAITING_HEADS = 16


class Metrics:
    """Everything a server measures, on `registry`. Give `observe_call` to the Server
    (``Server(observe=...)``), the object to `open_job_service(metrics=...)`, and the Server
    to `watch_server` once it exists."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code (refused ones included).",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            registry=registry,
        )
        self._handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from a call's headers to its trailers.",
            ["grpc_service", "grpc_method", "grpc_type"],
            buckets=RPC_BUCKETS_S,
            registry=registry,
        )
        self._started = Counter(
            "jobworker_jobs_started", "Jobs StartJob created.", registry=registry
        )
        self._ended = Counter(
            "jobworker_jobs_ended", "Jobs ended, by final state.", ["state"], registry=registry
        )
        for state in _ENDED_STATES:  # present from the start: rate() needs a first sample
            self._ended.labels(state)
        self._oom_killed = Counter(
            "jobworker_jobs_oom_killed",
            "Ended jobs the kernel's OOM killer struck (memory limit reached).",
            registry=registry,
        )
        self._pids_limit_hit = Counter(
            "jobworker_jobs_pids_limit_hit",
            "Ended jobs that hit their pids limit (a fork or clone refused).",
            registry=registry,
        )
        self._streamed = Counter(
            "jobworker_output_streamed_bytes",
            "Job output sent to GetJobLogs readers (stdout and stderr bytes).",
            registry=registry,
        )
        # Jobs started here and not yet ended; their output is counted live, then added to
        # what ended jobs wrote, in the one step that removes them (no checkpoint between).
        self._running: dict[str, Job] = {}
        self._ended_output_bytes = 0
        self._server: Server | None = None
        self._calls: dict[tuple[str | None, Status], tuple[Any, Any]] = {}
        registry.register(_Live(self))

    def watch_server(self, server: Server) -> None:
        """Report the server's open connections and calls."""
        self._server = server

    # --- what the transport and the service tell -----------------------------------------------

    def observe_call(self, ended: CallEnded) -> None:
        key = (ended.method.path if ended.method is not None else None, ended.status)
        children = self._calls.get(key)
        if children is None:
            # labels() looks the child up under a lock, each time: a fifth of the cost per
            # call once cached. Keys are registered methods (or None) times codes: bounded.
            service, method, kind = _labels(ended)
            children = self._calls[key] = (
                self._handled.labels(service, method, kind, ended.status.name),
                self._handling.labels(service, method, kind),
            )
        handled, handling = children
        handled.inc()
        handling.observe(ended.duration_s)

    def job_started(self, job: Job) -> None:
        self._started.inc()
        self._running[job.id] = job

    def job_ended(self, job: Job, status: JobStatus) -> None:
        if self._running.pop(job.id, None) is not None:
            self._ended_output_bytes += job.output_end
        self._ended.labels(status.state.value).inc()
        if status.oom_killed:
            self._oom_killed.inc()
        if status.pids_limit_hit:
            self._pids_limit_hit.inc()

    def output_streamed(self, size_bytes: int) -> None:
        self._streamed.inc(size_bytes)

    # --- exposition ----------------------------------------------------------------------------

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry as the scraper asked for it (its Accept header): body, content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# go-grpc-prometheus's grpc_type values, by (client streaming, server streaming).
_KINDS = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


def _labels(ended: CallEnded) -> tuple[str, str, str]:
    """(grpc_service, grpc_method, grpc_type): only registered methods name themselves."""
    if ended.method is None:
        return _UNKNOWN, _UNKNOWN, _UNKNOWN
    service, _, method = ended.method.path.lstrip("/").rpartition("/")
    return service, method, _KINDS[ended.method.client_streaming, ended.method.server_streaming]


class _Live(Collector):
    """What is read at scrape time: running jobs and their usage, connections and calls."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator:
        # Families without samples: registering needs no scrape (which would read cgroups).
        yield from self._families()

    def collect(self) -> Iterator:
        metrics = self._metrics
        running, output, cpu, memory, connections, calls = self._families()
        running.add_metric([], len(metrics._running))
        written = metrics._ended_output_bytes
        for job in list(metrics._running.values()):
            written += job.output_end
            status = job.status()  # reads the job's cgroup: a few small files per job
            labels = [job.id, job.owner]
            if status.usage.cpu_s is not None:
                cpu.add_metric(labels, status.usage.cpu_s)
            if status.usage.memory_bytes is not None:
                memory.add_metric(labels, status.usage.memory_bytes)
        output.add_metric([], written)
        yield from (running, output, cpu, memory)
        server = metrics._server
        if server is not None:
            connections.add_metric([], server.open_connections)
            calls.add_metric([], server.open_calls)
            yield from (connections, calls)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily | CounterMetricFamily, ...]:
        per_job = ["job_id", "owner"]
        return (
            GaugeMetricFamily("jobworker_jobs_running", "Jobs started and not yet ended."),
            CounterMetricFamily(
                "jobworker_output_bytes",
                "Output jobs wrote (stdout and stderr bytes), since the server started.",
            ),
            CounterMetricFamily(
                "jobworker_job_cpu_seconds",
                "CPU time a running job has used (its cgroup's).",
                labels=per_job,
            ),
            GaugeMetricFamily(
                "jobworker_job_memory_bytes",
                "Memory a running job uses now (its cgroup's).",
                labels=per_job,
            ),
            GaugeMetricFamily(
                "jobworker_connections_open", "Client connections past their TLS handshake."
            ),
            GaugeMetricFamily(
                "jobworker_streams_open", "Calls in progress (HTTP/2 streams with a handler)."
            ),
        )


# --- the HTTP responder --------------------------------------------------------------------------


async def serve_metrics(
    metrics: Metrics,
    host: str | None,
    port: int,
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer scrapes on host:port (None: every interface) until cancelled. Reports the bound
    addresses (port 0 picks a free port)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    addresses = [listener.socket.getsockname()[:2] for listener in listeners]
    collecting = trio.Semaphore(MAX_SCRAPES)
    waiting: collections.deque[trio.CancelScope] = collections.deque()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.CancelScope(deadline=trio.current_time() + HEAD_TIMEOUT_S) as head:
                waiting.append(head)
                if len(waiting) > MAX_WAITING_HEADS:
                    waiting.popleft().cancel()
                try:
                    request = await _read_head(stream)
                finally:
                    if head in waiting:
                        waiting.remove(head)
            if head.cancelled_caught or request is None:
                return
            # Collecting reads every running job's cgroup: a few at a time, the rest wait.
            async with collecting:
                with trio.move_on_after(SCRAPE_TIMEOUT_S):
                    await _answer(metrics, stream, request)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the scraper left: nothing to tell it
        finally:
            await trio.aclose_forcefully(stream)

    task_status.started(addresses)
    await trio.serve_listeners(handle, listeners)


class _Request(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]


async def _read_head(stream: trio.abc.Stream) -> _Request | None:
    """The request's method, path and headers; None if the client left or sent too much
    (then it has been told so)."""
    head = b""
    while b"\r\n\r\n" not in head:
        if len(head) > MAX_REQUEST_HEAD_BYTES:
            await _respond(stream, 431, "Request Header Fields Too Large", b"")
            return None
        data = await stream.receive_some(MAX_REQUEST_HEAD_BYTES)
        if not data:
            return None
        head += data
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    method, target, *_ = [*lines[0].split(" "), "", ""]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return _Request(method, target.split("?", 1)[0], headers)


async def _answer(metrics: Metrics, stream: trio.abc.Stream, request: _Request) -> None:
    if request.method not in ("GET", "HEAD"):
        await _respond(stream, 405, "Method Not Allowed", b"GET /metrics\n", allow="GET, HEAD")
    elif request.path == "/metrics":
        try:
            body, content_type = metrics.exposition(request.headers.get("accept", ""))
        except Exception:  # a collector's bug: the scrape fails, the server does not
            log.exception("collecting the metrics failed")
            await _respond(stream, 500, "Internal Server Error", b"collection failed\n")
            return
        await _respond(stream, 200, "OK", body, content_type, head_only=request.method == "HEAD")
    else:
        await _respond(stream, 404, "Not Found", b"the metrics are at /metrics\n")


async def _respond(
    stream: trio.abc.Stream,
    code: int,
    reason: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    *,
    head_only: bool = False,
    allow: str | None = None,
) -> None:
    headers = [
        f"HTTP/1.1 {code} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow is not None:
        headers.append(f"Allow: {allow}")
    head = "\r\n".join(headers).encode() + b"\r\n\r\n"
    await stream.send_all(head if head_only else head + body)
