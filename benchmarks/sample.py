"""Sampling: 50-step PLMS with classifier-free guidance, whole loop in one jitted JAX program vs a PyTorch
loop (diffusers U-Net + PNDMScheduler(skip_prk_steps=True), eager), same weights, same threads.

Config "bench-sd" (docs/architecture.md): 12-channel SD-v1 topology at width 64, 32×32 latents, batch 2
(4 U-Net rows per call with CFG), float32. Warm-up (including compilation) excluded; medians over
repeats, the two sides' calls interleaved so machine load affects both alike. Last line: {"benchmark":
"sample_plms", "unit": "s", "ours", "anchor", "anchor_name", "speedup", "load_average"} (+ "torch_compile" with
`--compile`: the same loop with torch.compile of the U-Net).

    python benchmarks/sample.py [--quick] [--steps 50] [--repeats 3] [--threads N] [--compile]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_torch_compile, bench_sd_unet, median_interleaved, print_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 steps, 16×16 latents, 2 repeats")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for both sides")
    parser.add_argument("--compile", action="store_true", help="also time the loop with torch.compile of the U-Net")
    args = parser.parse_args()
    if args.threads != os.cpu_count():
        # XLA's CPU client uses every core of the process's CPU set; restrict both sides together.
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from diffusers import PNDMScheduler

    from sketchcomp_jax.diffusion.samplers import SamplingCond, make_sampler
    from sketchcomp_jax.models.unet import UNet

    torch.set_num_threads(args.threads)
    steps = 10 if args.quick else args.steps
    size = 16 if args.quick else 32
    repeats = 2 if args.quick else args.repeats
    batch, scale = 2, 5.0
    unet_t, cfg, params = bench_sd_unet(size)
    unet_t.eval()
    params = jax.device_put(params)

    rng = np.random.default_rng(0)
    x_T = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    z_masked = rng.standard_normal((batch, size, size, 4)).astype(np.float32)
    keep = (rng.random((batch, size, size, 1)) > 0.3).astype(np.float32)
    sketch = np.where(rng.random((batch, size, size, 3)) > 0.9, 1.0, -1.0).astype(np.float32)
    context = rng.standard_normal((batch, 1, 768)).astype(np.float32)
    uncond = rng.standard_normal((1, 1, 768)).astype(np.float32)

    unet = UNet(cfg)
    run = make_sampler(lambda p, x, t, c: unet.apply({"params": p}, x, t, c), sampler="plms", num_steps=steps)
    cond = SamplingCond(jnp.asarray(z_masked), jnp.asarray(keep), jnp.asarray(sketch), jnp.asarray(context),
                        jnp.asarray(uncond))
    jax_once = lambda: run(params, jnp.asarray(x_T), cond, jnp.float32(scale)).block_until_ready()  # noqa: E731

    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    rest = torch.cat([nchw(z_masked), nchw(keep), nchw(sketch)], dim=1)
    ctx_in = torch.cat([torch.from_numpy(uncond).expand(batch, 1, 768), torch.from_numpy(context)])
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)

    def torch_once(unet=unet_t):
        scheduler.set_timesteps(steps)
        x = nchw(x_T)
        with torch.no_grad():
            for t in scheduler.timesteps:
                x_in = torch.cat([x, rest], dim=1)
                out = unet(torch.cat([x_in, x_in]), t, encoder_hidden_states=ctx_in).sample
                e_u, e_c = out.chunk(2)
                x = scheduler.step(e_u + scale * (e_c - e_u), t, x).prev_sample
        return x

    ours_x = np.asarray(jax_once())
    ref_x = torch_once().numpy().transpose(0, 2, 3, 1)
    rel = float(np.abs(ours_x - ref_x).max() / np.abs(ref_x).max())
    fns = [jax_once, torch_once]
    if args.compile:
        add_torch_compile(fns, unet_t, torch_once)
    times = median_interleaved(fns, repeats, warmup=1)
    ours, anchor = times[0], times[1]
    load = os.getloadavg()[0]
    print(f"PLMS {steps} steps + CFG, bench-sd U-Net, batch {batch}, {size}x{size} latents, fp32, {args.threads} "
          f"threads, {repeats} repeats, load average {load:.2f}")
    print(f"  jax (one jitted loop)            median {ours:7.3f} s")
    print(f"  torch eager + PNDMScheduler      median {anchor:7.3f} s")
    extra = {"load_average": round(load, 2)}
    if len(times) > 2:
        print(f"  torch.compile(U-Net) loop        median {times[2]:7.3f} s   (speedup vs it {times[2] / ours:.2f}x)")
        extra["torch_compile"] = round(times[2], 4)
    print(f"  final latents agree to {rel:.2e} (relative)")
    print_result("sample_plms", "s", ours, anchor,
                 "diffusers UNet2DConditionModel + PNDMScheduler loop, torch eager fp32", digits=4, extra=extra)


if __name__ == "__main__":
    main()
