"""Pseudonymous user ids (`inkling.pseudonym`): the keyed hash, its keys file, rotation."""

from __future__ import annotations

import hashlib
import hmac
import stat

import pytest

from inkling.errors import ConfigurationError
from inkling.pseudonym import Pseudonymizer, configured, ensure_keys, parse_keys

SECRET = "ab" * 32


def test_a_pseudonym_is_the_versioned_hmac_of_the_id() -> None:
    p = Pseudonymizer(parse_keys(f"k1 {SECRET}\n", "keys"))
    expected = hmac.new(bytes.fromhex(SECRET), b"alice", hashlib.sha256).hexdigest()[:32]
    assert p("alice") == f"k1.{expected}"
    assert p("alice") == p("alice") != p("bob")
    assert p("") == ""  # anonymous stays anonymous


def test_rotation_makes_new_pseudonyms_and_erasure_reaches_every_version() -> None:
    old = Pseudonymizer(parse_keys(f"k1 {SECRET}\n", "keys"))
    rotated = Pseudonymizer(parse_keys(f"k2 {'cd' * 32}\nk1 {SECRET}\n", "keys"))
    assert rotated("alice").startswith("k2.") and rotated("alice") != old("alice")
    assert rotated.every_version("alice") == [rotated("alice"), old("alice")]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        ("k1\n", "'<version> <secret>'"),
        ("k-1 " + SECRET, "alphanumeric version"),
        ("k1 short", "at least 32"),
        (f"k1 {SECRET}\nk1 {SECRET}\n", "appears twice"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_keys(text, "keys")


def test_the_default_keys_file_is_created_private_and_reused(tmp_path) -> None:
    assert configured(False, None, tmp_path) is None
    first = configured(True, None, tmp_path)
    assert first is not None
    path = tmp_path / "secrets" / "pseudonym.keys"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = configured(True, None, tmp_path)
    assert again is not None and again("u") == first("u")
    assert ensure_keys(path) == path
    with pytest.raises(ConfigurationError, match="does not exist"):
        Pseudonymizer.from_file(tmp_path / "missing.keys")
