"""Who captions a room, and what the recovery does about it (pure logic; the real thing is in
test_failover.py)."""

from __future__ import annotations

import json
import shutil
import subprocess

from livekit import api

from captions.live.presence import HeartbeatWatch, captioners_in, elected
from captions.live.recovery import on_its_way, plan_room
from captions.protocol import (
    ATTR_AGENT_ALIVE,
    ATTR_AGENT_KEY,
    ATTR_AGENT_SINCE,
    CaptionerInfo,
    elected_captioner,
)
from captions.viewer.server import WEB_DIR

NOW_MS = 1_800_000_000_000
NOW_S = NOW_MS / 1000
AGENT = api.ParticipantInfo.Kind.AGENT


def speaker(identity: str = "alice") -> api.ParticipantInfo:
    return api.ParticipantInfo(identity=identity, joined_at_ms=NOW_MS - 60_000,
                               tracks=[api.TrackInfo(sid="TR_1", source=api.TrackSource.MICROPHONE)])


def captioner(identity: str, joined_ms: int, alive: str = "1", key: str = "k") -> api.ParticipantInfo:
    return api.ParticipantInfo(identity=identity, kind=AGENT, joined_at_ms=joined_ms,
                               attributes={ATTR_AGENT_KEY: key, ATTR_AGENT_ALIVE: alive})


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_heartbeat_that_stops_moving_goes_stale_on_the_observers_own_clock():
    clock = Clock()
    watch = HeartbeatWatch(stale_s=5.0, clock=clock)
    watch.observe("r\na", "1")
    assert not watch.stale("r\na") and not watch.stale("r\nunknown")
    clock.now = 4.0
    watch.observe("r\na", "2")  # it moved: alive
    clock.now = 8.9
    assert not watch.stale("r\na")
    clock.now = 9.0
    watch.observe("r\na", "2")
    assert watch.stale("r\na")
    watch.keep_only(set())
    assert not watch.stale("r\na"), "forgotten once gone"


def test_the_first_captioner_to_join_stays_and_ties_go_to_the_smaller_identity():
    assert elected_captioner([CaptionerInfo("b", 1), CaptionerInfo("a", 2)]).identity == "b"
    assert elected_captioner([CaptionerInfo("b", 1), CaptionerInfo("a", 1)]).identity == "a"
    assert elected_captioner([]) is None


def test_the_viewer_elects_the_same_captioner_as_the_workers():
    cases = [
        [("agent-b", 1000), ("agent-a", 2000)],
        [("agent-b", 1000), ("agent-a", 1000)],
        [("agent-z", 5), ("agent-y", None), ("agent-x", 7)],
    ]
    script = ("import { electedCaptioner } from './protocol.js';"
              "const cases = JSON.parse(process.argv[1]);"
              "console.log(JSON.stringify(cases.map((agents) => electedCaptioner(agents.map(([identity, since]) => "
              "({identity, attributes: since === null ? {'captions.key': 'k'} "
              ": {'captions.key': 'k', 'captions.since': String(since)}}))).identity)));")
    result = subprocess.run([shutil.which("node"), "--input-type=module", "-e", script, json.dumps(cases)],
                            cwd=WEB_DIR, capture_output=True, text=True, timeout=30, check=True)
    in_python = [elected_captioner([CaptionerInfo(i, s if s is not None else 2**62) for i, s in case]).identity
                 for case in cases]
    assert json.loads(result.stdout) == in_python


def test_only_agents_that_announced_a_caption_key_are_captioners():
    assistant = api.ParticipantInfo(identity="voice-assistant", kind=AGENT, joined_at_ms=NOW_MS - 60_000,
                                    attributes={"lk.agent_name": "assistant"})
    found = captioners_in([speaker(), assistant, captioner("agent-1", NOW_MS - 5000)])
    assert [c.identity for c in found] == ["agent-1"]
    assert elected(found).since_ms == NOW_MS - 5000


def test_a_room_with_a_speaker_and_no_captioner_needs_one():
    plan = plan_room("r", [speaker()], HeartbeatWatch(), NOW_MS)
    assert plan.needs_captioner and not plan.remove_stale and not plan.remove_duplicates


def test_a_room_without_a_speaker_needs_no_captioner():
    listener = api.ParticipantInfo(identity="listener", joined_at_ms=NOW_MS - 60_000)
    assert not plan_room("r", [listener], HeartbeatWatch(), NOW_MS).needs_captioner


def test_a_live_captioner_is_left_alone():
    plan = plan_room("r", [speaker(), captioner("agent-1", NOW_MS - 5000)], HeartbeatWatch(), NOW_MS)
    assert not plan.needs_captioner and not plan.remove_stale and not plan.remove_duplicates


def test_a_dead_captioner_is_removed_and_replaced():
    clock = Clock()
    watch = HeartbeatWatch(stale_s=5.0, clock=clock)
    room = [speaker(), captioner("agent-dead", NOW_MS - 60_000, alive="7")]
    assert not plan_room("r", room, watch, NOW_MS).needs_captioner
    clock.now = 6.0  # its heartbeat never moved again
    plan = plan_room("r", room, watch, NOW_MS)
    assert plan.remove_stale == ["agent-dead"] and plan.needs_captioner


def test_of_two_live_captioners_the_later_one_is_removed():
    room = [speaker(), captioner("agent-a", NOW_MS - 1000), captioner("agent-b", NOW_MS - 2000)]
    plan = plan_room("r", room, HeartbeatWatch(), NOW_MS)
    assert plan.remove_duplicates == ["agent-a"] and not plan.needs_captioner


def test_an_agent_still_joining_is_given_time_before_another_is_dispatched():
    joining = api.ParticipantInfo(identity="agent-new", kind=AGENT, joined_at_ms=NOW_MS - 2000)
    assert not plan_room("r", [speaker(), joining], HeartbeatWatch(), NOW_MS).needs_captioner
    long_there = api.ParticipantInfo(identity="other-agent", kind=AGENT, joined_at_ms=NOW_MS - 60_000)
    assert plan_room("r", [speaker(), long_there], HeartbeatWatch(), NOW_MS).needs_captioner


def test_since_attribute_is_what_viewers_read():
    info = captioner("agent-1", NOW_MS)
    info.attributes[ATTR_AGENT_SINCE] = str(NOW_MS)
    assert captioners_in([info])[0].since_ms == int(info.attributes[ATTR_AGENT_SINCE])


def dispatch(age_s: float, *joined: str) -> api.AgentDispatch:
    state = api.AgentDispatchState(created_at=int((NOW_S - age_s) * 1e9))  # the server's nanoseconds
    for identity in joined:
        state.jobs.append(api.Job(state=api.JobState(participant_identity=identity)))
    return api.AgentDispatch(room="r", state=state)


def test_a_recent_dispatch_holds_a_new_one_back_until_its_captioner_came_and_went():
    assert on_its_way(dispatch(2.0), set(), now=NOW_S), "no job yet: the captioner is on its way"
    assert on_its_way(dispatch(2.0, "agent-1"), {"agent-1", "alice"}, now=NOW_S)
    assert not on_its_way(dispatch(2.0, "agent-1"), {"alice"}, now=NOW_S), "it came and left"
    assert not on_its_way(dispatch(60.0), set(), now=NOW_S), "too old to still be coming"
