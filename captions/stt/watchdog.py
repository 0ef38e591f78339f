"""The engine's watchdog: a device or driver that hangs raises nothing, its step just never returns.
Captions would then stop in every room while the worker still says it is ready. A thread watches
the step under way and, once it has run `hung_s`, breaks the engine (engine.py), which then fails
as for a CUDA error: unready, every stream ended, the worker exits and is replaced.

Steps take milliseconds (tens at B = 256 on one H200); `STEP_HUNG_S` leaves a machine that stalls
for seconds (swap) its margin, and `HUNG_AFTER_WARM_STEPS` times the last warm-up step a slow
device its own (a large batch on a CPU). Time during which the watchdog itself did not run (the
process paused or starved) does not count against the step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

STEP_HUNG_S, HUNG_AFTER_WARM_STEPS = 20.0, 50


class StepWatchdog:
    """`on_hung(cause, unless)`: break the engine with `cause`, unless `unless()` (checked under the
    engine's lock, where the stepping thread clears `started` as its step returns); True if it did.
    The watchdog stops once it has broken the engine, or once the engine broke otherwise."""

    def __init__(self, on_hung: Callable[[str, Callable[[], bool]], bool]):
        self.on_hung = on_hung
        self.hung_s = STEP_HUNG_S
        self.started: float | None = None
        """time.monotonic() when the step under way began; None between steps (the engine sets it)."""
        self._closed = threading.Event()

    def calibrate(self, warm_step_s: float) -> None:
        self.hung_s = max(STEP_HUNG_S, HUNG_AFTER_WARM_STEPS * warm_step_s)

    def start(self) -> None:
        threading.Thread(target=self._run, name="stt-engine-watchdog", daemon=True).start()

    def close(self) -> None:
        self._closed.set()

    def _run(self) -> None:
        last, watched, paused = time.monotonic(), None, 0.0
        while not self._closed.wait(interval := min(1.0, self.hung_s / 4)):
            now, started = time.monotonic(), self.started
            paused = (paused if started == watched else 0.0) + max(0.0, now - last - 2 * interval)
            last, watched = now, started
            if started is not None and (running := now - started - paused) >= self.hung_s and self.on_hung(
                    f"an engine step has not returned in {running:.0f} s (a hung device or driver)",
                    lambda started=started: self.started is not started):
                return
