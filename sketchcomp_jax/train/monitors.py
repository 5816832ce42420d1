"""What the training loop computes besides the step: the eval loss and the sample grid.

Both are jitted ONCE per run over the training mesh, with the train state's own shardings as inputs
and a replicated output, so they work for any sharding (DP, FSDP, many hosts): every process runs the
same program on the same step (they are collectives) and reads the replicated result locally; only
process 0 writes it. Nothing here calls `jax.device_get` on an array that spans other processes.
"""
from __future__ import annotations

import logging
import time
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sketchcomp_jax.generation import BatchGenerator
from sketchcomp_jax.models.config import ModelConfig, Networks
from sketchcomp_jax.parallel.mesh import barrier, replicate
from sketchcomp_jax.train.loss import diffusion_loss
from sketchcomp_jax.train.state import TrainState, merge_params
from sketchcomp_jax.train.step import gather_tree

log = logging.getLogger(__name__)


def _compile_once(jitted, args, what: str):
    """AOT-compiles `jitted` for `args` (the run keeps the executable: one compile per run, whatever the
    jit cache does), then waits for every process, whose compile may have taken longer (cache misses)."""
    t0 = time.time()
    compiled = jitted.lower(*args).compile()
    log.info("compiled the %s program: %.1f s", what, time.time() - t0)
    barrier(f"sketchcomp: {what} compiled")
    return compiled


class EvalLoss:
    """`eval_loss(state, global_batches)` → mean ε-MSE (float) over the batches, with fixed noise per batch
    index (`PRNGKey(1000 + i)`) and no conditioning dropout, so values are comparable across steps."""

    def __init__(self, nets: Networks, model_config: ModelConfig, alphas_cumprod: jax.Array, mesh: Mesh,
                 state_shardings: TrainState, batch_sharding: NamedSharding, gather: NamedSharding | None = None):
        self._mesh = mesh
        replicated = NamedSharding(mesh, P())

        def loss_of(trainable, frozen, batch, index):
            params = merge_params(gather_tree(trainable, gather), gather_tree(frozen, gather))
            key = jax.random.PRNGKey(1000 + index)
            return diffusion_loss(params, batch, key, nets, model_config, alphas_cumprod, 0.0)[0]

        self._jit = jax.jit(loss_of, in_shardings=(state_shardings.trainable, state_shardings.frozen,
                                                    batch_sharding, replicated), out_shardings=replicated)
        self.compiled = None

    def __call__(self, state: TrainState, global_batches) -> float:
        losses = []
        for i, batch in enumerate(global_batches):
            args = (state.trainable, state.frozen, batch, replicate(self._mesh, np.int32(i)))
            if self.compiled is None:
                self.compiled = _compile_once(self._jit, args, "eval loss")
            losses.append(self.compiled(*args))
        # the loss is replicated: reading it needs only this process's copy
        return float(np.mean([float(x) for x in losses])) if losses else float("nan")


class SampleGrid:
    """`grid(state, batch)` → (H, W, 3) uint8, the same on every process: rows of source | mask | sketch |
    reference | result for the first ≤ 4 images of `batch` (a host batch that every process loaded
    identically), sampled with `generator`'s settings and fixed noise (seed 0, ids 0..n-1)."""

    def __init__(self, generator: BatchGenerator, model_config: ModelConfig, mesh: Mesh, state_shardings: TrainState,
                 gather: NamedSharding | None = None, seed: int = 0):
        self._config = model_config
        self._mesh = mesh
        replicated = NamedSharding(mesh, P())

        def program(trainable, frozen, inputs, ids):
            params = merge_params(gather_tree(trainable, gather), gather_tree(frozen, gather))
            base = jax.random.PRNGKey(seed)
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)
            return generator.images(params, inputs, keys)

        self._jit = jax.jit(program, in_shardings=(state_shardings.trainable, state_shardings.frozen, replicated,
                                                   replicated), out_shardings=replicated)
        self.compiled = None

    def __call__(self, state: TrainState, batch: dict) -> np.ndarray:
        n = min(4, batch["gt"].shape[0])
        keys = ("gt", "keep_mask", "sketch", self._config.conditioning_input)
        small = {k: np.asarray(batch[k][:n]) for k in keys}
        args = (state.trainable, state.frozen, replicate(self._mesh, small),
                replicate(self._mesh, np.arange(n, dtype=np.uint32)))
        if self.compiled is None:
            self.compiled = _compile_once(self._jit, args, "sample grid")
        result = self.compiled(*args)
        return grid_image(self._config, small, np.asarray(result))


def grid_image(model_config: ModelConfig, batch: dict[str, np.ndarray], result: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 grid: one row per image of source | mask | sketch | reference | `result` ((B, R, R, 3)
    in [0, 1]); the reference is un-normalised from CLIP's statistics and resized to R (grey for text runs)."""
    from PIL import Image

    from sketchcomp_jax.models.clip_vision import CLIP_MEAN, CLIP_STD

    n, r = result.shape[0], model_config.resolution
    to01 = lambda a: np.clip((np.asarray(a) + 1) / 2, 0, 1)  # noqa: E731
    if "reference" in batch:
        ref01 = np.clip(batch["reference"] * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN), 0, 1)
        ref01 = np.stack([np.asarray(Image.fromarray((x * 255).astype(np.uint8)).resize((r, r))) / 255.0
                          for x in ref01])
    else:  # the text baseline has no reference picture
        ref01 = np.full((n, r, r, 3), 0.5)
    columns = [to01(batch["gt"]), np.repeat(batch["keep_mask"], 3, -1), to01(batch["sketch"]), ref01, result]
    grid = np.concatenate([np.concatenate(list(col), axis=0) for col in columns], axis=1)
    return (grid * 255).astype(np.uint8)


def save_png(path, image: np.ndarray) -> None:
    """Writes an (H, W, 3) uint8 image, making the parent directory."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: PIL would open a gs:// path as a local file name
        Image.fromarray(image).save(f, format="PNG")
