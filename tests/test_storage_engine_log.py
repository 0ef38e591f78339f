"""A worker's start logs its engine without a logging error (issue 23: every start printed
"--- Logging error --- TypeError: %d format: a real number is required, not str" with --batch-size auto)."""

from __future__ import annotations

import io
import logging

from captions.log import logger
from captions.stt.engine import SttEngine


def test_an_engine_loaded_with_batch_size_auto_logs_its_slot_count_without_a_logging_error(
        tiny_checkpoint, caplog, capsys, monkeypatch):
    monkeypatch.setattr(logging, "raiseExceptions", True)  # what a worker runs with: errors go to stderr
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # the worker's kind of handler (setup_logging: a stream)
    logger.addHandler(handler)
    caplog.set_level(logging.INFO, logger="captions")
    try:
        engine = SttEngine.load(str(tiny_checkpoint), device="cpu", batch_size="auto")
    finally:
        logger.removeHandler(handler)
    assert "Logging error" not in capsys.readouterr().err
    assert f"{engine.batch_size} slots" in out.getvalue(), out.getvalue()
