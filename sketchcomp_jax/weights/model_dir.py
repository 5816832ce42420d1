"""The model directory: the one on-disk form every tool reads (`sample.py`, `export.py`, training, eval).

Layout::

    DIR/config.json   ModelConfig.to_dict() (format "sketchcomp-jax-model", every hyper-parameter named)
    DIR/params/       Orbax checkpoint of {'unet', 'vae', 'conditioner'} float32 params
    DIR/source.json   where the weights came from (path, format, channel surgery) — informational
    DIR/tokenizer/    text baseline only: the CLIP tokenizer (vocab.json, merges.txt) its tags go through
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, NamedTuple

import jax
import numpy as np

from sketchcomp_jax import paths
from sketchcomp_jax.models.config import ModelConfig


class LoadedModel(NamedTuple):
    config: ModelConfig
    params: dict[str, Any]


TOKENIZER_DIR = "tokenizer"


def save_model_dir(out_dir: str | os.PathLike, config: ModelConfig, params: dict[str, Any], source: dict | None = None,
                   overwrite: bool = False, tokenizer_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes `config.json` + Orbax params to `out_dir` (created). Refuses to overwrite an existing
    model directory unless `overwrite=True`; writes to a temporary sibling first so a failed write
    never leaves a half-written directory in place. A text-conditioned model needs its `tokenizer_dir`,
    which is copied in. A remote `out_dir` (`gs://...`, no directory renames there) is written in place with
    `config.json` last: until it exists the directory is not a model directory."""
    if config.conditioning == "text" and tokenizer_dir is None:
        raise ValueError("a text-conditioned model directory needs its CLIP tokenizer folder (tokenizer_dir)")
    import orbax.checkpoint as ocp

    out = paths.absolute(out_dir)
    remote = paths.is_remote(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"output directory {out} exists and is not empty; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not remote and not os.access(out.parent, os.W_OK):
        raise PermissionError(f"cannot write to {out.parent}")
    tmp = out if remote else out.with_name(out.name + ".partial")
    paths.rmtree(tmp)
    tmp.mkdir(parents=True)
    host_params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "params", host_params)
        ckptr.wait_until_finished()
    config_dict = config.to_dict()
    if source and source.get("weights"):
        # Which U-Net weights the params hold (the checkpoint's raw or EMA copy) and why; informational,
        # ModelConfig.from_dict ignores it.
        config_dict["weights"] = source["weights"]
    (tmp / "source.json").write_text(json.dumps(source or {}, indent=2, default=str) + "\n")
    if tokenizer_dir is not None:
        paths.copy_tree(tokenizer_dir, tmp / TOKENIZER_DIR)
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")  # last: marks it complete
    if not remote:
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return out


def load_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = paths.as_path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a model directory (no config.json); make one with "
            "`python launch/convert.py --src CHECKPOINT --out DIR`"
        )
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_model(model_dir: str | os.PathLike, shardings: Any = None) -> LoadedModel:
    """Reads a model directory → `(ModelConfig, params)`.

    Without `shardings` the params are restored onto the first local device; pass a pytree of
    `jax.sharding.Sharding` (same structure as the params) to restore straight onto a mesh.
    """
    import orbax.checkpoint as ocp

    from sketchcomp_jax.weights.convert import abstract_params

    config = load_config(model_dir)
    params_dir = paths.absolute(model_dir) / "params"
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} has a config.json but no params/ directory; re-run launch/convert.py")
    abstract = abstract_params(config)
    if shardings is None:
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract)
    target = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, np.float32, sharding=sh), abstract, shardings
    )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(params_dir, target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"params in {params_dir} do not match its config.json: {e}") from None
    return LoadedModel(config, params)


def model_tokenizer_dir(model_dir: str | os.PathLike, config: ModelConfig | None = None) -> pathlib.Path | None:
    """The CLIP tokenizer of a text-conditioned model directory (or training work directory); None for the
    reference-conditioned models. Raises FileNotFoundError when a text model's tokenizer is missing."""
    config = config or load_config(model_dir)
    if config.conditioning != "text":
        return None
    folder = paths.as_path(model_dir) / TOKENIZER_DIR
    if not (folder / "vocab.json").is_file():
        raise FileNotFoundError(f"{model_dir} is a text-conditioned model but has no {TOKENIZER_DIR}/vocab.json")
    return folder
