"""Live captions for LiveKit rooms with Kyutai streaming speech-to-text.

The product:
    stt/       speech to text: checkpoint loading, the batched engine, timed words, audio files
    live/      the LiveKit worker: rooms, speakers, slot queue, segments, transcripts, metrics
    agents/    a second product on the same engine: Kyutai STT for any livekit-agents voice agent
    viewer/    the viewer server: signed links, the rooms' captions relayed to viewers, the backlog
    protocol   what the agent publishes and viewers read

Tools, never imported by the product (and left out of the Docker image):
    dev/       local livekit-server, worker process, `captions up`, bots, `captions speak`, test checkpoint
    bench/     the benchmarks
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The checkout (or the image's /app): the viewer's web/ and the local .local/bin live there."""
