"""Our PLMS / DDIM against diffusers' PNDMScheduler / DDIMScheduler, step by step, on an analytic ε.

The original's PLMS equals `PNDMScheduler(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)`
with the scaled-linear betas (SPEC §4.2); DDIM with η = 0 equals `DDIMScheduler(steps_offset=1,
set_alpha_to_one=False, clip_sample=False)`. Tolerance 1e-5 relative (float32 on both sides).
"""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sketchcomp_jax.diffusion.samplers import SamplingCond, sample

SCHEDULER_KW = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, set_alpha_to_one=False)


def eps_torch(x, t):
    return torch.sin(0.7 * x + float(t) / 1000.0) * 0.9


def eps_jax(x_in, t, context):
    x = x_in[..., :4]
    return jnp.sin(0.7 * x + t.astype(jnp.float32)[:, None, None, None] / 1000.0) * 0.9


def reference_loop(scheduler, x_T, steps):
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    trajectory = []
    for t in scheduler.timesteps:
        x = scheduler.step(eps_torch(x, t), t, x).prev_sample
        trajectory.append(x.numpy().transpose(0, 2, 3, 1))
    return trajectory


def ours(x_T, steps, sampler):
    b, h, w, _ = x_T.shape
    cond = SamplingCond(z_masked=jnp.zeros((b, h, w, 4)), keep_mask=jnp.ones((b, h, w, 1)), sketch=None,
                        context=jnp.zeros((b, 1, 8)), uncond_context=None)
    x0, inter = sample(eps_jax, jnp.asarray(x_T), cond, sampler=sampler, num_steps=steps, guidance_scale=1.0,
                       return_intermediates=True)
    return np.asarray(x0), np.asarray(inter.x_inter)


@pytest.mark.parametrize("steps", [10, 50])
def test_plms_equals_pndm_skip_prk(steps):
    from diffusers import PNDMScheduler

    x_T = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ref = reference_loop(PNDMScheduler(skip_prk_steps=True, **SCHEDULER_KW), x_T, steps)
    x0, inter = ours(x_T, steps, "plms")
    # diffusers repeats the second timestep: its call k+1 finishes our step k (k ≥ 1); call 0 is only
    # the first ε evaluation of the improved-Euler step.
    assert len(ref) == steps + 1
    for k in range(1, steps):
        scale = np.abs(ref[k + 1]).max()
        assert np.abs(inter[k + 1] - ref[k + 1]).max() <= 1e-5 * scale, k
    assert np.abs(x0 - ref[-1]).max() <= 1e-5 * np.abs(ref[-1]).max()


@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_equals_diffusers_ddim(steps):
    from diffusers import DDIMScheduler

    x_T = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    ref = reference_loop(DDIMScheduler(clip_sample=False, **SCHEDULER_KW), x_T, steps)
    x0, inter = ours(x_T, steps, "ddim")
    for k in range(steps):
        assert np.abs(inter[k + 1] - ref[k]).max() <= 1e-5 * np.abs(ref[k]).max(), k
