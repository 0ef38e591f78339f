"""The soak's scenarios, units and what it samples, and the slope of a series."""


from __future__ import annotations

import argparse
import json

import numpy as np

SCENARIOS = ("rooms", "long-room", "hour")
UNITS = {"rooms": "room", "long-room": "speaker turn", "hour": "minute of speech"}
UNITS_PLURAL = {"rooms": "rooms", "long-room": "speaker turns", "hour": "minutes of speech"}
SENTENCES = ("Hello, this is a caption test.", "The meeting starts in five minutes.")
ROOM_SLOPE_TARGET_MB = 0.05
"""Issue 16's target: RSS slope per room at most this, over 500 rooms."""
WARMUP_UNITS = {"rooms": 5, "long-room": 2, "hour": 1}
CAPTION_TIMEOUT_S = 15.0
SUBSCRIBE_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 120.0
"""After the warm-up and after the last unit: how long the worker may take to end its rooms' jobs
and their threads."""
SETTLE_QUIET_S = 10.0
"""Native pools end idle threads after about 10 s (tokio): a count that held this long has settled."""
ROOM_CLASSES = ("RoomCaptioner", "Speaker", "Turn", "TrackAudio", "SpeechGate", "Segmenter", "TranscriptStore",
                "CaptionPublisher",
                "Room", "AudioStream", "JobContext")
"""Per-room objects summed into `room_objects` (captions/live/diagnostics.py counts them)."""
METRICS = ("rss_mb", "heap_in_use_mb", "heap_free_mb", "python_objects", "fds", "threads", "open_transcripts",
           "ffi_handles", "room_objects")


def scenarios(text: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values or set(values) - set(SCENARIOS):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(SCENARIOS)}, got {text!r}")
    return list(dict.fromkeys(values))


# ---- samples and slopes ---------------------------------------------------------------------------

def sample_from_report(report: dict, units: int, started: float, open_transcripts: int) -> dict:
    """One point of the curves, from a diagnostics report (captions/live/diagnostics.py)."""
    malloc = report.get("malloc") or {}
    ffi = report.get("ffi") or {}
    return {
        "units": units, "seconds": round(report["time"] - started, 1), "rss_mb": report["rss_mb"],
        "heap_in_use_mb": malloc.get("in_use_mb"), "heap_free_mb": malloc.get("free_mb"),
        "python_objects": report["gc_objects"], "fds": report["fds"], "threads": report["threads"],
        "open_transcripts": open_transcripts, "ffi_handles": ffi.get("handles"),
        "ffi_subscribers": ffi.get("subscribers"),
        "room_objects": sum(report["objects"].get(name, 0) for name in ROOM_CLASSES),
        "tracemalloc_mb": (report.get("tracemalloc") or {}).get("current_mb"),
    }


def slopes(samples: list[dict]) -> dict:
    """Least-squares slope per unit of every metric over the second half of the samples."""
    half = samples[len(samples) // 2:]
    if len(half) < 2 or half[-1]["units"] == half[0]["units"]:
        return {}
    x = np.array([s["units"] for s in half], dtype=float)
    result = {}
    for metric in METRICS:
        y = [s.get(metric) for s in half]
        if any(v is None for v in y):
            continue
        result[metric] = round(float(np.polyfit(x, np.array(y, dtype=float), 1)[0]), 5)
    result["from_unit"], result["to_unit"] = int(x[0]), int(x[-1])
    return result


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)
