"""`jobworker`: the server (`jobworker serve`) and its development certificates
(`jobworker certs init`, `jobworker certs add`).

Theory of operation of `serve`
------------------------------
Everything cheap is checked before anything is created: the config (file and flags), the TLS
files (readable, key matching certificate). Then the Supervisor takes its cgroups, the service
starts, and the server binds; each failure is one line on stderr and exit code 2.

SIGINT and SIGTERM are captured from the first moment (a signal during startup waits for the
watcher rather than killing the process with a cgroup half made). The first one starts the
graceful ladder: the health service says NOT_SERVING, the server stops accepting and sends
GOAWAY, and meanwhile every job is stopped with the usual escalation (SIGTERM, the grace period,
SIGKILL), so clients following a job see its output to the end. Connections get the grace
period plus a margin to finish; then the service, the Supervisor (which removes every cgroup)
and the process end, with exit code 0. A second signal cuts it short: every job still running
is killed at once (SIGKILL to its whole cgroup), everything else is cancelled, and the exit
code is 128 + the signal's number.

SIGHUP reloads the config file (`_Run._reload`), the flags still over it. The file is read and
checked in a worker thread (it is blocking I/O, as is probing the host); then, back on the Trio
thread and without a checkpoint in between, the service takes the new settings, logging is
reconfigured and the run's settings replaced: no call sees half of them. What only a restart can
change (the listener, TLS, data directory, cgroups, isolation, the transport's budgets) is kept
and named in one warning line; a file that cannot be used changes nothing, in one error line.
Connections, log streams and jobs are untouched: a running job keeps the limits it started with.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import trio
from cyclopts import App, Parameter

import jobworker
from jobworker.purgatory import Server, TLSConfig, TLSConfigError
from jobworker.purgatory.reflection import reflection_methods, service_names
from jobworker.supervisor import (
    CgroupError,
    InvalidJobSpec,
    Isolation,
    IsolationUnavailable,
    Supervisor,
    sandbox,
)

from . import certs as certs_lib
from .config import (
    DEFAULT_LISTEN,
    DEFAULT_TLS_DIR,
    LIMIT_KEY_OF,
    ConfigError,
    ServeSettings,
    changed_settings,
    default_data_dir,
    keep_restart_settings,
    load_config_file,
    resolve,
    show_limit,
)
from .errors import CliError, run_cli
from .logsetup import configure_logging
from .parsing import Address, format_duration

if TYPE_CHECKING:  # the service package is imported when serving, not for `certs`
    from jobworker.purgatory import CallEnded
    from jobworker.service import JobStore

log = logging.getLogger("jobworker.serve")

# Connections may outlive the start of a shutdown by the jobs' grace period plus this: long
# enough for a StopJob or a follower to see its job end, short enough not to hang a shutdown.
DRAIN_MARGIN_S = 5.0

app = App(
    name="jobworker",
    help="Run Linux commands as supervised jobs in cgroups, behind a mutual-TLS gRPC API.",
    version=jobworker.__version__,
    # Each help text says its default in words; cyclopts would print Python values
    # ("[default: ()]", "[default: False]").
    default_parameter=Parameter(show_default=False),
)
app.register_install_completion_command(
    help="Install shell completion for jobworker (bash, zsh, fish).", group="Setup"
)
certs_app = App(
    name="certs",
    help="Development certificates: a CA, the server's certificate, users' certificates.",
)
app.command(certs_app)


# --- jobworker serve -------------------------------------------------------------------------

LIMITS = "Default limits (for jobs that ask for none)"
MAXIMUMS = "Maximum limits (what a job may ask for; by default, what this host has)"
FAIRNESS = "Caps (in all, and per identity so no one user takes every slot)"
# (No square brackets: the help's markup would take "[transport]" for a style and drop it.)
CONNECTIONS = "Connections (the rest of the transport's budgets: the config file's transport table)"
ISOLATION = "Isolation (who jobs run as, what they see)"
RETENTION = "Retention (ended jobs, and the output kept on disk)"
OBSERVING = "Observing (the audit log, metrics)"
ACCESS = "Access and logging"


@app.command
def serve(
    *,
    config: Annotated[
        Path | None,
        Parameter(help="A TOML file; its keys are these flags' names. SIGHUP reloads it."),
    ] = None,
    listen: Annotated[
        str | None,
        Parameter(
            help="HOST:PORT to listen on; :PORT for every interface. Default: "
            f"{DEFAULT_LISTEN} (this machine only)."
        ),
    ] = None,
    cert: Annotated[
        str | None, Parameter(help=f"Server certificate. Default: {DEFAULT_TLS_DIR}/server.crt.")
    ] = None,
    key: Annotated[
        str | None, Parameter(help=f"Its private key. Default: {DEFAULT_TLS_DIR}/server.key.")
    ] = None,
    ca: Annotated[
        str | None,
        Parameter(
            help=f"CA that client certificates must chain to. Default: {DEFAULT_TLS_DIR}/ca.crt."
        ),
    ] = None,
    data_dir: Annotated[
        str | None,
        Parameter(
            help="Where job records and output are kept. Default: /var/lib/jobworker as root, "
            "else ~/.local/state/jobworker."
        ),
    ] = None,
    cpu: Annotated[
        str | None,
        Parameter(group=LIMITS, help="CPU cores, or % of one core: 2, 50% (default 0.5)."),
    ] = None,
    memory: Annotated[str | None, Parameter(group=LIMITS, help="Memory (default 1G).")] = None,
    io_read: Annotated[
        str | None, Parameter(group=LIMITS, help="Read bytes per second (default 100M).")
    ] = None,
    io_write: Annotated[
        str | None, Parameter(group=LIMITS, help="Write bytes per second (default 100M).")
    ] = None,
    pids: Annotated[
        int | None, Parameter(group=LIMITS, help="Processes and threads (default 4096).")
    ] = None,
    io_read_iops: Annotated[
        int | None,
        Parameter(group=LIMITS, help="Read operations per second per disk (default: no limit)."),
    ] = None,
    io_write_iops: Annotated[
        int | None,
        Parameter(group=LIMITS, help="Write operations per second per disk (default: no limit)."),
    ] = None,
    max_cpu: Annotated[
        str | None,
        Parameter(
            group=MAXIMUMS, help="CPU cores or % of one core (default: the CPUs this server has)."
        ),
    ] = None,
    max_memory: Annotated[
        str | None, Parameter(group=MAXIMUMS, help="Memory, e.g. 4G (default: the host's RAM).")
    ] = None,
    max_io_read: Annotated[
        str | None,
        Parameter(group=MAXIMUMS, help="Read bytes per second (default: the kernel's most)."),
    ] = None,
    max_io_write: Annotated[
        str | None,
        Parameter(group=MAXIMUMS, help="Write bytes per second (default: the kernel's most)."),
    ] = None,
    max_pids: Annotated[
        int | None,
        Parameter(group=MAXIMUMS, help="Processes and threads (default: kernel.pid_max)."),
    ] = None,
    max_io_read_iops: Annotated[
        int | None,
        Parameter(
            group=MAXIMUMS,
            help="Read operations per second (default: the kernel's most, 4294967294; needs"
            " --io-read-iops too).",
        ),
    ] = None,
    max_io_write_iops: Annotated[
        int | None,
        Parameter(
            group=MAXIMUMS,
            help="Write operations per second (default: the kernel's most, 4294967294; needs"
            " --io-write-iops too).",
        ),
    ] = None,
    grace_period: Annotated[
        str | None, Parameter(help="Time between SIGTERM and SIGKILL when stopping (default 10s).")
    ] = None,
    max_jobs: Annotated[
        int | None, Parameter(group=FAIRNESS, help="Most jobs running at once (default 100).")
    ] = None,
    max_jobs_per_user: Annotated[
        int | None,
        Parameter(
            group=FAIRNESS,
            help="Most jobs one identity runs at once, admins too (default: half of --max-jobs).",
        ),
    ] = None,
    max_log_streams: Annotated[
        int | None,
        Parameter(
            group=FAIRNESS, help="Most log streams (jobctl logs) open at once (default 1000)."
        ),
    ] = None,
    max_log_streams_per_user: Annotated[
        int | None,
        Parameter(
            group=FAIRNESS,
            help="Most log streams one identity has open (default: half of --max-log-streams).",
        ),
    ] = None,
    max_connections: Annotated[
        int | None,
        Parameter(
            group=CONNECTIONS,
            help="Most client connections at once (default: from the open-files limit).",
        ),
    ] = None,
    max_connections_per_user: Annotated[
        int | None,
        Parameter(
            group=CONNECTIONS,
            help="Most connections one identity holds (default: an eighth of the total).",
        ),
    ] = None,
    idle_timeout: Annotated[
        str | None,
        Parameter(
            group=CONNECTIONS,
            help='Close a connection with no call for this long; "off" keeps it (default 5m).',
        ),
    ] = None,
    cgroups: Annotated[
        Literal["auto", "v2", "v1", "off"] | None,
        Parameter(help="cgroup version to use; off runs jobs without limits (default auto)."),
    ] = None,
    isolation: Annotated[
        Literal["auto", "on", "off"] | None,
        Parameter(
            group=ISOLATION,
            help="Run jobs as transient users in namespaces of their own (default auto: on "
            "as root).",
        ),
    ] = None,
    transient_uids: Annotated[
        str | None,
        Parameter(
            group=ISOLATION, help="FIRST-LAST: the ids of transient users (default 70000-79999)."
        ),
    ] = None,
    run_as: Annotated[
        tuple[str, ...],
        Parameter(
            negative="",
            group=ISOLATION,
            help="IDENTITY=ACCOUNT: run this identity's jobs as that local account (root "
            "only when named so); repeatable.",
        ),
    ] = (),
    network: Annotated[
        Literal["host", "none"] | None,
        Parameter(group=ISOLATION, help="Jobs' network unless they ask: host (default) or none."),
    ] = None,
    allow_host_network: Annotated[
        bool | None,
        Parameter(group=ISOLATION, help="Whether jobs may use the host's network (default yes)."),
    ] = None,
    keep: Annotated[
        str | None,
        Parameter(group=RETENTION, help="How long ended jobs are kept, e.g. 24h (default 7d)."),
    ] = None,
    keep_jobs: Annotated[
        int | None,
        Parameter(group=RETENTION, help="How many ended jobs are kept at most (default 10000)."),
    ] = None,
    output_budget: Annotated[
        str | None,
        Parameter(
            group=RETENTION,
            help="All jobs' output on disk together, e.g. 2G (default 10G); the oldest goes first.",
        ),
    ] = None,
    output_retention: Annotated[
        str | None,
        Parameter(
            group=RETENTION,
            help="Each job's output kept: the newest this much, e.g. 64M (default 256M). "
            "Readers are told how much older output was dropped.",
        ),
    ] = None,
    audit: Annotated[
        bool | None,
        Parameter(
            group=OBSERVING,
            negative="",
            help="Log one line per call (identity, method, job, status code, duration), "
            "refused calls and reads included, on the jobworker.audit logger (default off).",
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        Parameter(
            group=OBSERVING,
            help="[HOST:]PORT to serve Prometheus metrics on, plain HTTP at /metrics; a bare "
            "PORT is 127.0.0.1 (default: no metrics).",
        ),
    ] = None,
    allow: Annotated[
        tuple[str, ...],
        Parameter(
            negative="",
            group=ACCESS,
            help="Only these clients may call: a certificate CN (alice) or a SAN "
            "(dns:ci.example.com, email:bob@example.com, uri:spiffe://example.org/ci, "
            "ip:10.0.0.7); repeatable, added to the config file's list. Default: every "
            "certificate the CA signed.",
        ),
    ] = (),
    log_format: Annotated[
        Literal["text", "json"] | None,
        Parameter(group=ACCESS, help="text (default) or json: one object per line."),
    ] = None,
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"] | None,
        Parameter(group=ACCESS, help="The least severe lines logged (default info)."),
    ] = None,
    verbose: Annotated[
        bool,
        Parameter(
            name=["--verbose", "-v"],
            negative="",
            group=ACCESS,
            help="Short for --log-level debug: the supervisor's lines too.",
        ),
    ] = False,
) -> int:
    """Serve the JobService in the foreground until SIGINT or SIGTERM (twice: at once).
    SIGHUP reloads the config file."""
    flags: dict[str, Any] = {
        "listen": listen,
        "cert": cert,
        "key": key,
        "ca": ca,
        "data-dir": data_dir,
        "cpu": cpu,
        "memory": memory,
        "io-read": io_read,
        "io-write": io_write,
        "pids": pids,
        "io-read-iops": io_read_iops,
        "io-write-iops": io_write_iops,
        "max-cpu": max_cpu,
        "max-memory": max_memory,
        "max-io-read": max_io_read,
        "max-io-write": max_io_write,
        "max-pids": max_pids,
        "max-io-read-iops": max_io_read_iops,
        "max-io-write-iops": max_io_write_iops,
        "grace-period": grace_period,
        "max-jobs": max_jobs,
        "max-jobs-per-user": max_jobs_per_user,
        "max-log-streams": max_log_streams,
        "max-log-streams-per-user": max_log_streams_per_user,
        "max-connections": max_connections,
        "max-connections-per-user": max_connections_per_user,
        "idle-timeout": idle_timeout,
        "cgroups": cgroups,
        "isolation": isolation,
        "transient-uids": transient_uids,
        "run-as": run_as,
        "network": network,
        "allow-host-network": allow_host_network,
        "keep": keep,
        "keep-jobs": keep_jobs,
        "output-budget": output_budget,
        "output-retention": output_retention,
        "audit": audit,
        "metrics": metrics,
        "allow": allow,
        "log-format": log_format,
        "log-level": "debug" if verbose else log_level,
    }
    try:
        settings = _load(flags, config)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    configure_logging(format=settings.log_format, level=settings.log_level)
    if settings.audit:
        # Asked for by name: audit lines show whatever level the rest of the log is kept at.
        logging.getLogger("jobworker.audit").setLevel(logging.INFO)
    return trio.run(_serve, settings, config, flags)


def _load(flags: dict[str, Any], config: Path | None) -> ServeSettings:
    """The settings from the flags over the file (read now); ConfigError says what is wrong."""
    table = load_config_file(config) if config is not None else None
    return resolve(flags, table, source=f"config file {config}")


async def _serve(
    settings: ServeSettings, config_file: Path | None = None, flags: dict[str, Any] | None = None
) -> int:
    # Imported here: the service package is the layer above; `jobworker certs` needs none of it.
    from jobworker.service import StoreUnavailable, open_store, recover

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            tls = TLSConfig.server(
                cert_file=settings.cert_file,
                key_file=settings.key_file,
                ca_files=[settings.ca_file],
            )
        except TLSConfigError as exc:
            raise CliError(f"cannot use the TLS files: {exc}") from None
        for account in settings.policy.run_as.values():
            try:
                sandbox.account(account)
            except InvalidJobSpec as exc:
                raise CliError(f"run-as: {exc}") from None
        data_dir = settings.data_dir or default_data_dir(os.geteuid(), os.environ)
        try:
            lock = _lock_data_dir(data_dir)
        except OSError as exc:
            raise CliError(f"cannot use the data directory {data_dir}: {exc.strerror}") from None
        try:
            store = await open_store(data_dir / "jobworker.db")
        except StoreUnavailable as exc:
            os.close(lock)
            raise CliError(str(exc)) from None
        try:
            # Before anything runs: what a crashed run left is ended, and said so.
            plan = await recover(store, data_dir)
            if plan.lost:
                log.warning(
                    "recovered after a crash: %d job(s) lost, %d cgroup(s) removed",
                    len(plan.lost),
                    len(plan.groups) + len(plan.subtrees),
                )
            return await _serve_with(
                settings, config_file, flags or {}, tls, signals, data_dir, store
            )
        except StoreUnavailable as exc:
            raise CliError(str(exc)) from None
        finally:
            with trio.CancelScope(shield=True):
                await store.aclose()
            os.close(lock)


async def _serve_with(
    settings: ServeSettings,
    config_file: Path | None,
    flags: dict[str, Any],
    tls: TLSConfig,
    signals: Any,
    data_dir: Path,
    store: JobStore,
) -> int:
    from jobworker.service import Metrics, as_grpc_error, audit_call, identify, open_job_service

    supervisor = Supervisor(
        data_dir=data_dir,
        limits=settings.limits,
        cgroups=settings.cgroups,
        grace_period_s=settings.grace_period_s,
        retention_bytes=settings.output_retention_bytes,
        isolation=_isolation(settings, config_file),
    )
    metrics = Metrics() if settings.metrics is not None else None
    observers = []
    if settings.audit:
        observers.append(audit_call)
    if metrics is not None:
        observers.append(metrics.observe_call)
    entered = False
    try:
        async with supervisor:
            entered = True
            async with open_job_service(
                supervisor,
                store=store,
                max_running_jobs=settings.max_jobs,
                max_running_jobs_per_user=settings.max_jobs_per_user,
                max_log_streams=settings.max_log_streams,
                max_log_streams_per_user=settings.max_log_streams_per_user,
                policy=settings.policy,
                retention=settings.retention,
                metrics=metrics,
                allowed=settings.allowed,
            ) as service:
                methods = service.methods()
                # Server reflection (grpcurl, Postman, Evans) for JobService, Health and itself.
                methods += service.behind_allow_list(reflection_methods(service_names(methods)))
                server = Server(
                    methods,
                    tls=tls,
                    identify=identify,
                    errors=as_grpc_error,
                    limits=settings.transport,
                    observe=_fan_out(observers),
                )
                if metrics is not None:
                    metrics.watch_server(server)
                run = _Run(settings, supervisor, service, server, config_file, flags, metrics)
                return await run.serve(signals)
    except CgroupError as exc:  # CgroupsUnavailable included: its message names the fix
        if entered:
            raise
        raise CliError(f"cannot use cgroups: {exc}") from None
    except IsolationUnavailable as exc:
        if entered:
            raise
        raise CliError(f"cannot isolate jobs: {exc}") from None
    except OSError as exc:
        if entered:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        raise CliError(f"cannot use the data directory{where}: {exc.strerror}") from None


def _fan_out(observers: list[Callable[[CallEnded], None]]) -> Callable[[CallEnded], None] | None:
    """One call observer for the server out of several (None for none: no cost per call)."""
    if len(observers) <= 1:
        return observers[0] if observers else None

    def observe(ended: CallEnded) -> None:
        for observer in observers:
            observer(ended)

    return observe


def _lock_data_dir(data_dir: Path) -> int:
    """Hold `data_dir` for this server alone (one store, one set of job records): an fd with
    an exclusive lock, released when it is closed or the process dies."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(data_dir / "jobworker.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise CliError(
            f"the data directory {data_dir} is in use by another jobworker serve (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _isolation(settings: ServeSettings, config_file: Path | None) -> Isolation | bool:
    """What the Supervisor isolates with: the server's own secrets hidden from every job."""
    if settings.isolation == "off" or (settings.isolation == "auto" and os.geteuid() != 0):
        return False
    secrets = [settings.cert_file, settings.key_file, settings.ca_file]
    if config_file is not None:
        secrets.append(config_file)
    return Isolation(
        transient_uids=settings.transient_uids,
        hide=tuple(os.path.abspath(p) for p in secrets),
    )


class _Run:
    """One server run: bind, announce, wait for signals, shut down."""

    def __init__(
        self,
        settings: ServeSettings,
        supervisor: Supervisor,
        service,
        server,
        config_file: Path | None = None,
        flags: dict[str, Any] | None = None,
        metrics=None,
    ) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.service = service
        self.server = server
        self.metrics = metrics
        self._reloading = trio.Lock()
        self.config_file = config_file
        self.flags = flags or {}
        self.exit_code = 0
        self.stopping = False

    async def serve(self, signals) -> int:
        from jobworker.service import serve_metrics

        listen, metrics_at = self.settings.listen, self.settings.metrics
        bind_error: tuple[str, OSError] | None = None
        async with trio.open_nursery() as nursery:
            # The metrics listener first: one that cannot bind stops the start before any
            # client is served. It lives in this nursery, so it ends with the server.
            binding = f"for metrics on {metrics_at}"
            try:
                metrics_addresses = []
                if metrics_at is not None:
                    metrics_addresses = await nursery.start(
                        serve_metrics, self.metrics, metrics_at.host, metrics_at.port
                    )
                binding = f"on {listen}"
                addresses = await nursery.start(self.server.serve, listen.host, listen.port)
            except OSError as exc:
                bind_error = (binding, exc)
                nursery.cancel_scope.cancel()
            else:
                self._announce(addresses, metrics_addresses)
                nursery.start_soon(self._watch, signals, nursery)
        if bind_error is not None:
            binding, exc = bind_error
            reason = exc.strerror or str(exc)
            raise CliError(f"cannot listen {binding}: {reason.lower()}")
        log.info("stopped")
        return self.exit_code

    def _announce(self, addresses, metrics_addresses=()) -> None:
        for host, port in addresses:
            print(f"jobworker: listening on {Address(host, port)}", flush=True)
        for host, port in metrics_addresses:
            url = f"http://{Address(host, port)}/metrics"
            print(f"jobworker: metrics on {url}", flush=True)
            log.info("metrics on %s", url)
        if self.settings.audit:
            log.info("audit: one line per call, on the jobworker.audit logger")
        s = self.settings
        limits = (
            "no limits (cgroups off)"
            if self.supervisor.cgroups == "off"
            else s.limits.defaults.describe()
        )
        admission = self.server.admission
        # The io maximums are the kernel's (no host figure bounds a rate): not worth a line.
        maximums = {name: s.limits.maximum(name)[0] for name in ("cpu", "memory_bytes", "pids")} | {
            name: value
            for name in ("io_read_bps", "io_write_bps", "io_read_iops", "io_write_iops")
            if (value := getattr(s.limits.maximums, name)) is not None
        }
        log.info(
            "serving on %s: cgroups %s; %s; job defaults %s; maximums %s; grace period %s; "
            "at most %d jobs running (%d per user), %d log streams open (%d per user), "
            "%d connections (%d per user, idle ones closed after %s); data in %s",
            ", ".join(str(Address(h, p)) for h, p in addresses),
            self.supervisor.cgroups,
            self._isolation_summary(),
            limits,
            ", ".join(f"{LIMIT_KEY_OF[k]}={show_limit(k, v)}" for k, v in maximums.items()),
            format_duration(s.grace_period_s),
            s.max_jobs,
            s.max_jobs_per_user,
            s.max_log_streams,
            s.max_log_streams_per_user,
            admission.max_connections,
            admission.max_connections_per_identity,
            format_duration(s.transport.idle_timeout_s)
            if math.isfinite(s.transport.idle_timeout_s)
            else "never",
            self.supervisor.data_dir,
        )
        self._announce_access()

    def _announce_access(self) -> None:
        allowed = self.settings.allowed
        if allowed is None:
            log.info("every client whose certificate the CA signed may call (no allow-list)")
        else:
            log.info("only these clients may call (allow-list): %s", allowed)

    def _isolation_summary(self) -> str:
        isolation = self.supervisor.isolation
        if isolation is None:
            who = "root" if os.geteuid() == 0 else "this server's user"
            return f"jobs NOT isolated (they run as {who}, in the server's namespaces)"
        policy = self.settings.policy
        uids = isolation.transient_uids
        accounts = ", ".join(f"{i}={a}" for i, a in sorted(policy.run_as.items()))
        network = policy.network + ("" if policy.allow_host_network else " (host refused)")
        return (
            f"jobs isolated (transient uids {uids.start}-{uids.stop - 1}"
            f"{'; run-as ' + accounts if accounts else ''}; network {network})"
        )

    async def _watch(self, signals, nursery: trio.Nursery) -> None:
        received = 0
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                # Its own task: a reload reads files and asks NSS for accounts (a slow LDAP
                # must not hold up a SIGTERM); one at a time, in the order they came.
                nursery.start_soon(self._reload)
                continue
            received += 1
            if received == 1:
                self.stopping = True
                log.info("%s: shutting down (again to kill every job at once)", name)
                nursery.start_soon(self._shutdown, nursery)
            else:
                log.warning("%s again: killing every job and exiting now", name)
                self.exit_code = 128 + signum
                await self.service.stop_all_jobs(grace_period_s=0.0)
                nursery.cancel_scope.cancel()
                return

    async def _reload(self) -> None:
        """SIGHUP: the config file again, with the same flags over it, for every call from
        now on. All or nothing: a file that cannot be read or used changes nothing and says why
        in one line; settings only a restart can change are kept, and named in one line."""
        if self.stopping:
            log.info("SIGHUP: shutting down, nothing reloaded")
            return
        if self.config_file is None:
            log.warning("SIGHUP: no config file to reload (serve --config FILE), nothing changed")
            return
        async with self._reloading:
            await self._reload_now()

    async def _reload_now(self) -> None:
        where = f"config file {self.config_file}"
        try:
            # A thread: reading the file and probing the host are blocking I/O.
            new = await trio.to_thread.run_sync(_load_checked, self.flags, self.config_file)
        except ConfigError as exc:
            log.error("SIGHUP: not reloaded, the configuration is unchanged: %s", exc)
            return
        except Exception as exc:  # a file must never take the server and its jobs down
            log.exception("SIGHUP: not reloaded, the configuration is unchanged: %r", exc)
            return
        if self.stopping:
            return
        old = self.settings
        restart = changed_settings(old, new, restart_only=True)
        new = keep_restart_settings(old, new)
        try:
            self.service.reconfigure(
                limits=new.limits,
                grace_period_s=new.grace_period_s,
                retention_bytes=new.output_retention_bytes,
                max_running_jobs=new.max_jobs,
                max_running_jobs_per_user=new.max_jobs_per_user,
                max_log_streams=new.max_log_streams,
                max_log_streams_per_user=new.max_log_streams_per_user,
                policy=new.policy,
                retention=new.retention,
                allowed=new.allowed,
            )
        except ValueError as exc:
            log.error("SIGHUP: not reloaded, the configuration is unchanged: %s: %s", where, exc)
            return
        # The service took it (nothing above awaited since): logging follows, then the record.
        configure_logging(format=new.log_format, level=new.log_level)
        self.settings = new
        changed = changed_settings(old, new)
        log.info(
            "SIGHUP: reloaded %s: %s",
            where,
            f"changed {', '.join(changed)}" if changed else "nothing changed",
        )
        if restart:
            log.warning(
                "SIGHUP: kept %s as before: a change there takes a restart (%s)",
                ", ".join(restart),
                where,
            )
        if "allow" in changed:
            self._announce_access()

    async def _shutdown(self, nursery: trio.Nursery) -> None:
        # The service closes while connections drain: a StartJob that still arrives on an
        # open stream is refused, and every stop request is an event line like any other.
        drain_s = self.settings.grace_period_s + DRAIN_MARGIN_S
        async with trio.open_nursery() as steps:
            steps.start_soon(self.server.shutdown, drain_s)
            steps.start_soon(self.service.close)
        nursery.cancel_scope.cancel()


def _load_checked(flags: dict[str, Any], config: Path) -> ServeSettings:
    """`_load`, and the run-as accounts exist (as at startup)."""
    settings = _load(flags, config)
    for account in settings.policy.run_as.values():
        try:
            sandbox.account(account)
        except InvalidJobSpec as exc:
            raise ConfigError(f"config file {config}: run-as: {exc}") from None
    return settings


# --- jobworker certs -------------------------------------------------------------------------

UserOption = Annotated[
    tuple[str, ...],
    Parameter(
        name="--user",
        negative="",
        help="NAME or NAME:ROLE[,ROLE] (roles: admin, viewer); repeat for more users.",
    ),
]
KeyTypeOption = Annotated[
    Literal["ecdsa", "ed25519"],
    Parameter(
        help="ecdsa (P-256, works with every gRPC client; the default) or ed25519 (grpcio cannot)."
    ),
]


@certs_app.command(name="init")
def certs_init(
    directory: Annotated[Path, Parameter(name="DIR")],
    /,
    *,
    user: UserOption = (),
    key_type: KeyTypeOption = "ecdsa",
    host: Annotated[
        tuple[str, ...],
        Parameter(negative="", help="Another name or address for the server (repeatable)."),
    ] = (),
    force: Annotated[bool, Parameter(negative="", help="Replace existing files.")] = False,
) -> int:
    """Create a development CA, a server certificate (localhost, 127.0.0.1, ::1) and client
    certificates in DIR. Use DIR=/etc/jobworker and `jobworker serve` needs no TLS flags."""
    try:
        users = [certs_lib.parse_user(u) for u in user]
        written = certs_lib.init(directory, users, key_type=key_type, hosts=host, force=force)
    except certs_lib.CertsError as exc:
        raise CliError(str(exc)) from None
    _report(written)
    d = directory.absolute()
    print("\nNext:")
    if d == DEFAULT_TLS_DIR:
        print("  jobworker serve")
    else:
        print(f"  jobworker serve --cert {d}/server.crt --key {d}/server.key --ca {d}/ca.crt")
    _next_for_users(d, users)
    return 0


@certs_app.command(name="add")
def certs_add(
    directory: Annotated[Path, Parameter(name="DIR")],
    /,
    *,
    user: UserOption = (),
    key_type: KeyTypeOption = "ecdsa",
    san: Annotated[
        tuple[str, ...],
        Parameter(
            negative="",
            help="A subject alternative name for the one --user: dns:NAME, email:ADDRESS, "
            "uri:URI or ip:ADDRESS (repeatable); a server's --allow may name it so.",
        ),
    ] = (),
    force: Annotated[bool, Parameter(negative="", help="Replace existing files.")] = False,
) -> int:
    """Issue client certificates for more users with the CA that `certs init` made in DIR."""
    try:
        users = [certs_lib.parse_user(u) for u in user]
        written = certs_lib.add_users(directory, users, key_type=key_type, force=force, sans=san)
    except certs_lib.CertsError as exc:
        raise CliError(str(exc)) from None
    _report(written)
    print("\nNext:")
    _next_for_users(directory.absolute(), users)
    return 0


def _report(written: list[certs_lib.Written]) -> None:
    width = max(len(str(w.path)) for w in written)
    for w in written:
        print(f"wrote {w.path!s:<{width}}  {w.what}")


def _next_for_users(directory: Path, users: list[certs_lib.UserSpec]) -> None:
    if not users:
        print("  (no users yet: jobworker certs add DIR --user NAME[:ROLE])")
        return
    first = users[0].name
    print(f"  # as {first}: jobctl finds its files in ~/.config/jobctl/")
    print(f"  mkdir -p ~/.config/jobctl && cp {directory}/{first}/* ~/.config/jobctl/")
    print("  jobctl run -- echo hello")
    print(f"  # or point at them for one shell: JOBCTL_CERT={directory}/{first}/client.crt \\")
    print(f"  #   JOBCTL_KEY={directory}/{first}/client.key JOBCTL_CA={directory}/{first}/ca.crt")


def main(argv: list[str] | None = None) -> int:
    return run_cli(
        "jobworker",
        lambda: app(argv, print_error=False, exit_on_error=False, result_action="return_value"),
    )


if __name__ == "__main__":
    sys.exit(main())
