"""Long-lived tasks that never end silently.

An exception in a task nobody awaits is lost (asyncio only mentions it when the task is garbage
collected, if ever): a microphone's reader dying that way ends its captions without a word. So every
long-lived task of a room is made with `supervised`: a failure is logged once with its traceback,
counted in `captions_task_failures_total{task=...}`, and handed to `on_failure`, which restarts the
task or ends what it serves, visibly (a speaker gives its engine slot back, its turn closes)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from captions.live.metrics import TASK_METRICS
from captions.log import logger


def supervised(coro: Coroutine[Any, Any, Any], task: str, name: str,
               on_failure: Callable[[BaseException], None]) -> asyncio.Task:
    """Runs `coro` as a task named `name`; if it raises, logs and counts the failure under the kind
    `task` (a metric label: a few fixed values), then calls `on_failure(exception)` on the loop.
    Cancelling it is not a failure. Keep a reference to the task (the loop does not)."""
    running = asyncio.create_task(coro, name=name)
    running.add_done_callback(lambda done: _done(done, task, on_failure))
    return running


def _done(done: asyncio.Task, task: str, on_failure: Callable[[BaseException], None]) -> None:
    if done.cancelled() or (exc := done.exception()) is None:
        return
    TASK_METRICS.failed(task)
    logger.error("task %s failed", done.get_name(), exc_info=exc)
    try:
        on_failure(exc)
    except Exception:  # noqa: BLE001 - the recovery itself failed: said too, never silent
        TASK_METRICS.failed(task)
        logger.exception("task %s: recovering from its failure failed too", done.get_name())
