"""The engine's frame clock: live speakers step together.

Every step costs the full batch (moshi steps a fixed batch shape; a slot without a frame is only
masked out), so the number of steps per 80 ms is the GPU's bill. WebRTC hands every remote track of
a process 10 ms of audio on the same 10 ms tick, but each stream's 80 ms frames would complete at
its own phase (when it started): 8 speakers at 8 phases would cost up to 8 steps per 80 ms. Three
rules keep it to one, or close to it:

* **The lead** (`lead_for`): a live stream's first push is preceded by up to 80 ms of silence, chosen
  so that its frames complete on the same tick as the other streams'. Ticks are told apart by when
  the audio was produced, which the caller knows (`push(..., produced_at=)`): the moment of the push
  is late by however long the caller's thread waited (another room's thread holding the GIL, a busy
  event loop), and a first push a few ms late would put a speaker on the next tick for their whole
  turn.
* **The gather** (`wait_s`): a step waits a few ms for the slots whose frame completes on this tick
  (from another receiving process, up to a tick later: each process has its own WebRTC phase).
* **The hold** (`wait_s`): a lead can still come out a tick or more off, on a host whose processes
  wait for a core: production times are estimated per track, a few ms apart, and a starved loop
  hands over several ticks of chunks at once (docs/benchmarks/host.md, "Tracing the extra steps").
  Such a stream would step on its own tick for its whole turn, a full batch step each time. So live
  frames that are ready wait (the hold lasts at most `hold_s`) for the next group of live streams
  due at least as large as theirs, and step with it and the rest of it: the few wait for the many,
  one step carries both, and that costs the few up to `hold_s` of latency instead of the GPU a step.
  Streams spread over many phases converge to fewer steps, not always to one (a review measured
  8 streams at 8 phases at 1.65 steps per 80 ms, against 8 without the hold). Frames that are not live
  (a stream catching up, a file, a closing stream's flush) never wait.

The clock reads the engine's slots (captions/stt/engine.py `_Slot`) under the engine's lock, and
keeps the time of the newest live push; times are the engine's `_now()` (arrival at the engine).
"""

from __future__ import annotations

import math

GATHER_WAIT_S = 0.004
"""How long a step waits for slots whose frame is due: the pushes of one tick reach the engine within
about a millisecond of each other when they come from one process."""
SEVERAL_PHASES_GATHER_WAIT_S = 0.008
"""The same when the streams come from several receiving processes (captions/host/engine_process.py
sets it): each process has its own WebRTC tick phase, up to a tick apart, and their frames join one
step only if the step waits for the later phase. Measured with two processes 4.5 to 5.5 ms apart:
1.6 to 1.9 steps per 80 ms with 4 ms, 1.01 with 8 ms (docs/benchmarks/host.md, receivers section).
In one process the longer wait would only add latency when a push is late."""
HOLD_S = 0.075
"""The longest a hold lasts: under a frame (80 ms), so that a held stream's frame steps before its
next one completes and it never falls a frame behind; and half a tick over 70 ms, so that a stream
one tick after its group (their next frames 70 ms on) is held whatever the sub-ms jitter."""
HOLD_RECHECK_S = 0.01
"""How often a hold looks again at the streams it waits for (one of them may have stalled)."""
GRID_STALE_S = 0.2
"""A live stream joins the clock of a live push this recent; after a longer gap, it sets its own."""
STALLED_CHUNKS = 1.5
"""A live stream whose last push is this many chunks old is not waited for (its feed stalled)."""


class FrameClock:
    def __init__(self, sample_rate: int, frame_size: int, align: bool = True):
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        self.align = align
        """Align live streams' frames (module notes); False: each stream keeps its phase, no step waits."""
        self.gather_wait_s = GATHER_WAIT_S
        """How long a step waits for due slots; SEVERAL_PHASES_GATHER_WAIT_S with receiving processes."""
        self.hold_s = HOLD_S
        """How long ready live frames may wait for a larger group's step; 0: they never do."""
        self.latest: tuple[float, int] | None = None
        """(When the newest live push's audio was produced, samples of an unfinished frame it left in its slot)."""

    def lead_for(self, size: int, chunk: int, produced: float) -> int:
        """Silence to put before a live stream's first push (`size` samples, the last produced at
        `produced`; then `chunk` per tick) so that its frames complete on the same tick as the others':
        after this push it should hold as many samples of an unfinished frame as the newest live push
        left, plus a chunk per tick since (rounded: ticks jitter by a few ms)."""
        if not self.align or chunk >= self.frame_size or self.latest is None:
            return 0  # offline input (whole frames at once), or no live clock to join
        at, pending = self.latest
        if produced - at > GRID_STALE_S:
            return 0
        ticks = round((produced - at) * self.sample_rate / chunk)
        return (pending + ticks * chunk - size) % self.frame_size

    def pushed(self, chunk: int, produced: float, pending: int) -> None:
        """A push of `chunk`-sample ticks, produced at `produced`, left `pending` samples in its slot."""
        if chunk < self.frame_size and (self.latest is None or produced >= self.latest[0]):
            self.latest = (produced, pending)  # the newest audio (not kept audio pushed late)

    def wait_s(self, slots, now: float, started: float) -> float | None:
        """How much longer the step that began waiting at `started` should wait before it steps the
        slots' ready frames (it is woken early when a frame completes); None: step now."""
        if not self.align:
            return None
        ready, coming = [], []
        for s in slots:  # one pass: it runs under the engine's lock, over every slot
            if s.stream is None:
                continue
            if s.queue:
                if len(s.queue) > 1 or not self._live(s):
                    return None  # catching up, bulk audio or a flush: never made to wait
                ready.append(s)
            elif s.closing:
                return None  # an ended stream: its last event and its slot go out now
            elif self._live(s) and (now - s.last_push_at) * self.sample_rate / s.last_chunk < STALLED_CHUNKS:
                coming.append(s)
        if not ready:
            return None
        # The gather: a slot whose next chunk completes a frame, expected within the wait. Judged by
        # when that push is expected, not by the age of the last one as the wait goes on, a step
        # never waits here for a slot whose push only comes on the next tick.
        # Anchored at the newest ready frame too: a hold released by its group's first pushes (one
        # speaker, or one receiving process, at a time) still gathers the rest of that group.
        gather_until = max(started, *(s.last_push_at for s in ready)) + self.gather_wait_s
        if now < gather_until and any(s.buffer.pending + s.last_chunk >= self.frame_size
                                      and s.last_push_at + s.last_chunk / self.sample_rate <= gather_until
                                      for s in coming):
            return gather_until - now
        # The hold: as many live streams or more complete a frame before `hold_until`.
        hold_until = started + self.hold_s
        if now < hold_until and sum(self._next_frame_at(s) <= hold_until for s in coming) >= len(ready):
            return min(hold_until - now, HOLD_RECHECK_S)  # a completed frame wakes it; a stall does not
        return None

    def _live(self, slot) -> bool:
        return not slot.closing and 0 < slot.last_chunk < self.frame_size

    def _next_frame_at(self, slot) -> float:
        chunks = math.ceil((self.frame_size - slot.buffer.pending) / slot.last_chunk)
        return slot.last_push_at + chunks * slot.last_chunk / self.sample_rate
