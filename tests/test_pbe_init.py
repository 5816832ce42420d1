"""`convert.py --clip_from`: Stable Diffusion v1 → Paint-by-Example initialisation (SPEC §1.5).

A tiny random SD-layout checkpoint is built here from the tiny PbS fixture: its 4-channel U-Net (the first
4 input channels) and VAE, a CLIP *text* encoder and EMA buffers as SD v1-4 has them, no vision tower /
mapper / proj_out / unconditional vector. The CLIP vision tower comes from a transformers-layout folder
(`config.json` + `model.safetensors`, `vision_model.*` keys). Checked: SD's raw U-Net and VAE and the
folder's CLIP are copied exactly, the new input channels are zero, the fresh tensors follow PyTorch's
default initialisation (bounds exact, moments statistically), the seed fixes them, and the result runs.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sketchcomp_jax.weights.convert import CONV_IN_KEY, CheckpointMismatchError
from sketchcomp_jax.weights.keymap import CLIP_PREFIX, MAPPER_PREFIX, UNET_PREFIX, VAE_PREFIX, ema_key
from sketchcomp_jax.weights.pbe_init import fresh_conditioner_tensors
from sketchcomp_jax.weights.sources import convert_checkpoint

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def sd_and_clip(fixtures_dir, tmp_path_factory):
    pbs = load_file(fixtures_dir / "pbs_tiny.safetensors")
    d = tmp_path_factory.mktemp("sd")
    sd = {k: v for k, v in pbs.items() if k.startswith((UNET_PREFIX, VAE_PREFIX))}
    sd[CONV_IN_KEY] = np.ascontiguousarray(sd[CONV_IN_KEY][:, :4])
    rng = np.random.default_rng(0)
    sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = rng.normal(size=(49, 8)).astype(np.float32)
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = np.ones(8, np.float32)
    for k in [k for k in sd if k.startswith(UNET_PREFIX)]:  # SD v1-4 ships LitEma buffers too
        sd[ema_key(k)] = (sd[k] + 1.0).astype(np.float32)
    sd["model_ema.decay"] = np.array(0.9999, np.float32)
    sd["model_ema.num_updates"] = np.array(100, np.int32)
    sd_path = d / "sd_tiny.safetensors"
    save_file(sd, str(sd_path))
    clip_dir = d / "clip"
    clip_dir.mkdir()
    clip = {"vision_model." + k[len(CLIP_PREFIX):]: v for k, v in pbs.items() if k.startswith(CLIP_PREFIX)}
    clip["visual_projection.weight"] = rng.normal(size=(16, 32)).astype(np.float32)  # a CLIPModel extra: ignored
    save_file(clip, str(clip_dir / "model.safetensors"))
    cfg = json.loads((fixtures_dir / "pbs_tiny_clip_config.json").read_text())
    (clip_dir / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", **cfg}))
    return sd_path, clip_dir, sd, pbs


def test_fresh_tensors_follow_torch_default_init():
    t = fresh_conditioner_tensors(width=64, context_dim=48, seed=3)
    assert len([k for k in t if k.startswith(MAPPER_PREFIX)]) == 5 * 12
    for name, fan_in in [(f"{MAPPER_PREFIX}0.attn.c_qkv", 64), (f"{MAPPER_PREFIX}4.mlp.c_proj", 256), ("proj_out", 64)]:
        bound = 1 / np.sqrt(fan_in)
        for leaf in ("weight", "bias"):
            v = t[f"{name}.{leaf}"]
            assert np.abs(v).max() <= bound
        w = t[f"{name}.weight"]
        # U(-b, b): mean 0, std b/sqrt(3); thousands of samples → within a few standard errors.
        assert abs(w.mean()) < 4 * bound / np.sqrt(3 * w.size)
        assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.05
    assert t[f"{MAPPER_PREFIX}0.attn.c_qkv.weight"].shape == (192, 64)
    assert t[f"{MAPPER_PREFIX}0.mlp.c_proj.weight"].shape == (64, 256)
    assert t["proj_out.weight"].shape == (48, 64)
    np.testing.assert_array_equal(t["cond_stage_model.final_ln.weight"], 1)
    np.testing.assert_array_equal(t[f"{MAPPER_PREFIX}2.ln_2.bias"], 0)
    big = fresh_conditioner_tensors(width=8, context_dim=20000, seed=0)["learnable_vector"]
    assert big.shape == (1, 1, 20000) and abs(big.mean()) < 0.03 and abs(big.std() - 1) < 0.03  # N(0, 1)
    same = fresh_conditioner_tensors(width=64, context_dim=48, seed=3)
    other = fresh_conditioner_tensors(width=64, context_dim=48, seed=4)
    assert all(np.array_equal(same[k], t[k]) for k in t)
    assert not np.array_equal(other["proj_out.weight"], t["proj_out.weight"])


@pytest.mark.parametrize("in_channels", [9, 12])
def test_sd_to_pbe_copies_sd_and_clip_and_extends_channels(sd_and_clip, in_channels):
    from sketchcomp_jax.weights.export import ldm_state_dict

    sd_path, clip_dir, sd, pbs = sd_and_clip
    model, source = convert_checkpoint(sd_path, resolution=64, in_channels=in_channels, clip_from=clip_dir)
    assert model.config.unet.in_channels == in_channels
    assert source["weights"]["unet_weights"] == "raw" and "v1.yaml" in source["weights"]["reason"]
    assert source["initialisation"]["dropped_sd_tensors"] == 2
    out = ldm_state_dict(model.config, model.params)
    for k, v in sd.items():
        if k == CONV_IN_KEY:
            np.testing.assert_array_equal(out[k][:, :4], v)
            assert out[k].shape[1] == in_channels and not out[k][:, 4:].any()
        elif k.startswith((UNET_PREFIX, VAE_PREFIX)):
            np.testing.assert_array_equal(out[k], v, err_msg=k)  # SD's raw U-Net (not the EMA +1 copy), VAE
    for k, v in pbs.items():
        if k.startswith(CLIP_PREFIX) and not k.endswith("position_ids"):
            np.testing.assert_array_equal(out[k], v, err_msg=k)
    fresh = fresh_conditioner_tensors(model.config.mapper.width, model.config.context_dim, seed=0)
    for k, v in fresh.items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    # The initialised conditioner runs and gives one finite context token.
    from sketchcomp_jax.models.config import build_networks

    cond = build_networks(model.config).conditioner
    ctx = cond.apply({"params": model.params["conditioner"]}, model.config.dummy_conditioning_input(2) + 0.1)
    assert ctx.shape == (2, 1, model.config.context_dim) and bool(jnp.isfinite(ctx).all())


def test_cli_and_refusals(sd_and_clip, fixtures_dir, tmp_path):
    sd_path, clip_dir, _, _ = sd_and_clip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "pbs_init"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "convert.py"), "--src", str(sd_path), "--clip_from", str(clip_dir),
         "--in_channels", "12", "--init_seed", "5", "--resolution", "64", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "U-Net 12→4 channels" in proc.stdout
    src_json = json.loads((out / "source.json").read_text())
    assert src_json["initialisation"]["init_seed"] == 5 and src_json["clip_from"].endswith("clip")
    # A Paint-by-Example / -Sketch checkpoint already has its conditioner.
    with pytest.raises(CheckpointMismatchError, match="already has a CLIP vision tower"):
        convert_checkpoint(fixtures_dir / "pbs_tiny.safetensors", resolution=64, clip_from=clip_dir)
    with pytest.raises(CheckpointMismatchError, match="9 .* or 12"):
        convert_checkpoint(sd_path, resolution=64, in_channels=4, clip_from=clip_dir)
    (tmp_path / "noclip").mkdir()
    (tmp_path / "noclip" / "config.json").write_text("{}")
    save_file({"text_model.x": np.zeros(2, np.float32)}, str(tmp_path / "noclip" / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="no CLIP vision tower"):
        convert_checkpoint(sd_path, resolution=64, clip_from=tmp_path / "noclip")
