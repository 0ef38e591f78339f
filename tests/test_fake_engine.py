"""tests/fake_engine.py stands in for the engine in unit tests and in the room's reconnection test:
it must offer everything captions.stt.api's interfaces promise, or code under test breaks on the
fake only (room.py's slot logging once did, and the room captioned nothing)."""

from __future__ import annotations

import numpy as np

from captions.stt.api import Engine, EngineStream
from tests.fake_engine import FakeEngine, fake_words, silence, tone


def interface_members(protocol: type) -> set[str]:
    """The attributes, properties and methods a Protocol declares."""
    declared = set(getattr(protocol, "__annotations__", {}))
    declared |= {name for name in vars(protocol) if not name.startswith("_")}
    return declared


def test_the_fake_engine_and_its_streams_have_every_member_of_the_interface():
    engine = FakeEngine(batch_size=2)
    streams = [engine.open_stream(lambda event: None) for _ in range(2)]
    assert interface_members(Engine) <= set(dir(engine)), interface_members(Engine) - set(dir(engine))
    for stream in streams:
        missing = {name for name in interface_members(EngineStream) if not hasattr(stream, name)}
        assert not missing, f"the fake stream lacks {missing}"
    assert sorted(s.slot_index for s in streams) == [0, 1], "each open stream holds its own slot"
    streams[0].close()
    assert engine.open_stream(lambda event: None).slot_index == streams[0].slot_index, "a freed slot is reused"


def test_fake_words_are_one_word_per_loud_run():
    audio = np.concatenate([silence(0.4), tone(0.8), silence(0.4), tone(0.4)])
    assert fake_words(audio) == ["w10", "w5"]
