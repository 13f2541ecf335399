"""A real server observed: the service over mutual TLS with its call observer set (metrics,
the audit log, or both), and its metrics served on 127.0.0.1 for real HTTP scrapes."""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from jobworker.purgatory import CallEnded, Server, TLSConfig
from jobworker.purgatory.testing import serve as serve_on_loopback
from jobworker.service import Metrics, as_grpc_error, identify, open_job_service, serve_metrics
from jobworker.supervisor import LimitPolicy, Supervisor

from .conftest import (
    DEFAULT_LIMITS,
    GRACE_S,
    MAX_LIMITS,
    RETENTION_BYTES,
    Certs,
    Client,
    client_tls,
)


@dataclass
class Observed:
    metrics: Metrics
    url: str
    clients: dict[str, Client]

    def client(self, name: str) -> Client:
        return self.clients[name]

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample, by (name, sorted labels), from a real HTTP GET."""
        text = await trio.to_thread.run_sync(get, self.url)
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


def get(url: str, method: str = "GET", data: bytes | None = None) -> str:
    request = urllib.request.Request(url, method=method, data=data)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def rpcs(samples, method: str, code: str) -> float:
    return (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_service="jobworker.v1.JobService",
            grpc_method=method,
            grpc_type="server_stream" if method == "GetJobLogs" else "unary",
            grpc_code=code,
        )
        or 0.0
    )


def per_job(samples, name: str) -> dict[str, float]:
    return {dict(labels)["job_id"]: v for (n, labels), v in samples.items() if n == name}


@asynccontextmanager
async def observed_server(
    tmp_path: Path, certs: Certs, observe: Callable[[CallEnded], None] | None = None
) -> AsyncIterator[Observed]:
    """The service over mutual TLS, its Metrics fed by the server's call observer (unless
    `observe` replaces it), served on 127.0.0.1 (a free port) by `serve_metrics`."""
    supervisor = Supervisor(
        data_dir=tmp_path / "data",
        limits=LimitPolicy(defaults=DEFAULT_LIMITS, maximums=MAX_LIMITS),
        grace_period_s=GRACE_S,
        retention_bytes=RETENTION_BYTES,
    )
    metrics = Metrics()
    async with supervisor, open_job_service(supervisor, metrics=metrics) as service:
        tls = TLSConfig.server(
            cert_file=certs.server.cert_file,
            key_file=certs.server.key_file,
            ca_files=[certs.ca.cert_file],
        )
        server = Server(
            service.methods(),
            tls=tls,
            identify=identify,
            errors=as_grpc_error,
            observe=observe or metrics.observe_call,
        )
        metrics.watch_server(server)
        async with trio.open_nursery() as nursery:
            [(host, port), *_] = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
            async with serve_on_loopback(server) as on_loopback, AsyncExitStack() as stack:
                clients = {
                    name: Client(
                        await stack.enter_async_context(
                            on_loopback.connect(client_tls(certs, name))
                        )
                    )
                    for name in ("alice", "bob", "nameless")
                }
                yield Observed(metrics, f"http://{host}:{port}/metrics", clients)
            nursery.cancel_scope.cancel()
