"""The LiveKit side: a livekit-agents worker (worker.py) captions every room it is given (room.py),
sharing one engine across rooms through a fair slot queue (slots.py)."""
