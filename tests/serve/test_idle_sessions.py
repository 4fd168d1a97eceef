"""Stage replicas release sessions nobody touches any more (an ingress that died cannot close them)."""

import asyncio

from lingbot_ray.engine.hosts import SessionHost
from lingbot_ray.serve.deployments import _StageReplica


class _State:
    released = False

    def release(self):
        self.released = True


def _replica(capacity: int, idle_timeout_s: float) -> _StageReplica:
    replica = _StageReplica(capacity=capacity, idle_timeout_s=idle_timeout_s)
    replica.host = SessionHost()
    return replica


async def _start(replica: _StageReplica, sid: str, state: _State) -> None:
    """What a stage's start_session does around its model work (here: no model)."""
    replica._check_held(sid)
    replica.host.sessions[sid] = state
    await replica._started(sid)


def test_idle_sessions_are_released_and_active_ones_kept():
    replica = _replica(capacity=2, idle_timeout_s=0.3)

    async def scenario():
        live, orphan = _State(), _State()
        for sid, state in (("live", live), ("orphan", orphan)):
            await replica.open_session(sid)
            await _start(replica, sid, state)
        for _ in range(12):  # 1.2 s: the live session keeps being used, the orphan does not
            await asyncio.sleep(0.1)
            replica._session("live")
        return live, orphan

    live, orphan = asyncio.run(scenario())
    assert orphan.released and "orphan" not in replica.host
    assert not live.released and "live" in replica.host
    assert asyncio.run(replica.record_routing_stats()) == {"sessions": 1, "capacity": 2}


def test_slots_are_reserved_before_model_work_and_closes_win_races():
    """A full replica refuses at the reservation; a close that overtakes a start frees the slot and
    the late start releases what it built; a reservation after its close is refused."""
    import pytest

    from lingbot_ray.protocol import CapacityError, SessionLost

    replica = _replica(capacity=1, idle_timeout_s=60)

    async def scenario():
        await replica.open_session("a")
        with pytest.raises(CapacityError, match="1/1"):
            await replica.open_session("b")
        assert await replica.record_routing_stats() == {"sessions": 1, "capacity": 1}
        late = _State()
        replica._check_held("a")  # a's start begins its model work ...
        await replica.close_session("a")  # ... and the close overtakes it
        replica.host.sessions["a"] = late
        with pytest.raises(SessionLost, match="while it started"):
            await replica._started("a")
        with pytest.raises(SessionLost, match="already closed"):
            await replica.open_session("a")
        await replica.open_session("b")
        return late

    late = asyncio.run(scenario())
    assert late.released and replica.held == {"b"} and not replica.host.sessions
