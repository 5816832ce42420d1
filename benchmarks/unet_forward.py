"""U-Net forward: jitted Flax U-Net vs the diffusers PyTorch U-Net (eager; torch.compile as an extra column).

Config "bench-sd" (docs/architecture.md): SD-v1 topology scaled in width — model_channels 64,
channel_mult [1,2,4,4], 2 res blocks, attention at levels 0-2 + middle, 8 heads, context 768,
in_channels 12 — at 32×32 latents, batch 2, float32, identical random weights on both sides, the
same number of threads, warm-up excluded, the sides' calls interleaved so machine load affects both alike.
Prints medians, then one JSON line: {"benchmark": "unet_forward", "unit": "s", "ours": ..., "anchor": ...,
"anchor_name": ..., "speedup": ..., "load_average": ...} (+ "torch_compile" with `--compile`).

    python benchmarks/unet_forward.py [--quick] [--repeats 20] [--threads N] [--compile] [--size 32]
                                      [--attention auto|xla|chunked|splash|cudnn]

`--size 64` is the 64×64-latent (4096-token) case where the attention backend matters (docs/attention.md).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_torch_compile, bench_sd_unet, median_interleaved, print_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 repeats, 16×16 latents (under a minute)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for both sides")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--size", type=int, default=None, help="latent size (default 32; 16 with --quick)")
    parser.add_argument("--attention", default="auto", choices=["auto", "xla", "chunked", "splash", "cudnn"],
                        help="U-Net attention backend of the JAX side (docs/attention.md)")
    args = parser.parse_args()
    if args.threads != os.cpu_count():
        # XLA's CPU client uses every core of the process's CPU set; restrict both sides together.
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from sketchcomp_jax.models.unet import UNet

    torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else args.repeats
    size = args.size or (16 if args.quick else 32)
    unet_t, cfg, params = bench_sd_unet(size)
    unet_t.eval()

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, size, size, generator=gen)
    t = torch.tensor([10, 900])
    ctx = torch.randn(2, 1, 768, generator=gen)
    x_j = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    t_j, ctx_j = jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
    params = jax.device_put(params)

    forward = jax.jit(UNet(cfg, attention=args.attention).apply)
    out = forward({"params": params}, x_j, t_j, ctx_j).block_until_ready()
    with torch.no_grad():
        ref = unet_t(x, t, encoder_hidden_states=ctx).sample.numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())

    with torch.no_grad():
        fns = [lambda: forward({"params": params}, x_j, t_j, ctx_j).block_until_ready(),
               lambda: unet_t(x, t, encoder_hidden_states=ctx)]
        if args.compile:
            add_torch_compile(fns, unet_t, lambda unet: unet(x, t, encoder_hidden_states=ctx))
        times = median_interleaved(fns, repeats, warmup=3)
    ours, anchor = times[0], times[1]
    compiled = times[2] if len(times) > 2 else None
    load = os.getloadavg()[0]
    print(f"bench-sd U-Net forward, batch 2, {size}x{size} latents, fp32, {args.attention} attention, "
          f"{args.threads} threads, {repeats} repeats, load average {load:.2f}")
    print(f"  flax (jit)          median {ours * 1e3:8.1f} ms   (max rel err vs torch {err:.2e})")
    print(f"  torch eager         median {anchor * 1e3:8.1f} ms")
    if compiled is not None:
        print(f"  torch.compile       median {compiled * 1e3:8.1f} ms   (speedup vs it {compiled / ours:.2f}x)")
    extra = {"load_average": round(load, 2)}
    if compiled is not None:
        extra["torch_compile"] = round(compiled, 6)
    print_result("unet_forward", "s", ours, anchor, "diffusers UNet2DConditionModel, torch eager fp32", digits=6,
                 extra=extra)


if __name__ == "__main__":
    main()
