"""Train step: jitted JAX U-Net step (forward + backward + AdamW, donated state) vs the same step in PyTorch
(diffusers UNet2DConditionModel + torch.optim.AdamW, eager), bench-sd config (docs/architecture.md),
batch 2, 32×32 latents, 12 input channels, fp32, identical initial weights and batches, same threads.

Both sides run the ε-MSE of the U-Net on precomputed inputs (the frozen VAE/CLIP encoders are left out
on both sides so the figure compares the trained part). Last line: {"benchmark": "train_step", "unit": "s",
"ours", "anchor", "anchor_name", "speedup"}.

    python benchmarks/train_step.py [--quick] [--repeats 10]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import bench_sd_unet, median_time, print_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16×16 latents, 3 repeats")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch

    from sketchcomp_jax.models.unet import UNet

    size = 16 if args.quick else 32
    repeats = 3 if args.quick else args.repeats
    unet_t, cfg, params = bench_sd_unet(size)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, size, size, 12)).astype(np.float32)
    t = np.array([10, 900])
    ctx = rng.standard_normal((2, 1, 768)).astype(np.float32)
    noise = rng.standard_normal((2, size, size, 4)).astype(np.float32)

    unet = UNet(cfg)
    tx = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

    def step(state, x, t, ctx, noise):
        p, opt = state

        def loss_fn(p):
            return jnp.mean(jnp.square(unet.apply({"params": p}, x, t, ctx) - noise))

        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    jstep = jax.jit(step, donate_argnums=(0,))
    state = [(jax.device_put(params), tx.init(params))]
    args_j = [jnp.asarray(a) for a in (x, t, ctx, noise)]

    def ours_once():
        state[0], loss = jstep(state[0], *args_j)
        loss.block_until_ready()

    opt_t = torch.optim.AdamW(unet_t.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    xt, tt, ct, nt = nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(noise)

    def torch_once():
        opt_t.zero_grad(set_to_none=True)
        loss = torch.mean((unet_t(xt, tt, encoder_hidden_states=ct).sample - nt) ** 2)
        loss.backward()
        opt_t.step()

    ours = median_time(ours_once, repeats)
    anchor = median_time(torch_once, repeats)
    print(f"bench-sd U-Net train step (fwd+bwd+AdamW), batch 2, {size}x{size} latents, fp32, {repeats} repeats")
    print(f"  jax (jit, donated)     median {ours * 1e3:8.1f} ms")
    print(f"  torch eager + AdamW    median {anchor * 1e3:8.1f} ms")
    print_result("train_step", "s", ours, anchor, "diffusers UNet2DConditionModel + torch.optim.AdamW, eager fp32",
                 digits=5)


if __name__ == "__main__":
    main()
