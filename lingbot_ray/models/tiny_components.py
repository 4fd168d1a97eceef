"""The tiny model class: its architecture, and its VAE / UMT5 / tokenizer built locally.

Shared by the random-weights test checkpoint (:mod:`lingbot_ray.models.tiny`) and the trained
embedded world model (:mod:`lingbot_ray.world.train_dit` assembles it): the transformer config both
start from, the scheduler config, and :func:`write_shared_components` (everything of a checkpoint
folder but the transformer and the VAE).

Each builder returns the real library class (so the production loading code paths run unchanged) and
saves it with `save_pretrained(path)`, i.e. `path` is the component folder (`<checkpoint>/vae`,
`<checkpoint>/text_encoder`, `<checkpoint>/tokenizer`). Nothing is downloaded; weights come from a
seeded random initialisation that does not disturb the caller's global RNG.

Sizes are kept consistent by default: the tokenizer's vocabulary (`TINY_VOCAB_SIZE` entries at most)
fits the text encoder's embedding table.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import Unigram
from tokenizers.trainers import UnigramTrainer
from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

from .. import checkpoint

logger = logging.getLogger(__name__)

# Text width shared by the tiny UMT5 encoder (d_model) and the transformer (text_dim).
TINY_TEXT_DIM = 32

# Small enough that one 3-latent-frame block at the default size runs in a fraction of a second on
# one CPU core; the real values are 40 heads x 128, 40 layers, ffn 13824, freq 256, text 4096.
TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": TINY_TEXT_DIM,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
    "local_attn_size": -1,
    "sink_size": 3,
    "num_frames_per_block": 3,
    "sliding_window_num_frames": 9,
}

# The published scheduler is a flow-matching UniPC config; the DMD sampler reads only
# num_train_timesteps from it, the rest documents what the checkpoint ships.
TINY_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 10.0,
    "solver_order": 2,
}

TINY_VOCAB_SIZE = 256
SHIPPED_VOCAB = Path(__file__).with_name("tiny_tokenizer_vocab.json")

# Wan2.1 VAE latent statistics (per latent channel), as in the published `vae/config.json` and
# diffusers' AutoencoderKLWan defaults. The tiny VAE keeps them so normalisation is exercised with
# the real numbers.
WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

# T5's fixed special-token ids; the tokenizer and UMT5 config both rely on them.
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")

# Training text for the tiny Unigram model: plain English in the register of world-model prompts.
_CORPUS = """\
A quiet village street at dawn, with wet cobblestones reflecting the warm light of old lamps.
The camera moves forward slowly past wooden doors, flower boxes and a sleeping cat on a step.
A red car drives along a coastal road while waves break against the rocks far below.
In a dense green forest, sunlight falls through tall trees and dust floats in the air.
The explorer walks through an ancient temple; stone statues line the long dark corridor.
Snow covers the mountain valley, and a small cabin sends grey smoke into the cold sky.
A busy market square is full of people, fruit stalls, bright umbrellas and pigeons.
The view turns left toward the harbour, where fishing boats rock gently on blue water.
Rain falls on a neon city at night; reflections shimmer on the street and glass towers.
A calm lake mirrors the clouds as a wooden boat drifts near the reeds at sunset.
The robot rolls across the desert sand, leaving tracks between red rocks and dry bushes.
Look up at the castle walls, then turn right to follow the river under the old bridge.
Children play in a sunny park with green grass, a fountain and tall oak trees.
The train passes through fields of yellow flowers under a wide summer sky.
Inside a cozy library, shelves of books rise to the ceiling and a fire glows softly.
"""


def build_tiny_vae(
    path: str | os.PathLike,
    *,
    base_dim: int = 8,
    dim_mult: tuple[int, ...] = (1, 2, 4, 4),
    num_res_blocks: int = 2,
    seed: int = 0,
) -> AutoencoderKLWan:
    """A Wan2.1-architecture `AutoencoderKLWan` with few channels, saved to `path`.

    Kept from the real VAE: z_dim 16, temporal downsampling [False, True, True] (4x in time),
    three spatial downsamplings (8x: `dim_mult` must have 4 entries), the Wan2.1 latents mean/std,
    and by default the real depth (`num_res_blocks=2`), so temporal receptive field and the
    condition encoder's fixed-point frame count match the real model. Wan's RMS norms and single-head
    attention accept any width, but the decoder halves channels when upsampling, so `base_dim` must be
    even.
    """
    if base_dim < 2 or base_dim % 2:
        raise ValueError(f"base_dim must be an even integer >= 2, got {base_dim}")
    if len(dim_mult) != 4:
        raise ValueError(f"dim_mult must have 4 entries (8x spatial compression), got {list(dim_mult)}")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=base_dim,
            z_dim=len(WAN21_LATENTS_MEAN),
            dim_mult=list(dim_mult),
            num_res_blocks=num_res_blocks,
            attn_scales=[],
            temperal_downsample=[False, True, True],
            dropout=0.0,
            latents_mean=list(WAN21_LATENTS_MEAN),
            latents_std=list(WAN21_LATENTS_STD),
        )
    vae.eval()
    vae.save_pretrained(os.fspath(path))
    logger.info("tiny VAE (base_dim %d) saved to %s", base_dim, path)
    return vae


def build_tiny_text_encoder(
    path: str | os.PathLike,
    *,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_ff: int = 64,
    vocab_size: int = TINY_VOCAB_SIZE,
    seed: int = 0,
) -> UMT5EncoderModel:
    """A randomly initialised `UMT5EncoderModel` (gated-GELU FFN like UMT5-XXL), saved to `path`.

    `vocab_size` must cover the tokenizer's vocabulary (`build_tiny_tokenizer` stays within
    `TINY_VOCAB_SIZE` by default).
    """
    if d_model < 1 or num_heads < 1 or d_model % num_heads:
        raise ValueError(f"d_model ({d_model}) must be a positive multiple of num_heads ({num_heads})")
    if vocab_size < len(_T5_SPECIALS) + 1:
        raise ValueError(f"vocab_size must exceed the {len(_T5_SPECIALS)} special tokens, got {vocab_size}")
    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=_T5_SPECIALS.index("<pad>"),
        eos_token_id=_T5_SPECIALS.index("</s>"),
        decoder_start_token_id=_T5_SPECIALS.index("<pad>"),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    model.eval()
    model.save_pretrained(os.fspath(path))
    logger.info("tiny UMT5 encoder (d_model %d, %d layers) saved to %s", d_model, num_layers, path)
    return model


def train_tiny_vocab(vocab_size: int = TINY_VOCAB_SIZE) -> list[tuple[str, float]]:
    """Train a T5-style Unigram vocabulary on the built-in English text: `[(piece, score), ...]`.

    The `tokenizers` Unigram trainer is not deterministic (piece order and scores vary from run to
    run), so the tiny checkpoint uses the vocabulary trained once and shipped in
    `tiny_tokenizer_vocab.json`; this function is how that file was made (regenerate it with
    `python -c "from lingbot_ray.models.tiny_components import write_tiny_vocab; write_tiny_vocab()"`,
    which changes the tiny checkpoint's token ids and so the consistency ground truth).
    """
    if vocab_size < 64:
        # Fewer pieces than the corpus alphabet make the trainer fail in unhelpful ways.
        raise ValueError(f"vocab_size must be >= 64, got {vocab_size}")
    trainer_tokenizer = Tokenizer(Unigram())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_T5_SPECIALS),
        unk_token="<unk>",
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(trainer_tokenizer.to_str())["model"]["vocab"]]
    if tuple(piece for piece, _ in vocab[: len(_T5_SPECIALS)]) != _T5_SPECIALS:
        raise RuntimeError(f"trained vocabulary does not start with {_T5_SPECIALS}: {vocab[:3]}")
    if len(vocab) > vocab_size:
        raise RuntimeError(f"trained vocabulary has {len(vocab)} pieces, more than vocab_size={vocab_size}")
    return vocab


def write_tiny_vocab(path: str | os.PathLike = SHIPPED_VOCAB) -> None:
    data = json.loads(Path(path).read_text(encoding="utf-8")) if Path(path).is_file() else {}
    data["vocab"] = train_tiny_vocab()
    Path(path).write_text(json.dumps(data, ensure_ascii=False, indent=0), encoding="utf-8")


def build_tiny_tokenizer(path: str | os.PathLike) -> T5TokenizerFast:
    """A T5-style Unigram tokenizer (the shipped vocabulary of :func:`train_tiny_vocab`), saved to `path`.

    Same pipeline as the UMT5 tokenizer: whitespace split + Metaspace ("▁") pre-tokenisation, Unigram
    model, `<pad>`=0, `</s>`=1, `<unk>`=2, and a post-processor that appends `</s>`. No sentinel
    (`<extra_id_N>`) tokens, so every id is below the vocabulary size. Identical on every machine.
    """
    vocab = [(piece, float(score)) for piece, score in json.loads(SHIPPED_VOCAB.read_text(encoding="utf-8"))["vocab"]]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tokenizer.save_pretrained(os.fspath(path))
    logger.info("tiny T5 tokenizer (%d pieces) saved to %s", len(vocab), path)
    return tokenizer


def write_shared_components(
    root: Path,
    *,
    text_dim: int,
    seed: int,
    width: int,
    height: int,
    served_model_name: str,
    comment: str,
    camera_focal: float | None = None,
    decoder: str | None = None,
    condition_frames: int | None = None,
) -> None:
    """Everything of a tiny-class checkpoint folder but the transformer and the VAE: the tiny text
    encoder and tokenizer, the scheduler config, ``model_index.json`` naming the real classes, and
    ``lingbot_ray.json`` (serving defaults; ``camera_focal``, ``decoder`` and ``condition_frames``
    only when given)."""
    build_tiny_text_encoder(root / "text_encoder", d_model=text_dim, seed=seed)
    build_tiny_tokenizer(root / "tokenizer")

    # Scheduler config (through diffusers, so it is a loadable UniPC config)
    UniPCMultistepScheduler(**TINY_SCHEDULER_CONFIG).save_pretrained(root / "scheduler")

    # model_index.json naming the real classes; unused components null as in the published one
    index: dict[str, Any] = {
        "_class_name": checkpoint.PIPELINE_CLASS_NAME,
        "_diffusers_version": diffusers.__version__,
    }
    for name, (library, class_name) in checkpoint.EXPECTED_COMPONENTS.items():
        index[name] = [library, class_name]
    for name in checkpoint.NULL_COMPONENTS:
        index[name] = [None, None]
    _write_json(root / checkpoint.MODEL_INDEX_FILE, index)

    # This project's serving defaults
    defaults = checkpoint.ServingDefaults(width=width, height=height, served_model_name=served_model_name)
    settings = {
        "_comment": comment,
        "width": defaults.width,
        "height": defaults.height,
        "fps": defaults.fps,
        "num_frames": defaults.num_frames,
        "timestep_indices": list(defaults.timestep_indices),
        "shift": defaults.shift,
        "served_model_name": defaults.served_model_name,
    }
    if camera_focal is not None:
        settings["camera_focal"] = camera_focal
    if decoder is not None:
        settings["decoder"] = decoder
    if condition_frames is not None:
        settings["condition_frames"] = condition_frames
    _write_json(root / checkpoint.SERVING_DEFAULTS_FILE, settings)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
