"""The Redis role table's rules, files and addresses (the servers' side is in
tests/integration/test_redis_acl.py)."""

from __future__ import annotations

import pytest

from inkling import bandit
from inkling.config import Settings
from inkling.errors import ConfigurationError
from inkling.events import bus
from inkling.redis_acl import (
    ROLES,
    AclFiles,
    acl_lines,
    address_for,
    connect_as,
    new_password,
    role_rules,
)
from inkling.serving.security import SecuritySettings
from stream_worker import commit, online, ownership


def test_the_patterns_name_the_prefixes_the_code_uses():
    assert bus.PREFIX == "inkling:events" and bus.PARTITIONS_KEY == "inkling:bus:partitions"
    assert bus.COUNTER_PREFIX.startswith("inkling:bus:") and bus.SEEN_PREFIX.startswith(
        "inkling:bus:"
    )
    assert bandit.PREFIX == "inkling:bandit"
    worker_keys = (commit.APPLIED_PREFIX, commit.LOGGED_PREFIX, commit.INFLIGHT_PREFIX,
                   commit.STATE_PREFIX, online.COUNTS_PREFIX, ownership.MEMBERS,
                   ownership.LEASE_PREFIX)  # fmt: skip
    assert all(k.startswith("inkling:worker:") for k in worker_keys)
    patterns = {g.pattern for g in ROLES["worker"].keys}
    assert {"inkling:worker:*", "inkling:bandit:*", "inkling:events:*"} <= patterns


def test_redis_7_rules_carry_each_patterns_access_and_6_2_rules_do_not():
    seven, six = role_rules(ROLES["ranking"], 7), role_rules(ROLES["ranking"], 6)
    assert seven[:3] == six[:3] == ["resetkeys", "resetchannels", "-@all"]
    assert "%R~[^!-~]*inkling" in seven and "~[^!-~]*inkling" in six
    assert not any(w.startswith("%") for w in six)
    assert "+hset" not in seven and "+hmget" in seven
    with pytest.raises(ConfigurationError, match="Redis 6 or later"):
        role_rules(ROLES["ranking"], 5)


def test_the_acl_file_turns_default_off_and_needs_every_password():
    passwords = {r: new_password() for r in (*ROLES, "admin")}
    lines = acl_lines(passwords, 7)
    assert lines[0].startswith("user default off ")
    assert len(lines) == 2 + len(ROLES)
    with pytest.raises(ConfigurationError, match="no password for worker"):
        acl_lines({k: v for k, v in passwords.items() if k != "worker"}, 7)


def test_passwords_are_made_once_private_and_refused_when_readable_by_others(tmp_path):
    files = AclFiles(tmp_path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        files.passwords()
    first = files.passwords(create=True)
    assert set(first) == {*ROLES, "admin"} and files.passwords() == first
    assert all(p.startswith("i") for p in first.values())  # never a JSON literal for Feast
    files.secrets_path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        files.passwords()
    files.secrets_path.chmod(0o600)
    files.secrets_path.write_text("worker\n")
    with pytest.raises(ConfigurationError, match="line 1: expected 'role password'"):
        files.passwords()


def test_a_process_adds_its_roles_credentials_only_when_acls_are_on(tmp_path):
    settings = Settings(data_dir=tmp_path, redis_address="10.0.0.5:6379,db=2")
    on, off = SecuritySettings(redis_acl=True), SecuritySettings()
    assert connect_as(settings, "worker", off) == settings
    with pytest.raises(ConfigurationError, match="acl-secrets does not exist"):
        connect_as(settings, "worker", on)
    password = AclFiles(settings.redis_dir).passwords(create=True)["worker"]
    live = connect_as(settings, "worker", on)
    assert live.redis_address == f"10.0.0.5:6379,db=2,username=worker,password={password}"
    named = settings.with_redis("10.0.0.5:6379,username=ops,password=x")
    assert connect_as(named, "worker", on) == named  # an operator's user wins
    assert address_for("h:1", "ranking", "ipw") == "h:1,username=ranking,password=ipw"
    with pytest.raises(ConfigurationError, match="no Redis role 'writer'"):
        connect_as(settings, "writer", on)
