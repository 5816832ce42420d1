"""Safe weight readers: torch-free .ckpt / legacy / safetensors / diffusers reading, refusal of pickles
that would run code, and clear errors for damaged or wrong inputs."""
import argparse
import collections
import copyreg
import json
import os
import pathlib
import pickle
import subprocess
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from sketchcomp_jax.weights.errors import CheckpointError
from sketchcomp_jax.weights.folders import read_diffusers_folder
from sketchcomp_jax.weights.readers import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DiffusersFolderError,
    InertObject,
    NotAStateDictError,
    UnknownFormatError,
    UnsafeCheckpointError,
    detect_format,
    read_state_dict,
)

torch = pytest.importorskip("torch")

POSITION_IDS = "cond_stage_model.transformer.vision_model.embeddings.position_ids"


def _bits(a: np.ndarray) -> np.ndarray:
    """Bit pattern of an array (exact comparison for every dtype, NaNs included)."""
    return np.ascontiguousarray(a).view(np.dtype(f"u{a.dtype.itemsize}") if a.dtype.itemsize in (1, 2, 4, 8) else np.uint8)


def _torch_bits(t: "torch.Tensor") -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        return t.numpy().view(np.uint8)
    if t.is_complex():
        t = torch.view_as_real(t.resolve_conj()).contiguous()
    size = t.element_size()
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[size]
    return t.view(int_dtype).numpy().view(np.dtype(f"u{size}"))


def _assert_same(ours: np.ndarray, ref: "torch.Tensor", key: str = ""):
    assert tuple(ours.shape) == tuple(ref.shape), key
    assert ours.flags.writeable and ours.flags.c_contiguous, key
    if ref.is_complex():
        ours = ours.view(np.float32 if ours.dtype == np.complex64 else np.float64).reshape(*ours.shape, 2)
    np.testing.assert_array_equal(_bits(ours).reshape(-1), _torch_bits(ref).reshape(-1), err_msg=key)


# --------------------------------------------------------------------------------------------------
# The golden fixture
# --------------------------------------------------------------------------------------------------


def test_ckpt_equals_safetensors_and_torch_load(fixtures_dir):
    ours = read_state_dict(fixtures_dir / "pbs_tiny.ckpt")
    ref = load_file(fixtures_dir / "pbs_tiny.safetensors")
    assert len(ours) == 555 and set(ours) == set(ref)
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype, key
        np.testing.assert_array_equal(_bits(ours[key]), _bits(value), err_msg=key)
    assert ours[POSITION_IDS].dtype == np.int64
    np.testing.assert_array_equal(ours[POSITION_IDS], np.arange(17)[None])
    # our own safetensors parser agrees with the safetensors package too
    ours_st = read_state_dict(fixtures_dir / "pbs_tiny.safetensors")
    assert list(ours_st) and set(ours_st) == set(ref)
    for key, value in ref.items():
        assert ours_st[key].dtype == value.dtype and np.array_equal(_bits(ours_st[key]), _bits(value)), key
    loaded = torch.load(fixtures_dir / "pbs_tiny.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert set(loaded) == set(ours)
    for key, value in loaded.items():
        _assert_same(ours[key], value, key)


def test_detect_format(fixtures_dir, tmp_path):
    assert detect_format(fixtures_dir / "pbs_tiny.ckpt") == "ldm_ckpt"
    assert detect_format(fixtures_dir / "pbs_tiny.safetensors") == "safetensors"
    assert detect_format(str(fixtures_dir / "pidinet" / "table5_pidinet.pth")) == "ldm_ckpt"
    legacy = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert detect_format(legacy) == "torch_pickle_legacy"
    (tmp_path / "pipe" / "unet").mkdir(parents=True)
    assert detect_format(tmp_path / "pipe") == "diffusers"
    with pytest.raises(CheckpointIsADirectoryError, match="not a diffusers pipeline folder"):
        detect_format(tmp_path / "pipe" / "unet")


def test_reader_does_not_import_torch(fixtures_dir):
    code = (
        "import sys; from sketchcomp_jax.weights.readers import read_state_dict; "
        f"sd = read_state_dict({str(fixtures_dir / 'pbs_tiny.ckpt')!r}); assert len(sd) == 555; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    repo = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})


# --------------------------------------------------------------------------------------------------
# Files written by torch.save: dtypes, views, Lightning extras, both container formats
# --------------------------------------------------------------------------------------------------


def _tensors() -> dict:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    cplx = torch.randn(3, dtype=torch.complex64, generator=gen)
    return {
        "f32": torch.randn(2, 3, generator=gen),
        "f64": torch.randn(3, generator=gen, dtype=torch.float64),
        "f16": torch.randn(3, 5, generator=gen).half(),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "i64": torch.arange(5) - 2,
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(250, 256, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "c64": cplx,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "base": base,
        "transposed": base.T,  # shares base's storage, non-contiguous
        "offset_view": base[1:],  # storage offset
        "strided": base[:, ::2],
        "expanded": torch.arange(3.0).reshape(3, 1).expand(3, 4),  # stride 0
        "param": torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
        "half_view": torch.randn(4, 4, generator=gen).half()[1:3, 1:],
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_dtypes_and_views(tmp_path, zip_format):
    tensors = _tensors()
    path = tmp_path / "weights.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    ours = read_state_dict(path)
    assert list(ours) == list(tensors)
    expected_dtypes = {"bf16": ml_dtypes.bfloat16, "i64": np.int64, "f16": np.float16, "bool": np.bool_, "c64": np.complex64}
    for key, dtype in expected_dtypes.items():
        assert ours[key].dtype == np.dtype(dtype), key
    for key, value in tensors.items():
        _assert_same(ours[key], value, key)
    ours["base"][0, 0] = 123.0  # arrays are independent copies, not views of each other
    assert ours["transposed"][0, 0] != 123.0


@pytest.mark.parametrize("protocol", [4, 5])
def test_newer_pickle_protocols(tmp_path, protocol):
    tensors = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save({"state_dict": tensors, "hyper_parameters": argparse.Namespace(x=1)}, tmp_path / "p.ckpt",
               pickle_protocol=protocol)
    ours = read_state_dict(tmp_path / "p.ckpt")
    for key, value in tensors.items():
        _assert_same(ours[key], value, key)


def test_new_dtypes_use_rebuild_tensor_v3(tmp_path):
    tensors = {"u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16), "f8": torch.linspace(-2, 2, 6).to(torch.float8_e4m3fn)}
    torch.save(tensors, tmp_path / "new.pt")
    ours = read_state_dict(tmp_path / "new.pt")
    assert ours["u16"].dtype == np.uint16 and ours["f8"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    for key, value in tensors.items():
        _assert_same(ours[key], value, key)


def test_conj_and_neg_views(tmp_path):
    c = torch.randn(4, dtype=torch.complex64)
    tensors = {"conj": c.conj(), "neg": torch.randn(4, dtype=torch.complex64)._neg_view()}
    torch.save(tensors, tmp_path / "views.pt")
    ours = read_state_dict(tmp_path / "views.pt")
    for key, value in tensors.items():
        np.testing.assert_array_equal(ours[key], value.resolve_conj().resolve_neg().numpy(), err_msg=key)


def _fake_global(monkeypatch, module: str, name: str, base=object):
    """A class that pickles as `module.name` (a module that need not exist): registered only while saving."""
    cls = type(name, (base,), {"__module__": module, "__qualname__": name})
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        mod = types.ModuleType(".".join(parts[:i]))
        monkeypatch.setitem(sys.modules, mod.__name__, sys.modules.get(mod.__name__, mod))
    setattr(sys.modules[module], name, cls)
    return cls


def test_lightning_checkpoint_with_benign_extras(tmp_path, monkeypatch):
    AttributeDict = _fake_global(monkeypatch, "pytorch_lightning.utilities.parsing", "AttributeDict", dict)
    DictConfig = _fake_global(monkeypatch, "omegaconf.dictconfig", "DictConfig")
    config = DictConfig()
    config.__dict__.update(_content={"lr": 1e-4}, _metadata={"ref_type": __import__("typing").Any, "object_type": dict})
    hparams = AttributeDict(args=argparse.Namespace(lr=1e-4, out=pathlib.PurePosixPath("/runs/x")), config=config)
    sd = collections.OrderedDict(
        [("model.diffusion_model.w", torch.randn(3, 3)), ("proj_out.bias", torch.zeros(4)), ("pos", torch.arange(3))]
    )
    ckpt = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3, 3), "step": torch.tensor(5.0)}},
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}],
        "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 3, "lr_lambdas": [None]}],
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "dirpath": "/runs/x"}},
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
        "numpy_scalar": np.float64(0.5),
        "numpy_array": np.arange(4),
        "blob": b"\x00\xffraw",
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "device": torch.device("cpu"),
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    monkeypatch.undo()  # the fake modules are gone again: reading must not need (or import) them
    assert "omegaconf" not in sys.modules and "pytorch_lightning" not in sys.modules
    ours = read_state_dict(path)
    assert list(ours) == list(sd)
    for key, value in sd.items():
        _assert_same(ours[key], value, key)
    assert "omegaconf" not in sys.modules and "pytorch_lightning" not in sys.modules
    # a `{'model': state_dict}` dict
    torch.save({"model": sd, "step": 1}, tmp_path / "model.pt")
    assert list(read_state_dict(tmp_path / "model.pt")) == list(sd)


def test_inert_object_records_and_does_nothing():
    cls = type("Namespace", (InertObject,), {"pickle_global": "argparse.Namespace"})
    obj = cls.__new__(cls, 1, x=2)
    obj.__setstate__({"lr": 1})
    obj["k"] = "v"
    assert obj.args == (1,) and obj.state == {"lr": 1} and obj.items == {"k": "v"}
    assert "argparse.Namespace" in repr(obj)


# --------------------------------------------------------------------------------------------------
# Malicious pickles: refused, and nothing runs
# --------------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, kind: str, marker: pathlib.Path):
        self.kind, self.marker = kind, str(marker)

    def __reduce__(self):
        if self.kind == "os.system":
            return os.system, (f"touch '{self.marker}'",)
        if self.kind == "builtins.exec":
            return exec, (f"open({self.marker!r}, 'w').write('pwned')",)
        if self.kind == "builtins.eval":
            return eval, (f"open({self.marker!r}, 'w').write('pwned')",)
        return subprocess.call, (["touch", self.marker],)


_KINDS = {"os.system": os.system.__module__ + ".system", "builtins.exec": "builtins.exec",
          "builtins.eval": "builtins.eval", "subprocess.call": "subprocess.call"}


@pytest.mark.parametrize("container", ["torch_zip", "torch_legacy", "plain_pickle", "plain_pickle_p0"])
@pytest.mark.parametrize("kind", list(_KINDS))
def test_malicious_pickle_is_refused_and_not_executed(tmp_path, kind, container):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.zeros(2)}, "evil": _Payload(kind, marker)}
    path = tmp_path / "evil.ckpt"
    if container == "torch_zip":
        torch.save(payload, path)
    elif container == "torch_legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(_Payload(kind, marker), protocol=0 if container.endswith("p0") else 4))
    with pytest.raises(UnsafeCheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert _KINDS[kind] in message and str(path) in message
    assert "Nothing was executed" in message and "safetensors" in message
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)
    assert not marker.exists()


def test_the_payload_is_real(tmp_path):
    """Control: the same payload does run under plain pickle, so the refusal above is meaningful."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload("builtins.exec", marker)))
    assert marker.exists()


def _ops(*chunks: bytes) -> bytes:
    return b"\x80\x02" + b"".join(chunks) + b"."


def _g(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _i(value: int) -> bytes:
    return b"J" + value.to_bytes(4, "little", signed=True)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _torch_zip(path: pathlib.Path, data_pkl: bytes, storages: dict[str, bytes]):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)


def _tensor_pickle(size: tuple, stride: tuple, offset: int = 0, numel: int = 4) -> bytes:
    storage = _tuple(_u("storage"), _g("torch", "FloatStorage"), _u("0"), _u("cpu"), _i(numel)) + b"Q"
    args = _tuple(storage, _i(offset), _tuple(*map(_i, size)), _tuple(*map(_i, stride)), b"\x89",
                  _g("collections", "OrderedDict") + b")R")
    return _ops(b"}(" + _u("w") + _g("torch._utils", "_rebuild_tensor_v2") + args + b"Ru")


def test_hand_built_archive_reads(tmp_path):
    path = tmp_path / "ok.ckpt"
    _torch_zip(path, _tensor_pickle((2, 2), (1, 2)), {"0": np.arange(4, dtype=np.float32).tobytes()})
    np.testing.assert_array_equal(read_state_dict(path)["w"], np.arange(4, dtype=np.float32).reshape(2, 2).T)


@pytest.mark.parametrize(
    "size, stride, offset", [((1000,), (1,), 0), ((2, 2), (1, 4), 0), ((4,), (1,), 1), ((2,), (-1,), 3)],
    ids=["too_long", "bad_stride", "bad_offset", "negative_stride"],
)
def test_out_of_bounds_tensor_metadata_is_refused(tmp_path, size, stride, offset):
    path = tmp_path / "oob.ckpt"
    _torch_zip(path, _tensor_pickle(size, stride, offset), {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(CorruptCheckpointError, match=str(path).replace("\\", "\\\\")):
        read_state_dict(path)


def test_unknown_and_benign_looking_globals(tmp_path):
    path = tmp_path / "x.ckpt"
    for module, name in [("posix", "system"), ("builtins", "getattr"), ("builtins", "__import__"),
                         ("torch", "load"), ("torch.nn.modules.conv", "Conv2d"), ("numpy", "load"),
                         ("collections", "namedtuple"), ("mylib.models", "Net"), ("pathlibx", "Path")]:
        _torch_zip(path, _ops(_g(module, name) + b")R"), {})
        with pytest.raises(UnsafeCheckpointError, match=f"'{module}.{name}'"):
            read_state_dict(path)
    # quantized and other exotic tensors get an "unsupported" error, not "unsafe"
    _torch_zip(path, _ops(_g("torch._utils", "_rebuild_qtensor") + b")R"), {})
    with pytest.raises(UnknownFormatError, match="quantized"):
        read_state_dict(path)


def test_extension_registry_opcodes_are_refused(tmp_path):
    copyreg.add_extension("builtins", "exec", 0xBEEF)
    try:
        data = pickle.dumps({"x": exec}, protocol=2)
        assert b"\x83\xef\xbe" in data  # EXT2
        path = tmp_path / "ext.pt"
        path.write_bytes(data)
        with pytest.raises(UnsafeCheckpointError, match="extension registry"):
            read_state_dict(path)
    finally:
        copyreg.remove_extension("builtins", "exec", 0xBEEF)


def test_build_on_internal_objects_is_refused(tmp_path):
    # BUILD on a function handed out by find_class (would otherwise let the file rewrite our helpers)
    path = tmp_path / "build.ckpt"
    _torch_zip(path, _ops(_g("torch._utils", "_rebuild_tensor_v2") + b"N}(" + _u("x") + _i(1) + b"u\x86b"), {})
    with pytest.raises(UnsafeCheckpointError, match="sets the state"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------------------
# Damaged / wrong inputs
# --------------------------------------------------------------------------------------------------


def _half(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_ckpt(fixtures_dir, tmp_path):
    path = _half(fixtures_dir / "pbs_tiny.ckpt", tmp_path / "cut.ckpt")
    with pytest.raises(CorruptCheckpointError, match="download it again") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_legacy(tmp_path):
    full = tmp_path / "full.pt"
    torch.save({"w": torch.randn(1000)}, full, _use_new_zipfile_serialization=False)
    path = _half(full, tmp_path / "cut.pt")
    with pytest.raises(CorruptCheckpointError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_safetensors(fixtures_dir, tmp_path):
    path = _half(fixtures_dir / "pbs_tiny.safetensors", tmp_path / "cut.safetensors")
    with pytest.raises(CorruptCheckpointError, match="download it again") as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    head = fixtures_dir.joinpath("pbs_tiny.safetensors").read_bytes()[:100]  # cut inside the header
    (tmp_path / "head.safetensors").write_bytes(head)
    with pytest.raises(CorruptCheckpointError, match="header"):
        read_state_dict(tmp_path / "head.safetensors")


def test_damaged_storage_bytes(tmp_path):
    path = tmp_path / "crc.pt"
    torch.save({"w": torch.zeros(4096)}, path)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("crc/data/0")
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="damaged"):
        read_state_dict(path)


def test_text_file_renamed_ckpt(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(UnknownFormatError) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)
    with pytest.raises(UnknownFormatError):
        detect_format(path)
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 5\n")
    with pytest.raises(UnknownFormatError, match="git lfs pull"):
        read_state_dict(path)
    path.write_text("<!DOCTYPE html><html>Sign in</html>")
    with pytest.raises(UnknownFormatError, match="HTML"):
        read_state_dict(path)
    path.write_bytes(b"")
    with pytest.raises(CorruptCheckpointError, match="empty"):
        read_state_dict(path)


def test_missing_path_and_directory(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(CheckpointNotFoundError) as info:
        read_state_dict(missing)
    assert str(missing) in str(info.value) and isinstance(info.value, FileNotFoundError)
    with pytest.raises(CheckpointNotFoundError):
        detect_format(missing)
    with pytest.raises(CheckpointNotFoundError):
        read_diffusers_folder(missing)
    with pytest.raises(CheckpointIsADirectoryError) as info:
        read_state_dict(tmp_path)
    assert str(tmp_path) in str(info.value)
    (tmp_path / "vae").mkdir()
    with pytest.raises(CheckpointIsADirectoryError, match="read_diffusers_folder"):
        read_state_dict(tmp_path)


@pytest.mark.parametrize(
    "obj, match",
    [([torch.zeros(2)], "holds a list"), ({"a": 1, "b": torch.zeros(1)}, "'a': int"), ({}, "empty"),
     ({"state_dict": {"w": torch.zeros(1), "n": "text"}}, "'state_dict' entry")],
    ids=["list", "mixed", "empty", "bad_state_dict"],
)
def test_not_a_state_dict(tmp_path, obj, match):
    path = tmp_path / "odd.pt"
    torch.save(obj, path)
    with pytest.raises(NotAStateDictError, match=match) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_plain_pickle_of_data_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    with pytest.raises(UnknownFormatError, match="plain Python pickle"):
        read_state_dict(path)


def test_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(UnknownFormatError, match="TorchScript"):
        read_state_dict(path)


# --------------------------------------------------------------------------------------------------
# safetensors dtypes and diffusers folders
# --------------------------------------------------------------------------------------------------


def test_safetensors_bf16_and_friends(tmp_path):
    import safetensors.torch

    tensors = {"bf16": torch.randn(3, 4).bfloat16(), "f16": torch.randn(5).half(), "i64": torch.arange(3),
               "bool": torch.tensor([True, False]), "f8": torch.ones(3).to(torch.float8_e5m2), "scalar": torch.tensor(2.0),
               "empty": torch.zeros(0, 3)}
    safetensors.torch.save_file(tensors, tmp_path / "w.safetensors", metadata={"format": "pt"})
    ours = read_state_dict(tmp_path / "w.safetensors")
    assert ours["bf16"].dtype == np.dtype(ml_dtypes.bfloat16) and ours["f8"].dtype == np.dtype(ml_dtypes.float8_e5m2)
    for key, value in tensors.items():
        _assert_same(ours[key], value, key)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
    )


def _check_vae(components: dict, vae, folder: pathlib.Path):
    ref = vae.state_dict()
    got = components["vae"]["state_dict"]
    assert set(got) == set(ref)
    for key, value in ref.items():
        _assert_same(got[key], value, key)
    assert components["vae"]["config"] == json.loads((folder / "vae" / "config.json").read_text())


def test_read_diffusers_folder(tmp_path):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "PaintByExamplePipeline"}))
    out = read_diffusers_folder(tmp_path / "pipe")
    assert set(out) == {"vae", "model_index"} and out["model_index"]["_class_name"] == "PaintByExamplePipeline"
    _check_vae(out, vae, tmp_path / "pipe")
    assert detect_format(tmp_path / "pipe") == "diffusers"

    vae.save_pretrained(tmp_path / "sharded" / "vae", max_shard_size="2KB")  # sharded safetensors + index
    assert list((tmp_path / "sharded" / "vae").glob("*.index.json"))
    _check_vae(read_diffusers_folder(tmp_path / "sharded"), vae, tmp_path / "sharded")

    vae.save_pretrained(tmp_path / "bin" / "vae", safe_serialization=False)  # torch .bin
    assert (tmp_path / "bin" / "vae" / "diffusion_pytorch_model.bin").is_file()
    _check_vae(read_diffusers_folder(tmp_path / "bin"), vae, tmp_path / "bin")


def test_diffusers_folder_errors(tmp_path):
    with pytest.raises(DiffusersFolderError, match="none of the subfolders"):
        read_diffusers_folder(tmp_path)
    (tmp_path / "unet").mkdir()
    with pytest.raises(DiffusersFolderError, match="config.json"):
        read_diffusers_folder(tmp_path)
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(DiffusersFolderError, match="no weights file"):
        read_diffusers_folder(tmp_path)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../etc/passwd"}})
    )
    with pytest.raises(CorruptCheckpointError, match="not a file name"):
        read_diffusers_folder(tmp_path)
    with pytest.raises(DiffusersFolderError, match="read_state_dict"):
        read_diffusers_folder(tmp_path / "unet" / "config.json")
