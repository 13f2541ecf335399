"""The executables' entry points: thin doors in front of the cyclopts apps.

`jobworker` (serve.py): SIGHUP means "reload the config file" to a running server, and systemd's
`ExecReload=` may send it as soon as the process exists. Until the server's signal receiver is
up (after importing trio, the transport and the service: a good part of a second), the default
action would kill it. So SIGHUP is ignored first thing, until the receiver takes it over: a
reload asked for meanwhile is dropped, harmlessly, as the server is reading its file anyway.
Jobs do not inherit the ignoring: they are spawned only while the receiver's handler is
installed, and exec resets a handled signal to its default.

`jobctl` (jobctl.py):

A command-line client is judged by how soon it is done. Two costs here are not the command's:

- ``jobctl --version`` needs nothing but the version, yet the app's module loads trio, the
  transport, protobuf and cyclopts (which formats the version through rich's Markdown): it is
  answered before any of that is imported, as cyclopts would answer it (the version alone).
- When a command has returned, the interpreter's finalization tears down every module object
  and runs a garbage collection over them: work for nobody, in a process that is about to go.
  So once the app has returned its exit code, the standard streams are flushed and the process
  leaves with ``os._exit``. Nothing else needs finalizing: jobctl holds no files open for
  writing but stdout and stderr, starts no processes, and its connection is closed before
  the app returns (the TLS close_notify and the GOAWAY are sent by then).
"""

from __future__ import annotations

import os
import signal
import sys


def jobworker() -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from .serve import main

    return main()


def jobctl() -> int:
    argv = sys.argv[1:]
    if argv == ["--version"]:
        from jobworker import __version__

        print(__version__)
        return 0
    from .jobctl import main

    code = main(argv)
    _exit_now(code)
    return code  # only when leaving at once was not possible


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            # The reader is gone (or the stream closed): what was left is lost either way, as
            # it would be at the interpreter's own final flush; the exit code stands.
            pass
        except OSError:
            return  # e.g. a full disk: let the interpreter's exit report it as usual
    os._exit(code)
