"""Torch-free readers of diffusers pipeline folders and transformers / diffusers model folders
(`config.json` + weights, possibly sharded or a dtype variant)."""
from __future__ import annotations

import logging
import os
import pathlib

import numpy as np

from sketchcomp_jax.weights.errors import CorruptCheckpointError, DiffusersFolderError
from sketchcomp_jax.weights.read_common import read_json, require_exists
from sketchcomp_jax.weights.readers import DIFFUSERS_COMPONENTS, read_state_dict

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# diffusers folders
# --------------------------------------------------------------------------------------------------

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_VARIANT_PREFERENCE = ("fp32", "fp16", "bf16")


def _read_sharded(index_path: pathlib.Path) -> dict[str, np.ndarray]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index_path}: a shard index without a 'weight_map'")
    folder = index_path.parent
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or pathlib.PurePath(shard).name != shard or shard in ("", ".", ".."):
            raise CorruptCheckpointError(f"{index_path}: shard name {shard!r:.80} is not a file name in {folder}")
        shards.setdefault(shard, []).append(tensor)
    out: dict[str, np.ndarray] = {}
    for shard, tensors in shards.items():
        shard_path = folder / shard
        if not shard_path.is_file():
            raise DiffusersFolderError(f"{shard_path}: shard listed in {index_path.name} is missing; download it")
        sd = read_state_dict(shard_path)
        missing = [t for t in tensors if t not in sd]
        if missing:
            raise CorruptCheckpointError(f"{shard_path}: lacks tensors listed in {index_path.name}: {missing[:5]}")
        out.update({t: sd[t] for t in tensors})
    return out


def _variant_rank(path: pathlib.Path, stem: str) -> tuple[int, str]:
    variant = path.name[len(stem) + 1:].split(".")[0]
    return (_VARIANT_PREFERENCE.index(variant) if variant in _VARIANT_PREFERENCE else len(_VARIANT_PREFERENCE), variant)


def component_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
    for ext in (".safetensors", ".bin"):
        for stem in _WEIGHT_STEMS:
            single, index = folder / f"{stem}{ext}", folder / f"{stem}{ext}.index.json"
            if single.is_file():
                return read_state_dict(single)
            if index.is_file():
                return _read_sharded(index)
    for ext in (".safetensors", ".bin"):  # variants: <stem>.<variant><ext> or <stem><ext>.index.<variant>.json
        for stem in _WEIGHT_STEMS:
            singles = [p for p in folder.glob(f"{stem}.*{ext}") if p.name.count(".") == 2 and "-of-" not in p.name]
            indexes = list(folder.glob(f"{stem}{ext}.index.*.json"))
            if singles:
                chosen = min(singles, key=lambda p: _variant_rank(p, stem))
                log.info("%s: using weights variant %s", folder, chosen.name)
                return read_state_dict(chosen)
            if indexes:
                chosen = min(indexes, key=lambda p: p.name)
                log.info("%s: using sharded weights variant %s", folder, chosen.name)
                return _read_sharded(chosen)
    present = sorted(p.name for p in folder.iterdir())[:12]
    raise DiffusersFolderError(
        f"{folder}: no weights file ({', '.join(s + '.safetensors' for s in _WEIGHT_STEMS)}, .bin, or a sharded "
        f"*.index.json); found {present}. The download is incomplete."
    )


def read_diffusers_folder(path: str | os.PathLike) -> dict[str, dict]:
    """Reads a diffusers pipeline folder without torch.

    Returns `{'unet': {'config': dict, 'state_dict': {name: ndarray}}, 'vae': {...}, 'image_encoder':
    {...}}` for those of the three subfolders that exist (each needs `config.json` plus
    `diffusion_pytorch_model.safetensors` / `model.safetensors` / `pytorch_model.bin` style weights,
    possibly sharded with an `*.index.json`, or a `.fp16`-style variant when no plain file exists), plus
    `'model_index'`: the parsed `model_index.json` when the folder has one.

    Raises `CheckpointNotFoundError`, `DiffusersFolderError` (a file, or none of the subfolders, or a
    subfolder without config / weights) and whatever `read_state_dict` raises for a weights file.
    """
    path = require_exists(path)
    if not path.is_dir():
        raise DiffusersFolderError(f"{path}: a file, not a diffusers pipeline folder; use read_state_dict(path)")
    out: dict[str, dict] = {}
    for comp in DIFFUSERS_COMPONENTS:
        folder = path / comp
        if folder.is_dir():
            config, state_dict = read_transformers_folder(folder)
            out[comp] = {"config": config, "state_dict": state_dict}
    if not out:
        raise DiffusersFolderError(
            f"{path}: none of the subfolders {', '.join(c + '/' for c in DIFFUSERS_COMPONENTS)} exists; not a "
            "diffusers Paint-by-Example pipeline folder"
        )
    if (path / "model_index.json").is_file():
        out["model_index"] = read_json(path / "model_index.json")
    return out


def read_transformers_folder(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """A transformers / diffusers model folder (`config.json` + weights) → (config dict, state dict), torch-free.

    The weights may be `model.safetensors`, `pytorch_model.bin`, a sharded `*.index.json` or a variant, as in
    `read_diffusers_folder`. Raises `CheckpointNotFoundError` or `DiffusersFolderError` naming what is missing.
    """
    folder = require_exists(path)
    if not folder.is_dir():
        raise DiffusersFolderError(f"{folder}: a file, not a model folder with config.json and weights")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DiffusersFolderError(f"{folder}: missing config.json; not a model folder, or the download is incomplete")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{config_path}: not a JSON object")
    return config, component_weights(folder)
