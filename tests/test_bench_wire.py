"""`captions bench wire`, run as a user runs it, with tiny settings: both sides of the engine channel
measured, the pushed audio received by the engine in real time, events back for every stream. No timing
targets here (speed is the benchmark's business, not the tests')."""

from __future__ import annotations

import json

from tests.test_bench import captions


def test_both_sides_are_measured_and_every_sample_arrives(tiny_checkpoint, tmp_path):
    out = tmp_path / "wire.json"
    result = captions("bench", "wire", "--model", str(tiny_checkpoint), "--streams", "4", "--seconds", "1",
                      "--json", str(out), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["streams"] == 4 and run["ticks"] >= 50
    # The two processes count over the same wall-clock window, a socket's latency apart: a tick is 1 %.
    assert 0.97 <= run["delivered"] <= 1.03, "the engine received what was pushed, in real time"
    assert run["events"] >= 4 * 10, "each stream had an event for each of its steps"
    assert run["receiving_cores_per_stream"] > 0 and run["engine_side_cores_per_stream"] > 0
    assert f"| 4 | {run['receiving_cores_per_stream']:.5f} |" in result.stdout
