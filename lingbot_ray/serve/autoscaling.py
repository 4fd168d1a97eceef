"""Session-aware autoscaling of the sticky stages: DiT groups and VAE (or post-process) replicas.

A session holds a slot on one DiT group and one VAE replica for its whole life, and its KV cache
cannot move. Serve's default policy counts requests, and in Ray 2.60 a policy only sets how many
replicas a deployment has: which replicas a downscale stops, Serve picks itself (replicas not yet
running first, then by node, the newest first), so a policy alone would stop replicas that hold
sessions. Scaling therefore takes two parts, with a board between them:

1. :class:`SessionSlotPolicy` (Serve's ``autoscaling_config.policy``, run by the controller) sizes
   the deployment from its replicas' session counts: ``ceil((sessions + target_free_slots) /
   slots_per_replica)`` replicas within ``[min_replicas, max_replicas]``. It scales up at once. It never
   lowers the target to scale down: it marks the surplus replicas, the emptiest first, as draining
   on the :class:`DrainBoard` (Ray's GCS key-value store, one key per deployment).
2. :class:`Drain` (in each replica) reads the board. A draining replica reports no free slot to the
   session routers, so new sessions go elsewhere, while its own sessions go on. Once it has held no
   session for ``drain_s`` it retires: it refuses every new session and fails its health checks, so
   Serve stops it (after three failed checks) and schedules a replacement; the policy sees the
   drained replica gone and lowers the target by one, and the replacement, not yet running, is the
   replica Serve stops. No replica that holds a session is ever stopped by scaling.

When load comes back, drained replicas that have not retired are taken off the board first, then
the target rises. The choice of which replica drains is kept up to date: a draining replica that
still holds sessions swaps with a serving one that holds fewer (a session may land on a replica just
before its mark is read). The policy never drains on a guess: while a running replica has not
reported its session count (just started, or its report timed out on a busy host), it scales up
but does not drain. docs/DEPLOYING.md ("Scaling") has the settings and what an operator sees.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from typing import Any, Callable

logger = logging.getLogger("ray.serve")

_NAMESPACE = "lingbot_ray"


class DrainBoard:
    """The replicas of one deployment that are draining (unique replica ids), in Ray's GCS store."""

    def __init__(self, app: str, deployment: str):
        self.key = f"drain/{app}/{deployment}".encode()

    def read(self) -> set[str]:
        from ray.experimental.internal_kv import _internal_kv_get

        value = _internal_kv_get(self.key, namespace=_NAMESPACE)
        return set(json.loads(value)) if value else set()

    def write(self, replicas: set[str]) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, json.dumps(sorted(replicas)).encode(), overwrite=True, namespace=_NAMESPACE)


class SessionSlotPolicy:
    """Serve custom autoscaling policy (a class: Serve builds it once with ``policy_kwargs``)."""

    def __init__(self, slots_per_replica: int, target_free_slots: int = 1):
        if slots_per_replica < 1 or target_free_slots < 0:
            raise ValueError(f"slots_per_replica={slots_per_replica}, target_free_slots={target_free_slots}: need >= 1 and >= 0")
        self.slots_per_replica = slots_per_replica
        self.target_free_slots = target_free_slots
        self._boards: dict[tuple[str, str], DrainBoard] = {}

    def wanted(self, sessions: float, low: int, high: int) -> int:
        needed = math.ceil((sessions + self.target_free_slots) / self.slots_per_replica)
        return max(low, min(high, needed))

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        running = [replica.unique_id for replica in ctx.running_replicas]
        metrics = ctx.raw_metrics or {}
        # a replica's latest report; one with none yet is unknown, never taken for empty
        sessions = {replica.unique_id: float(series[-1].value) for replica, series in metrics.get("sessions", {}).items() if series}
        retired = {replica.unique_id for replica, series in metrics.get("retired", {}).items() if series and series[-1].value}
        known = all(uid in sessions for uid in running)
        marked = set(state.get("draining", ()))
        # replicas marked before and gone now have retired (or died): the target drops by one each,
        # so that Serve stops the replacement it scheduled rather than a replica with sessions
        gone = marked - set(running)
        target = ctx.target_num_replicas - len(gone)
        marked -= gone
        wanted = self.wanted(
            sum(sessions.get(uid, 0.0) for uid in running), ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        )
        if known:
            # a draining replica that holds more sessions than a serving one swaps with it
            for uid in sorted(marked - retired, key=lambda uid: -sessions[uid]):
                emptiest = min((u for u in running if u not in marked), key=lambda u: (sessions[u], u), default=None)
                if emptiest is not None and sessions[emptiest] < sessions[uid]:
                    marked = (marked - {uid}) | {emptiest}
        serving = [uid for uid in running if uid not in marked]
        starting = max(0, target - len(running))
        available = len(serving) + starting
        if wanted > available:
            # undrain the fullest first (not those already retiring), then start more
            for uid in sorted(marked - retired, key=lambda uid: -sessions.get(uid, 0.0))[: wanted - available]:
                marked.discard(uid)
                available += 1
            target += wanted - available
        elif wanted < available and known:
            surplus = available - wanted
            # replicas not running yet hold no session, and Serve stops those first
            cut = min(starting, surplus)
            target -= cut
            surplus -= cut
            marked |= set(sorted(serving, key=lambda uid: (sessions[uid], uid))[:surplus])
        if marked != set(state.get("draining", ())) or gone:
            key = (ctx.app_name or "", ctx.deployment_name)
            board = self._boards.setdefault(key, DrainBoard(*key))
            board.write(marked)
            logger.info(
                "%s: %d session(s) on %d replica(s) want %d; draining %s%s",
                ctx.deployment_name, round(sum(sessions.values())), len(running), wanted, sorted(marked) or "none",
                f"; retired {sorted(gone)}" if gone else "",
            )
        state["draining"] = sorted(marked)
        return target, state


class Drain:
    """A sticky replica's side of the protocol: whether it is draining, and whether it retired.

    :meth:`poll` runs with every routing-stats report (twice a second); retirement is decided there,
    against the replica's own live session count, so a session that arrives while it drains simply
    keeps it alive, and a retired replica takes none."""

    def __init__(self, board: DrainBoard, replica: str, drain_s: float):
        self.board, self.replica, self.drain_s = board, replica, drain_s
        self.draining = False
        self.retired = False
        self._empty_since: float | None = None

    async def poll(self, sessions: Callable[[], int]) -> None:
        """Read the board (off the event loop), then decide against ``sessions()`` as it is now:
        the decision and the replica's ``open_session`` run on the same loop, never interleaved."""
        if self.retired:
            return
        try:
            self.draining = self.replica in await asyncio.to_thread(self.board.read)
        except Exception as exc:  # the GCS is briefly unreachable: keep the last answer
            logger.warning("drain board unreadable (%s); %s keeps its state", exc, self.replica)
        if not self.draining or sessions():
            self._empty_since = None
            return
        now = time.monotonic()
        if self._empty_since is None:
            self._empty_since = now
        if now - self._empty_since >= self.drain_s:
            self.retired = True
            logger.info("%s: drained and empty for %.0f s, retiring (its health check now fails)", self.replica, self.drain_s)
