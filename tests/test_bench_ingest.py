"""`captions bench ingest`, run as a user runs it, with tiny settings, through its own real
livekit-server: its JSON, table and plot hold the documented figures. No timing targets here."""

from __future__ import annotations

import json

import pytest

from tests.test_bench import captions

pytestmark = pytest.mark.livekit


@pytest.fixture(scope="module")
def ingest_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-ingest")
    result = captions("bench", "ingest", "--tracks", "2", "--streams-per-track", "1,2", "--chunk-ms", "10",
                      "--seconds", "2", "--json", str(out / "ingest.json"), "--plot", str(out / "ingest.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "ingest.json").read_text()), out / "ingest.png", result.stdout


def test_every_fanout_is_measured_for_every_stream_count_in_one_run(ingest_report):
    report, _, _ = ingest_report
    assert report["machine"]["livekit"] and report["machine"]["cpu_cores"] >= 1
    # A silent participant's microphone (idle) is read in 80 ms chunks, whatever --chunk-ms says.
    assert [(r["streams"], r["fanout"], r["chunk_ms"]) for r in report["runs"]] == [
        (2, "sdk", 10), (2, "narrowed", 10), (2, "idle", 80), (4, "sdk", 10), (4, "narrowed", 10), (4, "idle", 80)]


def test_every_stream_receives_its_audio_in_real_time(ingest_report):
    report, _, _ = ingest_report
    for run in report["runs"]:
        # One event per chunk per stream, whatever the fan-out.
        assert 0.8 <= run["delivered"] <= 1.05, run
        chunks_per_s = 1000 / run["chunk_ms"]
        assert run["events_per_s"] == pytest.approx(chunks_per_s * run["streams"] * run["delivered"], rel=0.02)
        assert run["cores"] > 0 and run["cores_per_stream"] == pytest.approx(run["cores"] / run["streams"], abs=1e-3)


def test_table_and_plot_are_written(ingest_report):
    report, plot, stdout = ingest_report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in report["runs"]:
        assert (f"| {run['streams']} (2 x {run['streams_per_track']}) | {run['chunk_ms']} ms | {run['fanout']} "
                f"| {run['cores']:.2f} |") in stdout


def test_bad_fanout_and_chunk_size_are_refused_with_a_clear_error():
    result = captions("bench", "ingest", "--fanout", "sdk,sideways", timeout=60)
    assert result.returncode == 2 and "expected some of sdk, narrowed, idle" in result.stderr
    result = captions("bench", "ingest", "--chunk-ms", "15", timeout=60)
    assert result.returncode == 1 and "multiples of 10 ms" in result.stderr
