"""Export a model back to the PyTorch world: an LDM `.ckpt`, a diffusers folder, or a safetensors file.

Three formats (see docs/export.md for how to load each one):

* `ldm` — a Lightning-style `torch.save({'state_dict': …, 'global_step', 'epoch'})` checkpoint with exactly
  the key set, shapes and dtypes of the original `LatentDiffusion` (network weights, the int64 CLIP
  `position_ids` buffer and the 12 DDPM schedule buffers), plus `<stem>.yaml` (the original's config format)
  and `<stem>_clip_config.json` (a transformers `CLIPVisionConfig`, which the YAML cannot express).
  Needs torch (imported lazily).
* `safetensors` — the same state dict in one `.safetensors` file (plus the same YAML / CLIP JSON), written
  by our own writer: no torch needed.
* `diffusers` — a `PaintByExamplePipeline` folder (`unet/`, `vae/`, `image_encoder/`, `scheduler/`,
  `feature_extractor/`, `model_index.json`), each component loadable by its class's `from_pretrained`.
  No torch needed either.

Every tensor name comes from the explicit key maps of `keymap.py`, so an export re-converts
(`launch/convert.py --src`) to identical float32 parameters.

Writes are atomic: everything goes to temporary siblings first and is renamed into place at the end, so a
failure never leaves a half-written export nor destroys an existing one.

This module validates, writes and reads sources; the state dicts and configs come from `export_ldm.py`
(LDM state dict + YAML + CLIP JSON) and `export_diffusers.py` (diffusers configs, state dicts, folder writer),
the safetensors bytes from `safetensors_io.py`.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.weights.errors import ExportError, TrainingCheckpointsUnavailableError
from sketchcomp_jax.weights.export_diffusers import check_diffusers_compatible, write_diffusers
from sketchcomp_jax.weights.export_ldm import (
    DTYPES,
    EmaWeights,
    as_export_dtype,
    clip_config_dict,
    ldm_state_dict,
    ldm_yaml_text,
)
from sketchcomp_jax.weights.safetensors_io import save_safetensors

log = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "FORMATS",
    "EmaWeights",
    "ExportError",
    "TrainingCheckpointsUnavailableError",
    "check_diffusers_compatible",
    "clip_config_dict",
    "export",
    "check_output",
    "export_model",
    "ldm_state_dict",
    "ldm_yaml_text",
    "load_params_from_workdir",
    "save_safetensors",
]

FORMATS = ("ldm", "diffusers", "safetensors")

# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _prepare_output(out: pathlib.Path, overwrite: bool, is_dir: bool, companions: tuple[pathlib.Path, ...] = ()) -> None:
    """Refuses outputs that exist (unless `overwrite`), the wrong kind of path, or an unwritable parent."""
    for path in (out, *companions):
        if path.is_dir() and not is_dir:
            raise ExportError(f"{path} is a directory; this format writes a file: give a file path for --out")
        if path.exists() and not path.is_dir() and is_dir:
            raise ExportError(f"{path} is a file; --format diffusers writes a folder: give a directory path for --out")
        exists = path.exists() and (not path.is_dir() or any(path.iterdir()))
        if exists and not overwrite:
            raise ExportError(f"output {path} already exists; choose another --out or pass --overwrite to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output folder {parent}: {e.strerror or e}; choose a writable --out") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {parent} (permission denied); choose a writable --out")


def check_output(out: str | os.PathLike, format: str, overwrite: bool = False) -> pathlib.Path:
    """Validates `--out` for `format` before anything is computed; returns it as an absolute path.

    `ldm` / `safetensors` write a file plus `<stem>.yaml` and `<stem>_clip_config.json` beside it; all
    three are checked. `diffusers` writes a folder (an existing empty folder is fine).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if "://" in os.fspath(out):  # torch.save / safetensors / diffusers write local files only
        raise ExportError(f"--out {os.fspath(out)} is a URL: export to a local path, then copy it "
                          "(e.g. `gcloud storage cp`); --model/--workdir may be gs:// paths")
    out = pathlib.Path(out).absolute()
    if format == "diffusers":
        _prepare_output(out, overwrite, is_dir=True)
        return out
    if out.suffix in (".yaml", ".yml", ".json"):
        raise ExportError(
            f"--out {out} has a config-file suffix; give the weights file, e.g. "
            f"model.{'ckpt' if format == 'ldm' else 'safetensors'}"
        )
    if format == "ldm":
        _require_torch()
    _prepare_output(out, overwrite, is_dir=False, companions=_companions(out))
    return out


def _tmp_sibling(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_files(writers: list[tuple[pathlib.Path, Callable[[pathlib.Path], None]]]) -> list[pathlib.Path]:
    """Runs each writer on a temporary sibling of its path; renames them all into place only if all succeed."""
    temps = []
    try:
        for path, write in writers:
            tmp = _tmp_sibling(path)
            temps.append(tmp)
            write(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise ExportError(f"failed writing {path}: {getattr(e, 'strerror', None) or e}; nothing was changed") from None
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for (path, _), tmp in zip(writers, temps):
        os.replace(tmp, path)
    log.info("wrote %s", ", ".join(str(p) for p, _ in writers))
    return [path for path, _ in writers]


def _write_text(text: str) -> Callable[[pathlib.Path], None]:
    return lambda p: p.write_text(text)


def _write_json(obj: Any) -> Callable[[pathlib.Path], None]:
    return _write_text(json.dumps(obj, indent=2) + "\n")


def _require_torch():
    try:
        import torch
    except ImportError:
        raise ExportError(
            "--format ldm writes a PyTorch .ckpt and needs torch, which is not installed: `pip install -e '.[torch]'` "
            "(or the CPU wheel alone: pip install torch --index-url https://download.pytorch.org/whl/cpu), or use "
            "--format safetensors, which needs no torch"
        ) from None
    return torch


def _to_torch(torch, a: np.ndarray):
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, order="C"))


def _companions(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + ".yaml"), out.with_name(stem + "_clip_config.json")


def export_model(
    config: ModelConfig,
    params: Mapping[str, Any],
    out: str | os.PathLike,
    format: str,
    *,
    dtype: str = "float32",
    ema: EmaWeights | None = None,
    include_ema: bool = False,
    overwrite: bool = False,
    global_step: int = 0,
    epoch: int = 0,
) -> list[pathlib.Path]:
    """Writes `(config, params)` to `out` in `format` ('ldm' | 'diffusers' | 'safetensors').

    Returns the written paths (the main file / folder first). `include_ema=True` requires `ema`
    (else `ExportError: model has no EMA weights`): `ldm` / `safetensors` then also hold the original's
    `model_ema.*` buffers (and the YAML says `use_ema: True`); `diffusers` gets the EMA U-Net.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    as_export_dtype(dtype)
    if config.conditioning != "example":
        raise ExportError(
            "this model is the text-conditioned Paint-by-T+S baseline: export writes Paint-by-Example / Paint-by-Sketch "
            "layouts only; evaluate or sample it here (launch/evaluate.py, launch/sample.py --prompt)"
        )
    if include_ema and ema is None:
        raise ExportError("model has no EMA weights; drop --include_ema (or export a training run that kept an EMA)")
    use_ema = ema if include_ema else None
    if format == "diffusers":
        check_diffusers_compatible(config)
    out = check_output(out, format, overwrite)
    if format == "diffusers":
        return [write_diffusers(config, params, out, dtype, use_ema)]

    yaml_path, clip_path = _companions(out)
    torch = _require_torch() if format == "ldm" else None
    sd = ldm_state_dict(config, params, dtype, use_ema)
    if format == "ldm":
        def write_main(path: pathlib.Path):
            state = {k: _to_torch(torch, v) for k, v in sd.items()}
            torch.save({"state_dict": state, "global_step": int(global_step), "epoch": int(epoch)}, path)
    else:
        def write_main(path: pathlib.Path):
            save_safetensors(sd, path, {"format": "pt"})
    return _write_files([
        (out, write_main),
        (yaml_path, _write_text(ldm_yaml_text(config, use_ema is not None, clip_path.name))),
        (clip_path, _write_json(clip_config_dict(config))),
    ])


# --------------------------------------------------------------------------------------------------
# Sources: a model directory or a training work directory
# --------------------------------------------------------------------------------------------------


def load_params_from_workdir(workdir: str | os.PathLike, step: int | None = None, include_ema: bool = True):
    """`--workdir`: `(ModelConfig, params, EmaWeights | None, global_step)` of a training run.

    Training checkpoints live in `WORKDIR/checkpoints/` (Orbax, one sub-directory per step; the latest unless
    `step` is given). Raises `TrainingCheckpointsUnavailableError` when there are none, naming what exists.
    """
    from sketchcomp_jax.paths import as_path

    workdir = as_path(workdir)  # local or gs://
    if not workdir.is_dir():
        raise ExportError(f"--workdir {workdir} does not exist or is not a directory")
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise TrainingCheckpointsUnavailableError(
            f"no training checkpoints in {workdir} (expected {ckpt_dir}/, written by launch/train.py); "
            "to export converted weights use --model DIR"
        )
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not steps:
        raise TrainingCheckpointsUnavailableError(f"no training checkpoints in {ckpt_dir} (no step directories)")
    if step is not None and step not in steps:
        raise ExportError(f"--step {step} not found in {ckpt_dir}; available steps: {steps}")
    from sketchcomp_jax.train.checkpointing import load_training_params

    try:
        config, params, ema, global_step = load_training_params(workdir, step if step is not None else steps[-1],
                                                                ema="unet" if include_ema else "none")
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    ema_weights = None
    if ema is not None:
        # LitEma's counter is the number of EMA updates (one per optimizer step); runs saved before the
        # counter existed fall back to the step count.
        num_updates = int(ema.get("num_updates", global_step))
        ema_weights = EmaWeights(unet=ema["unet"], decay=_training_ema_decay(ckpt_dir / str(global_step)),
                                 num_updates=num_updates)
    return config, params, ema_weights, global_step


def _training_ema_decay(step_dir: pathlib.Path, default: float = 0.9999) -> float:
    """The run's configured `ema_decay` (from the checkpoint's saved config), or LitEma's default 0.9999."""
    import orbax.checkpoint as ocp

    try:
        cfg = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config")
    except Exception:  # noqa: BLE001 - an unreadable config only loses the decay value, which is then logged
        cfg = None
    decay = cfg.get("ema_decay") if isinstance(cfg, dict) else None
    if not decay:
        log.warning("no ema_decay in %s/config: writing model_ema.decay = %g", step_dir, default)
        return default
    return float(decay)


def _load_model_dir(model_dir: str | os.PathLike):
    from sketchcomp_jax.weights.model_dir import load_model

    from sketchcomp_jax.paths import as_path

    path = as_path(model_dir)  # local or gs://
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ExportError(
            f"{path} is not a model directory (no config.json); make one with "
            "`python launch/convert.py --src CHECKPOINT --out DIR`"
        )
    try:
        return load_model(path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"cannot read the model directory {path}: {e}") from None


def export(
    out: str | os.PathLike,
    format: str,
    *,
    model_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    step: int | None = None,
    dtype: str = "float32",
    include_ema: bool = False,
    overwrite: bool = False,
) -> list[pathlib.Path]:
    """`launch/export.py`: reads a model directory (or a training work directory) and calls `export_model`."""
    if (model_dir is None) == (workdir is None):
        raise ExportError("give exactly one of --model DIR or --workdir DIR")
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    as_export_dtype(dtype)
    if step is not None and workdir is None:
        raise ExportError("--step only applies to --workdir")
    check_output(out, format, overwrite)  # fail fast, before reading any weights
    ema, global_step = None, 0
    if model_dir is not None:
        config, params = _load_model_dir(model_dir)
    else:
        config, params, ema, global_step = load_params_from_workdir(workdir, step, include_ema=include_ema)
    return export_model(
        config, params, out, format, dtype=dtype, ema=ema, include_ema=include_ema, overwrite=overwrite,
        global_step=global_step,
    )
