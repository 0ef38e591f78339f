"""Who captions a room, and what the recovery does about it (pure logic; the real thing is in
test_failover.py)."""

from __future__ import annotations

from livekit import api

from captions.live.presence import GONE_S, HeartbeatWatch, captioners_in, elected
from captions.live.recovery import RECOVERY_METADATA, never_taken, on_its_way, plan_room
from captions.protocol import (
    ATTR_AGENT_ALIVE,
    ATTR_AGENT_CLAIM,
    ATTR_AGENT_SUPERSEDED,
    CaptionerInfo,
    CaptionSigner,
    elected_captioner,
)

NOW_MS = 1_800_000_000_000
NOW_S = NOW_MS / 1000
AGENT = api.ParticipantInfo.Kind.AGENT
POOL = CaptionSigner.for_deployment("secret", "")
KEY = POOL.public_key


def speaker(identity: str = "alice") -> api.ParticipantInfo:
    return api.ParticipantInfo(identity=identity, joined_at_ms=NOW_MS - 60_000,
                               tracks=[api.TrackInfo(sid="TR_1", source=api.TrackSource.MICROPHONE)])


def captioner(identity: str, joined_ms: int, alive: str = "1", signer: CaptionSigner = POOL,
              room: str = "r") -> api.ParticipantInfo:
    """A caption agent as the server lists it: join time in seconds and milliseconds, as the server
    sets both, and a claim by `signer` (this pool's key by default)."""
    return api.ParticipantInfo(identity=identity, kind=AGENT, joined_at=joined_ms // 1000, joined_at_ms=joined_ms,
                               attributes={ATTR_AGENT_CLAIM: signer.claim(room, identity), ATTR_AGENT_ALIVE: alive})


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


def test_only_agents_whose_claim_this_pools_key_signed_are_captioners():
    assistant = api.ParticipantInfo(identity="voice-assistant", kind=AGENT, joined_at_ms=NOW_MS - 60_000,
                                    attributes={"lk.agent_name": "assistant"})
    other_pool = captioner("agent-other-pool", NOW_MS - 90_000, signer=CaptionSigner.for_deployment("secret", "b"))
    self_signed = captioner("agent-rogue", NOW_MS - 90_000, signer=CaptionSigner())
    copied = captioner("agent-copycat", NOW_MS - 90_000)
    copied.attributes[ATTR_AGENT_CLAIM] = POOL.claim("r", "agent-1")  # a real claim, of another identity
    other_room = captioner("agent-2", NOW_MS - 90_000, room="another-room")
    not_an_agent = captioner("alice-pretends", NOW_MS - 90_000)
    not_an_agent.kind = api.ParticipantInfo.Kind.STANDARD
    found = captioners_in([speaker(), assistant, other_pool, self_signed, copied, other_room, not_an_agent,
                           captioner("agent-1", NOW_MS - 5000)], "r", KEY)
    assert [c.identity for c in found] == ["agent-1"]
    assert elected(found).joined_s == (NOW_MS - 5000) // 1000


def test_a_room_with_a_speaker_and_no_captioner_needs_one():
    plan = plan_room("r", [speaker()], HeartbeatWatch(), NOW_MS, KEY)
    assert plan.needs_captioner and not plan.remove_stale and not plan.remove_duplicates


def test_a_room_without_a_speaker_needs_no_captioner():
    listener = api.ParticipantInfo(identity="listener", joined_at_ms=NOW_MS - 60_000)
    assert not plan_room("r", [listener], HeartbeatWatch(), NOW_MS, KEY).needs_captioner


def test_a_live_captioner_is_left_alone():
    plan = plan_room("r", [speaker(), captioner("agent-1", NOW_MS - 5000)], HeartbeatWatch(), NOW_MS, KEY)
    assert not plan.needs_captioner and not plan.remove_stale and not plan.remove_duplicates


def test_a_captioner_whose_heartbeat_stops_is_superseded_at_once_and_removed_only_when_gone():
    """Four missed beats: replaced at once (a new captioner is dispatched, the old one is marked and
    no longer elected) but not removed: a captioner whose loop was only blocked flushes its open
    captions and leaves by itself. Removed once silent as long as LiveKit keeps a dropped one."""
    clock = Clock()
    watch = HeartbeatWatch(stale_s=4.0, clock=clock)
    dead = captioner("agent-dead", NOW_MS - 60_000, alive="7")
    room = [speaker(), dead]
    assert not plan_room("r", room, watch, NOW_MS, KEY).needs_captioner
    clock.now = 4.0  # its heartbeat never moved again
    plan = plan_room("r", room, watch, NOW_MS, KEY)
    assert plan.supersede == ["agent-dead"] and plan.needs_captioner and plan.remove_stale == []
    dead.attributes[ATTR_AGENT_SUPERSEDED] = "stale"  # what the recovery's UpdateParticipant does
    clock.now = 10.0
    plan = plan_room("r", room, watch, NOW_MS, KEY)
    assert plan.supersede == [] and plan.needs_captioner and plan.remove_stale == []
    clock.now = 4.0 + GONE_S
    plan = plan_room("r", room, watch, NOW_MS, KEY)
    assert plan.remove_stale == ["agent-dead"]


def test_a_superseded_captioner_is_never_elected_even_if_its_heartbeat_comes_back():
    back = captioner("agent-old", NOW_MS - 60_000, alive="8")
    back.attributes[ATTR_AGENT_SUPERSEDED] = "stale"
    plan = plan_room("r", [speaker(), back, captioner("agent-new", NOW_MS - 1000)], HeartbeatWatch(), NOW_MS, KEY)
    assert not plan.needs_captioner and not plan.remove_duplicates, "the new one captions; the old one leaves"
    assert elected(captioners_in([back, captioner("agent-new", NOW_MS - 1000)], "r", KEY)).identity == "agent-new"


def test_of_two_live_captioners_the_later_one_is_removed():
    room = [speaker(), captioner("agent-a", NOW_MS - 1000), captioner("agent-b", NOW_MS - 2000)]
    plan = plan_room("r", room, HeartbeatWatch(), NOW_MS, KEY)
    assert plan.remove_duplicates == ["agent-a"] and not plan.needs_captioner


def test_an_agent_still_joining_is_given_time_before_another_is_dispatched():
    joining = api.ParticipantInfo(identity="agent-new", kind=AGENT, joined_at_ms=NOW_MS - 2000)
    assert not plan_room("r", [speaker(), joining], HeartbeatWatch(), NOW_MS, KEY).needs_captioner
    long_there = api.ParticipantInfo(identity="other-agent", kind=AGENT, joined_at_ms=NOW_MS - 60_000)
    assert plan_room("r", [speaker(), long_there], HeartbeatWatch(), NOW_MS, KEY).needs_captioner


def test_an_agent_that_claims_an_early_start_does_not_displace_the_captioner():
    """What a participant says about itself (a `captions.since` of 0, say) counts for nothing: the
    election reads the server's join time of captioners whose claim verifies."""
    rogue = captioner("agent-rogue", NOW_MS - 1000, signer=CaptionSigner())
    rogue.attributes["captions.since"] = "0"
    room = [speaker(), captioner("agent-real", NOW_MS - 60_000), rogue]
    plan = plan_room("r", room, HeartbeatWatch(), NOW_MS, KEY)
    assert not plan.remove_duplicates and not plan.remove_stale and not plan.needs_captioner


def test_another_pools_captioners_are_never_removed_nor_counted():
    """Two caption pools (agent names) in one room: neither evicts the other, each needs its own."""
    theirs = captioner("agent-b-pool", NOW_MS - 90_000, signer=CaptionSigner.for_deployment("secret", "b"))
    plan = plan_room("r", [speaker(), theirs, captioner("agent-mine", NOW_MS - 1000)], HeartbeatWatch(), NOW_MS,
                     KEY)
    assert not plan.remove_duplicates and not plan.needs_captioner
    plan = plan_room("r", [speaker(), theirs], HeartbeatWatch(), NOW_MS, KEY)
    assert plan.needs_captioner and not plan.remove_duplicates


def dispatch(age_s: float, *joined: str, metadata: str = RECOVERY_METADATA) -> api.AgentDispatch:
    state = api.AgentDispatchState(created_at=int((NOW_S - age_s) * 1e9))  # the server's nanoseconds
    for identity in joined:
        state.jobs.append(api.Job(state=api.JobState(participant_identity=identity)))
    return api.AgentDispatch(room="r", state=state, metadata=metadata)


def test_a_recent_dispatch_holds_a_new_one_back_until_its_captioner_came_and_went():
    assert on_its_way(dispatch(2.0), set(), now=NOW_S), "no job yet: the captioner is on its way"
    assert on_its_way(dispatch(2.0, "agent-1"), {"agent-1", "alice"}, now=NOW_S)
    assert not on_its_way(dispatch(2.0, "agent-1"), {"alice"}, now=NOW_S), "it came and left"
    assert not on_its_way(dispatch(60.0), set(), now=NOW_S), "too old to still be coming"


def test_a_dispatch_that_no_worker_took_gets_a_sibling_and_is_deleted_once_livekit_gave_up():
    """livekit-server offers a job to one worker, waits 10 s for its answer and does not try another
    on a timeout: a frozen worker (its connection still open) swallowed the recovery's dispatch, and
    the room went without captions until the next one (CI: 26 s without a captioner)."""
    assert not on_its_way(dispatch(4.0), set(), now=NOW_S), "untaken after 4 s: dispatch another beside it"
    assert on_its_way(dispatch(4.0, "agent-1"), {"agent-1"}, now=NOW_S), "taken: its captioner is starting"
    assert never_taken(dispatch(13.0), now=NOW_S)
    assert not never_taken(dispatch(5.0), now=NOW_S), "LiveKit may still be waiting for an answer"
    assert not never_taken(dispatch(13.0, "agent-1"), now=NOW_S), "taken once: kept"
    assert not never_taken(dispatch(60.0, metadata="the operator's"), now=NOW_S), "not ours to delete"
