"""`jobworker serve` settings: defaults, then the TOML file, then flags; every mistake named."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from jobworker.cli.config import (
    KEYS,
    ConfigError,
    changed_settings,
    keep_restart_settings,
    load_config_file,
    resolve,
)
from jobworker.cli.parsing import Address
from jobworker.purgatory import ServerLimits
from jobworker.supervisor import HostCapacity, LimitOverrides, Limits

NO_FLAGS = dict.fromkeys(KEYS)
HOST = HostCapacity(cpus=2, memory_bytes=4 * 2**30, pids=32768)


def test_defaults() -> None:
    settings = resolve(NO_FLAGS)
    assert settings.listen == Address("127.0.0.1", 50051)
    assert settings.cert_file == Path("/etc/jobworker/server.crt")
    assert settings.key_file == Path("/etc/jobworker/server.key")
    assert settings.ca_file == Path("/etc/jobworker/ca.crt")
    assert settings.data_dir is None
    assert settings.limits.defaults == Limits()
    assert settings.limits.maximums == LimitOverrides()
    assert (settings.grace_period_s, settings.max_jobs, settings.cgroups) == (10.0, 100, "auto")
    # Half of each cap in all, so one identity cannot take every slot.
    assert (settings.max_jobs_per_user, settings.max_log_streams) == (50, 1000)
    assert settings.max_log_streams_per_user == 500
    # No maximums configured: a job may ask for up to what the host has.
    assert settings.limits.host == HostCapacity.probe()


def test_the_per_user_caps_default_to_half_of_the_caps_as_set(tmp_path: Path) -> None:
    path = tmp_path / "jobworker.toml"
    path.write_text("max-jobs = 10\nmax-log-streams = 3\n")
    settings = resolve(NO_FLAGS, load_config_file(path))
    assert (settings.max_jobs, settings.max_jobs_per_user) == (10, 5)
    assert (settings.max_log_streams, settings.max_log_streams_per_user) == (3, 1)
    path.write_text(
        "max-jobs = 10\nmax-jobs-per-user = 8\nmax-log-streams = 30\nmax-log-streams-per-user = 2\n"
    )
    flags = {**NO_FLAGS, "max-jobs-per-user": "4"}
    settings = resolve(flags, load_config_file(path))
    assert (settings.max_jobs, settings.max_jobs_per_user) == (10, 4)  # the flag wins
    assert (settings.max_log_streams, settings.max_log_streams_per_user) == (30, 2)
    settings = resolve({**NO_FLAGS, "max-jobs": "1"})
    assert settings.max_jobs_per_user == 1  # never 0


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "jobworker.toml"
    path.write_text(
        'listen = ":6000"\nmemory = "256M"\nmax-memory = 1073741824\ncpu = 1\n'
        'grace-period = 2.5\nmax-jobs = 7\ncgroups = "v1"\ndata-dir = "/var/lib/jw"\n'
    )
    table = load_config_file(path)
    settings = resolve({**NO_FLAGS, "memory": "128M", "grace-period": "1m"}, table)
    assert settings.listen == Address(None, 6000)
    assert settings.limits.defaults.memory_bytes == 128 * 2**20  # the flag
    assert settings.limits.defaults.cpu == 1.0  # the file
    assert settings.limits.maximums.memory_bytes == 2**30
    assert settings.grace_period_s == 60.0
    assert (settings.max_jobs, settings.cgroups, settings.data_dir) == (
        7,
        "v1",
        Path("/var/lib/jw"),
    )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"memroy": "1G"}, "config: unknown key 'memroy' (did you mean 'memory'?)"),
        ({"data_dir": "/x"}, "config: unknown key 'data_dir' (did you mean 'data-dir'?)"),
        ({"zzz": 1}, "config: unknown key 'zzz'"),
        ({"memory": "lots"}, "config: memory: not a size: 'lots' (examples: 4096, 512K, 100M, 1G)"),
        ({"memory": True}, "config: memory: not a size: True"),
        (
            {"grace-period": "soon"},
            "config: grace-period: not a duration: 'soon' (examples: 5s, 500ms, 1m30s)",
        ),
        ({"max-jobs": 0}, "config: max-jobs: not a whole number of at least 1: 0"),
        ({"cgroups": "v3"}, "config: cgroups: expected one of auto, v2, v1, off, got 'v3'"),
        ({"listen": 50051}, "config: listen: expected a non-empty string, got 50051"),
        (
            {"memory": "2G", "max-memory": "1G"},
            "limits: memory 2G is above the maximum 1G (allowed: 1M to 1G)",
        ),
        ({"cpu": 0.001}, "limits: cpu 0.001 is below the minimum 0.01 (allowed: at least 0.01)"),
        (
            {"cpu": 0},
            "config: cpu: must be a positive number of cores or a percentage of one core,"
            " got '0' (examples: 0.5, 2, 50%)",
        ),
        (
            {"max-cpu": "nan%"},
            "config: max-cpu: must be a positive number of cores or a percentage of one core,"
            " got 'nan%' (examples: 0.5, 2, 50%)",
        ),
        (
            {"cpu": [1]},
            'config: cpu: not a number of cores or a percentage: [1] (0.5, 2, "50%")',
        ),
        ({"cpu": "0.5%"}, "limits: cpu 0.005 is below the minimum 0.01 (allowed: at least 0.01)"),
        (
            {"max-cpu": 3},
            "limits: max-cpu 3 is above this host's 2 CPUs (allowed: 0.01 to 2)",
        ),
        (
            {"max-memory": "5G"},
            "limits: max-memory 5G is above this host's 4G of RAM (allowed: 1M to 4G)",
        ),
        (
            {"max-pids": 40000},
            "limits: max-pids 40000 is above this host's pid_max 32768 (allowed: 2 to 32768)",
        ),
        (
            {"cpu": 4},
            "limits: cpu 4 is above this host's 2 CPUs (allowed: 0.01 to 2)",
        ),
        (
            {"max-io-read-iops": 100},
            "limits: io-read-iops unset (no limit) is above the maximum 100 (allowed: 1 to 100)",
        ),
        (
            {"io-write-iops": 500, "max-io-write-iops": 100},
            "limits: io-write-iops 500 is above the maximum 100 (allowed: 1 to 100)",
        ),
        (
            {"max-io-read-iops": 2**32 - 1, "io-read-iops": 1},
            "limits: max-io-read-iops 4294967295 is above the largest IOPS limit the kernel "
            "takes (allowed: 1 to 4294967294)",
        ),
        ({"io-read-iops": 0}, "config: io-read-iops: not a whole number of at least 1: 0"),
        (
            {"max-jobs-per-user": 0},
            "config: max-jobs-per-user: not a whole number of at least 1: 0",
        ),
        ({"max-log-streams": -1}, "config: max-log-streams: not a whole number of at least 1: -1"),
        (
            {"max-log-streams-per-user": "many"},
            "config: max-log-streams-per-user: not a whole number of at least 1: 'many'",
        ),
        ({"isolation": "maybe"}, "config: isolation: expected one of auto, on, off, got 'maybe'"),
        (
            {"transient-uids": "1000"},
            "config: transient-uids: expected FIRST-LAST, e.g. \"70000-79999\", got '1000'",
        ),
        (
            {"run-as": "alice"},
            "config: run-as: expected a table such as alice = \"alice\", got 'alice'",
        ),
        ({"network": "wifi"}, "config: network: expected one of host, none, got 'wifi'"),
        (
            {"allow-host-network": "no"},
            "config: allow-host-network: expected true or false, got 'no'",
        ),
        (
            {"network": "host", "allow-host-network": False},
            "network: the default network cannot be host when host networking is refused",
        ),
        (
            {"isolation": "off", "run-as": {"alice": "alice"}},
            "run-as accounts and network none need isolation, which is off (isolation = off)",
        ),
    ],
)
def test_config_mistakes_are_named(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(NO_FLAGS, table, host=HOST)
    assert str(caught.value) == message


def test_isolation_settings_from_the_file_and_flags(tmp_path: Path) -> None:
    settings = resolve(NO_FLAGS)
    assert settings.isolation == "auto" and settings.transient_uids == range(70000, 80000)
    assert dict(settings.policy.run_as) == {} and settings.policy.network == "host"
    path = tmp_path / "jobworker.toml"
    path.write_text(
        'transient-uids = "100-199"\nnetwork = "none"\nallow-host-network = false\n'
        '[run-as]\nalice = "alice"\nbob = "nobody"\n'
    )
    flags = {**NO_FLAGS, "run-as": ("bob=daemon", "carol=root"), "isolation": "on"}
    settings = resolve(flags, load_config_file(path))
    assert settings.transient_uids == range(100, 200)
    # The flags add to the file's table, one identity at a time.
    assert dict(settings.policy.run_as) == {"alice": "alice", "bob": "daemon", "carol": "root"}
    assert (settings.policy.network, settings.policy.allow_host_network) == ("none", False)
    assert settings.isolation == "on"
    with pytest.raises(ConfigError, match=r"^--run-as: expected IDENTITY=ACCOUNT, got 'carol'"):
        resolve({**NO_FLAGS, "run-as": ("carol",)})


def test_output_retention_per_job_from_the_file_or_a_flag(tmp_path: Path) -> None:
    assert resolve(NO_FLAGS).output_retention_bytes == 256 * 2**20
    path = tmp_path / "jobworker.toml"
    path.write_text('output-retention = "64M"\n')
    assert resolve(NO_FLAGS, load_config_file(path)).output_retention_bytes == 64 * 2**20
    flags = {**NO_FLAGS, "output-retention": "1M"}
    assert resolve(flags, load_config_file(path)).output_retention_bytes == 2**20
    # Below this, a job's log could not keep most of its cap readable.
    with pytest.raises(ConfigError, match=r"^output-retention: at least 512K, not 4096 bytes"):
        resolve({**NO_FLAGS, "output-retention": "4K"})


def test_cpu_as_a_percentage_of_one_core_in_the_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "jobworker.toml"
    path.write_text('cpu = "25%"\nmax-cpu = "150%"\n')
    settings = resolve(NO_FLAGS, load_config_file(path), host=HOST)
    assert (settings.limits.defaults.cpu, settings.limits.maximums.cpu) == (0.25, 1.5)
    settings = resolve({**NO_FLAGS, "cpu": "75%"}, load_config_file(path), host=HOST)
    assert settings.limits.defaults.cpu == 0.75
    with pytest.raises(ConfigError, match=r"^--cpu: must be a positive number of cores"):
        resolve({**NO_FLAGS, "cpu": "-5%"}, host=HOST)


def test_iops_limits_from_the_file_and_flags(tmp_path: Path) -> None:
    assert resolve(NO_FLAGS).limits.defaults.io_read_iops is None  # opt-in: no limit
    path = tmp_path / "jobworker.toml"
    path.write_text("io-read-iops = 300\nmax-io-read-iops = 1000\nio-write-iops = 200\n")
    flags = {**NO_FLAGS, "io-write-iops": "250", "max-io-write-iops": 400}
    limits = resolve(flags, load_config_file(path), host=HOST).limits
    assert (limits.defaults.io_read_iops, limits.defaults.io_write_iops) == (300, 250)
    assert limits.maximums == LimitOverrides(io_read_iops=1000, io_write_iops=400)
    with pytest.raises(ConfigError, match=r"^--io-write-iops: not a whole number of at least 1"):
        resolve({**NO_FLAGS, "io-write-iops": "fast"})


def test_flag_mistakes_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--io-read: not a size: 'fast'"):
        resolve({**NO_FLAGS, "io-read": "fast"})


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read config file .*: No such file"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = 127.0.0.1\n")
    with pytest.raises(ConfigError, match=r"^config file .*bad.toml: "):
        load_config_file(bad)


def test_transport_knobs_from_flags_the_top_level_and_the_transport_table(tmp_path: Path) -> None:
    assert resolve(NO_FLAGS).transport == ServerLimits()
    path = tmp_path / "jobworker.toml"
    path.write_text(
        'max-connections = 300\nidle-timeout = "off"\n'
        '[transport]\nmax-header-list = "8K"\nreset-refill = 10\npreface-timeout = "2s"\n'
        "max-continuation-frames = 0\n"
    )
    flags = {**NO_FLAGS, "max-connections-per-user": "5", "max-connections": "200"}
    transport = resolve(flags, load_config_file(path)).transport
    assert transport.max_connections == 200  # the flag wins over the file
    assert transport.max_connections_per_identity == 5
    assert transport.idle_timeout_s == math.inf  # "off": never
    assert transport.max_header_list_bytes == 8 * 2**10
    assert (transport.reset_refill_per_s, transport.preface_timeout_s) == (10.0, 2.0)
    assert transport.max_continuation_frames == 0  # a header block in one frame only
    assert transport.max_reset_burst == ServerLimits().max_reset_burst  # untouched


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[transport]\nmax-header-lst = 1\n", "unknown key 'max-header-lst' (did you mean"),
        ("[transport]\nidle-timeout = 5\n", "idle-timeout is set at the top level"),
        ("[transport]\nmax-pending-acks = 0\n", "max-pending-acks: not a whole number of at"),
        ("[transport]\nreset-refill = -1\n", "reset-refill: expected a rate per second above"),
        ("[transport]\npreface-timeout = 0\n", "preface-timeout: expected a duration above"),
        ('[transport]\nmin-ping-interval = "off"\n', "min-ping-interval: not a duration"),
        ('transport = "fast"\n', "transport: expected a table"),
        ("max-connections = 0\n", "max-connections: not a whole number"),
        (
            '[transport]\nmax-header-list = "64K"\nmax-header-decode = "32K"\n',
            "max_header_decode_bytes (32768) is below max_header_list_bytes (65536)",
        ),
    ],
)
def test_transport_mistakes_are_named(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "jobworker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(error)):
        resolve(NO_FLAGS, load_config_file(path))


def test_allow_list_and_log_settings_from_the_file_and_flags(tmp_path: Path) -> None:
    settings = resolve(NO_FLAGS, host=HOST)
    assert (settings.allowed, settings.log_format, settings.log_level) == (None, "text", "info")
    path = tmp_path / "jobworker.toml"
    path.write_text('allow = ["alice", "dns:CI.example.com"]\nlog-format = "json"\n')
    flags = {**NO_FLAGS, "allow": ("email:bob@example.com",), "log-level": "warning"}
    settings = resolve(flags, load_config_file(path), host=HOST)
    # The flags add to the file's list, as --run-as adds to its table.
    assert settings.allowed is not None
    assert settings.allowed.entries == {
        ("cn", "alice"),
        ("dns", "ci.example.com"),
        ("email", "bob@example.com"),
    }
    assert (settings.log_format, settings.log_level) == ("json", "warning")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"allow": []},
            "config: allow: an empty list would refuse every client: leave the key out instead",
        ),
        (
            {"allow": "alice"},
            "config: allow: expected a list such as [\"alice\", \"dns:ci.example.com\"],"
            " got 'alice'",
        ),
        ({"allow": ["ip:nowhere"]}, "config: allow: 'ip:nowhere': 'nowhere' is not an IP address"),
        ({"log-format": "xml"}, "config: log-format: expected one of text, json, got 'xml'"),
        ({"log-level": "loud"},
         "config: log-level: expected one of debug, info, warning, error, got 'loud'"),
    ],
)  # fmt: skip
def test_allow_and_log_mistakes_are_named(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        resolve(NO_FLAGS, table, host=HOST)
    assert str(caught.value) == message


def test_what_a_reload_changes_and_what_it_keeps_until_a_restart() -> None:
    old = resolve(NO_FLAGS, {"memory": "1G", "max-jobs": 10}, host=HOST)
    new = resolve(
        NO_FLAGS,
        {"memory": "256M", "max-memory": "2G", "max-jobs": 10, "allow": ["alice"],
         "listen": ":7000", "cert": "/x.crt", "transport": {"max-frame": "64K"},
         "log-format": "json"},
        host=HOST,
    )  # fmt: skip
    assert changed_settings(old, new, restart_only=True) == ["listen", "cert", "max-frame"]
    assert changed_settings(old, new) == [
        "listen",
        "cert",
        "max-frame",
        "defaults (memory=256M)",
        "maximums (max-memory=2G)",
        "allow",
        "log-format",
    ]
    kept = keep_restart_settings(old, new)
    assert (kept.listen, kept.cert_file, kept.transport) == (
        old.listen,
        old.cert_file,
        old.transport,
    )
    assert (kept.limits, kept.allowed, kept.log_format) == (new.limits, new.allowed, "json")
    assert changed_settings(old, kept, restart_only=True) == []
    assert changed_settings(old, old) == []


def test_a_reload_names_iops_as_counts_and_an_unset_one_as_none() -> None:
    old = resolve(NO_FLAGS, {"io-read-iops": 2048, "max-io-read-iops": 4096}, host=HOST)
    new = resolve(NO_FLAGS, {"io-read-iops": 3000, "max-memory": "2G"}, host=HOST)
    assert changed_settings(old, new) == [
        "defaults (io-read-iops=3000)",  # a count, not 2.93K of bytes
        "maximums (max-memory=2G max-io-read-iops=the host's)",
    ]
    none = resolve(NO_FLAGS, {}, host=HOST)
    assert changed_settings(new, none)[0] == "defaults (io-read-iops=none)"


def test_every_budget_of_the_transport_is_a_key() -> None:
    """A ServerLimits field without a key is a knob an operator cannot turn."""
    import dataclasses

    from jobworker.cli.config import TRANSPORT_KEYS
    from jobworker.purgatory import ServerLimits

    named = {field for field, _ in TRANSPORT_KEYS.values()}
    assert named == {f.name for f in dataclasses.fields(ServerLimits)}
