"""The full-size architectures, as configs: what the released LingBot World fast checkpoint's
``transformer/config.json`` and ``vae/config.json`` say (docs/MODEL.md, "Checkpoint folder"). Used
where the real shapes matter without the weights: the memory plan's tests and the GPU check
(benchmarks/gpu_check.py), which builds them with random weights."""

from __future__ import annotations

from typing import Any

# CausalLingBotWorldTransformer3DModel, 14B: 40 layers of 40 heads x 128, FFN 13824, UMT5-XXL text.
LINGBOT_WORLD_FAST_TRANSFORMER: dict[str, Any] = {
    "attention_head_dim": 128,
    "num_attention_heads": 40,
    "num_layers": 40,
    "ffn_dim": 13824,
    "freq_dim": 256,
    "in_channels": 36,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "text_dim": 4096,
    "rope_max_seq_len": 1024,
    "sink_size": 9,
    "num_frames_per_block": 3,
    "sliding_window_num_frames": 18,
}

# AutoencoderKLWan, the Wan 2.1 VAE: 16 latent channels, 8x spatial and 4x temporal compression.
WAN21_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}
