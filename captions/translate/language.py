"""The language of a caption, among the few the room's speakers may use.

The STT model (kyutai/stt-1b-en_fr) writes English and French and does not say which; translation
needs the source language. py3langid (BSD, numpy only, a naive Bayes model over byte n-grams, fast
on short text) restricted to the candidate languages decides; a text too short or too mixed to tell
gets None, and the caller uses the room's configured language (or the speaker's last detected one).

Thread-safe: one identifier per set of candidates, built once (about 2 s: the model is decompressed)
and then only read.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

MIN_LETTERS = 8
"""Shorter texts ("ok", "oui", "yes") are too short to tell apart reliably."""
MIN_CONFIDENCE = 0.9
"""Below this probability (normalised over the candidates) the answer is None."""

_identifiers: dict[tuple[str, ...], object] = {}
_lock = threading.Lock()


def _identifier(candidates: tuple[str, ...]):
    with _lock:
        if candidates not in _identifiers:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            unknown = set(candidates) - set(identifier.labels)
            if unknown:
                raise ValueError(f"language detection does not know {', '.join(sorted(unknown))}")
            identifier.set_languages(list(candidates))
            _identifiers[candidates] = identifier
        return _identifiers[candidates]


def _key(candidates: Sequence[str]) -> tuple[str, ...]:
    from captions.translate.model import language_code

    return tuple(sorted({language_code(c) for c in candidates}))


def warm_up_language_detection(candidates: Sequence[str]) -> None:
    """Builds the identifier for `candidates` now (at worker start) rather than on the first caption."""
    if len(_key(candidates)) > 1:
        _identifier(_key(candidates))


def detect_language(text: str, candidates: Sequence[str]) -> str | None:
    """The language of `text` among `candidates` (codes such as "en", "fr"), or None when the text
    is too short or the answer unsure. With one candidate, that one (for any text)."""
    key = _key(candidates)
    if len(key) <= 1:
        return key[0] if key else None
    if sum(c.isalpha() for c in text) < MIN_LETTERS:
        return None
    language, confidence = _identifier(key).classify(text)
    return language if confidence >= MIN_CONFIDENCE else None
