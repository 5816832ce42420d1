"""launch/export.py and sketchcomp_jax.weights.export: LDM .ckpt, safetensors and diffusers exports.

Round trips against the golden fixture checkpoint (bit-exact in float32), the torch-free safetensors writer
against the reference implementation (byte-identical files), diffusers exports loaded by diffusers'
own classes, and the CLI's error messages.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_np
from safetensors.torch import load_file as load_torch
from safetensors.torch import save as torch_save_bytes

from sketchcomp_jax.models.clip_norm import CLIP_MEAN
from sketchcomp_jax.models.config import build_networks
from sketchcomp_jax.models.vae import AutoencoderKL
from sketchcomp_jax.weights import export as ex
from sketchcomp_jax.weights.infer import load_ldm_yaml
from sketchcomp_jax.weights.keymap import DDPM_BUFFERS, unet_entries
from sketchcomp_jax.weights.readers import read_state_dict
from sketchcomp_jax.weights.sources import convert_checkpoint

from tests.conftest import REPO_ROOT
from tests.test_parity_fixtures import assert_close, nhwc

POSITION_IDS = "cond_stage_model.transformer.vision_model.embeddings.position_ids"


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb)
    )


# --------------------------------------------------------------------------------------------------
# LDM .ckpt and safetensors: round trips against the fixture
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_sd(fixtures_dir):
    return torch.load(fixtures_dir / "pbs_tiny.ckpt", map_location="cpu", weights_only=True)


def test_ldm_export_reproduces_the_fixture_checkpoint(tiny_model, fixture_sd, fixtures_dir, tmp_path):
    """pbs_tiny.ckpt → convert → export ldm == pbs_tiny.ckpt (keys, shapes, dtypes, values, buffers)."""
    config, params = tiny_model
    ckpt, yaml_path, clip_path = ex.export_model(config, params, tmp_path / "pbs.ckpt", "ldm")
    assert (yaml_path.name, clip_path.name) == ("pbs.yaml", "pbs_clip_config.json")
    loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(loaded) == {"state_dict", "global_step", "epoch"} and loaded["global_step"] == 0
    ref, sd = fixture_sd["state_dict"], loaded["state_dict"]
    assert len(sd) == len(ref) == 555 and set(sd) == set(ref)
    for key in ref:
        assert sd[key].dtype == ref[key].dtype and sd[key].shape == ref[key].shape, key
        assert torch.equal(sd[key], ref[key]), key  # bit-exact, buffers and position_ids included
    assert sd[POSITION_IDS].dtype == torch.int64 and all(k in sd for k in DDPM_BUFFERS)
    # Our torch-free reader reads it too.
    ours = read_state_dict(ckpt)
    assert all(np.array_equal(ours[k], ref[k].numpy()) for k in ref)

    # The YAML is the original's format and converts back to the identical model.
    yaml_params = load_ldm_yaml(yaml_path)
    assert yaml_params["unet_config"]["params"]["in_channels"] == 12
    assert yaml_params["image_size"] == config.latent_size
    assert yaml_params["sketch_stage_config"]["input_edge_type"] == config.sketch_edge_type
    from transformers import CLIPVisionConfig as HFCLIPVisionConfig

    from sketchcomp_jax.models.clip_vision import CLIPVisionConfig

    assert CLIPVisionConfig.from_json(clip_path) == CLIPVisionConfig.from_json(fixtures_dir / "pbs_tiny_clip_config.json")
    assert HFCLIPVisionConfig.from_json_file(clip_path).num_hidden_layers == config.clip.num_hidden_layers
    back, _ = convert_checkpoint(ckpt, yaml_path, clip_path, resolution=config.resolution)
    assert back.config == config
    assert leaves_equal(back.params, params)


def test_yaml_keys_match_the_original_layout(tiny_model, fixtures_dir, tmp_path):
    """Every key the exported YAML writes under model.params exists in the original-format fixture YAML."""
    import yaml

    config, _ = tiny_model
    ours = yaml.safe_load(ex.ldm_yaml_text(config))["model"]["params"]
    theirs = yaml.safe_load((fixtures_dir / "pbs_tiny.yaml").read_text())["model"]["params"]

    def check(a, b, where):
        for k, v in a.items():
            assert k in b, f"{where}{k} is not in the original layout"
            if isinstance(v, dict):
                check(v, b[k], f"{where}{k}.")
            elif k != "use_checkpoint":  # True as in the released configs; False in the fixture (no effect on weights)
                assert v == b[k], (where + k, v, b[k])

    check(ours, theirs, "")


def test_safetensors_export_equals_the_fixture(tiny_model, fixtures_dir, tmp_path):
    config, params = tiny_model
    path, yaml_path, _ = ex.export_model(config, params, tmp_path / "pbs.safetensors", "safetensors")
    ref = load_np(fixtures_dir / "pbs_tiny.safetensors")
    got = load_np(path)
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape, key
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    assert yaml_path.is_file()
    # Byte-identical to the reference writer given the same tensors and metadata.
    assert path.read_bytes() == torch_save_bytes({k: torch.from_numpy(v) for k, v in ref.items()}, {"format": "pt"})


def test_safetensors_writer_is_byte_compatible(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "half": rng.standard_normal((4,)).astype(np.float16),
        "bf": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(7, dtype=np.int64)[None],
        "d": rng.standard_normal(2),
        "i32": np.array([1, -2, 3], np.int32),
        "b": np.array([True, False]),
        "u8": np.arange(3, dtype=np.uint8),
        "i8": np.array([-1], np.int8),
        "scalar": np.array(0.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "strided": rng.standard_normal((4, 6)).astype(np.float32).T,  # non-contiguous input
        "big_endian": np.arange(3, dtype=">f4"),
    }
    path = tmp_path / "t.safetensors"
    ex.save_safetensors(tensors, path, {"format": "pt"})
    as_torch = {k: torch.from_numpy(np.array(v, dtype=v.dtype.newbyteorder("="), order="C")) for k, v in tensors.items()
                if v.dtype != ml_dtypes.bfloat16}
    as_torch["bf"] = torch.from_numpy(tensors["bf"].view(np.uint16).copy()).view(torch.bfloat16)
    assert path.read_bytes() == torch_save_bytes(as_torch, {"format": "pt"})
    back = load_torch(path)
    assert back["bf"].dtype == torch.bfloat16 and torch.equal(back["bf"], as_torch["bf"])
    for key in tensors:
        assert torch.equal(back[key], as_torch[key]), key
    read = read_state_dict(path)  # and our own reader
    assert read["bf"].dtype == ml_dtypes.bfloat16 and np.array_equal(read["bf"], tensors["bf"])
    assert len((header := path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])) % 8 == 0
    assert header.rstrip(b" ").endswith(b"}")


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_reduced_precision_exports(tiny_model, fixture_sd, tmp_path, dtype, torch_dtype):
    config, params = tiny_model
    st, yaml_path, clip_path = ex.export_model(config, params, tmp_path / "st.safetensors", "safetensors", dtype=dtype)
    ckpt, _, _ = ex.export_model(config, params, tmp_path / "pt.ckpt", "ldm", dtype=dtype)
    from_st = load_torch(st)
    from_ckpt = torch.load(ckpt, weights_only=True)["state_dict"]
    ref = fixture_sd["state_dict"]
    assert set(from_st) == set(from_ckpt) == set(ref)
    for key, value in ref.items():
        want = value if key == POSITION_IDS else value.to(torch_dtype)  # round to nearest even, as torch does
        for got in (from_st[key], from_ckpt[key]):
            assert got.dtype == want.dtype, key
            assert torch.equal(got, want), key
    # … and they convert back (to float32) within the precision of the dtype.
    back, _ = convert_checkpoint(st, yaml_path, clip_path, resolution=config.resolution)
    assert back.config == config
    rel = {"float16": 1e-3, "bfloat16": 8e-3}[dtype]
    for a, b in zip(jax.tree_util.tree_leaves(back.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rel, atol=1e-6)


def test_ema_export_writes_the_original_litema_buffers(tiny_model, tmp_path):
    config, params = tiny_model
    ema_unet = jax.tree_util.tree_map(lambda a: np.asarray(a) + 1.0, params["unet"])
    ema = ex.EmaWeights(ema_unet, decay=0.999, num_updates=42)
    path, yaml_path, _ = ex.export_model(config, params, tmp_path / "m.safetensors", "safetensors", ema=ema,
                                         include_ema=True)
    sd = load_np(path)
    ema_keys = sorted(k for k in sd if k.startswith("model_ema."))
    assert len(ema_keys) == len(unet_entries(config)) + 2
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd
    np.testing.assert_array_equal(
        sd["model_ema.diffusion_modelinput_blocks00weight"], sd["model.diffusion_model.input_blocks.0.0.weight"] + 1.0
    )
    assert sd["model_ema.decay"].dtype == np.float32 and sd["model_ema.num_updates"] == 42
    assert load_ldm_yaml(yaml_path)["use_ema"] is True
    # The exported YAML says use_ema: True, so converting it back takes the EMA U-Net, as the original would.
    back, _ = convert_checkpoint(path, yaml_path, tmp_path / "m_clip_config.json", resolution=config.resolution)
    assert leaves_equal(back.params["unet"], ema_unet)


# --------------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffusers_export(tmp_path_factory):
    """Tiny random diffusers / transformers models → diffusers folder → our model → exported folder."""
    from tests.torch_reference import tiny_image_encoder, tiny_unet, tiny_vae, write_diffusers_folder

    root = tmp_path_factory.mktemp("diffusers_export")
    refs = {"unet": tiny_unet(12), "vae": tiny_vae(), "image_encoder": tiny_image_encoder()}
    src = write_diffusers_folder(root / "src", refs["unet"], refs["vae"], refs["image_encoder"])
    model, _ = convert_checkpoint(src, resolution=32)
    (out,) = ex.export_model(model.config, model.params, root / "exported", "diffusers")
    return refs, model, out


def _load_components(folder):
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    loaded = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", TorchVAE), ("image_encoder", PaintByExampleImageEncoder)):
        module, info = cls.from_pretrained(folder / name, output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), (name, info)
        loaded[name] = module.eval()
    loaded["scheduler"] = PNDMScheduler.from_pretrained(folder / "scheduler")
    return loaded


def test_diffusers_export_loads_with_diffusers_and_matches(diffusers_export):
    refs, model, out = diffusers_export
    loaded = _load_components(out)
    # The exported weights are the original PyTorch weights, bit for bit.
    for name in ("unet", "vae", "image_encoder"):
        a, b = loaded[name].state_dict(), refs[name].state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name

    nets = build_networks(model.config)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 12, 8, 8, generator=gen)
    t = torch.tensor([5, 901])
    ctx = torch.randn(2, 1, 40, generator=gen)
    with torch.no_grad():
        eps_t = loaded["unet"](x, t, encoder_hidden_states=ctx).sample.numpy()
    eps = nets.unet.apply({"params": model.params["unet"]}, jnp.asarray(nhwc(x.numpy())), jnp.asarray(t.numpy()),
                          jnp.asarray(ctx.numpy()))
    assert_close(eps, nhwc(eps_t))

    z = torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        dec_t = loaded["vae"].decode(z).sample.numpy()
    dec = nets.vae.apply({"params": model.params["vae"]}, jnp.asarray(nhwc(z.numpy())), method=AutoencoderKL.decode)
    assert_close(dec, nhwc(dec_t))

    pixels = torch.randn(2, 3, 24, 24, generator=gen)
    with torch.no_grad():
        context_t, uncond_t = loaded["image_encoder"](pixels, return_uncond_vector=True)
    context = nets.conditioner.apply({"params": model.params["conditioner"]}, jnp.asarray(nhwc(pixels.numpy())))
    assert_close(context, context_t.numpy())
    np.testing.assert_array_equal(model.params["conditioner"]["uncond_vector"], uncond_t.detach().numpy())

    sched = loaded["scheduler"].config
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert sched.skip_prk_steps and sched.steps_offset == 1 and not sched.set_alpha_to_one


def test_diffusers_folder_layout_and_pipeline(diffusers_export):
    from diffusers import PaintByExamplePipeline
    from transformers import CLIPImageProcessor

    _, model, out = diffusers_export
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "PaintByExamplePipeline"
    assert index["image_encoder"] == ["paint_by_example", "PaintByExampleImageEncoder"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    enc_cfg = json.loads((out / "image_encoder" / "config.json").read_text())
    assert enc_cfg["architectures"] == ["PaintByExampleImageEncoder"] and enc_cfg["projection_dim"] == 40
    keys = load_np(out / "image_encoder" / "model.safetensors")
    assert any(k.startswith("model.vision_model.") for k in keys) and "uncond_vector" in keys
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] == model.config.scale_factor
    fe = CLIPImageProcessor.from_pretrained(out / "feature_extractor")
    assert list(fe.image_mean) == list(CLIP_MEAN) and fe.crop_size["height"] == 24
    # diffusers >= 0.42 cannot resolve the hub's ["paint_by_example", …] entry in from_pretrained;
    # building the pipeline from the components (docs/export.md) works.
    parts = _load_components(out)
    pipe = PaintByExamplePipeline(vae=parts["vae"], image_encoder=parts["image_encoder"], unet=parts["unet"],
                                  scheduler=parts["scheduler"], feature_extractor=fe, safety_checker=None,
                                  requires_safety_checker=False)
    assert pipe.unet.config.in_channels == 12


def test_diffusers_export_reconverts_to_identical_params(diffusers_export):
    _, model, out = diffusers_export
    back, source = convert_checkpoint(out, resolution=model.config.resolution)
    assert source["format"] == "diffusers"
    assert back.config == model.config
    assert leaves_equal(back.params, model.params)


def test_diffusers_export_sd2_style_unet(tmp_path):
    """Linear proj_in/out, per-level head counts, two transformer layers: exported weights are the originals."""
    from diffusers import UNet2DConditionModel

    from tests.torch_reference import tiny_image_encoder, tiny_unet, tiny_vae, write_diffusers_folder

    unet = tiny_unet(9, linear=True)
    src = write_diffusers_folder(tmp_path / "src", unet, tiny_vae(), tiny_image_encoder())
    model, _ = convert_checkpoint(src, resolution=32)
    (out,) = ex.export_model(model.config, model.params, tmp_path / "out", "diffusers")
    cfg = json.loads((out / "unet" / "config.json").read_text())
    assert cfg["use_linear_projection"] and cfg["attention_head_dim"] == [2, 4] and cfg["transformer_layers_per_block"] == 2
    loaded = UNet2DConditionModel.from_pretrained(out / "unet")
    a, b = loaded.state_dict(), unet.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    back, _ = convert_checkpoint(out, resolution=32)
    assert back.config == model.config and leaves_equal(back.params, model.params)

    # A 9-channel export runs in the stock PaintByExamplePipeline.
    from diffusers import PaintByExamplePipeline
    from PIL import Image
    from transformers import CLIPImageProcessor

    parts = _load_components(out)
    pipe = PaintByExamplePipeline(vae=parts["vae"], image_encoder=parts["image_encoder"], unet=parts["unet"],
                                  scheduler=parts["scheduler"], safety_checker=None, requires_safety_checker=False,
                                  feature_extractor=CLIPImageProcessor.from_pretrained(out / "feature_extractor"))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = Image.fromarray(np.where(np.arange(32)[:, None] >= 16, 255, 0).astype(np.uint8).repeat(32, 1))
    result = pipe(image=image, mask_image=mask, example_image=image, height=32, width=32, num_inference_steps=2,
                  output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert result.shape == (1, 32, 32, 3) and np.isfinite(result).all()


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_unknown_format_and_dtype(tiny_model, tmp_path):
    config, params = tiny_model
    with pytest.raises(ex.ExportError, match=r"unknown export format 'onnx'; choose one of ldm, diffusers, safetensors"):
        ex.export_model(config, params, tmp_path / "m.onnx", "onnx")
    with pytest.raises(ex.ExportError, match=r"unknown --dtype 'int8'"):
        ex.export_model(config, params, tmp_path / "m.ckpt", "ldm", dtype="int8")


def test_unwritable_output(tiny_model, tmp_path):
    config, params = tiny_model
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ex.ExportError, match=r"cannot create the output folder .*a_file.*choose a writable --out"):
        ex.export_model(config, params, blocker / "m.safetensors", "safetensors")
    with pytest.raises(ex.ExportError, match=r"is a directory; this format writes a file"):
        ex.export_model(config, params, tmp_path, "ldm")
    with pytest.raises(ex.ExportError, match=r"is a file; --format diffusers writes a folder"):
        ex.check_output(blocker, "diffusers")


def test_existing_output_needs_overwrite_and_failures_lose_nothing(tiny_model, tmp_path, monkeypatch):
    config, params = tiny_model
    path = tmp_path / "m.safetensors"
    ex.export_model(config, params, path, "safetensors")
    before = path.read_bytes()
    with pytest.raises(ex.ExportError, match=r"m.safetensors already exists; choose another --out or pass --overwrite"):
        ex.export_model(config, params, path, "safetensors", dtype="float16")
    # The YAML beside it counts as output too.
    path.unlink()
    with pytest.raises(ex.ExportError, match=r"m.yaml already exists"):
        ex.export_model(config, params, path, "safetensors")

    ex.export_model(config, params, path, "safetensors", overwrite=True)
    assert path.read_bytes() == before

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ex, "save_safetensors", disk_full)
    with pytest.raises(ex.ExportError, match=r"failed writing .*No space left on device; nothing was changed"):
        ex.export_model(config, params, path, "safetensors", dtype="float16", overwrite=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml", "m_clip_config.json"]


def test_ema_requested_but_absent(tiny_model, tiny_model_dir, tmp_path):
    config, params = tiny_model
    with pytest.raises(ex.ExportError, match=r"model has no EMA weights"):
        ex.export_model(config, params, tmp_path / "m.ckpt", "ldm", include_ema=True)
    with pytest.raises(ex.ExportError, match=r"model has no EMA weights"):
        ex.export(tmp_path / "m.ckpt", "ldm", model_dir=tiny_model_dir, include_ema=True)
    assert not list(tmp_path.iterdir())


def test_diffusers_export_refuses_a_mapper_depth_diffusers_cannot_build(tiny_model, tmp_path):
    config, params = tiny_model  # 2-layer CLIP → diffusers builds (2 + 1) // 5 = 0 mapper blocks, the model has 5
    with pytest.raises(ex.ExportError, match=r"mapper has 5 blocks but .*\(num_hidden_layers \+ 1\) // 5 = 0.*--format ldm"):
        ex.export_model(config, params, tmp_path / "d", "diffusers")
    assert not (tmp_path / "d").exists()


def test_source_errors(tmp_path):
    with pytest.raises(ex.ExportError, match=r"is not a model directory \(no config.json\).*launch/convert.py"):
        ex.export(tmp_path / "m.ckpt", "ldm", model_dir=tmp_path)
    with pytest.raises(ex.ExportError, match=r"no training checkpoints in .*launch/train.py"):
        ex.export(tmp_path / "m.ckpt", "ldm", workdir=tmp_path)
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)
    with pytest.raises(ex.ExportError, match=r"--step 5 not found .*available steps: \[100\]"):
        ex.export(tmp_path / "m.ckpt", "ldm", workdir=tmp_path, step=5)
    with pytest.raises(ex.ExportError, match=r"not a launch/train.py work directory"):
        ex.export(tmp_path / "m.ckpt", "ldm", workdir=tmp_path)
    with pytest.raises(ex.ExportError, match=r"exactly one of --model DIR or --workdir DIR"):
        ex.export(tmp_path / "m.ckpt", "ldm")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def run_export(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "export.py"), *map(str, args)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )


def test_cli_end_to_end(tiny_model_dir, fixtures_dir, tmp_path):
    out = tmp_path / "pbs.safetensors"
    proc = run_export("--model", tiny_model_dir, "--format", "safetensors", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote safetensors export" in proc.stdout
    ref = load_np(fixtures_dir / "pbs_tiny.safetensors")
    got = load_np(out)
    assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
    again = run_export("--model", tiny_model_dir, "--format", "safetensors", "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
