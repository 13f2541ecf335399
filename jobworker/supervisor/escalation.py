"""The stop escalation: a polite signal to the whole group, a grace period, then SIGKILL.

Kept apart from processes and cgroups so it runs on Trio's clock against any target: tests drive
it on virtual time with a fake target (autojump_clock), the job tree with its real group.
"""

from __future__ import annotations

import math
import signal
from typing import Protocol

import trio


class StopTarget(Protocol):
    def signal(self, signum: int) -> None: ...
    async def kill(self) -> None: ...


class Escalation:
    """One job's stop watchdog.

    `request()` may be called any number of times: the first sends `stop_signal` to the group
    and arms the deadline; later ones can only bring the deadline closer (a second
    `stop --grace 0` kills at once) — never push it back or signal again.
    """

    def __init__(self, target: StopTarget, *, stop_signal: int = signal.SIGTERM) -> None:
        self._target = target
        self._stop_signal = stop_signal
        self._requested = trio.Event()
        self._deadline = math.inf
        self._scope: trio.CancelScope | None = None
        self.escalated = False

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    def request(self, grace_period_s: float) -> None:
        deadline = trio.current_time() + grace_period_s
        if not self._requested.is_set():
            self._target.signal(self._stop_signal)
            self._requested.set()
        self._deadline = min(self._deadline, deadline)
        if self._scope is not None:
            self._scope.deadline = self._deadline

    async def run(self, exited: trio.Event) -> None:
        """Watch until the job has exited. Return early only by cancellation."""
        await self._requested.wait()
        with trio.CancelScope(deadline=self._deadline) as self._scope:
            await exited.wait()
            return
        self.escalated = True
        await self._target.kill()
