"""`captions bench meeting`: the seeded meeting follows its turn-taking rules, and a tiny meeting run
as a user runs it writes a JSON whose counts add up (nothing is lost at 3 participants and 2 slots).
No timing targets here: figures vary by machine."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from captions.bench.meeting import END_MARGIN_S, START_S, plan_meeting
from captions.bench.meeting.analysis import longest_gap
from captions.bench.meeting.scenario import NONSTOP_GAP_S, plan_rooms
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


def test_several_rooms_are_seeded_meetings_and_the_nonstop_talkers_never_pause_long():
    plan = plan_rooms(3, 4, 60.0, seed=2, bank=FakeBank(), nonstop=2)
    assert plan == plan_rooms(3, 4, 60.0, seed=2, bank=FakeBank(), nonstop=2)
    assert plan.participants == 3 * 4 + 2 and plan.rooms == [0] * 6 + [1] * 4 + [2] * 4
    assert plan.nonstop == [4, 5] and plan.room_count == 3
    alone = plan_meeting(4, 60.0, seed=2, bank=FakeBank())
    assert [u for u in plan.utterances if u.participant < 4] == alone.utterances, "room 0 is the one-room meeting"
    for room in (1, 2):
        assert {u.participant for u in plan.utterances if plan.room_of(u.participant) == room}, f"room {room} talks"
    for p in plan.nonstop:
        said = sorted((u for u in plan.utterances if u.participant == p), key=lambda u: u.onset)
        assert {u.kind for u in said} == {"monologue"}
        assert said[0].onset <= (START_S + 1) * SAMPLE_RATE and said[-1].end >= (60 - END_MARGIN_S - 10) * SAMPLE_RATE
        pauses = [b.onset - a.end for a, b in itertools.pairwise(said)]
        assert max(pauses) <= NONSTOP_GAP_S[1] * SAMPLE_RATE, "never a pause that ends a turn"


def test_the_longest_caption_gap_counts_only_speech_between_two_captions():
    speech = [(0.0, 5.0), (10.0, 12.0), (11.0, 11.5)]
    assert longest_gap(speech, [1.0, 2.0, 11.0], 0.0, 20.0) == (4.0, 2.0), "2-5 and 10-11, between 2 and 11"
    assert longest_gap(speech, [], 0.0, 20.0) == (7.0, 0.0), "never captioned: all its speech"
    assert longest_gap([], [1.0], 0.0, 20.0) == (None, None)


@pytest.mark.slow
def test_several_rooms_with_a_nonstop_talker_report_each_room(tiny_checkpoint, tmp_path):
    result = captions("bench", "meeting", "--model", str(tiny_checkpoint), "--participants", "2", "--rooms", "2",
                      "--nonstop", "1", "--seconds", "16", "--max-turn-hold", "4", "--batch-size", "2",
                      "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "m.json").read_text())
    [run] = report["results"]
    assert report["settings"]["rooms"] == 2 and report["settings"]["max_turn_hold_s"] == 4.0
    rooms = run["rooms"]
    assert [r["room"] for r in rooms] == [0, 1] and [r["nonstop"] for r in rooms] == [1, 0]
    assert sum(r["participants"] for r in rooms) == run["participants"] == 5
    assert sum(r["utterances"] for r in rooms) == run["coverage"]["utterances"]
    assert sum(r["streams"] for r in rooms) == run["words"]["streams"]
    assert sum(r["yields"] for r in rooms) == sum(t["continues"] for t in run["turns"])
    for r in rooms:
        assert r["lossless"] and r["utterances_covered"] == r["utterances"] and r["streams_equal"] == r["streams"]
        assert r["longest_caption_gap_s"] is not None, "every room talked and was captioned"
    assert "| room |" in result.stdout
