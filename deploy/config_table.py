"""Prints the configuration table of docs/configuration.md from the commands' own argument parsers.

    uv run python deploy/config_table.py

Every option made with `captions.config.add_option` carries its environment variable and default in its
help text; this reads them back, so the table cannot drift from the code (tests/test_deploy.py checks
that docs/configuration.md holds exactly this output).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from captions.cli import COMMANDS

TABLE_COMMANDS = ("worker", "web", "token", "revoke")
"""The commands a deployment runs (`captions up`, `server` and the test helpers are for laptops)."""
ENV_HELP = re.compile(r"^(?P<help>.*) \[env (?P<env>\w+), default (?P<default>.*)\]$", re.DOTALL)


@contextmanager
def clean_environment():
    """Parsers read CAPTIONS_*/LIVEKIT_* at build time: hide the caller's so defaults show."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(("CAPTIONS_", "LIVEKIT_"))}
    for key in saved:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.update(saved)


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser `captions <command>` uses, built the way captions/cli.py builds it."""
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"captions {command}", description=COMMANDS[command][1])
    configure = getattr(module, f"configure_{command.replace('-', '_')}_parser", None) or module.configure_parser
    configure(parser)
    return parser


def env_options(parser: argparse.ArgumentParser) -> list[tuple[str, str, str, str]]:
    """(flag, env var, default, help) of every option that has an environment variable."""
    rows = []
    for action in parser._actions:
        match = ENV_HELP.match(" ".join((action.help or "").split()))
        if match and action.option_strings:
            rows.append((action.option_strings[-1], match["env"], match["default"], match["help"]))
    return rows


def table() -> str:
    """The markdown table: one row per environment variable, with the commands that read it."""
    rows: dict[str, list] = {}
    with clean_environment():
        for command in TABLE_COMMANDS:
            for flag, env, default, text in env_options(build_parser(command)):
                row = rows.setdefault(env, [flag, default, text, []])
                row[3].append(command)
    lines = ["| Variable | Flag | Default | Used by | Meaning |", "| --- | --- | --- | --- | --- |"]
    for env, (flag, default, text, commands) in rows.items():
        text = text.replace("|", "\\|")
        lines.append(f"| `{env}` | `{flag}` | `{default}` | {', '.join(commands)} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
