"""The batched Kyutai STT engine: one model instance serves every stream of every room.

B fixed slots share one Mimi encoder and one LM in moshi's batched streaming mode. A stream takes a
free slot, pushes 24 kHz mono audio, and releases the slot when it ends. One thread runs the
stepping loop: each step advances every slot that has a frame waiting, with moshi's per-slot
`exec_mask` (slots without a frame keep their state untouched) and `reset_mask` (a slot that was
just taken starts from a fresh state). A slot that fell behind has several frames waiting and
catches up at the loop's full speed; so does the silence that flushes a closing stream.

Live streams share one frame clock (captions/stt/frame_clock.py): a live stream's first push is
preceded by the silence that puts its frames on the other streams' tick, and a step waits a little for
the frames due with it, so that every speaker costs one step per 80 ms.

GPU notes: the batch size never changes (moshi captures CUDA graphs for fixed shapes), and a step
ends with a single device-to-host copy holding every slot's token and pause probability.

A failed step ends the streams it carried (their speakers ask again) and the engine serves on: a
CUDA out-of-memory passes. A device that fails for good does not: after `BROKEN_AFTER_FAILED_STEPS`
failed steps in a row, at an error that leaves CUDA unusable (`STICKY_DEVICE_ERRORS`), or if the
stepping thread itself crashes, the engine is *broken*: it logs why once, ends every stream, takes no
new one, and tells `broken_listeners`, so that the worker reports unready and exits (an orchestrator
replaces it, and its rooms move to other workers). So does a step that never returns (a hung
device or driver: watchdog.py).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from captions.log import logger
from captions.stt.api import EngineFull, EventCallback, StepTimings, StreamEvent
from captions.stt.audio import FrameBuffer
from captions.stt.frame_clock import FrameClock
from captions.stt.model import SttModel, load_stt_model, resolve_batch_size
from captions.stt.watchdog import StepWatchdog
from captions.stt.words import WordDecoder

# Index of the VAD head used for pauses: head i predicts "no voice activity" over 0.5 s, 1 s, 2 s,
# 3 s for i = 0..3; Kyutai's own tools take head 2 > 0.5 as the end of a turn.
PAUSE_HEAD = 2
_now = time.monotonic
"""The clock of the frame alignment (a test drives it by hand)."""
_SILENCE = None  # a queued frame of silence (prefix or flush), not counted as the stream's audio
BROKEN_AFTER_FAILED_STEPS = 3
"""Failed steps in a row after which the engine is broken (a success in between starts the count again)."""
STICKY_DEVICE_ERRORS = ("illegal memory access", "device-side assert", "unspecified launch failure",
                        "misaligned address", "illegal instruction", "uncorrectable ECC error",
                        "CUBLAS_STATUS_EXECUTION_FAILED", "CUDA-capable device", "cudaErrorLaunchFailure")
"""Errors after which a CUDA context stays unusable until the process ends: the first one breaks the engine."""


class SlotStream:
    """The engine's `EngineStream` (captions.stt.api): a caller's handle on one slot. `push` is
    thread-safe; events arrive on the engine thread."""

    def __init__(self, engine: SttEngine, stream_id: int, slot: _Slot):
        self._engine = engine
        self.id = stream_id
        self._slot = slot
        self.lead_samples = 0
        """Silence the engine put before this stream's audio (known after the first push)."""

    @property
    def slot_index(self) -> int:
        return self._slot.index

    def push(self, pcm: np.ndarray, produced_at: float | None = None) -> None:
        """Queues 24 kHz mono float32 audio of any length; `produced_at`: see `EngineStream.push`."""
        self._engine._push(self, pcm, produced_at)

    def close(self) -> None:
        """End of audio: flush the model's delay with silence so that the last words come out, then
        free the slot. The last event has `ended=True`."""
        self._engine._close(self, flush=True)

    def abort(self) -> None:
        """Free the slot without flushing (the last event still has `ended=True`)."""
        self._engine._close(self, flush=False)


@dataclass
class _Slot:
    index: int
    stream: SlotStream | None = None
    on_event: EventCallback | None = None
    queue: deque = field(default_factory=deque)
    buffer: FrameBuffer | None = None
    decoder: WordDecoder | None = None
    audio_frames: int = 0
    closing: bool = False
    flush: bool = True
    fresh: bool = False
    """Taken since its last step: reset its model state before stepping it."""
    pushed: int = 0
    """Samples of its own audio pushed so far."""
    last_chunk: int = 0
    """Size of its latest push: a live stream pushes the same chunk (10 to 40 ms) every chunk's worth of ticks."""
    live_chunk: int | None = None
    """A live stream's chunk size, declared when its first push is larger (open_stream)."""
    frame_shift: int = 0
    """Samples by which its frames end after the clock's: they end with its chunks (FrameClock.lead_for)."""
    last_push_at: float = 0.0


class SttEngine:
    def __init__(self, model: SttModel, batch_size: int, profile: bool = False, align_frames: bool = True):
        import torch
        from moshi.models import LMGen

        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.profile = profile
        self.sample_rate = model.sample_rate
        self.frame_size = model.frame_size
        self.frame_rate = model.frame_rate
        self.clock = FrameClock(self.sample_rate, self.frame_size, align=align_frames)
        """The frame clock (its module): set `gather_wait_s`, `hold_s` there."""
        self.text_delay_s = model.delay_s
        self.has_vad = model.has_vad
        # Greedy decoding, as Kyutai's reference. support_out_of_sync: slots start at different
        # times, so a slot's "not generated yet" steps are masked per slot rather than globally.
        self._lm_gen = LMGen(model.lm, temp=0, temp_text=0, support_out_of_sync=True)
        model.mimi.streaming_forever(batch_size)
        self._lm_gen.streaming_forever(batch_size)
        self._torch = torch
        self._slots = [_Slot(i) for i in range(batch_size)]
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._input = np.zeros((batch_size, 1, self.frame_size), dtype=np.float32)
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._busy = False
        self._waiting_on_clock = False
        self._slot_freed_listeners: list[Callable[[], None]] = []
        self.step_listeners: list[Callable[[StepTimings], None]] = []
        self.steps = 0
        self.failed_steps = 0
        self._failed_in_a_row = 0
        self.broken: str | None = None
        """Why the engine failed for good (module notes); None while it serves."""
        self.broken_listeners: list[Callable[[str], None]] = []
        """`callback(cause)` runs once, on the engine thread (or the watchdog's), when the engine breaks."""
        self.watchdog = StepWatchdog(self._break)

    @classmethod
    def load(cls, model: str, device: str = "auto", batch_size: int | str = 8, profile: bool = False,
             align_frames: bool = True) -> SttEngine:
        """Loads the checkpoint, builds B slots (`batch_size`, or "auto" by device) and warms up (CUDA
        graphs get captured here)."""
        started = time.perf_counter()
        loaded = load_stt_model(model, device)
        engine = cls(loaded, resolve_batch_size(batch_size, loaded.device.type), profile=profile,
                     align_frames=align_frames)
        engine.warm_up()
        logger.info("engine ready: %s on %s, %d slots, loaded in %.1f s", model, engine.model.device,
                    engine.batch_size, time.perf_counter() - started)
        return engine

    # ---- public API -------------------------------------------------------------------------

    @property
    def slots_in_use(self) -> int:
        with self._cond:
            return sum(slot.stream is not None for slot in self._slots)

    @property
    def idle(self) -> bool:
        """No frame waiting and no stream closing: every pushed frame has been stepped."""
        with self._cond:
            return not self._has_work() and not self._busy

    @property
    def settled(self) -> bool:
        """Every frame that can step by now has: idle, or the stepping thread waits on the frame clock
        for the frames due with its ready ones and nothing has woken it since (a test driving `_now`
        by hand calls `wake()` after moving it, then waits for this)."""
        with self._cond:
            return not self._busy and (not self._has_work() or self._waiting_on_clock)

    def wake(self) -> None:
        """Makes the stepping thread look at the clock again (after a test moved `_now`)."""
        with self._cond:
            self._wake()

    def add_slot_freed_listener(self, callback: Callable[[], None]) -> None:
        """`callback()` runs on the engine thread each time a slot becomes free."""
        self._slot_freed_listeners.append(callback)

    def open_stream(self, on_event: EventCallback, live_chunk: int | None = None) -> SlotStream:
        """Takes a free slot; raises EngineFull when there is none. `on_event` runs on the engine
        thread, once per step of this stream: hand the event over to your own loop, never block.
        `live_chunk`: a live stream's chunk size, when its first push is larger (audio kept from
        before, then live chunks); a stream whose first push is one live chunk need not say."""
        with self._cond:
            if self.broken is not None:  # the caller waits for a slot, until this worker is replaced
                raise EngineFull(f"engine failed: {self.broken}")
            slot = next((s for s in self._slots if s.stream is None), None)
            if slot is None:
                raise EngineFull(f"all {self.batch_size} engine slots are busy")
            stream = SlotStream(self, next(self._ids), slot)
            slot.stream, slot.on_event = stream, on_event
            slot.queue = deque([_SILENCE] * self.model.prefix_frames)
            slot.buffer = FrameBuffer(self.frame_size)
            slot.decoder = WordDecoder(self.model.tokenizer, self.frame_rate, self.model.time_offset_s,
                                       self.model.padding_id)
            slot.audio_frames, slot.closing, slot.flush, slot.fresh = 0, False, True, True
            slot.pushed, slot.last_chunk, slot.last_push_at, slot.frame_shift = 0, 0, 0.0, 0
            slot.live_chunk = live_chunk
            self._wake()
        return stream

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stt-engine", daemon=True)
            self._thread.start()
            self.watchdog.start()

    def close(self) -> None:
        self.watchdog.close()
        with self._cond:
            self._stopped = True
            self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def warm_up(self, steps: int = 4) -> None:
        """A few full-batch steps of silence, then every slot back to a fresh state."""
        batch = [(slot, _SILENCE) for slot in self._slots]
        for _ in range(steps):
            started = time.monotonic()
            self._run_model(batch, reset=np.zeros(self.batch_size, dtype=bool))
            warm_step_s = time.monotonic() - started
        if steps:
            self.watchdog.calibrate(warm_step_s)
        reset = self._torch.ones(self.batch_size, dtype=self._torch.bool)
        self.model.mimi.reset_streaming(reset)
        self._lm_gen.reset_streaming(reset)

    # ---- called by SlotStream ---------------------------------------------------------------

    def push_many(self, pushes) -> None:
        """`Engine.push_many`: every push under one lock; a push to a closed stream is dropped."""
        with self._cond:
            now, frames = _now(), False
            for stream, pcm, produced_at in pushes:
                slot = stream._slot
                if slot.stream is stream and not slot.closing:
                    frames |= self._take(slot, pcm, produced_at, now)
            if frames:
                self._wake()

    def _push(self, stream: SlotStream, pcm: np.ndarray, produced_at: float | None) -> None:
        with self._cond:
            slot = stream._slot
            if slot.stream is not stream or slot.closing:
                raise RuntimeError(f"stream {stream.id} is closed")
            if self._take(slot, pcm, produced_at, _now()):
                self._wake()

    def _take(self, slot: _Slot, pcm: np.ndarray, produced_at: float | None, now: float) -> bool:
        """Under the lock: `pcm` into the slot's frames; True if it completed one."""
        stream = slot.stream
        produced = now if produced_at is None else produced_at
        size = int(np.size(pcm))
        chunk = slot.live_chunk or size
        if slot.pushed == 0 and size:
            stream.lead_samples, slot.frame_shift = self.clock.lead_for(size, chunk, produced)
            if stream.lead_samples:
                slot.buffer.push(np.zeros(stream.lead_samples, dtype=np.float32))
                slot.decoder.time_offset_s += stream.lead_samples / self.sample_rate
        frames = slot.buffer.push(pcm)
        slot.pushed += size
        slot.last_chunk, slot.last_push_at = chunk, now
        self.clock.pushed(chunk, produced, slot.buffer.pending, slot.frame_shift)
        if frames:
            slot.queue.extend(frames)
        return bool(frames)

    def _close(self, stream: SlotStream, flush: bool) -> None:
        with self._cond:
            slot = stream._slot
            if slot.stream is not stream or slot.closing:
                return
            slot.closing, slot.flush = True, flush
            if flush:
                slot.queue.extend(slot.buffer.flush())
                slot.queue.extend([_SILENCE] * self.model.flush_frames)
            else:
                slot.queue.clear()
            self._wake()

    # ---- the stepping loop ---------------------------------------------------------------------

    def _wake(self) -> None:
        """Under the lock: something changed that the stepping thread must see."""
        self._waiting_on_clock = False
        self._cond.notify()

    def _has_work(self) -> bool:
        return any(slot.stream is not None and (slot.queue or slot.closing) for slot in self._slots)

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as e:  # noqa: BLE001 - the stepping thread must never end silently
            logger.exception("engine thread crashed")
            self._break(f"the engine thread crashed: {type(e).__name__}: {e}")

    def _serve(self) -> None:
        # Steps as soon as a slot has a frame, after the frame clock's wait for the live frames due
        # with it (`_gather`): one step per 80 ms for every speaker; audio pushed in bulk (a slot
        # catching up, files) steps at full speed. A blind gather window (wait for more slots'
        # frames) gave fewer steps but later captions; the shared clock gives both (README,
        # `captions bench clock`).
        while True:
            if self.broken is not None:
                self._end_every_stream()
            with self._cond:
                while not self._stopped and not self._has_work():
                    self._cond.wait()
                self._gather()
                if self._stopped:
                    return
                finished = [s for s in self._slots if s.stream is not None and s.closing and not s.queue]
                batch = [(s, s.queue.popleft()) for s in self._slots if s.stream is not None and s.queue]
                reset = np.array([s.fresh for s in self._slots])
                for slot, _ in batch:
                    slot.fresh = False
                self._busy = bool(batch or finished)
            for slot in finished:
                self._finish(slot)
            if batch:
                self._step(batch, reset)
            with self._cond:
                self._busy = False

    def _gather(self) -> None:
        """Waits (lock released) as long as the frame clock says, for the frames due with this step."""
        started = _now()
        while not self._stopped and (wait := self.clock.wait_s(self._slots, _now(), started)) is not None:
            self._waiting_on_clock = True
            self._cond.wait(wait)
            self._waiting_on_clock = False

    def _run_model(self, batch: list[tuple[_Slot, np.ndarray | None]], reset: np.ndarray):
        """One model step for the slots in `batch`; returns (tokens, pause probs, timings)."""
        torch = self._torch
        started = time.perf_counter()
        execute = np.zeros(self.batch_size, dtype=bool)
        self._input.fill(0.0)
        for slot, frame in batch:
            execute[slot.index] = True
            if frame is not _SILENCE:
                self._input[slot.index, 0] = frame
        mimi, device = self.model.mimi, self.model.device
        with torch.no_grad():
            reset_mask = torch.from_numpy(reset & execute)
            if reset_mask.any():
                mimi.reset_streaming(reset_mask)
                self._lm_gen.reset_streaming(reset_mask)
            exec_mask = torch.from_numpy(execute).to(device)
            mimi.set_exec_mask(exec_mask)
            self._lm_gen.set_exec_mask(exec_mask)
            audio = torch.from_numpy(self._input).to(device, non_blocking=True)
            prepared = time.perf_counter()
            codes = mimi.encode(audio)
            if self.profile and device.type == "cuda":
                torch.cuda.synchronize()
            encoded = time.perf_counter()
            if self.has_vad:
                tokens, heads = self._lm_gen.step_with_extra_heads(codes)
                pause = heads[PAUSE_HEAD][:, 0, 0].float()
            else:
                tokens = self._lm_gen.step(codes)
                pause = torch.zeros(self.batch_size, device=device)
            # The one device-to-host copy of the step: every slot's token and pause probability.
            out = torch.stack([tokens[:, 0, 0].float(), pause]).cpu().numpy()
        stepped = time.perf_counter()
        timings = StepTimings(len(batch), encode_s=encoded - prepared, lm_s=stepped - encoded,
                              host_s=prepared - started, total_s=stepped - started)
        return out[0].astype(np.int64), out[1], timings

    def _step(self, batch: list[tuple[_Slot, np.ndarray | None]], reset: np.ndarray) -> None:
        step_started = time.time()  # wall clock, for latency diagnostics (room.py's timing attributes)
        self.watchdog.started = time.monotonic()
        try:
            tokens, pause, timings = self._run_model(batch, reset)
        except Exception as e:  # noqa: BLE001 - e.g. CUDA OOM: end the affected streams, keep serving
            if self._step_returned():
                return  # the watchdog gave up on this step: its streams have ended
            self.failed_steps += 1
            self._failed_in_a_row += 1
            logger.exception("engine step failed for %d streams", len(batch))
            if self.model.device.type == "cuda":
                with contextlib.suppress(Exception):  # a broken device fails here too
                    self._torch.cuda.empty_cache()
            for slot, _ in batch:
                self._finish(slot, error=f"transcription failed: {type(e).__name__}: {e}")
            cause = f"{type(e).__name__}: {e}"
            if any(marker.lower() in str(e).lower() for marker in STICKY_DEVICE_ERRORS):
                self._break(cause)
            elif self._failed_in_a_row >= BROKEN_AFTER_FAILED_STEPS:
                self._break(f"{self._failed_in_a_row} steps in a row failed, the last with {cause}")
            return
        if self._step_returned():
            return  # the watchdog gave up on this step: its streams have ended, their slots are free
        self._failed_in_a_row = 0
        decoded = time.perf_counter()
        events = []
        for slot, frame in batch:
            token = int(tokens[slot.index])
            # -2: moshi's "not generated yet" (the model's own delay after a reset): no text.
            words = slot.decoder.push(token) if token >= 0 else []
            if frame is not _SILENCE:
                slot.audio_frames += 1
            pause_prob = float(pause[slot.index]) if self.has_vad else None
            events.append((slot.on_event, StreamEvent(slot.stream.id, slot.audio_frames, words,
                                                      slot.decoder.partial, pause_prob, max(token, -1),
                                                      lead_samples=slot.stream.lead_samples)))
        step_ended = time.time()
        for on_event, event in events:
            event.step_started, event.step_ended = step_started, step_ended
            self._deliver(on_event, event)
        timings.host_s += time.perf_counter() - decoded
        timings.total_s += time.perf_counter() - decoded
        self.steps += 1
        for listener in self.step_listeners:
            listener(timings)

    def _step_returned(self) -> bool:
        """Marks the step done, under the lock the watchdog breaks under; True if it already broke."""
        with self._cond:
            self.watchdog.started = None
            return self.broken is not None

    def _break(self, cause: str, unless: Callable[[], bool] | None = None) -> bool:
        """The engine failed for good (module notes): said once, then every stream ends. `unless`:
        checked under the lock, where `_step` clears a returning step. True if this call broke it."""
        with self._cond:
            if self.broken is not None or (unless is not None and unless()):
                return False
            self.broken = cause
            self._wake()
        logger.error("engine failed: %s; exiting so the orchestrator replaces this worker", cause)
        for listener in self.broken_listeners:
            try:
                listener(cause)
            except Exception:  # noqa: BLE001 - the others are still told
                logger.exception("engine-broken listener failed")
        self._end_every_stream()
        return True

    def _end_every_stream(self) -> None:
        """A broken engine: each open stream ends with the cause (its slot is freed)."""
        with self._cond:
            slots = [slot for slot in self._slots if slot.stream is not None]
        for slot in slots:
            self._finish(slot, error=f"engine failed: {self.broken}")

    def _deliver(self, on_event: EventCallback, event: StreamEvent) -> None:
        try:
            on_event(event)
        except Exception:  # noqa: BLE001 - a caller's bug must not stop every other stream
            logger.exception("stream %d: event handler failed", event.stream_id)

    def _finish(self, slot: _Slot, error: str | None = None) -> None:
        """Emits the stream's last words and `ended`, then frees the slot; once, whoever calls it
        (the stepping thread and a watchdog breaking the engine may both)."""
        with self._cond:
            stream, on_event, decoder = slot.stream, slot.on_event, slot.decoder
            if stream is None:
                return
            slot.stream, slot.on_event, slot.decoder, slot.buffer = None, None, None, None
            slot.queue.clear()
        words = decoder.finish() if slot.flush and error is None else []
        self._deliver(on_event, StreamEvent(stream.id, slot.audio_frames, words, "", None, ended=True, error=error,
                                            lead_samples=stream.lead_samples))
        for listener in self._slot_freed_listeners:
            try:
                listener()
            except Exception:  # noqa: BLE001 - same: the engine thread keeps serving
                logger.exception("slot-freed listener failed")
