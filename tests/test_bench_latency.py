"""`captions bench latency`, run as a user runs it, with tiny settings (one speaker, a few seconds):
a real livekit-server, the real worker and WebRTC bots. The JSON it writes holds the documented
figures, consistent with each other. No timing targets here: figures vary by machine and load."""

from __future__ import annotations

import json

import pytest

from tests.test_bench import captions

pytestmark = [pytest.mark.livekit, pytest.mark.timeout(400)]

COMPONENTS = ["transport", "queue", "step", "agent", "delivery"]


@pytest.fixture(scope="module")
def latency_report(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-latency")
    result = captions("bench", "latency", "--model", str(tiny_checkpoint), "--speakers", "1",
                      "--seconds", "4", "--workdir", str(out / "work"), "--json", str(out / "latency.json"),
                      "--plot", str(out / "latency.png"), timeout=360)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "latency.json").read_text()), out / "latency.png", result.stdout


def test_json_describes_the_machine_and_the_settings(latency_report):
    report, _, _ = latency_report
    machine = report["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] >= 1 and machine["ram_gib"] > 0
    assert machine["date"][:2] == "20" and machine["torch"] and len(machine["load_average_at_start"]) == 3
    assert report["settings"]["speakers"] == [1] and report["settings"]["seconds_per_speaker"] == 4
    # The model's own text delay is reported beside the figures (the tiny checkpoint's config: 0.5 s).
    assert report["model_text_delay_s"] == pytest.approx(0.5)


def test_every_word_update_has_a_latency_whose_parts_add_up(latency_report):
    report, _, _ = latency_report
    [run] = report["runs"]
    assert run["speakers"] == 1 and run["speakers_captioned"] == 1
    assert run["word_updates"] > 0 and run["captions_received"] >= run["word_updates"]
    assert set(run["skipped_updates"].values()) == {0}, run["skipped_updates"]
    latency = run["latency_ms"]
    for key in ["total", *COMPONENTS]:
        assert latency[key]["count"] == run["word_updates"]
        assert latency[key]["p50"] <= latency[key]["p95"] <= latency[key]["p99"]
    # Means add up exactly; each sample too (a caption's parts telescope to its total).
    parts = sum(latency[key]["mean"] for key in COMPONENTS)
    assert parts == pytest.approx(latency["total"]["mean"], abs=0.01)
    samples = run["samples_ms"]
    for i, total in enumerate(samples["total"]):
        assert sum(samples[key][i] for key in COMPONENTS) == pytest.approx(total, abs=0.1)
    assert latency["agent"]["mean"] == pytest.approx(
        latency["agent_hop"]["mean"] + latency["agent_publish_queue"]["mean"], abs=0.01)
    # Stepping and publishing take time; a step never ends before it starts.
    assert latency["step"]["p50"] > 0 and latency["delivery"]["p50"] > 0
    assert latency["total"]["p50"] > 0


def test_alignment_was_measured_from_the_recording(latency_report):
    report, _, _ = latency_report
    alignment = report["runs"][0]["alignment"]
    assert alignment["speakers_measured"] == 1 and alignment["speakers_onset_only"] == 0
    assert alignment["reliable"] is True and alignment["onset_error_ms"]["count"] == 1
    assert alignment["per_speaker"]["speaker-00"]["anchors"] > 0


def test_plot_and_table_are_written(latency_report):
    report, plot, stdout = latency_report
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    rows = [line for line in stdout.splitlines() if line.startswith("| 1 |")]
    assert len(rows) == 1 and str(report["runs"][0]["word_updates"]) in rows[0]


def test_a_run_whose_alignment_was_lost_gets_no_verdict_on_the_target():
    # Lost alignment means wrong capture times: a saturated machine must not read as a figure.
    from captions.bench.latency.report import targets

    def run(p95: float, reliable: bool) -> dict:
        return {"speakers": 8, "frames": "shared", "latency_ms": {"total": {"p95": p95}},
                "alignment": {"reliable": reliable}}

    assert targets([run(134.0, True)])["p95_at_8_speakers_at_most_150_ms"] is True
    assert targets([run(216.0, True)])["p95_at_8_speakers_at_most_150_ms"] is False
    lost = targets([run(-80.0, False)])
    assert lost["p95_at_8_speakers_at_most_150_ms"] is None and lost["alignment_reliable"] is False


@pytest.mark.parametrize("args, message", [
    (["--speakers", "1,eight"], "comma-separated integers"),
    (["--speakers", "0"], "positive integers"),
    (["--seconds", "0.1"], "between 1 and 600"),
    (["--model", "/nonexistent/checkpoint"], "does not exist"),
])
def test_bad_input_gets_a_clear_error(args, message):
    result = captions("bench", "latency", *args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_translation_on_is_compared_with_off_on_the_originals_and_its_finals_delays_are_measured():
    """`--translate de`'s analysis, on made-up captions: the originals' figures leave the translations
    out; each translated final's delay after its original; untranslated and missing finals counted;
    the comparison pairs each translating run with the run without; the 150 ms target reads the run
    without translation."""
    from captions.bench.latency.report import (
        markdown_table,
        originals,
        targets,
        translation_comparisons,
        translation_summary,
    )
    from captions.bench.latency.session import Session
    from captions.dev.bots import Caption

    def caption(segment: str, text: str, final: bool, at: float, order: int, **translation: str) -> Caption:
        attributes = {}
        if translation:
            attributes = {"translated": "true", "language": translation["language"],
                          "captions.source_segment": translation["source"],
                          "captions.untranslated": translation.get("untranslated", "")}
        return Caption(text, segment, "TR_a", final, "speaker-00", attributes, at, order)

    captions = [caption("SG_1", "hello", False, 10.0, 1), caption("SG_1", "hello there", True, 10.5, 2),
                caption("SG_1-de", "hallo", False, 10.3, 3, language="de", source="SG_1"),
                caption("SG_1-de", "hallo da", True, 10.7, 4, language="de", source="SG_1"),
                caption("SG_2", "bye", True, 12.0, 5),
                caption("SG_2-de", "bye", True, 15.0, 6, language="de", source="SG_2", untranslated="timeout"),
                caption("SG_3", "again", True, 13.0, 7)]
    session = Session(1, {}, {}, {}, {}, captions, [], [], [], {}, {}, reading=("de",))
    assert [c.segment_id for c in originals(captions)] == ["SG_1", "SG_1", "SG_2", "SG_3"]
    summary = translation_summary(session)
    german = summary["per_language"]["de"]
    assert (german["original_finals"], german["translated_finals"], german["untranslated_finals"],
            german["missing_finals"], german["interims_received"]) == (3, 2, 1, 1, 1)
    assert sorted(german["samples_ms"]) == pytest.approx([200.0, 3000.0])

    def run(p50: float, p95: float, translation: dict | None = None, round_: int = 1) -> dict:
        return {"speakers": 8, "frames": "shared", "translation": translation, "word_updates": 10, "round": round_,
                "latency_ms": {"total": {"count": 10, "p50": p50, "p95": p95}},
                "samples_ms": {"total": [p50] * 10}, "alignment": {"reliable": True}}

    runs = [run(60.0, 120.0), run(64.0, 130.0, summary)]
    [comparison] = translation_comparisons(runs)
    assert comparison["round"] == 1
    assert comparison["originals_off_ms"]["p95"] == 120.0 and comparison["originals_on_ms"]["p95"] == 130.0
    assert comparison["originals_change_ms"] == {"p50": 4.0, "p95": 10.0}
    assert comparison["translated_final_delay_ms"]["count"] == 2
    assert (comparison["translated_finals"], comparison["untranslated_finals"], comparison["missing_finals"]) == \
        (2, 1, 1)
    assert targets(runs)["p95_ms_at_8_speakers"] == 120.0, "the target reads the run without translation"
    table = markdown_table({"runs": [], "translation_comparisons": [comparison]})
    assert "| 8 | shared | 1 | de | 60.0 / 120.0 | 64.0 / 130.0 | +4.0 / +10.0 |" in table
    # A second round (on first this time) pairs with its own off run; every sample together is round "all".
    runs += [run(70.0, 140.0, summary, 2), run(50.0, 100.0, None, 2)]
    first, second, pooled = translation_comparisons(runs)
    assert (first["round"], second["round"], pooled["round"]) == (1, 2, "all")
    assert second["originals_change_ms"] == {"p50": 20.0, "p95": 40.0}
    assert pooled["originals_off_ms"]["count"] == 20 and pooled["translated_finals"] == 4
