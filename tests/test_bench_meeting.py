"""`captions bench meeting`: the seeded meeting follows its turn-taking rules, and a tiny meeting run
as a user runs it writes a JSON whose counts add up (nothing is lost at 3 participants and 2 slots).
No timing targets here: figures vary by machine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from captions.bench.meeting import END_MARGIN_S, START_S, plan_meeting
from captions.stt.api import SAMPLE_RATE
from tests.test_bench import captions


class FakeBank:
    """Clips of noise whose length follows the text, without espeak-ng."""

    def clip(self, text: str, voice: int) -> np.ndarray:
        return np.ones(int((0.3 + 0.06 * len(text)) * SAMPLE_RATE), dtype=np.int16)


def test_the_meeting_is_seeded_and_keeps_its_turn_taking_rules():
    plan = plan_meeting(16, 90.0, seed=3, bank=FakeBank())
    assert plan == plan_meeting(16, 90.0, seed=3, bank=FakeBank())
    assert plan.utterances != plan_meeting(16, 90.0, seed=4, bank=FakeBank()).utterances
    assert plan.silent and not {u.participant for u in plan.utterances} & set(plan.silent)
    assert {u.kind for u in plan.utterances} == {"sentence", "back-channel"}
    assert all(START_S * SAMPLE_RATE <= u.onset < u.end <= (90 - END_MARGIN_S) * SAMPLE_RATE for u in plan.utterances)
    for a in plan.utterances:
        for b in plan.utterances:
            overlap = min(a.end, b.end) - max(a.onset, b.onset)
            if a is not b and a.participant == b.participant:
                assert overlap < 0, "nobody talks over themselves"
            elif a.kind == b.kind == "sentence" and a.participant != b.participant:
                assert overlap <= 1.0 * SAMPLE_RATE, "one main speaker at a time, overlapping by 1 s at most"


@pytest.mark.slow
def test_a_tiny_meeting_reports_consistent_figures(tiny_checkpoint, tmp_path):
    result = captions("bench", "meeting", "--model", str(tiny_checkpoint), "--participants", "3", "--seconds", "12",
                      "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json"),
                      "--plot", str(tmp_path / "m.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "m.json").read_text())
    [run] = report["results"]
    assert (run["participants"], run["batch_size"]) == (3, 2) and report["machine"]["cpu_cores"] >= 1
    assert run["participants_captioned"] <= run["participants_with_speech"] <= 3 - run["participants_silent"]
    coverage, words, rows = run["coverage"], run["words"], run["utterances"]
    assert coverage["utterances"] == len(rows) > 0 and coverage["speech_share_pushed"] is not None
    assert coverage["utterances_covered"] == sum(r["covered"] for r in rows) == len(rows), "every utterance captioned"
    assert coverage["samples_not_equal_to_signal"] == coverage["samples_pushed_twice"] == 0
    assert words["streams"] == len(run["turns"]) and words["said"] == words["captioned"]
    assert words["streams_equal"] == words["streams"] and run["lossless"]
    latency = run["first_word_latency_ms"]
    classes = ("held", "acquired", "waited")
    assert sum(latency[c]["count"] for c in classes) + latency["without_word"] == len(rows)
    assert all(r["class"] in classes for r in rows)
    assert 0 < run["slots"]["max"] <= 2 and run["occupancy"]
    assert report["largest_served"] in (None, 3)
    assert "| 3 (" in result.stdout and (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
