"""Host work on several processes, one engine (issue 24): `captions worker --receivers P`.

With P >= 2 the worker process is the **engine process** (engine_process.py): it loads the model
once and owns the `SttEngine` and the one `SlotQueue`, so fairness across every room is the same
queue's. It starts P **receiving processes** (receivers.py, receiver.py), each today's
livekit-agents worker (its rooms, speakers, voice detection, segmenter, publisher, recovery)
registered with LiveKit on its own, so LiveKit's dispatch places rooms across them. A receiving
process's slot queue and engine streams are proxies (engine_client.py) of the engine process's,
served over one Unix stream socket per receiving process (engine_server.py; framing in wire.py).

Why a socket and not shared memory (yet): one connection carries requests, grants, events, yield
answers and audio in order, which keeps the slot queue's semantics exactly; audio is sent as raw
float32 behind a 13-byte header, and each side's one writer thread sends everything queued in one
write per wake-up (32 live streams: one write per 10 ms tick). Measured on the shared 2-core test
machine under heavy load (2026-12-06): about 8 us of the engine process's CPU per pushed 10 ms chunk,
0.0008 cores per live talker, mostly its reader thread's frame parsing; shared memory for audio
would take that off the engine process (issue 24's suggestion), at 400 talkers a third of a core.
"""
