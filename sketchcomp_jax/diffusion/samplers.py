"""Samplers (PLMS, DDIM, DPM-Solver++(2M)) with classifier-free guidance and Sketch Plug-and-Drop.

Everything is NHWC. A sampler is a pure function over an ε-function

    eps_fn(x_in, t, context) -> eps
        x_in:    (B', h, w, C_in) with channels [x_t(4), z_masked(4), keep_mask(1), sketch(3)] (C_in = 12),
                 or [x_t(4), z_masked(4), keep_mask(1)] (C_in = 9, Paint-by-Example, `cond.sketch is None`)
        t:       (B',) int32 timesteps
        context: (B', 1, D)
        returns  (B', h, w, 4)

where B' = 2B with classifier-free guidance (one batched call, unconditional half FIRST, as the
original's `cat([uc, c])`) and B' = B without it.

The whole sampling loop runs inside one jitted function (a single `lax.scan`; the ε-function appears
once in the compiled program). Static: sampler kind, number of steps, the sketch drop step, the drop
value, η, whether CFG is on and whether intermediates are returned. Dynamic: x_T, the conditioning,
the guidance scale, the PRNG key and the per-step schedule tables.

How to jit (two ways; both compile once per (shapes, static arguments)):

* `make_sampler(apply_fn, ...)` → a jitted `run(params, x_T, cond, guidance_scale, rng=None)` with
  `apply_fn(params, x_in, t, context)`. Params are a jit *argument* (not baked-in constants): the
  recommended way for real models.
* `sample(eps_fn, x_T, cond, ...)` jits internally with `eps_fn` as a static argument (hashed by
  identity). Pass the SAME `eps_fn` object each call (e.g. build the closure once) or every call
  recompiles; a closure over params embeds them as constants. `sample` may also be called inside the
  caller's own `jax.jit` (e.g. `jax.jit(lambda p, x, c: sample(lambda *a: unet.apply(p, *a), x, c, ...))`),
  in which case params stay traced.

Fidelity notes (checked against the original `ldm/models/diffusion/plms.py` of Paint-by-Sketch and the
`plms_io.npz` goldens):

* Timestep grid (all samplers): `make_ddim_timesteps('uniform')` = `arange(0, 1000, 1000 // N) + 1`,
  visited in reverse. When N does not divide 1000 the grid has `len(grid)` ≠ N entries (e.g. N = 30 →
  31 steps) and the original runs `len(grid)` steps; so do we. Grids that reach t = 1000 are rejected
  (the original indexes out of range).
* `a_t = acp[t]`, `a_prev = [acp[0]] + acp[grid[:-1]]` (the last step ends at acp[0] = 0.99915, not 1).
* Per-step scalars are float32 exactly as the original forms them: √a_t, √(1−a_t), √a_prev,
  √(1 − a_prev − σ²) are float32 square roots of float32 values.
* Sketch Plug-and-Drop: the original computes `stop_step = S − int(S·f)` with S = the number of steps
  actually run and zeroes the sketch IN PLACE when `index = S−1−i < stop_step`, i.e. the sketch is used
  at step i iff `i < int(S·f)`. The in-place write persists, which changes nothing later because
  the dropped set is a suffix; the PLMS first-step second evaluation reads the (possibly already
  zeroed) tensor directly, so it sees whatever step 0 saw. Dropped channels are 0.0 (mid-grey) by
  default, `drop_value=-1.0` is the "no edge" variant. Both CFG halves get the same sketch.
* CFG is skipped exactly when the original skips it: `uncond_context is None` or a Python
  `guidance_scale == 1.0` (then one un-doubled call with the conditional context).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .schedule import NUM_TIMESTEPS, default_alphas_cumprod

Array = jax.Array
EpsFn = Callable[[Array, Array, Array], Array]
SamplerKind = Literal["plms", "ddim", "dpmpp"]
_SAMPLERS = ("plms", "ddim", "dpmpp")


class SamplingCond(NamedTuple):
    """Conditioning bundle (a pytree). All NHWC, batch B equal to x_T's.

    z_masked:       (B, h, w, 4)  masked-image latent (0.18215 · VAE.encode(image · keep_mask)).
    keep_mask:      (B, h, w, 1)  latent-size keep mask (1 = keep, 0 = hole; fractional on edges).
    sketch:         (B, h, w, 3)  latent-size sketch in [-1, 1], or None for the 9-channel PbE model.
    context:        (B, 1, D)     conditional context (proj_out(CLIP(ref))).
    uncond_context: (1, 1, D) or (B, 1, D) unconditional context (`learnable_vector`), broadcast to
                    (B, 1, D); None disables CFG.
    """

    z_masked: Array
    keep_mask: Array
    sketch: Optional[Array]
    context: Array
    uncond_context: Optional[Array] = None


class Intermediates(NamedTuple):
    """Per-step stacks, as the original's `intermediates` with `log_every_t=1`.

    x_inter: (S+1, B, h, w, 4)  [x_T, x after step 0, ..., x after step S-1]
    pred_x0: (S+1, B, h, w, 4)  [x_T, pred_x0 of step 0, ..., of step S-1]
    """

    x_inter: Array
    pred_x0: Array


# ----------------------------------------------------------------------------------------------------
# Host-side (numpy) schedule helpers
# ----------------------------------------------------------------------------------------------------


def ddim_timesteps(num_steps: int, num_train_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """The original's `make_ddim_timesteps('uniform', num_steps, T)`: `arange(0, T, T // N) + 1`,
    ascending int64 (len may exceed N when N does not divide T). Raises where the original would fail."""
    if num_steps < 1 or num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    c = num_train_timesteps // num_steps
    ts = np.arange(0, num_train_timesteps, c, dtype=np.int64) + 1
    if ts[-1] >= num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps}: the uniform grid reaches t={ts[-1]} >= {num_train_timesteps} "
            "(the original indexes alphas_cumprod out of range); choose another step count"
        )
    return ts


def num_sampling_steps(num_steps: int, num_train_timesteps: int = NUM_TIMESTEPS) -> int:
    """Number of steps actually run for a requested `num_steps` (= len of the uniform grid)."""
    return int(ddim_timesteps(num_steps, num_train_timesteps).shape[0])


def sketch_steps(total_steps: int, sketch_drop_after: float) -> int:
    """How many leading steps use the sketch: `int(S · f)` (the original's
    `stop_step = S − int(S·f)`, drop iff `index = S−1−i < stop_step` ⟺ `i ≥ int(S·f)`)."""
    f = float(sketch_drop_after)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"sketch_drop_after must be in [0, 1], got {f}")
    return int(total_steps * f)


def sketch_used_per_step(total_steps: int, sketch_drop_after: float) -> np.ndarray:
    """(S,) bool: whether step i (0 = noisiest) sees the sketch."""
    return np.arange(total_steps) < sketch_steps(total_steps, sketch_drop_after)


def step_tables(
    num_steps: int,
    alphas_cumprod: Optional[np.ndarray] = None,
    eta: float = 0.0,
) -> dict[str, np.ndarray]:
    """Per-step scalars, in VISIT order (step i = 0 is the noisiest), as float32 (S,) arrays
    (`t` is int32), formed the way the original forms them.

    t: timestep of step i; a / a_prev: `ddim_alphas[index]`, `ddim_alphas_prev[index]` with
    index = S−1−i; sqrt_a, sqrt_1ma = √a, √(1−a); sqrt_a_prev; sigma = η·√((1−a_prev)/(1−a)·(1−a/a_prev));
    dir_coef = √(1 − a_prev − σ²); t_next: the PLMS `ts_next` = grid value of step min(i+1, S−1);
    plus the DPM-Solver++(2M) coefficients (see `_dpmpp_tables`).
    """
    acp = default_alphas_cumprod() if alphas_cumprod is None else np.asarray(alphas_cumprod, np.float32)
    T = acp.shape[0]
    ts = ddim_timesteps(num_steps, T)
    S = ts.shape[0]
    a = acp[ts].astype(np.float32)  # ddim_alphas (float32 gather)
    a_prev = np.concatenate([acp[:1], acp[ts[:-1]]]).astype(np.float32)  # ddim_alphas_prev
    sqrt_1ma = np.sqrt(np.float32(1.0) - a)  # np.sqrt(1. - ddim_alphas), float32
    a64, ap64 = a.astype(np.float64), a_prev.astype(np.float64)
    sigma = (float(eta) * np.sqrt((1 - ap64) / (1 - a64) * (1 - a64 / ap64))).astype(np.float32)
    dir_coef = np.sqrt(np.float32(1.0) - a_prev - sigma**2)
    rev = slice(None, None, -1)  # index order -> visit order
    t_rev = ts[rev]
    tables = {
        "t": t_rev.astype(np.int32),
        "t_next": t_rev[np.minimum(np.arange(S) + 1, S - 1)].astype(np.int32),
        "a": a[rev],
        "a_prev": a_prev[rev],
        "sqrt_a": np.sqrt(a)[rev],
        "sqrt_1ma": sqrt_1ma[rev],
        "sqrt_a_prev": np.sqrt(a_prev)[rev],
        "sigma": sigma[rev],
        "dir_coef": dir_coef[rev],
    }
    tables.update(_dpmpp_tables(a[rev], a_prev[rev]))
    return tables


def _dpmpp_tables(a: np.ndarray, a_prev: np.ndarray) -> dict[str, np.ndarray]:
    """DPM-Solver++(2M) coefficients (float64 math, stored float32), visit order.

    Time grid: the same uniform grid as PLMS/DDIM; step i goes from ā = a[i] to ā = a_prev[i] (so the
    last step ends at acp[0], like the original's DDIM/PLMS). With α = √ā, σ = √(1−ā), λ = log(α/σ),
    h_i = λ_{i+1} − λ_i, r_i = h_{i−1}/h_i:
        x_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·(e^{−h_i} − 1)·D_i,
        D_i = x0_i                                                  (first order: i = 0 and i = S−1)
        D_i = (1 + 1/(2 r_i))·x0_i − 1/(2 r_i)·x0_{i−1}              (second order otherwise).
    The first-order step is exactly a DDIM (η = 0) step.
    """
    a64, ap64 = a.astype(np.float64), a_prev.astype(np.float64)
    alpha, sigma = np.sqrt(a64), np.sqrt(1 - a64)
    alpha_n, sigma_n = np.sqrt(ap64), np.sqrt(1 - ap64)
    lam, lam_n = np.log(alpha / sigma), np.log(alpha_n / sigma_n)
    h = lam_n - lam
    S = a.shape[0]
    w_cur = np.ones(S)
    w_prev = np.zeros(S)
    for i in range(1, S - 1):
        r = h[i - 1] / h[i]
        w_cur[i] = 1 + 1 / (2 * r)
        w_prev[i] = -1 / (2 * r)
    return {
        "dpm_cx": (sigma_n / sigma).astype(np.float32),
        "dpm_cd": (-alpha_n * np.expm1(-h)).astype(np.float32),
        "dpm_w_cur": w_cur.astype(np.float32),
        "dpm_w_prev": w_prev.astype(np.float32),
    }


# ----------------------------------------------------------------------------------------------------
# Traced core
# ----------------------------------------------------------------------------------------------------


def _model_input(x: Array, cond: SamplingCond, sketch_on: Any, drop_value: float, n_sketch: int) -> Array:
    """(B,h,w,4) → (B,h,w,9|12) `[x, z_masked, keep_mask, sketch-or-drop_value]`.

    `n_sketch` (static) is how many steps use the sketch: ≥ S means always, 0 never; otherwise the
    traced bool `sketch_on` selects."""
    parts = [x, cond.z_masked.astype(x.dtype), cond.keep_mask.astype(x.dtype)]
    if cond.sketch is not None:
        sk = cond.sketch.astype(x.dtype)
        if n_sketch == 0:
            sk = jnp.full_like(sk, drop_value)
        elif sketch_on is not True:
            sk = jnp.where(sketch_on, sk, jnp.asarray(drop_value, sk.dtype))
        parts.append(sk)
    return jnp.concatenate(parts, axis=-1)


def _guided_eps(
    eps_fn: EpsFn,
    x_in: Array,
    t: Array,
    cond: SamplingCond,
    guidance_scale: Array,
    use_cfg: bool,
) -> Array:
    """One ε evaluation with CFG: ONE eps_fn call on the doubled batch `[uncond, cond]`,
    `eps = eps_u + s·(eps_c − eps_u)`. x_in (B,h,w,C_in), t scalar int32 → (B,h,w,4)."""
    b = x_in.shape[0]
    tb = jnp.full((b,), t, dtype=jnp.int32)
    if not use_cfg:
        return eps_fn(x_in, tb, cond.context)
    uc = jnp.broadcast_to(cond.uncond_context, cond.context.shape).astype(cond.context.dtype)
    out = eps_fn(
        jnp.concatenate([x_in, x_in], axis=0),
        jnp.concatenate([tb, tb], axis=0),
        jnp.concatenate([uc, cond.context], axis=0),
    )
    e_u, e_c = out[:b], out[b:]
    return e_u + guidance_scale * (e_c - e_u)


def _ddim_update(x: Array, e: Array, sqrt_1ma: Array, sqrt_a: Array, sqrt_a_prev: Array, dir_coef: Array):
    """The original's `get_x_prev_and_pred_x0` with σ = 0 (same operation order)."""
    pred_x0 = (x - sqrt_1ma * e) / sqrt_a
    x_prev = sqrt_a_prev * pred_x0 + dir_coef * e
    return x_prev, pred_x0


def _plms_loop(eps_of, x_T, tab, n_steps, emit):
    """PLMS as ONE scan over the S+1 ε evaluations (step 0 evaluates twice).

    Evaluation j: j = 0 → step 0 first ε (DDIM step to the x̃ of t_next); j = 1 → step 0 second ε,
    ε' = (e_t + e_next)/2; j ≥ 2 → step j−1 with Adams–Bashforth on the history of e_t (not ε').
    """
    S = n_steps
    step_of_eval = np.concatenate([[0], np.arange(S)])  # eval j -> step index i
    kind = np.concatenate([[0, 1], 1 + np.minimum(np.arange(1, S), 3)]).astype(np.int32)  # 0..4
    t_eval = jnp.asarray(tab["t"])[step_of_eval].at[1].set(jnp.asarray(tab["t_next"])[0])
    xs = {
        "kind": jnp.asarray(kind),
        "t": t_eval,
        "sketch_on": jnp.asarray(tab["sketch_on"][step_of_eval]),
        **{k: jnp.asarray(tab[k])[step_of_eval] for k in ("sqrt_1ma", "sqrt_a", "sqrt_a_prev", "dir_coef")},
    }
    zeros = jnp.zeros_like(x_T)
    hist0 = jnp.zeros((3,) + x_T.shape, x_T.dtype)

    def body(carry, s):
        x, x_eval, e_first, hist = carry
        e = eps_of(x_eval, s["t"], s["sketch_on"])
        upd = functools.partial(
            _ddim_update, sqrt_1ma=s["sqrt_1ma"], sqrt_a=s["sqrt_a"], sqrt_a_prev=s["sqrt_a_prev"], dir_coef=s["dir_coef"]
        )

        def push(v):
            return jnp.concatenate([v[None], hist[:2]], axis=0)

        def k0():  # first evaluation of step 0: DDIM step to x̃ at t_next
            x_tilde, _ = upd(x, e)
            return x, x_tilde, e, hist, zeros

        def k1():  # pseudo improved Euler
            x_new, p = upd(x, (e_first + e) / 2)
            return x_new, x_new, e_first, push(e_first), p

        def k2():
            x_new, p = upd(x, (3 * e - hist[0]) / 2)
            return x_new, x_new, e_first, push(e), p

        def k3():
            x_new, p = upd(x, (23 * e - 16 * hist[0] + 5 * hist[1]) / 12)
            return x_new, x_new, e_first, push(e), p

        def k4():
            x_new, p = upd(x, (55 * e - 59 * hist[0] + 37 * hist[1] - 9 * hist[2]) / 24)
            return x_new, x_new, e_first, push(e), p

        x, x_eval, e_first, hist, pred = jax.lax.switch(s["kind"], [k0, k1, k2, k3, k4])
        return (x, x_eval, e_first, hist), ((x, pred) if emit else None)

    (x, _, _, _), ys = jax.lax.scan(body, (x_T, x_T, zeros, hist0), xs)
    if not emit:
        return x, None
    xi, pi = ys
    return x, Intermediates(jnp.concatenate([x_T[None], xi[1:]]), jnp.concatenate([x_T[None], pi[1:]]))


def _ddim_loop(eps_of, x_T, tab, n_steps, emit, eta, rng):
    """DDIM: one scan over S steps; σ_i = η·√((1−a_prev)/(1−a)·(1−a/a_prev)), noise from `rng`."""
    xs = {
        k: jnp.asarray(tab[k]) for k in ("t", "sketch_on", "sqrt_1ma", "sqrt_a", "sqrt_a_prev", "dir_coef", "sigma")
    }
    if eta > 0:
        xs["key"] = jax.random.split(rng, n_steps)

    def body(x, s):
        e = eps_of(x, s["t"], s["sketch_on"])
        x_prev, pred_x0 = _ddim_update(x, e, s["sqrt_1ma"], s["sqrt_a"], s["sqrt_a_prev"], s["dir_coef"])
        if eta > 0:
            x_prev = x_prev + s["sigma"] * jax.random.normal(s["key"], x.shape, x.dtype)
        return x_prev, ((x_prev, pred_x0) if emit else None)

    x, ys = jax.lax.scan(body, x_T, xs)
    if not emit:
        return x, None
    return x, Intermediates(jnp.concatenate([x_T[None], ys[0]]), jnp.concatenate([x_T[None], ys[1]]))


def _dpmpp_loop(eps_of, x_T, tab, n_steps, emit):
    """DPM-Solver++(2M), data prediction, multistep; one scan over S steps (see `_dpmpp_tables`)."""
    xs = {
        k: jnp.asarray(tab[k])
        for k in ("t", "sketch_on", "sqrt_1ma", "sqrt_a", "dpm_cx", "dpm_cd", "dpm_w_cur", "dpm_w_prev")
    }

    def body(carry, s):
        x, x0_prev = carry
        e = eps_of(x, s["t"], s["sketch_on"])
        x0 = (x - s["sqrt_1ma"] * e) / s["sqrt_a"]
        d = s["dpm_w_cur"] * x0 + s["dpm_w_prev"] * x0_prev
        x_next = s["dpm_cx"] * x + s["dpm_cd"] * d
        return (x_next, x0), ((x_next, x0) if emit else None)

    (x, _), ys = jax.lax.scan(body, (x_T, jnp.zeros_like(x_T)), xs)
    if not emit:
        return x, None
    return x, Intermediates(jnp.concatenate([x_T[None], ys[0]]), jnp.concatenate([x_T[None], ys[1]]))


def _sample_core(
    eps_fn: EpsFn,
    x_T: Array,
    cond: SamplingCond,
    guidance_scale: Array,
    rng: Optional[Array],
    tables: dict[str, Array],
    *,
    sampler: str,
    n_steps: int,
    n_sketch: int,
    drop_value: float,
    eta: float,
    use_cfg: bool,
    return_intermediates: bool,
):
    """Traceable sampling loop (not jitted). `tables` from `step_tables` (arrays of length S)."""
    tab = dict(tables)
    tab["sketch_on"] = np.arange(n_steps) < n_sketch
    always = n_sketch >= n_steps
    gs = jnp.asarray(guidance_scale, jnp.float32)

    def eps_of(x, t, sketch_on):
        x_in = _model_input(x, cond, True if always else sketch_on, drop_value, n_sketch)
        return _guided_eps(eps_fn, x_in, t, cond, gs, use_cfg).astype(x.dtype)

    if sampler == "plms":
        x, inter = _plms_loop(eps_of, x_T, tab, n_steps, return_intermediates)
    elif sampler == "ddim":
        x, inter = _ddim_loop(eps_of, x_T, tab, n_steps, return_intermediates, eta, rng)
    elif sampler == "dpmpp":
        x, inter = _dpmpp_loop(eps_of, x_T, tab, n_steps, return_intermediates)
    else:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {_SAMPLERS}")
    return (x, inter) if return_intermediates else x


_STATIC = ("sampler", "n_steps", "n_sketch", "drop_value", "eta", "use_cfg", "return_intermediates")
_sample_jit = jax.jit(_sample_core, static_argnums=(0,), static_argnames=_STATIC)


def _check_args(sampler: str, eta: float, rng: Optional[Array], check_rng: bool = True) -> None:
    if sampler not in _SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {_SAMPLERS}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and sampler != "ddim":
        raise ValueError(f"eta > 0 is only supported by the DDIM sampler (the original PLMS raises), got {sampler!r}")
    if check_rng and eta > 0 and rng is None:
        raise ValueError("eta > 0 needs a PRNG key `rng`")


@functools.lru_cache(maxsize=64)
def _default_tables(num_steps: int, eta: float) -> dict[str, np.ndarray]:
    return step_tables(num_steps, None, eta)


def _tables_for(num_steps: int, alphas_cumprod: Optional[np.ndarray], eta: float) -> dict[str, np.ndarray]:
    if alphas_cumprod is None:
        return _default_tables(int(num_steps), float(eta))
    return step_tables(num_steps, np.asarray(alphas_cumprod), eta)


def sample(
    eps_fn: EpsFn,
    x_T: Array,
    cond: SamplingCond,
    *,
    sampler: SamplerKind = "plms",
    num_steps: int,
    guidance_scale: float | Array,
    sketch_drop_after: float = 1.0,
    drop_value: float = 0.0,
    eta: float = 0.0,
    rng: Optional[Array] = None,
    alphas_cumprod: Optional[np.ndarray] = None,
    return_intermediates: bool = False,
) -> Array | tuple[Array, Intermediates]:
    """Sample a latent from x_T (B, h, w, 4) → x_0 (B, h, w, 4).

    sampler: 'plms' (the original's sampler, S+1 ε evaluations), 'ddim' (η ≥ 0; η > 0 needs `rng`) or
    'dpmpp' (DPM-Solver++(2M), S evaluations, for ~20 steps). All use the uniform grid of `ddim_timesteps`.
    guidance_scale: Python float or scalar array (dynamic; a Python 1.0 skips the unconditional half, as
    the original does). sketch_drop_after f ∈ [0,1]: the sketch is used at step i iff i < int(S·f);
    afterwards its channels are `drop_value` (0.0 as the original; −1.0 = "no edge" variant).
    alphas_cumprod: (1000,) float32 numpy (host) array; None = the released schedule.
    Returns x_0, or (x_0, Intermediates) with `return_intermediates`.

    Jitted internally with `eps_fn` static (hashed by identity): reuse the same eps_fn object to avoid
    recompiles. Also traceable inside a caller's jit (see the module docstring).
    """
    _check_args(sampler, eta, rng)
    tables = _tables_for(num_steps, alphas_cumprod, eta)
    n_steps = int(tables["t"].shape[0])
    use_cfg = cond.uncond_context is not None and not (
        isinstance(guidance_scale, (int, float)) and float(guidance_scale) == 1.0
    )
    return _sample_jit(
        eps_fn,
        x_T,
        cond,
        guidance_scale,
        rng,
        tables,
        sampler=sampler,
        n_steps=n_steps,
        n_sketch=sketch_steps(n_steps, sketch_drop_after),
        drop_value=float(drop_value),
        eta=float(eta),
        use_cfg=use_cfg,
        return_intermediates=bool(return_intermediates),
    )


def make_sampler(
    apply_fn: Callable[[Any, Array, Array, Array], Array],
    *,
    sampler: SamplerKind = "plms",
    num_steps: int,
    sketch_drop_after: float = 1.0,
    drop_value: float = 0.0,
    eta: float = 0.0,
    use_cfg: bool = True,
    alphas_cumprod: Optional[np.ndarray] = None,
    return_intermediates: bool = False,
) -> Callable[..., Array | tuple[Array, Intermediates]]:
    """Build a jitted `run(params, x_T, cond, guidance_scale, rng=None)` for
    `apply_fn(params, x_in, t, context) -> eps` (e.g. `unet.apply`).

    All settings here are static (fixed per sampler object); params, x_T, cond, guidance_scale and rng
    are jit arguments, so the program compiles once per input shapes. With `use_cfg=False` the
    unconditional half is never evaluated (the original's behaviour at guidance 1.0) and guidance_scale
    is ignored. Semantics as in `sample`.
    """
    _check_args(sampler, eta, None, check_rng=False)
    tables = _tables_for(num_steps, alphas_cumprod, eta)
    n_steps = int(tables["t"].shape[0])
    n_sketch = sketch_steps(n_steps, sketch_drop_after)

    def run(params: Any, x_T: Array, cond: SamplingCond, guidance_scale: float | Array = 1.0, rng: Optional[Array] = None):
        if eta > 0 and rng is None:
            raise ValueError("eta > 0 needs a PRNG key `rng`")
        if use_cfg and cond.uncond_context is None:
            raise ValueError("use_cfg=True needs cond.uncond_context")
        return _sample_core(
            lambda x_in, t, c: apply_fn(params, x_in, t, c),
            x_T,
            cond,
            guidance_scale,
            rng,
            tables,
            sampler=sampler,
            n_steps=n_steps,
            n_sketch=n_sketch,
            drop_value=float(drop_value),
            eta=float(eta),
            use_cfg=use_cfg,
            return_intermediates=return_intermediates,
        )

    return jax.jit(run)
