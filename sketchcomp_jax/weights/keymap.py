"""Explicit key maps between the original LDM checkpoint layout, the diffusers layout and our Flax params.

The maps are generated from the same block layout the Flax modules are built from
(`models.unet.unet_layout`, the VAE/CLIP/mapper configs), one entry per PyTorch parameter, each with
its three names and its tensor convention. No string substitution is involved: every name is built
from the architecture, so a missing or extra key is a real mismatch.

Tensor conventions (`kind`):
  * `conv`      — torch OIHW ↔ Flax HWIO;
  * `linear`    — torch (out, in) ↔ Flax (in, out);
  * `pointwise` — a per-pixel linear map stored as a 1×1 conv (O, I, 1, 1) or a Linear (O, I)
                  depending on the format (`ldm_ndim` / `diffusers_ndim`) ↔ Flax Dense (in, out);
  * `copy`      — biases, norm weights, embeddings, the unconditional vector: unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from sketchcomp_jax.diffusion.schedule import SCHEDULE_KEYS
from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.models.unet import AttnSpec, DownSpec, ResSpec, UpSpec, unet_layout

FlaxPath = tuple[str, ...]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.vision_model."
MAPPER_PREFIX = "cond_stage_model.mapper.resblocks."
# LitEma's buffers: one per U-Net parameter, named `model_ema.` + the key after `model.` with its dots
# removed (torch buffer names cannot contain dots), plus the decay and the update counter.
EMA_PREFIX = "model_ema."
EMA_DECAY_KEY = "model_ema.decay"
EMA_NUM_UPDATES_KEY = "model_ema.num_updates"


@dataclasses.dataclass(frozen=True)
class KeyEntry:
    """One PyTorch tensor: its LDM key, its diffusers (component, key), its Flax path and convention.

    `diffusers_key` is None for tensors diffusers has no slot for; for the mapper's fused `c_qkv` it
    is a tuple of the three keys (`to_q`, `to_k`, `to_v`) that diffusers splits it into (dim 0).
    """

    ldm_key: str
    diffusers_component: str
    diffusers_key: str | tuple[str, str, str] | None
    flax_path: FlaxPath
    kind: str
    ldm_ndim: int = 0
    diffusers_ndim: int = 0


@dataclasses.dataclass(frozen=True)
class _Module:
    ldm: str
    diffusers: str | tuple[str, str, str]
    flax: FlaxPath
    kind: str  # conv, conv_nobias, linear, linear_nobias, pointwise, norm
    ldm_ndim: int = 0
    diffusers_ndim: int = 0


def _expand(component: str, modules: list[_Module]) -> Iterator[KeyEntry]:
    for m in modules:
        if m.kind == "norm":
            leaves = [("weight", "scale", "copy"), ("bias", "bias", "copy")]
        elif m.kind in ("conv", "conv_nobias"):
            leaves = [("weight", "kernel", "conv")] + ([("bias", "bias", "copy")] if m.kind == "conv" else [])
        elif m.kind in ("linear", "linear_nobias", "fused_qkv"):
            leaves = [("weight", "kernel", "linear")] + ([("bias", "bias", "copy")] if m.kind != "linear_nobias" else [])
        elif m.kind == "pointwise":
            leaves = [("weight", "kernel", "pointwise"), ("bias", "bias", "copy")]
        elif m.kind == "param":
            leaves = [(None, None, "copy")]
        else:  # pragma: no cover
            raise ValueError(m.kind)
        for torch_leaf, flax_leaf, kind in leaves:
            if torch_leaf is None:
                ldm_key, flax_path = m.ldm, m.flax
                dif_key = m.diffusers
            else:
                ldm_key = f"{m.ldm}.{torch_leaf}"
                flax_path = m.flax + (flax_leaf,)
                if isinstance(m.diffusers, tuple):
                    dif_key = tuple(f"{d}.{torch_leaf}" for d in m.diffusers)
                else:
                    dif_key = f"{m.diffusers}.{torch_leaf}"
            ndims = (m.ldm_ndim, m.diffusers_ndim) if kind == "pointwise" else (0, 0)
            yield KeyEntry(ldm_key, component, dif_key, flax_path, kind, *ndims)


def _resblock_unet(ldm: str, dif: str, flax: FlaxPath, spec: ResSpec) -> list[_Module]:
    mods = [
        _Module(f"{ldm}.in_layers.0", f"{dif}.norm1", flax + ("in_norm",), "norm"),
        _Module(f"{ldm}.in_layers.2", f"{dif}.conv1", flax + ("in_conv",), "conv"),
        _Module(f"{ldm}.emb_layers.1", f"{dif}.time_emb_proj", flax + ("emb_proj",), "linear"),
        _Module(f"{ldm}.out_layers.0", f"{dif}.norm2", flax + ("out_norm",), "norm"),
        _Module(f"{ldm}.out_layers.3", f"{dif}.conv2", flax + ("out_conv",), "conv"),
    ]
    if spec.in_channels != spec.out_channels:
        mods.append(_Module(f"{ldm}.skip_connection", f"{dif}.conv_shortcut", flax + ("skip",), "conv"))
    return mods


def _spatial_transformer(ldm: str, dif: str, flax: FlaxPath, depth: int, linear_proj: bool) -> list[_Module]:
    proj_ndim = 2 if linear_proj else 4
    mods = [
        _Module(f"{ldm}.norm", f"{dif}.norm", flax + ("norm",), "norm"),
        _Module(f"{ldm}.proj_in", f"{dif}.proj_in", flax + ("proj_in",), "pointwise", proj_ndim, proj_ndim),
    ]
    for d in range(depth):
        b_ldm, b_dif, b_flax = f"{ldm}.transformer_blocks.{d}", f"{dif}.transformer_blocks.{d}", flax + (
            f"transformer_blocks_{d}",
        )
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                mods.append(_Module(f"{b_ldm}.{attn}.{proj}", f"{b_dif}.{attn}.{proj}", b_flax + (attn, proj), "linear_nobias"))
            mods.append(_Module(f"{b_ldm}.{attn}.to_out.0", f"{b_dif}.{attn}.to_out.0", b_flax + (attn, "to_out"), "linear"))
        for norm in ("norm1", "norm2", "norm3"):
            mods.append(_Module(f"{b_ldm}.{norm}", f"{b_dif}.{norm}", b_flax + (norm,), "norm"))
        mods.append(_Module(f"{b_ldm}.ff.net.0.proj", f"{b_dif}.ff.net.0.proj", b_flax + ("ff_in",), "linear"))
        mods.append(_Module(f"{b_ldm}.ff.net.2", f"{b_dif}.ff.net.2", b_flax + ("ff_out",), "linear"))
    mods.append(_Module(f"{ldm}.proj_out", f"{dif}.proj_out", flax + ("proj_out",), "pointwise", proj_ndim, proj_ndim))
    return mods


def unet_entries(config: ModelConfig) -> list[KeyEntry]:
    cfg = config.unet
    layout = unet_layout(cfg)
    p = UNET_PREFIX
    root: FlaxPath = ("unet",)
    mods = [
        _Module(f"{p}time_embed.0", "time_embedding.linear_1", root + ("time_embed_0",), "linear"),
        _Module(f"{p}time_embed.2", "time_embedding.linear_2", root + ("time_embed_2",), "linear"),
        _Module(f"{p}input_blocks.0.0", "conv_in", root + ("input_blocks_0",), "conv"),
        _Module(f"{p}out.0", "conv_norm_out", root + ("out_norm",), "norm"),
        _Module(f"{p}out.2", "conv_out", root + ("out_conv",), "conv"),
    ]
    per_level = cfg.num_res_blocks + 1

    def block_modules(ldm_block: str, flax_block: str, layers, dif_res: str, dif_attn: str, dif_sampler: str):
        out = []
        for j, layer in enumerate(layers):
            ldm, flax = f"{p}{ldm_block}.{j}", root + (f"{flax_block}_{j}",)
            if isinstance(layer, ResSpec):
                out += _resblock_unet(ldm, dif_res, flax, layer)
            elif isinstance(layer, AttnSpec):
                out += _spatial_transformer(ldm, dif_attn, flax, cfg.transformer_depth, cfg.use_linear_projection)
            elif isinstance(layer, DownSpec):
                out.append(_Module(f"{ldm}.op", dif_sampler, flax, "conv"))
            elif isinstance(layer, UpSpec):
                out.append(_Module(f"{ldm}.conv", dif_sampler, flax, "conv"))
        return out

    for i, block in enumerate(layout.input_blocks[1:], start=1):
        level, k = divmod(i - 1, per_level)
        mods += block_modules(
            f"input_blocks.{i}", f"input_blocks_{i}", block.layers,
            f"down_blocks.{level}.resnets.{k}", f"down_blocks.{level}.attentions.{k}",
            f"down_blocks.{level}.downsamplers.0.conv",
        )
    mid = layout.middle_block.layers
    mods += _resblock_unet(f"{p}middle_block.0", "mid_block.resnets.0", root + ("middle_block_0",), mid[0])
    mods += _spatial_transformer(
        f"{p}middle_block.1", "mid_block.attentions.0", root + ("middle_block_1",), cfg.transformer_depth,
        cfg.use_linear_projection,
    )
    mods += _resblock_unet(f"{p}middle_block.2", "mid_block.resnets.1", root + ("middle_block_2",), mid[2])
    for i, block in enumerate(layout.output_blocks):
        level, k = divmod(i, per_level)
        mods += block_modules(
            f"output_blocks.{i}", f"output_blocks_{i}", block.layers,
            f"up_blocks.{level}.resnets.{k}", f"up_blocks.{level}.attentions.{k}",
            f"up_blocks.{level}.upsamplers.0.conv",
        )
    return list(_expand("unet", mods))


def _resblock_vae(ldm: str, dif: str, flax: FlaxPath, in_ch: int, out_ch: int) -> list[_Module]:
    mods = [
        _Module(f"{ldm}.norm1", f"{dif}.norm1", flax + ("norm1",), "norm"),
        _Module(f"{ldm}.conv1", f"{dif}.conv1", flax + ("conv1",), "conv"),
        _Module(f"{ldm}.norm2", f"{dif}.norm2", flax + ("norm2",), "norm"),
        _Module(f"{ldm}.conv2", f"{dif}.conv2", flax + ("conv2",), "conv"),
    ]
    if in_ch != out_ch:
        mods.append(_Module(f"{ldm}.nin_shortcut", f"{dif}.conv_shortcut", flax + ("nin_shortcut",), "conv"))
    return mods


def _attn_vae(ldm: str, dif: str, flax: FlaxPath) -> list[_Module]:
    mods = [_Module(f"{ldm}.norm", f"{dif}.group_norm", flax + ("norm",), "norm")]
    for ours, theirs in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        mods.append(_Module(f"{ldm}.{ours}", f"{dif}.{theirs}", flax + (ours,), "pointwise", 4, 2))
    return mods


def vae_entries(config: ModelConfig) -> list[KeyEntry]:
    cfg = config.vae
    p = VAE_PREFIX
    n = len(cfg.ch_mult)
    enc: FlaxPath = ("vae", "encoder")
    dec: FlaxPath = ("vae", "decoder")
    mods = [_Module(f"{p}encoder.conv_in", "encoder.conv_in", enc + ("conv_in",), "conv")]
    ch, resolution = cfg.ch, cfg.resolution
    for level, mult in enumerate(cfg.ch_mult):
        out_ch = cfg.ch * mult
        for i in range(cfg.num_res_blocks):
            mods += _resblock_vae(
                f"{p}encoder.down.{level}.block.{i}", f"encoder.down_blocks.{level}.resnets.{i}",
                enc + (f"down_{level}_block_{i}",), ch, out_ch,
            )
            ch = out_ch
            if resolution in cfg.attn_resolutions:
                mods += _attn_vae(
                    f"{p}encoder.down.{level}.attn.{i}", f"encoder.down_blocks.{level}.attentions.{i}",
                    enc + (f"down_{level}_attn_{i}",),
                )
        if level != n - 1:
            mods.append(_Module(
                f"{p}encoder.down.{level}.downsample.conv", f"encoder.down_blocks.{level}.downsamplers.0.conv",
                enc + (f"down_{level}_downsample",), "conv",
            ))
            resolution //= 2
    for side, root in (("encoder", enc), ("decoder", dec)):
        mid_ch = cfg.ch * cfg.ch_mult[-1]
        mods += _resblock_vae(f"{p}{side}.mid.block_1", f"{side}.mid_block.resnets.0", root + ("mid_block_1",), mid_ch, mid_ch)
        mods += _attn_vae(f"{p}{side}.mid.attn_1", f"{side}.mid_block.attentions.0", root + ("mid_attn_1",))
        mods += _resblock_vae(f"{p}{side}.mid.block_2", f"{side}.mid_block.resnets.1", root + ("mid_block_2",), mid_ch, mid_ch)
        mods.append(_Module(f"{p}{side}.norm_out", f"{side}.conv_norm_out", root + ("norm_out",), "norm"))
        mods.append(_Module(f"{p}{side}.conv_out", f"{side}.conv_out", root + ("conv_out",), "conv"))
    mods.append(_Module(f"{p}decoder.conv_in", "decoder.conv_in", dec + ("conv_in",), "conv"))
    ch = cfg.ch * cfg.ch_mult[-1]
    resolution = cfg.resolution // cfg.downsample_factor
    for level in reversed(range(n)):
        out_ch = cfg.ch * cfg.ch_mult[level]
        dif_level = n - 1 - level  # diffusers numbers decoder up-blocks in execution order
        for i in range(cfg.num_res_blocks + 1):
            mods += _resblock_vae(
                f"{p}decoder.up.{level}.block.{i}", f"decoder.up_blocks.{dif_level}.resnets.{i}",
                dec + (f"up_{level}_block_{i}",), ch, out_ch,
            )
            ch = out_ch
            if resolution in cfg.attn_resolutions:
                mods += _attn_vae(
                    f"{p}decoder.up.{level}.attn.{i}", f"decoder.up_blocks.{dif_level}.attentions.{i}",
                    dec + (f"up_{level}_attn_{i}",),
                )
        if level != 0:
            mods.append(_Module(
                f"{p}decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{dif_level}.upsamplers.0.conv",
                dec + (f"up_{level}_upsample",), "conv",
            ))
            resolution *= 2
    mods.append(_Module(f"{p}quant_conv", "quant_conv", ("vae", "quant_conv"), "conv"))
    mods.append(_Module(f"{p}post_quant_conv", "post_quant_conv", ("vae", "post_quant_conv"), "conv"))
    return list(_expand("vae", mods))


def _clip_vision_modules(clip_config, ldm_prefix: str, diffusers_prefix: str, flax_root: FlaxPath) -> list[_Module]:
    """A transformers `CLIPVisionModel`'s tensors (`<prefix>embeddings…`, `encoder.layers.{i}…`, …)."""
    c, d, clip = ldm_prefix, diffusers_prefix, flax_root
    mods = [
        _Module(f"{c}embeddings.class_embedding", f"{d}embeddings.class_embedding", clip + ("class_embedding",), "param"),
        _Module(f"{c}embeddings.patch_embedding", f"{d}embeddings.patch_embedding", clip + ("patch_embedding",), "conv_nobias"),
        _Module(
            f"{c}embeddings.position_embedding.weight", f"{d}embeddings.position_embedding.weight",
            clip + ("position_embedding",), "param",
        ),
        _Module(f"{c}pre_layrnorm", f"{d}pre_layrnorm", clip + ("pre_layrnorm",), "norm"),
        _Module(f"{c}post_layernorm", f"{d}post_layernorm", clip + ("post_layernorm",), "norm"),
    ]
    for i in range(clip_config.num_hidden_layers):
        lc, ld, lf = f"{c}encoder.layers.{i}", f"{d}encoder.layers.{i}", clip + (f"layers_{i}",)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            mods.append(_Module(f"{lc}.self_attn.{proj}", f"{ld}.self_attn.{proj}", lf + (proj,), "linear"))
        mods.append(_Module(f"{lc}.layer_norm1", f"{ld}.layer_norm1", lf + ("layer_norm1",), "norm"))
        mods.append(_Module(f"{lc}.layer_norm2", f"{ld}.layer_norm2", lf + ("layer_norm2",), "norm"))
        mods.append(_Module(f"{lc}.mlp.fc1", f"{ld}.mlp.fc1", lf + ("fc1",), "linear"))
        mods.append(_Module(f"{lc}.mlp.fc2", f"{ld}.mlp.fc2", lf + ("fc2",), "linear"))
    return mods


def clip_vision_entries(clip_config, prefix: str = "vision_model.", flax_root: FlaxPath = ("clip",)) -> list[KeyEntry]:
    """Entries of a stand-alone transformers CLIP vision tower (`CLIPModel` / `CLIPVisionModel` keys under
    `prefix`), for loading a CLIP used as a metric; both the LDM and diffusers names are `prefix…`."""
    return list(_expand("clip", _clip_vision_modules(clip_config, prefix, prefix, flax_root)))


def conditioner_entries(config: ModelConfig) -> list[KeyEntry]:
    """CLIP vision tower, mapper, final LN, proj_out and the unconditional vector."""
    mods = _clip_vision_modules(config.clip, CLIP_PREFIX, "model.vision_model.", ("conditioner", "clip"))
    root: FlaxPath = ("conditioner",)
    for i in range(config.mapper.layers):
        lm, ld, lf = f"{MAPPER_PREFIX}{i}", f"mapper.blocks.{i}", root + (f"mapper_{i}",)
        mods += [
            _Module(f"{lm}.attn.c_qkv", (f"{ld}.attn1.to_q", f"{ld}.attn1.to_k", f"{ld}.attn1.to_v"), lf + ("c_qkv",), "fused_qkv"),
            _Module(f"{lm}.attn.c_proj", f"{ld}.attn1.to_out.0", lf + ("attn_c_proj",), "linear"),
            _Module(f"{lm}.ln_1", f"{ld}.norm1", lf + ("ln_1",), "norm"),
            _Module(f"{lm}.ln_2", f"{ld}.norm3", lf + ("ln_2",), "norm"),
            _Module(f"{lm}.mlp.c_fc", f"{ld}.ff.net.0.proj", lf + ("c_fc",), "linear"),
            _Module(f"{lm}.mlp.c_proj", f"{ld}.ff.net.2", lf + ("mlp_c_proj",), "linear"),
        ]
    mods += [
        _Module("cond_stage_model.final_ln", "final_layer_norm", root + ("final_ln",), "norm"),
        _Module("proj_out", "proj_out", root + ("proj_out",), "linear"),
        _Module("learnable_vector", "uncond_vector", root + ("uncond_vector",), "param"),
    ]
    return list(_expand("image_encoder", mods))


def model_entries(config: ModelConfig) -> list[KeyEntry]:
    """Every tensor of the model, in checkpoint order (U-Net, VAE, conditioner)."""
    return unet_entries(config) + vae_entries(config) + conditioner_entries(config)


# Tensors of an LDM checkpoint that are not learned weights of the networks; skipped when reading.
DDPM_BUFFERS = SCHEDULE_KEYS


def is_ignored_ldm_key(key: str) -> bool:
    """Buffers and bookkeeping tensors that carry no model weights (recomputed or irrelevant)."""
    return (
        key in DDPM_BUFFERS
        or key in ("lvlb_weights", "logvar")
        or key.endswith("embeddings.position_ids")
        or key.startswith("first_stage_model.loss.")
        or key.startswith("model_ema.")
    )


def ema_key(ldm_key: str) -> str:
    """`model.diffusion_model.input_blocks.0.0.weight` → `model_ema.diffusion_modelinput_blocks00weight`
    (LitEma's buffer name for a U-Net parameter)."""
    if not ldm_key.startswith("model."):
        raise ValueError(f"LitEma tracks only the U-Net (model.*), not {ldm_key!r}")
    return EMA_PREFIX + ldm_key[len("model."):].replace(".", "")


# Words of the LDM U-Net's parameter names (with the digits that belong to the word, e.g. `attn1`), longest
# first so that `out_layers` is not read as `out` + `_layers`.
_UNET_WORDS = sorted(
    [
        "diffusion_model", "input_blocks", "output_blocks", "middle_block", "time_embed", "out", "in_layers",
        "out_layers", "emb_layers", "skip_connection", "op", "conv", "norm", "proj_in", "proj_out",
        "transformer_blocks", "attn1", "attn2", "to_q", "to_k", "to_v", "to_out", "norm1", "norm2", "norm3",
        "ff", "net", "proj", "weight", "bias",
    ],
    key=len,
    reverse=True,
)


def ldm_key_from_ema(name: str) -> str | None:
    """Inverse of `ema_key` for the LDM U-Net's names, or None when `name` cannot be parsed.

    The dots are gone, so the name is re-tokenised with the U-Net's vocabulary: a digit run after
    `input_blocks` / `output_blocks` is the block index followed by a one-digit layer index; every
    other index is one digit (layer indices, `transformer_blocks` depth < 10). Callers check the
    result by mapping it back with `ema_key`.
    """
    if not name.startswith(EMA_PREFIX):
        return None
    rest, parts = name[len(EMA_PREFIX):], []
    while rest:
        digits = len(rest) - len(rest.lstrip("0123456789"))
        if digits:
            run, rest = rest[:digits], rest[digits:]
            if parts and parts[-1] in ("input_blocks", "output_blocks") and len(run) >= 2:
                parts += [run[:-1], run[-1]]
            else:
                parts += list(run)
            continue
        word = next((w for w in _UNET_WORDS if rest.startswith(w)), None)
        if word is None:
            return None
        parts.append(word)
        rest = rest[len(word):]
    key = "model." + ".".join(parts)
    return key if ema_key(key) == name else None
