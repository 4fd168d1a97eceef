"""CausalLingBotWorldTransformer3DModel on a tiny config: chunked KV-cached generation == masked full forward."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from lingbot_ray.models.attention import PositionLimitError, rope_axis_dims
from lingbot_ray.models.kv_cache import block_causal_frame_mask
from lingbot_ray.models.transformer_lingbot import CAMERA_CHANNELS, CausalLingBotWorldTransformer3DModel


TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    ffn_dim=64,
    text_dim=32,
    freq_dim=32,
    in_channels=36,
    out_channels=16,
    rope_max_seq_len=64,
    sink_size=3,
    num_frames_per_block=3,
    sliding_window_num_frames=9,
)
LATENT_H, LATENT_W = 4, 6  # 2x3 tokens per latent frame
TOKENS = (LATENT_H // 2) * (LATENT_W // 2)
BLOCK = 3
ATOL = 2e-5


def make_model(seed: int = 0, **overrides) -> CausalLingBotWorldTransformer3DModel:
    torch.manual_seed(seed)
    model = CausalLingBotWorldTransformer3DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        # Default init makes every affine norm the identity; perturb so the norm placement matters.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def inputs(frames: int, batch: int = 1, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, TINY["in_channels"], frames, LATENT_H, LATENT_W, generator=gen)
    text = torch.randn(batch, 8, TINY["text_dim"], generator=gen)
    plucker = torch.randn(batch, CAMERA_CHANNELS, frames, LATENT_H, LATENT_W, generator=gen)
    return latents, text, plucker


def reference_mask(frames: int, block: int, sink: int | None = None, window: int | None = None) -> torch.Tensor:
    """Frame q (in block ending at e) sees k < e; with a window only k < sink or k >= e - (window - sink)."""
    mask = torch.zeros(frames, frames, dtype=torch.bool)
    for q in range(frames):
        end = min((q // block + 1) * block, frames)
        for k in range(end):
            mask[q, k] = window is None or k < sink or k >= end - (window - sink)
    return mask


def per_frame(timesteps_per_block, batch: int) -> torch.Tensor:
    """[num_blocks] or [num_blocks, B] block timesteps -> [B, F] frame timesteps."""
    t = torch.as_tensor(timesteps_per_block, dtype=torch.float32)
    if t.ndim == 1:
        t = t[:, None].expand(-1, batch)
    return t.T.repeat_interleave(BLOCK, dim=1)


def run_chunked(model, latents, text, plucker, block_timesteps, *, sink, window):
    """Feed blocks one by one through forward_block(update_cache=True); return the concatenated flow."""
    batch, _, frames = latents.shape[:3]
    cache = model.new_kv_cache(batch_size=batch, tokens_per_frame=TOKENS, sink_frames=sink, window_frames=window)
    text_cache = model.build_text_cache(text)
    outs = []
    for index, start in enumerate(range(0, frames, BLOCK)):
        t = torch.as_tensor(block_timesteps[index], dtype=torch.float32).expand(batch)
        camera = model.build_camera_cache(plucker[:, :, start : start + BLOCK]) if plucker is not None else None
        outs.append(
            model.forward_block(
                latents[:, :, start : start + BLOCK],
                t,
                kv_cache=cache,
                start_frame=start,
                text_cache=text_cache,
                camera_cache=camera,
                update_cache=True,
            )
        )
    return torch.cat(outs, dim=2), cache


# ------------------------------------------------------------------------------------ equivalence


@torch.no_grad()
@pytest.mark.parametrize("with_camera", [True, False])
def test_chunked_equals_block_causal_full_forward_without_eviction(with_camera):
    model = make_model()
    frames = 12
    latents, text, plucker = inputs(frames)
    plucker = plucker if with_camera else None
    block_t = [1000.0, 947.2, 825.4, 310.0]

    chunked, cache = run_chunked(model, latents, text, plucker, block_t, sink=3, window=frames)
    full = model(latents, per_frame(block_t, 1), text, plucker, frame_mask=reference_mask(frames, BLOCK)).sample

    assert cache.held_frames() == list(range(frames))
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=0)
    # The mask matters: full attention gives a different answer for all but the last block.
    unmasked = model(latents, per_frame(block_t, 1), text, plucker).sample
    assert (unmasked[:, :, :-BLOCK] - full[:, :, :-BLOCK]).abs().max() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("sink,window", [(3, 9), (0, 6), (2, 8)])
def test_chunked_with_eviction_equals_windowed_full_forward(sink, window):
    model = make_model()
    frames, batch = 18, 2
    latents, text, plucker = inputs(frames, batch=batch)
    # Distinct timesteps per block and per sample.
    block_t = [[1000.0, 900.0], [978.7, 10.0], [947.2, 500.0], [825.4, 0.0], [400.0, 1000.0], [0.0, 250.0]]

    chunked, cache = run_chunked(model, latents, text, plucker, block_t, sink=sink, window=window)
    mask = reference_mask(frames, BLOCK, sink, window)
    full = model(latents, per_frame(block_t, batch), text, plucker, frame_mask=mask).sample

    # Evictions happened several times: only the sink and the last (window - sink) frames remain.
    assert cache.held_frames() == list(range(sink)) + list(range(frames - (window - sink), frames))
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=0)
    # Without the window, late blocks would see more frames and give other results.
    unwindowed = model(latents, per_frame(block_t, batch), text, plucker, frame_mask=reference_mask(frames, BLOCK)).sample
    assert (unwindowed[:, :, -BLOCK:] - full[:, :, -BLOCK:]).abs().max() > 1e-3


@torch.no_grad()
def test_dmd_pattern_denoise_reads_without_committing():
    """Denoise steps at t_k (update_cache=False) then a clean forward at t=0 (update_cache=True), as the sampler does."""
    model = make_model()
    sink, window, frames = 2, 8, 15
    clean, text, plucker = inputs(frames, seed=2)
    noisy = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    steps = [1000.0, 958.0, 900.0, 703.0]
    mask = reference_mask(frames, BLOCK, sink, window)
    cache = model.new_kv_cache(tokens_per_frame=TOKENS, sink_frames=sink, window_frames=window)
    text_cache = model.build_text_cache(text)

    clean_outs = []
    for start in range(0, frames, BLOCK):
        end = start + BLOCK
        camera = model.build_camera_cache(plucker[:, :, start:end])
        for step, t in enumerate(steps):
            x = noisy[:, :, start:end] * (1 + step)  # each step sees other latents
            denoised = model.forward_block(
                x, torch.tensor([t]), kv_cache=cache, start_frame=start, text_cache=text_cache,
                camera_cache=camera, update_cache=False,
            )
            assert cache.end_frame == start  # nothing committed
            # Reference: the clean frames so far at t=0, then this noisy block at t.
            ref_latents = torch.cat([clean[:, :, :start], x], dim=2)
            ref_t = torch.cat([torch.zeros(1, start), torch.full((1, BLOCK), t)], dim=1)
            ref = model(ref_latents, ref_t, text, plucker[:, :, :end], frame_mask=mask[:end, :end]).sample
            torch.testing.assert_close(denoised, ref[:, :, start:], atol=ATOL, rtol=0)
        clean_outs.append(
            model.forward_block(
                clean[:, :, start:end], torch.zeros(1), kv_cache=cache, start_frame=start,
                text_cache=text_cache, camera_cache=camera, update_cache=True,
            )
        )
        assert cache.end_frame == end

    full = model(clean, torch.zeros(1), text, plucker, frame_mask=mask).sample
    torch.testing.assert_close(torch.cat(clean_outs, dim=2), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_full_forward_matches_diffusers_wan_without_camera():
    """Block maths (norm placement, modulation order, qk-norm across heads, RoPE split) equal diffusers' Wan."""
    model = make_model()
    wan_config = {k: v for k, v in TINY.items() if k not in ("sink_size", "num_frames_per_block", "sliding_window_num_frames")}
    wan = WanTransformer3DModel(**wan_config).eval()
    state = {k: v for k, v in model.state_dict().items() if "cam" not in k and "c2ws" not in k}
    wan.load_state_dict(state, strict=True)
    latents, text, _ = inputs(5, batch=2)
    t = torch.tensor([999.0, 250.0])
    ours = model(latents, t, text).sample
    theirs = wan(latents, t, text).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.abs().max() > 0.1


def _reference_forward(o, cfg, x, t, ctx, cam):
    """docs/MODEL.md's forward pass restated plainly over the ORIGINAL tensor names (complex RoPE as in the
    original Wan code, full attention, camera between self- and cross-attention)."""
    F = torch.nn.functional
    heads, hd = cfg["num_attention_heads"], cfg["attention_head_dim"]
    dim, eps = heads * hd, 1e-6

    def lin(name, y):
        return F.linear(y, o[name + ".weight"], o[name + ".bias"])

    def rms(y, weight):
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * weight

    def ln(y, weight=None, bias=None):
        return F.layer_norm(y, (dim,), weight, bias, eps)

    def attend(q, k, v):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).flatten(2)

    y = F.conv3d(x, o["patch_embedding.weight"], o["patch_embedding.bias"], stride=(1, 2, 2))
    batch, _, f, h, w = y.shape
    y = y.flatten(2).transpose(1, 2)
    seq = f * h * w

    half = cfg["freq_dim"] // 2
    sinus = torch.outer(t.double(), torch.pow(10000, -torch.arange(half).double() / half))
    e = lin("time_embedding.2", F.silu(lin("time_embedding.0", torch.cat([sinus.cos(), sinus.sin()], 1).float())))
    e0 = lin("time_projection.1", F.silu(e)).unflatten(1, (6, dim))
    context = lin("text_embedding.2", F.gelu(lin("text_embedding.0", ctx), approximate="tanh"))

    c = cam.reshape(batch, cam.shape[1], f, h, 2, w, 2).permute(0, 2, 3, 5, 1, 4, 6).reshape(batch, seq, -1)
    c = lin("patch_embedding_wancamctrl", c)
    c = c + lin("c2ws_hidden_states_layer2", F.silu(lin("c2ws_hidden_states_layer1", c)))

    def rope_params(dim_axis):
        angles = torch.outer(torch.arange(64).double(), 1.0 / 10000 ** (torch.arange(0, dim_axis, 2).double() / dim_axis))
        return torch.polar(torch.ones_like(angles), angles)

    half_hd = hd // 2
    ft, fh, fw = (rope_params(hd - 4 * (hd // 6)), rope_params(2 * (hd // 6)), rope_params(2 * (hd // 6)))
    assert ft.shape[1] == half_hd - 2 * (half_hd // 3)
    freqs = torch.cat(
        [ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1), fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
         fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(seq, 1, -1)

    def rope(z):
        zc = torch.view_as_complex(z.double().reshape(batch, seq, heads, -1, 2))
        return torch.view_as_real(zc * freqs).flatten(3).float()

    for i in range(cfg["num_layers"]):
        p = f"blocks.{i}."
        m = (o[p + "modulation"] + e0).chunk(6, dim=1)
        yin = ln(y) * (1 + m[1]) + m[0]
        q = rms(lin(p + "self_attn.q", yin), o[p + "self_attn.norm_q.weight"]).view(batch, seq, heads, hd)
        k = rms(lin(p + "self_attn.k", yin), o[p + "self_attn.norm_k.weight"]).view(batch, seq, heads, hd)
        v = lin(p + "self_attn.v", yin).view(batch, seq, heads, hd)
        y = y + lin(p + "self_attn.o", attend(rope(q), rope(k), v)) * m[2]
        hc = lin(p + "cam_injector_layer2", F.silu(lin(p + "cam_injector_layer1", c))) + c
        y = (1 + lin(p + "cam_scale_layer", hc)) * y + lin(p + "cam_shift_layer", hc)
        yin = ln(y, o[p + "norm3.weight"], o[p + "norm3.bias"])
        q = rms(lin(p + "cross_attn.q", yin), o[p + "cross_attn.norm_q.weight"]).view(batch, seq, heads, hd)
        k = rms(lin(p + "cross_attn.k", context), o[p + "cross_attn.norm_k.weight"]).view(batch, -1, heads, hd)
        v = lin(p + "cross_attn.v", context).view(batch, -1, heads, hd)
        y = y + lin(p + "cross_attn.o", attend(q, k, v))
        yin = ln(y) * (1 + m[4]) + m[3]
        y = y + lin(p + "ffn.2", F.gelu(lin(p + "ffn.0", yin), approximate="tanh")) * m[5]

    hm = (o["head.modulation"] + e.unsqueeze(1)).chunk(2, dim=1)
    y = lin("head.head", ln(y) * (1 + hm[1]) + hm[0])
    y = torch.einsum("bfhwpqrc->bcfphqwr", y.view(batch, f, h, w, 1, 2, 2, -1))
    return y.reshape(batch, -1, f, 2 * h, 2 * w)


@torch.no_grad()
def test_full_forward_matches_plain_reference_over_original_names():
    from lingbot_ray.models.loading import diffusers_to_original_name

    model = make_model()
    original = {diffusers_to_original_name(k): v for k, v in model.state_dict().items()}
    latents, text, plucker = inputs(4, batch=2)
    t = torch.tensor([958.0, 120.0])
    ours = model(latents, t, text, plucker).sample
    ref = _reference_forward(original, TINY, latents, t, text, plucker)
    torch.testing.assert_close(ours, ref, atol=5e-5, rtol=0)


def test_gradient_checkpointing_gives_same_gradients():
    latents, text, plucker = inputs(BLOCK)
    grads = []
    for checkpointing in (False, True):
        model = make_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(latents, torch.tensor([400.0]), text, plucker, frame_mask=reference_mask(BLOCK, BLOCK)).sample
        out.square().mean().backward()
        grads.append(model.blocks[0].attn1.to_q.weight.grad.clone())
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("pattern", ["block_causal", "teacher_forcing", "random"])
def test_frame_mask_attention_equals_dense_token_mask(pattern):
    """Attention group by group under a FrameMask == one call under its dense token mask, values and gradients."""
    from lingbot_ray.models.attention import FrameMask, scaled_dot_product_attention
    from lingbot_ray.world.teacher_forcing import teacher_forcing_mask

    gen = torch.Generator().manual_seed(3)
    if pattern == "block_causal":
        frame_mask = block_causal_frame_mask(9, BLOCK, sink_frames=3, window_frames=6)
    elif pattern == "teacher_forcing":
        frame_mask = teacher_forcing_mask(9, BLOCK, sink_frames=0, window_frames=6)
    else:
        frame_mask = torch.rand(7, 7, generator=gen) < 0.4
        frame_mask[torch.arange(7), torch.arange(7)] = True  # every query frame attends somewhere
    mask = FrameMask(frame_mask, TOKENS)
    assert len(mask.groups) < frame_mask.shape[0] or pattern == "random"
    frames = frame_mask.shape[0]
    query, key, value = (torch.randn(2, frames * TOKENS, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    weights = torch.randn(2, frames * TOKENS, 2, 8, generator=gen)

    grouped = mask.attend(query, key, value, scaled_dot_product_attention)
    grads_grouped = torch.autograd.grad((grouped * weights).sum(), (query, key, value))
    dense = scaled_dot_product_attention(query, key, value, mask.dense())
    grads_dense = torch.autograd.grad((dense * weights).sum(), (query, key, value))

    torch.testing.assert_close(grouped, dense, atol=1e-6, rtol=0)
    for got, expected in zip(grads_grouped, grads_dense):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="FrameMask covers"):
        mask.attend(query[:, :-1], key, value, scaled_dot_product_attention)


def test_rope_split_matches_head_dim():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(16) == (8, 4, 4)


def test_block_causal_frame_mask_helper():
    assert torch.equal(block_causal_frame_mask(12, 3), reference_mask(12, 3))
    assert torch.equal(block_causal_frame_mask(18, 3, sink_frames=2, window_frames=8), reference_mask(18, 3, 2, 8))


# ------------------------------------------------------------------------------------ camera


def _block_forward(model, latents, text, camera_cache, start=0):
    cache = model.new_kv_cache(tokens_per_frame=TOKENS)
    return model.forward_block(
        latents, torch.tensor([500.0]), kv_cache=cache, start_frame=start,
        text_cache=model.build_text_cache(text), camera_cache=camera_cache, update_cache=False,
    )


@torch.no_grad()
def test_camera_changes_output_and_zeroed_camera_equals_none():
    model = make_model()
    latents, text, plucker = inputs(BLOCK)
    without = _block_forward(model, latents, text, None)
    with_cam = _block_forward(model, latents, text, model.build_camera_cache(plucker))
    assert (with_cam - without).abs().max() > 1e-3

    for block in model.blocks:
        for layer in (block.cam_scale_layer, block.cam_shift_layer):
            layer.weight.zero_()
            layer.bias.zero_()
    zeroed = _block_forward(model, latents, text, model.build_camera_cache(plucker))
    torch.testing.assert_close(zeroed, without, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(latents, torch.tensor([500.0]), text, plucker).sample,
                               model(latents, torch.tensor([500.0]), text).sample, atol=1e-6, rtol=0)


@torch.no_grad()
def test_camera_cache_is_computed_once_per_chunk():
    model = make_model()
    latents, text, plucker = inputs(BLOCK)
    calls = {"model": 0, "block": 0}
    model.patch_embedding_wancamctrl.register_forward_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1))
    for block in model.blocks:
        block.cam_injector_layer1.register_forward_hook(lambda *a: calls.__setitem__("block", calls["block"] + 1))

    camera = model.build_camera_cache(plucker)
    assert calls == {"model": 1, "block": TINY["num_layers"]}
    cache = model.new_kv_cache(tokens_per_frame=TOKENS)
    text_cache = model.build_text_cache(text)
    outs = [
        model.forward_block(latents, torch.tensor([t]), kv_cache=cache, start_frame=0, text_cache=text_cache,
                            camera_cache=camera, update_cache=t == 0.0)
        for t in (1000.0, 958.0, 900.0, 703.0, 0.0)
    ]
    assert calls == {"model": 1, "block": TINY["num_layers"]}
    assert cache.end_frame == BLOCK
    assert not torch.allclose(outs[0], outs[1])


@torch.no_grad()
def test_camera_feature_order_is_conv_over_unshuffled_map():
    """P over 1x2x2 patches with feature ((c*8+r)*8+s)*4 + ph*2 + pw == Conv3d with weight.view(dim, 384, 1, 2, 2)."""
    model = make_model()
    _, _, plucker = inputs(2)
    camera = model.build_camera_cache(plucker)
    weight = model.patch_embedding_wancamctrl.weight.view(-1, CAMERA_CHANNELS, 1, 2, 2)
    conv = torch.nn.functional.conv3d(plucker, weight, model.patch_embedding_wancamctrl.bias, stride=(1, 2, 2))
    expected_c = conv.flatten(2).transpose(1, 2)
    expected_c = expected_c + model.c2ws_hidden_states_layer2(torch.nn.functional.silu(model.c2ws_hidden_states_layer1(expected_c)))
    scale, shift = model.blocks[1].camera_modulation(expected_c)
    torch.testing.assert_close(camera.scales[1], scale, atol=1e-5, rtol=0)
    torch.testing.assert_close(camera.shifts[1], shift, atol=1e-5, rtol=0)
    assert camera.num_frames == 2 and camera.tokens_per_frame == TOKENS


# ------------------------------------------------------------------------------------ text, limits, cache API


@torch.no_grad()
def test_text_cache_rebuild_changes_output():
    model = make_model()
    latents, text, plucker = inputs(BLOCK)
    other_text = torch.randn(text.shape, generator=torch.Generator().manual_seed(9))
    camera = model.build_camera_cache(plucker)
    first = _block_forward(model, latents, text, camera)
    again = _block_forward(model, latents, text, camera)
    changed = _block_forward(model, latents, other_text, camera)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - changed).abs().max() > 1e-3


@torch.no_grad()
def test_position_limit_error_before_rope_runs_out():
    model = make_model(rope_max_seq_len=7, sliding_window_num_frames=12)
    latents, text, _ = inputs(BLOCK)
    cache = model.new_kv_cache(tokens_per_frame=TOKENS)
    text_cache = model.build_text_cache(text)
    for start in (0, 3):
        model.forward_block(latents, torch.zeros(1), kv_cache=cache, start_frame=start, text_cache=text_cache, update_cache=True)
    held = cache.held_frames()
    with pytest.raises(PositionLimitError, match="rope_max_seq_len=7"):
        model.forward_block(latents, torch.zeros(1), kv_cache=cache, start_frame=6, text_cache=text_cache, update_cache=True)
    assert issubclass(PositionLimitError, ValueError)
    assert cache.held_frames() == held and cache.end_frame == 6
    with pytest.raises(PositionLimitError):
        model(inputs(8)[0], torch.zeros(1), text)


def test_kv_cache_shape_and_capacity_validation():
    model = make_model()
    cache = model.new_kv_cache(batch_size=2, tokens_per_frame=TOKENS, sink_frames=2, window_frames=7)
    assert len(cache.keys) == TINY["num_layers"]
    assert tuple(cache.keys[0].shape) == (2, 7 * TOKENS, TINY["num_attention_heads"], TINY["attention_head_dim"])
    default = model.new_kv_cache(tokens_per_frame=TOKENS)
    assert (default.sink_frames, default.window_frames) == (TINY["sink_size"], TINY["sliding_window_num_frames"])
    with pytest.raises(ValueError, match=r"sink_frames=5.*num_frames_per_block=3.*window_frames=7"):
        model.new_kv_cache(tokens_per_frame=TOKENS, sink_frames=5, window_frames=7)


@torch.no_grad()
def test_forward_block_rejects_bad_calls():
    model = make_model()
    latents, text, plucker = inputs(BLOCK)
    cache = model.new_kv_cache(tokens_per_frame=TOKENS)
    text_cache = model.build_text_cache(text)
    kwargs = dict(kv_cache=cache, text_cache=text_cache, update_cache=True)
    with pytest.raises(ValueError, match="start_frame=3"):
        model.forward_block(latents, torch.zeros(1), start_frame=3, **kwargs)
    with pytest.raises(ValueError, match="tokens per frame"):
        model.forward_block(latents[..., :2], torch.zeros(1), start_frame=0, **kwargs)
    with pytest.raises(ValueError, match="timestep"):
        model.forward_block(latents, torch.zeros(2), start_frame=0, **kwargs)
    with pytest.raises(ValueError, match="camera_cache"):
        model.forward_block(latents, torch.zeros(1), start_frame=0, camera_cache=model.build_camera_cache(plucker[:, :, :2]), **kwargs)
    with pytest.raises(ValueError, match="latents"):
        model.forward_block(latents[:, :16], torch.zeros(1), start_frame=0, **kwargs)
    assert cache.end_frame == 0


@pytest.mark.parametrize(
    "overrides,match",
    [(dict(qk_norm="rms_norm"), "qk_norm"), (dict(image_dim=8), "image_dim"), (dict(patch_size=(2, 2, 2)), "patch_size")],
)
def test_unsupported_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        CausalLingBotWorldTransformer3DModel(**{**TINY, **overrides})


def test_config_keys_are_the_published_ones():
    published = {
        "attention_head_dim", "num_attention_heads", "num_layers", "ffn_dim", "freq_dim", "in_channels",
        "out_channels", "patch_size", "text_dim", "qk_norm", "cross_attn_norm", "eps", "rope_max_seq_len",
        "image_dim", "added_kv_proj_dim", "pos_embed_seq_len", "local_attn_size", "sink_size",
        "num_frames_per_block", "sliding_window_num_frames",
    }
    with torch.device("meta"):
        model = CausalLingBotWorldTransformer3DModel()
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    assert set(config) == published
    assert (config["num_layers"], config["attention_head_dim"], config["sink_size"], config["sliding_window_num_frames"]) == (40, 128, 9, 18)


@torch.no_grad()
def test_kv_cache_reset_and_release():
    model = make_model()
    latents, text, _ = inputs(2 * BLOCK)
    text_cache = model.build_text_cache(text)
    cache = model.new_kv_cache(tokens_per_frame=TOKENS)

    def block(start):
        return model.forward_block(latents[:, :, start : start + BLOCK], torch.tensor([300.0]), kv_cache=cache,
                                   start_frame=start, text_cache=text_cache, update_cache=True)

    first = block(0)
    second = block(BLOCK)
    cache.reset()
    assert cache.end_frame == 0 and cache.held_frames() == []
    torch.testing.assert_close(block(0), first, atol=0, rtol=0)
    assert not torch.allclose(first, second)
    cache.release()
    assert cache.keys == [] and cache.values == []
    with pytest.raises(ValueError, match="released"):
        block(BLOCK)


def test_kv_cache_refuses_a_smaller_block_after_early_eviction():
    """A denoise call may drop frames its block cannot see; re-running that start with fewer frames must not read stale data."""
    from lingbot_ray.models.kv_cache import KVCache

    cache = KVCache(num_layers=1, batch_size=1, tokens_per_frame=1, num_heads=1, head_dim=2, sink_frames=2,
                    window_frames=8, dtype=torch.float32)
    for start in (0, 3):
        cache.commit(cache.plan_block(start, 3, 1, 1))
    assert cache.held_frames() == list(range(6))
    cache.plan_block(6, 6, 1, 1)  # a 6-frame block sees only sink + itself: frames 2..5 are dropped
    assert cache.held_frames() == [0, 1] and cache.end_frame == 6
    with pytest.raises(ValueError, match="needs frame 3"):
        cache.plan_block(6, 3, 1, 1)
    cache.commit(cache.plan_block(6, 6, 1, 1))
    assert cache.held_frames() == [0, 1, 6, 7, 8, 9, 10, 11]
