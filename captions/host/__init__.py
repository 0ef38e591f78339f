"""Host work on several processes, one engine (issue 24): `captions worker --receivers P`.

With P >= 2 the worker process is the **engine process** (engine_process.py): it loads the model
once and owns the `SttEngine` and the one `SlotQueue`, so fairness across every room is the same
queue's. It starts P **receiving processes** (receivers.py, receiver.py), each today's
livekit-agents worker (its rooms, speakers, voice detection, segmenter, publisher, recovery)
registered with LiveKit on its own, so LiveKit's dispatch places rooms across them. A receiving
process's slot queue and engine streams are proxies (engine_client.py) of the engine process's,
served over one Unix stream socket per receiving process (engine_server.py; framing in wire.py).
The rooms' metrics travel on the same socket and are summed into the engine process's /metrics
(metrics.py), and so do their translations, to the host's one translation engine, which the engine
process loads (translation_server.py, translation_client.py). How many receiving processes: `--receivers`, by default from the usable cores
(receivers.py's `resolve_receivers`).

Why a socket and not shared memory (yet): one connection carries requests, grants, events, yield
answers and audio in order, which keeps the slot queue's semantics exactly; audio is sent as raw
float32 behind a 13-byte header, and each side's one writer thread sends everything queued in one
write per wake-up (32 to 128 live streams: about 100 writes a second per receiving process).
Measured on the shared 2-core AMD EPYC test machine (2026-12-06, load average 1.2-1.7; 32, 64 and 128
live streams of 10 ms chunks through one or two connections to a null engine stepping every 80 ms):
7.5-11 us of the engine process's CPU per pushed chunk (0.0007-0.0011 cores per live talker), most
of it the reader thread parsing frames, and 6-12 us on the receiving side. Shared memory for audio
(issue 24's suggestion) would take that off the engine process: at 400 talkers it is a third of a
core there, under the same interpreter lock as the engine's thread.
"""
