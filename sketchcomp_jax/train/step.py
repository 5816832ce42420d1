"""The sharded, jitted train step (one program: VAE encode → q_sample → U-Net → ε-MSE → AdamW).

Randomness is `fold_in(PRNGKey(seed), step)`, so a resumed run draws exactly what an uninterrupted
run draws. The step is compiled ahead of time with explicit in/out shardings and a donated state.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sketchcomp_jax.models.config import ModelConfig, Networks
from sketchcomp_jax.parallel.mesh import BATCH_AXES
from sketchcomp_jax.parallel.partitioning import gather_constraint, param_shardings
from sketchcomp_jax.train.loss import diffusion_loss
from sketchcomp_jax.train.state import TrainState, lit_ema_update, merge_params, optimizer_step_taken

log = logging.getLogger(__name__)


def gather_tree(tree: Any, gather: NamedSharding | Callable[[Any], Any] | None) -> Any:
    """`tree` constrained (inside a jitted program) to `gather`: a sharding for every leaf, a function of the
    tree (`partitioning.gather_constraint`), or None for no constraint. FSDP uses it so XLA all-gathers
    weights instead of re-partitioning activations to match sharded weights."""
    if gather is None:
        return tree
    if callable(gather):
        return gather(tree)
    return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, gather), tree)


def make_step_fn(nets: Networks, model_config: ModelConfig, tx: optax.GradientTransformation,
                 alphas_cumprod: jax.Array, seed: int, uncond_prob: float = 0.2, per_sample_uncond: bool = False,
                 ema_decay: float = 0.9999, gather_params: NamedSharding | Callable[[Any], Any] | None = None,
                 ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """`gather_params` (FSDP): a sharding (usually replicated) the parameters are constrained to for the
    forward/backward pass, so XLA all-gathers weights and keeps activations batch-sharded instead of
    re-partitioning activations to match sharded weights; gradients are reduce-scattered back. With tensor
    parallelism it is a function of a params subtree (`partitioning.gather_constraint`) that gathers the fsdp
    axis only, keeping each leaf's tensor split."""
    base_key = jax.random.PRNGKey(seed)
    gathered = functools.partial(gather_tree, gather=gather_params)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(base_key, state.step)

        def loss_of(trainable):
            params = merge_params(gathered(trainable), gathered(state.frozen))
            return diffusion_loss(params, batch, rng, nets, model_config,
                                  alphas_cumprod, uncond_prob, per_sample_uncond)

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ema, ema_updates = state.ema, state.ema_updates
        if ema is not None:  # LitEma: warm-up decay, once per optimizer step
            ema, ema_updates = lit_ema_update(ema, trainable, ema_updates, ema_decay,
                                              optimizer_step_taken(state.opt_state, opt_state))
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, ema=ema,
                                  ema_updates=ema_updates)
        return new_state, metrics

    return step


@dataclasses.dataclass
class CompiledStep:
    fn: Any  # compiled executable: (state, batch) -> (state, metrics)
    state_shardings: Any
    batch_sharding: NamedSharding
    flops: float | None
    memory: dict[str, int]


def state_shardings_for(abstract_state: TrainState, mesh: Mesh, strategy: str, min_size: int = 2**14,
                        rules=None) -> TrainState:
    """Shardings for every leaf of the state: parameters by name (`partitioning`, user `rules` first); the EMA
    and every optimizer subtree that mirrors the trainable tree (Adam moments, MultiSteps' accumulated
    gradients) follow the trainable parameters; everything else (step, counts) is replicated."""
    trainable = param_shardings(abstract_state.trainable, mesh, strategy, min_size, rules)
    frozen = param_shardings(abstract_state.frozen, mesh, strategy, min_size, rules)
    replicated = NamedSharding(mesh, P())
    params_def = jax.tree_util.tree_structure(abstract_state.trainable)

    def mirrors(x) -> bool:
        return jax.tree_util.tree_structure(x) == params_def

    opt_state = jax.tree_util.tree_map(lambda x: trainable if mirrors(x) else replicated,
                                       abstract_state.opt_state, is_leaf=mirrors)
    return jax.tree_util.tree_map(lambda _: replicated, abstract_state).replace(
        trainable=trainable, frozen=frozen, opt_state=opt_state,
        ema=None if abstract_state.ema is None else trainable)


def step_gather(mesh: Mesh, strategy: str, min_size: int = 2**14, rules=None):
    """`make_step_fn`'s `gather_params` for a strategy: None for `dp`; for `fsdp` everything replicated, or with
    a `tensor` axis > 1 a per-leaf constraint that gathers the fsdp axis only (tensor-parallel weights stay split)."""
    if strategy != "fsdp":
        return None
    if mesh.shape.get("tensor", 1) == 1:
        return NamedSharding(mesh, P())
    return gather_constraint(mesh, min_size, rules)


def compile_step(step_fn, abstract_state: TrainState, mesh: Mesh,
                 global_batch_shapes: dict[str, tuple | jax.ShapeDtypeStruct], strategy: str = "dp",
                 fsdp_min_size: int = 2**14, rules=None) -> CompiledStep:
    """AOT-compiles `step_fn` for the mesh: `jax.jit(...).lower(...).compile()`. Logs FLOPs and memory.

    `global_batch_shapes`: per batch key a shape (float32) or a `jax.ShapeDtypeStruct` (e.g. int32 tokens).
    `rules`: extra sharding rules (config `mesh.rules`, see parallel/partitioning.py) tried before the defaults."""
    state_sh = state_shardings_for(abstract_state, mesh, strategy, fsdp_min_size, rules)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    batch_shardings = {k: batch_sh for k in global_batch_shapes}
    metrics_sh = NamedSharding(mesh, P())
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_shardings), out_shardings=(state_sh, metrics_sh),
                     donate_argnums=(0,))
    abstract_batch = {
        k: jax.ShapeDtypeStruct(getattr(spec, "shape", spec), getattr(spec, "dtype", jnp.float32), sharding=batch_sh)
        for k, spec in global_batch_shapes.items()
    }
    abstract_state = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, state_sh
    )
    # Under the mesh: splash attention shard_maps over its batch axes, and `auto` attention reads the
    # target platform (e.g. TPU devices of an AOT topology on a CPU host) from it.
    with jax.set_mesh(mesh):
        compiled = jitted.lower(abstract_state, abstract_batch).compile()
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # cost analysis is best-effort on some backends
        pass
    memory = {}
    try:
        mem = compiled.memory_analysis()
        for name in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                     "generated_code_size_in_bytes", "alias_size_in_bytes"):
            memory[name] = int(getattr(mem, name, 0) or 0)
    except Exception:
        pass
    log.info("compiled train step: %s FLOPs/step, memory per device %s", f"{flops:.3g}" if flops else "?", memory)
    return CompiledStep(compiled, state_sh, batch_sh, flops, memory)
