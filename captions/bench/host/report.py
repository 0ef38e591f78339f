"""`captions bench host`'s figures: whether a run kept up, the summary (today / new, and P receiving
processes against one), the markdown tables and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from captions.bench.common import save_figure
from captions.stt.api import LIVE_CHUNK_MS

PATHS = ("today", "new")
KEPT_UP = (0.95, 1.05)
"""A run kept up when the audio received (and, for talkers, pushed) in its window was this share of
real time: outside it the process fell behind, or caught up a backlog, and its cost is not per
second of audio (a machine loaded far beyond its cores does that)."""
WITHIN = 0.15
"""Issue 24: with P = 2, each receiving process's cost per talker stays within 15 % of P = 1."""


def _kept(figures: dict) -> bool:
    low, high = KEPT_UP
    return low <= figures["delivered"] <= high and (figures.get("pushed") is None or low <= figures["pushed"] <= high)


def kept_up(run: dict) -> bool:
    """Every listener process of the run kept up."""
    return all(_kept(p) for p in run.get("processes") or [run])


def variant(run: dict) -> str:
    """The host path of a run, with its live chunk (`--live-chunk-ms`) when the new path ran with
    another than the worker's default (today's path: always 10 ms; runs from before the option: theirs),
    and whether its captions were published (`--publish`)."""
    chunk = run.get("live_chunk_ms")
    name = run["path"]
    if chunk is not None and run["path"] == "new" and chunk != LIVE_CHUNK_MS:
        name += f", {chunk} ms chunks"
    return name + (", captions published" if run.get("publish") else "")


def shape(run: dict) -> str:
    """How the run's host was built: `in-process` (one listener with the engine inside) or
    `P over socket` (P listeners, the engine in a process of its own)."""
    if run.get("engine", "in-process") == "in-process":
        return "in-process"
    return f"{run['receivers']} over socket"


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def summary(runs: list[dict]) -> dict:
    """Per kind: the median over the repeats that kept up of the cost per participant of each path
    (and live chunk) in-process, today / new and each other chunk / new; and per socket configuration
    each process's median cost, over the same path's in-process and over one receiving process over
    the socket's."""
    out: dict = {}
    for kind in ("talkers", "silent"):
        mine = [r for r in runs if r["kind"] == kind and kept_up(r)]
        per_path = {}
        for path in dict.fromkeys(variant(r) for r in runs if r["kind"] == kind):
            value = _median([r["cores_per_participant"] for r in mine if variant(r) == path and shape(r) == "in-process"])
            if value is not None:
                per_path[path] = round(value, 5)
        entry: dict = {f"cores_per_participant_{p}": v for p, v in per_path.items()}
        if per_path.get("today") and per_path.get("new"):
            entry["today_over_new"] = round(per_path["today"] / per_path["new"], 2)
        for path, value in per_path.items():
            if path not in PATHS and per_path.get("new"):
                entry[f"{path}_over_new"] = round(value / per_path["new"], 2)
        receivers: dict = {}
        socket_one: dict[str, float] = {}
        sockets = [r for r in mine if shape(r) != "in-process"]
        for p, path in sorted({(r["receivers"], variant(r)) for r in sockets}):
            rows = [r for r in sockets if r["receivers"] == p and variant(r) == path]
            per_process = [round(_median([r["processes"][i]["cores_per_participant"] for r in rows]), 5)
                           for i in range(p)]
            figures: dict = {"cores_per_participant_per_process": per_process,
                             "listeners_cores": _median([r["parallel"]["listeners_cores"] for r in rows]),
                             "engine_process_server_cores": _median([r["engine_process"]["server_cores"] for r in rows])}
            if p == 1:
                socket_one[path] = per_process[0]
            # Against the same path (and chunk) in-process, and over one socket.
            for name, reference in (("over_in_process_new", per_path.get(path)), ("over_socket_1", socket_one.get(path))):
                if reference and reference > 0:
                    figures[name] = [round(v / reference, 3) for v in per_process]
            if p > 1 and "over_in_process_new" in figures:
                figures["within_15_percent_of_in_process"] = all(x <= 1 + WITHIN for x in figures["over_in_process_new"])
            receivers[str(p) if path == "new" else f"{p}, {path}"] = figures
        if receivers:
            entry["over_socket"] = receivers
        if entry:
            out[kind] = entry
    return out


def markdown_table(report: dict) -> str:
    header = ("| kind | path | host | participants (tracks x k) | host cores | idle baseline | per participant "
              "| delivered | pushed | Silero calls / window | steps / 80 ms | latency beyond delay p50 / p95 | load before "
              "| kept up |")
    lines = [header, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        latency = r.get("latency_beyond_delay_ms")
        lat = f"{latency['p50']:.0f} / {latency['p95']:.0f} ms" if latency else "-"
        pushed = f"{100 * r['pushed']:.0f} %" if r.get("pushed") is not None else "-"
        silero = f"{100 * r['silero_share']:.0f} %" if r.get("silero_share") is not None else "-"
        lines.append(f"| {r['kind']} | {variant(r)} | {shape(r)} | {r['participants']} ({r['tracks']} x "
                     f"{r['streams_per_track']}) | {r['host_cores']:.3f} | {r['baseline_cores']:.3f} "
                     f"| {r['cores_per_participant']:.4f} | {100 * r['delivered']:.0f} % | {pushed} | {silero} "
                     f"| {r['steps_per_frame']:.2f} | {lat} | {r['load_before'][0]:.2f} | {'yes' if kept_up(r) else 'no'} |")
    sockets = [r for r in report["runs"] if shape(r) != "in-process"]
    if sockets:
        lines += ["", process_table(sockets)]
    return "\n".join(lines)


def process_table(runs: list[dict]) -> str:
    """Per listener process of the socket runs, and what the machine's cores were doing meanwhile."""
    header = ("| kind | host | process | participants | host cores | idle baseline | per participant "
              "| waited for a core | engine process: server / engine thread | listeners' cores (peak 0.5 s) "
              "| machine busy / others / left to the worker | load before |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        e, par, m = r["engine_process"], r["parallel"], r["machine_cores"]
        for p in r["processes"]:
            lines.append(f"| {r['kind']} | {shape(r)} | {p['index']} | {p['participants']} | {p['host_cores']:.3f} "
                         f"| {p['baseline_cores']:.3f} | {p['cores_per_participant']:.4f} "
                         f"| {p['waited_for_cpu_cores']:.3f} | {e['server_cores']:.3f} / {e['engine_cores']:.3f} "
                         f"| {par['listeners_cores']:.3f} ({par['peak_interval_cores']:.3f}) "
                         f"| {m['busy']:.2f} / {m['others']:.2f} / {m['left_to_worker']:.2f} "
                         f"| {r['load_before'][0]:.2f} |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    variants = list(dict.fromkeys(variant(r) for r in runs))
    shapes = [("in-process", v) for v in variants]
    shapes += [(s, v) for s in sorted({shape(r) for r in runs} - {"in-process"}) for v in variants]
    shapes = [(s, v, color) for (s, v), color in zip(
        [x for x in shapes if any(shape(r) == x[0] and variant(r) == x[1] for r in runs)],
        ("tab:gray", "tab:blue", "tab:cyan", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive"))]
    fig, ax = plt.subplots(figsize=(7 + len(shapes) - 2, 4))
    kinds = [k for k in ("talkers", "silent") if any(r["kind"] == k for r in runs)]
    width = 0.8 / max(1, len(shapes))
    for offset, (s, p, color) in enumerate(shapes):
        label = p if s == "in-process" else f"{p}, {s} (each process)"  # on the first bar drawn
        for i, kind in enumerate(kinds):
            rows = [r for r in runs if r["kind"] == kind and variant(r) == p and shape(r) == s]
            x = i + (offset - (len(shapes) - 1) / 2) * width
            values = [1000 * q["cores_per_participant"] for r in rows if kept_up(r) for q in r.get("processes") or [r]]
            if values:
                ax.bar(x, float(np.median(values)), width, color=color, label=label)
                label = None
                ax.plot([x] * len(values), values, "k.", markersize=4)
            behind = [1000 * q["cores_per_participant"] for r in rows if not kept_up(r) for q in r.get("processes") or [r]]
            if behind:
                ax.plot([x] * len(behind), behind, "rx", markersize=5)
    targets = {"talkers": 5.0, "silent": 1.0}
    for i, kind in enumerate(kinds):
        ax.hlines(targets[kind], i - 0.45, i + 0.45, colors="tab:red", linestyles="dashed",
                  label="issue 24 target" if i == 0 else None)
    ax.set_xticks(range(len(kinds)), ["per live talker" if k == "talkers" else "per silent participant" for k in kinds])
    ax.set_ylabel("host CPU, millicores (x: did not keep up)")
    ax.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"captions bench host, {machine['cpu_model']}, {machine['cpu_cores']} cores, "
                 f"{machine['date'][:10]}, load {machine.get('load_average_at_start', ['?'])[0]}", fontsize=9)
    save_figure(fig, path)
