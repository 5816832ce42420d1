"""Memory per device of the FULL-size Paint-by-Sketch train step (SD-v1 U-Net 12 ch, SD VAE, CLIP ViT-L/14,
512², 8 images per device), AOT-compiled on 8 simulated CPU devices for DP and for FSDP.

Nothing is allocated: the state is abstract (`jax.eval_shape`) and `memory_analysis()` of the compiled
program gives argument + temp bytes per device. Last line: {"benchmark": "memory_fsdp", "unit": "bytes",
"ours": FSDP bytes/device, "anchor": 16 GiB (a TPU v5e chip), "anchor_name": ..., "speedup": anchor/ours}.

    python benchmarks/memory_fsdp.py [--quick] [--per_device_batch 8] [--remat/--noremat] [--dtype bfloat16]

`--quick` uses 256² and 1 image per device (the compile still takes minutes on 2 CPU cores).

It also prints the U-Net activations saved for the backward pass per image, with and without remat, from
the traced program (backend-independent): on the CPU backend the compiled temporaries do not shrink with remat,
so this is the figure that shows what remat saves.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_result  # noqa: E402

GIB = 2**30


def saved_activation_bytes(nets_by_remat: dict, config, params) -> dict[bool, int]:
    """Bytes of the U-Net residuals (values kept from forward to backward, parameters excluded) for one image."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax._src.ad_checkpoint import saved_residuals  # the data behind jax.ad_checkpoint.print_saved_residuals

    latent = config.latent_size
    x = jax.ShapeDtypeStruct((1, latent, latent, config.unet.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, 1, config.unet.context_dim), jnp.float32)
    out = {}
    for remat, nets in nets_by_remat.items():
        def loss(p, x, t, c, unet=nets.unet):
            return jnp.mean(unet.apply({"params": p}, x, t, c).astype(jnp.float32) ** 2)
        residuals = saved_residuals(loss, params["unet"], x, t, ctx)
        out[remat] = int(sum(np.prod(aval.shape) * aval.dtype.itemsize for aval, where in residuals
                             if "from the argument" not in where))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--per_device_batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import ml_collections
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sketchcomp_jax.diffusion.schedule import make_schedule
    from sketchcomp_jax.models.config import ModelConfig, build_networks
    from sketchcomp_jax.parallel.mesh import make_mesh
    from sketchcomp_jax.train.state import create_train_state, make_optimizer
    from sketchcomp_jax.train.step import compile_step, make_step_fn
    from sketchcomp_jax.weights.convert import abstract_params

    resolution = 256 if args.quick else args.resolution
    per_device = 1 if args.quick else args.per_device_batch
    config = ModelConfig(resolution=resolution)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    nets = build_networks(config, dtype=dtype, remat=args.remat)
    cfg = ml_collections.ConfigDict({"optim": dict(lr=1e-5, warmup_steps=10000, b1=0.9, b2=0.999, eps=1e-8,
                                                   weight_decay=0.01)})
    tx = make_optimizer(cfg)
    acp = jnp.asarray(make_schedule()["alphas_cumprod"])
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx), abstract_params(config))
    n = jax.device_count()
    batch = per_device * n
    shapes = {"gt": (batch, resolution, resolution, 3), "keep_mask": (batch, resolution, resolution, 1),
              "sketch": (batch, resolution, resolution, 3), "reference": (batch, 224, 224, 3)}
    results = {}
    for strategy, ici in (("dp", {"data": -1}), ("fsdp", {"fsdp": -1})):
        mesh = make_mesh(ici)
        gather = NamedSharding(mesh, P()) if strategy == "fsdp" else None
        step_fn = make_step_fn(nets, config, tx, acp, 0, gather_params=gather)
        t0 = time.time()
        compiled = compile_step(step_fn, abstract_state, mesh, shapes, strategy)
        mem = compiled.memory
        per_device_bytes = mem.get("argument_size_in_bytes", 0) + mem.get("temp_size_in_bytes", 0)
        results[strategy] = per_device_bytes
        print(f"{strategy:5s} compile {time.time() - t0:6.1f} s  args {mem.get('argument_size_in_bytes', 0) / GIB:6.2f} GiB"
              f"  temp {mem.get('temp_size_in_bytes', 0) / GIB:6.2f} GiB  total {per_device_bytes / GIB:6.2f} GiB/device"
              f"  FLOPs/step {compiled.flops or 0:.3g}")
    saved = saved_activation_bytes({r: build_networks(config, dtype=dtype, remat=r) for r in (False, True)}, config,
                                   abstract_params(config))
    print(f"U-Net activations kept for the backward pass, per image: {saved[True] / GIB:.2f} GiB with remat, "
          f"{saved[False] / GIB:.2f} GiB without")
    anchor = 16 * GIB
    print(f"{resolution}², {per_device} images/device, {n} devices, remat={args.remat}, compute {args.dtype}")
    print_result("memory_fsdp", "bytes", results["fsdp"], anchor, "16 GiB HBM of one TPU v5e chip")


if __name__ == "__main__":
    main()
