"""The room's audio loop never waits for the disk (issue 23): a final goes to the transcript's writer
thread and is published once written, or at WRITE_WAIT_S if the disk is slow; captions behind it keep
their order. A fake room (no LiveKit): only `RoomCaptioner.caption` and its release task run."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from captions.live import room as room_module
from captions.live.room import RoomCaptioner, RoomOptions
from captions.live.segmenter import CaptionUpdate
from captions.live.transcripts import read_transcript, transcript_path
from captions.stt.api import Word

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]


class FakeRoom:
    name = "stalled-disk"
    local_participant = SimpleNamespace(identity="agent-1")


def captioner_for(tmp_path: Path) -> tuple[RoomCaptioner, list[tuple[str, bool]]]:
    captioner = RoomCaptioner(FakeRoom(), slots=None, options=RoomOptions(data_dir=tmp_path))
    published: list[tuple[str, bool]] = []
    captioner._publisher.put = lambda c: published.append((c.update.segment_id, c.update.final))
    captioner._spawn(captioner._release_held_forever(), "transcript-wait")
    return captioner, published


SPEAKER = SimpleNamespace(identity="alice", name="Alice", track_sid="TR_1")


def final(segment_id: str) -> CaptionUpdate:
    return CaptionUpdate(segment_id, "hello there", True, [Word("hello", 0.0, 0.4), Word("there", 0.5, 0.9)])


async def until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_a_stalled_disk_does_not_hold_the_audio_loop_and_finals_wait_for_it_in_order(tmp_path, monkeypatch):
    stalled, release, real_fsync = threading.Event(), threading.Event(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (stalled.set(), release.wait(), real_fsync(fd)))
    captioner, published = captioner_for(tmp_path)
    captioner.caption(SPEAKER, final("SG_1"), wall_time=lambda t: 1000 + t)  # returns: the disk is not waited on
    captioner.caption(SPEAKER, CaptionUpdate("SG_2", "next", False), wall_time=lambda t: 1000 + t)
    await asyncio.to_thread(stalled.wait, 30)
    for _ in range(20):
        await asyncio.sleep(0)  # the release task runs; nothing may be published before the write
    assert published == [], "a final is not published before it is written, nor what follows it"
    release.set()
    await until(lambda: len(published) == 2)
    assert published == [("SG_1", True), ("SG_2", False)], "in the order they were made"
    assert [s.segment_id for s in read_transcript(transcript_path(tmp_path, FakeRoom.name))] == ["SG_1"]
    await asyncio.to_thread(captioner.transcript.close)


async def test_a_final_is_published_at_its_deadline_when_the_disk_does_not_answer(tmp_path, monkeypatch):
    release, real_fsync = threading.Event(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (release.wait(), real_fsync(fd)))
    monkeypatch.setattr(room_module, "WRITE_WAIT_S", 0.0)  # its deadline has passed when it is made
    captioner, published = captioner_for(tmp_path)
    captioner.caption(SPEAKER, final("SG_1"), wall_time=lambda t: 1000 + t)
    await until(lambda: published == [("SG_1", True)])  # live, while the disk still holds its write
    release.set()
    await asyncio.to_thread(captioner.transcript.close)
    assert [s.segment_id for s in read_transcript(transcript_path(tmp_path, FakeRoom.name))] == ["SG_1"], \
        "its write still completes"


class ListeningRoom(FakeRoom):
    """Enough of an rtc.Room for `RoomCaptioner.start` and `claim`: nobody in it yet."""

    name = "claiming"

    def __init__(self) -> None:
        self.remote_participants: dict = {}
        self.local_participant = SimpleNamespace(identity="agent-1", set_attributes=self._set_attributes)
        self.attributes: dict[str, str] = {}

    async def _set_attributes(self, attributes: dict[str, str]) -> None:
        self.attributes.update(attributes)

    def on(self, event: str, handler) -> None:
        pass

    def isconnected(self) -> bool:
        return True


@pytest.mark.parametrize("won", [True, False])
async def test_captions_made_while_the_claim_is_asked_wait_then_go_out_in_order_or_nowhere(tmp_path, monkeypatch, won):
    """The captioner listens before it asks whether the room is its own (issue 23: a slow server API
    cost a room its first words): what it captions meanwhile is kept, then published and written in
    order if the room is its own, or neither if another captioner has it."""
    answer = asyncio.Event()

    async def slow_claim(room_name, identity, client, caption_key) -> bool:
        await answer.wait()
        return won

    monkeypatch.setattr(room_module, "claim_room", slow_claim)
    credentials = SimpleNamespace(client=lambda: SimpleNamespace(aclose=lambda: asyncio.sleep(0)))
    captioner = RoomCaptioner(ListeningRoom(), slots=None, options=RoomOptions(data_dir=tmp_path, livekit=credentials))
    published: list[tuple[str, bool]] = []
    captioner._publisher.put = lambda c: published.append((c.update.segment_id, c.update.final))
    await captioner.start(claiming=True)
    claiming = asyncio.create_task(captioner.claim())
    captioner.caption(SPEAKER, CaptionUpdate("SG_1", "hello", False), wall_time=lambda t: 1000 + t)
    captioner.caption(SPEAKER, final("SG_1"), wall_time=lambda t: 1000 + t)
    captioner.caption(SPEAKER, CaptionUpdate("SG_2", "and", False), wall_time=lambda t: 1000 + t)
    await asyncio.sleep(0.2)
    assert published == [], "nothing goes out before the room is known to be this captioner's"
    answer.set()
    assert await claiming is won
    if won:
        await until(lambda: len(published) == 3)
        assert published == [("SG_1", False), ("SG_1", True), ("SG_2", False)]
    await captioner.aclose()
    written = [s.segment_id for s in read_transcript(transcript_path(tmp_path, ListeningRoom.name))]
    assert written == (["SG_1"] if won else [])
    if not won:
        assert published == [], "a captioner that lost the room published nothing"


async def test_a_superseded_captioner_withdraws_even_without_the_change_event_and_does_not_spin(tmp_path):
    """The recovery's mark can come while the captioner is stalled, or with a reconnection's join
    rather than as a change event: the heartbeat looks at it every beat. Once withdrawing, the status
    loop keeps its pace (it used to spin at full speed on a beat that never advanced)."""
    room = ListeningRoom()
    room.local_participant.attributes = {"captions.superseded": "stale"}
    withdrawn = asyncio.Event()
    captioner = RoomCaptioner(room, slots=None, options=RoomOptions(data_dir=tmp_path), on_superseded=withdrawn.set)
    built = 0
    real = captioner._status_attributes

    def counting():
        nonlocal built
        built += 1
        return real()

    captioner._status_attributes = counting
    await captioner.start()
    await asyncio.wait_for(withdrawn.wait(), 3.0)
    built = 0
    await asyncio.sleep(1.0)
    assert built <= 5, f"the status loop ran {built} times in a second"
    await captioner.aclose()
