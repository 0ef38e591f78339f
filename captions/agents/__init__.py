"""Kyutai STT inside any LiveKit Agents voice agent: the batched engine as a `livekit.agents.stt.STT`.

    from captions.agents import KyutaiSTT
    session = AgentSession(stt=KyutaiSTT(), vad=None, turn_handling={"turn_detection": "stt"}, ...)

Every `KyutaiSTT` and every stream of a process share one engine per (model, device, batch size):
one model, B slots, every session's audio advanced in the same batched step (engine.py). A stream
takes a slot through the fair queue the captions use (slots.py). While it waits, the audio pushed
to it is kept (up to `max_wait_audio_s`) and fed once it has a slot; a wait longer than
`conn_options.timeout` raises a retryable `APIConnectionError`, livekit-agents' own retry
convention, and the stream keeps its place in line for the retry.

Events, from the caption segmenter (segmenter.py), so that captions and agents cut speech alike:

* START_OF_SPEECH before the first interim after a pause;
* INTERIM_TRANSCRIPT: the open segment's full text, the word being written included;
* FINAL_TRANSCRIPT when a segment closes (a pause, the readable maximum, a flush, the end), with
  its words' times in seconds of the caller's audio plus `start_time_offset`;
* END_OF_SPEECH at a pause (VAD heads, or the silence rule), a flush, or the end of input;
* RECOGNITION_USAGE: the audio recognised since the previous one, after each final and at the end.

A flush ends the current segment with a final. The model writes a word about its text delay after
hearing it, so the flush feeds that much silence; the last word's end is only known after a
second of padding following its start (words.py), so while a word is still being written a little
more silence follows, one frame at a time. Then the open segment closes. The silence exists only
for the model: a `Timeline` takes it out of the times reported.

Threads: the slot grant (slot queue thread) and engine events (engine thread) hop to the stream's
event loop with `call_soon_threadsafe`; everything else runs on that loop. The caption worker does
not import this module.
"""

from __future__ import annotations

from captions.agents.engines import SharedEngine, close_shared_engines, shared_engine
from captions.agents.stream import KyutaiRecognizeStream
from captions.agents.stt import KyutaiSTT

__all__ = ["KyutaiRecognizeStream", "KyutaiSTT", "SharedEngine", "close_shared_engines", "shared_engine"]
