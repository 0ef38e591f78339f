"""`captions bench clock`, run as a user runs it, with tiny settings: its JSON, table and plot hold
the documented figures, consistent with each other. No timing targets here: figures vary by machine."""

from __future__ import annotations

import json

import pytest

from tests.test_bench import captions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clock_report(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-clock")
    result = captions("bench", "clock", "--model", str(tiny_checkpoint), "--speakers", "3", "--seconds", "2",
                      "--misplaced-ms", "30", "--late-hand-overs", "0.2", "--engine-step", "free", "--json", str(out / "clock.json"), "--plot", str(out / "clock.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "clock.json").read_text()), out / "clock.png", result.stdout


def test_every_frame_mode_is_measured_in_one_run(clock_report):
    report, _, _ = clock_report
    assert report["machine"]["cpu_cores"] >= 1
    assert report["settings"]["frames"] == ["shared", "no-hold", "unaligned"]
    assert report["settings"]["misplaced_ms"] == 30
    assert report["settings"]["late_hand_overs"] == 0.2 and report["settings"]["engine_step"] == "free"
    assert [(r["speakers"], r["frames"]) for r in report["results"]] == [(3, "shared"), (3, "no-hold"), (3, "unaligned")]


def test_a_misplacement_out_of_range_is_refused():
    result = captions("bench", "clock", "--misplaced-ms", "500", timeout=60)
    assert result.returncode == 2 and "--misplaced-ms must be between 0 and 100" in result.stderr


def test_every_frame_of_every_stream_gets_an_event(clock_report):
    """Hand-overs that come late (a fifth of them) still hand every tick over, and the free step
    still gives an event per frame."""
    report, _, _ = clock_report
    for result in report["results"]:
        # 2 s of speech = 25 frames per stream; the shared clock adds a partial frame of silence
        # before a stream's audio, whose last frame is then cut short and not pushed.
        assert 3 * 24 <= result["frames_captioned"] <= 3 * 25
        latency = result["push_to_event_ms"]
        assert latency["count"] == result["frames_captioned"]
        assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
        assert 1 <= result["streams_per_step"] <= 3 and result["steps_per_s"] > 0


def test_only_the_shared_clock_puts_silence_before_streams(clock_report):
    report, _, _ = clock_report
    shared, _, unaligned = report["results"]
    assert unaligned["leads"] == [0, 0, 0]
    assert all(0 <= lead < 1920 and lead % 240 == 0 for lead in shared["leads"])


def test_table_and_plot_are_written(clock_report):
    report, plot, stdout = clock_report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for result in report["results"]:
        assert f"| 3 | {result['frames']} | {result['chunk_ms']} ms | {result['steps_per_s']:.1f} |" in stdout


def test_a_late_share_out_of_range_is_refused():
    result = captions("bench", "clock", "--late-hand-overs", "0.9", timeout=60)
    assert result.returncode == 2 and "--late-hand-overs must be between 0 and 0.5" in result.stderr


def test_bad_frame_mode_is_refused_with_a_clear_error():
    result = captions("bench", "clock", "--frames", "shared,sideways", timeout=60)
    assert result.returncode == 2 and "expected some of shared, no-hold, unaligned" in result.stderr


def test_longer_live_chunks_are_measured_side_by_side_and_every_frame_gets_its_event(tiny_checkpoint, tmp_path):
    """`--live-chunk-ms 10,40`: the shared clock in both, every frame captioned, leads on 10 ms ticks
    (not on 40 ms chunks), and the wait from a frame's production to its event reported."""
    result = captions("bench", "clock", "--model", str(tiny_checkpoint), "--speakers", "3", "--seconds", "2",
                      "--frames", "shared", "--live-chunk-ms", "10,40", "--engine-step", "free",
                      "--json", str(tmp_path / "clock.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "clock.json").read_text())
    assert report["settings"]["live_chunk_ms"] == [10, 40]
    assert [(r["frames"], r["chunk_ms"]) for r in report["results"]] == [("shared", 10), ("shared", 40)]
    for r in report["results"]:
        assert 3 * 24 <= r["frames_captioned"] <= 3 * 25
        assert r["produced_to_event_ms"]["count"] == r["frames_captioned"]
        assert all(0 <= lead < 1920 and lead % 240 == 0 for lead in r["leads"])


def test_a_live_chunk_the_clock_cannot_align_is_refused():
    result = captions("bench", "clock", "--live-chunk-ms", "10,25", timeout=60)
    assert result.returncode == 2 and "must be one of 10, 20, 40, got 25" in result.stderr
