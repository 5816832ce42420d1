"""Train state: trainable / frozen parameter split, optimizer, learning-rate schedule.

Trainable (as the original's `configure_optimizers`): the whole U-Net, the mapper, `final_ln` and
`proj_out`; the unconditional vector only with `train_uncond_vector` (Paint-by-Sketch never updates
it, a bug it inherited; Paint-by-Example's fixed version does). Frozen: VAE and CLIP vision tower.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

# The CLIP towers (vision for the reference, text for the T+S baseline) are frozen, as in the original.
FROZEN_CONDITIONER = ("clip", "text")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    trainable: Any
    frozen: Any
    opt_state: Any
    ema: Any  # EMA of `trainable`, or None
    # LitEma's `num_updates`: EMA updates so far (one per optimizer step); None without an EMA, so runs
    # without one keep the checkpoint layout they had before this field existed.
    ema_updates: Any = None


def split_params(params: dict[str, Any], train_uncond_vector: bool = False) -> tuple[dict, dict]:
    """Full model params {'unet','vae','conditioner'} → (trainable, frozen) subtrees."""
    cond = dict(params["conditioner"])
    frozen_cond = {k: cond.pop(k) for k in FROZEN_CONDITIONER if k in cond}
    # The text baseline's unconditional context is the frozen encoding of "": never trained.
    if not train_uncond_vector or "text" in frozen_cond:
        frozen_cond["uncond_vector"] = cond.pop("uncond_vector")
    trainable = {"unet": params["unet"], "conditioner": cond}
    frozen = {"vae": params["vae"], "conditioner": frozen_cond}
    return trainable, frozen


def merge_params(trainable: dict[str, Any], frozen: dict[str, Any]) -> dict[str, Any]:
    return {
        "unet": trainable["unet"],
        "vae": frozen["vae"],
        "conditioner": {**frozen["conditioner"], **trainable["conditioner"]},
    }


def learning_rate_schedule(base_lr: float, warmup_steps: int, f_start: float = 1e-6) -> optax.Schedule:
    """The original's `LambdaLinearScheduler` (f_max = f_min = 1): `lr·(f_start + (1−f_start)·n/warmup)`
    for n < warmup, then `lr`."""
    def schedule(count):
        if warmup_steps <= 0:
            return jnp.asarray(base_lr, jnp.float32)
        frac = jnp.minimum(count.astype(jnp.float32) / warmup_steps, 1.0)
        return base_lr * (f_start + (1.0 - f_start) * frac)

    return schedule


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW with torch's defaults except the values in `cfg.optim` (lr 1e-5, wd 0.01, β 0.9/0.999, eps 1e-8),
    optional global-norm clipping and gradient accumulation (`optax.MultiSteps`)."""
    o = cfg.optim
    chain = []
    if o.get("grad_clip_norm"):
        chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(o.lr, o.warmup_steps, o.get("warmup_f_start", 1e-6)),
                             b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    tx = optax.chain(*chain)
    if o.get("grad_accum_steps", 1) > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
    return tx


def create_train_state(params: dict[str, Any], tx: optax.GradientTransformation, train_uncond_vector: bool = False,
                       use_ema: bool = False) -> TrainState:
    trainable, frozen = split_params(params, train_uncond_vector)
    return TrainState(
        step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, opt_state=tx.init(trainable),
        ema=jax.tree_util.tree_map(jnp.array, trainable) if use_ema else None,
        ema_updates=jnp.zeros((), jnp.int32) if use_ema else None,
    )


def lit_ema_update(ema: Any, params: Any, num_updates: jax.Array, decay: float,
                   apply: jax.Array | bool = True) -> tuple[Any, jax.Array]:
    """One update of the original's `LitEma`: `n += 1; d = min(decay, (1 + n) / (10 + n));
    ema -= (1 - d) * (ema - params)`. Returns `(ema, n)`.

    `apply` (a traced bool) leaves both unchanged when False: under gradient accumulation the EMA moves
    once per optimizer step, not per micro-step."""
    n = num_updates + 1
    nf = n.astype(jnp.float32)
    one_minus = 1.0 - jnp.minimum(jnp.float32(decay), (1.0 + nf) / (10.0 + nf))
    new = jax.tree_util.tree_map(lambda e, p: e - one_minus.astype(e.dtype) * (e - p), ema, params)
    if apply is True:
        return new, n
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(apply, a, b), new, ema)
    return new, jnp.where(apply, n, num_updates)


def optimizer_step_taken(old_opt_state: Any, new_opt_state: Any) -> jax.Array | bool:
    """Whether `tx.update` applied an update: always, except for `optax.MultiSteps` micro-steps that only
    accumulate gradients."""
    if isinstance(new_opt_state, optax.MultiStepsState):
        return new_opt_state.gradient_step != old_opt_state.gradient_step
    return True
