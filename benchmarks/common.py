"""Shared pieces of the benchmarks: timing, and the "bench-sd" U-Net of docs/architecture.md."""
from __future__ import annotations

import json
import statistics
import time


def print_result(benchmark: str, unit: str, ours: float, anchor: float, anchor_name: str, *,
                 lower_is_better: bool = True, digits: int | None = None, speedup_digits: int | None = 3,
                 extra: dict | None = None) -> None:
    """The last line of every benchmark (docs/benchmarks.md): one JSON object whose `speedup` > 1 means we are
    better: anchor/ours for times and bytes (`lower_is_better`), ours/anchor for throughputs. `digits` rounds
    ours/anchor, `speedup_digits` the ratio (None: as computed). `extra`: further columns appended after the
    contract's keys (e.g. `torch_compile`, `load_average`)."""
    speedup = anchor / ours if lower_is_better else ours / anchor
    shown = (lambda v: v) if digits is None else (lambda v: round(v, digits))
    print(json.dumps({"benchmark": benchmark, "unit": unit, "ours": shown(ours), "anchor": shown(anchor),
                      "anchor_name": anchor_name,
                      "speedup": speedup if speedup_digits is None else round(speedup, speedup_digits),
                      **(extra or {})}))


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls (compilation excluded)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_torch_compile(fns: list, module, run) -> None:
    """Appends `lambda: run(torch.compile(module))` to `fns` (the benchmarks' extra torch.compile column),
    compiling once here so that a failure (torch.compile needs a working C++ toolchain) is reported in one line
    instead of failing the benchmark."""
    import torch

    try:
        compiled = torch.compile(module)
        run(compiled)
        fns.append(lambda: run(compiled))
    except Exception as e:
        print(f"torch.compile unavailable: {type(e).__name__}: {e}".splitlines()[0])


def median_interleaved(fns, repeats: int, warmup: int = 2) -> list[float]:
    """Median wall time of each `fn()`, the calls interleaved (f0, f1, …, f0, f1, …) so that the load of a shared
    machine falls on every side alike; `warmup` calls of each first (compilation excluded)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def bench_sd_unet(size: int, seed: int = 0):
    """bench-sd: SD-v1 topology at width 64 (channel_mult 1,2,4,4; 2 res blocks; attention at levels 0-2
    and the middle; 8 heads; context 768; 12 input channels). Returns the diffusers PyTorch U-Net, our
    `UNetConfig` and our params holding the same (random) weights."""
    import torch
    from diffusers import UNet2DConditionModel

    from sketchcomp_jax.models.config import ModelConfig
    from sketchcomp_jax.weights.convert import unet_params_from_diffusers
    from sketchcomp_jax.weights.diffusers_config import unet_config_from_diffusers

    torch.manual_seed(seed)
    unet_t = UNet2DConditionModel(
        sample_size=size, in_channels=12, out_channels=4, block_out_channels=(64, 128, 256, 256),
        layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    cfg = unet_config_from_diffusers(unet_t.config)
    params = unet_params_from_diffusers({k: v.detach().numpy() for k, v in unet_t.state_dict().items()},
                                        ModelConfig(unet=cfg))
    return unet_t, cfg, params


def bench_sd_model(size: int, seed: int = 0):
    """The whole bench-sd Paint-by-Sketch model for the train step: the bench-sd U-Net, a VAE of the SD-v1
    topology at a quarter of its width (block channels 32,64,128,128; 2 res blocks; ×8 down-sampling, so
    `size`×8 images), and a Paint-by-Example image encoder on a narrow CLIP ViT/14 at 224² (hidden 256,
    12 layers → a 2-block mapper, proj 768). Returns (torch modules dict {unet, vae, image_encoder}, our
    `ModelConfig`, our params) with identical random weights (written as a diffusers folder and converted by
    `weights.sources.convert_checkpoint`, the user's path)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
    from transformers import CLIPVisionConfig

    from sketchcomp_jax.weights.sources import convert_checkpoint

    unet_t, _, _ = bench_sd_unet(size, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 128, 128),
                        layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=size * 8)
    clip = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=4,
                            image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    encoder = PaintByExampleImageEncoder(clip, proj_size=768)
    with torch.no_grad():  # the uncond vector is zero-initialised; make it a real vector
        encoder.uncond_vector.normal_()
    with tempfile.TemporaryDirectory() as tmp:
        for name, module in (("unet", unet_t), ("vae", vae), ("image_encoder", encoder)):
            module.save_pretrained(f"{tmp}/{name}")
        with open(f"{tmp}/model_index.json", "w") as f:
            json.dump({"_class_name": "PaintByExamplePipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                       "vae": ["diffusers", "AutoencoderKL"],
                       "image_encoder": ["paint_by_example", "PaintByExampleImageEncoder"]}, f)
        model, _ = convert_checkpoint(tmp, resolution=size * 8)
    return {"unet": unet_t, "vae": vae, "image_encoder": encoder}, model.config, model.params
