"""Real processes for the CLI tests: certificates made by `jobworker certs init`, `jobworker
serve` as a subprocess, `jobctl` as subprocesses pointed at a user's files by JOBCTL_*.

Every server started here is torn down on the way out whatever happened: SIGTERM (the graceful
path, which stops the jobs and removes their cgroups), then — if that does not end it — SIGKILL
to the server and to every process it had started.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
JOBWORKER = [str(BIN / "jobworker")]
JOBCTL = [str(BIN / "jobctl")]
USERS = ("alice", "bob", "carol:admin", "vic:viewer")
TIMEOUT_S = 30
LISTENING = re.compile(rb"^jobworker: listening on (\S+):(\d+)$")


def run(argv: list[str], *, env: dict[str, str] | None = None, timeout: float = TIMEOUT_S):
    return subprocess.run(argv, capture_output=True, env=env, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs") / "tls"
    argv = [*JOBWORKER, "certs", "init", str(directory)]
    for user in USERS:
        argv += ["--user", user]
    done = run(argv)
    assert done.returncode == 0, done.stderr.decode()
    return directory


@pytest.fixture(scope="session")
def other_certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA and its user "mallory": trusted by nobody here."""
    directory = tmp_path_factory.mktemp("other") / "tls"
    done = run([*JOBWORKER, "certs", "init", str(directory), "--user", "mallory"])
    assert done.returncode == 0, done.stderr.decode()
    return directory


def tls_flags(certs: Path) -> list[str]:
    return ["--cert", str(certs / "server.crt"), "--key", str(certs / "server.key"),
            "--ca", str(certs / "ca.crt")]  # fmt: skip


@dataclass
class Server:
    """A running `jobworker serve`: its address, and its stderr as it arrives."""

    process: subprocess.Popen
    host: str = ""
    port: int = 0
    # A data directory made for this server alone (None: the test gave one), removed with it.
    own_data_dir: str | None = None
    _lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start_reading_stderr(self) -> None:
        def read() -> None:
            assert self.process.stderr is not None
            for raw in self.process.stderr:
                with self._changed:
                    self._lines.append(raw.decode(errors="replace"))
                    self._changed.notify_all()
            with self._changed:
                self._lines.append("")  # EOF marker
                self._changed.notify_all()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()

    def wait_for_log(self, text: str, timeout: float = TIMEOUT_S) -> str:
        """The first stderr line containing `text`, waiting for it to arrive."""

        def found() -> str | None:
            return next((line for line in self._lines if text in line), None)

        with self._changed:
            assert self._changed.wait_for(lambda: found() or "" in self._lines, timeout), (
                f"no log line with {text!r} within {timeout}s"
            )
            line = found()
        assert line is not None, f"server stderr ended without {text!r}: {self.stderr()}"
        return line

    def stderr(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def descendants(self) -> set[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        found, todo = set(), [self.process.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found

    def terminate(self, timeout: float = TIMEOUT_S) -> int:
        """SIGTERM and wait; SIGKILL everything it started if it does not end in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.descendants():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.own_data_dir is not None:
            shutil.rmtree(self.own_data_dir, ignore_errors=True)
        return self.process.returncode


def start_server(certs: Path, *extra: str) -> Server:
    # Each server its own data directory unless the test names one: several run at once, and
    # the default (/var/lib/jobworker) is one server's alone.
    own = None if "--data-dir" in extra else tempfile.mkdtemp(prefix="jobworker-cli-")
    data = ["--data-dir", own] if own else []
    process = subprocess.Popen(
        [*JOBWORKER, "serve", "--listen", "127.0.0.1:0", *tls_flags(certs), *data, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    server = Server(process, own_data_dir=own)
    server.start_reading_stderr()
    assert process.stdout is not None
    line = process.stdout.readline().rstrip(b"\n")  # blocks until it listens (or dies)
    match = LISTENING.match(line)
    if match is None:
        server.terminate()
        pytest.fail(f"the server did not start: {line!r}\n{server.stderr()}")
    server.host, server.port = match.group(1).decode(), int(match.group(2))
    return server


@pytest.fixture
def server_factory(certs_dir: Path) -> Iterator:
    started: list[Server] = []

    def start(*extra: str) -> Server:
        server = start_server(certs_dir, *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.terminate()


@pytest.fixture(scope="module")
def server(certs_dir: Path) -> Iterator[Server]:
    server = start_server(certs_dir, "--grace-period", "5s")
    yield server
    assert server.terminate() == 0, server.stderr()


@dataclass(frozen=True)
class Jobctl:
    """`jobctl` as one of the users, talking to one server."""

    certs: Path
    server: str

    def env(self, user: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBCTL_")}
        env.update(
            JOBCTL_SERVER=self.server,
            JOBCTL_CERT=str(self.certs / user / "client.crt"),
            JOBCTL_KEY=str(self.certs / user / "client.key"),
            JOBCTL_CA=str(self.certs / user / "ca.crt"),
        )
        return env

    def __call__(self, *args: str, user: str = "alice", timeout: float = TIMEOUT_S):
        return run([*JOBCTL, *args], env=self.env(user), timeout=timeout)

    def ok(self, *args: str, user: str = "alice") -> str:
        done = self(*args, user=user)
        assert done.returncode == 0, (args, done.returncode, done.stderr.decode())
        assert done.stderr == b"", done.stderr.decode()
        return done.stdout.decode()

    def popen(self, *args: str, user: str = "alice") -> subprocess.Popen:
        return subprocess.Popen(
            [*JOBCTL, *args],
            env=self.env(user),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def start(self, *command: str, user: str = "alice") -> str:
        job_id = self.ok("start", "--", *command, user=user).strip()
        assert re.fullmatch(r"[0-9a-f-]{36}", job_id), job_id
        return job_id

    def first_line(self, job_id: str, user: str = "alice") -> bytes:
        """The job's first line of output, once it has written it (logs -f delivers it live,
        and it is then on the server's disk)."""
        follower = self.popen("logs", "-f", job_id, user=user)
        try:
            assert follower.stdout is not None
            ready, _, _ = select.select([follower.stdout], [], [], TIMEOUT_S)
            assert ready, "the job said nothing"
            return follower.stdout.readline()
        finally:
            follower.kill()
            follower.communicate()

    def wait_ended(self, job_id: str, user: str = "alice") -> None:
        """Block until the job has ended: following its output returns exactly then."""
        done = self("logs", "-f", job_id, user=user)
        assert done.returncode == 0, done.stderr.decode()


@pytest.fixture(scope="module")
def jobctl(certs_dir: Path, server: Server) -> Jobctl:
    return Jobctl(certs_dir, server.address)
