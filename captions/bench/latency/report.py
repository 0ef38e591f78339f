"""The figures of `captions bench latency`: per word update, its latency and its split; per run,
the summary, the target's verdict, the README table and the plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from captions.bench.common import save_figure, summarize_ms
from captions.bench.latency.speakers import TICK_SAMPLES
from captions.stt.api import FRAME_SIZE, SAMPLE_RATE

if TYPE_CHECKING:
    from captions.bench.latency.alignment import Alignment
    from captions.bench.latency.session import Session

COMPONENTS = ("transport", "queue", "step", "agent", "delivery")
AGENT_PARTS = ("agent_hop", "agent_publish_queue")
TARGET_SPEAKERS = 8
TARGET_P95_MS = 150.0


# ---- analysis -------------------------------------------------------------------------------------

def word_updates(captions: list) -> list:
    """The caption updates that add a word: more words than the segment's previous update
    (the first update of a segment counts when it has text)."""
    counts: dict[str, int] = {}
    added = []
    for caption in sorted(captions, key=lambda c: c.order):
        words = len(caption.text.split())
        if words > counts.get(caption.segment_id, 0):
            added.append(caption)
        counts[caption.segment_id] = max(words, counts.get(caption.segment_id, 0))
    return added


def is_translation(caption) -> bool:
    from captions.protocol import ATTR_TRANSLATED

    return caption.attributes.get(ATTR_TRANSLATED) == "true"


def originals(captions: list) -> list:
    """The speakers' own captions (what the latency figures are about), without their translations."""
    return [c for c in captions if not is_translation(c)]


def latency_records(session: Session, alignments: dict[str, Alignment]) -> tuple[list[dict], dict]:
    """One record of seconds per word-adding update of an original caption, and counts of what could
    not be used."""
    from captions.bench.latency.alignment import Alignment
    from captions.live.timing import ATTR_TIMING

    records, skipped = [], {"no_timing": 0, "unknown_speaker": 0, "no_receive_time": 0, "no_onset": 0}
    for caption in word_updates(originals(session.captions)):
        if caption.sender not in session.voices:
            skipped["unknown_speaker"] += 1
            continue
        raw = caption.attributes.get(ATTR_TIMING)
        if raw is None:
            skipped["no_timing"] += 1
            continue
        timing = json.loads(raw)
        if timing.get("frame_received") is None:
            skipped["no_receive_time"] += 1
            continue
        if timing.get("onset_sample") is None:
            skipped["no_onset"] += 1
            continue
        _, clip_onset = session.voices[caption.sender]
        alignment = alignments.get(caption.sender) or Alignment.from_onset(timing["onset_sample"], clip_onset)
        # The end of frame k, on the publisher's microphone timeline.
        stream_end = (timing["frame"] + 1) * FRAME_SIZE - timing.get("lead_samples", 0)
        captured = captured_at(session, caption.sender, alignment.clip_index(stream_end))
        records.append({
            "speaker": caption.sender,
            "final": caption.final,
            "total": caption.received_at - captured,
            "transport": timing["frame_received"] - captured,
            "queue": timing["step_started"] - timing["frame_received"],
            "step": timing["step_ended"] - timing["step_started"],
            "agent": timing["published"] - timing["step_ended"],
            "agent_hop": timing["event_handled"] - timing["step_ended"],
            "agent_publish_queue": timing["published"] - timing["event_handled"],
            "delivery": caption.received_at - timing["published"],
            "onset_sample": timing["onset_sample"],
        })
    return records, skipped


def captured_at(session: Session, identity: str, clip_end: int) -> float:
    """When the clip's samples before `clip_end` had all been captured: the moment the bot handed
    the 20 ms holding the last of them to WebRTC. That is its schedule (a microphone delivers 20 ms
    once recorded), or later when the bot was late: the bot's own lateness is not the pipeline's,
    and is reported apart."""
    tick = (clip_end - 1) // TICK_SAMPLES
    handed = session.handed_at[identity]
    if 0 <= tick < len(handed):
        return handed[tick]
    return session.speech_started_at[identity] + clip_end / SAMPLE_RATE


def summarize_run(session: Session, records: list[dict], skipped: dict, alignment: dict) -> dict:
    keys = ("total", *COMPONENTS, *AGENT_PARTS)
    latency = {key: summarize_ms([r[key] for r in records]) for key in keys}
    component_sum = sum(latency[key]["mean"] or 0.0 for key in COMPONENTS)
    received = originals(session.captions)
    return {
        "speakers": session.speakers,
        "translation": translation_summary(session) if session.reading else None,
        "captions_received": len(received),
        "finals_received": sum(c.final for c in received),
        "word_updates": len(records),
        "skipped_updates": skipped,
        "speakers_captioned": len({r["speaker"] for r in records}),
        "latency_ms": latency,
        "components_mean_sum_ms": round(component_sum, 3),
        "publisher_lateness_ms": summarize_ms(session.lateness),
        "alignment": alignment,
        "cpu_cores_used": session.cpu_cores,
        "engine": session.engine,
        "load_average_before": session.load_before,
        "load_average_after": session.load_after,
        "samples_ms": {key: [round(r[key] * 1000, 2) for r in records] for key in ("total", *COMPONENTS)},
    }


def translation_summary(session: Session) -> dict:
    """Per language read: how each original final's translated final came (or did not), and its
    delay at the subscriber after its original (arrival - arrival)."""
    from captions.protocol import ATTR_LANGUAGE, ATTR_SOURCE_SEGMENT, ATTR_UNTRANSLATED

    finals = {c.segment_id: c for c in originals(session.captions) if c.final and c.text}
    translations = [c for c in session.captions if is_translation(c)]
    languages = {}
    for language in session.reading:
        mine = [c for c in translations if c.attributes.get(ATTR_LANGUAGE) == language]
        translated = {c.attributes.get(ATTR_SOURCE_SEGMENT): c for c in mine if c.final}
        matched = [(finals[source], c) for source, c in translated.items() if source in finals]
        delays = [c.received_at - original.received_at for original, c in matched]
        languages[language] = {
            "original_finals": len(finals),
            "translated_finals": len(matched),
            "untranslated_finals": sum(bool(c.attributes.get(ATTR_UNTRANSLATED)) for _, c in matched),
            "missing_finals": len(finals) - len(matched),
            "interims_received": sum(not c.final for c in mine),
            "final_delay_ms": summarize_ms(delays),
            "samples_ms": [round(d * 1000, 2) for d in delays],
        }
    return {"languages": list(session.reading), "per_language": languages,
            "worker_metrics": session.translation_metrics}


def translation_comparisons(runs: list[dict]) -> list[dict]:
    """Each measurement with translation on against the one without, same speakers, frames and round:
    the originals' latency per word both ways, and the translated finals' delay; with several
    rounds, also every round's samples together (round "all")."""
    def key(run: dict) -> tuple:
        return run["speakers"], run.get("frames", "shared"), run.get("round", 1)

    off = {key(run): run for run in runs if not run.get("translation")}
    pairs = [(off[key(run)], run) for run in runs if run.get("translation") and key(run) in off]
    comparisons = [_comparison(key(on)[2], [base], [on]) for base, on in pairs]
    groups: dict[tuple, list] = {}
    for base, on in pairs:
        groups.setdefault(key(on)[:2], []).append((base, on))
    for group in groups.values():
        if len(group) > 1:
            comparisons.append(_comparison("all", [base for base, _ in group], [on for _, on in group]))
    return comparisons


def _comparison(round_: int | str, bases: list[dict], ons: list[dict]) -> dict:
    def originals_ms(group: list[dict]) -> dict:
        if len(group) == 1:
            total = group[0]["latency_ms"]["total"]
            return {key: total[key] for key in ("count", "p50", "p95")}
        pooled = summarize_ms([v / 1000 for run in group for v in run["samples_ms"]["total"]])
        return {key: pooled[key] for key in ("count", "p50", "p95")}

    before, after = originals_ms(bases), originals_ms(ons)
    stats = [s for run in ons for s in run["translation"]["per_language"].values()]
    delays = [d for s in stats for d in s["samples_ms"]]
    return {
        "speakers": ons[0]["speakers"], "frames": ons[0].get("frames", "shared"), "round": round_,
        "languages": ons[0]["translation"]["languages"],
        "originals_off_ms": before, "originals_on_ms": after,
        "originals_change_ms": {key: _difference(after[key], before[key]) for key in ("p50", "p95")},
        "alignment_reliable": all(run["alignment"]["reliable"] for run in (*bases, *ons)),
        "translated_final_delay_ms": summarize_ms([d / 1000 for d in delays]),
        "translated_finals": sum(s["translated_finals"] for s in stats),
        "untranslated_finals": sum(s["untranslated_finals"] for s in stats),
        "missing_finals": sum(s["missing_finals"] for s in stats),
    }


def _difference(a: float | None, b: float | None) -> float | None:
    return round(a - b, 3) if a is not None and b is not None else None


def model_text_delay_s(checkpoint: Path) -> float | None:
    """The checkpoint's configured text delay (stt_config.audio_delay_seconds)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    delay = (config.get("stt_config") or {}).get("audio_delay_seconds")
    return float(delay) if delay is not None else None


def targets(runs: list[dict]) -> dict:
    by_n = {run["speakers"]: run for run in runs
            if run.get("frames", "shared") == "shared" and not run.get("translation")}
    run = by_n.get(TARGET_SPEAKERS)
    p95 = run["latency_ms"]["total"]["p95"] if run is not None else None
    # Without a reliable alignment the capture times are wrong: no verdict either way.
    valid = run is not None and run["alignment"]["reliable"]
    return {"p95_ms_at_8_speakers": p95, "alignment_reliable": run["alignment"]["reliable"] if run else None,
            "p95_at_8_speakers_at_most_150_ms": p95 <= TARGET_P95_MS if valid else None}


def markdown_table(report: dict) -> str:
    """The README table, generated from the JSON (figures are never typed in by hand); with
    translation measured too, its comparison after it."""
    lines = [("| speakers | frames | steps/s (speakers per step) | word updates | total p50 / p95 / p99 (ms) | "
              "transport | queue | step | agent | delivery | bots late p95 | alignment | CPU cores: worker / bots "
              "| load (1 min) before / after |"),
             "|---:|---|---|---:|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lat = run["latency_ms"]
        parts = " | ".join(f"{lat[key]['p50']:.1f} / {lat[key]['p95']:.1f}" for key in COMPONENTS)
        engine, cores = run.get("engine") or {}, run.get("cpu_cores_used") or {}
        lines.append(f"| {run['speakers']} | {_frames(run)} | "
                     f"{engine.get('steps_per_s') or 0:.1f} ({engine.get('streams_per_step') or 0:.1f}) | "
                     f"{run['word_updates']} | {lat['total']['p50']:.1f} / "
                     f"{lat['total']['p95']:.1f} / {lat['total']['p99']:.1f} | {parts} | "
                     f"{run['publisher_lateness_ms']['p95']:.1f} | "
                     f"{'ok' if run['alignment']['reliable'] else 'LOST'} | "
                     f"{cores.get('worker', float('nan')):.2f} / {cores.get('speaker_bots', float('nan')):.2f} | "
                     f"{run['load_average_before'][0]:.2f} / {run['load_average_after'][0]:.2f} |")
    lines.append("")
    lines.append("Components: p50 / p95 in ms (percentiles of the parts do not add up; their means do).")
    comparisons = report.get("translation_comparisons") or []
    if comparisons:
        lines += ["", "Original captions without and with translation (same run), and the translated finals:", "",
                  ("| speakers | frames | round | translated into | originals off: p50 / p95 (ms) | originals on: p50 / p95 "
                   "(ms) | change p50 / p95 (ms) | translated final after its original: p50 / p95 (ms) | "
                   "translated / untranslated / missing finals | alignment |"),
                  "|---:|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            off, on, change, delay = (c["originals_off_ms"], c["originals_on_ms"], c["originals_change_ms"],
                                      c["translated_final_delay_ms"])
            lines.append(f"| {c['speakers']} | {c['frames']} | {c.get('round', 1)} | {','.join(c['languages'])} | "
                         f"{_ms(off['p50'])} / {_ms(off['p95'])} | {_ms(on['p50'])} / {_ms(on['p95'])} | "
                         f"{_ms(change['p50'], True)} / {_ms(change['p95'], True)} | "
                         f"{_ms(delay['p50'])} / {_ms(delay['p95'])} | {c['translated_finals']} / "
                         f"{c['untranslated_finals']} / {c['missing_finals']} | "
                         f"{'ok' if c['alignment_reliable'] else 'LOST'} |")
    return "\n".join(lines)


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _frames(run: dict) -> str:
    translation = run.get("translation")
    frames = run.get("frames", "shared")
    return f"{frames}, translating into {','.join(translation['languages'])}" if translation else frames


def _label(run: dict) -> str:
    label = f"{run['speakers']} speakers, {run.get('frames', 'shared')} frames"
    translation = run.get("translation")
    if translation:
        label = f"{label}, into {','.join(translation['languages'])}"
    return f"{label} #{run['round']}" if run.get("round") else label


def _tick(run: dict) -> str:
    """The bar's label, one short line per part: speakers, frames, translation, round."""
    translation = run.get("translation")
    lines = [str(run["speakers"]), run.get("frames", "shared")]
    if translation:
        lines.append("+" + ",".join(translation["languages"]))
    if run.get("round"):
        lines.append(f"#{run['round']}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """The latency distribution per speaker count (CDF), and the mean split of each."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    runs = report["runs"]
    comparisons = report.get("translation_comparisons") or []
    if comparisons:
        fig, (cdf, bars, delays) = plt.subplots(1, 3, figsize=(18, 4.8))
    else:
        fig, (cdf, bars) = plt.subplots(1, 2, figsize=(12, 4.8))
    # A row whose alignment was lost has wrong capture times: drawn apart, never as a figure.
    valid = [run["alignment"]["reliable"] for run in runs]
    for run, ok in zip(runs, valid):
        values = np.sort(np.asarray(run["samples_ms"]["total"]))
        note = f"p95 {run['latency_ms']['total']['p95']:.0f} ms" if ok else "alignment LOST: not valid"
        cdf.plot(values, np.arange(1, values.size + 1) / values.size, label=f"{_label(run)} ({note})",
                 linestyle=(":" if not ok else "--" if run.get("translation") else "-"), alpha=1.0 if ok else 0.5)
    valid_values = [v for run, ok in zip(runs, valid) if ok for v in run["samples_ms"]["total"]]
    if valid_values and not all(valid):  # a lost alignment's wrong (even negative) figures set no scale
        cdf.set_xlim(0, max(*valid_values, TARGET_P95_MS) * 1.15)
    cdf.axvline(TARGET_P95_MS, color="grey", linestyle=":",
                label=f"target p95 at 8 speakers: {TARGET_P95_MS:.0f} ms")
    cdf.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    cdf.set_xlabel("caption latency per new word (ms): arrival - capture of the last frame consumed")
    cdf.set_ylabel("fraction of word updates")
    cdf.set_title("Latency distribution (CDF)")
    cdf.grid(True, alpha=0.3)
    cdf.legend(fontsize=8)
    positions = np.arange(len(runs))
    bottom = np.zeros(len(runs))
    for key in COMPONENTS:
        values = np.array([run["latency_ms"][key]["mean"] if ok else 0.0 for run, ok in zip(runs, valid)])
        bars.bar(positions, values, bottom=bottom, label=key)
        bottom += values
    for position, ok in zip(positions, valid):
        if not ok:
            bars.text(position, 0, "alignment\nLOST:\nnot valid", ha="center", va="bottom", fontsize=8)
    bars.set_xticks(positions, [_tick(run) for run in runs], fontsize=8 if len(runs) <= 4 else 7)
    bars.set_xlabel("speakers (engine batch size = speakers), frame clock")
    bars.set_ylabel("mean latency (ms)")
    bars.set_title("Where the time goes (means)")
    bars.legend(fontsize=8)
    if comparisons:
        for run in runs:
            if not run.get("translation"):
                continue
            values = np.sort(np.asarray([d for stats in run["translation"]["per_language"].values()
                                         for d in stats["samples_ms"]]))
            if values.size:
                delay = summarize_ms(list(values / 1000))
                delays.plot(values, np.arange(1, values.size + 1) / values.size,
                            label=f"{_label(run)} (p50 {delay['p50']:.0f}, p95 {delay['p95']:.0f} ms)")
        delays.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
        delays.set_xlabel("translated final's arrival - its original final's arrival (ms)")
        delays.set_ylabel("fraction of finals")
        delays.set_title("Translated finals after their originals (CDF)")
        delays.grid(True, alpha=0.3)
        delays.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"captions bench latency - {machine['cpu_model']}, {machine['cpu_cores']} cores, "
                 f"{machine['date'][:10]}; model text delay ({report['model_text_delay_s']} s) not included",
                 fontsize=10)
    save_figure(fig, path)


