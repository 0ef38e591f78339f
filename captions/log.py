"""The package's one logger. Caption text and audio never go to the log at INFO level (privacy)."""

from __future__ import annotations

import logging

logger = logging.getLogger("captions")


def setup_logging(level: str = "INFO") -> None:
    """Logs go to stderr so that stdout stays clean for command output (transcripts, JSON)."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
