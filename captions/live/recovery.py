"""Rooms keep a captioner through worker crashes, restarts and deploys.

Open-source livekit-server dispatches a room's agent job once (when the room is created, or on the
CreateDispatch API) and drops it when the worker's connection drops: a room whose worker died, or
that was created while no worker was up, stays uncaptioned for good. So every worker reconciles
what should be with what is, through LiveKit's own server API, every `interval_s`:

* every room with a speaker (a non-agent participant publishing a microphone) should have one live
  captioner: a caption agent (presence.py) whose heartbeat still moves;
* a captioner whose heartbeat stopped for `STALE_S` is superseded (the server API marks it): it is
  no longer elected, so a new one is dispatched at once; if it was only slow (a loop blocked for
  seconds) it sees the mark, flushes its open captions and leaves; if its worker died, it is removed
  after `GONE_S`, as LiveKit itself would;
* when two live captioners are in a room, the one `elected_captioner` does not choose is removed;
* a room with a speaker and no captioner gets a new dispatch (CreateDispatch), unless one was made
  in the last `DISPATCH_GRACE_S` (by any worker, or LiveKit's own at the room's creation): LiveKit
  stays the scheduler and picks the worker. With explicit dispatch (an agent name), only rooms that
  asked for this agent name (they hold a dispatch for it) are dispatched again.
* a dispatch that no worker took within `UNASSIGNED_S` gets a sibling: LiveKit may have offered it
  to a worker that cannot answer (a frozen process keeps its connection), and it waits for that
  answer (3 s measured, 10 s at most), then drops the job without trying another worker. The
  recovery's own dispatches that no worker took are deleted once that wait is over, so a room
  without any worker does not pile them up.

It runs in every worker: recovery lasts as long as one worker does, and a room cannot be captioned
without a worker anyway. It keeps no state that matters (the heartbeat timings are rebuilt by
watching), so it converges after a missed event, a worker restart, or a livekit-server restart.
Cost per worker and interval: one ListRooms, one ListParticipants per room with a publisher, and a
ListDispatch per room that needs a captioner.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from livekit import api

from captions.live.metrics import METRICS
from captions.live.presence import (
    API_ERRORS,
    GONE_S,
    HeartbeatWatch,
    LiveKitCredentials,
    captioners_in,
    elected,
    list_participants,
)
from captions.log import logger
from captions.protocol import ATTR_AGENT_SUPERSEDED, CaptionSigner

RECONCILE_INTERVAL_S = 1.5
DISPATCH_GRACE_S = 10.0
"""A dispatch this recent is still bringing its captioner (a job starts within a few seconds)."""
UNASSIGNED_S = 3.0
"""A dispatch that no worker took this long after its creation may be waiting on a worker that cannot
answer (livekit-server drops the job after 3 s measured, 10 s at most, without trying another
worker): dispatch another. Each dispatch is a new pick by load, so one soon goes to a live worker."""
OFFER_TIMEOUT_S = 12.0
"""livekit-server's wait for a worker's answer to a job offer (AssignJobTimeout, 10 s), with margin:
a dispatch older than this without a job was not taken by anyone."""
RECOVERY_METADATA = "captions recovery"
JOINING_S = 10.0
"""An agent that joined this recently and has not announced itself yet may be a captioner starting."""
MICROPHONE = 2  # TrackSource.MICROPHONE in LiveKit's protocol


@dataclass
class RoomPlan:
    """What one room needs: captioners to remove, and whether it needs a new one."""

    remove_stale: list[str]
    """Gone for `GONE_S`."""
    remove_duplicates: list[str]
    needs_captioner: bool
    supersede: list[str] = field(default_factory=list)
    """Their heartbeat stopped for `STALE_S`: mark them superseded (they flush and leave)."""


def has_speaker(participants: list[api.ParticipantInfo]) -> bool:
    return any(p.kind != api.ParticipantInfo.Kind.AGENT
               and any(t.source == MICROPHONE for t in p.tracks) for p in participants)


def plan_room(room: str, participants: list[api.ParticipantInfo], watch: HeartbeatWatch, now_ms: int,
              caption_key: str) -> RoomPlan:
    """The room's plan from one listing of its participants (and what `watch` saw before); only this
    pool's captioners (those whose claim verifies with `caption_key`) are ever removed."""
    captioners = captioners_in(participants, room, caption_key)
    for captioner in captioners:
        watch.observe(f"{room}\n{captioner.identity}", captioner.alive)
    stale = [c for c in captioners if watch.stale(f"{room}\n{c.identity}")]
    gone = [c.identity for c in stale if watch.stale(f"{room}\n{c.identity}", GONE_S)]
    supersede = [c.identity for c in stale if not c.superseded and c.identity not in gone]
    live = [c for c in captioners if c not in stale and not c.superseded]
    winner = elected(live)
    duplicates = [c.identity for c in live if c is not winner]
    joining = any(p.kind == api.ParticipantInfo.Kind.AGENT and not p.attributes
                  and now_ms - (p.joined_at_ms or p.joined_at * 1000) < JOINING_S * 1000 for p in participants)
    return RoomPlan(gone, duplicates, needs_captioner=winner is None and not joining and has_speaker(participants),
                    supersede=supersede)


def _dispatch_age_s(dispatch: api.AgentDispatch, now: float) -> float:
    created = dispatch.state.created_at
    # The server's field is nanoseconds; tolerate milliseconds or seconds too.
    seconds = created / 1e9 if created > 1e15 else created / 1e3 if created > 1e11 else float(created)
    return now - seconds


def _assigned(dispatch: api.AgentDispatch) -> list[str]:
    """The captioners a worker took this dispatch for (set when LiveKit assigns the job)."""
    return [job.state.participant_identity for job in dispatch.state.jobs if job.state.participant_identity]


def on_its_way(dispatch: api.AgentDispatch, present: set[str], now: float) -> bool:
    """A recent dispatch whose captioner has not come yet (or is still there): no new one for now.
    One whose agent came and left is done, however recent (a captioner that stopped at once); one that
    no worker took within `UNASSIGNED_S` may never be taken."""
    age = _dispatch_age_s(dispatch, now)
    if age >= DISPATCH_GRACE_S:
        return False
    joined = _assigned(dispatch)
    if not joined:
        return age < UNASSIGNED_S
    return any(identity in present for identity in joined)


def never_taken(dispatch: api.AgentDispatch, now: float) -> bool:
    """One of the recovery's own dispatches that no worker took: LiveKit has given up on it."""
    return (dispatch.metadata == RECOVERY_METADATA and not _assigned(dispatch)
            and _dispatch_age_s(dispatch, now) >= OFFER_TIMEOUT_S)


class Reconciler:
    """The recovery loop of one worker (see the module notes)."""

    def __init__(self, livekit: LiveKitCredentials, agent_name: str = "", interval_s: float = RECONCILE_INTERVAL_S,
                 active: Callable[[], bool] = lambda: True, caption_key: str | None = None):
        """`active()`: whether to act now (the worker is registered with LiveKit). `caption_key`: the
        pool's (its workers' signer's public key; by default derived from the API secret)."""
        self.livekit = livekit
        self.agent_name = agent_name
        self.interval_s = interval_s
        self.active = active
        self.watch = HeartbeatWatch()
        self.caption_key = caption_key or CaptionSigner.for_deployment(livekit.api_secret, agent_name).public_key
        """This pool's key: captioners of other pools (other agent names) are not ours to remove."""

    async def run(self) -> None:
        """Reconciles every `interval_s` (with jitter, so that workers do not act in step) until
        cancelled. A failed round, whatever the error (the API client raises more kinds than any list
        names), is logged and counted, and the next one tried: recovery never stops by itself."""
        client = self.livekit.client()
        try:
            while True:
                if self.active():
                    try:
                        await self.reconcile(client)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:  # noqa: BLE001 - see the docstring
                        METRICS.recovery("failed_round")
                        logger.warning("recovery: a round failed (%s: %s); trying again", type(e).__name__, e,
                                       exc_info=not isinstance(e, API_ERRORS))
                    await asyncio.sleep(self.interval_s * random.uniform(0.75, 1.25))
                else:
                    await asyncio.sleep(0.2)  # starts as soon as the worker registers
        finally:
            await client.aclose()

    async def reconcile(self, client: api.LiveKitAPI) -> None:
        rooms = (await client.room.list_rooms(api.ListRoomsRequest())).rooms
        seen: set[str] = set()
        for room in rooms:
            if room.num_publishers == 0:
                continue
            participants = await list_participants(client, room.name)
            seen |= {f"{room.name}\n{p.identity}" for p in participants}
            plan = plan_room(room.name, participants, self.watch, int(time.time() * 1000), self.caption_key)
            for identity in plan.supersede:
                await self._supersede(client, room.name, identity)
            for identity, why in [*((i, "stale") for i in plan.remove_stale),
                                  *((i, "duplicate") for i in plan.remove_duplicates)]:
                await self._remove(client, room.name, identity, why)
            if plan.needs_captioner:
                await self._dispatch(client, room.name, {p.identity for p in participants})
        self.watch.keep_only(seen)

    async def _supersede(self, client: api.LiveKitAPI, room: str, identity: str) -> None:
        logger.info("recovery: captioner %s of room %s missed its heartbeats: superseding it", identity, room)
        try:
            await client.room.update_participant(api.UpdateParticipantRequest(
                room=room, identity=identity, attributes={ATTR_AGENT_SUPERSEDED: "stale"}))
        except api.TwirpError as e:  # it left meanwhile
            logger.info("recovery: %s was already gone from %s (%s)", identity, room, e.message)
            return
        METRICS.recovery("supersede_stale")

    async def _remove(self, client: api.LiveKitAPI, room: str, identity: str, why: str) -> None:
        logger.info("recovery: removing %s captioner %s from room %s", why, identity, room)
        try:
            await client.room.remove_participant(api.RoomParticipantIdentity(room=room, identity=identity))
        except api.TwirpError as e:  # another worker removed it first, or it left
            logger.info("recovery: %s was already gone from %s (%s)", identity, room, e.message)
            return
        METRICS.recovery(f"remove_{why}")

    async def _dispatch(self, client: api.LiveKitAPI, room: str, present: set[str]) -> None:
        dispatches = await client.agent_dispatch.list_dispatch(room)
        mine = [d for d in dispatches if d.agent_name == self.agent_name]
        if self.agent_name and not mine:
            return  # explicit dispatch: this room never asked for this agent
        now = time.time()
        for stale in [d for d in mine if never_taken(d, now)]:
            try:
                await client.agent_dispatch.delete_dispatch(stale.id, room)
            except api.TwirpError as e:  # another worker deleted it first
                logger.debug("recovery: dispatch %s of %s already gone (%s)", stale.id, room, e.message)
        if any(on_its_way(d, present, now) for d in mine):
            return  # a captioner is on its way
        logger.info("recovery: room %s has a speaker and no captioner: dispatching one", room)
        await client.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(room=room, agent_name=self.agent_name, metadata=RECOVERY_METADATA))
        METRICS.recovery("dispatch")
