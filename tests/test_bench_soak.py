"""`captions bench soak`: its slope (least squares over the second half of the samples), and its `hour`
scenario run as a user runs it with a few minutes of speech. The rooms scenario runs in
tests/test_soak.py; the long-room scenario only in the benchmark itself (minutes of real-time speech)."""

from __future__ import annotations

import json

import pytest

from captions.bench.soak import slopes
from tests.test_bench import captions


def _sample(units: int, rss_mb: float) -> dict:
    return {"units": units, "rss_mb": rss_mb, "heap_in_use_mb": 100.0, "heap_free_mb": 1.0, "python_objects": 5,
            "fds": 7, "threads": 3, "open_transcripts": 0, "ffi_handles": None, "room_objects": 0}


def test_the_slope_is_fitted_on_the_second_half_after_the_warm_up_growth():
    # Growth while warming up (the first half), then 0.02 MB per unit with noise.
    samples = [_sample(u, 1000 + 5 * u) for u in range(0, 50, 10)]
    samples += [_sample(u, 1250 + 0.02 * u + (0.3 if u % 20 else -0.3)) for u in range(50, 150, 10)]
    fitted = slopes(samples)
    assert fitted["from_unit"] == 70 and fitted["to_unit"] == 140
    assert fitted["rss_mb"] == pytest.approx(0.02, abs=0.01)
    assert fitted["threads"] == 0 and "ffi_handles" not in fitted, "a metric not measured has no slope"


def test_too_few_samples_give_no_slope():
    assert slopes([_sample(5, 1000)]) == {}


@pytest.mark.slow
def test_the_hour_scenario_writes_every_final_to_the_transcript_and_reports_it(tiny_checkpoint, tmp_path):
    result = captions("bench", "soak", "--scenarios", "hour", "--minutes", "2", "--speakers", "2",
                      "--turn-seconds", "8", "--model", str(tiny_checkpoint), "--workdir", str(tmp_path / "workdir"), "--json", str(tmp_path / "soak.json"),
                      timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [hour] = json.loads((tmp_path / "soak.json").read_text())["scenarios"]
    assert hour["name"] == "hour" and hour["units"] == 2 and hour["finals"] > 0
    [transcript] = (tmp_path / "workdir" / "hour" / "data").glob("*.jsonl")
    assert len(transcript.read_text().splitlines()) == hour["finals"], "a final missing from the transcript"
    last = hour["samples"][-1]
    assert last["open_transcripts"] == 1 and last["rss_mb"] > 0 and last["python_objects"] > 0
    assert f"| hour | 2 minutes of speech | {hour['finals']} finals |" in result.stdout


@pytest.mark.slow
def test_unknown_scenarios_are_refused_with_a_clear_error():
    result = captions("bench", "soak", "--scenarios", "rooms,weekend", timeout=60)
    assert result.returncode == 2 and "expected some of rooms, long-room, hour" in result.stderr
