"""Pseudonymous user ids: a keyed hash (HMAC-SHA-256) applied at the edge, so that raw
user ids never reach the bus, the event log, the serve log or the online store.

The ingest server replaces each event's ``user_id`` before it validates and appends the
batch; the ranking server replaces the request's ``user_id`` (``Recommend``,
``RankCandidates``) before it reads features, assigns an experiment arm, calls retrieval
or logs the answer. Retrieval sits behind ranking and receives pseudonyms. Callers
keep sending raw ids; everything inside inkling is keyed by pseudonyms, which the data
written before pseudonymisation was switched on is not (it starts a new history).

Keys file: one key per line, ``<version> <secret>`` (the secret: at least 32 bytes as
hex, or any text of at least 32 characters); ``#`` starts a comment; the first key is
the current one. A pseudonym is ``<version>.<first 32 hex digits of HMAC(secret, id)>``,
so a pseudonym says which key made it. `ensure_keys` writes a file with one random
key (mode 0600) where none exists.

Rotation (documented in the README, "Security"): put a new key on the first line and
keep the old ones below it, then restart ingest and ranking together. From then on
every user has a new pseudonym: what was learned under the old one (history features,
embeddings, experiment arms) is not joined to it. `inkling forget` hashes the raw id
with every key in the file, so erasure still reaches data written under an old key;
drop an old key only once its data has aged out of the logs or been erased.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from inkling.errors import ConfigurationError

MIN_SECRET_BYTES = 32
_DIGITS = 32


@dataclass(frozen=True)
class PseudonymKey:
    version: str
    secret: bytes


def _secret(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = text.encode()
    return raw


def parse_keys(text: str, where: str) -> list[PseudonymKey]:
    """The keys of a keys file's text, current first.

    Raises:
        ConfigurationError: a malformed line, a short secret, a repeated version, or no key.
    """
    keys: list[PseudonymKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        version, _, secret = line.partition(" ")
        secret = secret.strip()
        if not secret or not version.isalnum():
            raise ConfigurationError(
                f"{where}:{number}: a key line is '<version> <secret>' with an alphanumeric version"
            )
        raw = _secret(secret)
        if len(raw) < MIN_SECRET_BYTES:
            raise ConfigurationError(
                f"{where}:{number}: key {version}'s secret is {len(raw)} bytes; "
                f"at least {MIN_SECRET_BYTES} are needed"
            )
        if any(k.version == version for k in keys):
            raise ConfigurationError(f"{where}:{number}: key version {version} appears twice")
        keys.append(PseudonymKey(version, raw))
    if not keys:
        raise ConfigurationError(f"{where} holds no key")
    return keys


class Pseudonymizer:
    """Maps raw user ids to pseudonyms with the current key; "" stays "" (anonymous)."""

    def __init__(self, keys: list[PseudonymKey]) -> None:
        if not keys:
            raise ConfigurationError("a pseudonymizer needs at least one key")
        self.keys = list(keys)
        self._current = keys[0]

    @classmethod
    def from_file(cls, path: Path) -> Pseudonymizer:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigurationError(f"pseudonym keys file {path} does not exist") from None
        return cls(parse_keys(text, str(path)))

    @staticmethod
    def _hash(key: PseudonymKey, user_id: str) -> str:
        digest = hmac.new(key.secret, user_id.encode("utf-8"), hashlib.sha256).hexdigest()
        return f"{key.version}.{digest[:_DIGITS]}"

    def __call__(self, user_id: str) -> str:
        return self._hash(self._current, user_id) if user_id else ""

    def every_version(self, user_id: str) -> list[str]:
        """The user's pseudonym under every key of the file (erasure reaches them all)."""
        return [self._hash(k, user_id) for k in self.keys]


def ensure_keys(path: Path) -> Path:
    """Create a keys file with one random key (version ``k1``, mode 0600) if none exists."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(
            "# inkling pseudonym keys: '<version> <secret hex>', current first (inkling/pseudonym.py)\n"
        )
        out.write(f"k1 {secrets.token_hex(MIN_SECRET_BYTES)}\n")
    return path


def default_keys_file(data_dir: Path) -> Path:
    return Path(data_dir) / "secrets" / "pseudonym.keys"


def configured(enabled: bool, keys_file: Path | None, data_dir: Path) -> Pseudonymizer | None:
    """The pseudonymizer the settings ask for: None when off; else over `keys_file`, or
    over `default_keys_file(data_dir)`, created with a random key when absent."""
    if not enabled:
        return None
    if keys_file is None:
        keys_file = ensure_keys(default_keys_file(data_dir))
    return Pseudonymizer.from_file(keys_file)
