"""A job's standard input: /dev/null, bytes, a stream fed in, or a pipe the caller writes.

The job reads a plain pipe as its fd 0 (through the cage too: the keeper and the init pass
their copy on to the job and replace their own with /dev/null, so the job's processes hold
the only read ends). Nothing is buffered here beyond the pipe itself: a job that does not read
holds its writer back, and a job that has closed its stdin or ended makes the writer fail
with trio.BrokenResourceError (EPIPE), never hang.
"""

from __future__ import annotations

import logging
import os
import subprocess

import trio

from .errors import InvalidJobSpec

log = logging.getLogger("jobworker.supervisor")

# What `Supervisor.start(stdin=...)` takes: None (/dev/null), bytes, a stream the job's tree
# reads until EOF, or subprocess.PIPE (the caller writes `Job.stdin`).
StdinSource = bytes | bytearray | memoryview | trio.abc.ReceiveStream | int | None
PIPE = subprocess.PIPE

_FEED_CHUNK_BYTES = 64 * 2**10


def check_source(stdin: object) -> bytes | trio.abc.ReceiveStream | int | None:
    """The stdin argument as the job keeps it (bytes-like copied), or InvalidJobSpec."""
    if stdin is None or isinstance(stdin, trio.abc.ReceiveStream):
        return stdin
    if isinstance(stdin, (bytes, bytearray, memoryview)):
        return bytes(stdin)
    if isinstance(stdin, int) and not isinstance(stdin, bool) and stdin == PIPE:
        return PIPE
    raise InvalidJobSpec(
        "stdin must be None (/dev/null), bytes, a trio.abc.ReceiveStream, or subprocess.PIPE "
        f"(then write Job.stdin); not {type(stdin).__name__}"
        + (" (encode text first)" if isinstance(stdin, str) else "")
    )


def stdin_pipe() -> tuple[int, int]:
    """(read end for the job, write end for us), both close-on-exec: only the spawn's dup onto
    fd 0 gives the job its end. The default pipe size (64 KiB) is the only buffer there is
    between a writer and a job: backpressure comes early, as it should."""
    return os.pipe2(os.O_CLOEXEC)


class JobStdin(trio.abc.SendStream):
    """The write end of a job's stdin (`Supervisor.start(stdin=subprocess.PIPE)`).

    `send_all` blocks while the job is not reading and the pipe is full; `aclose` is EOF for
    the job. Once the job has closed its stdin or ended, `send_all` raises
    trio.BrokenResourceError saying so, also when it was blocked meanwhile. The job closes this
    stream itself when it has ended (no fd outlives it), so closing it is optional.
    """

    def __init__(self, job_id: str, fd: int | None) -> None:
        self._job_id = job_id
        self._stream = trio.lowlevel.FdStream(fd) if fd is not None else None
        self._job_ended = fd is None  # a job that never ran has no stdin to write

    def _broken(self) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(
            f"job {self._job_id} has ended: nothing reads its stdin any more"
            if self._job_ended
            else f"job {self._job_id} no longer reads its stdin: it closed it, or is ending"
        )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._stream is None or self._job_ended:
            await trio.lowlevel.checkpoint()
            raise self._broken()
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise self._broken() from exc
        except trio.ClosedResourceError:
            if self._job_ended:  # the job's end closed it under us: not the caller's doing
                raise self._broken() from None
            raise

    async def wait_send_all_might_not_block(self) -> None:
        if self._stream is None or self._job_ended:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._stream.wait_send_all_might_not_block()
        except trio.ClosedResourceError:
            if not self._job_ended:
                raise

    async def aclose(self) -> None:
        if self._stream is None:
            await trio.lowlevel.checkpoint()
            return
        await self._stream.aclose()

    def close_nowait(self) -> None:
        """`aclose` without a checkpoint: EOF for the job."""
        if self._stream is not None:
            self._stream.close()

    def job_ended(self) -> None:
        """The job has ended: release the fd; a writer from now on gets BrokenResourceError."""
        self._job_ended = True
        self.close_nowait()


async def feed(job_id: str, source: bytes | trio.abc.ReceiveStream, stdin: JobStdin) -> None:
    """Write `source` into the job's stdin, then close it (EOF). The job may stop reading at
    any time (it closed stdin or ended): the rest is dropped, as trio.run_process does. A
    failing source stream ends the input early, and is logged: it is the caller's stream, and
    its failure must not end the job's supervision. The source is not closed (the caller's)."""
    try:
        if isinstance(source, bytes):
            await stdin.send_all(source)
            return
        while True:
            try:
                chunk = await source.receive_some(_FEED_CHUNK_BYTES)
            except Exception as exc:
                log.warning("job %s: its stdin source failed (%r): the job reads EOF", job_id, exc)
                return
            if not chunk:
                return
            await stdin.send_all(chunk)
    except trio.BrokenResourceError:
        log.debug("job %s: stopped reading its stdin before its end", job_id)
    finally:
        # Synchronous: this may run cancelled, where an await would raise before the close.
        stdin.close_nowait()
