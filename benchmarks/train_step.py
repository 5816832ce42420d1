"""Train step: the shipped JAX step (`train.step.make_step_fn`, AOT-compiled by `compile_step` on one device,
donated state) vs the same work in PyTorch as the original's `LatentDiffusion` training step, same threads.

Both sides: VAE encode (posterior sample × 0.18215) of the image and of the masked image, the frozen CLIP
vision tower + trainable mapper/LN/proj of the Paint-by-Example conditioner with the reference dropped to the
unconditional vector with p = 0.2, the keep-mask and in-hole sketch resized to the latents, q_sample, the
12-channel U-Net forward + backward with activation checkpointing (the config's `remat=True`; diffusers'
gradient checkpointing on the torch side), ε-MSE, AdamW over the U-Net and the mapper. Config "bench-sd"
(../shared/DESIGN.md; the VAE/CLIP sizes are in `common.bench_sd_model`), batch 2, 256² images → 32×32
latents, fp32, identical initial weights and batches. Last line: {"benchmark": "train_step", "unit": "s",
"ours", "anchor", "anchor_name", "speedup", "load_average"}; `--compile` adds "torch_compile" (torch.compile of the U-Net).

    python benchmarks/train_step.py [--quick] [--repeats 5] [--threads N] [--compile] [--no-remat]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import add_torch_compile, bench_sd_model, median_interleaved, print_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16×16 latents (128² images), 2 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="cores for both sides")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the U-Net")
    parser.add_argument("--no-remat", action="store_true", help="no activation checkpointing on either side")
    args = parser.parse_args()
    if args.threads != os.cpu_count():
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.threads]))
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sketchcomp_jax.diffusion.schedule import make_schedule
    from sketchcomp_jax.models.config import build_networks
    from sketchcomp_jax.parallel.mesh import make_mesh
    from sketchcomp_jax.train.state import create_train_state, make_optimizer
    from sketchcomp_jax.train.step import compile_step, make_step_fn

    torch.set_num_threads(args.threads)
    size = 16 if args.quick else 32
    repeats = 2 if args.quick else args.repeats
    remat = not args.no_remat
    res, batch_size = size * 8, 2
    torch_nets, config, params = bench_sd_model(size)

    rng = np.random.default_rng(0)
    keep = np.ones((batch_size, res, res, 1), np.float32)
    keep[:, res // 4: 3 * res // 4, res // 8: 5 * res // 8] = 0
    batch = {"gt": rng.uniform(-1, 1, (batch_size, res, res, 3)).astype(np.float32), "keep_mask": keep,
             "sketch": np.where(rng.random((batch_size, res, res, 3)) > 0.9, 1.0, -1.0).astype(np.float32),
             "reference": rng.standard_normal((batch_size, 224, 224, 3)).astype(np.float32)}

    # ---- ours: exactly what launch/train.py runs (configs/common.py optimiser, remat, uncond_prob 0.2)
    optim = ml_collections.ConfigDict({"optim": dict(lr=1e-5, warmup_steps=0, warmup_f_start=1e-6, b1=0.9, b2=0.999,
                                                     eps=1e-8, weight_decay=0.01, grad_clip_norm=0.0,
                                                     grad_accum_steps=1)})
    tx = make_optimizer(optim)
    acp_np = make_schedule()["alphas_cumprod"]
    nets = build_networks(config, remat=remat)
    step_fn = make_step_fn(nets, config, tx, jnp.asarray(acp_np), seed=0, uncond_prob=0.2)
    state = create_train_state(params, tx)
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    compiled = compile_step(step_fn, jax.eval_shape(lambda: state), mesh, {k: v.shape for k, v in batch.items()})
    holder = [jax.device_put(state, compiled.state_shardings)]
    batch_j = {k: jax.device_put(v, compiled.batch_sharding) for k, v in batch.items()}

    def ours_once():
        holder[0], metrics = compiled.fn(holder[0], batch_j)
        metrics["loss"].block_until_ready()

    # ---- PyTorch: the original's LatentDiffusion step (frozen VAE/CLIP under no_grad, trainable U-Net + mapper)
    unet_t, vae, enc = torch_nets["unet"], torch_nets["vae"], torch_nets["image_encoder"]
    vae.eval().requires_grad_(False)
    enc.model.eval().requires_grad_(False)
    enc.uncond_vector.requires_grad_(False)
    unet_t.train()
    if remat:
        unet_t.enable_gradient_checkpointing()
    trainable = list(unet_t.parameters()) + [p for n, p in enc.named_parameters()
                                             if not n.startswith("model.") and n != "uncond_vector"]
    opt_t = torch.optim.AdamW(trainable, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    gt, keep_t, sketch_t, ref_t = (nchw(batch[k]) for k in ("gt", "keep_mask", "sketch", "reference"))
    acp_t = torch.from_numpy(np.asarray(acp_np, np.float32))
    gen = torch.Generator().manual_seed(0)

    def torch_step(unet):
        with torch.no_grad():
            z0 = vae.encode(gt).latent_dist.sample(gen) * 0.18215
            z_masked = vae.encode(gt * keep_t).latent_dist.sample(gen) * 0.18215
            pooled = enc.model(ref_t).pooler_output
        context = enc.proj_out(enc.final_layer_norm(enc.mapper(pooled[:, None])))
        if torch.rand((), generator=gen) < 0.2:
            context = enc.uncond_vector.expand_as(context)
        mask_lat = F.interpolate(keep_t, size=(size, size), mode="bilinear", align_corners=False)
        sketch_in = 2.0 * ((sketch_t + 1.0) / 2.0 * (1.0 - keep_t)) - 1.0
        sketch_lat = F.interpolate(sketch_in, size=(size, size), mode="bilinear", align_corners=False)
        t = torch.randint(0, 1000, (batch_size,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        acp = acp_t[t][:, None, None, None]
        z_t = acp.sqrt() * z0 + (1 - acp).sqrt() * noise
        eps = unet(torch.cat([z_t, z_masked, mask_lat, sketch_lat], 1), t, encoder_hidden_states=context).sample
        loss = F.mse_loss(eps, noise)
        opt_t.zero_grad(set_to_none=True)
        loss.backward()
        opt_t.step()

    fns = [ours_once, lambda: torch_step(unet_t)]
    if args.compile:
        add_torch_compile(fns, unet_t, torch_step)
    times = median_interleaved(fns, repeats)
    ours, anchor = times[0], times[1]
    load = os.getloadavg()[0]
    print(f"bench-sd train step (VAE x2 + CLIP + U-Net fwd/bwd{' remat' if remat else ''} + AdamW), batch "
          f"{batch_size}, {res}² images / {size}² latents, fp32, {args.threads} threads, {repeats} repeats, "
          f"load average {load:.2f}")
    print(f"  jax (make_step_fn, AOT, donated)   median {ours * 1e3:8.1f} ms")
    print(f"  torch eager + AdamW                median {anchor * 1e3:8.1f} ms")
    extra = {"load_average": round(load, 2)}
    if len(times) > 2:
        print(f"  torch.compile(U-Net) + AdamW       median {times[2] * 1e3:8.1f} ms   (speedup vs it "
              f"{times[2] / ours:.2f}x)")
        extra["torch_compile"] = round(times[2], 5)
    print_result("train_step", "s", ours, anchor, "PyTorch LatentDiffusion-style step (diffusers U-Net/VAE, "
                 "PaintByExampleImageEncoder, AdamW), eager fp32", digits=5, extra=extra)


if __name__ == "__main__":
    main()
