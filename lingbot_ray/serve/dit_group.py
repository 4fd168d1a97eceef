"""One DiT group = one Serve replica = ``N`` ranks of Ulysses sequence parallelism.

Rank 0 runs inside the replica; ranks 1..N-1 are child actors in the replica's placement group
(one bundle each, ``STRICT_PACK``), so the group is placed, restarted and health-checked as one
unit: the children die with the replica, and ``check_health`` pings every rank.

Every call is mirrored to all ranks with identical inputs (spec, condition latents, text
embeddings, conditions; the session generator is seeded, so noise matches too), because every
forward involves the group's collectives. Rank 0's result is the group's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any, Callable, TypeVar

import torch

from lingbot_ray.checkpoint import read_serving_defaults
from lingbot_ray.engine.fastpath import compile_dit, use_attention_backend, use_fp8, warm_up
from lingbot_ray.engine.hosts import DiTHost
from lingbot_ray.engine.messages import ChunkRequest, DiTChunk, PromptEmbeds, SessionOpened
from lingbot_ray.engine.session import SessionSpec
from lingbot_ray.engine.stages import DiTStage

from .config import ServeConfig

logger = logging.getLogger("ray.serve")

Result = TypeVar("Result")


class DiTRank(DiTHost):
    """One rank: the DiT host with this rank's share of every session's state (KV cache holds
    heads/N under sequence parallelism)."""

    def __init__(self, config: ServeConfig, rank: int = 0, world_size: int = 1):
        from .deployments import load_folder, torch_dtype

        folder = load_folder(config.model)
        super().__init__(DiTStage.from_pretrained(folder, device=config.model.device, dtype=torch_dtype(config.model.dit_dtype)))
        self.rank, self.world_size = rank, world_size
        if config.model.attention_backend:
            use_attention_backend(self.stage, config.model.attention_backend)
        use_fp8(self.stage, config.dit.fp8)
        self.compile = config.dit.compile
        compile_dit(self.stage, self.compile)
        self.defaults = read_serving_defaults(folder)
        # dit.cpu_offload: weights wait in host memory and visit the device for each chunk's work;
        # per-session state (KV caches, camera) stays on the device.
        self.offload = config.dit.cpu_offload and self.stage.device.type != "cpu"
        if self.offload:
            self.stage.model.to("cpu")

    def _on_device(self, fn, *args):
        if not self.offload:
            return fn(*args)
        self.stage.model.to(self.stage.device)
        try:
            return fn(*args)
        finally:
            self.stage.model.to("cpu")

    def start_session(
        self, sid: str, spec: SessionSpec, condition: Any, prompt: PromptEmbeds, negative: PromptEmbeds | None
    ) -> SessionOpened:
        return self._on_device(super().start_session, sid, spec, condition, prompt, negative)

    def step(self, sid: str, request: ChunkRequest) -> DiTChunk:
        return self._on_device(super().step, sid, request)

    def warm_up(self) -> int:
        """Compile now, before the replica reports ready: a throwaway session at the checkpoint's
        default size (every rank at once under sequence parallelism). Returns the chunks run."""
        if self.compile == "none":
            return 0
        return self._on_device(warm_up, self.stage, self.defaults.width, self.defaults.height)

    def join(self, address: str, port: int) -> int:
        """Join the group's process group; the DiT then runs sequence-parallel over it."""
        import torch.distributed as dist

        backend = "nccl" if self.stage.device.type == "cuda" else "gloo"
        if self.stage.device.type == "cuda":
            torch.cuda.set_device(self.stage.device)
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=self.rank, world_size=self.world_size)
        self.stage.enable_sequence_parallel()
        return self.rank

    def ping(self) -> int:
        return self.rank

    def pid(self) -> int:
        return os.getpid()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankGroup:
    """Rank 0 in this process plus N-1 child actors; ``call`` runs a method on all of them."""

    def __init__(self, config: ServeConfig, run_local):
        """``run_local(fn, *args)`` runs rank 0's work off the event loop."""
        self.size = config.dit.sequence_parallel_degree
        self.local = DiTRank(config, 0, self.size)
        self._run_local = run_local
        self.workers: list[Any] = []
        if self.size == 1:
            self.local.warm_up()
            return
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = get_current_placement_group()
        if group is None:
            raise RuntimeError("dit.sequence_parallel_degree > 1 needs the replica's placement group (placement_group_bundles)")
        if group.bundle_count < self.size:
            # a deployments: override of placement_group_bundles in the serve config that disagrees
            raise ValueError(
                f"dit.sequence_parallel_degree={self.size}: the DiTGroup's placement group has "
                f"{group.bundle_count} bundle(s), one per rank is needed (remove placement_group_bundles "
                "from the DiTGroup's deployments entry: the app computes it)"
            )
        worker_cls = ray.remote(DiTRank)
        self.workers = [
            worker_cls.options(
                num_cpus=config.dit.num_cpus_per_rank,
                num_gpus=config.dit.num_gpus_per_rank,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=rank
                ),
            ).remote(config, rank, self.size)
            for rank in range(1, self.size)
        ]
        address, port = ray.util.get_node_ip_address(), _free_port()
        joined = [w.join.remote(address, port) for w in self.workers]
        self.local.join(address, port)  # returns once every rank has joined
        ray.get(joined)
        logger.info("DiT rank group of %d joined at %s:%d", self.size, address, port)
        warming = [w.warm_up.remote() for w in self.workers]
        self.local.warm_up()
        ray.get(warming)

    async def call(self, method: Callable[..., Result], *args) -> Result:
        """Run ``method`` (a :class:`DiTRank` method) on every rank with the same arguments; returns
        rank 0's result (collectives make every rank take as long)."""
        remote = [getattr(w, method.__name__).remote(*args) for w in self.workers]
        ranks = asyncio.gather(self._run_local(method, self.local, *args), *remote)
        # A caller that gives up cancels a single rank's call where it waits; a group's ranks run
        # every call or none, since each forward waits for the others in its collectives.
        results = await (asyncio.shield(ranks) if self.workers else ranks)
        return results[0]

    def pids(self) -> list[int]:
        import ray

        return [os.getpid()] + (ray.get([w.pid.remote() for w in self.workers], timeout=30) if self.workers else [])

    def check_health(self) -> None:
        if self.workers:
            import ray

            ray.get([w.ping.remote() for w in self.workers], timeout=30)
