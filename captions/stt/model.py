"""Finding and loading a Kyutai STT checkpoint with moshi's own loaders.

`--model` is either a Hugging Face repo id (downloaded once with huggingface_hub, progress bar
included) or a local directory in the same layout: a config.json that names its files (moshi_name,
mimi_name, tokenizer_name, optionally mimi_config_name) next to those files. A local directory
never touches the hub.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from captions.config import add_option, device_name
from captions.log import logger

DEFAULT_MODEL = "kyutai/stt-1b-en_fr"
# The names moshi's CheckpointInfo falls back to when config.json does not name a file.
_DEFAULT_FILE_NAMES = {
    "moshi_name": "model.safetensors",
    "mimi_name": "tokenizer-e351c8d8-checkpoint125.safetensors",
    "tokenizer_name": "tokenizer_spm_32k_3.model",
}


_NO_COMPILE = None
HUB_PROBE_TIMEOUT_S = 5.0


def add_model_options(parser) -> None:
    """--model and --device, shared by every command that loads the engine."""
    add_option(parser, "--model", env="CAPTIONS_MODEL", default=DEFAULT_MODEL,
               help="Hugging Face repo id or local checkpoint directory")
    add_option(parser, "--device", env="CAPTIONS_DEVICE", default="auto", type=device_name,
               help="auto, cpu, cuda or cuda:N")


AUTO_BATCH_SIZE = {"cuda": 64, "cpu": 4}
"""Engine slots by device when not given. On a GPU, Kyutai serve 64 streams of stt-1b-en_fr on one
L40S (published, not measured here); on a CPU only the test checkpoint runs live, and few."""


def batch_size(text: str) -> int | str:
    """argparse type for --batch-size: a positive integer, or auto (by device, see AUTO_BATCH_SIZE)."""
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or auto, got {text}")
    return value


def resolve_batch_size(value: int | str, device: str) -> int:
    return AUTO_BATCH_SIZE["cuda" if device.startswith("cuda") else "cpu"] if value == "auto" else int(value)


class CheckpointError(Exception):
    """The checkpoint cannot be found or read; the message says what to fix."""


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(model: str) -> bool:
    """An existing path, or anything that is not shaped like a Hugging Face `owner/name` id."""
    return Path(model).expanduser().exists() or model.startswith((".", "/", "~")) or not _REPO_ID.match(model)


def _checkpoint_files(config: dict) -> dict[str, str]:
    names = {key: config.get(key, default) for key, default in _DEFAULT_FILE_NAMES.items()}
    if config.get("mimi_config_name"):
        names["mimi_config_name"] = config["mimi_config_name"]
    return names


def resolve_checkpoint_dir(model: str) -> Path:
    """A local directory holding config.json and the files it names (downloading them if needed)."""
    if _looks_like_path(model):
        directory = Path(model).expanduser()
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        return directory
    from huggingface_hub import hf_hub_download

    # Offline, the hub client retries for half a minute before failing: ask once, quickly, and use
    # the local cache (or say how to do without the hub) when it cannot be reached.
    offline = _hub_unreachable()
    try:
        config_path = Path(hf_hub_download(model, "config.json", local_files_only=bool(offline)))
        config = json.loads(config_path.read_text())
        for name in _checkpoint_files(config).values():
            logger.info("fetching %s from %s (cached after the first time)", name, model)
            hf_hub_download(model, name, local_files_only=bool(offline))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        reason = f"cannot reach {offline}" if offline else f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"cannot download {model!r} from Hugging Face ({reason}); pass --model with a local "
            "checkpoint directory instead (for a try-out without the hub: captions make-test-checkpoint "
            "ckpt/tiny, then --model ckpt/tiny)"
        ) from e
    return config_path.parent


def _hub_unreachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the Hugging Face endpoint answers a TCP connection within `timeout_s`; else what
    could not be reached (also when HF_HUB_OFFLINE is set)."""
    import socket
    import urllib.parse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "the hub (HF_HUB_OFFLINE is set)"
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{constants.ENDPOINT}: {e.strerror or e}"
    return None


@dataclass
class SttModel:
    """Everything the engine needs from a checkpoint, loaded on one device."""

    name: str
    mimi: object
    lm: object
    tokenizer: object
    device: object
    dtype: object
    silence_prefix_s: float
    """Silence fed before a stream's audio (stt_config.audio_silence_prefix_seconds)."""
    delay_s: float
    """The text delay: the model writes a word this long after hearing it."""
    padding_id: int
    has_vad: bool
    """Whether the LM has the semantic-VAD extra heads."""
    frame_rate: float
    frame_size: int
    sample_rate: int

    @property
    def prefix_frames(self) -> int:
        return math.ceil(self.silence_prefix_s * self.frame_rate)

    @property
    def flush_frames(self) -> int:
        return math.ceil(self.delay_s * self.frame_rate)

    @property
    def time_offset_s(self) -> float:
        """Subtracted from a token's position/frame_rate to give the time in the stream's audio.

        Kyutai's reference loop rounds the prefix down to whole seconds (`int(...)`); we keep that so
        our timestamps equal theirs."""
        return int(self.prefix_frames / self.frame_rate) + self.delay_s


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise CheckpointError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but no CUDA GPU is available")
    return device


def load_stt_model(model: str = DEFAULT_MODEL, device: str = "auto") -> SttModel:
    """Loads Mimi, the LM and the tokenizer through moshi's CheckpointInfo (never the hub for a
    local directory). bf16 on GPU; fp32 on CPU with denormals flushed (random or tiny weights
    produce denormals that make CPU matmuls several times slower)."""
    import torch
    from moshi.models import loaders

    device = pick_device(device)
    directory = resolve_checkpoint_dir(model)
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from e
    files = {key: directory / name for key, name in _checkpoint_files(config).items()}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete, missing: {', '.join(missing)}")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if not device.startswith("cuda"):
        torch.set_flush_denormal(True)
        # moshi torch.compiles a few small kernels; on CPU that needs a C toolchain and setuptools
        # at run time and gains nothing at these sizes. (NO_TORCH_COMPILE=1 would have to be set
        # before moshi is imported; this switch works at any time.)
        global _NO_COMPILE
        if _NO_COMPILE is None:
            from moshi.utils.compile import no_compile

            _NO_COMPILE = no_compile()  # kept referenced: collecting it would re-enable compiling
            _NO_COMPILE.__enter__()
    try:
        info = loaders.CheckpointInfo.from_hf_repo(
            str(directory),
            moshi_weights=files["moshi_name"],
            mimi_weights=files["mimi_name"],
            tokenizer=files["tokenizer_name"],
            config_path=config_path,
            mimi_config_path=files.get("mimi_config_name"),
        )
        mimi = info.get_mimi(device=device)
        lm = info.get_moshi(device=device, dtype=dtype)
        tokenizer = info.get_text_tokenizer()
    except Exception as e:
        raise CheckpointError(f"cannot load checkpoint {directory}: {type(e).__name__}: {e}") from e
    stt = info.stt_config
    return SttModel(
        name=model,
        mimi=mimi,
        lm=lm,
        tokenizer=tokenizer,
        device=torch.device(device),
        dtype=dtype,
        # The reference loop's defaults when stt_config lacks a key.
        silence_prefix_s=float(stt.get("audio_silence_prefix_seconds", 1.0)),
        delay_s=float(stt.get("audio_delay_seconds", 5.0)),
        padding_id=int((info.raw_config or {}).get("text_padding_token_id", 3)),
        has_vad=len(lm.extra_heads) > 0,
        frame_rate=float(mimi.frame_rate),
        frame_size=int(mimi.frame_size),
        sample_rate=int(mimi.sample_rate),
    )
