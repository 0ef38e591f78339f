"""`captions <command> ...`: each command lives in its own module, imported only when used.

A command module exposes `configure_parser(parser)` and `run(args) -> int`; importing it must stay
cheap (heavy imports such as torch or livekit happen inside `run`), so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("captions.dev.up", "run livekit-server (dev), the caption worker and the viewer; print the URL"),
    "worker": ("captions.live.worker", "run the caption agent worker (livekit-agents)"),
    "web": ("captions.viewer.server", "serve the captions viewer: signed links, live captions, backlog"),
    "token": ("captions.viewer.links", "print a signed viewer link for a room"),
    "revoke": ("captions.viewer.revocations", "end a viewer link, or every link of a room, now"),
    "speak": ("captions.dev.speak", "a bot that speaks in a room and prints the captions it gets back"),
    "server": ("captions.dev.livekit_server", "run livekit-server in dev mode on loopback (installs it if needed)"),
    "transcribe": ("captions.stt.transcribe", "transcribe an audio file with the batched engine"),
    "make-test-checkpoint": ("captions.dev.tiny_checkpoint", "write a tiny random STT checkpoint and translation models (tests/demos)"),
    "bench": ("captions.bench", "the benchmarks (engine, latency, clock, ingest, host, meeting, soak, translate)"),
}
TOOL_PACKAGES = ("captions.dev", "captions.bench")
"""The development tools: the product never imports them, and the Docker image leaves them out."""


def _usage() -> str:
    lines = ["usage: captions <command> [options]", "", "commands:"]
    lines += [f"  {name:<22} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `captions <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"captions: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name not in TOOL_PACKAGES:
            raise
        print(f"captions {name}: a development tool, not installed here (the Docker image leaves out "
              f"{', '.join(TOOL_PACKAGES)}); run it from a checkout of the project", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"captions {name}", description=COMMANDS[name][1])
    configure = getattr(module, f"configure_{name.replace('-', '_')}_parser", None)
    configure = configure or module.configure_parser
    configure(parser)
    args = parser.parse_args(rest)
    from captions.log import setup_logging

    setup_logging(getattr(args, "log_level", "INFO"))
    if getattr(args, "api_secret", None) == "secret":
        # livekit-server --dev's well-known secret: PyJWT's "short HMAC key" warning on every token
        # says nothing new there. Any other short secret still gets the warning.
        warnings.filterwarnings("ignore", message="The HMAC key is")
    runner = getattr(module, f"run_{name.replace('-', '_')}", None) or module.run
    return int(runner(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
