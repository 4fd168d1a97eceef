"""The memory plan (lingbot_ray/engine/memory.py): its arithmetic against hand-computed figures for
LingBot World fast v1, against what the tiny checkpoint's sessions really allocate, against the peak
live tensor bytes of the real v1 configs traced on the meta device; the text encoder's placement on
fake devices; and sessions refused before they allocate, in-process and by the served DiT group.

v1's facts are docs/MODEL.md's: 40 layers of width 5120 (40 heads
x 128), FFN 13824, patch (1, 2, 2), blocks of 3 latent frames, window 18 latent frames, the Wan2.1 VAE
(base_dim 96, dim_mult [1, 2, 4, 4], 2 residual blocks), UMT5-XXL (d_model 4096, 24 layers, 64 heads,
d_ff 10240, vocab 256384). Tolerances are stated where a figure is an estimate.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lingbot_ray.engine import RealtimeEngine
from lingbot_ray.engine.hosts import DiTHost
from lingbot_ray.engine.memory import (
    GB,
    InsufficientMemory,
    MemoryGuard,
    ModelMemory,
    cast_bytes,
    place,
    plan_memory,
    transformer_bytes,
    weight_bytes,
)
from lingbot_ray.models import loading
from lingbot_ray.models.architectures import LINGBOT_WORLD_FAST_TRANSFORMER, WAN21_VAE
from lingbot_ray.protocol import CapacityError, CloseCode, outcome_for

from .helpers import HEIGHT, WIDTH, conditions

# the released checkpoint's configs (lingbot_ray/models/architectures.py)
V1_TRANSFORMER = LINGBOT_WORLD_FAST_TRANSFORMER
V1_VAE = WAN21_VAE
V1_UMT5 = {"vocab_size": 256384, "d_model": 4096, "num_layers": 24, "num_heads": 64, "d_ff": 10240, "d_kv": 64}
BF16 = 2

# Hand-computed at 832x480: (480/16) x (832/16) = 30 x 52 = 1,560 tokens per latent frame.
TOKENS = 1560
KV_PER_SESSION = 40 * 2 * 18 * TOKENS * 40 * 128 * BF16  # 23,003,136,000 B
TEXT_KV = 40 * 2 * 512 * 5120 * BF16  # 419,430,400 B
CAMERA = 40 * 2 * 3 * TOKENS * 5120 * BF16  # 3,833,856,000 B
# The Wan2.1 decoder's cache, 2 frames of every causal conv's input (channels x pixels), level by level:
# 60x104: conv_in 16 + middle 4 x 384 + stage 0: 6 x 384 + time_conv 384 = 4,240 channels
# 120x208: stage 1: 192 + 5 x 384 + time_conv 384 = 2,496; 240x416: stage 2: 6 x 192 = 1,152;
# 480x832: stage 3: 6 x 96 + conv_out 96 = 672
VAE_CACHE_FP32 = 2 * 4 * (4240 * 6240 + 2496 * 24960 + 1152 * 99840 + 672 * 399360)  # 3,777,146,880 B


@pytest.fixture(scope="module")
def v1() -> ModelMemory:
    return ModelMemory.from_configs(V1_TRANSFORMER, V1_VAE, torch.bfloat16)


@pytest.fixture(scope="module")
def v1_weights() -> dict[str, int]:
    """v1's weights from its tensor list (the real classes built on the meta device), as stored: fp32,
    the DiT under its original (published) names."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from lingbot_ray.models.transformer_lingbot import CausalLingBotWorldTransformer3DModel

    def stored(module, rename=lambda name: name):
        return {rename(name): (tuple(t.shape), "F32") for name, t in module.state_dict().items()}

    with torch.device("meta"):
        dit = CausalLingBotWorldTransformer3DModel(**V1_TRANSFORMER)
        vae = AutoencoderKLWan(**V1_VAE)
        umt5 = UMT5EncoderModel(UMT5Config(**V1_UMT5, feed_forward_proj="gated-gelu"))
    dit_tensors = stored(dit, lambda name: loading.from_model_name(name, loading.ORIGINAL))
    assert len(dit_tensors) == 1421 and "blocks.0.self_attn.q.weight" in dit_tensors
    text = stored(umt5)
    text.pop("encoder.embed_tokens.weight")  # tied to shared.weight: one tensor in the file and in memory
    vae_tensors = stored(vae)
    return {
        "transformer": transformer_bytes(dit_tensors, torch.bfloat16),
        "vae": cast_bytes(vae_tensors, torch.float32) + cast_bytes(vae_tensors, torch.bfloat16),
        "text_encoder": cast_bytes(text, torch.bfloat16),
    }


# ------------------------------------------------------------------------------------ v1 arithmetic


def test_v1_weights_are_the_issues_figures(v1_weights):
    # 18.54 B parameters in bf16 = 37.09 GB, plus 187 M kept in fp32 (time embedding/projection,
    # modulation tables, norms) at 2 more bytes each; the issue and the configs say ~37.5
    assert v1_weights["transformer"] == pytest.approx(37.46e9, abs=0.01e9)
    assert v1_weights["transformer"] / GB == pytest.approx(37.5, abs=0.1)
    # UMT5-XXL: 5.68 B parameters in bf16; the issue: +11.4 GB
    assert v1_weights["text_encoder"] == 5_680_910_336 * BF16
    assert v1_weights["text_encoder"] / GB == pytest.approx(11.4, abs=0.1)
    # Wan2.1 VAE (127 M parameters): fp32 plus the bf16 copy of quality="high"
    assert v1_weights["vae"] / GB == pytest.approx(0.76, abs=0.01)


def test_v1_session_at_832x480_is_the_issues_figures(v1):
    session = v1.session(832, 480)
    assert (session.width, session.height, session.window_frames, session.branches) == (832, 480, 18, 1)
    assert session.kv == KV_PER_SESSION  # 1.28 GB per latent frame x 18: the issue's ~23 GB
    assert session.kv / GB == pytest.approx(23.0, abs=0.05)
    assert session.text_kv == TEXT_KV
    assert session.camera == CAMERA
    assert session.vae_cache == VAE_CACHE_FP32  # 3.78 GB: the configs' measured 3.8
    # estimates (traced below): DiT activations 4,680 tokens x 219,136 B; VAE decode = a second cache
    # while the chunk decodes + 4.05 GB of activations
    assert session.dit_activations == 3 * TOKENS * (8 * 5120 * 4 + 2 * 13824 * BF16)
    assert session.vae_decode / GB == pytest.approx(3.78 + 4.05, abs=0.01)
    # the issue's "VAE cache and work" (~8 GB) and "camera cache"
    assert (session.vae_cache + session.vae_decode) / GB == pytest.approx(11.6, abs=0.05)
    assert session.describe() == (
        "session needs 23.0 GB KV + 0.4 GB text K/V + 3.8 GB VAE cache at 832x480, window 18 frames, "
        "and 12.7 GB while a chunk runs"
    )


def test_v1_guidance_doubles_and_sequence_parallelism_splits(v1):
    one = v1.session(832, 480)
    guided = v1.session(832, 480, guidance=True)
    assert guided.branches == 2
    assert (guided.kv, guided.text_kv, guided.camera, guided.dit_activations) == (
        2 * one.kv, 2 * one.text_kv, 2 * one.camera, 2 * one.dit_activations,
    )  # fmt: skip
    assert guided.vae_cache == one.vae_cache  # the VAE decodes the mixed latents: one batch row
    split = v1.session(832, 480, sequence_parallel=4, vae=False)
    assert split.kv == one.kv // 4  # heads / 4 on every rank
    assert split.text_kv == one.text_kv  # every rank holds all heads of the text K/V
    assert split.camera == one.camera // 4 and split.vae_cache == split.vae_decode == 0
    assert v1.session(832, 480, quality="high").vae_cache == one.vae_cache // 2
    assert v1.session(1280, 720).kv / GB == pytest.approx(53.1, abs=0.05)  # the configs' "53 GB"
    with pytest.raises(ValueError, match="sequence_parallel=3"):
        v1.session(832, 480, sequence_parallel=3)


# ------------------------------------------------------------------------------------ traced on meta


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages alive at once among those created inside the mode (works on
    the meta device: shapes, no data)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage → [bytes, tensors referring to it]
        self.current = self.peak = 0

    def _drop(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                entry = self.live.setdefault(storage._cdata, [storage.nbytes(), 0])
                if entry[1] == 0:
                    self.current += entry[0]
                    self.peak = max(self.peak, self.current)
                entry[1] += 1
                weakref.finalize(tensor, self._drop, storage._cdata)
        return out


@pytest.mark.parametrize("quality", ["lossless", "high"])
def test_v1_vae_decode_traced_on_meta_matches_the_plan(v1, quality):
    from diffusers import AutoencoderKLWan

    from lingbot_ray.models.vae_streaming import StreamingWanVAE

    dtype = torch.float32 if quality == "lossless" else torch.bfloat16
    with torch.device("meta"):
        vae = StreamingWanVAE(AutoencoderKLWan(**V1_VAE).to(dtype))
    latents = torch.zeros(1, 16, 3, 60, 104, device="meta")
    cache = vae.new_decode_cache()
    with torch.no_grad():
        vae.decode_chunk(latents, cache)
        trace = LiveBytes()
        with trace:
            vae.decode_chunk(latents.clone(), cache)
    session = v1.session(832, 480, quality=quality)
    assert cache.nbytes == session.vae_cache  # exact
    # traced 7.81 GB (fp32) / 4.67 GB (bf16); the plan is an upper bound within 2 %
    assert 0.98 * session.vae_decode <= trace.peak <= session.vae_decode


def test_v1_dit_block_traced_on_meta_matches_the_plan(v1):
    from lingbot_ray.models.transformer_lingbot import CausalLingBotWorldTransformer3DModel

    with torch.device("meta"):
        model = CausalLingBotWorldTransformer3DModel(**V1_TRANSFORMER)
    for name, param in model.named_parameters():  # as loading casts: bf16, fp32 where kept
        fp32 = loading.keeps_fp32(name, model._keep_in_fp32_modules)
        param.data = param.data.to(torch.float32 if fp32 else torch.bfloat16)
    for block in model.blocks:  # a fused kernel (flash attention) keeps no score matrix
        for attention in (block.attn1, block.attn2):
            attention.processor.attention_fn = lambda q, k, v, mask=None, backend=None: torch.empty_like(q)
    session = v1.session(832, 480)
    kv = model.new_kv_cache(tokens_per_frame=TOKENS, device="meta")
    assert kv.nbytes() == session.kv
    with torch.no_grad():
        text = model.build_text_cache(torch.zeros(1, 512, 4096, device="meta"))
        camera = model.build_camera_cache(torch.zeros(1, 384, 3, 60, 104, device="meta", dtype=torch.bfloat16))
        latents = torch.zeros(1, 36, 3, 60, 104, device="meta", dtype=torch.bfloat16)
        trace = LiveBytes()
        with trace:
            model.forward_block(
                latents, torch.zeros(1, device="meta"), kv_cache=kv, start_frame=0, text_cache=text,
                camera_cache=camera, update_cache=True,
            )  # fmt: skip
    assert sum(t.numel() * t.element_size() for t in (*text.keys, *text.values)) == session.text_kv
    assert sum(t.numel() * t.element_size() for t in (*camera.scales, *camera.shifts)) == session.camera
    # traced 1.009 GB; the plan's 1.026 GB is an upper bound within 2 %
    assert 0.98 * session.dit_activations <= trace.peak <= session.dit_activations


# ------------------------------------------------------------------------------------ the tiny checkpoint


def test_plan_from_the_tiny_checkpoints_files_is_what_loading_and_sessions_allocate(tiny_folder, engine, make_spec):
    # weights from the headers = the loaded modules' bytes
    plan = plan_memory(tiny_folder, device="cpu", dit_dtype=torch.float32, text_dtype=torch.float32)
    loaded = {
        "transformer": engine.dit.model,
        "vae": engine.vae.vae.vae,
        "text_encoder": engine.text.prompt_encoder.text_encoder,
    }
    for name, module in loaded.items():
        assert weight_bytes(tiny_folder, name, torch.float32) == sum(
            t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
        ), name
    assert plan.weights["vae"] == 3 * weight_bytes(tiny_folder, "vae", torch.float32) // 2  # + its bf16 copy
    assert plan.text_device == "cpu" and plan.available is None and plan.sessions_that_fit() is None
    assert (plan.session.width, plan.session.height) == (engine.defaults.width, engine.defaults.height)
    # a session's figures = what it holds after its first chunk, for either VAE precision
    for quality in ("lossless", "high"):
        state = engine.new_session(make_spec(quality=quality))
        engine.step(state, conditions())
        session = plan.model.session(WIDTH, HEIGHT, quality=quality)
        text = state.dit.text_cache
        assert state.dit.kv_cache.nbytes() == session.kv
        assert sum(t.numel() * t.element_size() for t in (*text.keys, *text.values)) == session.text_kv
        assert state.vae.decode_cache.nbytes == session.vae_cache
        engine.close(state)
    assert f"{plan.weights_on_device / 1e6:.1f} MB" in plan.summary()
    assert "VAE decode cache" in plan.table() and "no limit" in plan.table()


def test_bf16_headers_plan_the_cast_not_the_stored_dtype(tiny_folder):
    fp32 = weight_bytes(tiny_folder, "transformer", torch.float32)
    bf16 = weight_bytes(tiny_folder, "transformer", torch.bfloat16)
    kept = sum(
        math.prod(shape)
        for name, (shape, _) in _headers(tiny_folder).items()
        if loading.keeps_fp32(loading.to_model_name(name, loading.ORIGINAL), _fp32_modules())
    )
    assert kept > 0 and bf16 == fp32 // 2 + 2 * kept
    text_fp32 = weight_bytes(tiny_folder, "text_encoder", torch.float32)
    assert weight_bytes(tiny_folder, "text_encoder", torch.bfloat16) == text_fp32 // 2
    with pytest.raises(ValueError, match="component='tokenizer'"):
        weight_bytes(tiny_folder, "tokenizer", torch.float32)


def _headers(folder):
    from lingbot_ray.checkpoint import read_model_index
    from lingbot_ray.engine.memory import read_tensor_headers

    sub = read_model_index(folder).component_folder("transformer")
    return read_tensor_headers(loading.checkpoint_files(sub).values())


def _fp32_modules():
    from lingbot_ray.models.transformer_lingbot import CausalLingBotWorldTransformer3DModel

    return CausalLingBotWorldTransformer3DModel._keep_in_fp32_modules


# ------------------------------------------------------------------------------------ placement


def fake_cuda(monkeypatch, total: float, used: float = 0.5e9) -> None:
    """A CUDA device of ``total`` bytes of which ``used`` are taken (the context), for planning only."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(total - used), int(total)))


H100_80GB = 81_559 * 2**20  # 79.6 GiB = 85.5 GB, as the driver reports an "80 GB" H100
A100_40GB = 40_960 * 2**20  # 42.9 GB
H200 = 143_771 * 2**20  # 150.8 GB


def test_v1_on_an_80_gb_gpu_puts_the_text_encoder_on_the_cpu(v1, v1_weights, monkeypatch):
    fake_cuda(monkeypatch, H100_80GB)
    dit_vae = {"transformer": v1_weights["transformer"], "vae": v1_weights["vae"]}
    plan = place(v1, dit_vae, v1_weights["text_encoder"], device="cuda", width=832, height=480)
    assert plan.text_device == "cpu" and "text_encoder" not in plan.weights
    assert plan.needed(1) / GB == pytest.approx(80.1, abs=0.1)  # 38.2 weights + 27.2 + 12.7 + 2.0 headroom
    assert plan.needed(1) <= plan.available < plan.needed(1) + v1_weights["text_encoder"]  # 91.5 with UMT5
    assert plan.sessions_that_fit() == 1
    assert "text encoder (11.4 GB) on cpu" in plan.text_placement() and "91.5 GB" in plan.text_placement()
    assert "1 session fits" in plan.summary() and "85.0 GB available of 85.5 GB" in plan.summary()
    # an explicit placement is obeyed, and the plan then says that no session fits
    forced = place(v1, dit_vae, v1_weights["text_encoder"], device="cuda", width=832, height=480, text_device="cuda")
    assert forced.text_device == "cuda" and forced.sessions_that_fit() == 0
    # a smaller session size leaves room for it: the decision follows the plan, not the model
    small = place(v1, dit_vae, v1_weights["text_encoder"], device="cuda", width=480, height=272)
    assert small.text_device == "cuda"


def test_v1_on_a_40_gb_gpu_fits_no_session_and_keeps_the_text_encoder_off_it(v1, v1_weights, monkeypatch):
    fake_cuda(monkeypatch, A100_40GB)
    dit_vae = {"transformer": v1_weights["transformer"], "vae": v1_weights["vae"]}
    plan = place(v1, dit_vae, v1_weights["text_encoder"], device="cuda", width=832, height=480)
    assert plan.text_device == "cpu" and plan.sessions_that_fit() == 0
    fake_cuda(monkeypatch, H200)
    assert place(v1, dit_vae, v1_weights["text_encoder"], device="cuda", width=832, height=480).text_device == "cuda"


def test_tiny_checkpoint_placement_on_fake_devices_reads_the_files(tiny_folder, monkeypatch):
    def plan(total, **kwargs):
        fake_cuda(monkeypatch, total, used=0)
        return plan_memory(tiny_folder, device="cuda", dit_dtype=torch.bfloat16, text_dtype=torch.bfloat16, **kwargs)

    together = plan(10**12)
    assert together.text_device == "cuda"
    needed = together.needed(1)
    assert plan(needed).text_device == "cuda"
    assert plan(needed - 1).text_device == "cpu"
    # a budget caps what CUDA reports free
    assert plan(10**12, budget=needed - 1).text_device == "cpu"
    with pytest.raises(ValueError, match="memory_budget=0"):
        plan(10**12, budget=0)


# ------------------------------------------------------------------------------------ refusing sessions


def test_from_pretrained_logs_the_plan_before_loading_anything(tiny_folder, caplog):
    with caplog.at_level(logging.INFO, logger="lingbot_ray"):
        engine = RealtimeEngine.from_pretrained(tiny_folder)
    messages = [r.getMessage() for r in caplog.records]
    planned = next(i for i, m in enumerate(messages) if m.startswith("memory plan on cpu"))
    loaded = next(i for i, m in enumerate(messages) if m.startswith("loading"))
    assert planned < loaded
    assert any(m.startswith("text encoder (") for m in messages[:loaded])
    assert engine.memory is not None and engine.memory.text_device == "cpu"


def test_weights_beyond_the_budget_are_refused_before_loading(tiny_folder, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded although the weights cannot fit")

    monkeypatch.setattr(loading, "load_dit", never)
    monkeypatch.setattr(loading, "load_prompt_encoder", never)
    with pytest.raises(InsufficientMemory, match=r"weights need .* MB .* on cpu; .* available \(budget 1.0 kB\)"):
        RealtimeEngine.from_pretrained(tiny_folder, memory_budget=1000)


def test_a_session_beyond_the_cpu_budget_is_refused_with_the_figures(tiny_folder, make_spec):
    plan = plan_memory(tiny_folder, device="cpu", dit_dtype=torch.float32, text_dtype=torch.float32)
    session = plan.model.session(WIDTH, HEIGHT)
    budget = plan.weights_on_device + session.work + session.persistent * 3 // 2  # room for one session, not two
    engine = RealtimeEngine.from_pretrained(tiny_folder, memory_budget=budget)
    first = engine.new_session(make_spec())
    with pytest.raises(InsufficientMemory) as refused:
        engine.new_session(make_spec())
    message = str(refused.value)
    assert message.startswith(f"session needs {session.describe()[len('session needs '):]}")
    assert f"at {WIDTH}x{HEIGHT}, window 9 frames" in message
    assert f"free of a {budget / 1e6:.1f} MB budget on cpu (1 session held)" in message
    assert isinstance(refused.value, CapacityError)  # a server closes with 1013
    assert outcome_for(refused.value).close_code == CloseCode.TRY_AGAIN_LATER
    assert len(engine.chain.dit.sessions) == len(engine.chain.vae.sessions) == 1  # nothing of it was allocated
    engine.step(first, conditions())
    engine.close(first)
    engine.close(engine.new_session(make_spec()))  # room again once the first is closed


def test_the_dit_host_refuses_before_allocating(engine, make_spec):
    """What a served DiT rank runs: the check sits in start_session, before the session's state."""
    model = ModelMemory.of_dit(engine.dit)
    session = model.session(WIDTH, HEIGHT, vae=False)
    host = DiTHost(engine.dit, MemoryGuard(model, "cpu", budget=session.persistent + session.work - 1, vae=False))
    with pytest.raises(InsufficientMemory, match=r"session needs .* KV \+ .* text K/V at 64x48, window 9 frames"):
        host.start_session("s1", make_spec(), condition=None, prompt=None, negative=None)
    assert "s1" not in host


def test_the_served_dit_group_refuses_with_a_capacity_error(make_spec):
    """DiTGroup (lingbot_ray/serve/deployments.py) in-process, no Ray: its rank 0 admits by memory."""
    from lingbot_ray.serve.config import load_config
    from lingbot_ray.serve.deployments import DiTGroup

    async def scenario():
        group = DiTGroup(load_config({}))  # the embedded tiny model on the CPU
        guard = group.host.memory
        assert guard is not None and not guard.vae and guard.sequence_parallel == 1
        guard.budget = 1  # bytes: on the CPU only a budget limits anything
        await group.open_session("s1")
        with pytest.raises(CapacityError, match="session needs .* KV .* free of a 0.0 kB budget on cpu"):
            await group.start_session("s1", make_spec(), None, None, None)
        assert "s1" not in group.host
        await group.close_session("s1")

    asyncio.run(scenario())
