"""CLIP text encoder weights: transformers `CLIPTextModel` state dict <-> Flax params of `CLIPTextTower`.

Key map (one entry per tensor, built from the config; `P` is the prefix, see below):

| torch key (after `P`)                                   | Flax path                       | convention      |
|---------------------------------------------------------|---------------------------------|-----------------|
| `embeddings.token_embedding.weight` (V, D)              | `token_embedding`               | copy            |
| `embeddings.position_embedding.weight` (77, D)          | `position_embedding`            | copy            |
| `encoder.layers.{i}.self_attn.{q,k,v,out}_proj.weight`  | `layers_{i}/{q,k,v,out}_proj/kernel` | (out, in) -> (in, out) |
| `encoder.layers.{i}.self_attn.{q,k,v,out}_proj.bias`    | `layers_{i}/{...}_proj/bias`    | copy            |
| `encoder.layers.{i}.layer_norm{1,2}.{weight,bias}`      | `layers_{i}/layer_norm{1,2}/{scale,bias}` | copy  |
| `encoder.layers.{i}.mlp.fc{1,2}.weight` / `.bias`       | `layers_{i}/fc{1,2}/kernel` / `bias` | transpose / copy |
| `final_layer_norm.{weight,bias}`                        | `final_layer_norm/{scale,bias}` | copy            |

`embeddings.position_ids` (a buffer, saved by transformers < 4.31) is dropped.

Prefixes recognised, in this order: `cond_stage_model.transformer.text_model.` (an LDM checkpoint whose
`FrozenCLIPEmbedder.transformer` is a `CLIPTextModel`, e.g. SD v1 and Paint-by-T+S), `cond_stage_model.
transformer.` (the same with the inner `CLIPTextTransformer` saved directly), `text_model.` (a
`CLIPTextModel` as published on the hub and saved by transformers 4, or a full `CLIPModel` such as
`openai/clip-vit-large-patch14`, whose vision tower and projections are then ignored) and no prefix
(transformers 5's `CLIPTextModel.state_dict()` / `save_pretrained`, which dropped the `text_model` level). Keys outside a non-empty prefix (the U-Net, VAE, vision
tower, ...) are ignored; keys inside it must match the map exactly.

Without a config, it is inferred from the shapes: vocab, hidden size, positions, layers and the MLP
width. The head count cannot be read from shapes: it defaults to hidden/64 (CLIP's head width: 12 for
ViT-L/14's 768) unless given. `eos_token_id` then defaults to vocab_size - 1 (CLIP's vocabulary ends
with `<|endoftext|>`); it only chooses how `pooled` finds the end-of-text token.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from sketchcomp_jax.models.clip_text import CLIPTextConfig
from sketchcomp_jax.weights.errors import CheckpointError
from sketchcomp_jax.weights.key_check import key_listing, shape_mismatches

__all__ = [
    "TEXT_PREFIXES",
    "TextEncoderCheckpointError",
    "TextKey",
    "infer_text_config",
    "load_clip_text",
    "split_text_state_dict",
    "text_key_map",
    "text_params_from_state_dict",
    "text_params_to_state_dict",
]

log = logging.getLogger(__name__)

TEXT_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.", "text_model.", "")
_ANCHOR = "embeddings.token_embedding.weight"
_IGNORED = ("embeddings.position_ids",)
_CLIP_HEAD_DIM = 64


class TextEncoderCheckpointError(CheckpointError):
    """The state dict is not a CLIP text encoder matching the config: missing, unexpected or misshaped keys."""


@dataclasses.dataclass(frozen=True)
class TextKey:
    """One tensor: its transformers key (without prefix), Flax path, convention and torch shape."""

    torch_key: str
    flax_path: tuple[str, ...]
    kind: str  # "copy" or "linear" ((out, in) <-> (in, out))
    torch_shape: tuple[int, ...]


def text_key_map(config: CLIPTextConfig) -> list[TextKey]:
    """Every tensor of `CLIPTextModel` for `config`, in transformers' state-dict order."""
    d, f = config.hidden_size, config.intermediate_size
    keys = [
        TextKey("embeddings.token_embedding.weight", ("token_embedding",), "copy", (config.vocab_size, d)),
        TextKey("embeddings.position_embedding.weight", ("position_embedding",), "copy", (config.max_position_embeddings, d)),
    ]

    def linear(torch_name: str, flax: tuple[str, ...], out_dim: int, in_dim: int) -> list[TextKey]:
        return [
            TextKey(f"{torch_name}.weight", flax + ("kernel",), "linear", (out_dim, in_dim)),
            TextKey(f"{torch_name}.bias", flax + ("bias",), "copy", (out_dim,)),
        ]

    def norm(torch_name: str, flax: tuple[str, ...]) -> list[TextKey]:
        return [
            TextKey(f"{torch_name}.weight", flax + ("scale",), "copy", (d,)),
            TextKey(f"{torch_name}.bias", flax + ("bias",), "copy", (d,)),
        ]

    for i in range(config.num_hidden_layers):
        t, fl = f"encoder.layers.{i}", (f"layers_{i}",)
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            keys += linear(f"{t}.self_attn.{proj}", fl + (proj,), d, d)
        keys += norm(f"{t}.layer_norm1", fl + ("layer_norm1",))
        keys += linear(f"{t}.mlp.fc1", fl + ("fc1",), f, d)
        keys += linear(f"{t}.mlp.fc2", fl + ("fc2",), d, f)
        keys += norm(f"{t}.layer_norm2", fl + ("layer_norm2",))
    keys += norm("final_layer_norm", ("final_layer_norm",))
    return keys


def split_text_state_dict(sd: Mapping[str, Any], *, source: str = "state dict") -> tuple[dict[str, Any], str]:
    """Finds the text encoder in `sd` and returns (its tensors with the prefix removed, the prefix).

    Raises `TextEncoderCheckpointError` when no key `<prefix>embeddings.token_embedding.weight` exists for
    any prefix in `TEXT_PREFIXES`.
    """
    for prefix in TEXT_PREFIXES:
        if prefix + _ANCHOR in sd:
            inner = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            ignored = len(sd) - len(inner)
            if ignored:
                log.info("%s: CLIP text encoder under %r; %d other tensors ignored", source, prefix, ignored)
            return inner, prefix
    near = [k for k in sd if k.endswith(_ANCHOR)]
    hint = f" It has {key_listing(near, 3)}, under a prefix not supported." if near else ""
    raise TextEncoderCheckpointError(
        f"{source}: no CLIP text encoder found: expected a key '<prefix>{_ANCHOR}' with prefix one of "
        f"{', '.join(repr(p) for p in TEXT_PREFIXES)} (transformers CLIPTextModel / LDM FrozenCLIPEmbedder "
        f"layout; OpenCLIP's layout, as in SD 2, is not supported).{hint} First keys: {key_listing(sorted(sd), 5)}"
    )


def infer_text_config(
    inner: Mapping[str, Any], *, num_attention_heads: int | None = None, source: str = "state dict", **overrides: Any
) -> CLIPTextConfig:
    """A `CLIPTextConfig` from the shapes of a prefix-free text state dict (see the module docstring).

    `num_attention_heads` defaults to hidden/64; `overrides` set any other field (e.g. hidden_act).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in inner:
            raise TextEncoderCheckpointError(f"{source}: cannot infer the CLIP text config: missing key {key}")
        return tuple(np.shape(inner[key]))

    vocab, hidden = shape("embeddings.token_embedding.weight")
    positions = shape("embeddings.position_embedding.weight")[0]
    layer_ids = {int(m.group(1)) for k in inner if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    if not layer_ids:
        raise TextEncoderCheckpointError(f"{source}: cannot infer the CLIP text config: no encoder.layers.* keys")
    intermediate = shape("encoder.layers.0.mlp.fc1.weight")[0]
    if num_attention_heads is None:
        if hidden % _CLIP_HEAD_DIM:
            raise TextEncoderCheckpointError(
                f"{source}: hidden size {hidden} is not a multiple of CLIP's head width {_CLIP_HEAD_DIM}; the head "
                "count cannot be inferred: pass num_attention_heads or a config JSON"
            )
        num_attention_heads = hidden // _CLIP_HEAD_DIM
    fields = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=max(layer_ids) + 1,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=positions,
        eos_token_id=vocab - 1,
    )
    fields.update(overrides)
    return CLIPTextConfig(**fields)


def _as_config(config: CLIPTextConfig | Mapping | str | os.PathLike | None) -> CLIPTextConfig | None:
    if config is None or isinstance(config, CLIPTextConfig):
        return config
    if isinstance(config, Mapping):
        return CLIPTextConfig.from_dict(dict(config))
    return CLIPTextConfig.from_json(config)


def text_params_from_state_dict(
    sd: Mapping[str, Any],
    config: CLIPTextConfig | Mapping | str | os.PathLike | None = None,
    *,
    num_attention_heads: int | None = None,
    source: str = "state dict",
) -> tuple[CLIPTextConfig, dict]:
    """transformers / LDM state dict -> (config, Flax params of `CLIPTextTower`, float32 numpy arrays).

    `config`: a `CLIPTextConfig`, a transformers config dict or JSON path (`CLIPTextConfig` or full
    `CLIPConfig`), or None to infer it from the shapes (`num_attention_heads` then sets the heads).
    Raises `TextEncoderCheckpointError` naming the missing, unexpected or misshaped keys.
    """
    inner, prefix = split_text_state_dict(sd, source=source)
    inner = {k: v for k, v in inner.items() if k not in _IGNORED}
    cfg = _as_config(config)
    if cfg is None:
        cfg = infer_text_config(inner, num_attention_heads=num_attention_heads, source=source)
    entries = text_key_map(cfg)
    expected = {e.torch_key for e in entries}
    missing = [prefix + e.torch_key for e in entries if e.torch_key not in inner]
    unexpected = sorted(prefix + k for k in inner if k not in expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {key_listing(missing, 10)}")
    if unexpected:
        problems.append(f"unexpected keys: {key_listing(unexpected, 10)}")
    bad = shape_mismatches(inner, {e.torch_key: e.torch_shape for e in entries}, prefix)
    if bad:
        problems.append(f"wrong shapes: {key_listing(bad, 6)}")
    if problems:
        raise TextEncoderCheckpointError(
            f"{source}: not a CLIP text encoder matching the config (vocab {cfg.vocab_size}, hidden "
            f"{cfg.hidden_size}, {cfg.num_hidden_layers} layers, MLP {cfg.intermediate_size}, "
            f"{cfg.max_position_embeddings} positions): " + "; ".join(problems)
            + ". Pass the config.json that belongs to these weights, or none to infer it from the shapes."
        )
    params: dict = {}
    for e in entries:
        value = np.asarray(inner[e.torch_key], dtype=np.float32)
        if e.kind == "linear":
            value = value.T
        node = params
        for name in e.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[e.flax_path[-1]] = np.ascontiguousarray(value)
    return cfg, params


def text_params_to_state_dict(
    params: Mapping[str, Any],
    config: CLIPTextConfig,
    *,
    prefix: str = "text_model.",
    include_position_ids: bool = False,
) -> dict[str, np.ndarray]:
    """Flax params of `CLIPTextTower` -> transformers `CLIPTextModel` state dict (float32, torch layout).

    `prefix` "text_model." (default) gives the hub layout of every published `CLIPTextModel` checkpoint,
    which `from_pretrained` of transformers 4 and 5 loads; "" gives transformers 5's own
    `state_dict()` keys (for `load_state_dict(strict=True)`); "cond_stage_model.transformer.text_model."
    gives the LDM layout. `include_position_ids` adds the int64 `embeddings.position_ids` (1, positions)
    buffer that transformers < 4.31 saved and expects when loading strictly.
    """
    if "params" in params and "token_embedding" not in params:
        params = params["params"]
    out: dict[str, np.ndarray] = {}
    missing = []
    for e in text_key_map(config):
        node: Any = params
        for name in e.flax_path:
            if not isinstance(node, Mapping) or name not in node:
                missing.append("/".join(e.flax_path))
                break
            node = node[name]
        else:
            value = np.asarray(node, dtype=np.float32)
            flax_shape = value.shape
            if e.kind == "linear":
                value = value.T
            if value.shape != e.torch_shape:
                raise TextEncoderCheckpointError(
                    f"Flax param {'/'.join(e.flax_path)} has shape {flax_shape}, which does not fit the config "
                    f"({e.torch_key} must be {e.torch_shape} in torch layout)"
                )
            out[prefix + e.torch_key] = np.ascontiguousarray(value)
    expected = {"/".join(e.flax_path) for e in text_key_map(config)}
    unexpected = sorted(p for p in _flat_paths(params) if p not in expected)
    if missing or unexpected:
        raise TextEncoderCheckpointError(
            "Flax params do not match the CLIP text config: "
            + "; ".join(s for s in (missing and f"missing {key_listing(missing, 10)}", unexpected and f"unexpected {key_listing(unexpected, 10)}") if s)
        )
    if include_position_ids:
        out[prefix + "embeddings.position_ids"] = np.arange(config.max_position_embeddings, dtype=np.int64)[None]
    return out


def _flat_paths(tree: Mapping[str, Any], base: str = "") -> list[str]:
    paths = []
    for k, v in tree.items():
        path = f"{base}/{k}" if base else str(k)
        paths += _flat_paths(v, path) if isinstance(v, Mapping) else [path]
    return paths


def load_clip_text(
    path: str | os.PathLike,
    config: CLIPTextConfig | Mapping | str | os.PathLike | None = None,
    *,
    num_attention_heads: int | None = None,
) -> tuple[CLIPTextConfig, dict]:
    """Loads a CLIP text encoder into (config, Flax params), torch-free.

    `path` is one of:
      * a transformers folder: `config.json` (`CLIPTextConfig` or full `CLIPConfig`) and `model.safetensors`
        / `pytorch_model.bin` (also sharded `*.index.json` or `.fp16`-style variants), e.g.
        `openai/clip-vit-large-patch14` or an SD pipeline's `text_encoder/`; a pipeline root with a
        `text_encoder/` sub-folder is accepted too;
      * a weights file (`.ckpt`, `.safetensors`, `.bin`): an LDM checkpoint (`cond_stage_model.transformer.`)
        or a bare `CLIPTextModel` state dict; the config is inferred from the shapes unless given.
    An explicit `config` overrides the folder's `config.json`. Files are read by
    `sketchcomp_jax.weights.readers` (no pickle code runs).
    """
    from sketchcomp_jax.weights.folders import component_weights
    from sketchcomp_jax.weights.readers import read_state_dict

    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"CLIP text encoder not found: {p}; pass a transformers folder (config.json + model.safetensors) "
            "or a checkpoint file"
        )
    if p.is_dir():
        if not (p / "config.json").is_file() and (p / "text_encoder" / "config.json").is_file():
            p = p / "text_encoder"
        cfg = _as_config(config)
        if cfg is None:
            config_path = p / "config.json"
            if not config_path.is_file():
                raise FileNotFoundError(
                    f"{p}: no config.json; a transformers CLIPTextModel folder needs config.json next to its "
                    "weights (or pass config=...)"
                )
            cfg = CLIPTextConfig.from_json(config_path)
        sd = component_weights(p)
        return text_params_from_state_dict(sd, cfg, source=str(p))
    sd = read_state_dict(p)
    return text_params_from_state_dict(sd, config, num_attention_heads=num_attention_heads, source=str(p))
