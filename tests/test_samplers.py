"""Noise schedule and samplers: schedule buffers vs the original's, PLMS parity with `plms_io.npz` by
replaying the recorded U-Net outputs, Sketch Plug-and-Drop, CFG batching, jit/recompile behaviour and
convergence of DDIM / DPM-Solver++ on an analytic ε."""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.experimental import io_callback
from safetensors.numpy import load_file

from sketchcomp_jax.diffusion.samplers import (
    Intermediates,
    SamplingCond,
    ddim_timesteps,
    make_sampler,
    num_sampling_steps,
    sample,
    sketch_steps,
    sketch_used_per_step,
    step_tables,
)
from sketchcomp_jax.diffusion.schedule import (
    SCHEDULE_KEYS,
    default_alphas_cumprod,
    make_schedule,
    q_sample,
)


def nhwc(a: np.ndarray) -> np.ndarray:
    """(..., C, H, W) → (..., H, W, C)."""
    return np.moveaxis(np.asarray(a), -3, -1)


@pytest.fixture(scope="module")
def plms_io(fixtures_dir):
    with np.load(fixtures_dir / "plms_io.npz") as d:
        return {k: d[k] for k in d.files}


# ----------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------


def test_schedule_check_values():
    acp = make_schedule()["alphas_cumprod"]
    assert acp.dtype == np.float32 and acp.shape == (1000,)
    np.testing.assert_allclose(acp[[0, 981, 999]], [0.99915, 0.0057755, 0.0046601], rtol=2e-5)
    assert np.array_equal(default_alphas_cumprod(), acp)


def test_schedule_buffers_equal_original(fixtures_dir):
    """All 12 `register_schedule` buffers are bit-identical to those stored in the original checkpoint."""
    ckpt = load_file(str(fixtures_dir / "pbs_tiny.safetensors"))
    sched = make_schedule()
    assert tuple(sched) == SCHEDULE_KEYS
    for k in SCHEDULE_KEYS:
        assert sched[k].dtype == np.float32, k
        np.testing.assert_array_equal(sched[k], ckpt[k], err_msg=k)


def test_q_sample():
    sched = make_schedule()
    x0 = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 4))
    noise = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 4, 4))
    t = jnp.array([0, 500, 999], jnp.int32)
    got = np.asarray(q_sample(x0, t, noise, sched))
    sa, s1 = sched["sqrt_alphas_cumprod"][[0, 500, 999]], sched["sqrt_one_minus_alphas_cumprod"][[0, 500, 999]]
    want = sa[:, None, None, None] * np.asarray(x0) + s1[:, None, None, None] * np.asarray(noise)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(q_sample(x0, t, noise)), got, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(q_sample(x0, t, noise, sched["alphas_cumprod"])), got, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Grid and plug-and-drop rule
# ----------------------------------------------------------------------------------------------------


def test_step_tables_match_original(plms_io):
    tab = step_tables(10)
    np.testing.assert_array_equal(ddim_timesteps(10), plms_io["drop_ddim_timesteps"])
    np.testing.assert_array_equal(tab["t"], plms_io["drop_time_range"])
    # the fixture's tables are indexed by `index` = S-1-i, ours by visit order i
    np.testing.assert_array_equal(tab["a"][::-1], plms_io["drop_ddim_alphas"])
    np.testing.assert_array_equal(tab["a_prev"][::-1], plms_io["drop_ddim_alphas_prev"])
    np.testing.assert_array_equal(tab["sqrt_1ma"][::-1], plms_io["drop_ddim_sqrt_one_minus_alphas"])
    np.testing.assert_array_equal(tab["sigma"], 0)
    t50 = ddim_timesteps(50)
    assert t50[0] == 1 and t50[-1] == 981 and len(t50) == 50
    assert step_tables(50)["a_prev"][-1] == np.float32(0.99915)  # last step ends at acp[0], not 1
    assert num_sampling_steps(30) == 31  # the original's uniform grid for non-divisors
    with pytest.raises(ValueError):
        ddim_timesteps(3)  # grid reaches t = 1000


@pytest.mark.parametrize("S", [10, 50, 31])
@pytest.mark.parametrize("f", [0.0, 0.25, 0.5, 0.55, 0.75, 1.0])
def test_sketch_rule_equals_original(S, f):
    """`i < int(S·f)` ⟺ NOT (index < stop_step) with index = S−1−i, stop_step = S − int(S·f)."""
    stop_step = S - int(S * f)
    original_used = np.array([not ((S - 1 - i) < stop_step) for i in range(S)])
    np.testing.assert_array_equal(sketch_used_per_step(S, f), original_used)
    if S == 50:
        assert sketch_steps(50, f) == {0.0: 0, 0.25: 12, 0.5: 25, 0.55: 27, 0.75: 37, 1.0: 50}[f]


# ----------------------------------------------------------------------------------------------------
# Replay / recording eps functions
# ----------------------------------------------------------------------------------------------------


class Recorder:
    """An ε-function whose output comes from Python (`out_fn(call_index, x_in, t, ctx)`), recording every
    call's inputs; ordered `io_callback`, so it works inside the jitted scan."""

    def __init__(self, out_fn):
        self.out_fn = out_fn
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def _cb(self, x, t, c):
        k = len(self.calls)
        self.calls.append((np.asarray(x), np.asarray(t), np.asarray(c)))
        return np.asarray(self.out_fn(k, np.asarray(x), np.asarray(t), np.asarray(c)), np.float32)

    def __call__(self, x_in, t, ctx):
        shape = jax.ShapeDtypeStruct(x_in.shape[:3] + (4,), jnp.float32)
        return io_callback(self._cb, shape, x_in, t, ctx, ordered=True)

    def apply(self, params, x_in, t, ctx):  # the `make_sampler` signature
        return self(x_in, t, ctx)

    def stack(self, i):
        return np.stack([c[i] for c in self.calls])


def fixture_cond(d) -> SamplingCond:
    return SamplingCond(
        z_masked=nhwc(d["drop_z_inpaint"]),
        keep_mask=nhwc(d["drop_mask_latent"]),
        sketch=nhwc(d["drop_sketch_latent"]),
        context=d["drop_c"],
        uncond_context=d["drop_uc"],
    )


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize("entry", ["sample", "make_sampler"])
@pytest.mark.parametrize("run", ["drop", "keep"])
def test_plms_parity_replay(plms_io, run, entry):
    """PLMS with the recorded U-Net outputs replayed: every U-Net input, timestep, context and the
    whole trajectory match the original sampler's."""
    d = plms_io
    eps_raw = d[f"{run}_call_eps_raw"]
    rec = Recorder(lambda k, x, t, c: nhwc(eps_raw[k]))
    f = float(d["not_use_sketch_after"] if run == "drop" else d["not_use_sketch_after_b"])
    kw = dict(sampler="plms", num_steps=int(d["ddim_steps"]), sketch_drop_after=f, return_intermediates=True)
    gs = float(d["guidance_scale"])
    if entry == "sample":
        x0, inter = sample(rec, nhwc(d["x_T"]), fixture_cond(d), guidance_scale=gs, **kw)
    else:
        x0, inter = make_sampler(rec.apply, **kw)(None, nhwc(d["x_T"]), fixture_cond(d), gs)
    assert isinstance(inter, Intermediates)

    assert len(rec.calls) == 11
    # (b) timesteps and context order [uc, c]
    np.testing.assert_array_equal(rec.stack(1), d[f"{run}_call_t"])
    np.testing.assert_array_equal(rec.stack(2), d[f"{run}_call_context"])
    # (a) every U-Net input, including the sketch channels being exactly zero from the drop on
    x_in, want_x_in = rec.stack(0), nhwc(d[f"{run}_call_x_in"])
    assert x_in.shape == want_x_in.shape == (11, 2, 16, 16, 12)
    for k in range(11):
        assert rel_err(x_in[k], want_x_in[k]) < 1e-5, k
        np.testing.assert_array_equal(x_in[k, ..., 4:], want_x_in[k, ..., 4:])  # conditioning channels exact
    sketch_used = np.any(x_in[..., 9:] != 0, axis=(1, 2, 3, 4))
    np.testing.assert_array_equal(sketch_used, d[f"{run}_call_sketch_used"])
    # (c) trajectory
    assert rel_err(inter.x_inter, nhwc(d[f"{run}_x_inter"])) < 1e-5
    assert rel_err(inter.pred_x0, nhwc(d[f"{run}_pred_x0"])) < 1e-5
    for k in range(11):
        assert rel_err(inter.pred_x0[k], nhwc(d[f"{run}_pred_x0"][k])) < 1e-5, k
    assert rel_err(x0, nhwc(d[f"{run}_x0"])) < 1e-5
    np.testing.assert_array_equal(np.asarray(inter.x_inter[-1]), np.asarray(x0))


def test_drop_matters_in_replay(plms_io):
    """Sanity check of the replay: the two goldens differ by far more than the parity tolerance."""
    d = plms_io
    assert np.abs(d["drop_x0"] - d["keep_x0"]).max() > 0.05


# ----------------------------------------------------------------------------------------------------
# Plug-and-drop edge cases, 9-channel model, CFG batching
# ----------------------------------------------------------------------------------------------------


def small_cond(B=2, h=4, w=4, D=8, sketch=True, seed=0, uc_batch=1):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    return SamplingCond(
        z_masked=jax.random.normal(ks[0], (B, h, w, 4)),
        keep_mask=jnp.round(jax.random.uniform(ks[1], (B, h, w, 1))),
        sketch=jnp.sign(jax.random.normal(ks[2], (B, h, w, 3))) if sketch else None,
        context=jax.random.normal(ks[3], (B, 1, D)),
        uncond_context=jax.random.normal(ks[4], (uc_batch, 1, D)),
    )


def small_eps(k, x, t, c):
    return 0.1 * x[..., :4] + 0.01 * c.mean() + 0.001 * x[..., 4:8]


@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpmpp"])
@pytest.mark.parametrize("f,drop_value", [(0.0, 0.0), (1.0, 0.0), (0.5, -1.0), (0.3, 0.0)])
def test_sketch_drop_edge_cases(sampler, f, drop_value):
    N = 10
    cond = small_cond()
    rec = Recorder(small_eps)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4))
    sample(rec, x_T, cond, sampler=sampler, num_steps=N, guidance_scale=3.0, sketch_drop_after=f, drop_value=drop_value)
    x_in = rec.stack(0)
    n_evals = N + 1 if sampler == "plms" else N
    assert x_in.shape == (n_evals, 4, 4, 4, 12)
    k = int(N * f)
    step_of_eval = np.concatenate([[0], np.arange(N)]) if sampler == "plms" else np.arange(N)
    sketch2 = np.concatenate([np.asarray(cond.sketch)] * 2)
    for j, i in enumerate(step_of_eval):
        if i < k:
            np.testing.assert_array_equal(x_in[j, ..., 9:], sketch2)
        else:
            np.testing.assert_array_equal(x_in[j, ..., 9:], drop_value)
        # mask and masked-image channels are never dropped; both CFG halves identical
        np.testing.assert_array_equal(x_in[j, ..., 4:8], np.concatenate([np.asarray(cond.z_masked)] * 2))
        np.testing.assert_array_equal(x_in[j, :2], x_in[j, 2:])


@pytest.mark.parametrize("sampler", ["plms", "ddim", "dpmpp"])
def test_sketch_none_nine_channels(sampler):
    cond = small_cond(sketch=False)
    rec = Recorder(small_eps)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 4, 4))
    x0 = sample(rec, x_T, cond, sampler=sampler, num_steps=5, guidance_scale=2.0, sketch_drop_after=0.4)
    assert rec.stack(0).shape[-1] == 9 and np.isfinite(np.asarray(x0)).all()


def test_cfg_batching_and_scale_one():
    B = 2
    cond = small_cond(B=B, uc_batch=1)
    rec = Recorder(small_eps)
    x_T = jax.random.normal(jax.random.PRNGKey(3), (B, 4, 4, 4))
    sample(rec, x_T, cond, sampler="ddim", num_steps=4, guidance_scale=7.5)
    ctx = rec.stack(2)
    assert ctx.shape == (4, 2 * B, 1, 8)
    np.testing.assert_array_equal(ctx[:, :B], np.broadcast_to(np.asarray(cond.uncond_context), (4, B, 1, 8)))
    np.testing.assert_array_equal(ctx[:, B:], np.broadcast_to(np.asarray(cond.context), (4, B, 1, 8)))
    # guidance 1.0 (Python number) or no uncond context: one un-doubled call, like the original
    for gs, c in ((1.0, cond), (4.0, cond._replace(uncond_context=None))):
        rec1 = Recorder(small_eps)
        sample(rec1, x_T, c, sampler="ddim", num_steps=4, guidance_scale=gs)
        assert rec1.stack(0).shape[1] == B
        np.testing.assert_array_equal(rec1.stack(2)[:, :], np.broadcast_to(np.asarray(cond.context), (4, B, 1, 8)))


def test_cfg_combination():
    """eps = eps_u + s (eps_c − eps_u): with eps_u ≡ 0 and eps_c ≡ 1, DDIM's first pred_x0 uses ε = s."""
    B = 1
    cond = small_cond(B=B)._replace(
        context=jnp.ones((B, 1, 8)), uncond_context=jnp.zeros((1, 1, 8))
    )

    def eps_fn(x, t, c):
        return jnp.broadcast_to(c[:, :, :1, None], x.shape[:3] + (4,)).astype(x.dtype)

    x_T = jnp.zeros((B, 4, 4, 4))
    s = 3.0
    _, inter = sample(eps_fn, x_T, cond, sampler="ddim", num_steps=10, guidance_scale=s, return_intermediates=True)
    tab = step_tables(10)
    np.testing.assert_allclose(np.asarray(inter.pred_x0[1]), -tab["sqrt_1ma"][0] * s / tab["sqrt_a"][0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Jit: one compile per (shapes, static args)
# ----------------------------------------------------------------------------------------------------

TRACES = {"n": 0}


def counting_eps(x_in, t, ctx):
    TRACES["n"] += 1
    return 0.1 * x_in[..., :4] + 0.01 * jnp.mean(ctx) + 0.001 * t[:, None, None, None].astype(x_in.dtype) / 1000


def test_no_recompile_same_shapes():
    x1 = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 4))
    kw = dict(sampler="plms", num_steps=10)
    out1 = sample(counting_eps, x1, small_cond(seed=1), guidance_scale=5.0, sketch_drop_after=0.5, **kw)
    n1 = TRACES["n"]
    assert n1 >= 1
    # different values (inputs, conditioning, guidance scale, an f with the same int(S·f)): no retrace
    out2 = sample(counting_eps, x2, small_cond(seed=2), guidance_scale=6.5, sketch_drop_after=0.55, **kw)
    assert TRACES["n"] == n1
    assert not np.allclose(np.asarray(out1), np.asarray(out2))
    # a different drop step is a different program
    sample(counting_eps, x2, small_cond(seed=2), guidance_scale=6.5, sketch_drop_after=0.7, **kw)
    n2 = TRACES["n"]
    assert n2 > n1
    sample(counting_eps, x1, small_cond(seed=3), guidance_scale=2.0, sketch_drop_after=0.7, **kw)
    assert TRACES["n"] == n2
    # the eps_fn is evaluated once per traced program (the loop is a scan, not unrolled)
    assert n2 - n1 == n1


def test_make_sampler_compiles_once():
    calls = {"n": 0}

    def apply_fn(params, x_in, t, ctx):
        calls["n"] += 1
        return params["w"] * x_in[..., :4] + 0.01 * jnp.mean(ctx)

    run = make_sampler(apply_fn, sampler="dpmpp", num_steps=20, sketch_drop_after=0.5)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
    a = run({"w": jnp.float32(0.1)}, x, small_cond(seed=1), 5.0)
    n = calls["n"]
    b = run({"w": jnp.float32(0.2)}, x + 1, small_cond(seed=2), 4.0)
    assert calls["n"] == n == 1
    assert not np.allclose(np.asarray(a), np.asarray(b))
    # same program through `sample` with the same closure gives the same numbers
    eps = lambda x_in, t, c: apply_fn({"w": jnp.float32(0.1)}, x_in, t, c)  # noqa: E731
    ref = sample(eps, x, small_cond(seed=1), sampler="dpmpp", num_steps=20, guidance_scale=5.0, sketch_drop_after=0.5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_sample_inside_outer_jit():
    def apply_fn(params, x_in, t, ctx):
        return params * x_in[..., :4]

    @jax.jit
    def outer(p, x, cond):
        return sample(lambda *a: apply_fn(p, *a), x, cond, sampler="plms", num_steps=5, guidance_scale=3.0)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))
    got = outer(jnp.float32(0.1), x, small_cond())
    want = make_sampler(apply_fn, sampler="plms", num_steps=5)(jnp.float32(0.1), x, small_cond(), 3.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Convergence on an analytic ε (Gaussian data) with a closed-form probability-flow ODE
# ----------------------------------------------------------------------------------------------------

MU, VAR = 0.5, 1.0  # data x0 ~ N(MU, VAR) per element
_ACP = jnp.asarray(default_alphas_cumprod())


def gaussian_eps(x_in, t, ctx):
    """Exact ε(x_t) = E[ε | x_t] for x0 ~ N(MU, VAR): √(1−ā)(x − √ā·MU)/(ā·VAR + 1 − ā)."""
    a = _ACP[t][:, None, None, None]
    x = x_in[..., :4]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MU) / (a * VAR + 1 - a)


def ode_target(x_T: np.ndarray, num_steps: int) -> np.ndarray:
    """The PF-ODE keeps z = (x − √ā·MU)/√(ā·VAR + 1 − ā) constant; integrate from the grid's first
    timestep to ā = acp[0] (where the samplers end)."""
    acp = default_alphas_cumprod().astype(np.float64)
    a_T, a_0 = acp[ddim_timesteps(num_steps)[-1]], acp[0]
    z = (np.asarray(x_T, np.float64) - np.sqrt(a_T) * MU) / np.sqrt(a_T * VAR + 1 - a_T)
    return np.sqrt(a_0) * MU + np.sqrt(a_0 * VAR + 1 - a_0) * z


@pytest.fixture(scope="module")
def toy():
    x_T = jax.random.normal(jax.random.PRNGKey(7), (2, 8, 8, 4))
    cond = small_cond(B=2, h=8, w=8)

    def err(sampler, n):
        x = sample(gaussian_eps, x_T, cond, sampler=sampler, num_steps=n, guidance_scale=4.0)
        return float(np.abs(np.asarray(x, np.float64) - ode_target(x_T, n)).max())

    return err


def test_ddim_converges(toy):
    errs = [toy("ddim", n) for n in (10, 20, 50, 100, 200)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.03, errs
    assert errs[0] / errs[-1] > 10  # first order: error ∝ 1/N


def test_dpmpp_20_steps_at_least_as_accurate_as_ddim(toy):
    e_dpm, e_ddim = toy("dpmpp", 20), toy("ddim", 20)
    assert e_dpm <= e_ddim, (e_dpm, e_ddim)
    assert toy("dpmpp", 100) < 0.25 * toy("ddim", 100)  # higher order


def test_plms_converges(toy):
    assert toy("plms", 20) < 0.02 and toy("plms", 50) < 0.005


def test_ddim_eta():
    x_T = jax.random.normal(jax.random.PRNGKey(7), (2, 4, 4, 4))
    cond = small_cond()
    kw = dict(sampler="ddim", num_steps=10, guidance_scale=2.0, eta=1.0)
    with pytest.raises(ValueError):
        sample(gaussian_eps, x_T, cond, **kw)
    a = sample(gaussian_eps, x_T, cond, rng=jax.random.PRNGKey(0), **kw)
    b = sample(gaussian_eps, x_T, cond, rng=jax.random.PRNGKey(0), **kw)
    c = sample(gaussian_eps, x_T, cond, rng=jax.random.PRNGKey(1), **kw)
    d0 = sample(gaussian_eps, x_T, cond, **{**kw, "eta": 0.0})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert not np.allclose(np.asarray(a), np.asarray(d0))
    tab = step_tables(10, eta=1.0)
    a_t, a_p = tab["a"].astype(np.float64), tab["a_prev"].astype(np.float64)
    np.testing.assert_allclose(tab["sigma"], np.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)), rtol=1e-6)
    with pytest.raises(ValueError):
        sample(gaussian_eps, x_T, cond, sampler="plms", num_steps=10, guidance_scale=2.0, eta=0.5, rng=jax.random.PRNGKey(0))


def test_non_divisor_steps_and_bad_args():
    x_T = jax.random.normal(jax.random.PRNGKey(7), (1, 4, 4, 4))
    cond = small_cond(B=1)
    x, inter = sample(gaussian_eps, x_T, cond, sampler="plms", num_steps=30, guidance_scale=2.0, return_intermediates=True)
    assert inter.x_inter.shape == (32, 1, 4, 4, 4)
    with pytest.raises(ValueError):
        sample(gaussian_eps, x_T, cond, sampler="euler", num_steps=10, guidance_scale=2.0)
    with pytest.raises(ValueError):
        sample(gaussian_eps, x_T, cond, sampler="plms", num_steps=10, guidance_scale=2.0, sketch_drop_after=1.5)
