"""Per-chip HBM of the SHIPPED train step (or the 50-step sampler) on a real TPU topology, compiled ahead of time
by the real TPU compiler (libtpu) on a machine without a TPU.

    python benchmarks/tpu_aot.py --topology v5e:2x4 --per_device_batch 16
    python benchmarks/tpu_aot.py --topology v5p:2x2x2 --per_device_batch 32 --attention xla --dtype float32
    python benchmarks/tpu_aot.py --topology v5e:2x4 --program sample --per_device_batch 4

`--program train` compiles `sketchcomp_jax.train.step.make_step_fn` exactly as `launch/train.py` runs it (VAE
encode, CLIP + mapper, U-Net, ε-MSE, AdamW; donated state, explicit shardings) for the full-size Paint-by-Sketch
model (`ModelConfig()`: SD-v1 U-Net with 12 input channels, SD VAE, CLIP ViT-L/14) at 512². `--program sample`
compiles one jitted program of the sampling path of `sketchcomp_jax.generation.BatchGenerator`: VAE encode of
the masked image, CLIP conditioning, 50 PLMS steps with classifier-free guidance, VAE decode. Nothing is
allocated: the state is abstract (`jax.eval_shape`), the devices come from
`jax.experimental.topologies.get_topology_desc(topology_name, platform="tpu")`, and `memory_analysis()` of the
compiled executable is the chip's own HBM plan.

libtpu: the PyPI package `libtpu` (the version jax's `jax[tpu]` extra pins) lives in `.venv/libtpu`, outside
site-packages, so that no other tool tries to start a TPU runtime; this script installs it there on first use
(scripts/install_libtpu.sh) and points jax at it with `TPU_LIBRARY_PATH`, keeping `JAX_PLATFORMS=cpu`.

Prints args/temp/total GiB per chip and FLOPs per chip-step; last line (docs/architecture.md):
{"benchmark": "tpu_aot", "unit": "bytes", "ours": argument+temp bytes per chip, "anchor": the chip's HBM,
"anchor_name": ..., "speedup": anchor/ours}. A program that does not fit (`RESOURCE_EXHAUSTED` /
`CompileTimeHbmOom` from the compiler) is a result: `ours` is then the bytes the compiler says it needs, the
script exits 0 and `speedup` < 1.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIB = 2**30
LIBTPU_DIR = os.path.join(REPO, ".venv", "libtpu")
INSTALL_SCRIPT = os.path.join(REPO, "scripts", "install_libtpu.sh")
# HBM per chip by `device_kind` (public TPU specs); the compile-only devices do not report their memory.
HBM_BYTES = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v5p": 95 * GIB,
             "TPU v6 lite": 32 * GIB}
CHIP_NAMES = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e"}
ATTENTION = ("auto", "xla", "chunked", "splash", "cudnn")
TOPOLOGY_RE = re.compile(r"^v\d+[a-z]*(-\d+)?:\d+(x\d+)*$")
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class UserError(Exception):
    """A problem the user can fix; printed as one line, no traceback."""


def libtpu_path(install: bool = True) -> str:
    """Path of libtpu.so in `.venv/libtpu`, installing it there (scripts/install_libtpu.sh) if missing."""
    so = os.path.join(LIBTPU_DIR, "libtpu", "libtpu.so")
    if not os.path.isfile(so) and install:
        print(f"libtpu not found in {LIBTPU_DIR}: running {os.path.relpath(INSTALL_SCRIPT, REPO)}", flush=True)
        proc = subprocess.run(["bash", INSTALL_SCRIPT], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"could not install libtpu ({last}); run scripts/install_libtpu.sh with network access")
    if not os.path.isfile(so):
        raise UserError(f"libtpu not installed in {LIBTPU_DIR}; run scripts/install_libtpu.sh")
    return so


def configure_environment(so_path: str) -> None:
    """Before jax is imported: compile for TPU through libtpu, execute nothing, keep the default backend CPU."""
    os.environ["TPU_LIBRARY_PATH"] = so_path
    os.environ["JAX_PLATFORMS"] = "cpu"  # the TPU plugin is loaded only for the topology, never as a backend
    # No TPU VM metadata server here: say so, instead of libtpu probing it and warning.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Compile-only: no chip is opened, so several compiles (or a test next to a benchmark) may run at once
    # instead of failing on libtpu's one-process lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def parse_oom_bytes(message: str) -> int | None:
    """Bytes the TPU compiler says the program needs, from its out-of-memory message, e.g.
    "Used 23.18G of 15.75G hbm" or "HLO temporaries (21.63G) exceeds available HBM (15.75G)"."""
    def size(num: str, unit: str) -> int:
        return int(float(num) * _UNITS[unit.upper()[:1] if unit else ""])

    m = re.search(r"Used\s+([\d.]+)\s*([KMGT]?)i?B?\s+of\s+([\d.]+)\s*([KMGT]?)i?B?\s+hbm", message, re.I)
    if m:
        return size(m.group(1), m.group(2))
    m = re.search(r"temporaries\s*\(([\d.]+)\s*([KMGT]?)i?B?\)", message, re.I)
    if m:
        needed = size(m.group(1), m.group(2))
        args = re.search(r"arguments?\s*\(([\d.]+)\s*([KMGT]?)i?B?\)", message, re.I)
        return needed + (size(args.group(1), args.group(2)) if args else 0)
    return None


def oom_summary(message: str, max_lines: int = 25) -> str:
    """The compiler's OOM explanation trimmed to its head (it lists the largest allocations)."""
    lines = [line.rstrip() for line in message.splitlines() if line.strip()]
    return "\n".join(lines[:max_lines])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:2x4",
                   help="TPU topology name as libtpu knows it: v5e:2x4 (v5e-8), v5p:2x2x2 (v5p-8), v6e:2x4, v5e:2x2, …")
    p.add_argument("--per_device_batch", type=int, default=16, help="images per chip")
    p.add_argument("--attention", default="auto", help=f"attention backend: {'|'.join(ATTENTION)}")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32): bfloat16|float32")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True, help="rematerialise blocks")
    p.add_argument("--strategy", default=None,
                   help="dp|fsdp (default: fsdp for train, dp for sample)")
    p.add_argument("--program", default="train", help="train (one train step) | sample (50-step PLMS + CFG + decode)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's, 512 full-size)")
    p.add_argument("--model", default="full", help="full (Paint-by-Sketch SD-v1 size) | tiny (configs/demo.py, tests)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps for --program sample")
    p.add_argument("--dump_dir", default="", help="also write the compiler's HLO/buffer-assignment dumps there")
    args = p.parse_args(argv)
    checks = [
        (TOPOLOGY_RE.match(args.topology) is not None,
         f"--topology {args.topology!r} is not a TPU topology name; use e.g. v5e:2x4, v5p:2x2x2, v6e:2x4"),
        (args.per_device_batch >= 1, f"--per_device_batch must be ≥ 1, got {args.per_device_batch}"),
        (args.attention in ATTENTION, f"--attention must be one of {'|'.join(ATTENTION)}, got {args.attention!r}"),
        (args.dtype in ("bfloat16", "float32"), f"--dtype must be bfloat16 or float32, got {args.dtype!r}"),
        (args.strategy in (None, "dp", "fsdp"), f"--strategy must be dp or fsdp, got {args.strategy!r}"),
        (args.program in ("train", "sample"), f"--program must be train or sample, got {args.program!r}"),
        (args.model in ("full", "tiny"), f"--model must be full or tiny, got {args.model!r}"),
        (args.resolution is None or (args.resolution >= 8 and args.resolution % 8 == 0),
         f"--resolution must be a positive multiple of 8, got {args.resolution}"),
        (args.steps >= 1, f"--steps must be ≥ 1, got {args.steps}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    if args.strategy is None:
        args.strategy = "fsdp" if args.program == "train" else "dp"
    return args


def model_config(args):
    from sketchcomp_jax.models.config import ModelConfig

    if args.model == "tiny":
        from configs.demo import get_config
        from sketchcomp_jax.train.init import model_config_from_dict

        config = model_config_from_dict(dict(get_config().model))
    else:
        config = ModelConfig()
    if args.resolution:
        if args.resolution % config.vae.downsample_factor:
            raise UserError(f"--resolution {args.resolution} is not a multiple of the VAE factor "
                            f"{config.vae.downsample_factor}")
        config = config.replace(resolution=args.resolution)
    return config


def networks(config, args):
    """The model's modules with the requested compute dtype, remat and attention backend, chosen for TPU."""
    import inspect

    import jax.numpy as jnp

    from sketchcomp_jax.models.config import build_networks

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    accepted = inspect.signature(build_networks).parameters
    kwargs = {}
    if "attention" in accepted:
        kwargs["attention"] = args.attention
    elif args.attention not in ("auto", "xla"):
        raise UserError(f"--attention {args.attention} needs the attention backends (models/attention.py); "
                        "this checkout only has xla")
    if "platform" in accepted:
        kwargs["platform"] = "tpu"  # jax.default_backend() is cpu here; `auto` must choose for the target
    return build_networks(config, dtype=dtype, remat=args.remat, **kwargs)


def tpu_devices(topology: str):
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # libtpu rejects names it does not know
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"libtpu does not know topology {topology!r} ({first[:200]}); use e.g. v5e:2x4, v5p:2x2x2")


def batch_shapes(config, batch: int) -> dict:
    import jax

    r = config.resolution
    cond = config.dummy_conditioning_input(batch)
    return {"gt": (batch, r, r, 3), "keep_mask": (batch, r, r, 1), "sketch": (batch, r, r, 3),
            config.conditioning_input: jax.ShapeDtypeStruct(cond.shape, cond.dtype)}


def lower_train(config, nets, mesh, batch: int, strategy: str):
    """The shipped train step, lowered exactly as `compile_step` does (shardings, donation)."""
    import jax
    import jax.numpy as jnp
    import ml_collections
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sketchcomp_jax.diffusion.schedule import schedule_for
    from sketchcomp_jax.train.state import create_train_state, make_optimizer
    from sketchcomp_jax.train.step import compile_step, make_step_fn
    from sketchcomp_jax.weights.convert import abstract_params

    cfg = ml_collections.ConfigDict({"optim": dict(lr=1e-5, warmup_steps=10000, b1=0.9, b2=0.999, eps=1e-8,
                                                   weight_decay=0.01)})
    tx = make_optimizer(cfg)
    acp = jnp.asarray(schedule_for(config.schedule)["alphas_cumprod"])
    abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx), abstract_params(config))
    gather = NamedSharding(mesh, P()) if strategy == "fsdp" else None
    step_fn = make_step_fn(nets, config, tx, acp, 0, gather_params=gather)
    return lambda: compile_step(step_fn, abstract_state, mesh, batch_shapes(config, batch), strategy)


def lower_sample(config, nets, mesh, batch: int, strategy: str, steps: int):
    """Encode → conditioning → `steps` PLMS steps with CFG (guidance 5) → VAE decode, as one jitted program
    built from the pieces `BatchGenerator` runs. Parameters float32 (as the pipeline keeps them)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sketchcomp_jax.generation import BatchGenerator
    from sketchcomp_jax.parallel.mesh import BATCH_AXES
    from sketchcomp_jax.parallel.partitioning import param_shardings
    from sketchcomp_jax.weights.convert import abstract_params

    gen = BatchGenerator(config, nets, sampler="plms", steps=steps, guidance_scale=5.0)

    def program(params, inputs, keys):
        x_T, cond = gen._prepare_impl(params, inputs, keys)
        latents = gen._run(params["unet"], x_T, cond, jnp.float32(gen.guidance_scale), None)
        return gen._decode(params["vae"], latents)

    params = abstract_params(config)
    param_sh = param_shardings(params, mesh, strategy)
    batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    shapes = batch_shapes(config, batch)
    abstract_inputs = {k: jax.ShapeDtypeStruct(getattr(s, "shape", s), getattr(s, "dtype", jnp.float32),
                                               sharding=batch_sh) for k, s in shapes.items()}
    keys = jax.ShapeDtypeStruct((batch, 2), jnp.uint32, sharding=batch_sh)
    abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      params, param_sh)
    jitted = jax.jit(program, out_shardings=batch_sh)

    def compile_():
        from sketchcomp_jax.train.step import CompiledStep

        with jax.set_mesh(mesh):  # splash attention shards its kernel over the mesh's batch axes
            compiled = jitted.lower(abstract, abstract_inputs, keys).compile()
        return CompiledStep(compiled, param_sh, batch_sh, _flops(compiled), _memory(compiled))

    return compile_


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", 0.0)) or None
    except Exception:
        return None


def _memory(compiled) -> dict[str, int]:
    mem = compiled.memory_analysis()
    return {name: int(getattr(mem, name, 0) or 0) for name in
            ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
             "generated_code_size_in_bytes")}


def run(args) -> dict:
    """Compiles the program; returns a dict with the per-chip figures (and `oom` with the message if it did not fit)."""
    import jax

    from sketchcomp_jax.parallel.mesh import make_mesh

    devices = tpu_devices(args.topology)
    kind = devices[0].device_kind
    hbm = HBM_BYTES.get(kind)
    if hbm is None:
        raise UserError(f"unknown HBM size for device kind {kind!r}; add it to HBM_BYTES in benchmarks/tpu_aot.py")
    mesh = make_mesh({"fsdp": -1} if args.strategy == "fsdp" else {"data": -1}, devices=devices)
    config = model_config(args)
    nets = networks(config, args)
    batch = args.per_device_batch * len(devices)
    if args.program == "train":
        compile_fn = lower_train(config, nets, mesh, batch, args.strategy)
    else:
        compile_fn = lower_sample(config, nets, mesh, batch, args.strategy, args.steps)
    chip = CHIP_NAMES.get(kind, kind)
    result = dict(topology=args.topology, chips=len(devices), device_kind=kind, chip=chip, hbm=hbm,
                  program=args.program, per_device_batch=args.per_device_batch, resolution=config.resolution)
    print(f"{args.program} {args.model} {config.resolution}² on {args.topology} ({len(devices)} × {kind}), "
          f"{args.per_device_batch} images/chip, attention {args.attention}, {args.dtype}, "
          f"remat={args.remat}, {args.strategy}; jax {jax.__version__}", flush=True)
    t0 = time.time()
    try:
        compiled = compile_fn()
    except Exception as e:  # the compiler's OOM is a result, anything else is a bug
        message = str(e)
        if "RESOURCE_EXHAUSTED" not in message and "HbmOom" not in message and "out of memory" not in message.lower():
            raise
        result.update(compile_s=time.time() - t0, oom=oom_summary(message), needed=parse_oom_bytes(message))
        return result
    mem = compiled.memory
    result.update(compile_s=time.time() - t0, args_bytes=mem["argument_size_in_bytes"],
                  temp_bytes=mem["temp_size_in_bytes"], output_bytes=mem["output_size_in_bytes"],
                  alias_bytes=mem["alias_size_in_bytes"], flops=compiled.flops)
    return result


def report(result: dict, args) -> None:
    from benchmarks.common import print_result

    hbm = result["hbm"]
    anchor_name = f"{hbm / GIB:.0f} GiB HBM of one TPU {result['chip']} chip"
    name = f"tpu_aot_{args.program}"
    print(f"compile {result['compile_s']:.1f} s")
    if "oom" in result:
        needed = result["needed"]
        print("does NOT fit: the TPU compiler ran out of HBM:")
        print("  " + result["oom"].replace("\n", "\n  "))
        if needed is None:  # no size in the message: report "more than the chip", never a made-up figure
            print("(no byte count in the compiler's message; reporting the chip's HBM + 1 byte)")
            needed = hbm + 1
        print(f"needed {needed / GIB:.2f} GiB per chip of {hbm / GIB:.0f} GiB")
        print_result(name, "bytes", needed, hbm, anchor_name)
        return
    used = result["args_bytes"] + result["temp_bytes"]
    flops = result["flops"]
    print(f"per chip: args {result['args_bytes'] / GIB:.2f} GiB  temp {result['temp_bytes'] / GIB:.2f} GiB  "
          f"total {used / GIB:.2f} GiB (output {result['output_bytes'] / GIB:.2f} GiB, "
          f"aliased with args {result['alias_bytes'] / GIB:.2f} GiB) of {hbm / GIB:.0f} GiB HBM")
    print(f"FLOPs per chip-step: {flops:.4g}" if flops else "FLOPs per chip-step: not reported by the compiler")
    print(f"fits: {'yes' if used <= hbm else 'NO'}")
    print_result(name, "bytes", used, hbm, anchor_name)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        configure_environment(libtpu_path(install=True))
        if args.dump_dir:
            os.makedirs(args.dump_dir, exist_ok=True)
            dump = f"--xla_dump_to={os.path.abspath(args.dump_dir)} --xla_dump_hlo_as_text"
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + dump).strip()
            os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") + " " + dump).strip()
        result = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
