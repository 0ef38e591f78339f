"""`captions speak`: a bot that says something in a room and prints the captions it gets back.

For demos (`captions up` has no microphone of its own) and for operators checking a deployment end
to end: it joins the room as a participant with a microphone track, speaks (espeak-ng, or a WAV
file), listens as a hidden viewer, and prints the final captions the agent published for it.
Exit status 0 when at least one caption came back, 1 otherwise, with one line saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from captions.config import add_livekit_options, add_option
from captions.dev.speech import SpeechUnavailable, espeak


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", help="what to say (spoken by espeak-ng)")
    parser.add_argument("--wav", type=Path, help="a 16-bit PCM WAV file to play instead of TEXT")
    add_option(parser, "--room", env="CAPTIONS_SPEAK_ROOM", default="demo", help="room to speak in")
    parser.add_argument("--identity", default="speaker-bot", help="the bot's participant identity")
    parser.add_argument("--name", default="Speaker bot", help="the bot's display name")
    parser.add_argument("--voice", default="en", help="espeak-ng voice, e.g. en, en-us, fr")
    parser.add_argument("--agent-timeout", type=float, default=15.0,
                        help="seconds to wait for a caption agent in the room (default 15)")
    parser.add_argument("--wait", type=float, default=10.0,
                        help="seconds to wait for the last captions after speaking (default 10)")
    add_livekit_options(parser)
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


async def _speak(args: argparse.Namespace, wav: Path) -> int:
    from captions.dev.bots import Publisher, Subscriber, read_wav

    server = SimpleNamespace(url=args.url, api_key=args.api_key, api_secret=args.api_secret)
    _, rate, channels = read_wav(wav)
    listener = await Subscriber(server, args.room, identity=f"{args.identity}-listener").connect()
    publisher = Publisher(server, args.room, args.identity, rate, channels, auto_subscribe=False, name=args.name)
    try:
        await listener.wait_for_agent(args.agent_timeout)
        await publisher.connect()
        await publisher.silence(1.0)  # the agent subscribes to the new track meanwhile
        await publisher.play(wav)
        await publisher.silence(2.0)  # a pause: the open caption becomes final
        with contextlib.suppress(TimeoutError):
            await listener.wait_until(lambda: listener.finals(args.identity), args.wait, "captions")
        await publisher.disconnect()  # leaving flushes anything still open
        await asyncio.sleep(1.0)
        finals = listener.finals(args.identity)
        for caption in finals:
            print(caption.text, flush=True)
        if not finals:
            print(f"captions speak: no captions for {args.identity} in room {args.room!r} "
                  f"within {args.wait:.0f} s", file=sys.stderr)
            return 1
        return 0
    finally:
        await publisher.disconnect()
        await listener.disconnect()


def run(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.wav is None):
        print("captions speak: give either TEXT or --wav FILE", file=sys.stderr)
        return 2
    if args.wav is not None and not args.wav.is_file():
        print(f"captions speak: {args.wav}: no such file", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            wav = args.wav or espeak(args.text, Path(tmp) / "speech.wav", voice=args.voice)
            return asyncio.run(_speak(args, wav))
        except SpeechUnavailable as e:
            print(f"captions speak: {e}; or pass --wav FILE", file=sys.stderr)
            return 1
        except (RuntimeError, TimeoutError, OSError) as e:
            print(f"captions speak: {e}", file=sys.stderr)
            return 1
