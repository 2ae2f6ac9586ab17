"""`inkling --help` explains every flag with its default, and `--version` says what runs."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from inkling.cli import build_parser
from inkling.config import PROJECT_ROOT


def _parsers(
    parser: argparse.ArgumentParser, name: str = "inkling"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _explained(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def test_every_flag_of_every_command_is_explained_with_its_default():
    unexplained, no_default = [], []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or isinstance(
                action, argparse._HelpAction | argparse._SubParsersAction
            ):
                continue
            what = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = _explained(parser, action)
            if not text.strip():
                unexplained.append(what)
            elif action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                shown = str(action.default).removesuffix(".0")
                if "default" not in text.lower() and shown not in text:
                    no_default.append(f"{what}: {text!r}")
    assert not unexplained, f"flags without help: {unexplained}"
    assert not no_default, f"flags whose help omits the default: {no_default}"


@pytest.mark.parametrize(
    ("command", "flag", "says"),
    [
        (["import"], "--timestamp-unit", "detected from the column"),
        (["import"], "--map", "FIELD=COLUMN"),
        (["evaluate"], "--k", "(default: 10)"),
        (["evaluate"], "--by", "default: auto"),
        (["evaluate"], "--seed", "(default: 0)"),
        (["train"], "--seconds", "(default: 240)"),
    ],
)
def test_the_flags_a_new_user_asked_about_read_well(command, flag, says, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert flag in text
    assert says in text, text


def test_version_names_package_contract_event_schema_and_feast():
    from importlib import metadata

    printed = subprocess.run(
        [sys.executable, "-m", "inkling.cli", "--version"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()  # fmt: skip
    assert printed[0].startswith("inkling ") and printed[0].split()[1][0].isdigit()
    assert printed[1].startswith("contract inkling.v1")
    assert printed[2] == "event schema 2"
    assert printed[3] == f"feast {metadata.version('feast')}"
