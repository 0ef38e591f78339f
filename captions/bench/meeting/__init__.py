"""`captions bench meeting`: how many people B engine slots caption in a meeting, with nothing lost.

A seeded meeting (`plan_meeting`): one main speaker at a time (a few participants dominate), 1-3
sentences per turn with short pauses, back-channels ("yes", "mm hmm") from listeners, some overlap
between speakers, occasional long silences, and participants who never speak. Speech is espeak-ng,
synthesised once into the cache directory; each participant's signal is a low noise floor plus
their clips, and the schedule (who, onset, end, kind) is the ground truth.

The meeting runs in this process, in real time, through the product's own room code: one
`Speaker` (captions/live/speaker.py: Silero VAD, turns, the slot queue, kept audio, the live
splice) per simulated microphone (captions/dev/microphones.py) on one 10 ms clock, and the real
engine with B slots. Not through a real livekit-server: 16-24 WebRTC bots need more CPU than the
machines this runs on (bots, server and worker would share two cores, and the figures would be the
bots' load), and the WebRTC path is covered by the end-to-end tests and `captions bench ingest`.

What each engine stream got is recorded exactly (the benchmark's Speaker subclass wraps `_push`),
so that after the meeting:

- speech coverage: every scheduled utterance's samples are inside audio pushed to the engine, and
  that audio equals the participant's signal sample for sample;
- words said vs words captioned: for each engine stream, the words of its audio (its lead silence
  and everything pushed) run alone through the engine (`transcribe_audio`) against the words of
  its final captions; equal while no wait exceeds `max_wait_s`;
- first-word latency per utterance: from the end of its first captioned word (capture time) to the
  first caption carrying it, by how its turn got a slot: held (the speaker's turn was open at the
  onset), acquired (a new turn, slot at once) or waited (queued);
- context cost: a turn starts without the context of the speaker's earlier turns; its words
  against the same span when the participant's whole signal runs in one held slot. With the tiny
  test checkpoint (random weights) these figures mean nothing; use --model kyutai/stt-1b-en_fr.

Several rooms at once (`--rooms`, each a seeded meeting of `--participants` people, one room host
each on the one slot queue), with people in room 0 who never stop talking (`--nonstop`), show the
slot queue's fair shares (captions/live/slots.py): per room, the same coverage and words, the
longest stretch of the room's speech without a caption arriving, waits, yields and slots held.
`--unfair` runs the queue as it was before (first come first served, no yields) for comparison.

The parts: scenario.py (who says what, when), live.py (the run through the product's speakers),
analysis.py (the figures), report.py (the command, its table and plot).
"""

from __future__ import annotations

from captions.bench.meeting.report import configure_parser, run
from captions.bench.meeting.scenario import END_MARGIN_S, START_S, MeetingPlan, Utterance, plan_meeting

__all__ = ["END_MARGIN_S", "START_S", "MeetingPlan", "Utterance", "configure_parser", "plan_meeting", "run"]
