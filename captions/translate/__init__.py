"""Live translation of captions (issue 26): the model (model.py), the batching engine (engine.py) and
source-language detection (language.py). tiny.py writes random models in the real format for tests,
demos and benchmarks; the product never imports it."""

from captions.translate.engine import (
    EngineCounters,
    TranslationBacklogFull,
    TranslationEngine,
    TranslationEngineClosed,
)
from captions.translate.language import detect_language, warm_up_language_detection
from captions.translate.model import (
    DEFAULT_TRANSLATION_MODEL,
    TranslationModel,
    TranslationModelError,
    TranslationRequest,
    UnsupportedPair,
    language_code,
    load_translation_model,
)

__all__ = [
    "DEFAULT_TRANSLATION_MODEL",
    "EngineCounters",
    "TranslationBacklogFull",
    "TranslationEngine",
    "TranslationEngineClosed",
    "TranslationModel",
    "TranslationModelError",
    "TranslationRequest",
    "UnsupportedPair",
    "detect_language",
    "language_code",
    "load_translation_model",
    "warm_up_language_detection",
]
