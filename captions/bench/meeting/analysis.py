"""The figures of one run of `captions bench meeting` (the package notes say what each means)."""

from __future__ import annotations

import itertools
import queue
import threading
import time

import numpy as np

from captions.bench.common import BenchError, summarize_ms
from captions.bench.meeting.live import CAUGHT_UP_LAG_S, LiveRun, TurnLog, room_name
from captions.bench.meeting.scenario import MeetingPlan, Utterance
from captions.stt.api import SAMPLE_RATE

EXTRA_TARGET_S = 0.3
"""A meeting is served when nothing is lost and the p95 extra first-word latency is at most this."""
LATENCY_CLASSES = ("held", "acquired", "waited")




# ---- references: the same audio through the engine, offline ----------------------------------------

def transcribe_all(engine, audios: list[np.ndarray]) -> list[list]:
    """`transcribe_audio` for every clip, B at a time (one thread per slot), bounded in time."""
    from captions.stt.transcribe import transcribe_audio

    results: list = [None] * len(audios)
    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in sorted(range(len(audios)), key=lambda i: -audios[i].size):
        jobs.put(i)
    errors: list[BaseException] = []

    def work() -> None:
        while not errors:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = transcribe_audio(engine, audios[i])
            except Exception as e:  # noqa: BLE001 - reported below, as the benchmark's error
                errors.append(e)

    threads = [threading.Thread(target=work, name=f"meeting-reference-{k}", daemon=True)
               for k in range(min(engine.batch_size, len(audios)))]
    for thread in threads:
        thread.start()
    audio_s = sum(a.size for a in audios) / SAMPLE_RATE
    deadline = time.monotonic() + 120 + 4 * audio_s / engine.batch_size
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        raise BenchError(f"a reference transcription failed: {errors[0]}")
    if any(thread.is_alive() for thread in threads):
        raise BenchError(f"the reference transcriptions ({audio_s:.0f} s of audio) did not finish in time")
    return results


def stream_audio(log: TurnLog) -> np.ndarray:
    """Exactly what the engine stream got: its lead silence, then everything pushed."""
    pcm = np.concatenate([pcm for _, pcm in log.parts])
    return np.concatenate([np.zeros(log.lead, np.float32), pcm.astype(np.float32) / 32768.0])


def _signal_index(log: TurnLog, seconds: float, kept_start: int) -> int:
    """Signal sample of `seconds` into a stream's reference audio (lead included)."""
    sample = seconds * SAMPLE_RATE - log.lead
    turn_sample = 0
    for index, pcm in log.parts:
        if sample < turn_sample + pcm.size:
            return kept_start + index + int(max(0.0, sample - turn_sample))
        turn_sample += pcm.size
    index, pcm = log.parts[-1]
    return kept_start + index + pcm.size


def edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
    return row[-1]


# ---- the figures of one run ---------------------------------------------------------------------------

def _coverage(plan: MeetingPlan, run: LiveRun, logs: list[TurnLog]) -> tuple[dict, list[bool]]:
    """Every utterance inside pushed audio; pushed audio equal to the signal; nothing pushed twice."""
    pushed: dict[int, list[tuple[int, int]]] = {}
    mismatched = duplicated = 0
    for log in logs:
        mic = run.microphones[log.participant]
        last_end = None
        for index, pcm in log.parts:
            start = mic.kept_start + index
            mismatched += int(np.count_nonzero(mic.sample(start, pcm.size) != pcm))
            if last_end is not None and start < last_end:
                duplicated += last_end - start
            last_end = start + pcm.size
            pushed.setdefault(log.participant, []).append((start, start + pcm.size))
    merged = {p: _merge(spans) for p, spans in pushed.items()}
    covered = [any(s <= u.onset and u.end <= e for s, e in merged.get(u.participant, [])) for u in plan.utterances]
    speech = sum(u.end - u.onset for u in plan.utterances)
    inside = sum(_overlap(merged.get(u.participant, []), u.onset, u.end) for u in plan.utterances)
    return {"utterances": len(plan.utterances), "utterances_covered": sum(covered),
            "speech_s": round(speech / SAMPLE_RATE, 2),
            "speech_share_pushed": round(inside / speech, 6) if speech else None,
            "samples_pushed": sum(pcm.size for log in logs for _, pcm in log.parts),
            "samples_not_equal_to_signal": mismatched, "samples_pushed_twice": duplicated}, covered


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def _overlap(spans: list[tuple[int, int]], start: int, end: int) -> int:
    return sum(max(0, min(e, end) - max(s, start)) for s, e in spans)


def _final_words(log: TurnLog) -> list[str]:
    return [text for caption in log.captions if caption.final for text, _, _ in caption.words]


def _words(logs: list[TurnLog], references: list[list]) -> dict:
    said = [[w.text for w in words] for words in references]
    captioned = [_final_words(log) for log in logs]
    equal = sum(a == b for a, b in zip(said, captioned))
    return {"streams": len(logs), "streams_equal": equal, "said": sum(map(len, said)),
            "captioned": sum(map(len, captioned)),
            "errors": sum(edit_distance(a, b) for a, b in zip(said, captioned)),
            "stream_errors": sum(log.error is not None for log in logs)}


def _wall(run: LiveRun, participant: int, sample: int) -> float:
    """Capture time of signal sample `sample` as the participant's track reckons it."""
    track = run.speakers[participant].track
    return track.capture_time(sample - run.microphones[participant].kept_start)


def _classify(u: Utterance, onset_wall: float, logs: list[TurnLog], run: LiveRun) -> tuple[str, TurnLog | None]:
    """held / acquired / waited by the turn whose pushed audio holds the onset; missed: none does."""
    kept_start = run.microphones[u.participant].kept_start
    for log in logs:
        if log.participant == u.participant and any(
                kept_start + i <= u.onset < kept_start + i + pcm.size for i, pcm in log.parts):
            break
    else:
        return "missed", None
    if log.begun_at <= onset_wall:  # the turn was open before this utterance began
        held = log.granted_at is not None and log.granted_at <= onset_wall
        return ("held" if held else "waited"), log
    return ("acquired" if log.immediate else "waited"), log


def _first_word_latency(u: Utterance, run: LiveRun, logs: list[TurnLog], pre_roll: float) -> float | None:
    """First caption carrying a word that starts in [onset - pre-roll, end], less that word's end."""
    low = _wall(run, u.participant, u.onset) - pre_roll
    high = _wall(run, u.participant, u.end)
    captions = sorted((c for log in logs if log.participant == u.participant for c in log.captions),
                      key=lambda c: c.arrival)
    for caption in captions:
        inside = [(start, end) for _, start, end in caption.words if low <= start <= high]
        if inside:
            return caption.arrival - min(inside)[1]
    return None


def _utterances(plan: MeetingPlan, run: LiveRun, logs: list[TurnLog], covered: list[bool], pre_roll: float) -> list[dict]:
    rows = []
    for u, is_covered in zip(plan.utterances, covered):
        onset_wall = _wall(run, u.participant, u.onset)
        kind, log = _classify(u, onset_wall, logs, run)
        latency = _first_word_latency(u, run, logs, pre_roll)
        row = {"participant": u.participant, "kind": u.kind, "onset_s": round(u.onset / SAMPLE_RATE, 3),
               "end_s": round(u.end / SAMPLE_RATE, 3), "class": kind, "covered": is_covered,
               "first_word_latency_ms": None if latency is None else round(latency * 1000, 1)}
        if kind in ("acquired", "waited") and log is not None and log.begun_at > onset_wall:
            row["split_ms"] = _split(log, onset_wall)
        rows.append(row)
    return rows


def _split(log: TurnLog, onset_wall: float) -> dict:
    """Where a new turn's time went: voice onset -> turn requested -> slot -> first push."""
    ms = lambda a, b: None if a is None or b is None else round((b - a) * 1000, 1)  # noqa: E731
    return {"onset_to_request": ms(onset_wall, log.begun_at), "request_to_slot": ms(log.begun_at, log.granted_at),
            "slot_to_first_push": ms(log.granted_at, log.first_push_at),
            "onset_to_caught_up": ms(onset_wall, log.caught_up_at),
            "first_push_s": round(log.first_push_samples / SAMPLE_RATE, 3)}


def _latencies(rows: list[dict]) -> dict:
    by_class = {kind: [r["first_word_latency_ms"] / 1000 for r in rows
                       if r["class"] == kind and r["first_word_latency_ms"] is not None] for kind in LATENCY_CLASSES}
    summary = {kind: summarize_ms(values) for kind, values in by_class.items()}
    taken = summarize_ms(by_class["acquired"] + by_class["waited"])
    held = summary["held"]["p95"]
    summary["taken"] = taken
    summary["extra_p95_ms"] = None if held is None or taken["p95"] is None else round(taken["p95"] - held, 1)
    p50 = summary["held"]["p50"]
    summary["extra_p50_ms"] = None if p50 is None or taken["p50"] is None else round(taken["p50"] - p50, 1)
    summary["without_word"] = sum(r["first_word_latency_ms"] is None for r in rows)
    splits = [r["split_ms"] for r in rows if "split_ms" in r]
    summary["new_turn_split_ms"] = {key: summarize_ms([s[key] / 1000 for s in splits if s[key] is not None])
                                    for key in ("onset_to_request", "request_to_slot", "slot_to_first_push",
                                                "onset_to_caught_up")}
    return summary


def _occupancy(run: LiveRun, batch_size: int, seconds: float) -> dict:
    inside = [(used, waiting) for t, used, waiting in run.occupancy if 0 <= t <= seconds]
    used = np.array([u for u, _ in inside] or [0])
    waiting = np.array([w for _, w in inside] or [0])
    return {"mean": round(float(used.mean()), 3), "max": int(used.max()),
            "all_busy_share": round(float(np.mean(used >= batch_size)), 4),
            "queue_max": int(waiting.max()), "queue_nonempty_share": round(float(np.mean(waiting > 0)), 4)}


def _waits(logs: list[TurnLog]) -> dict:
    waits = [log.granted_at - log.begun_at for log in logs if not log.immediate and log.granted_at is not None]
    summary = summarize_ms(waits)
    summary["max"] = round(max(waits) * 1000, 1) if waits else None
    return summary


def _steps(run: LiveRun, seconds: float, logs: list[TurnLog]) -> dict:
    inside = [(active, total) for t, active, total in run.steps if t - run.origin <= seconds]
    live = []  # the engine's lag behind live audio once each stream has caught up
    for log in logs:
        first = next((i for i, lag in enumerate(log.lags) if lag <= CAUGHT_UP_LAG_S), len(log.lags))
        live += log.lags[first:]
    return {"steps": len(inside), "per_s": round(len(inside) / seconds, 2),
            "streams_per_step": round(float(np.mean([a for a, _ in inside])), 2) if inside else None,
            "step_ms": summarize_ms([total for _, total in inside]), "live_lag_ms": summarize_ms(live)}


def _context_cost(engine, plan: MeetingPlan, run: LiveRun, logs: list[TurnLog], references: list[list],
                  signals: list[np.ndarray], meaningful: bool) -> dict:
    """Each later turn's own words against the words of its span in one held slot (whole signal)."""
    later: dict[int, list[int]] = {}
    for i, log in enumerate(logs):
        later.setdefault(log.participant, []).append(i)
    people = sorted(p for p, turns in later.items() if len(turns) > 1)
    wholes = transcribe_all(engine, [signals[p].astype(np.float32) / 32768.0 for p in people])
    compared = agree = errors = words = 0
    for p, whole in zip(people, wholes):
        kept_start = run.microphones[p].kept_start
        for i in later[p][1:]:
            log, own = logs[i], [w.text for w in references[i]]
            first, last = _signal_index(log, 0.0, kept_start), _signal_index(log, 1e9, kept_start)
            held = [w.text for w in whole if first <= w.start * SAMPLE_RATE < last]
            compared += 1
            agree += bool(own and held and own[0] == held[0]) or (not own and not held)
            errors += edit_distance(own, held)
            words += len(held)
    return {"meaningful": meaningful,
            "note": None if meaningful else "tiny test checkpoint (random weights): these figures mean nothing",
            "turns_compared": compared, "first_word_agreement": round(agree / compared, 4) if compared else None,
            "word_errors": errors, "held_slot_words": words,
            "error_rate": round(errors / words, 4) if words else None}


def analyse(engine, plan: MeetingPlan, signals: list[np.ndarray], run: LiveRun, options, batch_size: int,
            seconds: float, overflow_frames: float, meaningful: bool) -> dict:
    """Every figure of one meeting (the module notes say what each means)."""
    logs = [log for speaker in run.speakers for log in speaker.logs.values() if log.parts]
    references = transcribe_all(engine, [stream_audio(log) for log in logs])
    coverage, covered = _coverage(plan, run, logs)
    rows = _utterances(plan, run, logs, covered, options.pre_roll_s)
    words = _words(logs, references)
    latency = _latencies(rows)
    spoke = sorted({u.participant for u in plan.utterances})
    captioned = sorted({log.participant for log in logs if _final_words(log)})
    lossless = (coverage["utterances_covered"] == coverage["utterances"] and words["streams_equal"] == words["streams"]
                and coverage["samples_not_equal_to_signal"] == 0 and coverage["samples_pushed_twice"] == 0
                and overflow_frames == 0 and words["stream_errors"] == 0)
    extra = latency["extra_p95_ms"]
    return {
        "participants": plan.participants, "batch_size": batch_size,
        "participants_silent": len(plan.silent), "participants_with_speech": len(spoke),
        "participants_captioned": len(captioned), "coverage": coverage, "words": words,
        "frames_dropped_waiting_overflow": int(overflow_frames),
        "slots": _occupancy(run, batch_size, seconds), "waits_ms": _waits(logs), "engine": _steps(run, seconds, logs),
        "first_word_latency_ms": latency,
        "context_cost": _context_cost(engine, plan, run, logs, references, signals, meaningful),
        "lossless": lossless, "serves": lossless and extra is not None and extra <= EXTRA_TARGET_S * 1000,
        "utterances": rows,
        "turns": [_turn_row(log, run) for log in logs],
        "occupancy": [[t, used, waiting] for t, used, waiting in run.occupancy],
        "rooms": _rooms(plan, run, logs, references, seconds),
    }


def _turn_row(log: TurnLog, run: LiveRun) -> dict:
    at = lambda t: None if t is None else round(t - run.origin, 3)  # noqa: E731
    return {"participant": log.participant, "stream": log.stream_id, "begun_s": at(log.begun_at),
            "granted_s": at(log.granted_at), "closed_s": at(log.closed_at), "ended_s": at(log.ended_at),
            "immediate": log.immediate, "lead": log.lead, "continues": log.continues,
            "pushed_s": round(sum(pcm.size for _, pcm in log.parts) / SAMPLE_RATE, 3),
            "caption_arrivals_s": [at(c.arrival) for c in log.captions]}


# ---- per room: fair shares -----------------------------------------------------------------------------

def _rooms(plan: MeetingPlan, run: LiveRun, logs: list[TurnLog], references: list[list], seconds: float) -> list[dict]:
    """Per room: nothing lost (coverage and words, as for the whole run), captions kept flowing (the
    longest stretch of the room's speech during which no caption of the room arrived), waits,
    yields and slots held."""
    rows = []
    for room in range(plan.room_count):
        people = [p for p in range(plan.participants) if plan.room_of(p) == room]
        mine = [i for i, log in enumerate(logs) if plan.room_of(log.participant) == room]
        room_logs = [logs[i] for i in mine]
        said = [u for u in plan.utterances if plan.room_of(u.participant) == room]
        coverage, _ = _coverage(MeetingPlan(len(people), plan.samples, said, []), run, room_logs)
        words = _words(room_logs, [references[i] for i in mine])
        speech = [(_wall(run, u.participant, u.onset), min(_wall(run, u.participant, u.end), run.stopped_at))
                  for u in said]
        arrivals = sorted(c.arrival for log in room_logs for c in log.captions)
        gap, gap_at = longest_gap(speech, arrivals, run.origin, run.stopped_at)
        waits = [log.granted_at - log.begun_at for log in room_logs if not log.immediate and log.granted_at is not None]
        name = room_name(room) if plan.room_count > 1 else "meeting"
        held = [h.get(name, 0) for t, h in run.holders if 0 <= t <= seconds]
        rows.append({
            "room": room, "participants": len(people), "talkers": len({u.participant for u in said}),
            "nonstop": sum(p in plan.nonstop for p in people),
            "utterances": coverage["utterances"], "utterances_covered": coverage["utterances_covered"],
            "samples_not_equal_to_signal": coverage["samples_not_equal_to_signal"],
            "samples_pushed_twice": coverage["samples_pushed_twice"],
            "streams": words["streams"], "streams_equal": words["streams_equal"],
            "words_said": words["said"], "words_captioned": words["captioned"],
            "longest_caption_gap_s": None if gap is None else round(gap, 2),
            "longest_caption_gap_from_s": None if gap_at is None else round(gap_at - run.origin, 2),
            "waits": len(waits), "wait_max_s": round(max(waits), 2) if waits else None,
            "yields": sum(log.continues for log in room_logs),
            "slots_held_mean": round(float(np.mean(held)), 3) if held else 0.0,
            "lossless": (coverage["utterances_covered"] == coverage["utterances"]
                         and words["streams_equal"] == words["streams"] and words["stream_errors"] == 0
                         and coverage["samples_not_equal_to_signal"] == 0 and coverage["samples_pushed_twice"] == 0),
        })
    return rows


def longest_gap(speech: list[tuple[float, float]], arrivals: list[float], start: float,
                end: float) -> tuple[float | None, float | None]:
    """The most speech (seconds, overlapping stretches counted once) between two captions in a row
    (or the start and the first, the last and the end), and where that stretch began; None
    without speech."""
    merged = _merge([(a, b) for a, b in speech if b > a])
    if not merged:
        return None, None
    bounds = [start, *[t for t in arrivals if start < t < end], end]
    best, best_at = 0.0, start
    for a, b in itertools.pairwise(bounds):
        inside = _overlap(merged, a, b)
        if inside > best:
            best, best_at = inside, a
    return best, best_at


