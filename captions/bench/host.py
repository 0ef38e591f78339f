"""`captions bench host`: host cores per live talker and per silent participant (issue 24; being built)."""

from __future__ import annotations

import argparse
import sys


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="JSON file for the figures")


def run(args: argparse.Namespace) -> int:
    print("captions bench host: not built yet", file=sys.stderr)
    return 2
