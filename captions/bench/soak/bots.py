"""The soak's child processes: the bots of the rooms and long-room scenarios, and the entry point of
every child (`python -m captions.bench.soak ROLE CONFIG`)."""


from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path

from captions.bench.common import (
    BenchError,
    run_child_process,
)
from captions.bench.soak.common import CAPTION_TIMEOUT_S, SUBSCRIBE_TIMEOUT_S, emit
from captions.bench.soak.hour import _hour

# ---- child processes: the bots ----------------------------------------------------------------------



async def _wait_final(listener, identity: str, count: int) -> bool:
    with contextlib.suppress(TimeoutError):
        await listener.wait_until(lambda: len(listener.finals(identity)) >= count, CAPTION_TIMEOUT_S,
                                  f"a final caption of {identity}")
        return True
    return False


async def _speaker(server, room: str, identity: str):
    """A speaker bot, connected once the agent has subscribed to its microphone: speech before that
    is not captioned, and a loaded machine delays the subscription by seconds."""
    from captions.dev.bots import Publisher

    speaker = Publisher(server, room, identity, auto_subscribe=False)
    subscribed = asyncio.Event()
    speaker.room.on("local_track_subscribed", lambda _track: subscribed.set())
    await speaker.connect()
    try:
        await asyncio.wait_for(subscribed.wait(), SUBSCRIBE_TIMEOUT_S)
    except asyncio.TimeoutError:
        await speaker.disconnect()
        raise BenchError(f"the agent did not subscribe to {identity} in {room} in {SUBSCRIBE_TIMEOUT_S:g} s") from None
    await speaker.silence(0.3)
    return speaker


async def _in_lanes(config: dict, unit) -> None:
    """Runs `unit(index)` for every index, `parallel` at a time: first the warm-up units, then, once
    the parent has measured the idle worker (a line on stdin), the others until the time is up."""
    deadline = time.time() + config["max_seconds"]

    async def lanes(indices) -> None:
        async def lane() -> None:
            for index in indices:
                if time.time() > deadline:
                    return
                await unit(index)

        await asyncio.gather(*(lane() for _ in range(config["parallel"])))

    await lanes(iter(range(config["warmup"])))
    emit({"warmed_up": config["warmup"]})
    if not await asyncio.to_thread(sys.stdin.readline):
        return  # the parent is gone
    await lanes(iter(range(config["warmup"], config["units"])))


async def _rooms_bots(config: dict) -> None:
    """Rooms one after another, `parallel` at a time; one JSON line per finished room on stdout."""
    from livekit import api

    from captions.dev.bots import Subscriber, server_from_config

    server = server_from_config(config)
    wav = Path(config["wavs"][0])

    async def one(lkapi, index: int) -> None:
        name = f"{config['prefix']}-{index}"
        started = time.time()
        listener = await Subscriber(server, name, identity="listener").connect()
        speaker = await _speaker(server, name, "speaker")
        try:
            await speaker.play(wav)
            await speaker.disconnect()  # leaving flushes the speaker's last words
            captioned = await _wait_final(listener, "speaker", 1)
        finally:
            await speaker.disconnect()
            await listener.disconnect()
            await lkapi.room.delete_room(api.DeleteRoomRequest(room=name))
        emit({"unit": index, "captioned": captioned, "seconds": round(time.time() - started, 2)})

    async with api.LiveKitAPI(config["http_url"], config["api_key"], config["api_secret"]) as lkapi:
        await _in_lanes(config, lambda index: one(lkapi, index))


async def _long_room_bots(config: dict) -> None:
    """One room; speakers join, speak, mute, unmute, speak and leave, `parallel` at a time."""
    from livekit import api

    from captions.dev.bots import Subscriber, server_from_config

    server = server_from_config(config)
    wavs = [Path(w) for w in config["wavs"]]
    name = config["prefix"]
    listener = await Subscriber(server, name, identity="listener").connect()
    await listener.wait_for_agent()

    async def turn(index: int) -> None:
        identity = f"speaker-{index}"
        started = time.time()
        speaker = await _speaker(server, name, identity)
        try:
            await speaker.play(wavs[0])
            await speaker.silence(0.3)
            speaker.mute()  # muting ends the speaker's engine stream: its final caption comes out
            got_first = await _wait_final(listener, identity, 1)
            speaker.unmute()
            await speaker.silence(0.5)
            await speaker.play(wavs[1])
        finally:
            await speaker.disconnect()
        captioned = got_first and await _wait_final(listener, identity, 2)
        emit({"unit": index, "captioned": captioned, "seconds": round(time.time() - started, 2)})

    try:
        await _in_lanes(config, turn)
    finally:
        await listener.disconnect()
        async with api.LiveKitAPI(config["http_url"], config["api_key"], config["api_secret"]) as lkapi:
            await lkapi.room.delete_room(api.DeleteRoomRequest(room=name))


def _child_main(role: str, config_path: str) -> int:
    if role == "hour":
        return run_child_process(_async_hour, config_path, "bench soak hour", bots=False)
    main = _rooms_bots if role == "rooms" else _long_room_bots
    return run_child_process(main, config_path, f"bench soak {role} bots")


async def _async_hour(config: dict) -> None:
    await asyncio.to_thread(_hour, config)
