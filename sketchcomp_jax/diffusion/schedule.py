"""The DDPM noise schedule of the original LDM code (`ddpm.py: register_schedule`).

The original uses `beta_schedule="linear"`, which in LDM naming is the *scaled-linear* schedule:
`betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2`, computed in float64 and registered as float32
buffers. Every buffer here is computed in float64 numpy with the original's formulas and cast to float32
at the end, exactly as `to_torch = partial(torch.tensor, dtype=torch.float32)` does.

Check values (SPEC 3.1): `alphas_cumprod[0] = 0.99915`, `[981] = 0.0057755`, `[999] = 0.0046601`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

LINEAR_START = 0.00085
LINEAR_END = 0.012
NUM_TIMESTEPS = 1000

#: The 12 buffers `register_schedule` registers, in the original's registration order.
SCHEDULE_KEYS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _torch_linspace_f64(start: float, end: float, steps: int) -> np.ndarray:
    """float64 `torch.linspace(start, end, steps)`.

    PyTorch fills the first half forward from `start` and the second half backward from `end`
    (`start + i·step` for `i < steps // 2`, else `end − (steps − 1 − i)·step`), which can differ from
    `np.linspace` in the last float64 bit. Reproduced so the float32 buffers come out bit-identical.
    """
    if steps == 1:
        return np.array([start], dtype=np.float64)
    step = (end - start) / (steps - 1)
    i = np.arange(steps, dtype=np.float64)
    half = steps // 2
    return np.where(np.arange(steps) < half, start + i * step, end - (steps - 1 - i) * step)


def make_beta_schedule(
    schedule: str = "linear",
    n_timestep: int = NUM_TIMESTEPS,
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
) -> np.ndarray:
    """Betas (n_timestep,) float64, as the original's `make_beta_schedule`.

    Only `"linear"` (LDM's name for scaled-linear: `linspace(sqrt(start), sqrt(end), n)**2`) is used by
    Paint-by-Example / Paint-by-Sketch; `"scaled_linear"` is accepted as an alias and
    `"linear_plain"` gives `linspace(start, end, n)` for experiments.
    """
    if schedule in ("linear", "scaled_linear"):
        return _torch_linspace_f64(linear_start**0.5, linear_end**0.5, n_timestep) ** 2
    if schedule == "linear_plain":
        return _torch_linspace_f64(linear_start, linear_end, n_timestep)
    raise ValueError(f"unsupported beta schedule {schedule!r}")


def make_schedule(
    schedule: str = "linear",
    n_timestep: int = NUM_TIMESTEPS,
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
    v_posterior: float = 0.0,
) -> dict[str, np.ndarray]:
    """The 12 DDPM buffers of `register_schedule` as a dict of float32 numpy arrays, each (n_timestep,).

    Formulas (float64, then cast to float32), with `a = 1 − β`, `ā = cumprod(a)`, `ā_prev = [1, ā[:-1]]`:
      sqrt_alphas_cumprod = √ā; sqrt_one_minus_alphas_cumprod = √(1−ā); log_one_minus_alphas_cumprod = log(1−ā);
      sqrt_recip_alphas_cumprod = √(1/ā); sqrt_recipm1_alphas_cumprod = √(1/ā − 1);
      posterior_variance = (1−v)·β·(1−ā_prev)/(1−ā) + v·β;
      posterior_log_variance_clipped = log(max(posterior_variance, 1e−20));
      posterior_mean_coef1 = β·√ā_prev/(1−ā); posterior_mean_coef2 = (1−ā_prev)·√a/(1−ā).
    """
    betas = make_beta_schedule(schedule, n_timestep, linear_start, linear_end)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    out64 = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    return {k: out64[k].astype(np.float32) for k in SCHEDULE_KEYS}


@functools.lru_cache(maxsize=1)
def schedule_for(config) -> dict[str, np.ndarray]:
    """`make_schedule` for a model's `ScheduleConfig` (its `beta_schedule`, `timesteps`, `linear_start`,
    `linear_end`): the buffers every consumer of a model (sampling, training, export) must agree on."""
    return make_schedule(config.beta_schedule, config.timesteps, config.linear_start, config.linear_end)


def _default_schedule() -> dict[str, np.ndarray]:
    sched = make_schedule()
    for v in sched.values():
        v.setflags(write=False)
    return sched


def default_alphas_cumprod() -> np.ndarray:
    """`alphas_cumprod` (1000,) float32 of the released configs (cached, read-only)."""
    return _default_schedule()["alphas_cumprod"]


def q_sample(
    x0: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    alphas_cumprod: jax.Array | np.ndarray | Mapping[str, np.ndarray] | None = None,
) -> jax.Array:
    """Forward diffusion `x_t = √ā_t · x0 + √(1−ā_t) · ε` (the original's `q_sample`).

    x0, noise: (B, H, W, C) NHWC; t: (B,) int timesteps in [0, T). `alphas_cumprod` is either
    * a schedule dict from `make_schedule` (or None = the default schedule): the float32 buffers
      `sqrt_alphas_cumprod` / `sqrt_one_minus_alphas_cumprod` are gathered, exactly as the original, or
    * a (T,) `alphas_cumprod` array: √ā_t and √(1−ā_t) are computed in float32 from it (may differ from
      the registered buffers by 1 ulp).
    Returns (B, H, W, C) in x0's dtype.
    """
    if alphas_cumprod is None:
        alphas_cumprod = _default_schedule()
    if isinstance(alphas_cumprod, Mapping):
        sa = jnp.asarray(alphas_cumprod["sqrt_alphas_cumprod"], jnp.float32)[t]
        s1 = jnp.asarray(alphas_cumprod["sqrt_one_minus_alphas_cumprod"], jnp.float32)[t]
    else:
        acp = jnp.asarray(alphas_cumprod, dtype=jnp.float32)[t]
        sa, s1 = jnp.sqrt(acp), jnp.sqrt(1.0 - acp)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return (sa.reshape(shape) * x0 + s1.reshape(shape) * noise).astype(x0.dtype)
