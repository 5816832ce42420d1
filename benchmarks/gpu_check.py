"""GPU check (the Python part of benchmarks/gpu_check.sh): cuDNN attention parity, bench-sd timings with xla vs
cudnn attention in bf16 (and fp32 xla), and the full-size Paint-by-Sketch train step at 512² (images/s, MFU).

    python benchmarks/gpu_check.py                       # on a CUDA machine: everything, ~5-8 minutes
    python benchmarks/gpu_check.py --tiny                # anywhere (CPU): the same code on a tiny model, seconds
    python benchmarks/gpu_check.py --sections parity,bench

Sections:
* `parity`: `attention(backend="cudnn")` against `xla`, forward and the q/k/v gradients, bf16 and fp16, at the
  self-attention lengths of the 512² U-Net (4096/1024/256 tokens), a length that is not a multiple of 64, and
  the SD-v1 head dims 40/80/160 (160 only where cuDNN supports it). Tolerance 3e-2 × max|reference|, as
  tests/test_attention.py states for bf16 (8 mantissa bits; the backends round the softmax weights in another
  order). Without a GPU (`--tiny` on CPU) the harness runs `chunked` in place of `cudnn`, at 1e-5 in fp32.
* `bench`: the bench-sd U-Net (docs/architecture.md; 32×32 latents) train step (fwd+bwd+AdamW, donated) at
  batch 2 and 16, and 50-step PLMS sampling with classifier-free guidance at batch 2: fp32 xla, bf16 xla,
  bf16 cudnn. Medians over repeats after warm-up.
* `full`: the shipped train step (`make_step_fn`: VAE encode, CLIP, U-Net, loss, AdamW) of the full-size model at
  512², bf16 compute, remat, attention `auto` (cudnn on GPU), random weights, `--full_batch` images per GPU;
  images/s and MFU = model FLOPs / step time / the card's dense bf16 peak (`PEAK_TFLOPS`, or `--peak_tflops`).
  Model FLOPs are XLA's count for the same step without remat and with einsum attention (what the model
  needs, not what remat recomputes).

Last line (docs/architecture.md): the bench-sd bf16 train step at batch 16, cudnn (ours) against xla (anchor), unit "s".
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import median_time, print_result  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets; matched against
# `device_kind` in this order (first substring hit).
PEAK_TFLOPS = (
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 6000 Ada", 364.0), ("A6000", 155.0),
)


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


# ------------------------------------------------------------------------------------------------ parity
def relative_errors(backend: str, t: int, head_dim: int, dtype, heads: int = 2, batch: int = 2) -> list[float]:
    """max|ours - xla| / max|xla| of the output and of the q, k, v gradients of a fixed random projection."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sketchcomp_jax.models.attention import attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((batch, t, heads * head_dim)), dtype) for _ in range(3))
    probe = jnp.asarray(rng.standard_normal((batch, t, heads * head_dim)), jnp.float32)

    def run(name):
        fn = lambda q, k, v: attention(q, k, v, heads, backend=name)  # noqa: E731
        loss = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * probe).sum()  # noqa: E731
        out = jax.jit(fn)(q, k, v)
        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    return [float(np.abs(a - b).max() / (np.abs(b).max() or 1.0)) for a, b in zip(run(backend), run("xla"))]


def parity_section(on_gpu: bool, tiny: bool) -> bool:
    import jax.numpy as jnp

    from sketchcomp_jax.models.attention import cudnn_problem

    backend = "cudnn" if on_gpu else "chunked"
    if not on_gpu:
        print("parity: no GPU, so the harness runs `chunked` in place of `cudnn` (fp32, tolerance 1e-5)")
    cases = [(64, 40), (100, 40)] if tiny else [(4096, 40), (1024, 80), (256, 160), (1000, 40), (77, 80)]
    dtypes = [jnp.float32] if not on_gpu else [jnp.bfloat16, jnp.float16]
    ok = True
    print(f"{'backend':8s} {'dtype':9s} {'tokens':>6s} {'head':>4s}   out       dq        dk        dv     tol")
    for dtype in dtypes:
        tol = 1e-5 if dtype == jnp.float32 else 3e-2
        for t, head_dim in cases:
            if on_gpu and cudnn_problem(dtype, head_dim, "gpu"):
                print(f"{backend:8s} {jnp.dtype(dtype).name:9s} {t:6d} {head_dim:4d}   skipped: "
                      f"{cudnn_problem(dtype, head_dim, 'gpu')}")
                continue
            errs = relative_errors(backend, t, head_dim, dtype)
            good = max(errs) <= tol
            ok &= good
            print(f"{backend:8s} {jnp.dtype(dtype).name:9s} {t:6d} {head_dim:4d}   "
                  + "  ".join(f"{e:8.2e}" for e in errs) + f"  {tol:g} {'ok' if good else 'FAIL'}")
    return ok


# ------------------------------------------------------------------------------------------------ bench-sd
def bench_sd_config(tiny: bool):
    from sketchcomp_jax.models.unet import UNetConfig

    if tiny:  # the demo model's U-Net (configs/demo.py)
        return UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                          num_heads=2, context_dim=32)
    return UNetConfig(model_channels=64)  # bench-sd: SD-v1 topology at width 64 (docs/architecture.md)


def unet_params(cfg, size: int):
    import jax
    import jax.numpy as jnp

    from sketchcomp_jax.models.unet import UNet

    unet = UNet(cfg)
    init = jax.jit(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, cfg.in_channels)),
                                     jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, cfg.context_dim)))["params"])
    return init()


def time_unet_train(cfg, params, dtype, backend: str, batch: int, size: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sketchcomp_jax.models.unet import UNet

    unet = UNet(cfg, dtype=dtype, attention=backend)
    tx = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, cfg.in_channels)), jnp.float32)
    t = jnp.asarray(rng.integers(0, 1000, batch))
    ctx = jnp.asarray(rng.standard_normal((batch, 1, cfg.context_dim)), jnp.float32)
    noise = jnp.asarray(rng.standard_normal((batch, size, size, cfg.out_channels)), jnp.float32)

    def step(state, x, t, ctx, noise):
        p, opt = state
        loss, grads = jax.value_and_grad(
            lambda p: jnp.mean(jnp.square(unet.apply({"params": p}, x, t, ctx).astype(jnp.float32) - noise)))(p)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), loss

    jstep = jax.jit(step, donate_argnums=(0,))
    state = [(jax.tree_util.tree_map(jnp.array, params), tx.init(params))]

    def once():
        state[0], loss = jstep(state[0], x, t, ctx, noise)
        loss.block_until_ready()

    return median_time(once, repeats)


def time_sampling(cfg, params, dtype, backend: str, batch: int, size: int, steps: int, repeats: int) -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sketchcomp_jax.diffusion.samplers import SamplingCond, make_sampler
    from sketchcomp_jax.diffusion.schedule import make_schedule
    from sketchcomp_jax.models.unet import UNet

    unet = UNet(cfg, dtype=dtype, attention=backend)
    run = make_sampler(lambda p, x, t, c: unet.apply({"params": p}, x, t, c), sampler="plms", num_steps=steps,
                       use_cfg=True, alphas_cumprod=np.asarray(make_schedule()["alphas_cumprod"]))
    rng = np.random.default_rng(0)
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    cond = SamplingCond(arr(batch, size, size, 4), jnp.ones((batch, size, size, 1)), arr(batch, size, size, 3),
                        arr(batch, 1, cfg.context_dim), arr(1, 1, cfg.context_dim))
    x_T = arr(batch, size, size, 4)
    return median_time(lambda: run(params, x_T, cond, jnp.float32(5.0)).block_until_ready(), repeats, warmup=1)


def bench_section(on_gpu: bool, tiny: bool) -> dict:
    import jax.numpy as jnp

    fast = "cudnn" if on_gpu else "chunked"
    size = 8 if tiny else 32
    cfg = bench_sd_config(tiny)
    params = unet_params(cfg, size)
    variants = [("fp32", jnp.float32, "xla"), ("bf16", jnp.bfloat16, "xla"), ("bf16", jnp.bfloat16, fast)]
    repeats = 2 if tiny else 10
    times = {}
    print(f"bench-sd U-Net ({size}×{size} latents): train step (fwd+bwd+AdamW) and {2 if tiny else 50}-step "
          "PLMS+CFG sampling, median ms")
    for batch in (2,) if tiny else (2, 16):
        for label, dtype, backend in variants:
            s = time_unet_train(cfg, params, dtype, backend, batch, size, repeats)
            times[("train", batch, label, backend)] = s
            print(f"  train  batch {batch:2d}  {label}  {backend:8s} {s * 1e3:9.2f} ms  {batch / s:8.1f} images/s")
    for label, dtype, backend in variants:
        s = time_sampling(cfg, params, dtype, backend, 2, size, 2 if tiny else 50, 1 if tiny else 3)
        times[("sample", 2, label, backend)] = s
        print(f"  sample batch  2  {label}  {backend:8s} {s * 1e3:9.2f} ms")
    return times


# ------------------------------------------------------------------------------------------------ full size
def full_section(tiny: bool, batch_per_device: int, repeats: int, peak: float | None) -> None:
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

    if tiny:
        from configs.demo import get_config
        from sketchcomp_jax.train.init import model_config_from_dict

        config = model_config_from_dict(dict(get_config().model))
    else:
        config = ModelConfig()
    devices = jax.devices()
    strategy = "fsdp" if len(devices) > 1 else "dp"
    mesh = make_mesh({"fsdp": -1} if strategy == "fsdp" else {"data": -1})
    batch = batch_per_device * len(devices)
    r = config.resolution
    shapes = {"gt": (batch, r, r, 3), "keep_mask": (batch, r, r, 1), "sketch": (batch, r, r, 3),
              "reference": (batch, config.clip.image_size, config.clip.image_size, 3)}
    tx = make_optimizer(ml_collections.ConfigDict({"optim": dict(lr=1e-5, warmup_steps=10000, b1=0.9, b2=0.999,
                                                                 eps=1e-8, weight_decay=0.01)}))
    acp = jnp.asarray(make_schedule()["alphas_cumprod"])
    gather = NamedSharding(mesh, P()) if strategy == "fsdp" else None
    abstract = abstract_params(config)
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx), abstract)

    # Model FLOPs: the step as the model defines it (no remat recompute, einsum attention so XLA counts it).
    plain = make_step_fn(build_networks(config, dtype=jnp.bfloat16, remat=False, attention="xla"), config, tx, acp, 0,
                         gather_params=gather)
    abstract_batch = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    cost = jax.jit(plain).lower(abstract_state, abstract_batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    model_flops = float(cost.get("flops", 0.0)) if cost else 0.0

    nets = build_networks(config, dtype=jnp.bfloat16, remat=True, attention="auto")
    t0 = time.time()
    compiled = compile_step(make_step_fn(nets, config, tx, acp, 0, gather_params=gather), abstract_state, mesh,
                            shapes, strategy)
    compile_s = time.time() - t0

    def random_state():
        leaves, treedef = jax.tree_util.tree_flatten(abstract)
        keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
        params = treedef.unflatten([0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
        return create_train_state(params, tx)

    state = [jax.jit(random_state, out_shardings=compiled.state_shardings)()]
    data = jax.jit(lambda: {k: jax.random.uniform(jax.random.PRNGKey(i), s, jnp.float32, -1.0, 1.0)
                            for i, (k, s) in enumerate(shapes.items())},
                   out_shardings={k: compiled.batch_sharding for k in shapes})()

    def once():
        state[0], metrics = compiled.fn(state[0], data)
        metrics["loss"].block_until_ready()

    step_s = median_time(once, repeats)
    images_s = batch / step_s
    kind = devices[0].device_kind
    print(f"full-size train step {r}², {batch_per_device} images/device × {len(devices)} {kind}, bf16, remat, "
          f"attention auto, {strategy}: compile {compile_s:.1f} s, step {step_s * 1e3:.1f} ms, "
          f"{images_s:.2f} images/s ({images_s / len(devices):.2f} per device)")
    if model_flops and peak:
        mfu = model_flops / step_s / (peak * 1e12 * len(devices))
        print(f"  model FLOPs/step {model_flops:.4g}; MFU {100 * mfu:.1f}% of {peak:g} TFLOP/s bf16 per device")
    else:
        print(f"  model FLOPs/step {model_flops:.4g}; MFU: no peak known for {kind!r} (pass --peak_tflops)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model and few repeats (CPU smoke test)")
    parser.add_argument("--sections", default="parity,bench,full", help="comma-separated: parity,bench,full")
    parser.add_argument("--full_batch", type=int, default=8, help="images per GPU for the full-size step")
    parser.add_argument("--full_repeats", type=int, default=5)
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak per device (else the table)")
    args = parser.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - {"parity", "bench", "full"}
    if unknown:
        sys.exit(f"error: unknown --sections {sorted(unknown)}; use parity,bench,full")
    if args.full_batch < 1:
        sys.exit(f"error: --full_batch must be ≥ 1, got {args.full_batch}")
    import jax

    on_gpu = jax.default_backend() == "gpu"
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or (peak_tflops(kind) if on_gpu else None)
    print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.device_count()} × {kind}; "
          f"bf16 peak {peak or 'unknown'} TFLOP/s")
    if not on_gpu and not args.tiny:
        sys.exit("error: no GPU found (jax.default_backend() is "
                 f"{jax.default_backend()}); run on a CUDA machine, or pass --tiny for the CPU smoke test")
    ok = True
    if "parity" in sections:
        ok = parity_section(on_gpu, args.tiny)
    times = bench_section(on_gpu, args.tiny) if "bench" in sections else {}
    if "full" in sections:
        full_section(args.tiny, args.full_batch, 2 if args.tiny else args.full_repeats, peak)
    if not ok:
        print("PARITY FAILED (see the table above)")
    if times:
        batch = 2 if args.tiny else 16
        fast = "cudnn" if on_gpu else "chunked"
        print_result("gpu_check_bench_sd_train_bf16", "s", times[("train", batch, "bf16", fast)],
                     times[("train", batch, "bf16", "xla")], f"bench-sd train step, batch {batch}, bf16, xla attention",
                     digits=5)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
