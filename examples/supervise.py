"""jobworker's supervisor used straight from Trio: start jobs, follow them, stop one, read why.

    sudo .venv/bin/python examples/supervise.py        # real cgroups need root (or delegation)
    .venv/bin/python examples/supervise.py --no-cgroups

Three jobs run side by side in their own cgroups: one prints and finishes, one ignores SIGTERM
and is stopped (escalated to SIGKILL after a one-second grace period), one runs out of memory.
Every line of their output is followed live, tagged with the stream it came from. Then the
one-call way, as trio.run_process: `run()` with bytes as stdin, a job whose stdin we write as a
trio stream, and the error `run()` raises for a job that fails. As root each
runs isolated, as a transient user of its own: which is why the hungry one runs the system's
Python, not this virtualenv's, which lives in root's home where that user may not go.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import trio

import jobworker
from jobworker import LimitOverrides, OutputStream

PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


async def follow(job: jobworker.Job, name: str) -> None:
    async for chunk in job.output(follow=True):
        tag = "err" if chunk.stream is OutputStream.STDERR else "out"
        for line in chunk.data.decode(errors="replace").splitlines():
            print(f"  [{name} {tag}] {line}")


def show(status: jobworker.JobStatus) -> None:
    print(f"Job:         {status.id}")
    print(f"Status:      {status.state.value}")
    print(f"Command:     {status.command_line}")
    print(f"Ended:       {status.cause}")  # exit code, signal, OOM kill, who stopped it
    if status.run_as is not None:
        print(f"User:        {status.run_as.describe()}")
    print(f"Isolation:   {', '.join(status.namespaces) or 'none'}")
    usage = status.usage
    if usage.cpu_s is not None:
        print(f"Usage:       cpu {usage.cpu_s:.2f}s, peak memory {usage.memory_peak_bytes} bytes")
    print()


async def main(cgroups: str) -> None:
    async with jobworker.Supervisor(cgroups=cgroups, grace_period_s=1) as sup:
        print(f"supervising with cgroups: {sup.cgroups}\n")
        hello = await sup.start("sh", ["-c", "echo hello; echo 'to stderr' >&2; echo bye"])
        stubborn = await sup.start(
            "sh", ["-c", "trap 'echo ignoring SIGTERM' TERM; echo ready; while :; do sleep 1; done"]
        )
        jobs = [("hello", hello), ("stubborn", stubborn)]
        if sup.cgroups != "off":
            hungry = await sup.start(
                PYTHON,
                ["-c", "print('allocating', flush=True); x = [b'x' * 2**20 for _ in range(512)]"],
                limits=LimitOverrides(memory_bytes=64 * 2**20),
            )
            jobs.append(("hungry", hungry))
        async with trio.open_nursery() as nursery:
            for name, job in jobs:
                nursery.start_soon(follow, job, name)
            await hello.wait()
            await stubborn.stop(requested_by="the example")
        for _, job in jobs:
            show(job.status())

        data = os.urandom(4 * 2**20)
        status = await sup.run(["sha256sum"], stdin=data)  # start, feed, wait; check=True
        digest = b"".join([chunk.data async for chunk in sup.get(status.id).output()])
        print(f"run sha256sum: {status.cause}; it read what we sent: ", end="")
        print(digest.split()[0].decode() == hashlib.sha256(data).hexdigest())

        upper = await sup.start(["tr", "a-z", "A-Z"], stdin=subprocess.PIPE)
        for word in (b"streamed ", b"into ", b"the job\n"):
            await upper.stdin.send_all(word)  # waits while the job does not read
        await upper.stdin.aclose()  # EOF: tr finishes
        await upper.wait()
        print("tr read:", b"".join([c.data async for c in upper.output()]).decode(), end="")

        try:
            await sup.run(["sh", "-c", "echo oops >&2; exit 3"])
        except jobworker.JobFailed as failed:
            print(f"JobFailed: {failed}")


if __name__ == "__main__":
    trio.run(main, "off" if "--no-cgroups" in sys.argv else "auto")
