"""`Job.signal`: one signal to every process of a job, caged or not, with no escalation; the
memory a running job uses now (`Usage.memory_bytes`); and the name a job may carry."""

from __future__ import annotations

import signal

import pytest
import trio

from jobworker.supervisor import JobEnded, JobState

from .helpers import PYTHON, wait_for_output

pytestmark = pytest.mark.cgroups

BACKSTOP_S = 30.0  # against a hang, never expected to fire

# A leader and a child in a subshell, each trapping SIGUSR1 and saying so, each waiting on a
# background sleep so that a trapped signal is handled at once (the wait returns). The sleeps
# get the signal too and die of it: every process of the job is reached.
TRAPPING_TREE = """
trap 'echo leader got USR1' USR1
(
  trap 'echo child got USR1' USR1
  echo child ready
  while :; do sleep 600 & wait $!; done
) &
echo leader ready
while :; do sleep 600 & wait $!; done
"""


async def test_a_signal_reaches_every_process_of_the_job(sup) -> None:
    # Isolated, the job runs under an init of its own PID namespace, which has no handler for
    # SIGUSR1: a signal that went to the init alone would be dropped, and the job never know.
    job = await sup.start("sh", ["-c", TRAPPING_TREE])
    seen = await wait_for_output(job, b"leader ready")
    if b"child ready" not in seen:
        seen = await wait_for_output(job, b"child ready")
    job.signal(signal.SIGUSR1)
    with trio.fail_after(BACKSTOP_S):  # a signal that went astray would leave us waiting
        seen = await wait_for_output(job, b"leader got USR1")
        if b"child got USR1" not in seen:
            await wait_for_output(job, b"child got USR1")
    status = job.status()
    assert status.state is JobState.RUNNING and status.stop_requested_by is None
    ended = await job.stop(grace_period_s=0)
    assert ended.state is JobState.STOPPED


async def test_a_signal_is_sent_once_and_never_escalates(sup) -> None:
    job = await sup.start(
        "sh", ["-c", "trap 'echo got TERM' TERM; echo ready; while :; do sleep 600 & wait $!; done"]
    )
    await wait_for_output(job, b"ready")
    job.signal(signal.SIGTERM)
    await wait_for_output(job, b"got TERM")
    # Trapped, so it runs on: no stop was asked for, so no SIGKILL is coming either.
    assert job.status().state is JobState.RUNNING
    job.signal(signal.SIGKILL)
    status = await job.wait()
    # Killed by a signal somebody sent, not by a stop: it failed, and says by which signal.
    assert status.state is JobState.FAILED
    assert (status.exit_code, status.signal, status.signal_name) == (137, 9, "SIGKILL")
    assert status.stop_requested_by is None and not status.escalated


async def test_sigterm_ends_a_job_that_does_not_trap_it_with_that_signal(sup) -> None:
    job = await sup.start("sleep", ["600"])
    job.signal(signal.SIGTERM)
    status = await job.wait()
    assert (status.state, status.exit_code, status.signal) == (JobState.FAILED, 143, 15)
    assert status.stop_requested_by is None


async def test_an_ended_job_cannot_be_signalled(sup) -> None:
    job = await sup.start("true")
    await job.wait()
    with pytest.raises(JobEnded, match="already ended"):
        job.signal(signal.SIGUSR1)
    failed = await sup.start("/nonexistent/command")
    assert failed.status().state is JobState.ERROR
    with pytest.raises(JobEnded, match="error"):
        failed.signal(signal.SIGUSR1)


@pytest.mark.parametrize("signum", [0, -1, 32, 65, 2**31 - 1])
async def test_a_number_that_is_no_signal_is_refused(sup, signum: int) -> None:
    job = await sup.start("sleep", ["600"])
    with pytest.raises(ValueError, match="not a signal"):
        job.signal(signum)
    assert job.status().state is JobState.RUNNING
    await job.stop(grace_period_s=0)


async def test_memory_in_use_is_read_while_running_and_gone_once_ended(sup) -> None:
    # Pages written, so charged to the job's group (untouched zero pages would not be).
    script = "data = b'x' * (32 << 20); print('ready', flush=True); import time; time.sleep(600)"
    job = await sup.start(PYTHON, ["-c", script])
    await wait_for_output(job, b"ready")
    usage = job.status().usage
    assert usage.memory_bytes is not None and usage.memory_bytes >= 32 << 20
    assert usage.memory_peak_bytes is not None and usage.memory_peak_bytes >= usage.memory_bytes
    ended = await job.stop(grace_period_s=0)
    assert ended.usage.memory_bytes is None  # "in use now" means nothing after the end
    assert ended.usage.memory_peak_bytes is not None and ended.usage.memory_peak_bytes >= 32 << 20


async def test_a_name_is_a_label_the_status_carries(sup) -> None:
    named = await sup.start("true", name="nightly")
    twin = await sup.start("true", name="nightly")  # the library does not keep names unique
    assert [(await j.wait()).name for j in (named, twin)] == ["nightly", "nightly"]
    assert (await sup.start("true")).status().name == ""
