"""`captions bench translate`, run as a user runs it, with the tiny model shape and short runs: the
JSON holds the documented figures, consistent with each other, and the plot is written. No timing
targets here: figures vary by machine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def captions(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "captions.cli", *args], check=False, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def translate_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = captions("bench", "translate", "--shape", "tiny", "--speakers", "2,1", "--seconds", "3.5",
                      "--cache-dir", str(out / "cache"), "--json", str(out / "translate.json"),
                      "--plot", str(out / "translate.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "translate.json").read_text()), out / "translate.png", result.stdout


def test_json_names_the_machine_the_model_and_the_settings(translate_report):
    report, _, _ = translate_report
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["device"] == "cpu"
    assert machine["ctranslate2"] and len(machine["load_average_at_start"]) == 3
    assert len(machine["load_average_at_end"]) == 3
    model = report["model"]
    assert model["name"] == "tiny" and model["random_weights"] and model["parameters"] > 0
    assert model["mean_source_tokens"] == pytest.approx(13, abs=1)
    assert report["settings"]["compute_type"] == "int8" and report["settings"]["threads"] >= 1
    assert report["settings"]["interim_linger_s"] == 0.3


def test_throughput_and_every_run_have_consistent_figures(translate_report):
    report, _, _ = translate_report
    throughput = report["throughput"]
    assert throughput["one_at_a_time_per_s"] > 0 and throughput["batched_per_s"] > 0
    assert throughput["speedup"] == pytest.approx(
        throughput["batched_per_s"] / throughput["one_at_a_time_per_s"], rel=0.05)
    runs = report["runs"]
    assert [(r["speakers"], r["interim_every_s"]) for r in runs] == [
        (1, 0.75), (2, 0.75), (1, None), (2, None)]
    for run in runs:
        assert run["finals"] >= run["speakers"] and run["final_ms"]["count"] == run["finals"]
        assert 0 < run["final_ms"]["p50"] <= run["final_ms"]["p95"]
        assert run["interims_translated"] + run["interims_replaced"] <= run["interims_asked"]
        assert (run["interims_asked"] > 0) == (run["interim_every_s"] is not None)
        assert run["batches"] >= 1 and 0 <= run["busy_share"] <= 1
    assert report["target_met"] is None  # no run at the target's 8 speakers


def test_the_table_and_the_plot_are_written(translate_report):
    _, plot_path, stdout = translate_report
    assert plot_path.stat().st_size > 10_000
    assert "| speakers | interims | final p50 / p95 (ms)" in stdout
    assert "captions/s one at a time" in stdout
