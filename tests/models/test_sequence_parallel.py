"""Ulysses sequence parallelism on 2 gloo ranks == the single-process model.

One spawn of 2 ranks runs every distributed check and saves what each rank saw; the tests compare that
with references computed here, in the test process, without any process group.
"""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lingbot_ray.models.kv_cache import block_causal_frame_mask
from lingbot_ray.models.sequence_parallel import SequenceParallel
from lingbot_ray.models.transformer_lingbot import CAMERA_CHANNELS, CausalLingBotWorldTransformer3DModel
from tests.cluster import free_port


WORLD = 2
TINY = dict(
    num_attention_heads=4,
    attention_head_dim=8,
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
LATENT_H, LATENT_W = 6, 6  # 3x3 tokens per frame: 27 tokens per block, odd, so the last shard is padded
TOKENS = (LATENT_H // 2) * (LATENT_W // 2)
BLOCK, FRAMES, BATCH = 3, 15, 2  # 5 blocks through a 9-frame window: frames get evicted
SINK, WINDOW = 3, 9
ATOL = 1e-5
PRIMITIVE_LENGTHS = (7, 8, 1)  # uneven, even, fewer tokens than ranks


def make_model(**overrides) -> CausalLingBotWorldTransformer3DModel:
    torch.manual_seed(0)
    model = CausalLingBotWorldTransformer3DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        # Default init makes every affine norm the identity; perturb so norm_q/norm_k across heads matter.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
    return model


def inputs():
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, TINY["in_channels"], FRAMES, LATENT_H, LATENT_W, generator=gen)
    text = torch.randn(BATCH, 5, TINY["text_dim"], generator=gen)
    plucker = torch.randn(BATCH, CAMERA_CHANNELS, FRAMES, LATENT_H, LATENT_W, generator=gen)
    return latents, text, plucker


def primitive_input(seq_len: int) -> torch.Tensor:
    return torch.randn(2, seq_len, 4, 3, generator=torch.Generator().manual_seed(seq_len))


@torch.no_grad()
def run_session(model) -> torch.Tensor:
    """The engine's call pattern per block: two denoising forwards, then the clean one that commits."""
    latents, text, plucker = inputs()
    text_cache = model.build_text_cache(text)
    kv_cache = model.new_kv_cache(batch_size=BATCH, tokens_per_frame=TOKENS, sink_frames=SINK, window_frames=WINDOW)
    flows = []
    for index, start in enumerate(range(0, FRAMES, BLOCK)):
        block = latents[:, :, start : start + BLOCK]
        camera = None if index == 1 else model.build_camera_cache(plucker[:, :, start : start + BLOCK])
        per_frame_t = torch.tensor([[900.0, 800.0, 700.0], [600.0, 500.0, 400.0]])
        for t, update_cache in (
            (torch.full((BATCH,), 1000.0 - 10 * index), False),
            (per_frame_t if index == 2 else torch.full((BATCH,), 500.0), False),
            (torch.zeros(BATCH), True),
        ):
            flows.append(
                model.forward_block(
                    block + 1e-3 * t.reshape(BATCH, 1, -1, 1, 1),
                    t,
                    kv_cache=kv_cache,
                    start_frame=start,
                    text_cache=text_cache,
                    camera_cache=camera,
                    update_cache=update_cache,
                )
            )
    return torch.stack(flows)


@torch.no_grad()
def run_full_forward(model) -> torch.Tensor:
    latents, text, plucker = inputs()
    frames = 2 * BLOCK
    mask = block_causal_frame_mask(frames, BLOCK, sink_frames=1, window_frames=5)
    t = torch.tensor([800.0, 300.0])
    return model(latents[:, :, :frames], t, text, plucker[:, :, :frames], frame_mask=mask).sample


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------ the ranks


@torch.no_grad()
def _rank_main(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        sp = SequenceParallel()
        results = {"rank": sp.rank, "world_size": sp.world_size}

        # (a) primitives
        for seq_len in PRIMITIVE_LENGTHS:
            local = sp.shard(primitive_input(seq_len))
            heads = sp.sequence_to_heads(local, seq_len)
            results[f"primitives/{seq_len}"] = dict(
                shard=local,
                heads=heads,
                back=sp.heads_to_sequence(heads),
                gathered=sp.gather(local, seq_len),
            )

        # (b) model: streaming session and full forward; (c) the cache it allocates
        model = make_model()
        full_heads_cache = model.new_kv_cache(batch_size=BATCH, tokens_per_frame=TOKENS)
        latents, text, plucker = inputs()
        full_camera = model.build_camera_cache(plucker[:, :, :BLOCK])
        model.enable_sequence_parallel(sp)
        results["session"] = run_session(model)
        results["full_forward"] = run_full_forward(model)
        cache = model.new_kv_cache(batch_size=BATCH, tokens_per_frame=TOKENS, sink_frames=SINK, window_frames=WINDOW)
        results["cache"] = dict(key_shape=tuple(cache.keys[0].shape), nbytes=cache.nbytes())
        shard_camera = model.build_camera_cache(plucker[:, :, :BLOCK])
        results["camera_shard_tokens"] = shard_camera.scales[0].shape[1]
        results["full_camera_flow"] = model.forward_block(
            latents[:, :, :BLOCK], torch.full((BATCH,), 700.0), kv_cache=cache, start_frame=0,
            text_cache=model.build_text_cache(text), camera_cache=full_camera, update_cache=False,
        )

        # (d) refusals
        results["errors"] = dict(
            odd_heads_model=_error(lambda: make_model(num_attention_heads=3).enable_sequence_parallel(sp)),
            odd_heads_tensor=_error(lambda: sp.sequence_to_heads(torch.zeros(1, 1, 3, 2), 2)),
            full_heads_cache=_error(
                lambda: model.forward_block(
                    latents[:, :, :BLOCK], torch.zeros(BATCH), kv_cache=full_heads_cache, start_frame=0,
                    text_cache=model.build_text_cache(text), update_cache=False,
                )
            ),
        )
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("sp")
    mp.start_processes(_rank_main, args=(free_port(), str(out_dir)), nprocs=WORLD, start_method="spawn")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    model = make_model()
    cache = model.new_kv_cache(batch_size=BATCH, tokens_per_frame=TOKENS, sink_frames=SINK, window_frames=WINDOW)
    latents, text, plucker = inputs()
    with torch.no_grad():
        first_block = model.forward_block(
            latents[:, :, :BLOCK], torch.full((BATCH,), 700.0), kv_cache=cache, start_frame=0,
            text_cache=model.build_text_cache(text), camera_cache=model.build_camera_cache(plucker[:, :, :BLOCK]),
            update_cache=False,
        )
    return dict(
        session=run_session(model),
        full_forward=run_full_forward(model),
        cache=dict(key_shape=tuple(cache.keys[0].shape), nbytes=cache.nbytes()),
        first_block=first_block,
    )


# ------------------------------------------------------------------------------------ (a) primitives


@pytest.mark.parametrize("seq_len", PRIMITIVE_LENGTHS)
def test_all_to_all_round_trips_and_matches_slicing(ranks, seq_len):
    x = primitive_input(seq_len)
    local = -(-seq_len // WORLD)
    padded = torch.cat([x, x.new_zeros(2, local * WORLD - seq_len, 4, 3)], dim=1)
    heads_per_rank = x.shape[2] // WORLD
    for rank, result in enumerate(ranks):
        got = result[f"primitives/{seq_len}"]
        assert result["rank"] == rank and result["world_size"] == WORLD
        torch.testing.assert_close(got["shard"], padded[:, rank * local : (rank + 1) * local], atol=0, rtol=0)
        heads = x[:, :, rank * heads_per_rank : (rank + 1) * heads_per_rank]
        torch.testing.assert_close(got["heads"], heads, atol=0, rtol=0)
        torch.testing.assert_close(got["back"], got["shard"], atol=0, rtol=0)
        torch.testing.assert_close(got["gathered"], x, atol=0, rtol=0)


# ------------------------------------------------------------------------------------ (b) equivalence


def test_streaming_session_with_eviction_and_camera_equals_single_process(ranks, single):
    assert TOKENS * BLOCK % WORLD != 0, "the block's token count must exercise padding"
    assert FRAMES > WINDOW, "the session must evict frames"
    for result in ranks:
        assert result["session"].shape == single["session"].shape == (3 * FRAMES // BLOCK, BATCH, 16, BLOCK, 6, 6)
        torch.testing.assert_close(result["session"], single["session"], atol=ATOL, rtol=0)


def test_full_forward_with_mask_equals_single_process(ranks, single):
    for result in ranks:
        torch.testing.assert_close(result["full_forward"], single["full_forward"], atol=ATOL, rtol=0)


def test_camera_cache_is_built_per_shard_and_a_full_one_is_sliced(ranks, single):
    for result in ranks:
        assert result["camera_shard_tokens"] == -(-TOKENS * BLOCK // WORLD)
        torch.testing.assert_close(result["full_camera_flow"], single["first_block"], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------ (c) KV cache


def test_kv_cache_holds_a_share_of_the_heads(ranks, single):
    batch, length, heads, head_dim = single["cache"]["key_shape"]
    assert heads == TINY["num_attention_heads"]
    for result in ranks:
        assert result["cache"]["key_shape"] == (batch, length, heads // WORLD, head_dim)
        assert result["cache"]["nbytes"] * WORLD == single["cache"]["nbytes"]


# ------------------------------------------------------------------------------------ (d) refusals


def test_heads_not_divisible_by_world_size_raise_value_error(ranks):
    for result in ranks:
        for key in ("odd_heads_model", "odd_heads_tensor"):
            message = result["errors"][key]
            assert message is not None, key
            assert "=3" in message and f"world_size={WORLD}" in message, message


def test_cache_allocated_without_sequence_parallelism_is_refused(ranks):
    for result in ranks:
        message = result["errors"]["full_heads_cache"]
        assert message is not None and "4 heads" in message and "2 attention heads per rank" in message, message


def test_sequence_parallel_needs_an_initialised_group():
    with pytest.raises(ValueError, match="init_process_group"):
        SequenceParallel()
