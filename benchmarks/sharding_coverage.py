"""Replicated fraction of parameter bytes of the FULL-size model under FSDP, at pod sizes, without devices.

The tree is the trainable + frozen parameters as the TrainState holds them (SD-v1 U-Net 12 ch, SD VAE,
CLIP ViT-L/14 and the mapper; Adam moments and the EMA follow the trainable parameters, so they have the same
fraction), built abstractly with `jax.eval_shape`. "Replicated" means: not split N ways over the fsdp axis
(held whole, or only partly split, on every device). The old rule (a leaf is split along its largest dimension
divisible by N, else replicated) is the anchor; ours are the name rules of sketchcomp_jax/parallel/partitioning.py.

    python benchmarks/sharding_coverage.py [--fsdp 8 64 256] [--tensor 1] [--min_size 16384]

Prints a table (per fsdp size: replicated fraction old/new, parameter GiB per device old/new and the ideal
total/N), and last the JSON line of docs/benchmarks.md for the largest fsdp size: unit "fraction"
(replicated bytes / all parameter bytes), anchor = the old rule's fraction, speedup = old/new.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_result  # noqa: E402

GIB = 2**30


def old_rule_replicated(tree, fsdp: int, min_size: int) -> tuple[int, int]:
    """(replicated bytes, per-device bytes) under the previous rule: the largest dimension divisible by N, or
    replicated."""
    import jax
    import numpy as np

    replicated = per_device = 0
    for x in jax.tree_util.tree_leaves(tree):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        sharded = math.prod(x.shape) >= min_size and any(n % fsdp == 0 for n in x.shape)
        replicated += 0 if sharded else nbytes
        per_device += nbytes // fsdp if sharded else nbytes
    return replicated, per_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdp", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--min_size", type=int, default=2**14, help="mesh.fsdp_min_size (elements)")
    args = parser.parse_args()
    if any(n < 1 for n in args.fsdp) or args.tensor < 1:
        parser.error("--fsdp and --tensor sizes must be >= 1")
    import jax
    import ml_collections

    from sketchcomp_jax.models.config import ModelConfig
    from sketchcomp_jax.parallel.partitioning import replicated_bytes
    from sketchcomp_jax.train.state import create_train_state, make_optimizer
    from sketchcomp_jax.weights.convert import abstract_params

    tx = make_optimizer(ml_collections.ConfigDict({"optim": dict(lr=1e-5, warmup_steps=1, b1=0.9, b2=0.999,
                                                                 eps=1e-8, weight_decay=0.01)}))
    state = jax.eval_shape(lambda p: create_train_state(p, tx), abstract_params(ModelConfig()))
    tree = (state.trainable, state.frozen)
    print(f"full-size parameters (trainable + frozen), min_size {args.min_size}, tensor {args.tensor}")
    print(f"{'fsdp':>6} {'old replicated':>15} {'new replicated':>15} {'old GiB/dev':>12} {'new GiB/dev':>12}"
          f" {'ideal GiB/dev':>14}")
    result = None
    for n in args.fsdp:
        old_rep, old_dev = old_rule_replicated(tree, n, args.min_size)
        new_rep, total, new_dev = replicated_bytes(tree, n, args.tensor, args.min_size)
        print(f"{n:>6} {old_rep / total:>15.4%} {new_rep / total:>15.4%} {old_dev / GIB:>12.4f} {new_dev / GIB:>12.4f}"
              f" {total / n / args.tensor / GIB:>14.4f}")
        result = (n, new_rep / total, old_rep / total)
    n, ours, anchor = result
    parts = {"U-Net": state.trainable["unet"], "VAE": state.frozen["vae"],
             "conditioner (CLIP + mapper)": (state.trainable["conditioner"], state.frozen["conditioner"])}
    for name, part in parts.items():
        old_rep, _ = old_rule_replicated(part, n, args.min_size)
        new_rep, total, _ = replicated_bytes(part, n, args.tensor, args.min_size)
        print(f"  fsdp={n} {name}: {total / GIB:.3f} GiB, replicated old {old_rep / total:.4%}, new {new_rep / total:.4%}")
    print_result("sharding_coverage", "fraction", ours, anchor,
                 f"old rule (largest dimension divisible by fsdp, else replicated) at fsdp={n}",
                 digits=6, speedup_digits=1)


if __name__ == "__main__":
    main()
