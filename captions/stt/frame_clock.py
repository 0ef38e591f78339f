"""The engine's frame clock: live speakers step together.

Every step costs the full batch (moshi steps a fixed batch shape; a slot without a frame is only
masked out), so the number of steps per 80 ms is the GPU's bill. WebRTC hands every remote track of
a process 10 ms of audio on the same 10 ms tick, but each stream's 80 ms frames would complete at
its own phase (when it started): 8 speakers at 8 phases would cost up to 8 steps per 80 ms. Three
rules keep it to one, or close to it:

* **The lead** (`lead_for`): a live stream's first push is preceded by up to 80 ms of silence, chosen
  so that its frames end on the same tick as the other streams' (ticks of 10 ms whatever the chunk:
  with longer chunks a frame completes with the chunk that holds its end, up to a chunk less a tick
  later, and the hold below waits for the last of them). Ticks are told apart by when
  the audio was produced, which the caller knows (`push(..., produced_at=)`): the moment of the push
  is late by however long the caller's thread waited (another room's thread holding the GIL, a busy
  event loop), and a first push a few ms late would put a speaker on the next tick for their whole
  turn.
* **The gather** (`wait_s`): a step waits a few ms for the slots whose frame completes on this tick
  (from another receiving process, up to a tick later: each process has its own WebRTC phase).
* **The hold** (`wait_s`): a lead can still come out a tick or more off, on a host whose processes
  wait for a core: production times are estimated per track, a few ms apart, and a starved loop
  hands over several ticks of chunks at once (docs/benchmarks/host.md, "Tracing the extra steps").
  Such a stream would step on its own tick for its whole turn, a full batch step each time. So
  ready live frames may wait (at most `hold_s`) for a later moment, and the clock picks the moment
  that costs the least waiting in total if every frame steps at its phase: each stream waits (step
  phase - its own phase) mod 80 ms, so the few wait for the many, and since the choice is the same
  at every frame, groups at several phases converge on one step per frame. (The rule before, "wait
  for the next group at least as large", let groups chase each other: 64 streams at 8 phases
  stepped 1.7 times per 80 ms; docs/benchmarks/clock.md.) Near-ties keep the phase of the last
  step, so that a ms of jitter does not make two equal groups take turns. A stream whose lead is off
  pays up to a hold of latency instead of the GPU paying a step. Frames that are not live (a stream
  catching up, a file, a closing stream's flush) never wait.

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
NEAR_TIE_MS = 2
"""Total waits within this many ms per live stream of the least are a tie (`_cheapest_step`)."""
STALLED_TICKS = 8
"""A live stream whose last push is this many 10 ms ticks (a frame), plus its chunk less a tick,
older than the newest live push is not waited for: its feed stalled while the others' did not. Not
fewer: a loop short of CPU hands several ticks over at once, stream after stream, and a step that
looks in the middle sees the streams not yet handed over a few ticks behind (docs/benchmarks/host.md,
"The hold's phase choice and stall test"); and streams of longer chunks push a chunk apart."""


class FrameClock:
    def __init__(self, sample_rate: int, frame_size: int, align: bool = True):
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        self.align = align
        """Align live streams' frames (module notes); False: each stream keeps its phase, no step waits."""
        self.gather_wait_s = GATHER_WAIT_S
        """How long a step waits for due slots; SEVERAL_PHASES_GATHER_WAIT_S with receiving processes."""
        self.hold_s = HOLD_S
        """How long ready live frames may wait for a later step; 0: they never do."""
        self._plan: tuple[tuple[float, int], float] | None = None
        """The hold's decision in this wait: ((when the wait started, live streams), the moment chosen)."""
        self._step_phase = 0
        """The ms phase of the frame at which live frames last stepped (near-ties go to it)."""
        self._frame_ms = round(1000 * frame_size / sample_rate)
        self._tick = sample_rate // 100
        self.latest: tuple[float, int] | None = None
        """(When the newest live push's audio was produced, samples since the clock's last frame end)."""

    def lead_for(self, size: int, chunk: int, produced: float) -> tuple[int, int]:
        """Silence to put before a live stream's first push (`size` samples, the last produced at
        `produced`; then `chunk` at a time) so that its frames complete on the same tick as the others',
        and how many samples after the others' its frames end (`pushed`'s `shift`).

        Its frames end where the others' do: after this push it should hold as many samples of an
        unfinished frame as the newest live push left, plus the ticks since (rounded: ticks jitter by a
        few ms). With chunks longer than a tick, a frame completes with the chunk that holds its end,
        up to a chunk less a tick later, and the step waits for the last such chunk; so the frame ends
        with that chunk instead (that much less silence first): the step is the same, and the frame
        holds that much newer audio (a step waits for the group's last chunk, not for each frame's)."""
        if not self.align or chunk >= self.frame_size:
            return 0, 0  # offline input (whole frames at once)
        tick = min(chunk, self._tick)  # production times sit on WebRTC's tick, whatever the chunks
        whole = chunk > tick and self.frame_size % chunk == 0  # a frame is whole chunks
        if self.latest is None or produced - self.latest[0] > GRID_STALE_S:
            # No live clock to join: this stream sets it, its frames ending with its chunks.
            return ((-size) % chunk if whole else 0), 0
        at, pending = self.latest
        ticks = round((produced - at) * self.sample_rate / tick)
        lead = (pending + ticks * tick - size) % self.frame_size
        shift = (lead + size) % chunk if whole else 0
        return (lead - shift) % self.frame_size, shift

    def pushed(self, chunk: int, produced: float, pending: int, shift: int = 0) -> None:
        """A push of `chunk`-sample ticks, produced at `produced`, left `pending` samples in its slot,
        whose frames end `shift` samples after the clock's (`lead_for`)."""
        if chunk < self.frame_size and (self.latest is None or produced >= self.latest[0]):
            # The newest audio (not kept audio pushed late), on the clock's frame ends.
            self.latest = (produced, (pending + shift) % self.frame_size)

    def wait_s(self, slots, now: float, started: float) -> float | None:
        """How much longer the step that began waiting at `started` should wait before it steps the
        slots' ready frames (it is woken early when a frame completes); None: step now."""
        if not self.align:
            return None
        ready, waiting, newest_push = [], [], 0.0
        for s in slots:  # one pass: it runs under the engine's lock, over every slot
            if s.stream is None:
                continue
            if s.queue:
                if len(s.queue) > 1 or not self._live(s):
                    return None  # catching up, bulk audio or a flush: never made to wait
                ready.append(s)
            elif s.closing:
                return None  # an ended stream: its last event and its slot go out now
            elif self._live(s):
                waiting.append(s)
            else:
                continue
            if s.last_push_at > newest_push:
                newest_push = s.last_push_at
        if not ready:
            return None
        # A feed has stalled when other live streams have pushed since, not when the clock says so:
        # a receiving process whose loop is late hands every stream over late at once, and a hold
        # that judged them against the clock let go of the many then, stepping the few on their own.
        tick = self._tick
        coming = [s for s in waiting
                  if newest_push - s.last_push_at < (STALLED_TICKS * tick + max(s.last_chunk - tick, 0)) / self.sample_rate]
        # The gather: a slot whose frame completes with the chunks it is due by the end of the wait
        # (its next one, on time; several, when its loop hands ticks over late). Judged by when those
        # pushes are expected, not by the age of the last one as the wait goes on, a step never waits
        # here for a slot whose push only comes on the next tick.
        # Anchored at the newest ready frame too: a hold released by its group's first pushes (one
        # speaker, or one receiving process, at a time) still gathers the rest of that group.
        hold_until = started + self.hold_s
        gather_until = min(max(started, *(s.last_push_at for s in ready)) + self.gather_wait_s, hold_until)
        frames_at = [self._next_frame_at(s) for s in coming]
        if now < gather_until and any(at <= gather_until for at in frames_at):
            return gather_until - now
        # The hold: step at the phase that costs the streams least waiting in total, every frame.
        if now >= hold_until or not frames_at:
            return self._step_now(now)
        plan_of = (started, len(ready) + len(waiting))  # this wait, the same live streams
        if self._plan is not None and self._plan[0] == plan_of and now < self._plan[1] - 0.0005:
            # Decided earlier in this wait, on the same phases: a frame completing on the way to the
            # planned moment does not change it (in-process, every push that completes a frame wakes it).
            return min(self._plan[1] - now, HOLD_RECHECK_S)
        step_at = self._cheapest_step(ready, frames_at, now, hold_until)
        if step_at is None:
            return self._step_now(now)
        self._plan = (plan_of, step_at)
        return min(step_at - now, HOLD_RECHECK_S)  # a completed frame wakes it

    def _step_now(self, now: float) -> None:
        """Live frames step now: the phase the hold keeps to (`_cheapest_step`), and no plan."""
        self._plan = None
        self._step_phase = round(now * 1000) % self._frame_ms
        return None

    def _cheapest_step(self, ready, frames_at: list[float], now: float, hold_until: float) -> float | None:
        """When to step the ready frames: now (None), or when one of the coming streams' next frames
        completes (`frames_at`; by `hold_until`). Each live stream's frames complete once a frame, at
        its own phase; if the steps keep the phase of the moment chosen, a stream waits (step phase -
        its phase) mod a frame, every frame. The moment that costs the least in total wins: the few
        wait for the many, and the choice is the same at every frame, so groups converge instead of
        chasing each other. Costs within `NEAR_TIE_MS` per stream of the least are near-ties (a ms of
        jitter moves a group's phase across a rounding): of those, the one nearest the phase of the
        last live step, so that two equal groups do not take turns. A stream overdue (its loop hands
        over late) counts as coming within the gather wait."""
        frame_ms = self._frame_ms
        now_ms, hold_ms, soonest = round(now * 1000), hold_until * 1000, now + self.gather_wait_s
        streams_at = [0] * frame_ms  # live streams per ms phase of the frame
        for s in ready:  # its last push completed its frame; less what a lead a few ms off overshot
            streams_at[round((s.last_push_at - s.buffer.pending % self._tick / self.sample_rate) * 1000) % frame_ms] += 1
        moments = {now_ms}
        for at in frames_at:
            at_ms = round(max(soonest, at) * 1000)
            streams_at[at_ms % frame_ms] += 1
            if at_ms <= hold_ms:
                moments.add(at_ms)
        # Total wait with the steps at each phase, in one pass: a phase 1 ms later adds 1 ms to every
        # stream, less a whole frame for the streams at that phase (they no longer wait at all).
        streams = len(ready) + len(frames_at)
        total_wait = [sum(n * (-phase % frame_ms) for phase, n in enumerate(streams_at))]
        for phase in range(1, frame_ms):
            total_wait.append(total_wait[-1] + streams - frame_ms * streams_at[phase])
        least = min(total_wait[m % frame_ms] for m in moments)
        near = [m for m in moments if total_wait[m % frame_ms] <= least + NEAR_TIE_MS * streams]
        last = self._step_phase

        def from_last(moment: int) -> int:
            return min((moment - last) % frame_ms, (last - moment) % frame_ms)

        step_at = min(near, key=lambda moment: (from_last(moment), total_wait[moment % frame_ms], moment))
        return None if step_at <= now_ms else step_at / 1000

    def _live(self, slot) -> bool:
        return not slot.closing and 0 < slot.last_chunk < self.frame_size

    def _next_frame_at(self, slot) -> float:
        chunks = math.ceil((self.frame_size - slot.buffer.pending) / slot.last_chunk)
        return slot.last_push_at + chunks * slot.last_chunk / self.sample_rate
