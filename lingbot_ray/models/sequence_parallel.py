"""Ulysses sequence parallelism: each rank of a process group holds a contiguous shard of the tokens.

Everything per-token (modulation, camera, cross-attention, FFN) runs on the shard. Self-attention needs
every token, so around it two all-to-alls exchange shards (DeepSpeed-Ulysses):

    [B, S/N, H, D]  --sequence_to_heads-->  [B, S, H/N, D]     RoPE, KV cache, attention
    [B, S/N, H, D]  <--heads_to_sequence--  [B, S, H/N, D]     attention output

Rank r's shard is tokens `r*S/N .. (r+1)*S/N` of the sequence zero-padded to a multiple of N, so every
rank sends and receives equal sizes (NCCL and gloo need that) whatever the token count. Padding never
reaches attention: `sequence_to_heads` drops it and `heads_to_sequence` puts it back.

The collectives carry no gradient: this is for inference. Every rank must make the same calls in the
same order, with the same shapes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


__all__ = ["SequenceParallel"]


class SequenceParallel:
    r"""
    The process group a model's tokens are split over, and the collectives that move them.

    Args:
        group (`torch.distributed.ProcessGroup`, *optional*): Initialised group of the N ranks of one model
            replica; None is the default group. Any backend with `all_to_all_single` (NCCL, gloo).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("sequence parallelism needs torch.distributed.init_process_group to have been called")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def __repr__(self) -> str:
        return f"SequenceParallel(rank={self.rank}, world_size={self.world_size})"

    # ------------------------------------------------------------------ sizes

    def check_heads(self, num_heads: int) -> None:
        """Ulysses gives each rank whole heads, so they must split evenly."""
        if num_heads % self.world_size != 0:
            raise ValueError(
                f"num_attention_heads={num_heads} is not divisible by the sequence-parallel degree "
                f"world_size={self.world_size}"
            )

    def local_heads(self, num_heads: int) -> int:
        self.check_heads(num_heads)
        return num_heads // self.world_size

    def shard_length(self, seq_len: int) -> int:
        """Tokens per rank, padding included: `ceil(seq_len / N)`."""
        return -(-seq_len // self.world_size)

    # ------------------------------------------------------------------ shard / gather

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of `x` along `dim`, zero-padded so every rank's shard has the same length."""
        seq_len = x.shape[dim]
        local = self.shard_length(seq_len)
        start = self.rank * local
        piece = x.narrow(dim, min(start, seq_len), max(0, min(local, seq_len - start)))
        return _pad(piece, dim, local)

    def gather(self, x: torch.Tensor, seq_len: int, dim: int = 1) -> torch.Tensor:
        """Every rank's shard along `dim`, concatenated and cut to `seq_len` (inverse of `shard`)."""
        _check_no_grad(x)
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(pieces, x, group=self.group)
        return torch.cat(pieces, dim=dim).narrow(dim, 0, seq_len)

    # ------------------------------------------------------------------ all-to-all

    def sequence_to_heads(self, x: torch.Tensor, seq_len: int) -> torch.Tensor:
        """`[B, S_local, H, D]` shard with all heads → `[B, seq_len, H/N, D]`: every token, this rank's heads.

        `S_local` is `shard_length(seq_len)`; rank r receives heads `r*H/N .. (r+1)*H/N`.
        """
        batch, local, heads, head_dim = x.shape
        if local != self.shard_length(seq_len):
            raise ValueError(
                f"shard of {local} tokens does not match seq_len={seq_len} over world_size={self.world_size} "
                f"(expected {self.shard_length(seq_len)})"
            )
        local_heads = self.local_heads(heads)
        # all_to_all_single sends chunk j of dim 0 to rank j, so put the head group first.
        send = x.reshape(batch, local, self.world_size, local_heads, head_dim).permute(2, 0, 1, 3, 4).contiguous()
        received = self._all_to_all(send)
        # Chunk i came from rank i and holds sequence shard i: concatenating them in order restores the sequence.
        full = received.permute(1, 0, 2, 3, 4).reshape(batch, self.world_size * local, local_heads, head_dim)
        return full[:, :seq_len]

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, S, H/N, D]` every token, this rank's heads → `[B, shard_length(S), H, D]` this rank's shard."""
        batch, seq_len, local_heads, head_dim = x.shape
        local = self.shard_length(seq_len)
        padded = _pad(x, 1, local * self.world_size)
        send = padded.reshape(batch, self.world_size, local, local_heads, head_dim).transpose(0, 1).contiguous()
        received = self._all_to_all(send)
        # Chunk i came from rank i and holds head group i: heads come back in their original order.
        return received.permute(1, 2, 0, 3, 4).reshape(batch, local, self.world_size * local_heads, head_dim)

    def _all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        _check_no_grad(send)
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received


def _pad(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _check_no_grad(x: torch.Tensor) -> None:
    # A silent wrong gradient is worse than a refusal.
    if x.requires_grad:
        raise ValueError("sequence parallelism is inference-only; run under torch.no_grad()")
