"""Every option is both a CLI flag and an environment variable.

`add_option` puts the variable's name and the default in the flag's --help text, so that
`captions <command> --help` documents the whole configuration.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable


def add_option(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    env: str,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str,
    **kwargs: Any,
) -> None:
    """Adds `flag` whose default comes from `env` when that variable is set."""
    raw = os.environ.get(env)
    value = default
    if raw is not None and raw != "":
        try:
            value = type(raw)
        except (TypeError, ValueError) as e:
            raise SystemExit(f"error: invalid value for {env}={raw!r}: {e}") from None
    shown = "unset" if default is None else repr(default)
    parser.add_argument(
        flag, default=value, type=type, help=f"{help} [env {env}, default {shown}]", **kwargs
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_livekit_options(parser: argparse.ArgumentParser) -> None:
    """The three standard LiveKit variables, named as LiveKit's own tools name them."""
    add_option(parser, "--url", env="LIVEKIT_URL", default="ws://127.0.0.1:7880",
               help="LiveKit server URL")
    add_option(parser, "--api-key", env="LIVEKIT_API_KEY", default="devkey", help="LiveKit API key")
    add_option(parser, "--api-secret", env="LIVEKIT_API_SECRET", default="secret",
               help="LiveKit API secret")
