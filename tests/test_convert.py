"""launch/convert.py and the converter's checks: CLI, channel surgery, mismatches, bad files."""
import os
import pickle
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sketchcomp_jax.models.config import build_networks
from sketchcomp_jax.weights.convert import CONV_IN_KEY, CheckpointMismatchError, expand_input_channels
from sketchcomp_jax.weights.errors import CheckpointError
from sketchcomp_jax.weights.model_dir import load_model
from sketchcomp_jax.weights.sources import convert_checkpoint

from tests.conftest import REPO_ROOT


def run_convert(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "convert.py"), *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )


def tiny_args(fixtures_dir):
    return ["--ldm_config", fixtures_dir / "pbs_tiny.yaml", "--clip_config", fixtures_dir / "pbs_tiny_clip_config.json",
            "--resolution", 64]


@pytest.mark.parametrize("name", ["pbs_tiny.ckpt", "pbs_tiny.safetensors"])
def test_cli_acceptance_command(tmp_path, fixtures_dir, name):
    out = tmp_path / "model"
    proc = run_convert("--src", fixtures_dir / name, *tiny_args(fixtures_dir), "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "U-Net 12→4 channels" in proc.stdout
    model = load_model(out)
    assert model.config.unet.in_channels == 12 and model.config.resolution == 64
    ref = load_file(fixtures_dir / "pbs_tiny.safetensors")
    np.testing.assert_array_equal(
        np.asarray(model.params["unet"]["input_blocks_0"]["kernel"]), ref[CONV_IN_KEY].transpose(2, 3, 1, 0)
    )
    # A second run must not clobber the existing model directory.
    again = run_convert("--src", fixtures_dir / name, *tiny_args(fixtures_dir), "--out", out)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    assert load_model(out).config == model.config


@pytest.fixture(scope="module")
def pbe_like(fixtures_dir, tmp_path_factory):
    """The tiny checkpoint cut down to a 9-channel Paint-by-Example U-Net."""
    sd = load_file(fixtures_dir / "pbs_tiny.safetensors")
    sd[CONV_IN_KEY] = np.ascontiguousarray(sd[CONV_IN_KEY][:, :9])
    path = tmp_path_factory.mktemp("pbe") / "pbe_tiny.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_nine_channel_checkpoint_with_twelve_channel_yaml_names_the_fix(pbe_like, fixtures_dir):
    path, _ = pbe_like
    with pytest.raises(CheckpointMismatchError, match=r"Paint-by-Example \(9-channel\).*--in_channels 12"):
        convert_checkpoint(path, fixtures_dir / "pbs_tiny.yaml", fixtures_dir / "pbs_tiny_clip_config.json", 64)


def test_channel_surgery_appends_zero_sketch_channels(pbe_like, fixtures_dir, tmp_path):
    path, sd = pbe_like
    clip = fixtures_dir / "pbs_tiny_clip_config.json"
    yaml9 = tmp_path / "pbe_tiny.yaml"
    yaml9.write_text((fixtures_dir / "pbs_tiny.yaml").read_text().replace("in_channels: 12", "in_channels: 9"))
    pbe, _ = convert_checkpoint(path, yaml9, clip_config=clip, resolution=64)
    assert pbe.config.unet.in_channels == 9 and not pbe.config.uses_sketch
    pbs, source = convert_checkpoint(path, fixtures_dir / "pbs_tiny.yaml", clip, 64, in_channels=12)
    assert source["checkpoint_in_channels"] == 9 and pbs.config.unet.in_channels == 12
    kernel = np.asarray(pbs.params["unet"]["input_blocks_0"]["kernel"])  # HWIO
    np.testing.assert_array_equal(kernel[:, :, :9], sd[CONV_IN_KEY].transpose(2, 3, 1, 0))
    assert not kernel[:, :, 9:].any()
    # Zero sketch channels: the expanded model computes exactly what the PbE model computes.
    rng = np.random.default_rng(0)
    x9 = rng.standard_normal((1, 16, 16, 9)).astype(np.float32)
    sketch = rng.standard_normal((1, 16, 16, 3)).astype(np.float32)
    t, ctx = jnp.array([500]), jnp.asarray(rng.standard_normal((1, 1, 32)).astype(np.float32))
    eps9 = build_networks(pbe.config).unet.apply({"params": pbe.params["unet"]}, x9, t, ctx)
    eps12 = build_networks(pbs.config).unet.apply({"params": pbs.params["unet"]}, np.concatenate([x9, sketch], -1), t, ctx)
    np.testing.assert_allclose(eps12, eps9, rtol=1e-6, atol=1e-6)


def test_expand_refuses_unsupported_changes():
    w = np.ones((8, 12, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError, match="12 to 9"):
        expand_input_channels(w, 9)
    assert expand_input_channels(np.ones((8, 4, 3, 3)), 9)[:, 4:].sum() == 0


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path, fixtures_dir):
    sd = load_file(fixtures_dir / "pbs_tiny.safetensors")
    del sd["model.diffusion_model.out.2.bias"]
    sd["model.diffusion_model.extra_block.weight"] = np.zeros(3, np.float32)
    sd["proj_out.weight"] = np.zeros((32, 31), np.float32)
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        convert_checkpoint(path, fixtures_dir / "pbs_tiny.yaml", fixtures_dir / "pbs_tiny_clip_config.json", 64)
    msg = str(info.value)
    assert "1 missing keys: model.diffusion_model.out.2.bias" in msg
    assert "1 unexpected keys: model.diffusion_model.extra_block.weight" in msg
    assert "1 keys with the wrong shape: proj_out.weight (32, 31)" in msg


def test_clip_config_that_contradicts_the_weights(tmp_path, fixtures_dir):
    bad = tmp_path / "clip.json"
    bad.write_text('{"hidden_size": 64, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}')
    with pytest.raises(CheckpointError, match="hidden_size: config 64 vs checkpoint 32"):
        convert_checkpoint(fixtures_dir / "pbs_tiny.safetensors", clip_config=bad, resolution=64)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cli_refuses_malicious_and_broken_files(tmp_path, fixtures_dir):
    import torch

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Exploit(marker)}, evil)
    proc = run_convert("--src", evil, "--out", tmp_path / "o1")
    assert proc.returncode == 2 and "system', which could run code" in proc.stderr, proc.stderr
    assert not marker.exists()
    raw = tmp_path / "evil.pkl.ckpt"
    raw.write_bytes(pickle.dumps(_Exploit(marker)))
    proc = run_convert("--src", raw, "--out", tmp_path / "o2")
    assert proc.returncode == 2 and not marker.exists()

    truncated = tmp_path / "half.ckpt"
    data = (fixtures_dir / "pbs_tiny.ckpt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    proc = run_convert("--src", truncated, "--out", tmp_path / "o3")
    assert proc.returncode == 2 and str(truncated) in proc.stderr
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not weights")
    proc = run_convert("--src", text, "--out", tmp_path / "o4")
    assert proc.returncode == 2 and str(text) in proc.stderr
    proc = run_convert("--src", tmp_path / "nope.ckpt", "--out", tmp_path / "o5")
    assert proc.returncode == 2 and "nope.ckpt" in proc.stderr
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
