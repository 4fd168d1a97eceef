"""Prompt → UMT5 text embeddings, zero-padded to a fixed length, with a small per-prompt LRU cache.

Padding rule (Wan / LingBot): the encoder's outputs for the real tokens (including the closing
`</s>`) are kept and every position after them is exactly zero. The DiT applies its
`text_embedding` afterwards, so padded positions become `text_embedding(0)`, not zero.

Only the real tokens are run through the encoder. Wan's pipeline pads the ids to `max_length` and
masks the padding instead; with the mask, padded keys get no attention weight and UMT5's relative
position bias depends only on offsets, so the real tokens' outputs are the same up to float
rounding, at a fraction of the cost for short prompts.
"""

from __future__ import annotations

import html
import logging
import os
import re
import threading
from collections import OrderedDict

import torch
from transformers import T5TokenizerFast, UMT5EncoderModel

logger = logging.getLogger(__name__)

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(prompt: str) -> str:
    """Wan's prompt clean-up minus `ftfy` (not a dependency): HTML unescape, collapse whitespace."""
    return _WHITESPACE.sub(" ", html.unescape(html.unescape(prompt))).strip()


# Text past this many characters per token position cannot reach the output (a token spans at most a
# vocabulary piece, 16 characters for UMT5), so it is cut before the tokenizer sees it: a multi-MB
# prompt costs nothing more than a long one (it once took a minute and grew the process by a GB).
MAX_CHARS_PER_TOKEN = 64


class PromptEncoder:
    """Encodes prompts for the DiT's cross-attention.

    Args:
        text_encoder: a loaded `UMT5EncoderModel` (any dtype/device; outputs keep them).
        tokenizer: the matching `T5TokenizerFast` (appends `</s>`).
        max_length: token positions of the output; longer prompts are truncated.
        cache_size: prompts remembered (least recently used evicted first); 0 disables the cache.
        cache_bytes: bound on what the cache holds, embeddings plus prompt text (least recently
            used evicted first): a replica lives for days and its prompts come from clients.

    `encode` returns cached tensors as they are, shared between callers: treat them as read-only.
    Safe to call from several threads (the cache is locked; encoder forwards are not serialised).
    """

    def __init__(
        self,
        text_encoder: UMT5EncoderModel,
        tokenizer: T5TokenizerFast,
        *,
        max_length: int = 512,
        cache_size: int = 16,
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be a non-negative int, got {cache_size!r}")
        vocab = len(tokenizer)
        if vocab > text_encoder.config.vocab_size:
            raise ValueError(
                f"tokenizer has {vocab} tokens but the text encoder's vocab_size is {text_encoder.config.vocab_size}"
            )
        self.text_encoder = text_encoder.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        max_length: int = 512,
        cache_size: int = 16,
    ) -> PromptEncoder:
        """Load `folder/text_encoder` and `folder/tokenizer` of a diffusers-style checkpoint (offline)."""
        root = os.fspath(folder)
        text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(root, "text_encoder"), dtype=dtype)
        tokenizer = T5TokenizerFast.from_pretrained(os.path.join(root, "tokenizer"))
        return cls(text_encoder.to(device), tokenizer, max_length=max_length, cache_size=cache_size)

    @property
    def d_model(self) -> int:
        return self.text_encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.text_encoder.parameters()).dtype

    def encode(self, prompt: str) -> torch.Tensor:
        """Embeddings of `prompt`: [1, max_length, d_model], zeros after the real tokens."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        text = clean_prompt(prompt)
        if not text:
            raise ValueError(f"prompt is empty after whitespace clean-up: {prompt!r}")
        text = text[: self.max_length * MAX_CHARS_PER_TOKEN]

        if self.cache_size:
            with self._lock:
                hit = self._cache.get(text)
                if hit is not None:
                    self._cache.move_to_end(text)
                    return hit

        embeds = self._encode_uncached(text)

        if self.cache_size and _entry_bytes(text, embeds) <= self.cache_bytes:
            with self._lock:
                if text not in self._cache:
                    self._cache[text] = embeds
                    self._cached_bytes += _entry_bytes(text, embeds)
                self._cache.move_to_end(text)
                while len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes:
                    evicted, tensor = self._cache.popitem(last=False)
                    self._cached_bytes -= _entry_bytes(evicted, tensor)
        return embeds

    @property
    def cache_stats(self) -> tuple[int, int]:
        """(entries, bytes) the prompt cache holds now."""
        with self._lock:
            return len(self._cache), self._cached_bytes

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0

    @torch.no_grad()
    def _encode_uncached(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(
            text,
            truncation=True,
            max_length=self.max_length,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        input_ids = tokens.input_ids.to(self.device)
        attention_mask = tokens.attention_mask.to(self.device)
        num_tokens = input_ids.shape[1]
        if num_tokens == self.max_length:
            logger.debug("prompt fills all %d token positions (longer prompts are truncated)", self.max_length)

        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        embeds = hidden.new_zeros(1, self.max_length, hidden.shape[-1])
        embeds[:, :num_tokens] = hidden
        return embeds


def _entry_bytes(text: str, embeds: torch.Tensor) -> int:
    return len(text) + embeds.numel() * embeds.element_size()
