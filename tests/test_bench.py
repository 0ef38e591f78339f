"""`captions bench engine`, run as a user runs it, with tiny settings: the JSON it writes holds the
documented figures, consistent with each other. No timing targets here: figures vary by machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


BATCH_SIZES = [1, 3]


def captions(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captions.cli", *args], check=False, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def engine_report(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = captions("bench", "engine", "--model", str(tiny_checkpoint), "--batch-sizes", "3,1",
                      "--seconds", "1", "--baseline-budget", "1", "--device", "cpu",
                      "--json", str(out / "engine.json"), "--plot", str(out / "engine.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "engine.json").read_text())
    return report, out / "engine.png", result.stdout, out / "engine.json"


def test_json_describes_the_machine_and_the_checkpoint(engine_report):
    report, *_ = engine_report
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["ram_gib"] > 0
    assert machine["device"] == "cpu" and machine["torch"] and machine["date"][:2] == "20"
    [result] = report["results"]
    checkpoint = result["checkpoint"]
    assert checkpoint["mimi_params"] > 0 and checkpoint["lm_params"] > 0
    assert checkpoint["lm"]["dim"] == 64 and checkpoint["mimi"]["codebooks"] == 8


def test_every_batch_size_has_batched_and_baseline_figures(engine_report):
    report, *_ = engine_report
    [result] = report["results"]
    assert [run["batch_size"] for run in result["runs"]] == BATCH_SIZES
    for run in result["runs"]:
        batched, baseline = run["batched"], run["baseline"]
        assert batched["streams"] == baseline["streams"] == run["batch_size"]
        step = batched["step_ms"]
        assert 0 < step["p50"] <= step["p95"] and step["count"] == batched["steps_measured"] > 0
        parts = batched["encode_ms"]["mean"] + batched["lm_ms"]["mean"] + batched["host_ms"]["mean"]
        assert parts == pytest.approx(step["mean"], rel=0.01)
        shares = batched["encode_share"] + batched["lm_share"] + batched["host_share"]
        assert shares == pytest.approx(1.0, abs=0.01)
        assert batched["streams_realtime"] == pytest.approx(run["batch_size"] * 0.08 / step["mean"] * 1000,
                                                            rel=0.01)
        assert batched["rtf"] > 0 and batched["audio_s"] == pytest.approx(run["batch_size"] * 0.96)
        # Real speech goes in: the tiny checkpoint writes words for it.
        assert batched["words"] > 0
        assert baseline["rounds"] >= 2 and baseline["step_ms"]["mean"] > 0
        ratio = batched["streams_realtime"] / baseline["streams_realtime"]
        assert run["ratio"] == pytest.approx(ratio, rel=0.01)


def test_plot_and_table_are_written(engine_report):
    _, plot, stdout, _ = engine_report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "checkpoint" not in line]
    assert len(rows) == len(BATCH_SIZES)


def test_an_earlier_run_is_reported_again_from_its_json(engine_report, tmp_path):
    _, _, stdout, json_path = engine_report
    again = captions("bench", "engine", "--from-json", str(json_path), "--plot", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == stdout
    assert (tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--batch-sizes", "1,eight"], "comma-separated integers"),
    (["--batch-sizes", "0,4"], "positive integers"),
    (["--checkpoints", "huge"], "known checkpoints"),
    (["--model", "/nonexistent/checkpoint"], "does not exist"),
])
def test_bad_input_gets_a_clear_error(args, message):
    result = captions("bench", "engine", "--device", "cpu", "--seconds", "1", *args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
