"""The stop escalation on virtual time, against a fake group."""

from __future__ import annotations

import signal

import trio
import trio.testing

from jobworker.supervisor.escalation import Escalation


class FakeGroup:
    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []

    def signal(self, signum: int) -> None:
        self.events.append((trio.current_time(), signal.Signals(signum).name))

    async def kill(self) -> None:
        self.events.append((trio.current_time(), "KILL"))


async def run_until(escalation: Escalation, exited: trio.Event, exit_at: float | None):
    """Run the watchdog as the job tree does: beside the leader, cancelled once it has exited."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(escalation.run, exited)
        if exit_at is not None:
            await trio.sleep_until(exit_at)
            exited.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()


async def test_sigterm_then_sigkill_after_the_grace_period(autojump_clock):
    group, exited = FakeGroup(), trio.Event()
    escalation = Escalation(group)
    start = trio.current_time()
    escalation.request(10)
    await run_until(escalation, exited, exit_at=None)
    assert group.events == [(start, "SIGTERM"), (start + 10, "KILL")]
    assert escalation.escalated


async def test_no_kill_when_the_job_exits_within_the_grace_period(autojump_clock):
    group, exited = FakeGroup(), trio.Event()
    escalation = Escalation(group)
    start = trio.current_time()
    escalation.request(10)
    await run_until(escalation, exited, exit_at=start + 9.9)
    assert group.events == [(start, "SIGTERM")]
    assert not escalation.escalated


async def test_a_later_request_only_brings_the_kill_closer(autojump_clock):
    group, exited = FakeGroup(), trio.Event()
    escalation = Escalation(group)
    start = trio.current_time()
    escalation.request(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(escalation.run, exited)
        await trio.sleep(1)
        escalation.request(60)  # cannot postpone
        await trio.sleep(1)
        escalation.request(2)  # brings it to start + 4
    assert group.events == [(start, "SIGTERM"), (start + 4, "KILL")]


async def test_nothing_happens_without_a_request(autojump_clock):
    group, exited = FakeGroup(), trio.Event()
    escalation = Escalation(group)
    await run_until(escalation, exited, exit_at=trio.current_time() + 3600)
    assert group.events == [] and not escalation.requested


async def test_the_stop_signal_is_configurable(autojump_clock):
    group, exited = FakeGroup(), trio.Event()
    escalation = Escalation(group, stop_signal=signal.SIGINT)
    escalation.request(0)
    await run_until(escalation, exited, exit_at=None)
    assert [name for _, name in group.events] == ["SIGINT", "KILL"]
