"""The soak's markdown table and plot."""


from __future__ import annotations

from pathlib import Path

from captions.bench.common import (
    save_figure,
)
from captions.bench.soak.common import UNITS_PLURAL

# ---- report ------------------------------------------------------------------------------------------

def markdown_table(report: dict) -> str:
    lines = [("| scenario | units | captioned | RSS start / idle / end (MB) | RSS slope per unit (MB) "
              "| C heap in use slope (MB) | Python objects slope | threads idle / end | fds idle / end "
              "| open transcripts idle / end | FFI handles idle / end |"),
             "|---|---:|---:|---|---:|---:|---:|---|---|---|---|"]
    for r in report["scenarios"]:
        slope = r["slope_per_unit"]
        first, last = r["samples"][0], r.get("after") or r["samples"][-1]
        idle = r.get("idle") or first
        start = r.get("start") or first

        def pair(metric: str, idle: dict = idle, last: dict = last) -> str:
            return f"{idle.get(metric)} / {last.get(metric)}"

        captioned = f"{r['captioned']}" if "captioned" in r else f"{r.get('finals', 0)} finals"
        lines.append(
            f"| {r['name']} | {r['units']} {UNITS_PLURAL[r['name']]} | {captioned} | {start['rss_mb']:.0f} / {idle['rss_mb']:.0f} / "
            f"{last['rss_mb']:.0f} | {_fmt(slope.get('rss_mb'))} | {_fmt(slope.get('heap_in_use_mb'))} "
            f"| {_fmt(slope.get('python_objects'), 1)} | {pair('threads')} | {pair('fds')} | {pair('open_transcripts')} "
            f"| {pair('ffi_handles')} |")
    starts = [(r["name"], r["room_start_s"]) for r in report["scenarios"] if r.get("room_start_s", {}).get("rooms")]
    if starts:
        lines += ["", "| scenario | rooms started | job start to listening p50 / p99 / max (s) |", "|---|---:|---|"]
        lines += [f"| {name} | {s['rooms']} | {s['p50']} / {s['p99']} / {s['max']} |" for name, s in starts]
    return "\n".join(lines)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["scenarios"]
    fig, axes = plt.subplots(len(results), 3, figsize=(14, 3.6 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        samples, units = r["samples"], UNITS_PLURAL[r["name"]]
        x = [s["units"] for s in samples]
        # Growth since the first sample (the idle worker after the warm-up), where a leak shows.
        for metric, label in (("rss_mb", "RSS"), ("heap_in_use_mb", "C heap in use")):
            if all(s.get(metric) is not None for s in samples):
                row[0].plot(x, [s[metric] - samples[0][metric] for s in samples], marker=".", label=label)
        row[0].axhline(0, color="grey", linewidth=0.5)
        row[0].set(xlabel=units, ylabel="MB since the first sample",
                   title=f"{r['name']}: RSS {_fmt(r['slope_per_unit'].get('rss_mb'))} MB per {r['unit']}")
        row[0].legend(fontsize=8)
        after = r.get("after")
        for metric, color in (("threads", "tab:blue"), ("fds", "tab:orange"), ("open_transcripts", "tab:green"),
                              ("ffi_handles", "tab:red")):
            if all(s.get(metric) is not None for s in samples):
                row[1].plot(x, [s[metric] for s in samples], marker=".", color=color, label=metric)
                if after is not None:
                    row[1].plot([x[-1]], [after[metric]], marker="*", markersize=12, color=color, linestyle="")
        row[1].set(xlabel=units, title="threads, descriptors, transcripts, FFI handles"
                   + (" (*: settled after the last)" if after is not None else ""))
        row[1].legend(fontsize=8)
        row[2].plot(x, [s["python_objects"] for s in samples], marker=".", label="Python objects (gc)")
        row[2].set(xlabel=units, title="Python objects tracked by gc")
        row[2].legend(fontsize=8, loc="upper left")
    machine = report["machine"]
    fig.suptitle(f"captions bench soak, {machine['cpu_model']}, {machine['cpu_cores']} cores, "
                 f"{machine['date'][:10]}; slopes: least squares over the second half", fontsize=9)
    save_figure(fig, path)
