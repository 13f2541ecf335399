#!/usr/bin/env python3
"""The main job, end to end: a dev CA, `jobworker serve`, and `jobctl` calls as three users.

    .venv/bin/python examples/demo.py

Everything real (run as root: jobs get real cgroups): certificates from `jobworker certs init`
in a temporary directory, the server as a subprocess on a free port of 127.0.0.1, and each
`jobctl` call as a subprocess with its user's files given by JOBCTL_* variables. Each command
is printed as it would be typed, followed by its output and, when not 0, its exit code. At the
end the server gets SIGTERM — it stops its jobs and removes their cgroups — and its event log
(stderr) is printed. Exits non-zero if any step did not do what the demo expects.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

BIN = Path(sys.executable).parent
LISTENING = re.compile(r"^jobworker: listening on (\S+)$")


def say(argv: list[str], who: str | None = None, piped: str | None = None) -> None:
    prefix = f"[{who}] " if who else ""
    # As a shell would take it: printf turns the \n back into newlines.
    pipe = f"printf '{piped.encode('unicode_escape').decode()}' | " if piped is not None else ""
    print(f"{prefix}$ {pipe}{shlex.join([Path(argv[0]).name, *argv[1:]])}", flush=True)


def run(argv: list[str], *, env: dict[str, str] | None = None, who: str | None = None,
        expect: int = 0, piped: str | None = None) -> str:  # fmt: skip
    say(argv, who, piped)
    # The demo's own stdin is none of the jobs' business: /dev/null, unless a step pipes text.
    stdin = None if piped is not None else subprocess.DEVNULL
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False,
                          input=piped, stdin=stdin)  # fmt: skip
    for text in (done.stdout, done.stderr):
        if text:
            print(text, end="" if text.endswith("\n") else "\n")
    if done.returncode:
        print(f"(exit {done.returncode})")
    if done.returncode != expect:
        raise SystemExit(f"demo: expected exit {expect}, got {done.returncode}")
    print(flush=True)
    return done.stdout.strip()


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (jobs get real cgroups)", file=sys.stderr)
        return 2
    jobworker, jobctl = str(BIN / "jobworker"), str(BIN / "jobctl")
    with tempfile.TemporaryDirectory(prefix="jobworker-demo-") as tmp:
        tls = Path(tmp) / "tls"
        run([jobworker, "certs", "init", str(tls), "--user", "alice", "--user", "bob",
             "--user", "carol:admin"])  # fmt: skip
        # A temporary data directory: the demo leaves nothing behind (by default a server keeps
        # its jobs in /var/lib/jobworker, across restarts).
        serve = [jobworker, "serve", "--listen", "127.0.0.1:0", "--cert", str(tls / "server.crt"),
                 "--key", str(tls / "server.key"), "--ca", str(tls / "ca.crt"),
                 "--data-dir", str(Path(tmp) / "data")]  # fmt: skip
        server = subprocess.Popen(
            serve,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline().strip()
            match = LISTENING.match(line)
            if not match:
                server.kill()
                print(f"demo: the server did not start:\n{line}{server.communicate()[1]}")
                return 1
            print(f"$ jobworker serve --listen 127.0.0.1:0 ...   (in the background)\n{line}\n")

            def user(name: str) -> dict[str, str]:
                return {**os.environ, "JOBCTL_SERVER": match.group(1),
                        "JOBCTL_CERT": str(tls / name / "client.crt"),
                        "JOBCTL_KEY": str(tls / name / "client.key"),
                        "JOBCTL_CA": str(tls / name / "ca.crt")}  # fmt: skip

            alice, bob, carol = user("alice"), user("bob"), user("carol")
            run([jobctl, "run", "--", "sh", "-c", "echo hello from a job; echo to stderr >&2"],
                env=alice, who="alice")  # fmt: skip
            # -i passes jobctl's stdin to the job, EOF included (docker's -i).
            run([jobctl, "run", "-i", "sort"], env=alice, who="alice", piped="pear\napple\nfig\n")
            # What a job is kept from: it runs as a transient user of its own, sees only its own
            # processes, and can neither signal the server nor read its key.
            attack = (f"id; ps -e -o pid,comm; kill -9 {server.pid}; "
                      f"cat {tls / 'server.key'}; echo still here")  # fmt: skip
            run([jobctl, "run", "--", "sh", "-c", attack], env=bob, who="bob")
            job = run([jobctl, "start", "--memory", "64M", "--", "sh", "-c",
                       "for i in 1 2 3 4 5 6 7 8 9; do echo tick $i; sleep 0.3; done"],
                      env=alice, who="alice")  # fmt: skip
            run([jobctl, "status", job], env=alice, who="alice")
            run([jobctl, "status", job], env=bob, who="bob", expect=1)
            run([jobctl, "stop", "--grace", "5s", job], env=carol, who="carol (admin)")
            run([jobctl, "logs", job], env=alice, who="alice")
            run([jobctl, "status", job], env=alice, who="alice")
            run([jobctl, "list", "--all"], env=carol, who="carol (admin)")
        finally:
            server.send_signal(signal.SIGTERM)
            _, stderr = server.communicate(timeout=60)
        print(f"$ kill -TERM <server>   (exit {server.returncode}); the server's event log:")
        print(stderr, end="")
        return 0 if server.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
