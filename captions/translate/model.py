"""Translation models: CTranslate2 translators with their SentencePiece tokenizers, loaded once per
worker (like the STT model) and called from one engine thread (engine.py).

**Default family: OPUS-MT** (Helsinki-NLP's Marian models, CC-BY-4.0: commercial use allowed with
attribution). One model per language pair, a base transformer of about 74 M parameters (6+6
layers, width 512): about a sixth of M2M-100 418M's arithmetic per token, which is what lets a
small CPU keep up with several speakers at once (`captions bench translate` measures it), and what
a GPU batches by the hundred. The cost is one model per direction (en->de and fr->de for German
readers of the STT model's two languages; about 75 MB each in int8); pairs that OPUS-MT lacks can
use a multi-target OPUS-MT model (`>>de<<`-style target tokens, handled here) or another family.

**Other families**, recognised by their tokenizer file, so that using one is a matter of pointing
`spec` at it:

* M2M-100 (MIT; 418M or 1.2B; one model for all directions): `sentencepiece.bpe.model`; the source
  starts with `__en__`, the target prefix is `__de__` (handled here, see `_M2M100`). Several
  times slower per token than OPUS-MT on a CPU; a fine choice on a GPU.
* MADLAD-400 (Apache-2.0; 3B and up, GPU only in practice): T5's `spiece.model`, the source starts
  with `<2de>` and there is no target prefix: a `_Family` like `_M2M100` with those two rules.
* NLLB (CC-BY-NC: non-commercial only, so never the default) frames text like M2M-100 but with
  `eng_Latn`-style codes: its own `_Family` (mapping "en" to "eng_Latn"), told apart from M2M-100
  by those tokens in its vocabulary.

**`spec`** (`load_translation_model`) is one or several, comma-separated, of:

* a local directory holding one converted model (model.bin, config.json, the vocabulary file(s)
  and the tokenizer file(s)); an OPUS-MT model's pair comes from its name (`opus-mt-en-de`,
  `opus-mt-en-de-ctranslate2` or just `en-de`), or from an `en-de=` prefix before the spec;
* a local directory of such directories, one per pair (what `captions make-test-checkpoint` writes
  under `translation/`);
* a Hugging Face repo id of an already-converted CTranslate2 model, fetched once into the normal
  Hugging Face cache (offline and not cached: `TranslationModelError`, one line);
* a template with `{source}` and `{target}` (DEFAULT_TRANSLATION_MODEL), expanded for each pair
  the caller asks for.

**Converting a model** (one time, on a machine with the hub; needs `pip install transformers
sentencepiece torch`, which this project does not depend on):

    ct2-transformers-converter --model Helsinki-NLP/opus-mt-en-de --output_dir models/en-de \\
        --quantization int8 --copy_files source.spm target.spm
    ct2-transformers-converter --model facebook/m2m100_418M --output_dir models/m2m100 \\
        --quantization int8 --copy_files sentencepiece.bpe.model

then give `models` (a directory of pairs) or `models/m2m100` as the spec.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from captions.log import logger

DEFAULT_TRANSLATION_MODEL = "gaudi/opus-mt-{source}-{target}-ctranslate2"
"""Community CTranslate2 conversions of Helsinki-NLP's OPUS-MT models, one repository per pair
(model.bin, shared_vocabulary.json, source.spm, target.spm). Not reachable from the machines this
was built on: check that your pairs exist there, or convert your own (module docstring)."""

Pair = tuple[str, str]
MAX_INPUT_TOKENS = 512
"""Longer sources are cut (OPUS-MT's position table ends there; a caption that long is a few
minutes of speech without a pause)."""


class TranslationModelError(Exception):
    """The translation model cannot be found or read; the message (one line) says what to fix."""


class UnsupportedPair(ValueError):
    """No loaded model translates from this source language into this target language."""


class TranslationRequest(NamedTuple):
    """One text to translate, with its language and the language wanted."""

    text: str
    source: str
    target: str


def language_code(code: str) -> str:
    """The primary language subtag, lower-case: "en-US" -> "en", "FR" -> "fr"."""
    return code.strip().replace("_", "-").split("-")[0].lower()


# ---- families ------------------------------------------------------------------------------------

class _Family:
    """How one model family frames a text for CTranslate2: tokens around the source, target prefix."""

    name = "opus-mt"
    tokenizer_files: tuple[str, ...] = ("source.spm", "target.spm")

    def source_tokens(self, pieces: list[str], source: str, target: str, vocabulary: frozenset[str]) -> list[str]:
        # Multi-target OPUS-MT models (opus-mt-en-ROMANCE, ...) want the target as a first token.
        tag = f">>{target}<<"
        return ([tag] if tag in vocabulary else []) + pieces + ["</s>"]

    def target_prefix(self, target: str) -> list[str] | None:
        return None

    def pairs(self, name_pair: Pair | None, vocabulary: frozenset[str]) -> set[Pair]:
        targets = {t[2:-2] for t in vocabulary if re.fullmatch(r">>[a-z]{2,3}<<", t)}
        if name_pair is None:
            return set()
        source, target = name_pair
        if targets and not re.fullmatch(r"[a-z]{2,3}", target):  # e.g. opus-mt-en-ROMANCE
            return {(source, t) for t in targets if t != source}
        return {name_pair} if re.fullmatch(r"[a-z]{2,3}", target) else set()


class _M2M100(_Family):
    """M2M-100: `__en__` starts the source, `__de__` the target (and is dropped from the output)."""

    name = "m2m100"
    tokenizer_files = ("sentencepiece.bpe.model",)

    def source_tokens(self, pieces: list[str], source: str, target: str, vocabulary: frozenset[str]) -> list[str]:
        return [f"__{source}__"] + pieces + ["</s>"]

    def target_prefix(self, target: str) -> list[str] | None:
        return [f"__{target}__"]

    def pairs(self, name_pair: Pair | None, vocabulary: frozenset[str]) -> set[Pair]:
        languages = {t[2:-2] for t in vocabulary if re.fullmatch(r"__[a-z]{2,3}__", t)}
        return {(s, t) for s in languages for t in languages if s != t}


_FAMILIES = (_Family(), _M2M100())


def _family_of(directory: Path) -> _Family:
    for family in _FAMILIES:
        if all((directory / name).is_file() for name in family.tokenizer_files):
            return family
    names = " or ".join("+".join(f.tokenizer_files) for f in _FAMILIES)
    raise TranslationModelError(f"{directory} has no tokenizer this project knows ({names}); "
                                "copy it next to model.bin (ct2-transformers-converter --copy_files)")


# ---- one loaded model ----------------------------------------------------------------------------

_OPUS_MT_NAME = re.compile(r"opus-mt-(?:tc-big-|tc-)?([a-z]{2,3})-([a-z]{2,3}|mul|[A-Z]+)(?:$|[-_.])")
_PAIR_NAME = re.compile(r"([a-z]{2,3})-([a-z]{2,3})")


def _pair_from_name(name: str) -> Pair | None:
    """(source, target) from `opus-mt-en-de...` or a name that is just `en-de`; the target may be a
    group (`ROMANCE`, `mul`) for a multi-target model."""
    name = name.rstrip("/").rsplit("/", 1)[-1]
    match = _OPUS_MT_NAME.search(name) or _PAIR_NAME.fullmatch(name)
    return (match[1], match[2]) if match else None


def _read_vocabulary(directory: Path) -> frozenset[str]:
    for name in ("shared_vocabulary", "target_vocabulary"):
        if (directory / f"{name}.json").is_file():
            return frozenset(json.loads((directory / f"{name}.json").read_text(encoding="utf-8")))
        if (directory / f"{name}.txt").is_file():
            return frozenset((directory / f"{name}.txt").read_text(encoding="utf-8").splitlines())
    raise TranslationModelError(f"{directory} has no CTranslate2 vocabulary (shared_vocabulary.json)")


@dataclass
class _Member:
    """One CTranslate2 translator, its tokenizers, and the pairs it serves."""

    name: str
    translator: object
    source_tokenizer: object
    target_tokenizer: object
    family: _Family
    vocabulary: frozenset[str]
    pairs: frozenset[Pair]


def _load_member(directory: Path, name: str, pair: Pair | None, device: str, compute_type: str,
                 threads: int) -> _Member:
    import ctranslate2
    import sentencepiece as spm

    if not (directory / "model.bin").is_file():
        raise TranslationModelError(f"{directory} is not a CTranslate2 model (no model.bin); convert it "
                                    "with ct2-transformers-converter (see captions/translate/model.py)")
    family = _family_of(directory)
    vocabulary = _read_vocabulary(directory)
    pairs = family.pairs(pair or _pair_from_name(name), vocabulary)
    if not pairs:
        raise TranslationModelError(f"cannot tell the language pair of {name!r}: name its directory "
                                    "SRC-TGT (for example en-de) or write en-de= before it")
    ct2_device, index = (device.split(":") + ["0"])[:2] if device.startswith("cuda") else (device, "0")
    try:
        translator = ctranslate2.Translator(str(directory), device=ct2_device, device_index=int(index),
                                            compute_type=compute_type, inter_threads=1, intra_threads=threads)
    except (RuntimeError, ValueError) as e:
        raise TranslationModelError(f"cannot load {directory} with CTranslate2 on {device} "
                                    f"({compute_type}): {e}") from e
    tokenizers = [spm.SentencePieceProcessor(model_file=str(directory / f)) for f in family.tokenizer_files]
    logger.info("loaded translation model %s (%s, %s) for %s", name, family.name, compute_type,
                ", ".join(f"{s}->{t}" for s, t in sorted(pairs)))
    return _Member(name, translator, tokenizers[0], tokenizers[-1], family, vocabulary, frozenset(pairs))


# ---- the model the engine calls ------------------------------------------------------------------

class TranslationModel:
    """Every loaded translator, by language pair: `translate_batch` translates a mixed batch with one
    CTranslate2 call per model (a drain of the engine's queue). Thread-safe in the sense
    CTranslate2 is (one caller at a time here: the engine's thread)."""

    def __init__(self, members: Sequence[_Member], beam_size: int = 1,
                 max_length_ratio: float = 1.5, max_length_extra: int = 10):
        self._members = list(members)
        self._by_pair: dict[Pair, _Member] = {}
        for member in self._members:
            for pair in member.pairs:
                self._by_pair.setdefault(pair, member)
        self.beam_size = beam_size
        """1 (greedy): the fastest; a larger beam trades latency for a little quality."""
        self.max_length_ratio = max_length_ratio
        self.max_length_extra = max_length_extra
        """The output is cut at ratio * source tokens + extra: a guard against a model that loops."""

    @property
    def pairs(self) -> frozenset[Pair]:
        """Every (source, target) this model translates."""
        return frozenset(self._by_pair)

    def supports(self, source: str, target: str) -> bool:
        return (language_code(source), language_code(target)) in self._by_pair

    def translate_batch(self, requests: Sequence[TranslationRequest]) -> list[str]:
        """The translations of `requests`, in order. Raises UnsupportedPair (nothing translated) when
        a request's pair has no model; an identical source and target, or empty text, is returned as is."""
        results = [r.text for r in requests]
        groups: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            pair = (language_code(request.source), language_code(request.target))
            if pair[0] == pair[1] or not request.text.strip():
                continue
            if pair not in self._by_pair:
                raise UnsupportedPair(f"no translation model for {pair[0]}->{pair[1]}")
            groups.setdefault(id(self._by_pair[pair]), []).append(i)
        for indexes in groups.values():
            member = self._by_pair[self._pair(requests[indexes[0]])]
            for i, text in zip(indexes, self._translate(member, [requests[i] for i in indexes])):
                results[i] = text
        return results

    @staticmethod
    def _pair(request: TranslationRequest) -> Pair:
        return language_code(request.source), language_code(request.target)

    def source_tokens(self, request: TranslationRequest) -> list[str]:
        """The tokens the model reads for `request` (its length drives the cost)."""
        member = self._by_pair[self._pair(request)]
        return self._source_tokens(member, request)

    @staticmethod
    def _source_tokens(member: _Member, request: TranslationRequest) -> list[str]:
        source, target = TranslationModel._pair(request)
        pieces = member.source_tokenizer.encode(request.text, out_type=str)
        return member.family.source_tokens(pieces, source, target, member.vocabulary)

    def _translate(self, member: _Member, requests: list[TranslationRequest]) -> list[str]:
        sources = [self._source_tokens(member, request) for request in requests]
        prefixes = [member.family.target_prefix(self._pair(request)[1]) for request in requests]
        longest = max(len(tokens) for tokens in sources)
        results = member.translator.translate_batch(
            sources, target_prefix=prefixes if any(prefixes) else None, beam_size=self.beam_size,
            max_decoding_length=math.ceil(self.max_length_ratio * longest) + self.max_length_extra,
            max_input_length=MAX_INPUT_TOKENS,
        )
        texts = []
        for prefix, result in zip(prefixes, results):
            tokens = result.hypotheses[0][len(prefix or ()):]
            texts.append(member.target_tokenizer.decode(tokens))
        return texts

    def close(self) -> None:
        """Frees the translators' memory (their weights on the GPU, if any)."""
        for member in self._members:
            member.translator.unload_model()

    def __repr__(self) -> str:
        return f"TranslationModel({', '.join(m.name for m in self._members)})"


# ---- finding and loading ---------------------------------------------------------------------------

def default_threads() -> int:
    """CPU threads per translation call: the usable cores, at most 4. CTranslate2's own default (4)
    oversubscribes a smaller machine, which makes every call slower (`captions bench translate
    --threads N` shows it)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores))


_HUB_FILES = ["model.bin", "config.json", "*vocabulary*", "*.spm", "*.model", "vmap.txt"]


def _hub_directory(repo: str) -> Path:
    """The local copy of a hub repository of a converted model, downloaded once."""
    from huggingface_hub import snapshot_download

    from captions.stt.model import _hub_unreachable

    offline = _hub_unreachable()
    try:
        if not offline:
            logger.info("fetching translation model %s (cached after the first time)", repo)
        return Path(snapshot_download(repo, allow_patterns=_HUB_FILES, local_files_only=bool(offline)))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        reason = f"cannot reach {offline}" if offline else f"{type(e).__name__}: {e}".splitlines()[0]
        raise TranslationModelError(
            f"cannot download translation model {repo!r} from Hugging Face ({reason}); give a local "
            "CTranslate2 model directory instead (for a try-out without the hub: captions "
            "make-test-checkpoint ckpt/tiny, then ckpt/tiny/translation)"
        ) from e


def _directories(entry: str, wanted: set[Pair] | None) -> list[tuple[Path, str, Pair | None]]:
    """(directory, name, pair given) for one comma-separated entry of a spec."""
    from captions.stt.model import _looks_like_path

    pair: Pair | None = None
    if re.match(r"^[a-z]{2,3}-[a-z]{2,3}=", entry):
        code, entry = entry.split("=", 1)
        pair = tuple(code.split("-"))  # type: ignore[assignment]
    if "{source}" in entry or "{target}" in entry:
        if not wanted:
            raise TranslationModelError(f"{entry!r} is a template: say which language pairs to load")
        found = []
        for source, target in sorted((s, t) for s, t in wanted if s != t):
            found += _directories(f"{source}-{target}=" + entry.format(source=source, target=target), None)
        return found
    if not _looks_like_path(entry):
        return [(_hub_directory(entry), entry, pair)]
    directory = Path(entry).expanduser()
    if not directory.is_dir():
        raise TranslationModelError(f"translation model directory {directory} does not exist")
    if (directory / "model.bin").is_file():
        return [(directory, entry, pair)]
    children = sorted(child for child in directory.iterdir() if (child / "model.bin").is_file())
    if not children:
        raise TranslationModelError(f"{directory} holds no CTranslate2 model (model.bin), nor directories of them")
    return [(child, child.name, None) for child in children
            if wanted is None or _pair_from_name(child.name) is None or _pair_from_name(child.name) in wanted]


def load_translation_model(spec: str, device: str = "cpu", compute_type: str = "auto", *,
                           pairs: Iterable[Pair] | None = None, threads: int = 0,
                           beam_size: int = 1) -> TranslationModel:
    """Loads every model `spec` names (see the module docstring) on `device` ("cpu", "cuda",
    "cuda:N" or "auto"). `pairs`: the (source, target) pairs wanted; expands a template, and skips
    the other pairs of a directory of pairs. `compute_type`: CTranslate2's ("auto": int8 on a CPU,
    int8_float16 on a GPU, where supported). `threads`: CTranslate2's intra_threads (0:
    `default_threads()`). Raises TranslationModelError, with a one-line message."""
    import ctranslate2

    if threads <= 0:
        threads = default_threads()
    if device == "auto":
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    wanted = {(language_code(s), language_code(t)) for s, t in pairs} if pairs is not None else None
    entries = [part.strip() for part in spec.split(",") if part.strip()]
    if not entries:
        raise TranslationModelError("no translation model given")
    members = [_load_member(directory, name, pair, device, compute_type, threads)
               for entry in entries for directory, name, pair in _directories(entry, wanted)]
    model = TranslationModel(members, beam_size=beam_size)
    if wanted and (missing := wanted - model.pairs - {(s, t) for s, t in wanted if s == t}):
        raise TranslationModelError(f"{spec!r} does not translate "
                                    + ", ".join(f"{s}->{t}" for s, t in sorted(missing)))
    return model
