"""Flat PyTorch state dicts (LDM or diffusers layout) ↔ our Flax parameter tree.

`ldm_to_params` checks every key and shape against the architecture and reports mismatches with
counts, the first few names and the likely cause; `expand_input_channels` is the paper's channel
surgery (zero-initialised extra U-Net input channels, channel order preserved).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sketchcomp_jax.models.config import ModelConfig, build_networks
from sketchcomp_jax.weights.errors import CheckpointError
from sketchcomp_jax.weights.keymap import (
    EMA_DECAY_KEY,
    EMA_NUM_UPDATES_KEY,
    EMA_PREFIX,
    UNET_PREFIX,
    KeyEntry,
    ema_key,
    is_ignored_ldm_key,
    ldm_key_from_ema,
    model_entries,
)

log = logging.getLogger(__name__)
StateDict = Mapping[str, np.ndarray]
CONV_IN_KEY = f"{UNET_PREFIX}input_blocks.0.0.weight"
ALLOWED_EXPANSIONS = {(4, 9), (4, 12), (9, 12)}
CHANNEL_NAMES = {4: "Stable Diffusion (4-channel)", 9: "Paint-by-Example (9-channel)", 12: "Paint-by-Sketch (12-channel)"}


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes do not match the architecture."""


WEIGHT_CHOICES = ("raw", "ema")


def select_unet_weights(
    sd: StateDict, weights: str | None = None, yaml_use_ema: bool | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Picks the U-Net weights an LDM checkpoint is used with, as the original's `DDPM` does.

    With `use_ema` (LDM's default, True when the YAML omits it or no YAML is given) and `model_ema.*`
    buffers present, sampling runs inside `ema_scope()`, i.e. on LitEma's copy; `weights` ('raw' | 'ema')
    overrides. Returns the state dict with the chosen U-Net under `model.diffusion_model.*` and no
    `model_ema.*` keys, plus a record `{unet_weights, reason, ema_decay, ema_num_updates}`.
    Raises `CheckpointMismatchError` for `weights='ema'` without EMA buffers, `weights='raw'` with an
    EMA-only checkpoint, or an EMA set that does not cover the U-Net.
    """
    if weights is not None and weights not in WEIGHT_CHOICES:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHT_CHOICES)}, not {weights!r}")
    ema_names = [k for k in sd if k.startswith(EMA_PREFIX) and k not in (EMA_DECAY_KEY, EMA_NUM_UPDATES_KEY)]
    raw_keys = [k for k in sd if k.startswith(UNET_PREFIX)]
    rest = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    record: dict[str, Any] = {"ema_decay": None, "ema_num_updates": None}
    if EMA_DECAY_KEY in sd:
        record["ema_decay"] = float(np.asarray(sd[EMA_DECAY_KEY]))
    if EMA_NUM_UPDATES_KEY in sd:
        record["ema_num_updates"] = int(np.asarray(sd[EMA_NUM_UPDATES_KEY]))
    if not ema_names:
        if weights == "ema":
            raise CheckpointMismatchError(
                "--weights ema: the checkpoint has no EMA weights (no model_ema.* buffers); drop --weights or use --weights raw"
            )
        record.update(unet_weights="raw", reason="the checkpoint has no EMA weights")
        return rest, record
    use_ema_default = True if yaml_use_ema is None else bool(yaml_use_ema)
    if not raw_keys:
        if weights == "raw":
            raise CheckpointMismatchError(
                "--weights raw: the checkpoint holds only EMA weights (model_ema.*, no model.diffusion_model.*); "
                "drop --weights or use --weights ema"
            )
        choice, reason = "ema", "the checkpoint holds only EMA weights"
    elif weights is not None:
        choice, reason = weights, f"--weights {weights}"
    elif yaml_use_ema is None:
        choice, reason = "ema", "use_ema not set (LDM's default is True)"
    else:
        choice, reason = ("ema" if use_ema_default else "raw"), f"the YAML says use_ema: {use_ema_default}"
    record.update(unet_weights=choice, reason=reason)
    if choice == "raw":
        return rest, record
    by_key = {}
    unreadable = []
    for name in ema_names:
        key = ldm_key_from_ema(name)
        if key is None or not key.startswith(UNET_PREFIX):
            unreadable.append(name)
        else:
            by_key[key] = sd[name]
    if unreadable:
        raise CheckpointMismatchError("EMA weights with names that are not the LDM U-Net's: " + _listing("keys", sorted(unreadable)))
    if raw_keys:
        missing = sorted(k for k in raw_keys if k not in by_key)
        extra = sorted(k for k in by_key if k not in set(raw_keys))
        if missing or extra:
            parts = ([_listing("U-Net tensors without an EMA copy", [ema_key(k) for k in missing])] if missing else []) + (
                [_listing("EMA tensors without a U-Net tensor", [ema_key(k) for k in extra])] if extra else []
            )
            raise CheckpointMismatchError(
                "the checkpoint's EMA weights do not match its U-Net: " + "; ".join(parts) + "; pass --weights raw"
            )
        for k in raw_keys:
            if tuple(np.shape(by_key[k])) != tuple(np.shape(sd[k])):
                raise CheckpointMismatchError(
                    f"EMA tensor {ema_key(k)} has shape {tuple(np.shape(by_key[k]))} but {k} has "
                    f"{tuple(np.shape(sd[k]))}; pass --weights raw"
                )
    rest = {k: v for k, v in rest.items() if not k.startswith(UNET_PREFIX)}
    rest.update(by_key)
    return rest, record


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    head = ", ".join(items[:limit])
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {title}: {head}{more}"


def _guess_cause(missing: list[str], unexpected: list[str]) -> str:
    hints = []
    if any(k.startswith("cond_stage_model.transformer.text_model") for k in unexpected):
        hints.append(
            "this looks like a text-conditioned Stable Diffusion checkpoint (CLIP *text* encoder); "
            "Paint-by-Example needs the CLIP vision tower, mapper and proj_out — convert a Paint-by-Example checkpoint, "
            "or pass --clip_from CLIP_FOLDER to initialise Paint-by-Example from it as the original does"
        )
    if missing and all(not k.startswith(UNET_PREFIX) for k in missing) and any(
        k.startswith("cond_stage_model") for k in missing
    ):
        hints.append("the conditioner (CLIP vision/mapper) is missing: is this a U-Net-only file?")
    if missing and any(k.startswith(UNET_PREFIX) for k in missing) and any(k.startswith(UNET_PREFIX) for k in unexpected):
        hints.append("the U-Net block structure differs: check --ldm_config (channel_mult, num_res_blocks, attention)")
    return ("; likely cause: " + "; ".join(hints)) if hints else ""


def abstract_params(config: ModelConfig) -> dict[str, Any]:
    """Parameter shapes (a pytree of `jax.ShapeDtypeStruct`) of the full model, without allocating."""
    nets = build_networks(config)
    lat = config.latent_size
    rng = jax.random.PRNGKey(0)

    def init():
        unet = nets.unet.init(
            rng,
            jnp.zeros((1, lat, lat, config.unet.in_channels)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1, 1, config.context_dim)),
        )["params"]
        # The VAE is built at a tiny spatial size: its parameter shapes do not depend on the input size.
        size = 2 * config.vae.downsample_factor
        vae = nets.vae.init(rng, jnp.zeros((1, size, size, config.vae.in_channels)))["params"]
        cond = nets.conditioner.init(rng, config.dummy_conditioning_input())["params"]
        return {"unet": unet, "vae": vae, "conditioner": cond}

    return jax.eval_shape(init)


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node = tree
    for part in path:
        node = node[part]
    return node


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def torch_to_flax(entry: KeyEntry, tensor: np.ndarray) -> np.ndarray:
    """One PyTorch-layout tensor → its Flax layout (float32)."""
    t = np.asarray(tensor, dtype=np.float32)
    if entry.kind == "conv":
        return np.ascontiguousarray(t.transpose(2, 3, 1, 0))
    if entry.kind == "linear":
        return np.ascontiguousarray(t.T)
    if entry.kind == "pointwise":
        return np.ascontiguousarray(t.reshape(t.shape[0], t.shape[1]).T)
    return t


def flax_to_torch(entry: KeyEntry, array: np.ndarray, ndim: int | None = None) -> np.ndarray:
    """One Flax-layout array → PyTorch layout. `ndim` picks the 1×1-conv (4) or Linear (2) form of `pointwise`."""
    a = np.asarray(array)
    if entry.kind == "conv":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if entry.kind == "linear":
        return np.ascontiguousarray(a.T)
    if entry.kind == "pointwise":
        w = np.ascontiguousarray(a.T)
        return w.reshape(w.shape + (1, 1)) if (ndim or entry.ldm_ndim) == 4 else w
    return a


def expand_input_channels(weight: np.ndarray, target: int) -> np.ndarray:
    """Zero-extends the U-Net `conv_in` weight (out, in, kh, kw) to `target` input channels.

    The original initialises Paint-by-Example from SD (4→9) and Paint-by-Sketch from PbE (9→12) this
    way; existing channels keep their order and values, new ones are zero so the model's output is
    unchanged until training moves them.
    """
    current = weight.shape[1]
    if current == target:
        return weight
    if (current, target) not in ALLOWED_EXPANSIONS:
        raise CheckpointMismatchError(
            f"cannot change the U-Net input channels from {current} to {target}: only "
            f"{sorted(ALLOWED_EXPANSIONS)} (zero-initialised new channels) are supported"
        )
    pad = np.zeros((weight.shape[0], target - current) + weight.shape[2:], weight.dtype)
    return np.concatenate([weight, pad], axis=1)


def ldm_to_params(sd: StateDict, config: ModelConfig) -> dict[str, Any]:
    """LDM-layout state dict → Flax params `{'unet', 'vae', 'conditioner'}` (float32 numpy arrays).

    `config.unet.in_channels` may exceed the checkpoint's `conv_in` channels (channel surgery). Raises
    `CheckpointMismatchError` naming missing / unexpected / wrongly-shaped keys.
    """
    sd = normalize_clip_prefix(sd, "cond_stage_model.transformer.")
    ckpt_in = sd[CONV_IN_KEY].shape[1] if CONV_IN_KEY in sd else None
    target_in = config.unet.in_channels
    if ckpt_in is not None and ckpt_in != target_in:
        if ckpt_in > target_in or (ckpt_in, target_in) not in ALLOWED_EXPANSIONS:
            name = CHANNEL_NAMES.get(ckpt_in, f"{ckpt_in}-channel")
            raise CheckpointMismatchError(
                f"U-Net input channels: the checkpoint's {CONV_IN_KEY} has {ckpt_in} channels "
                f"(a {name} U-Net) but the model wants {target_in}; "
                + (
                    f"pass --in_channels {target_in} to add zero-initialised channels"
                    if (ckpt_in, target_in) in ALLOWED_EXPANSIONS
                    else f"use a model config with in_channels={ckpt_in}"
                )
            )
        log.info("expanding U-Net input channels %d → %d (zero-initialised)", ckpt_in, target_in)
        sd[CONV_IN_KEY] = expand_input_channels(np.asarray(sd[CONV_IN_KEY]), target_in)

    expected = abstract_params(config)
    entries = model_entries(config)
    params: dict[str, Any] = {}
    missing, wrong_shape = [], []
    used = set()
    for entry in entries:
        if entry.ldm_key not in sd:
            missing.append(entry.ldm_key)
            continue
        used.add(entry.ldm_key)
        value = torch_to_flax(entry, sd[entry.ldm_key])
        want = _get_path(expected, entry.flax_path).shape
        if entry.ldm_key == "learnable_vector" and value.ndim == 2:
            value = value[None]
        if tuple(value.shape) != tuple(want):
            wrong_shape.append(
                f"{entry.ldm_key} {tuple(np.shape(sd[entry.ldm_key]))} (expected torch shape "
                f"{tuple(flax_to_torch(entry, np.zeros(want)).shape)})"
            )
            continue
        _set_path(params, entry.flax_path, value)
    unexpected = sorted(k for k in sd if k not in used and not is_ignored_ldm_key(k))
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if wrong_shape:
            parts.append(_listing("keys with the wrong shape", wrong_shape))
        raise CheckpointMismatchError(
            "checkpoint does not match the model architecture: " + "; ".join(parts) + _guess_cause(missing, unexpected)
        )
    return params


def params_to_ldm(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """Flax params → the original LDM-layout state dict (network weights only, float32 numpy)."""
    out = {}
    for entry in model_entries(config):
        out[entry.ldm_key] = flax_to_torch(entry, np.asarray(_get_path(params, entry.flax_path), np.float32))
    return out


def normalize_clip_prefix(sd: StateDict, prefix: str) -> dict[str, np.ndarray]:
    """Puts CLIP vision weights saved by transformers ≥ 5 (`{prefix}embeddings.*`, no `vision_model.`
    level) under `{prefix}vision_model.*`, the layout of every released checkpoint."""
    flat_marker = f"{prefix}embeddings.class_embedding"
    if flat_marker not in sd:
        return dict(sd)
    clip_parts = ("embeddings.", "encoder.layers.", "pre_layrnorm.", "post_layernorm.")
    out = {}
    for key, value in sd.items():
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if rest is not None and rest.startswith(clip_parts):
            key = f"{prefix}vision_model.{rest}"
        out[key] = value
    return out


def diffusers_to_ldm(components: Mapping[str, Mapping[str, np.ndarray]], config: ModelConfig) -> dict[str, np.ndarray]:
    """diffusers state dicts per component (`unet`, `vae`, `image_encoder`) → one LDM-layout state dict.

    Uses the same entries as the LDM map, so a diffusers folder and an LDM checkpoint of the same
    model yield identical params. The mapper's separate q/k/v are fused back into `c_qkv` (valid
    because the mapper has a single head, as diffusers' conversion assumes).
    """
    components = dict(components)
    if "image_encoder" in components:
        components["image_encoder"] = normalize_clip_prefix(components["image_encoder"], "model.")
    out: dict[str, np.ndarray] = {}
    missing = []
    used: dict[str, set[str]] = {name: set() for name in components}
    for entry in model_entries(config):
        comp = components.get(entry.diffusers_component)
        if comp is None:
            raise CheckpointMismatchError(f"diffusers folder has no '{entry.diffusers_component}' component")
        keys = entry.diffusers_key if isinstance(entry.diffusers_key, tuple) else (entry.diffusers_key,)
        if not all(k in comp for k in keys):
            missing += [f"{entry.diffusers_component}/{k}" for k in keys if k not in comp]
            continue
        used[entry.diffusers_component].update(keys)
        tensors = [np.asarray(comp[k]) for k in keys]
        value = np.concatenate(tensors, axis=0) if len(tensors) > 1 else tensors[0]
        if entry.kind == "pointwise":
            value = value.reshape(value.shape[:2] + ((1, 1) if entry.ldm_ndim == 4 else ()))
        if entry.ldm_key == "learnable_vector":
            value = value.reshape(1, 1, -1)
        out[entry.ldm_key] = value
    unexpected = sorted(
        f"{name}/{k}"
        for name, comp in components.items()
        for k in comp
        if k not in used[name] and not k.endswith("position_ids")
    )
    if missing or unexpected:
        parts = [_listing("missing keys", missing)] if missing else []
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        raise CheckpointMismatchError("diffusers weights do not match the model architecture: " + "; ".join(parts))
    return out


def unet_params_from_diffusers(state_dict: StateDict, config: ModelConfig) -> dict[str, Any]:
    """A lone diffusers `UNet2DConditionModel` state dict → our U-Net params (the `unet` subtree).

    For U-Net-only work (benchmarks, swapping a U-Net into an existing model directory)."""
    from sketchcomp_jax.weights.keymap import unet_entries

    remaining = dict(state_dict)
    params: dict[str, Any] = {}
    missing = []
    for entry in unet_entries(config):
        if entry.diffusers_key not in remaining:
            missing.append(entry.diffusers_key)
            continue
        _set_path(params, entry.flax_path, torch_to_flax(entry, remaining.pop(entry.diffusers_key)))
    if missing or remaining:
        parts = [_listing("missing keys", missing)] if missing else []
        if remaining:
            parts.append(_listing("unexpected keys", sorted(remaining)))
        raise CheckpointMismatchError("diffusers U-Net does not match the config: " + "; ".join(parts))
    return params["unet"]
