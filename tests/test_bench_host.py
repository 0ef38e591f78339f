"""`captions bench host`, run as a user runs it, with tiny settings, through its own real
livekit-server: both host paths measured side by side, its JSON, table and plot hold the documented
figures. No timing targets here (speed is the benchmark's business, not the tests')."""

from __future__ import annotations

import json

import pytest

from tests.test_bench import captions

pytestmark = pytest.mark.livekit


@pytest.fixture(scope="module")
def host_report(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-host")
    # The engine's model step replaced by its free pattern: the tiny model's own step is the slow test's.
    result = captions("bench", "host", "--model", str(tiny_checkpoint), "--talkers", "1", "--talker-k", "2", "--silent", "1", "--silent-k", "2",
                      "--seconds", "2", "--engine-step", "free", "--json", str(out / "host.json"), "--plot", str(out / "host.png"),
                      timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "host.json").read_text()), out / "host.png", result.stdout


def test_both_paths_are_measured_for_talkers_and_silent_participants_in_one_run(host_report):
    report, _, _ = host_report
    assert [(r["kind"], r["path"], r["participants"]) for r in report["runs"]] == [
        ("talkers", "today", 2), ("talkers", "new", 2), ("silent", "today", 2), ("silent", "new", 2)]
    machine = report["machine"]
    assert machine["livekit"] and machine["cpu_cores"] >= 1 and len(machine["load_average_at_start"]) == 3
    assert all(len(r["load_before"]) == 3 for r in report["runs"])
    assert set(report["summary"]) == {"talkers", "silent"}
    assert report["settings"]["engine_step"] == "free"


def test_every_participant_receives_its_audio_and_talkers_are_captioned(host_report):
    report, _, _ = host_report
    for run in report["runs"]:
        assert run["kept_up"] is (0.95 <= run["delivered"] <= 1.05 and (
            run["pushed"] is None or 0.95 <= run["pushed"] <= 1.05))
        assert 0.8 <= run["delivered"] <= 1.1, run
        assert run["host_cores"] > 0 and run["engine_cores"] >= 0 and run["baseline_cores"] >= 0
        assert run["cores_per_participant"] == pytest.approx(
            (run["host_cores"] - run["baseline_cores"]) / run["participants"], abs=1e-4)
        if run["kind"] == "talkers":
            # Speech opens a turn on every speaker: its audio reaches the engine, a step per 80 ms
            # carries them all (the frame clock), and words come back.
            assert run["live_turns"] == run["participants"]
            assert 0.8 <= run["pushed"] <= 1.2, run
            assert 0.5 <= run["steps_per_frame"] <= 1.5, run
            # The free step's pattern writes a word every few frames: captions come back, and each
            # event's latency is taken from the audio it consumed.
            assert run["captions"] > 0 and run["latency_beyond_delay_ms"]["count"] > 0
        else:
            # Low noise: no turn, no engine step, and no caption.
            assert run["live_turns"] == 0 and run["steps_per_frame"] == 0 and run["captions"] == 0


def test_table_and_plot_are_written(host_report):
    report, plot, stdout = host_report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for run in report["runs"]:
        assert (f"| {run['kind']} | {run['path']} | in-process | {run['participants']} ({run['tracks']} x "
                f"{run['streams_per_track']}) | {run['host_cores']:.3f} |") in stdout


def test_an_earlier_runs_table_is_printed_again_from_its_json(host_report, tmp_path):
    report, _, stdout = host_report
    path = tmp_path / "host.json"
    path.write_text(json.dumps(report))
    result = captions("bench", "host", "--from-json", str(path), timeout=60)
    assert result.returncode == 0 and result.stdout.strip() in stdout


def test_bad_paths_and_no_microphones_are_refused_with_a_clear_error():
    result = captions("bench", "host", "--paths", "today,tomorrow", timeout=60)
    assert result.returncode == 2 and "expected some of today, new" in result.stderr
    result = captions("bench", "host", "--talkers", "0", "--silent", "0", timeout=60)
    assert result.returncode == 1 and "give some --talkers or --silent" in result.stderr


@pytest.mark.slow
def test_two_receiving_processes_over_the_engine_socket_are_measured_each(tiny_checkpoint, tmp_path):
    """`--receivers 2`: an engine process and two listeners through the real EngineClient, each with
    its share of the microphones, measured in the same window."""
    result = captions("bench", "host", "--model", str(tiny_checkpoint), "--talkers", "2", "--talker-k", "1",
                      "--silent", "0", "--receivers", "2", "--seconds", "2", "--json", str(tmp_path / "host.json"),
                      timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "host.json").read_text())
    assert [(r["engine"], r["receivers"], r["path"], len(r["processes"])) for r in report["runs"]] == [
        ("socket", 2, "new", 2)]
    two = report["runs"][0]
    assert sorted(p["index"] for p in two["processes"]) == [0, 1]
    assert len({p["pid"] for p in two["processes"]}) == 2
    for process in two["processes"]:
        # Each holds its own microphone's speaker, and its audio reaches the engine process's slot.
        assert process["participants"] == 1 and process["tracks"] == 1 and process["live_turns"] == 1
        assert 0.8 <= process["delivered"] <= 1.1 and 0.8 <= process["pushed"] <= 1.2, process
        assert process["host_cores"] > 0 and process["engine_cores"] == 0
        assert process["cores_per_participant"] == pytest.approx(process["host_cores"] - process["baseline_cores"],
                                                                 abs=1e-4)
        assert len(process["cpu_samples"]) == 4 and process["waited_for_cpu_cores"] >= 0
    engine = two["engine_process"]
    # Steps per 80 ms: at least one while someone talks, at most one per talker (2 s is too short to
    # ask for the frame clock's 1.0 when a talker pauses).
    assert engine["engine_cores"] > 0 and engine["server_cores"] > 0 and 0 < two["steps_per_frame"] <= 2.2, engine
    assert two["latency_beyond_delay_ms"]["count"] > 0
    assert two["parallel"]["listeners_cores"] == pytest.approx(sum(p["host_cores"] for p in two["processes"]),
                                                               abs=1e-3)
    machine = two["machine_cores"]
    assert machine["cores"] >= 1 and machine["busy"] > 0 and machine["worker"] > 0
    per_process = report["summary"]["talkers"]["over_socket"]["2"]["cores_per_participant_per_process"]
    assert per_process == [p["cores_per_participant"] for p in two["processes"]]
    assert "| talkers | 2 over socket | 1 | 1 |" in result.stdout


def test_receivers_need_a_microphone_each():
    result = captions("bench", "host", "--talkers", "1", "--silent", "0", "--receivers", "1", "2", timeout=60)
    assert result.returncode == 1 and "give at least 2 --talkers and --silent (or 0)" in result.stderr
