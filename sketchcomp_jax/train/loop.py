"""The training loop: mesh → model → data → AOT-compiled step → checkpoints, metrics, samples, eval.

Resumes automatically from the latest checkpoint in `workdir`. Randomness depends only on
(seed, step) and the data iterator is checkpointed with the state, so a resumed run reproduces an
uninterrupted one step by step. SIGTERM/SIGINT (to any one process) → every process saves the same step
and exits cleanly. Multi-host: every process runs this same function; the eval loss and the sample grid
are collectives all processes take part in, and only process 0 writes files.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from sketchcomp_jax import paths
from sketchcomp_jax.diffusion.schedule import schedule_for
from sketchcomp_jax.generation import BatchGenerator
from sketchcomp_jax.models.config import ModelConfig, build_networks
from sketchcomp_jax.parallel.mesh import barrier, initialize_distributed, make_mesh, place
from sketchcomp_jax.train.checkpointing import Checkpointer, PreemptionFlag, config_to_json
from sketchcomp_jax.train.init import initial_model, text_tokenizer_dir
from sketchcomp_jax.train.metrics_writer import MetricsWriter
from sketchcomp_jax.train.monitors import EvalLoss, SampleGrid, save_png
from sketchcomp_jax.train.state import create_train_state, learning_rate_schedule, make_optimizer
from sketchcomp_jax.train.step import compile_step, make_step_fn, step_gather

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    pass


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def _ensure_data(cfg) -> str:
    from sketchcomp_jax.data.synthetic import write_synthetic_dataset

    data_dir = cfg.data.dir
    if not data_dir:
        raise ValueError("config.data.dir is empty: pass --config.data.dir=DATASET (made by launch/prepare_data.py)")
    if cfg.data.synthetic_images:
        # Process 0 makes the set while the others wait; a process that then does not see it (hosts with
        # their own local disks) makes its own copy (deterministic, and idempotent on a shared file system).
        if jax.process_index() == 0:
            write_synthetic_dataset(data_dir, int(cfg.data.synthetic_images), seed=int(cfg.seed))
        barrier("sketchcomp: synthetic data set written")
        if jax.process_index() != 0:
            write_synthetic_dataset(data_dir, int(cfg.data.synthetic_images), seed=int(cfg.seed))
    if not paths.as_path(data_dir).exists():
        raise FileNotFoundError(f"dataset not found: {data_dir} (make it with launch/prepare_data.py)")
    return data_dir


def _loader(cfg, model_config: ModelConfig, split: str, eval_mode: bool, epochs=None, **kwargs):
    from sketchcomp_jax.data.pipeline import make_train_loader

    return make_train_loader(
        cfg.data.dir, split=split, resolution=model_config.resolution, reference_size=model_config.clip.image_size,
        global_batch_size=int(cfg.batch_size), seed=int(cfg.seed), worker_count=int(cfg.data.worker_count),
        num_epochs=epochs, eval_mode=eval_mode, arbitrary_mask_percent=float(cfg.data.arbitrary_mask_percent),
        tokenizer_dir=text_tokenizer_dir(cfg), **kwargs,
    )


def _model_inputs(batch: dict, model_config: ModelConfig) -> dict:
    """The arrays the train step reads (the loader also yields tags, ids and the unused conditioning input)."""
    return {k: batch[k] for k in ("gt", "keep_mask", "sketch", model_config.conditioning_input)}


def _batch_shapes(model_config: ModelConfig, batch_size: int) -> dict[str, tuple | jax.ShapeDtypeStruct]:
    r = model_config.resolution
    cond = model_config.dummy_conditioning_input(batch_size)
    return {"gt": (batch_size, r, r, 3), "keep_mask": (batch_size, r, r, 1), "sketch": (batch_size, r, r, 3),
            model_config.conditioning_input: jax.ShapeDtypeStruct(cond.shape, cond.dtype)}


def train(cfg, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) training; returns a summary dict (last step, last loss, stop reason)."""
    initialize_distributed(cfg.distributed.coordinator or None, cfg.distributed.num_processes or None,
                           None if cfg.distributed.process_id < 0 else cfg.distributed.process_id)
    workdir_path = paths.as_path(workdir)  # local or gs://
    workdir_path.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(dict(cfg.mesh.ici), dict(cfg.mesh.dcn) or None)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % data_parallel:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the {data_parallel} data-parallel devices")
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), jax.device_count(), jax.process_count())

    # From here on a SIGTERM (even during data creation, compilation or restore) only sets the flag: the
    # loop then stops every process at the same step boundary.
    flag = PreemptionFlag(mesh)
    try:
        _ensure_data(cfg)
        ckpt = Checkpointer(workdir_path, int(cfg.max_to_keep))
        try:
            return _train(cfg, workdir_path, mesh, ckpt, flag)
        finally:
            ckpt.close()
    finally:
        flag.restore_handlers()


def _train(cfg, workdir_path: pathlib.Path, mesh, ckpt: Checkpointer, flag: PreemptionFlag) -> dict[str, Any]:
    start = ckpt.latest_step()
    model_config, params, source = initial_model(cfg, fresh=start is None)
    log.info("model: %s, U-Net %d input channels, %d² images", source, model_config.unet.in_channels,
             model_config.resolution)
    nets = build_networks(model_config, dtype=_dtype(cfg.compute_dtype), remat=bool(cfg.remat),
                          attention=cfg.get("attention"))
    tx = make_optimizer(cfg)
    acp = jnp.asarray(schedule_for(model_config.schedule)["alphas_cumprod"])
    gather = NamedSharding(mesh, P()) if cfg.mesh.strategy == "fsdp" else None
    step_fn = make_step_fn(nets, model_config, tx, acp, int(cfg.seed), float(cfg.uncond_prob),
                           bool(cfg.per_sample_uncond), float(cfg.ema_decay or 0.9999),
                           step_gather(mesh, cfg.mesh.strategy, int(cfg.mesh.fsdp_min_size), cfg.mesh.get("rules")))
    state = create_train_state(params, tx, bool(cfg.train_uncond_vector), use_ema=bool(cfg.ema_decay))
    del params
    shapes = _batch_shapes(model_config, int(cfg.batch_size))
    t0 = time.time()
    compiled = compile_step(step_fn, jax.eval_shape(lambda: state), mesh, shapes, cfg.mesh.strategy,
                            int(cfg.mesh.fsdp_min_size), cfg.mesh.get("rules"))
    log.info("AOT compile: %.1f s", time.time() - t0)

    loader = _loader(cfg, model_config, "train", eval_mode=False)
    data_iter = iter(loader)
    abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                      jax.eval_shape(lambda: state), compiled.state_shardings)
    if start is not None:
        start, restored = ckpt.restore_latest_good(abstract, data_iter)
    if start is not None:
        log.info("resuming from step %d in %s", start, ckpt.directory)
        state = restored
        del restored
    else:
        start = 0
        state = place(state, compiled.state_shardings)  # every process holds the same seeded init
        if jax.process_index() == 0:
            (workdir_path / "model_config.json").write_text(json.dumps(model_config.to_dict(), indent=2))
            tokenizer = text_tokenizer_dir(cfg)
            if tokenizer:  # the run is self-contained: sampling and export find the tokenizer here
                paths.copy_tree(tokenizer, workdir_path / "tokenizer")
    barrier("sketchcomp: compiled and restored")  # the first step's collectives start together
    config_json = config_to_json(cfg)
    writer = MetricsWriter(workdir_path, enabled=jax.process_index() == 0)
    # A preempted run saves without its monitors of that step (to leave quickly); the resumed run does them
    # first. The decision depends on the step only, so every process takes it without reading files.
    resuming = 0 < start < cfg.total_steps
    redo_eval = resuming and bool(cfg.eval_every) and start % cfg.eval_every == 0
    redo_grid = resuming and bool(cfg.sample_every) and start % cfg.sample_every == 0
    writer.truncate_after(start, redo_eval=redo_eval)
    lr_of = learning_rate_schedule(cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.get("warmup_f_start", 1e-6))
    stop_reason = "finished"
    last = {}
    from sketchcomp_jax.data.pipeline import to_global_batch

    try:
        from tqdm import tqdm

        bar = tqdm(total=int(cfg.total_steps), initial=start, desc="train", disable=jax.process_index() != 0)
        step = start
        monitors = _Monitors(cfg, model_config, nets, acp, mesh, compiled, gather, writer, workdir_path)
        monitors.run(start, state, eval_due=redo_eval, grid_due=redo_grid)
        window: list[dict] = []
        window_start = time.time()
        while step < cfg.total_steps:
            batch = to_global_batch(_model_inputs(next(data_iter), model_config), compiled.batch_sharding)
            state, metrics = compiled.fn(state, batch)
            step += 1
            window.append(metrics)
            # Agreed by all processes at this step boundary, so all of them save this step and leave together.
            preempted = flag.should_stop() or ckpt.reached_preemption(step)
            saving = step % cfg.checkpoint_every == 0 or step == cfg.total_steps or preempted
            # Rows are written before every save: metrics.jsonl always covers the latest checkpoint.
            if step % cfg.log_every == 0 or saving:
                rows = _window_rows(window, step, time.time() - window_start, cfg, compiled, lr_of, ckpt)
                window, window_start = [], time.time()
                writer.write(rows)
                last = rows[-1]
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            bar.update(1)
            if not preempted:
                monitors.run(step, state)
            if saving:
                ckpt.save(step, state, data_iter, config_json, force=True)
                writer.flush()
            if preempted:
                stop_reason = "preempted"
                log.warning("preempted: saved step %d in %s; re-run the same command to resume", step,
                            ckpt.directory)
                break
        bar.close()
    finally:
        ckpt.wait()
        writer.close()
    return {"step": int(jax.device_get(state.step)), "last": last, "stop_reason": stop_reason,
            "flops_per_step": compiled.flops, "memory": compiled.memory}


class _Monitors:
    """The eval loss and the sample grid of a step, run by every process together (process 0 writes them);
    their programs are built and compiled on first use, once per run."""

    def __init__(self, cfg, model_config: ModelConfig, nets, alphas_cumprod, mesh, compiled, gather, writer,
                 workdir_path):
        self.cfg, self.model_config, self.nets, self.acp, self.mesh = cfg, model_config, nets, alphas_cumprod, mesh
        self.compiled, self.gather, self.writer, self.workdir_path = compiled, gather, writer, workdir_path
        self.eval_loss = self.sample_grid = self.sample_batch = None

    def run(self, step: int, state, eval_due: bool | None = None, grid_due: bool | None = None) -> None:
        """Runs the monitors due at `step` (by `eval_every` / `sample_every`, unless `eval_due` / `grid_due`
        say otherwise)."""
        cfg, compiled = self.cfg, self.compiled
        if eval_due is None:
            eval_due = bool(cfg.eval_every) and step % cfg.eval_every == 0
        if grid_due is None:
            grid_due = bool(cfg.sample_every) and step % cfg.sample_every == 0
        if eval_due:
            if self.eval_loss is None:
                self.eval_loss = EvalLoss(self.nets, self.model_config, self.acp, self.mesh, compiled.state_shardings,
                                          compiled.batch_sharding, self.gather)
            value = _eval_loss(cfg, self.model_config, self.eval_loss, state, compiled.batch_sharding)
            self.writer.write([{"step": step, "eval_loss": value}])
        if grid_due:
            if self.sample_grid is None:  # every process: the same (possibly short) first test batch
                self.sample_batch = next(iter(_loader(cfg, self.model_config, "test", eval_mode=True, epochs=1,
                                                      shard_index=0, shard_count=1, drop_remainder=False)))
                generator = BatchGenerator(self.model_config, self.nets, sampler="plms", steps=int(cfg.sample_steps),
                                           guidance_scale=float(cfg.sample_guidance), vae_encode="mean")
                self.sample_grid = SampleGrid(generator, self.model_config, self.mesh, compiled.state_shardings,
                                              self.gather)
            grid = self.sample_grid(state, self.sample_batch)
            if jax.process_index() == 0:
                save_png(self.workdir_path / "samples" / f"step_{step:07d}.png", grid)
                self.writer.image("samples", grid, step)


def _throughput(seconds_per_step: float, batch_size: int, flops_per_device_step: float | None,
                peak_flops_per_device: float) -> dict[str, float]:
    """Step time, images/s and, when the accelerator's peak is configured, MFU = achieved FLOP/s per
    device (XLA cost analysis of the partitioned step ÷ step time) ÷ peak FLOP/s per device."""
    out = {"seconds_per_step": seconds_per_step, "images_per_second": batch_size / seconds_per_step}
    if flops_per_device_step:
        out["tflops_per_device"] = flops_per_device_step / seconds_per_step / 1e12
        if peak_flops_per_device > 0:
            out["mfu"] = flops_per_device_step / seconds_per_step / peak_flops_per_device
    return out


def _window_rows(window: list[dict], step: int, seconds: float, cfg, compiled, lr_of, ckpt) -> list[dict]:
    """metrics.jsonl rows for the steps in `window` (ending at `step`); raises TrainingDiverged on a
    non-finite loss. The step metrics are replicated, so every process can read them."""
    fetched = jax.device_get(window)
    throughput = _throughput(seconds / len(fetched), int(cfg.batch_size), compiled.flops,
                             float(cfg.get("peak_flops_per_device", 0.0)))
    rows = []
    for offset, m in enumerate(fetched):
        s = step - len(fetched) + offset + 1
        row = {"step": s, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
               "lr": float(lr_of(jnp.asarray(s - 1))), "uncond_fraction": float(m["uncond_fraction"]), **throughput}
        if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
            raise TrainingDiverged(
                f"loss became {row['loss']} at step {s}; stopping without saving. The last good "
                f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}. Lower the learning "
                "rate or enable gradient clipping (--config.optim.grad_clip_norm=1.0)"
            )
        rows.append(row)
    return rows


def _eval_loss(cfg, model_config: ModelConfig, eval_loss: EvalLoss, state, batch_sharding) -> float:
    """Mean ε-MSE over `eval_batches` global batches of the test split (each process reads its shard)."""
    from sketchcomp_jax.data.pipeline import to_global_batch

    try:
        loader = _loader(cfg, model_config, "test", eval_mode=True, epochs=1)
    except ValueError as e:  # e.g. a test split smaller than one global batch
        log.warning("eval loss skipped: %s", e)
        return float("nan")
    batches = []
    for i, batch in enumerate(loader):
        if i >= cfg.eval_batches:
            break
        batches.append(to_global_batch(_model_inputs(batch, model_config), batch_sharding))
    return eval_loss(state, batches)
