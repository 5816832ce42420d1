"""Safe readers: torch-free .ckpt reading, safetensors, diffusers folders, refusal of code-running pickles."""
import argparse
import os
import pickle

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from sketchcomp_jax.weights.readers import (
    CorruptCheckpointError,
    UnknownFormatError,
    UnsafeCheckpointError,
    detect_format,
    read_diffusers_folder,
    read_state_dict,
)


def test_ckpt_equals_safetensors_and_torch_load(fixtures_dir):
    ours = read_state_dict(fixtures_dir / "pbs_tiny.ckpt")
    ref = load_file(fixtures_dir / "pbs_tiny.safetensors")
    assert set(ours) == set(ref) and len(ours) == 555
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(ours[key], value)
    assert ours["cond_stage_model.transformer.vision_model.embeddings.position_ids"].dtype == np.int64
    loaded = torch.load(fixtures_dir / "pbs_tiny.ckpt", weights_only=True)["state_dict"]
    for key, value in loaded.items():
        np.testing.assert_array_equal(ours[key], value.numpy())


def test_dtypes_views_and_lightning_extras_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "f16": torch.randn(3, 5).half(),
        "bf16": torch.randn(7).bfloat16(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False]),
        "transposed": base.T,
        "offset_view": base[1:, 2:],
        "shares_storage": base,
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    path = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": tensors, "global_step": 7, "hyper_parameters": argparse.Namespace(lr=1e-5),
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-5}]}]}, path)
    ours = read_state_dict(path)
    assert ours["bf16"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours["bf16"].astype(np.float32), tensors["bf16"].float().numpy())
    for key in ("f16", "i64", "bool", "transposed", "offset_view", "shares_storage", "param"):
        np.testing.assert_array_equal(ours[key], tensors[key].detach().numpy(), err_msg=key)
        assert ours[key].dtype == tensors[key].detach().numpy().dtype


class _Exploit:
    def __init__(self, call, marker):
        self.call, self.marker = call, marker

    def __reduce__(self):
        if self.call == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.call == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').close()",))
        import subprocess

        return (subprocess.call, (["touch", str(self.marker)],))


@pytest.mark.parametrize("call,global_name", [("system", "system"), ("exec", "builtins.exec"), ("subprocess", "subprocess.call")])
def test_code_running_pickles_are_refused_without_running(tmp_path, call, global_name):
    marker = tmp_path / "pwned"
    in_zip = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Exploit(call, marker)}, in_zip)
    with pytest.raises(UnsafeCheckpointError, match=global_name) as info:
        read_state_dict(in_zip)
    assert "Nothing was executed" in str(info.value)
    plain = tmp_path / "evil.pth"
    plain.write_bytes(pickle.dumps({"w": _Exploit(call, marker)}, protocol=2))
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(plain)
    assert not marker.exists()


def test_broken_files_get_clear_errors(tmp_path, fixtures_dir):
    data = (fixtures_dir / "pbs_tiny.ckpt").read_bytes()
    half = tmp_path / "half.ckpt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="half.ckpt"):
        read_state_dict(half)
    st = (fixtures_dir / "pbs_tiny.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(st[: len(st) - 1000])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        read_state_dict(cut)
    text = tmp_path / "readme.ckpt"
    text.write_text("this is not a checkpoint")
    with pytest.raises(UnknownFormatError, match="readme.ckpt"):
        read_state_dict(text)
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(UnknownFormatError, match="not a diffusers folder"):
        detect_format(tmp_path)
    empty = tmp_path / "not_tensors.ckpt"
    torch.save({"epoch": 3}, empty)
    with pytest.raises(Exception, match="no state dict of tensors"):
        read_state_dict(empty)


def test_diffusers_folder_reader(tmp_path):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=32, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    assert detect_format(tmp_path) == "diffusers"
    out = read_diffusers_folder(tmp_path)
    assert set(out) == {"vae"} and out["vae"]["config"]["block_out_channels"] == [32]
    ref = vae.state_dict()
    assert set(out["vae"]["state_dict"]) == set(ref)
    for key, value in ref.items():
        np.testing.assert_array_equal(out["vae"]["state_dict"][key], value.numpy())
