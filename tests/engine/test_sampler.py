import pytest
import torch

from lingbot_ray.engine.sampler import DMDSampler, V1_SHIFT, V1_TIMESTEP_INDICES


def test_default_is_v1_schedule_at_shift_10():
    sampler = DMDSampler()
    assert sampler.timestep_indices == V1_TIMESTEP_INDICES == (0, 179, 358, 679)
    assert sampler.shift == V1_SHIFT == 10.0


@pytest.mark.parametrize(
    "shift, expected, tol",
    [
        # docs/MODEL.md, "Timesteps": s = 10 -> [1000, 978.7, 947.2, 825.4]; s = 5 -> [1000, 958, 900, 703]
        (10.0, [1000.0, 978.7, 947.2, 825.4], 0.05),
        (5.0, [1000.0, 958.0, 900.0, 703.0], 0.5),
    ],
)
def test_timesteps_match_model_md(shift, expected, tol):
    plan = DMDSampler(shift=shift).schedule()
    assert plan.timesteps == pytest.approx(expected, abs=tol)
    assert plan.sigmas == pytest.approx([t / 1000 for t in plan.timesteps])


def test_default_timesteps_are_the_reference_servers_floats():
    # SGLang-diffusion's LingBot World pipeline (lingbot_world_causal_dmd_pipeline.py with the
    # Self-Forcing flow-match scheduler, sigma_min 0 and an extra step, shift 10) feeds the model
    # t = 1000 * sigma' on the grid sigma = 1 - idx / 1000: 1000, 978.66, 947.18, 825.41.
    plan = DMDSampler().schedule()
    assert DMDSampler().timestep_format == "float"
    assert plan.timesteps == pytest.approx([1000.0, 978.6625, 947.1821, 825.4050], abs=1e-4)


def test_int_timestep_format_is_the_authors_schedule():
    # The authors' offline script (robbyant lingbot-world, wan/image2video_fast.py) takes
    # scheduler.timesteps[[0, 179, 358, 679]] of Wan's FlowUniPCMultistepScheduler set to 1000
    # steps at shift 10: grid sigma = 0.999 * (1 - idx / 1000), timesteps cast to int64 (truncated),
    # sigmas kept as floats.
    plan = DMDSampler(timestep_format="int").schedule()
    assert plan.timesteps == (999.0, 978.0, 947.0, 825.0)
    assert plan.sigmas == pytest.approx([0.9998999, 0.9785458, 0.9470422, 0.8251926], abs=1e-6)
    assert all(t <= 1000 * s < t + 1 for t, s in zip(plan.timesteps, plan.sigmas))
    noise = torch.randn(1, 2, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    _, seen, _ = _record_inputs(DMDSampler(timestep_format="int"), seed=1, noise=noise)
    assert [t for _, t in seen] == [999.0, 978.0, 947.0, 825.0]


def test_v2_indices_at_shift_5():
    plan = DMDSampler(timestep_indices=(0, 250, 500, 750), shift=5.0).schedule()
    # sigma' = 5s / (1 + 4s) for s = 1, .75, .5, .25
    assert plan.timesteps == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)


def test_step_count_rule_spaces_indices_evenly_over_the_same_range():
    sampler = DMDSampler()
    assert sampler.indices_for(4) == (0, 179, 358, 679)
    assert sampler.indices_for(None) == (0, 179, 358, 679)
    assert sampler.indices_for(1) == (0,)
    assert sampler.indices_for(2) == (0, 679)
    assert sampler.indices_for(3) == (0, 340, 679)
    assert sampler.indices_for(6) == (0, 136, 272, 407, 543, 679)
    assert sampler.schedule(1).timesteps == (1000.0,)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(timestep_indices=()), "timestep_indices"),
        (dict(timestep_indices=(0, 500, 400)), "timestep_indices"),
        (dict(timestep_indices=(0, 1000)), "timestep_indices"),
        (dict(shift=0.0), "shift"),
        (dict(num_train_timesteps=0), "num_train_timesteps"),
        (dict(timestep_format="round"), "timestep_format"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DMDSampler(**kwargs)


def test_bad_step_count_names_the_field():
    with pytest.raises(ValueError, match="num_inference_steps"):
        DMDSampler().indices_for(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        DMDSampler(timestep_indices=(0, 2)).indices_for(4)


def _record_inputs(sampler, seed, noise, steps=None):
    seen = []

    def flow(x_t, t):
        seen.append((x_t.clone(), t))
        return 0.5 * x_t  # any deterministic function of x_t

    generator = torch.Generator().manual_seed(seed)
    out = sampler.sample(flow, noise, generator=generator, num_inference_steps=steps)
    return out, seen, generator


def test_sample_follows_the_dmd_update_with_session_noise():
    sampler = DMDSampler()
    noise = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(123))
    out, seen, _ = _record_inputs(sampler, seed=7, noise=noise)
    plan = sampler.schedule()
    assert [t for _, t in seen] == list(plan.timesteps)

    # Rebuild the trajectory by hand: x0 = x_t - sigma v; x = (1 - s') x0 + s' eps, eps from the
    # session generator in draw order.
    replay = torch.Generator().manual_seed(7)
    x = noise
    for step, sigma in enumerate(plan.sigmas):
        assert torch.equal(seen[step][0], x)
        x0 = x - sigma * (0.5 * x)
        if step + 1 < len(plan.sigmas):
            eps = torch.randn(x.shape, generator=replay)
            x = (1 - plan.sigmas[step + 1]) * x0 + plan.sigmas[step + 1] * eps
    assert torch.allclose(out, x0)


def test_renoising_draws_from_the_session_generator():
    sampler = DMDSampler()
    noise = torch.randn(1, 4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    out_a, seen_a, gen_a = _record_inputs(sampler, 11, noise)
    out_b, seen_b, gen_b = _record_inputs(sampler, 11, noise)
    out_c, seen_c, _ = _record_inputs(sampler, 12, noise)
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(seen_a, seen_b))
    # step 0 sees the same pure noise; the re-noised inputs differ with the seed
    assert torch.equal(seen_a[0][0], seen_c[0][0])
    assert not torch.equal(seen_a[1][0], seen_c[1][0])
    assert not torch.equal(out_a, out_c)
    # the generator advanced by exactly (steps - 1) draws
    assert torch.equal(gen_a.get_state(), gen_b.get_state())
    fresh = torch.Generator().manual_seed(11)
    for _ in range(3):
        torch.randn(noise.shape, generator=fresh)
    assert torch.equal(gen_a.get_state(), fresh.get_state())


def test_one_step_returns_the_first_clean_estimate_without_drawing_noise():
    sampler = DMDSampler()
    noise = torch.randn(1, 2, 1, 2, 2)
    out, seen, gen = _record_inputs(sampler, 3, noise, steps=1)
    assert len(seen) == 1 and seen[0][1] == 1000.0
    assert torch.allclose(out, noise - 1.0 * 0.5 * noise)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(3).get_state())
