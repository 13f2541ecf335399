"""The habits people bring from docker, pueue and journalctl, against a real server and the real
`jobctl`: options that end at the job's command, names and id prefixes, wait, kill, top, ls/ps,
exit causes, an idempotent stop, bad input, terminal safety, help and completion."""

from __future__ import annotations

import json
import os
import pty
import re
import secrets
import select
import signal
import subprocess
import time

import pytest

from ..supervisor.helpers import PYTHON
from .conftest import JOBCTL, JOBWORKER, TIMEOUT_S, Jobctl, Server, run

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
HOSTILE = "\x1b]0;pwned\x07\x1b[2J"  # retitles the terminal, then clears it

# Waits for a signal forever; says "ready" once its handler is in place, exits 7 on SIGUSR1.
TRAPS_USR1 = (
    "import signal, sys\n"
    "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(7))\n"
    "print('ready', flush=True)\n"
    "while True: signal.pause()\n"
)


def fails(done: subprocess.CompletedProcess, code: int, message: bytes) -> None:
    """`done` exited `code` with one line on stderr starting with `message`."""
    assert done.returncode == code, (done.returncode, done.stderr)
    assert done.stderr.startswith(message), done.stderr
    assert done.stderr.count(b"\n") == 1, done.stderr


def status_json(jobctl: Jobctl, job: str, user: str = "alice") -> dict:
    return json.loads(jobctl.ok("status", job, "--json", user=user))


def unique(stem: str) -> str:
    """A job name no other test (or run of this module) uses: names are unique per owner."""
    return f"{stem}-{secrets.token_hex(6)}"


def read_until(fd: int, done, what: str) -> bytes:
    """Bytes from `fd` until `done(bytes so far)`, failing (not hanging) if they stop coming."""
    seen = b""
    while not done(seen):
        ready, _, _ = select.select([fd], [], [], TIMEOUT_S)
        assert ready, f"no {what} within {TIMEOUT_S}s: {seen[-500:]!r}"
        chunk = os.read(fd, 65536)
        assert chunk, f"EOF before {what}: {seen[-500:]!r}"
        seen += chunk
    return seen


def wait_until_connected(process: subprocess.Popen) -> None:
    """Until `process` holds an established TCP connection: jobctl is past Python's start-up
    (a Ctrl-C before that is a fatal error in the interpreter's own imports) and inside its
    Trio run, where a Ctrl-C is jobctl's to handle."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert process.poll() is None, "jobctl ended before it connected"
        assert time.monotonic() < deadline, f"jobctl not connected within {TIMEOUT_S}s"
        sockets = set()
        for fd in os.listdir(f"/proc/{process.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{process.pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if target.startswith("socket:["):
                sockets.add(target[len("socket:[") : -1])
        with open(f"/proc/{process.pid}/net/tcp") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        if any(row[3] == "01" and row[9] in sockets for row in rows):  # 01: ESTABLISHED
            return
        os.sched_yield()


# --- 1. jobctl's options end at the job's command --------------------------------------------


def test_the_jobs_own_flags_are_the_jobs(jobctl: Jobctl) -> None:
    done = jobctl("run", "echo", "train.py", "--cpu", "2", "--memory", "64M")
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        b"train.py --cpu 2 --memory 64M\n",
        b"",
    )
    job_id = jobctl.ok("start", "--cpu", "0.25", "echo", "--cpu", "2", "--help").strip()
    status = status_json(jobctl, job_id)
    assert status["command"] == "echo" and status["args"] == ["--cpu", "2", "--help"]
    assert status["limits"]["cpu"] == 0.25  # jobctl's own, before the command


def test_double_dash_and_connection_options_before_the_command_still_work(
    jobctl: Jobctl, server: Server
) -> None:
    env = jobctl.env("alice")
    env["JOBCTL_SERVER"] = "127.0.0.1:1"  # wrong: only --server below can make this work
    done = run([*JOBCTL, "--server", server.address, "run", "--cpu", "0.5", "--", "echo", "--x"],
               env=env)  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, b"--x\n", b"")
    done = run([*JOBCTL, "run", "--server", server.address, "printf", "%s", "--server"], env=env)
    assert (done.returncode, done.stdout) == (0, b"--server")  # after CMD: the job's


# --- 2. names and id prefixes ----------------------------------------------------------------


def test_a_name_or_a_unique_prefix_works_wherever_an_id_does(jobctl: Jobctl) -> None:
    name = unique("train")
    job_id = jobctl.ok("start", "--name", name, "sleep", "30").strip()
    assert UUID.fullmatch(job_id)
    try:
        lines = jobctl.ok("status", name).splitlines()
        assert lines[0] == f"Job:         {job_id}"
        assert f"Name:        {name}" in lines
        assert status_json(jobctl, job_id[:8])["job_id"] == job_id
        listed = jobctl.ok("ls").splitlines()
        assert listed[0].split()[:4] == ["JOB", "ID", "NAME", "OWNER"]
        assert any(line.split()[:2] == [job_id, name] for line in listed)
        taken = jobctl("start", "--name", name, "true")
        fails(taken, 1, b"jobctl: ")
        assert taken.stdout == b""
        assert status_json(jobctl, name, user="carol")["job_id"] == job_id  # an admin's view
        fails(jobctl("status", name, user="bob"), 1, b"jobctl: ")  # not bob's to see
    finally:
        jobctl.ok("stop", name, "--grace", "0")
    assert status_json(jobctl, job_id)["state"] == "JOB_STATE_STOPPED"


def test_an_ambiguous_prefix_is_a_usage_error(jobctl: Jobctl) -> None:
    ids = [jobctl.start("true") for _ in range(17)]  # 17 ids, 16 hex digits: two share one
    firsts = [job_id[0] for job_id in ids]
    digit = next(d for d in firsts if firsts.count(d) > 1)
    done = jobctl("status", digit)
    fails(done, 2, b"jobctl: ")
    assert done.stdout == b""


# --- 3. wait ---------------------------------------------------------------------------------


def test_wait_prints_the_exit_code_and_exits_with_it(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", "exit 3")
    done = jobctl("wait", job_id)
    assert (done.returncode, done.stdout, done.stderr) == (3, b"3\n", b"")


def test_wait_for_several_exits_with_the_first_failure(jobctl: Jobctl) -> None:
    ok, bad, worse = (jobctl.start("sh", "-c", f"exit {code}") for code in (0, 5, 6))
    done = jobctl("wait", ok, bad, worse)
    assert (done.returncode, done.stdout) == (5, b"0\n5\n6\n")
    missing = jobctl("wait", ok, "0000000-no-such-job")
    assert missing.returncode == 1 and missing.stdout == b"0\n"
    assert missing.stderr.count(b"\n") == 1


def test_wait_for_a_job_that_could_not_be_created_is_127(jobctl: Jobctl) -> None:
    created = jobctl("start", "foobar-no-such-command")
    job_id = created.stdout.decode().strip()
    done = jobctl("wait", job_id)
    assert (done.returncode, done.stdout) == (127, b"127\n")
    assert b"could not be created: cannot run 'foobar-no-such-command'" in done.stderr


def test_ctrl_c_ends_the_wait_and_leaves_the_job_running(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sleep", "30")
    try:
        waiter = jobctl.popen("wait", job_id)
        wait_until_connected(waiter)
        waiter.send_signal(signal.SIGINT)  # in the handshake or in the wait: the same exit
        out, err = waiter.communicate(timeout=TIMEOUT_S)
        assert (waiter.returncode, out, err) == (130, b"", b"")
        assert status_json(jobctl, job_id)["state"] == "JOB_STATE_RUNNING"
    finally:
        jobctl.ok("stop", job_id, "--grace", "0")


# --- 4. kill ---------------------------------------------------------------------------------


def test_kill_sends_the_signal_asked_for_by_name_or_number(jobctl: Jobctl) -> None:
    for spelling in ("usr1", "SIGUSR1", str(signal.SIGUSR1)):
        job_id = jobctl.start(PYTHON, "-c", TRAPS_USR1)
        assert jobctl.first_line(job_id) == b"ready\n"
        assert jobctl.ok("kill", "-s", spelling, job_id) == ""
        assert jobctl("wait", job_id).stdout == b"7\n", spelling  # its handler ran


def test_kill_defaults_to_sigkill_with_no_grace(jobctl: Jobctl) -> None:
    job_id = jobctl.start("sh", "-c", "trap '' TERM; echo ready; sleep 30")
    assert jobctl.first_line(job_id) == b"ready\n"
    assert jobctl.ok("kill", job_id) == ""
    done = jobctl("wait", job_id)
    assert (done.returncode, done.stdout) == (137, b"137\n")
    # Whether the server counts a kill as a stop by alice is its choice; either way, SIGKILL.
    assert re.fullmatch(
        rf"jobctl: job {job_id} (was killed by SIGKILL \(|was stopped by alice \(SIGKILL, )"
        r"exit 137\)\n",
        done.stderr.decode(),
    ), done.stderr


def test_kill_refuses_what_is_not_a_signal_or_not_running(jobctl: Jobctl) -> None:
    fails(jobctl("kill", "-s", "FOO", "x"), 2, b"jobctl: --signal: not a signal: 'FOO'")
    fails(jobctl("kill", "-s", "65", "x"), 2, b"jobctl: --signal: no signal 65")
    job_id = jobctl.start("true")
    jobctl.wait_ended(job_id)
    fails(jobctl("kill", job_id), 1, b"jobctl: ")


# --- 5. top ----------------------------------------------------------------------------------

TOP_HEADER = ["JOB", "ID", "CPU", "%", "MEM", "USAGE", "/", "LIMIT", "MEM", "%", "READ/s",
              "WRITE/s", "COMMAND"]  # fmt: skip


def test_top_no_stream_shows_each_running_job_once(jobctl: Jobctl) -> None:
    mine = jobctl.start("sh", "-c", "echo ready; sleep 30")
    theirs = jobctl.start("sleep", "30", user="bob")
    try:
        assert jobctl.first_line(mine) == b"ready\n"
        done = jobctl("top", "--no-stream", "--interval", "200ms")
        assert done.returncode == 0 and done.stderr == b"", done.stderr
        lines = done.stdout.decode().splitlines()
        assert lines[0].split() == TOP_HEADER
        rows = {line.split()[0]: line.split() for line in lines[1:]}
        assert theirs[:12] not in rows  # bob's: not alice's to see
        row = rows[mine[:12]]
        assert re.fullmatch(r"\d+\.\d%", row[1])  # CPU % of a core, from two samples
        assert row[3] == "/" and row[4] == "1G"  # memory now / the server's default limit
        assert re.fullmatch(r"\d+(\.\d)?[BKMG]", row[2])
        assert " ".join(row[-6:]) == "sh -c 'echo ready; sleep 30'"
        everyone = jobctl.ok("top", "--no-stream", "--all", "--interval", "100ms", user="vic")
        header, *rest = everyone.splitlines()
        assert header.split()[:3] == ["JOB", "ID", "OWNER"]
        owners = {line.split()[0]: line.split()[1] for line in rest}
        assert (owners[mine[:12]], owners[theirs[:12]]) == ("alice", "bob")
        fails(jobctl("top", "--all", "--no-stream"), 1, b"jobctl: ")  # alice is no viewer
    finally:
        jobctl.ok("stop", mine, "--grace", "0")
        jobctl.ok("stop", theirs, "--grace", "0", user="bob")


def test_top_streams_frames_until_ctrl_c(jobctl: Jobctl) -> None:
    top = jobctl.popen("top", "--interval", "50ms")
    assert top.stdout is not None
    try:
        # three frames, appended (stdout is a pipe, not a terminal), a blank line apart
        seen = read_until(top.stdout.fileno(), lambda b: b.count(b"\nJOB ID") >= 2, "frames")
        assert seen.startswith(b"JOB ID") and b"\x1b" not in seen
        assert b"\n\nJOB ID" in seen
    finally:
        top.send_signal(signal.SIGINT)
        _, err = top.communicate(timeout=TIMEOUT_S)
    assert (top.returncode, err) == (130, b"")


def test_top_redraws_in_place_on_a_terminal(jobctl: Jobctl) -> None:
    controller, terminal = pty.openpty()
    top = subprocess.Popen([*JOBCTL, "top", "--interval", "50ms"], stdout=terminal,
                           stderr=subprocess.PIPE, env=jobctl.env("alice"))  # fmt: skip
    os.close(terminal)
    try:
        # two frames, each drawn over the last: cursor home, clear, then the table
        seen = read_until(controller, lambda b: b.count(b"\x1b[H\x1b[2J") >= 2, "redraws")
    finally:
        top.send_signal(signal.SIGINT)
        _, err = top.communicate(timeout=TIMEOUT_S)
        os.close(controller)
    assert (top.returncode, err) == (130, b"")
    assert seen.startswith(b"\x1b[H\x1b[2JJOB ID")


# --- 6. ls and ps ----------------------------------------------------------------------------


def test_ls_and_ps_are_list(jobctl: Jobctl) -> None:
    job_id = jobctl.start("true")
    jobctl.wait_ended(job_id)
    quiet = jobctl.ok("list", "-q")
    assert job_id in quiet.split()
    assert jobctl.ok("ls", "-q") == quiet == jobctl.ok("ps", "-q")
    assert jobctl.ok("ps").splitlines()[0].split()[:2] == ["JOB", "ID"]


# --- 7. exit causes --------------------------------------------------------------------------


@pytest.mark.cgroups
def test_run_says_the_oom_killer_ended_the_job(jobctl: Jobctl) -> None:
    hog = "chunks = [b'x' * (8 << 20) for _ in range(64)]"  # 512M, touched, at a 64M limit
    done = jobctl("run", "--memory", "64M", PYTHON, "-c", hog)
    assert done.returncode == 137
    assert re.fullmatch(
        rb"jobctl: job [0-9a-f-]{36} was killed by the kernel's OOM killer at its 64M memory"
        rb" limit \(exit 137\)\n",
        done.stderr,
    ), done.stderr


@pytest.mark.cgroups
def test_run_says_the_pids_limit_was_reached(jobctl: Jobctl) -> None:
    forks = (
        "import os, signal, sys\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0: signal.pause()\n"
        "except BlockingIOError: sys.exit(3)\n"
    )
    done = jobctl("run", "--pids", "8", PYTHON, "-c", forks)
    assert done.returncode == 3
    assert done.stderr.endswith(b" reached its pids limit of 8: a fork failed (exit 3)\n")


def test_run_says_which_signal_killed_the_job(jobctl: Jobctl) -> None:
    done = jobctl("run", "sh", "-c", "kill -SEGV $$")
    assert done.returncode == 139
    assert done.stderr.endswith(b" was killed by SIGSEGV (exit 139)\n")
    assert done.stderr.count(b"\n") == 1


def test_run_says_who_stopped_the_job(jobctl: Jobctl) -> None:
    name = unique("victim")
    runner = jobctl.popen("run", "--name", name, "sh", "-c", "echo ready; sleep 30")
    assert runner.stdout is not None
    assert runner.stdout.readline() == b"ready\n"
    jobctl.ok("stop", name, user="carol")
    _, err = runner.communicate(timeout=TIMEOUT_S)
    assert runner.returncode == 143
    assert re.fullmatch(
        rb"jobctl: job [0-9a-f-]{36} was stopped by carol \(SIGTERM, exit 143\)\n", err
    ), err


def test_start_of_a_job_that_cannot_be_created_prints_its_id_and_exits_127(
    jobctl: Jobctl,
) -> None:
    for argv, reason in (
        (["foobar-no-such-command"], b"cannot run 'foobar-no-such-command'"),
        (["--cwd", "/nonexistent-dir", "true"], b"cannot use working directory"),
    ):
        done = jobctl("start", *argv)
        assert done.returncode == 127, done.stderr
        job_id = done.stdout.decode().strip()
        assert UUID.fullmatch(job_id)
        assert done.stderr.startswith(f"jobctl: job {job_id} could not be created: ".encode())
        assert reason in done.stderr and done.stderr.count(b"\n") == 1
        assert status_json(jobctl, job_id)["state"] == "JOB_STATE_ERROR"
    fails(jobctl("run", "--cwd", "/nonexistent-dir", "true"), 127, b"jobctl: job ")


# --- 8. stop is idempotent -------------------------------------------------------------------


def test_stopping_an_ended_job_says_so_and_succeeds(jobctl: Jobctl) -> None:
    job_id = jobctl.start("true")
    jobctl.wait_ended(job_id)
    done = jobctl("stop", job_id)
    assert (done.returncode, done.stdout) == (0, b"")
    assert done.stderr == f"jobctl: job {job_id} had already ended (finished, exit 0)\n".encode()
    assert status_json(jobctl, job_id)["state"] == "JOB_STATE_FINISHED"  # left as it was


# --- 9. bad input, terminal safety -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["start", "--", "echo", "\udcff"], b"jobctl: the command's argument 1 is not valid UTF-8"),
        (["start", "--cwd", "dir\udcff", "true"], b"jobctl: --cwd is not valid UTF-8: 'dir\\xff'"),
        (["status", "\udcff"], b"jobctl: ID is not valid UTF-8: '\\xff'"),
        (["run", "\udcffcmd"], b"jobctl: CMD is not valid UTF-8: '\\xffcmd'"),
        (["start", "--name", "a\udcff", "true"], b"jobctl: --name is not valid UTF-8"),
        (["start", "--pids", "4294967296", "true"], b"jobctl: --pids: must be between 1 and"),
        (["start", "--io-read-iops", "0", "true"], b"jobctl: --io-read-iops: must be between 1"),
        (["run", "--io-write-iops", "-3", "true"], b"jobctl: --io-write-iops: must be between"),
        (["start", "--io-write-iops", "4294967295", "true"],
         b"jobctl: limits.io_write_iops 4294967295 is above the largest IOPS limit"),
        (["start", "--cpu", "nan", "true"], b"jobctl: --cpu: must be a positive nu"),
        (["start", "--cpu", "inf", "true"], b"jobctl: --cpu: must be a positive number"),
        (["start", "--cpu", "-1", "true"], b"jobctl: --cpu: must be a positive number"),
        (["start", "--memory", "99999999T", "true"], b"jobctl: --memory: '99999999T' is too large"),
        (["top", "--interval", "0"], b"jobctl: --interval: must be more than 0"),
        (["wait"], b'jobctl: Command "wait" parameter ID requires an argument'),
        (["completion", "tcsh"], b"jobctl: Invalid value"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(jobctl: Jobctl, args: list[str], message: bytes) -> None:
    # subprocess passes str arguments through os.fsencode: "\udcff" arrives as the byte 0xff
    done = jobctl(*args)
    fails(done, 2, message)
    assert done.stdout == b""


@pytest.mark.parametrize(
    "args",
    [
        ["start", "--memory", "1T", "true"],  # above this host's RAM: the server says so
        ["start", "--cwd", "relative/dir", "true"],
        ["start", "--name", "no spaces", "true"],
        ["status", ""],
    ],
)
def test_invalid_arguments_the_server_finds_are_exit_2_too(jobctl: Jobctl, args: list[str]) -> None:
    done = jobctl(*args)
    fails(done, 2, b"jobctl: ")
    assert done.stdout == b""


def test_another_users_escape_sequences_never_reach_the_terminal(jobctl: Jobctl) -> None:
    evil = jobctl.start("sh", "-c", f": '{HOSTILE}'\necho done", user="bob")
    jobctl.wait_ended(evil, user="bob")
    for args in (["status", evil], ["list", "--all"]):
        out = jobctl(*args, user="carol")
        assert out.returncode == 0, out.stderr
        assert b"\x1b" not in out.stdout + out.stderr and b"\x07" not in out.stdout
    listing = jobctl.ok("list", "--all", user="carol").splitlines()
    rows = [line for line in listing if line.startswith(evil)]
    assert len(rows) == 1  # the newline in its command forged no line
    assert rows[0].endswith("sh -c $': \\'\\e]0;pwned\\a\\e[2J\\'\\necho done'")
    exact = status_json(jobctl, evil, user="carol")
    assert exact["args"] == ["-c", f": '{HOSTILE}'\necho done"]  # the JSON stays exact


def test_peak_memory_reads_as_a_size(jobctl: Jobctl) -> None:
    job_id = jobctl.start(PYTHON, "-c", "x = b'x' * (3 << 20)")
    jobctl.wait_ended(job_id)
    usage = next(line for line in jobctl.ok("status", job_id).splitlines()
                 if line.startswith("Usage:"))  # fmt: skip
    peak = re.search(r"memory peak (\S+?)(,|$)", usage)
    if peak is None:
        pytest.skip(f"this server reports no peak memory: {usage}")
    assert re.fullmatch(r"\d{1,4}(\.\d)?[BKMG]", peak.group(1)), usage


# --- 10. help and completion -----------------------------------------------------------------


def test_help_shows_no_python_defaults_and_the_jobs_options_first(jobctl: Jobctl) -> None:
    for command in ("run", "start", "stop", "list", "wait", "kill", "top", "status", "rm"):
        text = jobctl.ok(command, "--help")
        assert "[default: ()]" not in text and "[default: False]" not in text, command
    text = jobctl.ok("run", "--help")
    assert text.index("─ Job ─") < text.index("─ Connection ─")
    assert "--name" in text
    assert "a prefix of one" in jobctl.ok("stop", "--help")
    serve = run([*JOBWORKER, "serve", "--help"]).stdout.decode()
    assert "127.0.0.1:50051" in serve
    for flag in (
        "--max-cpu",
        "--max-memory",
        "--max-io-read",
        "--max-io-write",
        "--max-pids",
        "--max-io-read-iops",
        "--max-io-write-iops",
    ):
        line = next(line for line in serve.splitlines() if flag in line)
        assert re.search(rf"{flag} \w+\s+\w", line), line  # a help text follows the type


def test_completion_scripts_print_to_stdout(jobctl: Jobctl, tmp_path) -> None:
    bash = jobctl.ok("completion", "bash")
    script = tmp_path / "jobctl.bash"
    script.write_text(bash)
    probe = f"""
        source {script}
        COMP_WORDS=(jobctl wa); COMP_CWORD=1; _jobctl; echo "${{COMPREPLY[@]}}"
        COMP_WORDS=(jobctl kill --s); COMP_CWORD=2; _jobctl; echo "${{COMPREPLY[@]}}"
    """
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    done = subprocess.run(
        ["bash", "-c", probe], capture_output=True, timeout=TIMEOUT_S, check=False, env=env
    )
    assert done.returncode == 0, done.stderr
    commands, options = done.stdout.decode().splitlines()
    assert commands.split() == ["wait"]
    assert "--signal" in options.split()
    assert jobctl.ok("completion", "zsh").startswith("#compdef jobctl")
    assert "complete -c jobctl" in jobctl.ok("completion", "fish")
    assert not (tmp_path / ".bashrc").exists()  # printing touches no file
