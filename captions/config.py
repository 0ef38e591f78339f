"""Every option is both a CLI flag and an environment variable.

`add_option` puts the variable's name and the default in the flag's --help text, so that
`captions <command> --help` documents the whole configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import urllib.parse
import warnings
from collections.abc import Callable
from typing import Any

from captions.stt.api import LIVE_CHUNK_MS, LIVE_CHUNK_MS_CHOICES


def add_option(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    env: str,
    default: Any = None,
    type: Callable[[str], Any] = str,
    help: str,
    **kwargs: Any,
) -> None:
    """Adds `flag` whose default comes from `env` when that variable is set."""
    raw = os.environ.get(env)
    value = default
    if raw is not None and raw != "":
        try:
            value = type(raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            raise SystemExit(f"error: invalid value for {env}={raw!r}: {e}") from None
    shown = "unset" if default is None else repr(default)
    parser.add_argument(
        flag, default=value, type=type, help=f"{help} [env {env}, default {shown}]", **kwargs
    )


def live_chunk_ms(text: str) -> int:
    """A live chunk length the frame clock can align (captions/stt/api.py)."""
    value = int(text)
    if value not in LIVE_CHUNK_MS_CHOICES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(map(str, LIVE_CHUNK_MS_CHOICES))}, got {text}")
    return value


def live_chunk_list(text: str) -> list[int]:
    """Comma-separated live chunk lengths (benchmarks compare them side by side)."""
    values = [live_chunk_ms(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(map(str, LIVE_CHUNK_MS_CHOICES))}, got {text!r}")
    return list(dict.fromkeys(values))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, got {text}")
    return value


def add_livekit_options(parser: argparse.ArgumentParser) -> None:
    """The three standard LiveKit variables, named as LiveKit's own tools name them."""
    add_option(parser, "--url", env="LIVEKIT_URL", default="ws://127.0.0.1:7880",
               help="LiveKit server URL")
    add_option(parser, "--api-key", env="LIVEKIT_API_KEY", default="devkey", help="LiveKit API key")
    add_option(parser, "--api-secret", env="LIVEKIT_API_SECRET", default="secret",
               help="LiveKit API secret")


def add_caption_secret_option(parser: argparse.ArgumentParser) -> None:
    """The secret the caption key is derived from (captions/protocol.py): the caption workers and the
    viewer server must share it."""
    add_option(parser, "--caption-secret", env="CAPTIONS_CAPTION_SECRET", default=None,
               help="secret the caption-signing key is derived from, shared by the caption workers and the "
                    "viewer server only (falls back to the LiveKit API secret, which every agent holds)")


LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}(-[a-z0-9]{2,8})?$")
"""A BCP-47 primary language code, optionally with one subtag (``de``, ``pt-br``), lower case."""


def add_speaker_options(parser: argparse.ArgumentParser) -> None:
    """How a speaker's turns are cut and fed (captions/live/speaker.py's SpeakerOptions)."""
    add_option(parser, "--pre-roll", env="CAPTIONS_PRE_ROLL", default=0.5, type=non_negative_float,
               help="seconds of audio from before a speaker's voice was detected that are captioned too")
    add_option(parser, "--release-after", env="CAPTIONS_RELEASE_AFTER", default=3.0, type=non_negative_float,
               help="seconds of silence after which a speaker's engine slot goes to someone else")
    add_option(parser, "--max-wait", env="CAPTIONS_MAX_WAIT", default=30.0, type=non_negative_float,
               help="seconds of a waiting speaker's audio kept until a slot frees (older audio is dropped)")
    add_option(parser, "--max-turn-hold", env="CAPTIONS_MAX_TURN_HOLD", default=20.0, type=non_negative_float,
               help="seconds a speaker's turn holds an engine slot before, while others wait for one, it gives "
                    "it back at the next sentence end and waits in turn (its audio kept); a room holding more "
                    "than its share of the slots gives them back whatever this is")
    add_option(parser, "--live-chunk-ms", env="CAPTIONS_LIVE_CHUNK_MS", default=LIVE_CHUNK_MS, type=live_chunk_ms,
               help="ms of a talking speaker's audio per chunk handed to the engine: longer chunks cost the host "
                    "less per talker, and a frame waits for the last of the streams' chunks: with 40, up to 30 ms "
                    "(13 ms on average) more than with 10 (docs/benchmarks/host.md)")


def language_code(value: object) -> str | None:
    """`value` as a language code (``de``, ``pt-br``: lower case, ``_`` read as ``-``), or None."""
    if not isinstance(value, str) or len(value) > 12:
        return None
    code = value.strip().lower().replace("_", "-")
    return code if LANGUAGE_CODE.match(code) else None


def language_list(text: str) -> tuple[str, ...]:
    """argparse type for a comma-separated list of language codes (``de,es``); empty: none."""
    codes: list[str] = []
    for item in text.split(","):
        if not item.strip():
            continue
        code = language_code(item)
        if code is None:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not a language code (use codes like de,es)")
        if code not in codes:
            codes.append(code)
    return tuple(codes)


# ---- start-up validation (fail fast, one clear line) -----------------------------------------------

DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
LIVEKIT_CHECK_TIMEOUT_S = 5.0


class ConfigError(Exception):
    """A setting that cannot work; the message names the setting and says how to fix it."""


def device_name(text: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N (whether CUDA exists is checked at load)."""
    if not DEVICE_NAME.match(text):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda or cuda:N")
    return text


def check_livekit_url(url: str) -> None:
    """Raises ConfigError unless `url` looks like a LiveKit server URL (ws, wss, http or https)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
        raise ConfigError(f"LIVEKIT_URL {url!r} is not a LiveKit URL: use ws://host:7880 or wss://host")


async def check_livekit_async(url: str, api_key: str, api_secret: str,
                              timeout_s: float = LIVEKIT_CHECK_TIMEOUT_S) -> None:
    """Raises ConfigError unless LiveKit at `url` answers an authenticated API call within `timeout_s`.

    A RoomService.ListRooms call proves both that the server is reachable and that the key and
    secret are accepted, before the worker spends minutes loading the model.
    """
    import aiohttp
    from livekit import api

    check_livekit_url(url)
    if not api_key or not api_secret:
        raise ConfigError("LIVEKIT_API_KEY and LIVEKIT_API_SECRET must both be set")
    # failover=False: a self-hosted server has no other regions to try, so fail on the first error.
    lkapi = api.LiveKitAPI(url, api_key, api_secret, timeout=aiohttp.ClientTimeout(total=timeout_s),
                           failover=False)
    try:
        with warnings.catch_warnings():
            # PyJWT warns about short secrets (dev mode's "secret"); this check's output is one line.
            warnings.simplefilter("ignore")
            await asyncio.wait_for(lkapi.room.list_rooms(api.ListRoomsRequest()), timeout_s)
    except api.TwirpError as e:
        if e.status in (401, 403):
            raise ConfigError(f"LiveKit at {url} rejected the API key {api_key!r} or its secret "
                              "(check LIVEKIT_API_KEY and LIVEKIT_API_SECRET)") from None
        raise ConfigError(f"LiveKit at {url} answered an API call with HTTP {e.status} ({e.message}): "
                          "is LIVEKIT_URL a LiveKit server?") from None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        reason = str(e) or type(e).__name__
        raise ConfigError(f"cannot reach LiveKit at {url} within {timeout_s:g} s ({reason}): "
                          "check LIVEKIT_URL and that livekit-server is running") from None
    finally:
        await lkapi.aclose()


def check_livekit(url: str, api_key: str, api_secret: str, timeout_s: float = LIVEKIT_CHECK_TIMEOUT_S) -> None:
    """Synchronous `check_livekit_async`, for start-up code that runs before any event loop."""
    asyncio.run(check_livekit_async(url, api_key, api_secret, timeout_s))
