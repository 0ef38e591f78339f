"""Random translation models in the real CTranslate2 layout of a converted OPUS-MT (Marian) model.

No machine of ours can download translation weights, yet the whole translation path (CTranslate2's
loader and decoder, the SentencePiece tokenizers, the engine's batching) must run in tests, demos
and benchmarks. This writes, deterministically for a seed and without network, what
`ct2-transformers-converter --model Helsinki-NLP/opus-mt-SRC-TGT --copy_files source.spm target.spm`
writes: model.bin, config.json and shared_vocabulary.json from `ctranslate2.specs.TransformerSpec`
(post-norm, swish, sinusoidal positions, tied embeddings, a decoder that starts from a zero
embedding, as the converter's Marian loader sets them), with source.spm and target.spm trained here
on the small bundled text below.

Two shapes: TINY (a few hundred kilobytes per pair; its output is meaningless words, as the tiny
STT checkpoint's is) for tests and `captions make-test-checkpoint`, and OPUS_MT_BASE (the shape and
vocabulary size of Helsinki-NLP/opus-mt-en-de, about 74 M parameters) for `captions bench translate`.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from captions.log import logger

DEFAULT_LANGUAGES = ("en", "fr", "de", "es")
"""The tiny model's languages: the STT model's two (English, French) and two more to read in."""


@dataclass(frozen=True)
class MarianShape:
    """The dimensions of a Marian transformer (one language pair)."""

    d_model: int
    layers: int
    """Encoder layers, and as many decoder layers."""
    heads: int
    ffn: int
    vocab_size: int | None
    """Tokens in the shared vocabulary; None: exactly the tokenizer's pieces. Production models'
    vocabularies are larger than our tokenizer's: the rest is filled with pieces the tokenizer
    never writes (they decode to its unknown sign)."""
    max_positions: int = 512


TINY = MarianShape(d_model=32, layers=2, heads=2, ffn=64, vocab_size=None)
OPUS_MT_BASE = MarianShape(d_model=512, layers=6, heads=8, ffn=2048, vocab_size=58101)
"""Helsinki-NLP/opus-mt-en-de's config.json (a transformer-align base model): the production shape."""

TOKENIZER_VOCAB = 400
PROJECTION_GAIN = 4.0
"""Sharpens the random model's output distribution, so that its greedy choice depends on its input."""
END_BIAS = 7.0
M2M100_END_BIAS = 2.0
"""The same for the M2M-100-style model, whose final layer norm leaves smaller logits."""
"""Added to the </s> logit of the random model: it then ends most sentences after a few words."""

# A little of each language, enough for a tokenizer with word pieces of all of them.
SENTENCES: dict[str, list[str]] = {
    "en": [
        "Good morning everyone, thank you for joining the weekly planning meeting.",
        "The budget for the next quarter looks reasonable, but travel costs went up.",
        "Could you share your screen so that we can all see the latest figures?",
        "I think we should ship the new release before the end of the month.",
        "Let me summarise the three decisions we took during the last call.",
        "The customer asked whether live captions also work on mobile phones.",
        "Please mute your microphone when you are not speaking.",
        "We will meet again next Tuesday at ten o'clock.",
    ],
    "fr": [
        "Bonjour à tous, nous allons commencer la réunion dans quelques instants.",
        "Je pense que la nouvelle version est prête pour les tests utilisateurs.",
        "Les sous-titres en direct rendent les appels plus accessibles.",
        "Pouvez-vous partager votre écran pour que tout le monde voie les chiffres ?",
        "Le budget du prochain trimestre semble raisonnable, mais les voyages coûtent plus cher.",
        "Merci beaucoup, à demain et bonne journée.",
        "Nous avons pris trois décisions lors de la dernière réunion.",
        "Coupez votre micro quand vous ne parlez pas, s'il vous plaît.",
    ],
    "de": [
        "Guten Morgen zusammen, danke, dass ihr an der wöchentlichen Planung teilnehmt.",
        "Das Budget für das nächste Quartal sieht vernünftig aus, aber die Reisekosten sind gestiegen.",
        "Kannst du deinen Bildschirm teilen, damit wir alle die neuesten Zahlen sehen?",
        "Ich denke, wir sollten die neue Version vor Ende des Monats veröffentlichen.",
        "Live-Untertitel machen Anrufe für alle zugänglicher.",
        "Bitte schalte dein Mikrofon stumm, wenn du nicht sprichst.",
        "Wir treffen uns nächsten Dienstag um zehn Uhr wieder.",
        "Vielen Dank und bis morgen.",
    ],
    "es": [
        "Buenos días a todos, gracias por venir a la reunión semanal de planificación.",
        "El presupuesto del próximo trimestre parece razonable, pero los viajes cuestan más.",
        "¿Puedes compartir tu pantalla para que todos veamos las últimas cifras?",
        "Creo que deberíamos publicar la nueva versión antes de fin de mes.",
        "Los subtítulos en directo hacen las llamadas más accesibles.",
        "Por favor, silencia tu micrófono cuando no estés hablando.",
        "Nos vemos el próximo martes a las diez.",
        "Muchas gracias y hasta mañana.",
    ],
    "it": [
        "Buongiorno a tutti, grazie per essere qui alla riunione settimanale.",
        "Penso che dovremmo pubblicare la nuova versione prima della fine del mese.",
        "I sottotitoli in diretta rendono le chiamate più accessibili.",
        "Grazie mille e a domani.",
    ],
    "pt": [
        "Bom dia a todos, obrigado por participarem da reunião semanal.",
        "Acho que devemos lançar a nova versão antes do fim do mês.",
        "As legendas ao vivo tornam as chamadas mais acessíveis.",
        "Muito obrigado e até amanhã.",
    ],
}


def train_tokenizer(path: Path, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """A SentencePiece unigram model on SENTENCES, with OPUS-MT's special pieces: 0 <unk>, 1 <s>,
    2 </s> (CTranslate2 reads the vocabulary by piece, not by id, so ids do not matter there)."""
    import sentencepiece as spm

    text = [sentence for sentences in SENTENCES.values() for sentence in sentences]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        num_threads=1, seed_sentencepiece_size=10000, minloglevel=2, character_coverage=1.0,
    )
    path.write_bytes(model.getvalue())


def _vocabulary(tokenizer_path: Path, size: int | None) -> list[str]:
    """The shared vocabulary as the converter writes it for OPUS-MT: </s>, <unk>, then the pieces
    (the converter also drops the <pad> that Transformers appends)."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    tokens = ["</s>", "<unk>"] + [p for p in pieces if p not in ("<unk>", "<s>", "</s>")]
    if size is not None:
        if size < len(tokens):
            raise ValueError(f"vocabulary of {size} is smaller than the tokenizer's {len(tokens)} pieces")
        tokens += [f"▁filler{i}" for i in range(size - len(tokens))]
    return tokens


def _is_word(token: str) -> bool:
    return token.startswith("▁") and len(token) >= 4 and not token.startswith("▁filler")


def _sinusoids(positions: int, dim: int) -> np.ndarray:
    """Marian's static sinusoidal position table (sines in the first half, cosines in the second)."""
    half = dim // 2
    frequencies = np.exp(-math.log(10000.0) * np.arange(half) / max(half - 1, 1))
    angles = np.arange(positions)[:, None] * frequencies[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class _Weights:
    """Random weights from one seeded generator, scaled so that activations stay near unit size."""

    def __init__(self, seed: int):
        self._rng = np.random.default_rng(seed)

    def matrix(self, rows: int, columns: int) -> np.ndarray:
        return self._rng.standard_normal((rows, columns), dtype=np.float32) / np.float32(math.sqrt(columns))

    def vector(self, size: int, scale: float = 0.02) -> np.ndarray:
        return self._rng.standard_normal(size, dtype=np.float32) * np.float32(scale)

    def linear(self, spec, rows: int, columns: int) -> None:
        spec.weight = self.matrix(rows, columns)
        spec.bias = self.vector(rows)

    @staticmethod
    def norm(spec, dim: int) -> None:
        spec.gamma = np.ones(dim, dtype=np.float32)
        spec.beta = np.zeros(dim, dtype=np.float32)

    def ffn(self, spec, dim: int, hidden: int) -> None:
        self.linear(spec.linear_0, hidden, dim)
        self.linear(spec.linear_1, dim, hidden)
        self.norm(spec.layer_norm, dim)


def marian_spec(shape: MarianShape, vocabulary: list[str], seed: int, realistic: bool = False,
                m2m100: bool = False, end_bias: float = END_BIAS):
    """A `TransformerSpec` shaped like the converter's output for a Marian model, random weights.

    By default (the tiny model) the output projection is untied and sharpened, writes whole words
    only, and ends sentences now and then: short runs of different words. `realistic=True` (the
    benchmark's model) ties the projection to the embeddings as OPUS-MT does and makes </s>
    unreachable, so that every translation runs to the length limit the caller sets (as many tokens
    as a real translation of the caption would have, instead of stopping at a random point).

    `m2m100=True`: M2M-100's variant of the same transformer, as the converter's M2M-100 loader
    writes it (pre-norm with final norms, ReLU, a decoder started by </s> then the `__xx__` prefix)."""
    from ctranslate2.specs import common_spec, transformer_spec

    spec = transformer_spec.TransformerSpec.from_config(
        (shape.layers, shape.layers), shape.heads, pre_norm=m2m100,
        activation=common_spec.Activation.RELU if m2m100 else common_spec.Activation.SWISH,
        layernorm_embedding=False,
    )
    weights, dim, size = _Weights(seed), shape.d_model, len(vocabulary)
    embeddings = weights.matrix(size, dim)  # tied: both embeddings and the output projection
    positions = _sinusoids(shape.max_positions, dim)
    for side, embedding in ((spec.encoder, spec.encoder.embeddings[0]), (spec.decoder, spec.decoder.embeddings)):
        embedding.weight = embeddings
        side.scale_embeddings = math.sqrt(dim)
        side.position_encodings.encodings = positions
    for layer in spec.encoder.layer:
        weights.linear(layer.self_attention.linear[0], 3 * dim, dim)
        weights.linear(layer.self_attention.linear[1], dim, dim)
        weights.norm(layer.self_attention.layer_norm, dim)
        weights.ffn(layer.ffn, dim, shape.ffn)
    for layer in spec.decoder.layer:
        weights.linear(layer.self_attention.linear[0], 3 * dim, dim)
        weights.linear(layer.self_attention.linear[1], dim, dim)
        weights.norm(layer.self_attention.layer_norm, dim)
        weights.linear(layer.attention.linear[0], dim, dim)
        weights.linear(layer.attention.linear[1], 2 * dim, dim)
        weights.linear(layer.attention.linear[2], dim, dim)
        weights.norm(layer.attention.layer_norm, dim)
        weights.ffn(layer.ffn, dim, shape.ffn)
    if m2m100:
        weights.norm(spec.encoder.layer_norm, dim)
        weights.norm(spec.decoder.layer_norm, dim)
    else:
        spec.decoder.start_from_zero_embedding = True
    bias = np.zeros(size, dtype=np.float32)
    if realistic:
        spec.decoder.projection.weight = embeddings
        bias[vocabulary.index("</s>")] = -1e4
    else:
        # Tied random weights make the decoder repeat its last token; an untied projection walks
        # through different pieces (the format is the same: tied weights are one array saved once).
        spec.decoder.projection.weight = weights.matrix(size, dim) * np.float32(PROJECTION_GAIN)
        # Whole words only, and an end of sentence now and then.
        bias[[i for i, token in enumerate(vocabulary) if not _is_word(token)]] = -1e4
        bias[vocabulary.index("</s>")] = end_bias
    spec.decoder.projection.bias = bias
    # What the converter's Marian loader writes into config.json.
    spec.config.eos_token = "</s>"
    spec.config.unk_token = "<unk>"
    spec.config.decoder_start_token = "</s>"
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    return spec


def parameter_count(shape: MarianShape, vocab_size: int) -> int:
    """Parameters of a Marian model of this shape with tied embeddings (as OPUS-MT's)."""
    d, f = shape.d_model, shape.ffn
    attention = 4 * d * d + 4 * d + 2 * d
    ffn = 2 * d * f + f + d + 2 * d
    return vocab_size * d + vocab_size + shape.layers * (attention + ffn) + shape.layers * (2 * attention + ffn)


def write_marian_model(out_dir: Path, tokenizer_path: Path, shape: MarianShape, seed: int,
                       quantization: str | None = None, realistic: bool = False) -> Path:
    """One converted-Marian directory: model.bin, config.json, shared_vocabulary.json, source.spm
    and target.spm (one tokenizer for both sides, as OPUS-MT's joint-vocabulary models have);
    `realistic`: see `marian_spec`."""
    spec = marian_spec(shape, _vocabulary(tokenizer_path, shape.vocab_size), seed, realistic)
    spec.validate()
    spec.optimize(quantization=quantization)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(out_dir))
    for name in ("source.spm", "target.spm"):
        shutil.copyfile(tokenizer_path, out_dir / name)
    return out_dir


def write_tiny_translation_model(path: str | Path, languages: Sequence[str] = DEFAULT_LANGUAGES,
                                 seed: int = 0) -> Path:
    """A directory of tiny random OPUS-MT-style models, one per ordered pair of `languages`, named
    `SRC-TGT/` (`en-de/`, `fr-de/`, ...), as `load_translation_model` reads a directory of pairs.

    Deterministic for a seed (each pair gets its own weights); about a second for four languages."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.spm"
        train_tokenizer(tokenizer)
        for index, (source, target) in enumerate(
                (s, t) for s in languages for t in languages if s != t):
            pair_dir = out / f"{source}-{target}"
            if pair_dir.exists():
                shutil.rmtree(pair_dir)
            write_marian_model(pair_dir, tokenizer, TINY, seed=seed * 1000 + index)
    (out / "README.txt").write_text(
        "Tiny random translation models (meaningless output), one CTranslate2 OPUS-MT-style model per\n"
        f"language pair; written by captions make-test-checkpoint (seed {seed}).\n")
    (out / "languages.json").write_text(json.dumps(list(languages)) + "\n")
    logger.info("wrote tiny translation models for %s to %s (seed %d)", ",".join(languages), out, seed)
    return out


def write_tiny_m2m100_model(path: str | Path, languages: Sequence[str] = DEFAULT_LANGUAGES, seed: int = 0) -> Path:
    """One tiny random model in the layout the converter writes for facebook/m2m100_418M (with
    `--copy_files sentencepiece.bpe.model`): every direction between `languages` in one model, the
    target chosen by a `__de__`-style prefix. For tests of that family; output meaningless."""
    out = Path(path)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer = out / "sentencepiece.bpe.model"
    train_tokenizer(tokenizer)
    pieces = [p for p in _vocabulary(tokenizer, None) if p not in ("</s>", "<unk>")]
    vocabulary = ["<s>", "<pad>", "</s>", "<unk>"] + pieces + [f"__{code}__" for code in languages]
    spec = marian_spec(TINY, vocabulary, seed, m2m100=True, end_bias=M2M100_END_BIAS)
    spec.config.bos_token = "<s>"
    spec.validate()
    spec.optimize()
    spec.save(str(out))
    return out
