"""The engine-stream client: how a caller on an asyncio event loop gets an engine stream, feeds it
and hears it, written once for both products on the engine: the caption worker's speakers (one
client per turn: speaker.py) and the Agents STT (one per engine session: captions/agents/stream.py).

A client asks the worker's fair slot queue for a slot (slots.py, or the engine process's queue
through captions/host/engine_client.py), and the grant (from the queue's dispatcher thread) and
every stream event (from the engine's thread) hop onto the caller's loop, where the caller's
callbacks run. A client released before its grant arrives leaves the line, or aborts the stream
the grant brings; one released after it flushes or aborts the stream and tells the queue the slot is
as good as given back. While a caller waits for its slot it keeps the audio, within `KeptAudioBound`.

**The frame clock** (captions/stt/engine.py), as a caller sees it, owned here:

* every stream's 80 ms frames complete on the same engine step, so that B streams advance in one
  batched step with no extra steps. The engine aligns a new stream by putting `lead_samples` of
  silence before its first sample, decided at the first push, so it is known only after that push;
* a live caller passes `produced_at` with each push: the `time.monotonic()` at which its last
  sample was produced (WebRTC's 10 ms tick, track_audio.py), if it knows it better than the moment
  of the call; the engine aligns live streams' frames by it;
* `StreamEvent.frames` counts the lead; word times do not (segmenter.py and a recording's
  `lead_samples` take it out);
* so the frames the engine can step for a client are `(lead_samples + pushed) // FRAME_SIZE`
  (`whole_frames`), and a flush that must end on a frame boundary adds `frame_remainder` (words.py
  and the Agents STT's flush).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import numpy as np

from captions.live.slots import SlotQueue, loop_waiter
from captions.log import logger
from captions.stt.api import FRAME_SIZE, SAMPLE_RATE, EngineStream, StreamEvent


class KeptAudioBound:
    """Audio a caller keeps while it waits (for a slot, or for a flush to complete) is bounded to
    `max_wait_s`: beyond it the oldest goes, and the first time is logged, with the label."""

    def __init__(self, label: str, max_wait_s: float):
        self.label = label
        self.max_wait_s = max_wait_s
        self.dropped = 0
        """Samples the caller was told to drop."""

    def excess(self, kept_samples: int) -> int:
        """Samples the caller must drop now, oldest first, to keep within the bound."""
        excess = kept_samples - int(self.max_wait_s * SAMPLE_RATE)
        if excess <= 0:
            return 0
        if not self.dropped:
            logger.warning("%s: still no engine slot after %.0f s of audio: dropped the oldest audio",
                           self.label, self.max_wait_s)
        self.dropped += excess
        return excess


class StreamClient:
    """One engine stream asked for from the running event loop (module notes). Callbacks:
    `on_granted(stream)` once the slot is there (at once, inside `request`, when it is free), and
    `on_event(event)` for each stream event, the last one with `ended`; both on the loop."""

    def __init__(self, slots: SlotQueue, label: str, on_event: Callable[[StreamEvent], None], *,
                 on_granted: Callable[[EngineStream], None] | None = None, since: float | None = None,
                 live_chunk: int | None = None, room: str = ""):
        self.label = label
        self._slots = slots
        self._on_event = on_event
        self._on_granted = on_granted
        self._granted: asyncio.Future[EngineStream] = asyncio.get_running_loop().create_future()
        self.stream: EngineStream | None = None
        self.released = False
        self.pushed = 0
        """Samples pushed into the stream (the caller's silence included; the engine's lead not)."""
        self.frames = 0
        """Frames the engine has stepped for this stream, the lead included (its latest event's)."""
        self.ended = False
        self.error: str | None = None
        self._waiter = loop_waiter(label, on_granted=self._take, on_event=self._deliver,
                                   since=time.monotonic() if since is None else since,
                                   live_chunk=live_chunk, room=room)

    def request(self) -> bool:
        """Asks for the slot; True if it was free (`on_granted` has run), False if the client waits."""
        stream = self._slots.request(self._waiter)
        if stream is not None:
            self._take(stream)
        return stream is not None

    async def wait(self, timeout: float) -> EngineStream:
        """The stream once granted; `asyncio.TimeoutError` after `timeout` s, still in line."""
        return await asyncio.wait_for(asyncio.shield(self._granted), timeout)

    @property
    def waiting(self) -> int:
        """Requests in the queue (this one included, if it waits)."""
        return len(self._slots)

    def should_yield(self, long_held: bool) -> bool:
        """Whether the queue asks this stream to give its slot back (slots.py `should_yield`)."""
        return self.stream is not None and self._slots.should_yield(self._waiter, long_held)

    def release(self, flush: bool = True) -> None:
        """No more audio: a waiting client leaves the line (a grant on its way is aborted when it
        comes); a granted one's stream is flushed (`close`: the last words come out) or aborted."""
        if self.released:
            if not flush and self.stream is not None:
                self.stream.abort()  # a no-op if it ended, or if a flush is under way (the engine finishes it)
            return
        self.released = True
        if self.stream is None:
            self._slots.cancel(self._waiter)
            self._granted.cancel()
            return
        self._slots.closing(self._waiter)
        if flush:
            self.stream.close()
        else:
            self.stream.abort()  # a no-op once the stream has ended

    # ---- audio and the frame clock --------------------------------------------------------------

    def push(self, pcm: np.ndarray, produced_at: float | None = None) -> None:
        """24 kHz mono float32 into the stream; `produced_at`: module notes. Raises RuntimeError if
        the engine has already ended the stream (its last event is on its way)."""
        self.stream.push(pcm, produced_at=produced_at)
        self.pushed += pcm.size

    @property
    def lead_samples(self) -> int:
        """The engine's silence before this stream's first sample (0 until the first push)."""
        return self.stream.lead_samples if self.stream is not None else 0

    @property
    def whole_frames(self) -> int:
        """Frames whose audio is all pushed, the lead included: what the engine will step."""
        return (self.lead_samples + self.pushed) // FRAME_SIZE

    @property
    def frame_remainder(self) -> int:
        """Samples pushed past the last whole frame (0: the pushed audio ends on a frame boundary)."""
        return (self.lead_samples + self.pushed) % FRAME_SIZE

    @property
    def stepped_all(self) -> bool:
        """The engine has stepped every whole frame pushed so far (or ended the stream)."""
        return self.ended or self.frames >= self.whole_frames

    # ---- on the loop -----------------------------------------------------------------------------

    def _take(self, stream: EngineStream) -> None:
        if self.released or self.stream is not None or self._granted.done():  # given up meanwhile
            stream.abort()
            return
        self.stream = stream
        self._granted.set_result(stream)
        if self._on_granted is not None:
            self._on_granted(stream)

    def _deliver(self, event: StreamEvent) -> None:
        self.frames = event.frames
        if event.ended:
            self.ended, self.error = True, event.error
        self._on_event(event)
