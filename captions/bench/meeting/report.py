"""`captions bench meeting` as a command: its options, the runs, the report's table and plot."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path

import numpy as np

from captions.bench.common import (
    BenchError,
    add_output_options,
    add_test_checkpoint_options,
    finish_report,
    machine_description,
    positive_ints,
    resolve_test_checkpoint,
    save_figure,
)
from captions.bench.meeting.analysis import CAUGHT_UP_LAG_S, EXTRA_TARGET_S, LATENCY_CLASSES, analyse
from captions.bench.meeting.live import run_meeting
from captions.bench.meeting.scenario import ClipBank, meeting_signals, plan_rooms
from captions.config import add_option, device_name, non_negative_float, non_negative_int, positive_int


def _overflow_frames() -> float:
    from captions.live.metrics import METRICS

    return METRICS.registry.get_sample_value("captions_frames_dropped_total", {"reason": "waiting_overflow"}) or 0.0


def run_all(args: argparse.Namespace, checkpoint: Path) -> list[dict]:
    from captions.stt.engine import SttEngine

    bank = ClipBank(args.cache_dir / "meeting-speech")
    plans = [plan_rooms(args.rooms, n, args.seconds, args.seed, bank, args.nonstop) for n in args.participants]
    options = speaker_options(args)
    engine = SttEngine.load(str(checkpoint), device=args.device, batch_size=args.batch_size)
    engine.start()
    results = []
    try:
        for plan in plans:
            signals = meeting_signals(plan, bank, args.seed)
            dropped = _overflow_frames()
            run = asyncio.run(run_meeting(engine, signals, options, args.seconds, plan.rooms, fair=not args.unfair))
            result = analyse(engine, plan, signals, run, options, args.batch_size, args.seconds,
                             _overflow_frames() - dropped, meaningful=args.model is not None)
            print(_summary_line(result), file=sys.stderr)
            if len(result["rooms"]) > 1 or args.nonstop:
                for room in result["rooms"]:
                    print("  " + _room_line(room), file=sys.stderr)
            results.append(result)
    finally:
        engine.close()
    return results


def speaker_options(args: argparse.Namespace):
    from captions.live.speaker import SpeakerOptions

    return SpeakerOptions(max_turn_hold_s=args.max_turn_hold)


def _room_line(r: dict) -> str:
    return (f"room {r['room']}: {r['talkers']} talkers ({r['nonstop']} never stop), {r['utterances_covered']}/"
            f"{r['utterances']} utterances covered, streams equal {r['streams_equal']}/{r['streams']}, longest "
            f"caption gap {r['longest_caption_gap_s']} s, waits {r['waits']} (max {r['wait_max_s']} s), yields "
            f"{r['yields']}, slots held {r['slots_held_mean']}")


def _summary_line(r: dict) -> str:
    lat = r["first_word_latency_ms"]
    return (f"{r['participants']} participants, B={r['batch_size']}: {r['participants_captioned']}/"
            f"{r['participants_with_speech']} captioned, {r['coverage']['utterances_covered']}/"
            f"{r['coverage']['utterances']} utterances covered, words {r['words']['said']} said / "
            f"{r['words']['captioned']} captioned, slots mean {r['slots']['mean']}, waits {r['waits_ms']['count']}, "
            f"p95 held {lat['held']['p95']} / taken {lat['taken']['p95']} ms, extra {lat['extra_p95_ms']} ms, "
            f"serves: {r['serves']}")


def largest_served(results: list[dict]) -> int | None:
    """The largest N served, every smaller N measured being served too."""
    largest = None
    for r in sorted(results, key=lambda r: r["participants"]):
        if not r["serves"]:
            break
        largest = r["participants"]
    return largest


TABLE_HEADER = ("| participants (spoke / captioned) | B | utterances covered | words said / captioned (streams equal) "
                "| overflow frames | slots mean / max, all busy | waits: n, p50 / p95 / max (s) "
                "| first word p95: held / acquired / waited (ms) | extra p95 (ms) | context cost*: first word, WER "
                "| serves |\n|---:|---:|---:|---|---:|---|---|---|---:|---|---|")


def markdown_table(report: dict) -> str:
    m, s, results = report["machine"], report["settings"], report["results"]
    machine = (f"Measured {m['date'][:10]} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['device']}), load "
               f"average {m['load_average_at_start'][0]} at start / {m['load_average_at_end'][0]} at end; "
               f"{s['checkpoint_name']}, {s['seconds']:.0f} s meetings, seed {s['seed']}.")
    served = (f"Largest meeting served with B = {s['batch_size']}: {report['largest_served'] or 'none'} "
              f"(nothing lost and extra p95 <= {EXTRA_TARGET_S * 1000:.0f} ms).")
    note = results[0]["context_cost"]["note"] if results else None
    lines = [machine, "", TABLE_HEADER, *map(_row, results), "", served,
             "*" + (note or "the cost of starting each turn without the earlier turns' context")]
    if s.get("rooms", 1) > 1 or s.get("nonstop", 0):
        fairness = (f"max turn hold {s['max_turn_hold_s']:g} s, yield within {s['yield_within_s']:g} s"
                    if s.get("fair_shares", True) else "WITHOUT fair shares: first come first served, no yields")
        lines += ["", f"Per room ({s['rooms']} rooms, {s['nonstop']} never-stopping talkers in room 0, {fairness}):",
                  "",
                  ROOM_HEADER, *[_room_row(r, room) for r in results for room in r["rooms"]]]
    return "\n".join(lines)


ROOM_HEADER = ("| participants | B | room | talkers (never stop) | utterances covered | streams equal "
               "| longest caption gap (s) | waits (max s) | yields | slots held (mean) | nothing lost |\n"
               "|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---|")


def _room_row(r: dict, room: dict) -> str:
    gap = "-" if room["longest_caption_gap_s"] is None else f"{room['longest_caption_gap_s']:.1f}"
    wait = "-" if room["wait_max_s"] is None else f"{room['wait_max_s']:.1f}"
    return (f"| {r['participants']} | {r['batch_size']} | {room['room']} | {room['talkers']} ({room['nonstop']}) "
            f"| {room['utterances_covered']}/{room['utterances']} | {room['streams_equal']}/{room['streams']} "
            f"| {gap} | {room['waits']} ({wait}) | {room['yields']} | {room['slots_held_mean']:.2f} "
            f"| {'yes' if room['lossless'] else 'no'} |")


def _row(r: dict) -> str:
    c, w, slots, waits, lat = r["coverage"], r["words"], r["slots"], r["waits_ms"], r["first_word_latency_ms"]
    sec = lambda v: "-" if v is None else f"{v / 1000:.1f}"  # noqa: E731
    ms = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    cost = r["context_cost"]
    agreement = "-" if cost["first_word_agreement"] is None else f"{cost['first_word_agreement']:.0%}"
    rate = "-" if cost["error_rate"] is None else f"{cost['error_rate']:.0%}"
    return (f"| {r['participants']} ({r['participants_with_speech']} / {r['participants_captioned']}) "
            f"| {r['batch_size']} | {c['utterances_covered']}/{c['utterances']} "
            f"| {w['said']} / {w['captioned']} ({w['streams_equal']}/{w['streams']}) "
            f"| {r['frames_dropped_waiting_overflow']} | {slots['mean']:.1f} / {slots['max']}, "
            f"{slots['all_busy_share']:.0%} | {waits['count']}, {sec(waits['p50'])} / {sec(waits['p95'])} / "
            f"{sec(waits['max'])} | {ms(lat['held']['p95'])} / {ms(lat['acquired']['p95'])} / "
            f"{ms(lat['waited']['p95'])} | {ms(lat['extra_p95_ms'])} | {agreement}, {rate} "
            f"| {'yes' if r['serves'] else 'no'} |")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_option(parser, "--participants", env="CAPTIONS_BENCH_PARTICIPANTS", type=positive_ints("participant counts"),
               default=[16], help="people in the meeting, one meeting per count (e.g. 8,16,24)")
    add_option(parser, "--batch-size", env="CAPTIONS_BENCH_BATCH_SIZE", type=positive_int, default=4,
               help="engine slots (B)")
    add_option(parser, "--seconds", env="CAPTIONS_BENCH_SECONDS", type=float, default=90.0,
               help="length of each meeting (real time)")
    add_option(parser, "--seed", env="CAPTIONS_BENCH_SEED", type=int, default=0,
               help="the meetings' random seed (who talks when, noise)")
    add_option(parser, "--rooms", env="CAPTIONS_BENCH_ROOMS", type=positive_int, default=1,
               help="rooms at once on the one engine, each a meeting of --participants people (fair shares)")
    add_option(parser, "--nonstop", env="CAPTIONS_BENCH_NONSTOP", type=non_negative_int, default=0,
               help="people added to room 0 who talk without stopping from start to end (a TV, a monologue)")
    add_option(parser, "--max-turn-hold", env="CAPTIONS_BENCH_MAX_TURN_HOLD", type=non_negative_float,
               default=20.0, help="the worker's --max-turn-hold: seconds a turn holds its slot before it "
               "yields at a sentence end while others wait")
    parser.add_argument("--unfair", action="store_true",
                        help="for comparison: the slot queue as before fair shares (first come first served, no "
                             "slot ever given back while its speaker talks)")
    add_test_checkpoint_options(parser, "checkpoint directory or Hugging Face repo")
    add_option(parser, "--device", env="CAPTIONS_DEVICE", default="cpu", type=device_name,
               help="cpu, cuda or auto")
    add_output_options(parser)


def run(args: argparse.Namespace) -> int:
    from captions.dev.speech import SpeechUnavailable
    from captions.stt.model import CheckpointError

    if args.seconds < 8:
        print("captions bench meeting: --seconds must be at least 8", file=sys.stderr)
        return 2
    try:
        checkpoint = resolve_test_checkpoint(args)
        report = {"benchmark": "meeting", "machine": machine_description(args.device)}
        results = run_all(args, checkpoint)
    except (BenchError, CheckpointError, SpeechUnavailable, RuntimeError) as e:
        print(f"captions bench meeting: {e}", file=sys.stderr)
        return 1
    options = speaker_options(args)
    report.update({
        "settings": {"participants": args.participants, "batch_size": args.batch_size, "seconds": args.seconds,
                     "seed": args.seed, "rooms": args.rooms, "nonstop": args.nonstop, "fair_shares": not args.unfair,
                     "checkpoint": str(checkpoint), "checkpoint_name": args.model or "tiny test checkpoint",
                     "pre_roll_s": options.pre_roll_s, "release_after_s": options.release_after_s,
                     "max_wait_s": options.max_wait_s, "max_turn_hold_s": options.max_turn_hold_s,
                     "yield_within_s": options.yield_within_s, "path": "in process: the product's Speaker and slot queue, "
                     "simulated microphones on one real-time clock, the real engine (no livekit-server)"},
        "definitions": DEFINITIONS,
        "results": results,
        "largest_served": largest_served(results),
    })
    print(f"largest meeting served with B = {args.batch_size}: {report['largest_served']}", file=sys.stderr)
    return finish_report(args, report, plot, markdown_table)


DEFINITIONS = {
    "coverage": "an utterance is covered when all its samples are inside audio pushed to an engine stream of its "
                "participant; pushed audio is compared with the signal sample for sample",
    "words": "per engine stream: said = the words of exactly its audio (lead silence + everything pushed) run alone "
             "through the engine; captioned = the words of its final captions",
    "first_word_latency_ms": "arrival of the first caption carrying a word that starts in [onset - pre-roll, end] "
                             "of the utterance, less that word's end (capture times); held: the speaker's turn was "
                             "open at the onset; acquired: a new turn got a slot at once; waited: it queued",
    "extra_p95_ms": "p95 of acquired + waited less p95 of held (extra_p50_ms: the same with medians)",
    "new_turn_split_ms": "for a new turn: voice onset -> turn requested (the VAD's delay) -> slot -> first push "
                         "(the live splice) and -> caught up (the first engine event within "
                         f"{CAUGHT_UP_LAG_S * 1000:.0f} ms of live: the kept audio has been stepped)",
    "live_lag_ms": "engine events once a stream caught up: arrival less the capture time of the audio they cover",
    "slots": "engine slots in use, sampled every 100 ms during the meeting",
    "waits_ms": "turns that queued: from the request (voice detected) to the slot",
    "rooms": "per room (--rooms, --nonstop): coverage and words as above, over the room's participants; "
             "longest_caption_gap_s: the most seconds of the room's speech (capture time, overlaps counted once) "
             "between two captions of the room in a row (interim or final; from the meeting's start to the first, "
             "from the last to its end); yields: turns that went on from where a turn of the same speaker gave "
             "its slot back (fair shares); slots_held_mean: slots held by the room, sampled every 100 ms",
    "context_cost": "each turn after a participant's first: its own words against the words of the same span when "
                    "the participant's whole signal runs in one held slot",
    "serves": f"nothing lost (every utterance covered, audio exact, words equal, no overflow) and extra p95 <= "
              f"{EXTRA_TARGET_S * 1000:.0f} ms",
}


# ---- the plot ----------------------------------------------------------------------------------------------

def plot(report: dict, path: Path) -> None:
    """Who talked and who held a slot, slots in use, and first-word latency per class (the run
    nearest 16 participants), with p95 per class against meeting size."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

    results = report["results"]
    shown = min(results, key=lambda r: (abs(r["participants"] - 16), -r["participants"]))
    fig = plt.figure(figsize=(14, 10))
    grid = fig.add_gridspec(3, 2, height_ratios=[3, 1.2, 2])
    timeline = fig.add_subplot(grid[0, :])
    slots = fig.add_subplot(grid[1, :], sharex=timeline)
    _plot_timeline(timeline, shown)
    _plot_slots(slots, shown)
    _plot_cdf(fig.add_subplot(grid[2, 0]), shown)
    _plot_p95(fig.add_subplot(grid[2, 1]), results)
    m = report["machine"]
    fig.suptitle(f"captions bench meeting - {m['cpu_model']}, {m['cpu_cores']} cores, {m['device']}, "
                 f"load {m['load_average_at_start'][0]}, {m['date'][:10]}, {report['settings']['checkpoint_name']}",
                 fontsize=10)
    save_figure(fig, path)


def _plot_timeline(ax, r: dict) -> None:
    for u in r["utterances"]:
        colour = {"sentence": "black", "monologue": "tab:orange"}.get(u["kind"], "tab:purple")
        ax.plot([u["onset_s"], u["end_s"]], [u["participant"]] * 2, color=colour, linewidth=5, solid_capstyle="butt")
    for t in r["turns"]:
        y = t["participant"] + 0.3
        if not t["immediate"] and t["granted_s"] is not None:
            ax.plot([t["begun_s"], t["granted_s"]], [y, y], color="tab:red", linewidth=2)
        if t["granted_s"] is not None:
            ax.plot([t["granted_s"], t["ended_s"] or t["granted_s"]], [y, y], color="tab:green", linewidth=2)
        arrivals = t.get("caption_arrivals_s", [])
        ax.plot(arrivals, [t["participant"] - 0.3] * len(arrivals), marker="|", linestyle="", color="tab:blue",
                markersize=4)
    rooms = r.get("rooms", [])
    if len(rooms) > 1:
        first = 0
        for room in rooms[:-1]:
            first += room["participants"]
            ax.axhline(first - 0.5, color="grey", linewidth=0.8)
        ax.plot([], [], color="grey", linewidth=0.8, label="rooms (0 at the bottom)")
    ax.plot([], [], color="black", linewidth=5, label="sentence")
    ax.plot([], [], color="tab:purple", linewidth=5, label="back-channel")
    ax.plot([], [], color="tab:orange", linewidth=5, label="never stops")
    ax.plot([], [], color="tab:blue", marker="|", linestyle="", label="caption arrived")
    ax.plot([], [], color="tab:green", linewidth=2, label="engine slot held (until flushed)")
    ax.plot([], [], color="tab:red", linewidth=2, label="waiting for a slot")
    ax.set_ylabel("participant")
    ax.set_yticks(range(r["participants"]))
    ax.set_ylim(-0.7, r["participants"])
    ax.set_title(f"{r['participants']} participants, B = {r['batch_size']}: who talked and who held a slot")
    ax.legend(fontsize=8, loc="upper right", ncol=4)


def _plot_slots(ax, r: dict) -> None:
    t = [row[0] for row in r["occupancy"]]
    ax.step(t, [row[1] for row in r["occupancy"]], where="post", label="slots in use")
    ax.step(t, [row[2] for row in r["occupancy"]], where="post", color="tab:red", label="speakers waiting")
    ax.axhline(r["batch_size"], color="grey", linestyle=":", label="B")
    ax.set_xlabel("seconds into the meeting")
    ax.set_ylabel("count")
    ax.legend(fontsize=8, loc="upper right")


def _plot_cdf(ax, r: dict) -> None:
    for kind, colour in zip(LATENCY_CLASSES, ["tab:blue", "tab:orange", "tab:red"]):
        values = sorted(u["first_word_latency_ms"] for u in r["utterances"]
                        if u["class"] == kind and u["first_word_latency_ms"] is not None)
        if values:
            ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post", color=colour,
                    label=f"{kind} ({len(values)})")
    ax.set_xlabel("first-word latency (ms)")
    ax.set_ylabel("share of utterances")
    ax.set_title(f"First-word latency by how the turn got its slot ({r['participants']} participants)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _plot_p95(ax, results: list[dict]) -> None:
    sizes = [r["participants"] for r in results]
    for kind, colour in zip(LATENCY_CLASSES, ["tab:blue", "tab:orange", "tab:red"]):
        values = [r["first_word_latency_ms"][kind]["p95"] for r in results]
        ax.plot(sizes, [math.nan if v is None else v for v in values], "o-", color=colour, label=f"p95 {kind}")
    extra = [r["first_word_latency_ms"]["extra_p95_ms"] for r in results]
    ax.plot(sizes, [math.nan if v is None else v for v in extra], "s--", color="black", label="extra p95")
    ax.axhline(EXTRA_TARGET_S * 1000, color="grey", linestyle=":", label="extra target")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("participants")
    ax.set_ylabel("ms")
    ax.set_title("First-word latency p95 by meeting size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
