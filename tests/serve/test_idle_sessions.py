"""Stage replicas release sessions nobody touches any more (an ingress that died cannot close them)."""

import asyncio

from lingbot_ray.serve.deployments import _StageReplica


class _State:
    released = False

    def release(self):
        self.released = True


def test_idle_sessions_are_released_and_active_ones_kept():
    replica = _StageReplica(capacity=2, idle_timeout_s=0.3)

    async def scenario():
        live, orphan = _State(), _State()
        for sid, state in (("live", live), ("orphan", orphan)):
            replica._admit(sid, "stage")
            replica.sessions[sid] = state
            replica._touch(sid)
        for _ in range(12):  # 1.2 s: the live session keeps being used, the orphan does not
            await asyncio.sleep(0.1)
            replica._session("live")
        return live, orphan

    live, orphan = asyncio.run(scenario())
    assert orphan.released and "orphan" not in replica.sessions
    assert not live.released and "live" in replica.sessions
    assert replica.record_routing_stats() == {"sessions": 1, "capacity": 2}
