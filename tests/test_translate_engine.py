"""The translation core: the tiny CTranslate2 models load and translate, the engine batches, orders,
bounds and fails as its contract says (with a fake model that counts its calls), the hub error is one
line, and language detection tells English from French."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from captions.translate import (
    TranslationBacklogFull,
    TranslationEngine,
    TranslationEngineClosed,
    TranslationModelError,
    TranslationRequest,
    UnsupportedPair,
    detect_language,
    load_translation_model,
)

R = TranslationRequest
SENTENCES = [
    R("Good morning everyone, thank you for joining.", "en", "de"),
    R("Bonjour à tous, la réunion commence.", "fr", "de"),
    R("Could you share your screen, please?", "en", "fr"),
    R("Merci beaucoup et à demain.", "fr", "en"),
]
TIMEOUT = 10


class FakeModel:
    """Echoes each text upper-cased; records every batch; `hold()` makes the next call wait."""

    def __init__(self):
        self.batches: list[list[R]] = []
        self._gate = threading.Event()
        self._gate.set()
        self.entered = threading.Event()

    def hold(self) -> None:
        self._gate.clear()
        self.entered.clear()

    def release(self) -> None:
        self._gate.set()

    def translate_batch(self, requests):
        self.batches.append(list(requests))
        self.entered.set()
        assert self._gate.wait(TIMEOUT)
        if any("boom" in r.text for r in requests):
            raise RuntimeError("model exploded")
        return [f"{r.target}:{r.text.upper()}" for r in requests]


@pytest.fixture
def fake():
    return FakeModel()


def _busy_engine(fake: FakeModel, **kwargs) -> tuple[TranslationEngine, object]:
    """An engine whose thread is stuck in a first batch (until fake.release()), so that what is
    submitted next queues up."""
    engine = TranslationEngine(fake, **kwargs)
    fake.hold()
    first = engine.submit("first", "en", "de", final=True)
    assert fake.entered.wait(TIMEOUT)
    return engine, first


# ---- the tiny model -------------------------------------------------------------------------------

def test_the_tiny_model_loads_and_translates_a_batch_deterministically(tiny_translation_model):
    model = load_translation_model(str(tiny_translation_model))
    assert {("en", "de"), ("fr", "de"), ("en", "fr"), ("fr", "en"), ("de", "es")} <= model.pairs
    first = model.translate_batch(SENTENCES)
    assert len(first) == len(SENTENCES)
    assert all(isinstance(t, str) and t.strip() for t in first), first
    assert model.translate_batch(SENTENCES) == first
    again = load_translation_model(str(tiny_translation_model), pairs=[("en", "de"), ("fr", "de")])
    assert again.pairs == {("en", "de"), ("fr", "de")}
    assert again.translate_batch(SENTENCES[:2]) == first[:2]
    # Alone or in a batch, a text gets the same translation.
    assert [model.translate_batch([r])[0] for r in SENTENCES] == first


def test_the_tiny_model_passes_through_same_language_and_empty_text(tiny_translation_model):
    model = load_translation_model(str(tiny_translation_model), pairs=[("en", "de")])
    assert model.translate_batch([R("Hello there", "en", "en"), R("  ", "en", "de")]) == ["Hello there", "  "]
    with pytest.raises(UnsupportedPair):
        model.translate_batch([R("Hello there", "en", "ja")])


def test_a_source_longer_than_the_position_table_is_cut_not_an_error(tiny_translation_model):
    model = load_translation_model(str(tiny_translation_model), pairs=[("en", "de")])
    text = "good morning everyone " * 300
    assert len(model.source_tokens(R(text, "en", "de"))) > 512
    assert isinstance(model.translate_batch([R(text, "en", "de")])[0], str)


def test_one_pair_directory_and_an_explicit_pair(tiny_translation_model, tmp_path):
    single = load_translation_model(str(tiny_translation_model / "en-fr"))
    assert single.pairs == {("en", "fr")}
    renamed = tmp_path / "my-model"
    renamed.symlink_to(tiny_translation_model / "en-fr", target_is_directory=True)
    with pytest.raises(TranslationModelError, match="language pair"):
        load_translation_model(str(renamed))
    assert load_translation_model(f"en-fr={renamed}").pairs == {("en", "fr")}
    both = load_translation_model(f"{tiny_translation_model / 'en-fr'}, {tiny_translation_model / 'fr-en'}")
    assert both.pairs == {("en", "fr"), ("fr", "en")}


def test_a_template_expands_per_pair_and_a_missing_pair_is_one_line(tiny_translation_model):
    template = str(tiny_translation_model / "{source}-{target}")
    model = load_translation_model(template, pairs=[("en", "de"), ("fr", "de")])
    assert model.pairs == {("en", "de"), ("fr", "de")}
    with pytest.raises(TranslationModelError) as error:
        load_translation_model(str(tiny_translation_model), pairs=[("en", "ja")])
    assert "en->ja" in str(error.value) and "\n" not in str(error.value)


def test_the_m2m100_family_one_model_for_every_direction(tmp_path):
    from captions.translate.tiny import write_tiny_m2m100_model

    model = load_translation_model(str(write_tiny_m2m100_model(tmp_path / "m2m100", ["en", "fr", "de"])))
    assert model.pairs == {(s, t) for s in ("en", "fr", "de") for t in ("en", "fr", "de") if s != t}
    assert model.source_tokens(R("Hello", "en", "de"))[0] == "__en__"
    texts = model.translate_batch(SENTENCES[:3])
    assert any(t.strip() for t in texts) and not any("__" in t for t in texts), texts  # prefix dropped
    assert model.translate_batch(SENTENCES[:3]) == texts


def test_offline_and_not_cached_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(TranslationModelError) as error:
        load_translation_model("nobody-here/opus-mt-en-de-ctranslate2")
    message = str(error.value)
    assert "\n" not in message
    assert "nobody-here/opus-mt-en-de-ctranslate2" in message
    assert "local CTranslate2 model directory" in message


def test_a_directory_without_a_model_says_so(tmp_path):
    with pytest.raises(TranslationModelError, match="no CTranslate2 model"):
        load_translation_model(str(tmp_path))
    with pytest.raises(TranslationModelError, match="does not exist"):
        load_translation_model(str(tmp_path / "missing"))


def test_the_engine_serves_the_tiny_model_like_a_direct_call(tiny_translation_model):
    model = load_translation_model(str(tiny_translation_model))
    direct = model.translate_batch(SENTENCES)
    engine = TranslationEngine(model)
    try:
        futures = [engine.submit(r.text, r.source, r.target, final=True) for r in SENTENCES]
        assert [f.result(TIMEOUT) for f in futures] == direct
    finally:
        engine.close()


# ---- the engine, with a fake model ------------------------------------------------------------------

def test_submits_that_pile_up_go_into_one_batch(fake):
    engine, first = _busy_engine(fake)
    futures = [engine.submit(f"text {i}", "en", "de", final=i % 2 == 0) for i in range(10)]
    fake.release()
    assert first.result(TIMEOUT) == "de:FIRST"
    assert [f.result(TIMEOUT) for f in futures] == [f"de:TEXT {i}" for i in range(10)]
    assert len(fake.batches) == 2, [len(b) for b in fake.batches]
    assert engine.counters.batches == 2 and engine.counters.translated == 11
    engine.close()


def test_max_batch_splits_a_long_queue(fake):
    engine, _ = _busy_engine(fake, max_batch=4)
    futures = [engine.submit(f"t{i}", "en", "de", final=True) for i in range(10)]
    fake.release()
    for f in futures:
        f.result(TIMEOUT)
    assert [len(b) for b in fake.batches] == [1, 4, 4, 2]
    engine.close()


def test_finals_are_served_before_interims(fake):
    engine, _ = _busy_engine(fake, max_batch=2)
    interims = [engine.submit(f"interim {i}", "en", "de", final=False) for i in range(2)]
    finals = [engine.submit(f"final {i}", "en", "de", final=True) for i in range(2)]
    fake.release()
    for f in interims + finals:
        f.result(TIMEOUT)
    assert [[r.text for r in b] for b in fake.batches[1:]] == [["final 0", "final 1"],
                                                                ["interim 0", "interim 1"]]
    engine.close()


def test_interims_alone_linger_for_others_and_a_final_does_not_wait(fake):
    import time

    engine = TranslationEngine(fake, interim_linger_s=0.5)
    start = time.perf_counter()
    interims = [engine.submit(f"interim {i}", "en", "de", final=False) for i in range(3)]
    assert [f.result(TIMEOUT) for f in interims] == ["de:INTERIM 0", "de:INTERIM 1", "de:INTERIM 2"]
    assert time.perf_counter() - start >= 0.45
    assert len(fake.batches) == 1  # one batch of three, after the linger
    start = time.perf_counter()
    engine.submit("interim 3", "en", "de", final=False)
    final = engine.submit("final", "en", "de", final=True)
    assert final.result(TIMEOUT) == "de:FINAL"
    assert time.perf_counter() - start < 0.4  # the final started a batch at once, the interim went along
    assert [r.text for r in fake.batches[1]] == ["final", "interim 3"]
    engine.close()


def test_a_full_interim_queue_cancels_the_oldest(fake):
    engine, _ = _busy_engine(fake, max_interims=2)
    interims = [engine.submit(f"interim {i}", "en", "de", final=False) for i in range(3)]
    final = engine.submit("final", "en", "de", final=True)
    assert interims[0].cancelled()
    fake.release()
    with pytest.raises(CancelledError):
        interims[0].result(TIMEOUT)
    assert [f.result(TIMEOUT) for f in interims[1:]] == ["de:INTERIM 1", "de:INTERIM 2"]
    assert final.result(TIMEOUT) == "de:FINAL"
    assert engine.counters.dropped == 1
    engine.close()


def test_a_full_final_queue_fails_the_oldest_final(fake):
    engine, _ = _busy_engine(fake, max_finals=2)
    finals = [engine.submit(f"final {i}", "en", "de", final=True) for i in range(3)]
    with pytest.raises(TranslationBacklogFull):
        finals[0].result(0)
    fake.release()
    assert [f.result(TIMEOUT) for f in finals[1:]] == ["de:FINAL 1", "de:FINAL 2"]
    engine.close()


def test_a_newer_interim_or_the_final_of_a_key_replaces_its_queued_interim(fake):
    engine, _ = _busy_engine(fake)
    old = engine.submit("hello", "en", "de", final=False, key=("seg-1", "de"))
    newer = engine.submit("hello wor", "en", "de", final=False, key=("seg-1", "de"))
    other = engine.submit("bonjour", "fr", "de", final=False, key=("seg-2", "de"))
    assert old.cancelled() and not newer.cancelled()
    final = engine.submit("hello world", "en", "de", final=True, key=("seg-1", "de"))
    assert newer.cancelled()
    fake.release()
    assert final.result(TIMEOUT) == "de:HELLO WORLD"
    assert other.result(TIMEOUT) == "de:BONJOUR"
    assert [r.text for r in fake.batches[1]] == ["hello world", "bonjour"]
    engine.close()


def test_an_interim_the_caller_cancelled_is_skipped(fake):
    engine, _ = _busy_engine(fake)
    stale = engine.submit("stale", "en", "de", final=False)
    fresh = engine.submit("fresh", "en", "de", final=False)
    assert stale.cancel()
    fake.release()
    assert fresh.result(TIMEOUT) == "de:FRESH"
    assert [r.text for r in fake.batches[1]] == ["fresh"]
    engine.close()


def test_a_model_exception_fails_only_the_text_that_causes_it_and_the_engine_goes_on(fake):
    """One text the model cannot take must not fail the other rooms' finals of its batch: the batch
    is halved until the failure is narrowed down to it."""
    engine, _ = _busy_engine(fake)
    texts = ("innocent one", "boom", "innocent two", "innocent three", "innocent four")
    futures = [engine.submit(text, "en", "de", final=True) for text in texts]
    fake.release()
    with pytest.raises(RuntimeError, match="model exploded"):
        futures[1].result(TIMEOUT)
    assert [f.result(TIMEOUT) for i, f in enumerate(futures) if i != 1] == [
        f"de:{t.upper()}" for i, t in enumerate(texts) if i != 1]
    assert engine.submit("after", "en", "de", final=True).result(TIMEOUT) == "de:AFTER"
    assert engine.counters.failed == 1
    engine.close()


def test_close_fails_what_is_queued_and_later_submits(fake):
    engine, running = _busy_engine(fake)
    queued = [engine.submit("waiting", "en", "de", final=final) for final in (True, False)]
    engine.close(timeout=0)
    for future in queued:
        with pytest.raises(TranslationEngineClosed):
            future.result(TIMEOUT)
    fake.release()
    assert running.result(TIMEOUT) == "de:FIRST"  # the batch in progress still ends
    engine._thread.join(TIMEOUT)
    assert not engine._thread.is_alive()
    with pytest.raises(TranslationEngineClosed):
        engine.submit("too late", "en", "de", final=True).result(TIMEOUT)


def test_an_unsupported_pair_fails_at_once(tiny_translation_model):
    engine = TranslationEngine(load_translation_model(str(tiny_translation_model), pairs=[("en", "de")]))
    try:
        with pytest.raises(UnsupportedPair, match="en->ja"):
            engine.submit("Hello", "en", "ja", final=True).result(0)
    finally:
        engine.close()


def test_submit_never_waits_for_the_model(fake):
    import time

    engine, _ = _busy_engine(fake)
    start = time.perf_counter()
    for i in range(1000):
        engine.submit(f"t{i}", "en", "de", final=i % 10 == 0)
    assert time.perf_counter() - start < 1.0
    assert engine.queued == 100 + 64  # every final, and the newest 64 interims
    fake.release()
    engine.close()


# ---- language detection --------------------------------------------------------------------------

@pytest.mark.parametrize("text, language", [
    ("Good morning everyone, thank you for joining the meeting.", "en"),
    ("Could you share your screen so that we can all see the figures?", "en"),
    ("Bonjour à tous, nous allons commencer la réunion dans quelques instants.", "fr"),
    ("Je pense que la nouvelle version est prête pour les tests.", "fr"),
])
def test_language_detection_tells_english_from_french(text, language):
    assert detect_language(text, ["en", "fr"]) == language


@pytest.mark.parametrize("text", ["ok", "oui", "", "   "])
def test_language_detection_is_unsure_of_short_text(text):
    assert detect_language(text, ["en", "fr"]) is None


def test_language_detection_with_one_candidate_is_that_one():
    assert detect_language("ok", ["en-US"]) == "en"


def test_make_test_checkpoint_writes_the_translation_models_beside(tmp_path, monkeypatch):
    import argparse

    from captions.dev import tiny_checkpoint

    monkeypatch.setattr(tiny_checkpoint, "make_test_checkpoint", lambda *a, **k: None)  # the STT part
    parser = argparse.ArgumentParser()
    tiny_checkpoint.configure_parser(parser)
    assert "translation/" in parser.description
    args = parser.parse_args([str(tmp_path / "ckpt"), "--translation-languages", "en,fr"])
    assert tiny_checkpoint.run(args) == 0
    model = load_translation_model(str(tmp_path / "ckpt" / tiny_checkpoint.TRANSLATION_SUBDIR))
    assert model.pairs == {("en", "fr"), ("fr", "en")}
    none = parser.parse_args([str(tmp_path / "bare"), "--translation-languages", ""])
    tiny_checkpoint.run(none)
    assert not (tmp_path / "bare" / "translation").exists()


def test_an_engine_whose_thread_dies_fails_what_waits_and_what_comes_at_once(fake, monkeypatch, caplog):
    """A bug in the engine's own loop: nothing waits on a thread that is gone (rooms would time each
    final out, 3 s late); queued and later submissions fail at once, and the log says why."""
    engine, _ = _busy_engine(fake)
    queued = engine.submit("queued", "en", "de", final=True)

    def broken() -> None:
        raise RuntimeError("a bug in the batching loop")

    monkeypatch.setattr(engine, "_next_batch", broken)
    fake.release()
    with pytest.raises(TranslationEngineClosed):
        queued.result(TIMEOUT)
    with pytest.raises(TranslationEngineClosed):
        engine.submit("later", "en", "de", final=True).result(TIMEOUT)
    assert "translation engine's thread failed" in caplog.text
