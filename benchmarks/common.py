"""Shared pieces of the benchmarks: timing, and the "bench-sd" U-Net of docs/architecture.md."""
from __future__ import annotations

import json
import statistics
import time


def print_result(benchmark: str, unit: str, ours: float, anchor: float, anchor_name: str, *,
                 lower_is_better: bool = True, digits: int | None = None, speedup_digits: int | None = 3) -> None:
    """The last line of every benchmark (docs/benchmarks.md): one JSON object whose `speedup` > 1 means we are
    better: anchor/ours for times and bytes (`lower_is_better`), ours/anchor for throughputs. `digits` rounds
    ours/anchor, `speedup_digits` the ratio (None: as computed)."""
    speedup = anchor / ours if lower_is_better else ours / anchor
    shown = (lambda v: v) if digits is None else (lambda v: round(v, digits))
    print(json.dumps({"benchmark": benchmark, "unit": unit, "ours": shown(ours), "anchor": shown(anchor),
                      "anchor_name": anchor_name,
                      "speedup": speedup if speedup_digits is None else round(speedup, speedup_digits)}))


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
