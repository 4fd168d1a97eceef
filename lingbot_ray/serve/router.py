"""Sticky, capacity-aware request routing for the stages that hold per-session state.

Contract (for the DiTGroup and VAEDecoder deployments):

* Every call for a session carries ``handle.options(session_id=sid)``; the ingress sets it, since
  Serve does not pass it on by itself.
* ``open_session`` for an unknown ``sid`` goes to the replica with the most free session slots.
  Load is the larger of what the replica last reported through ``record_routing_stats`` (keys
  ``sessions`` and ``capacity``) and what this router itself has placed there, so a burst of opens
  from one ingress does not pile onto one replica between two stats reports. Replicas are tried in
  that order; the replica enforces its capacity itself and raises ``CapacityError`` when full, which
  is the authoritative refusal (close 1013). An open is counted on its first choice as soon as it is
  chosen, so opens routed at the same moment spread over the replicas.
* Every later call for a known ``sid`` goes to the replica that opened it and nowhere else. If that
  replica is gone, the call goes to any live replica, which does not know the session and raises
  ``SessionLost``: the session fails fast instead of hanging.
* ``close_session`` forgets the ``sid`` once routed.
* Calls without a session id go to the least-loaded replicas.

All calls of one session come from the one ingress replica that holds its WebSocket, hence through
one router instance: the session map needs no sharing between processes.
"""

from __future__ import annotations

import logging

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

logger = logging.getLogger("ray.serve")

OPEN_METHOD = "open_session"
CLOSE_METHOD = "close_session"


class SessionRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._session_replica: dict[str, ReplicaID] = {}

    def _placed_on(self, replica_id: ReplicaID) -> int:
        return sum(1 for placed in self._session_replica.values() if placed == replica_id)

    def _free_slots(self, replica: RunningReplica) -> float:
        stats = replica.routing_stats or {}
        # no report yet: a fresh replica is assumed empty, less what this router placed there
        capacity = stats.get("capacity", float("inf"))
        return capacity - max(int(stats.get("sessions", 0)), self._placed_on(replica.replica_id))

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Ray retries a request no replica took (all at max_ongoing_requests) at once, without
            # yielding its event loop, unless the policy asks for backoff: without this the router
            # thread spins and starves every handle of the process.
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        if pending_request is None or not pending_request.metadata.session_id:
            return [candidate_replicas]
        sid = pending_request.metadata.session_id
        placed = self._session_replica.get(sid)
        if placed is not None:
            for replica in candidate_replicas:
                if replica.replica_id == placed:
                    return [[replica]]
            logger.warning("session %s: its replica %s is gone; the call will fail fast", sid, placed)
            return [candidate_replicas]
        ranked = sorted(
            candidate_replicas, key=lambda r: (-self._free_slots(r), self._placed_on(r.replica_id), r.replica_id.unique_id)
        )
        if pending_request.metadata.call_method == OPEN_METHOD:
            # Counted on its first choice at once, so that opens routed at the same moment spread
            # instead of all picking the emptiest replica; on_request_routed records where it went.
            self._session_replica[sid] = ranked[0].replica_id
        return [[replica] for replica in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        sid = pending_request.metadata.session_id
        if not sid:
            return
        method = pending_request.metadata.call_method
        if method == OPEN_METHOD:
            self._session_replica[sid] = replica_id
        elif method == CLOSE_METHOD:
            self._session_replica.pop(sid, None)
