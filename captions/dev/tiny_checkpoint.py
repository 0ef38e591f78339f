"""`captions make-test-checkpoint DIR`: a tiny random Kyutai STT checkpoint in the real on-disk layout,
and tiny random translation models beside it in DIR/translation/ (captions/translate/tiny.py).

No machine of ours can download the real weights, yet the whole model path (moshi's loaders, Mimi,
LMGen, the tokenizer, the VAD heads) must run in tests and demos. This writes config.json, the LM
and Mimi safetensors, a Mimi config and a sentencepiece tokenizer, deterministically for a seed, in
seconds on a CPU.

Random weights alone transcribe everything to the same token: Mimi's VQ codebooks start at zero,
so every frame maps to code 0. So we:

* initialise each codebook from Mimi's own latents of real speech (espeak-ng), as k-means
  initialisation does, so different sounds get different codes;
* make the LM follow its input: the first codebook's embedding is one-hot per code, and the text
  head maps each code to a token (a word piece, a word boundary, or padding for codes heard in
  silence), while the random transformer layers, kept small, still shape every output;
* make VAD head class 0 ("no voice activity") fire on the codes heard in silence.

The result emits different word sequences for different audio and nothing for silence. Its words
mean nothing: tests compare structure and consistency, not English. It also answers at once where
the real model waits its learnt delay (0.5 s for stt-1b-en_fr), so its word times, from which the
configured delay is still subtracted, come out early by that delay.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from captions.dev.speech import speech_samples
from captions.log import logger
from captions.stt.api import FRAME_SIZE, SAMPLE_RATE

CARD = 64  # codes per codebook; equals the LM width so that code c can own dimension c
N_Q = 8  # audio codebooks
LM_DIM = 64
ATTENTION = 0.2
"""Scale of the LM's attention outputs in the default checkpoint: a nearly memoryless model."""

_CORPUS_SENTENCES = [
    ("en", "The quick brown fox jumps over the lazy dog near the river bank."),
    ("en", "Captions help everyone follow the meeting, even in a noisy room."),
    ("fr", "Bonjour à tous, la réunion commence dans cinq minutes."),
    ("en", "Seven silver ships sailed slowly through the shallow harbour."),
    ("fr", "Les sous-titres en direct rendent les appels plus accessibles."),
    ("en", "Please mute your microphone when you are not speaking."),
]
_TOKENIZER_TEXT = [text for _, text in _CORPUS_SENTENCES] + [
    "hello world good morning thank you very much see you tomorrow",
    "merci beaucoup à demain bonne journée au revoir",
    "streaming speech recognition with delayed streams modeling",
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima",
]


def _tiny_mimi_config() -> dict:
    seanet = {
        "channels": 1, "dimension": 32, "causal": True, "n_filters": 8, "n_residual_layers": 1,
        "activation": "ELU", "compress": 2, "dilation_base": 2, "disable_norm_outer_blocks": 0,
        "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 3, "norm": "none",
        "pad_mode": "constant", "ratios": [8, 6, 5, 4], "true_skip": True,
    }
    return {
        "sample_rate": SAMPLE_RATE, "channels": 1, "frame_rate": 12.5, "seanet": seanet,
        "quantizer": {"dimension": 16, "n_q": N_Q, "bins": CARD, "input_dimension": 32,
                      "output_dimension": 32},
        "transformer": {
            "d_model": 32, "num_heads": 2, "num_layers": 2, "causal": True, "layer_scale": 0.01,
            "context": 250, "conv_layout": True, "max_period": 10000, "gating": "none",
            "norm": "layer_norm", "positional_embedding": "rope", "dim_feedforward": 64,
            "input_dimension": 32, "output_dimensions": [32],
        },
    }


def _full_mimi_config() -> dict:
    """Production Mimi's shape (79 M parameters) with 32 codebooks of 2048 codes."""
    from moshi.models.loaders import _mimi_config

    return json.loads(json.dumps(_mimi_config))


def _lm_config(text_card: int, card: int, n_q: int, dim: int, num_layers: int, num_heads: int,
               delay_s: float, prefix_s: float, vad: bool) -> dict:
    """Keys as in Kyutai's STT config.json (LM kwargs + file names + stt_config)."""
    config = {
        "card": card, "n_q": n_q, "dep_q": 0, "delays": [0] * (n_q + 1), "dim": dim,
        "text_card": text_card, "existing_text_padding_id": 3, "num_heads": num_heads,
        "num_layers": num_layers, "hidden_scale": 2.0, "causal": True, "layer_scale": None,
        "context": 750, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
        "positional_embedding": "rope", "depformer_dim": 64, "depformer_num_heads": 1,
        "depformer_num_layers": 1, "depformer_dim_feedforward": 64, "depformer_multi_linear": True,
        "depformer_pos_emb": "none", "depformer_weights_per_step": True,
        "moshi_name": "model.safetensors", "mimi_name": "mimi.safetensors",
        "mimi_config_name": "mimi_config.json", "tokenizer_name": "tokenizer.model",
        "model_type": "stt",
        "stt_config": {"audio_silence_prefix_seconds": prefix_s, "audio_delay_seconds": delay_s},
    }
    if vad:
        config.update({"extra_heads_num_heads": 4, "extra_heads_dim": 6})
    return config


def lm_kwargs(config: dict) -> dict:
    """The LM's constructor arguments in a Kyutai STT config.json (all but file names and stt_config)."""
    return {k: v for k, v in config.items() if not k.endswith("_name") and k not in ("model_type", "stt_config")}


def _train_tokenizer(path: Path, vocab_size: int) -> None:
    """A sentencepiece model with Kyutai's special ids: 0 unk (used as word boundary), 1 bos,
    2 eos, 3 pad."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_TEXT), model_writer=model, vocab_size=vocab_size,
        model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=3, hard_vocab_limit=False,
        num_threads=1, seed_sentencepiece_size=10000, minloglevel=2, character_coverage=1.0,
    )
    path.write_bytes(model.getvalue())


def _speech_corpus() -> tuple[np.ndarray, np.ndarray]:
    """espeak-ng speech separated by silences, at 24 kHz; and a per-frame 'is silent' flag."""
    pieces = []
    with tempfile.TemporaryDirectory() as tmp:
        for voice, text in _CORPUS_SENTENCES:
            speech = speech_samples(text, Path(tmp), voice=voice)
            pieces += [np.zeros(SAMPLE_RATE, dtype=np.float32), speech]
    pieces.append(np.zeros(SAMPLE_RATE, dtype=np.float32))
    audio = np.concatenate(pieces)
    audio = audio[: len(audio) // FRAME_SIZE * FRAME_SIZE]
    rms = np.sqrt((audio.reshape(-1, FRAME_SIZE) ** 2).mean(axis=1))
    return audio, rms < 0.01


def _kmeans(points, k: int, generator, iterations: int = 8):
    """Plain Lloyd k-means; starts from randomly chosen points, jittered when there are too few."""
    import torch

    index = torch.randint(0, points.shape[0], (k,), generator=generator)
    centroids = points[index] + 1e-3 * torch.randn(k, points.shape[1], generator=generator)
    for _ in range(iterations):
        assign = torch.cdist(points, centroids).argmin(dim=1)
        for j in range(k):
            members = points[assign == j]
            if len(members):
                centroids[j] = members.mean(dim=0)
    return centroids


def _init_codebooks(mimi, audio: np.ndarray, generator) -> None:
    """Residual k-means over Mimi's latents of real speech, codebook after codebook."""
    import torch

    with torch.no_grad():
        latent = mimi._encode_to_unquantized_latent(torch.from_numpy(audio)[None, None])
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            residual = rvq.input_proj(latent)[0].T  # [T, D]
            for layer in rvq.vq.layers:
                codebook = layer._codebook
                centroids = _kmeans(layer.project_in(residual), codebook.codebook_size, generator)
                codebook.embedding_sum.copy_(centroids)
                codebook.cluster_usage.fill_(1.0)
                codebook._initialized.fill_(1.0)
                codebook.register_buffer("_embedding", None, persistent=False)
                quantized = layer.project_out(codebook.decode(codebook.encode(layer.project_in(residual))))
                residual = residual - quantized


def _wire_lm(lm, codes: np.ndarray, silent: np.ndarray, tokenizer, generator, vad: bool,
             attention: float = ATTENTION) -> None:
    """Makes the LM's text follow the first codebook (see the module docstring); `attention`: see
    `make_test_checkpoint`."""
    import torch

    card, dim = lm.card, lm.dim
    silence_votes = np.bincount(codes[silent], minlength=card)
    speech_votes = np.bincount(codes[~silent], minlength=card)
    silence_codes = [c for c in range(card) if silence_votes[c] > speech_votes[c]]
    words = [i for i in range(tokenizer.get_piece_size())
             if tokenizer.id_to_piece(i).startswith("▁") and len(tokenizer.id_to_piece(i)) >= 3]
    # The codes speech uses most alternate between word pieces and word boundaries, so that every
    # stretch of speech writes several short words; codes heard mostly in silence write padding.
    by_use = sorted(range(card), key=lambda c: -speech_votes[c])
    picks = torch.randint(0, len(words), (card,), generator=generator).tolist()
    token_of_code = {}
    for rank, c in enumerate(by_use):
        if c in silence_codes:
            token_of_code[c] = 3
        elif rank % 3 == 1:
            token_of_code[c] = 0
        else:
            token_of_code[c] = words[picks[c]]
    with torch.no_grad():
        scale = min(1.0, dim / card)
        lm.emb[0].weight.zero_()
        for c in range(card):
            lm.emb[0].weight[c, c % dim] = 4.0
        for emb in list(lm.emb[1:]) + [lm.text_emb]:
            emb.weight.mul_(0.1)
        for layer in lm.transformer.layers:
            layer.self_attn.out_projs[0].weight.mul_(attention)
            layer.gating.linear_out.weight.mul_(0.2)
        lm.text_linear.weight.mul_(0.01)
        for c, token in token_of_code.items():
            lm.text_linear.weight[token, c % dim] += 2.0 * scale
        for head in lm.extra_heads:
            head.weight.zero_()
            for c in silence_codes:
                head.weight[0, c % dim] = 1.0


def make_test_checkpoint(out_dir: str | Path, seed: int = 0, full_mimi: bool = False,
                         lm_dim: int = LM_DIM, lm_layers: int = 2, lm_heads: int = 4,
                         delay_s: float = 0.5, prefix_s: float = 0.0, vad: bool = True,
                         attention: float = ATTENTION) -> Path:
    """Writes the checkpoint; `prefix_s`/`vad=False` give a 2.6B-style config (prefix, no heads).

    `attention` scales the LM's attention outputs. The default keeps them weak, so that a token
    depends mostly on the frame just heard (the other tests' expectations rely on it); 1.0 leaves
    them at full strength, a model that *remembers*: what a stream heard earlier, or what a slot
    heard before it was reset, changes its tokens and pause probabilities (the engine's batched ==
    solo property test needs that to catch a leak between slots or a missed reset)."""
    import sentencepiece as spm
    import torch
    from moshi.models.loaders import get_mimi, get_moshi_lm
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_flush_denormal(True)
    generator = torch.Generator().manual_seed(seed)
    mimi_config = _full_mimi_config() if full_mimi else _tiny_mimi_config()
    card = mimi_config["quantizer"]["bins"]
    n_q = N_Q if not full_mimi else 32

    _train_tokenizer(out / "tokenizer.model", vocab_size=256)
    tokenizer = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    config = _lm_config(tokenizer.get_piece_size(), card, n_q, lm_dim, lm_layers, lm_heads,
                        delay_s, prefix_s, vad)

    mimi = get_mimi(None, mimi_config, device="cpu", num_codebooks=n_q)
    audio, silent = _speech_corpus()
    _init_codebooks(mimi, audio, generator)
    with torch.no_grad():
        codes = mimi.encode(torch.from_numpy(audio)[None, None])[0, 0].numpy()
    lm = get_moshi_lm(None, lm_kwargs(config), device="cpu", dtype=torch.float32)
    _wire_lm(lm, codes, silent[: len(codes)], tokenizer, generator, vad, attention)

    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(out / "mimi.safetensors"))
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / "model.safetensors"))
    (out / "mimi_config.json").write_text(json.dumps(mimi_config, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    logger.info("wrote test checkpoint to %s (seed %d)", out, seed)
    return out


TRANSLATION_SUBDIR = "translation"
"""Where `captions make-test-checkpoint DIR` writes the tiny translation models: DIR/translation/."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from captions.translate.tiny import DEFAULT_LANGUAGES

    parser.description = (
        "Write a tiny random Kyutai STT checkpoint into OUT_DIR, and tiny random translation models (one "
        f"CTranslate2 OPUS-MT-style model per language pair) into OUT_DIR/{TRANSLATION_SUBDIR}/. Both write "
        "meaningless words; both are in the real on-disk formats.")
    parser.add_argument("out_dir", help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--full-mimi", action="store_true",
                        help="production-size Mimi (79 M params, 32 codebooks of 2048) for benchmarks")
    parser.add_argument("--lm-dim", type=int, default=LM_DIM, help="LM width")
    parser.add_argument("--lm-layers", type=int, default=2, help="LM transformer layers")
    parser.add_argument("--lm-heads", type=int, default=4, help="LM attention heads")
    parser.add_argument("--delay", type=float, default=0.5, help="stt_config audio_delay_seconds")
    parser.add_argument("--prefix", type=float, default=0.0, help="stt_config audio_silence_prefix_seconds")
    parser.add_argument("--no-vad", action="store_true", help="no semantic-VAD extra heads (like stt-2.6b-en)")
    parser.add_argument("--translation-languages", default=",".join(DEFAULT_LANGUAGES),
                        help=f"languages of the tiny translation models in OUT_DIR/{TRANSLATION_SUBDIR}/, one "
                             "model per ordered pair; empty: write none")


def run(args: argparse.Namespace) -> int:
    make_test_checkpoint(args.out_dir, seed=args.seed, full_mimi=args.full_mimi, lm_dim=args.lm_dim,
                         lm_layers=args.lm_layers, lm_heads=args.lm_heads, delay_s=args.delay,
                         prefix_s=args.prefix, vad=not args.no_vad)
    languages = [code.strip() for code in args.translation_languages.split(",") if code.strip()]
    if languages:
        from captions.translate.tiny import write_tiny_translation_model

        write_tiny_translation_model(Path(args.out_dir) / TRANSLATION_SUBDIR, languages, seed=args.seed)
    print(args.out_dir)
    return 0
