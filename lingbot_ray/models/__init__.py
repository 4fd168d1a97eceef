"""Models, one per file: the causal LingBot World DiT (with its KV cache and attention), the
streaming Wan VAE, the UMT5 prompt encoder, checkpoint loading, and the tiny-checkpoint builder.

Names are resolved lazily so that importing one submodule does not pay for the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CausalLingBotWorldTransformer3DModel": "transformer_lingbot",
    "PositionLimitError": "attention",
    "KVCache": "kv_cache",
    "StreamingWanVAE": "vae_streaming",
    "DecodeCache": "vae_streaming",
    "ConditionLatents": "vae_streaming",
    "PromptEncoder": "text_encoder",
    "load_transformer": "loading",
    "save_transformer": "loading",
    "build_tiny_checkpoint": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
