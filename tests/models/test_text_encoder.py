"""PromptEncoder on a tiny UMT5 + locally trained T5 tokenizer (offline)."""

import pytest
import torch
from transformers import T5TokenizerFast, UMT5EncoderModel

from lingbot_ray.models.text_encoder import PromptEncoder
from lingbot_ray.models.tiny_components import (
    TINY_VOCAB_SIZE,
    build_tiny_text_encoder,
    build_tiny_tokenizer,
)

MAX_LENGTH = 48
PROMPT = "A red car drives along a coastal road at sunset."


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    build_tiny_tokenizer(root / "tokenizer")
    build_tiny_text_encoder(root / "text_encoder", d_model=32, num_layers=2, num_heads=2, d_ff=64, seed=0)
    return root


@pytest.fixture(scope="module")
def encoder(checkpoint):
    return PromptEncoder.from_pretrained(checkpoint, max_length=MAX_LENGTH, cache_size=0)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_tokenizer_round_trip_from_disk(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = T5TokenizerFast.from_pretrained(checkpoint / "tokenizer")
    built = build_tiny_tokenizer(checkpoint / "tokenizer_again")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert len(tokenizer) <= TINY_VOCAB_SIZE

    ids = tokenizer(PROMPT).input_ids
    assert ids == built(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id not in ids[:-1]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


def test_padding_positions_are_exactly_zero(encoder):
    embeds = encoder.encode(PROMPT)
    num_tokens = len(encoder.tokenizer(PROMPT).input_ids)
    assert embeds.shape == (1, MAX_LENGTH, encoder.d_model)
    assert num_tokens < MAX_LENGTH
    assert torch.all(embeds[:, num_tokens:] == 0)
    assert torch.all(embeds[:, :num_tokens].abs().sum(-1) > 0)


def test_real_tokens_equal_a_direct_umt5_forward(encoder, checkpoint):
    model = UMT5EncoderModel.from_pretrained(checkpoint / "text_encoder").eval()
    ids = encoder.tokenizer(PROMPT, return_tensors="pt").input_ids
    num_tokens = ids.shape[1]
    embeds = encoder.encode(PROMPT)
    with torch.no_grad():
        direct = model(input_ids=ids).last_hidden_state
        # Wan's way: pad the ids to max_length and mask the padding.
        padded = encoder.tokenizer(PROMPT, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")
        masked = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask).last_hidden_state
    torch.testing.assert_close(embeds[:, :num_tokens], direct, rtol=0, atol=0)
    torch.testing.assert_close(embeds[:, :num_tokens], masked[:, :num_tokens], rtol=1e-5, atol=1e-5)


def test_long_prompts_are_truncated_to_max_length(encoder):
    long_prompt = " ".join([PROMPT] * 20)
    embeds = encoder.encode(long_prompt)
    assert embeds.shape == (1, MAX_LENGTH, encoder.d_model)
    assert torch.all(embeds.abs().sum(-1) > 0)  # every position is a real token


def test_a_huge_prompt_is_cut_before_the_tokenizer_without_changing_the_embeddings(encoder, monkeypatch):
    """Only the first MAX_CHARS_PER_TOKEN characters per token position can reach the output, so a
    huge prompt gives what its whole text would, and the tokenizer never sees the rest (1 MB here:
    the uncut comparison tokenizes all of it, ~5 s per MB)."""
    from lingbot_ray.models import text_encoder

    huge = " ".join(["a red car", "drives", "along the coast"] * 40_000)  # ~1 MB
    seen = []
    tokenize = encoder.tokenizer.__class__.__call__
    monkeypatch.setattr(encoder.tokenizer.__class__, "__call__", lambda self, text, **kw: seen.append(len(text)) or tokenize(self, text, **kw))
    cut = encoder.encode(huge)
    assert seen == [MAX_LENGTH * text_encoder.MAX_CHARS_PER_TOKEN]
    monkeypatch.setattr(text_encoder, "MAX_CHARS_PER_TOKEN", 10**9)  # no cut: the whole text tokenized
    assert torch.equal(cut, encoder.encode(huge))
    assert seen[-1] == len(huge)


def test_lru_cache_returns_same_tensor_without_rerunning(checkpoint):
    encoder = PromptEncoder.from_pretrained(checkpoint, max_length=MAX_LENGTH, cache_size=2)
    calls, handle = _count_forwards(encoder.text_encoder)
    try:
        first = encoder.encode("a quiet lake")
        again = encoder.encode("  a   quiet lake ")  # same prompt after whitespace clean-up
        assert again is first and len(calls) == 1

        encoder.encode("a snowy valley")
        encoder.encode("a quiet lake")  # refreshes the lake: the valley is now the oldest
        encoder.encode("a busy market")  # evicts the valley
        assert len(calls) == 3
        assert encoder.encode("a quiet lake") is first and len(calls) == 3
        encoder.encode("a snowy valley")
        assert len(calls) == 4
    finally:
        handle.remove()


def test_cache_size_zero_disables_the_cache(encoder):
    calls, handle = _count_forwards(encoder.text_encoder)
    try:
        first = encoder.encode(PROMPT)
        second = encoder.encode(PROMPT)
    finally:
        handle.remove()
    assert len(calls) == 2 and second is not first
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_different_prompts_give_different_embeddings(encoder):
    assert not torch.allclose(encoder.encode("a red car"), encoder.encode("a blue boat"))


def test_bad_prompts_and_arguments_are_rejected(encoder, checkpoint):
    for bad in ["", "   \n\t"]:
        with pytest.raises(ValueError, match="empty"):
            encoder.encode(bad)
    with pytest.raises(ValueError, match="must be a str"):
        encoder.encode(None)
    with pytest.raises(ValueError, match="cache_size"):
        PromptEncoder(encoder.text_encoder, encoder.tokenizer, cache_size=-1)
    with pytest.raises(ValueError, match="max_length"):
        PromptEncoder(encoder.text_encoder, encoder.tokenizer, max_length=0)
    small = build_tiny_text_encoder(checkpoint / "small_vocab", vocab_size=16)
    with pytest.raises(ValueError, match="vocab_size is 16"):
        PromptEncoder(small, encoder.tokenizer)


def test_from_pretrained_in_bfloat16(checkpoint):
    encoder = PromptEncoder.from_pretrained(checkpoint, dtype=torch.bfloat16, max_length=MAX_LENGTH)
    embeds = encoder.encode(PROMPT)
    num_tokens = len(encoder.tokenizer(PROMPT).input_ids)
    assert embeds.dtype == torch.bfloat16 and encoder.dtype == torch.bfloat16
    assert torch.all(embeds[:, num_tokens:] == 0) and torch.all(embeds[:, :num_tokens].abs().sum(-1) > 0)


def test_tiny_tokenizer_is_identical_on_every_build(tmp_path):
    """The Unigram trainer varies from run to run; the shipped vocabulary makes every build equal
    (the consistency ground truth depends on the token ids)."""
    import subprocess
    import sys

    from lingbot_ray.models.tiny_components import SHIPPED_VOCAB, train_tiny_vocab

    code = "import sys; from lingbot_ray.models.tiny_components import build_tiny_tokenizer; build_tiny_tokenizer(sys.argv[1])"
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    import json

    shipped = json.loads(SHIPPED_VOCAB.read_text())["vocab"]
    assert [p for p, _ in shipped[:3]] == ["<pad>", "</s>", "<unk>"]
    assert {p for p, _ in train_tiny_vocab()} == {p for p, _ in shipped}  # same pieces as a fresh training


def test_the_prompt_cache_is_bounded_by_bytes_as_well_as_entries(encoder):
    """Clients choose the prompts: the cache must not grow with their length (a fuzz run once took
    a text-encoder replica from 441 MB to 3 GB)."""
    one = encoder.encode("a probe").numel() * encoder.encode("a probe").element_size()
    bounded = PromptEncoder(encoder.text_encoder, encoder.tokenizer, max_length=MAX_LENGTH, cache_size=100, cache_bytes=3 * one + 3000)
    for i in range(10):
        bounded.encode(f"prompt {i} " + "z" * 900)
        entries, size = bounded.cache_stats
        assert size <= bounded.cache_bytes and entries <= 3
    assert bounded.cache_stats[0] == 3
    huge = PromptEncoder(encoder.text_encoder, encoder.tokenizer, max_length=MAX_LENGTH, cache_size=4, cache_bytes=one // 2)
    huge.encode("never fits")
    assert huge.cache_stats == (0, 0)
