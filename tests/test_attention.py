"""Attention backends (`sketchcomp_jax.models.attention`) against the `xla` einsums, and the goldens with them.

Tolerances, relative to max |reference| (forward output, or each gradient w.r.t. q, k, v):
* float32: 1e-5. The backends compute the same sums in another order (query blocks, a kernel's
  online softmax over 128-key blocks, zero-padded head dims); measured errors are <= 1.1e-6.
* bfloat16 (backend in bf16 vs xla in bf16): 2e-2. bf16 keeps 8 mantissa bits (eps 7.8e-3); the
  softmax weights are rounded to bf16 before the value product in a different order per backend, and
  splash multiplies q by the scale before rounding. Measured errors are <= 7.4e-3 (about one bf16 ulp).
Splash runs in Pallas interpret mode here, so its cases are few and small (lengths 64-256).
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from sketchcomp_jax.models import attention as attn
from sketchcomp_jax.models.config import ModelConfig, build_networks
from sketchcomp_jax.parallel.mesh import make_mesh

from tests.conftest import REPO_ROOT

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def reference_einsums(q, k, v, num_heads, scale=None, causal=False):
    """The einsum attention as it stood in models/layers.py before the backends (the `xla` contract)."""
    batch, t_q, width = q.shape
    head_dim = width // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    qh = q.reshape(batch, t_q, num_heads, head_dim)
    kh = k.reshape(batch, k.shape[1], num_heads, head_dim)
    vh = v.reshape(batch, v.shape[1], num_heads, head_dim)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh).astype(jnp.float32) * scale
    if causal:
        allowed = jnp.tril(jnp.ones((t_q, k.shape[1]), dtype=bool))
        logits = jnp.where(allowed[None, None], logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(vh.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, vh)
    return out.reshape(batch, t_q, num_heads * head_dim)


def inputs(t_q, head_dim, heads=2, batch=2, t_k=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    t_k = t_q if t_k is None else t_k
    shapes = [(batch, t_q, heads * head_dim), (batch, t_k, heads * head_dim), (batch, t_k, heads * head_dim)]
    return [jnp.asarray(rng.standard_normal(s), dtype) for s in shapes]


def value_and_grads(fn, q, k, v):
    """fn's output and the gradients of a fixed random projection of it w.r.t. q, k, v (all float32)."""
    probe = jnp.asarray(np.random.default_rng(9).standard_normal(fn(q, k, v).shape), jnp.float32)

    def loss(q, k, v):
        return (fn(q, k, v).astype(jnp.float32) * probe).sum()

    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


def assert_parity(fn, ref_fn, q, k, v, tol):
    """Forward and q/k/v gradients of `fn` within `tol` × max|ref| of `ref_fn`; returns the relative errors."""
    errors = []
    pairs = zip(("out", "dq", "dk", "dv"), value_and_grads(fn, q, k, v), value_and_grads(ref_fn, q, k, v))
    for name, ours, ref in pairs:
        # A zero reference (dq with a single key: the softmax is constant) is compared absolutely.
        rel = float(np.abs(ours - ref).max() / (np.abs(ref).max() or 1.0))
        assert rel <= tol, f"{name}: max abs err / max |ref| = {rel:.3g} > {tol}"
        errors.append(rel)
    return errors


def backend_fn(backend, heads, causal=False, **kw):
    return lambda q, k, v: attn.attention(q, k, v, heads, causal=causal, backend=backend, **kw)


# ------------------------------------------------------------------------------------------ xla


@pytest.mark.parametrize("causal", [False, True])
def test_xla_backend_is_the_previous_einsums_bit_for_bit(causal):
    q, k, v = inputs(77, 40)
    ours = jax.jit(backend_fn("xla", 2, causal))(q, k, v)
    before = jax.jit(lambda q, k, v: reference_einsums(q, k, v, 2, causal=causal))(q, k, v)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(before))


def test_bf16_logits_accumulate_in_float32():
    """bf16 inputs: the logits are float32 sums (preferred_element_type), not bf16 sums cast up."""
    q, k, v = inputs(64, 40, dtype=jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(backend_fn("xla", 2))(q, k, v))
    assert "preferred_element_type=float32" in jaxpr
    assert attn.attention(q, k, v, 2, backend="xla").dtype == jnp.bfloat16


# -------------------------------------------------------------------------------------- chunked


@pytest.mark.parametrize("t,head_dim,dtype", [(64, 40, jnp.float32), (200, 80, jnp.float32), (256, 40, jnp.bfloat16),
                                              (200, 40, jnp.bfloat16)])
def test_chunked_matches_xla(t, head_dim, dtype):
    # query_chunk 64: 200 tokens need 4 chunks with 56 padded query rows.
    chunked = lambda q, k, v: attn.chunked_attention(  # noqa: E731
        *(x.reshape(2, x.shape[1], 2, head_dim) for x in (q, k, v)), head_dim**-0.5, query_chunk=64
    ).reshape(q.shape)
    assert_parity(chunked, backend_fn("xla", 2), *inputs(t, head_dim, dtype=dtype), TOL[dtype])


def test_chunked_causal_matches_xla():
    chunked = lambda q, k, v: attn.chunked_attention(  # noqa: E731
        *(x.reshape(2, 200, 2, 40) for x in (q, k, v)), 40**-0.5, causal=True, query_chunk=64
    ).reshape(q.shape)
    assert_parity(chunked, backend_fn("xla", 2, causal=True), *inputs(200, 40), TOL[jnp.float32])


@pytest.mark.parametrize("t_k", [1, 77])
def test_chunked_cross_attention_matches_xla(monkeypatch, t_k):
    monkeypatch.setattr(attn, "QUERY_CHUNK", 64)
    assert_parity(backend_fn("chunked", 2), backend_fn("xla", 2), *inputs(200, 40, t_k=t_k), TOL[jnp.float32])


def test_chunked_never_materialises_the_full_logits(monkeypatch):
    """The jaxpr of the chunked backend (forward and backward) holds no (B, H, N, N) array."""
    monkeypatch.setattr(attn, "QUERY_CHUNK", 128)
    q, k, v = inputs(1024, 8, heads=2, batch=1)
    grad = jax.grad(lambda q, k, v: backend_fn("chunked", 2)(q, k, v).sum(), argnums=(0, 1, 2))
    text = str(jax.make_jaxpr(grad)(q, k, v))
    assert "1,2,1024,1024" not in text.replace(" ", "")
    assert "128,1024" in text.replace(" ", "")  # the per-chunk logits
    full = str(jax.make_jaxpr(jax.grad(lambda q, k, v: backend_fn("xla", 2)(q, k, v).sum()))(q, k, v))
    assert "1,2,1024,1024" in full.replace(" ", "")  # the check can see a full logits array


def test_chunked_backward_does_not_replay_the_softmax(monkeypatch):
    """The written-out backward rebuilds each block's softmax from the saved log-sum-exp: the gradient's
    program has the forward's row max only (autodiff of checkpointed blocks replays it, a second max)."""
    monkeypatch.setattr(attn, "QUERY_CHUNK", 64)
    q, k, v = inputs(256, 8, heads=2, batch=1)
    text = str(jax.make_jaxpr(jax.grad(lambda q, k, v: backend_fn("chunked", 2)(q, k, v).sum(),
                                       argnums=(0, 1, 2)))(q, k, v))
    assert text.count("reduce_max") == 1


def test_chunked_gradients_under_a_batch_and_head_sharded_mesh(monkeypatch):
    """The written-out backward (a custom_vjp around two scans) partitions like any program: batch over `data`,
    channels (whole heads) over `tensor` give the unsharded gradients (fp32, 1e-5)."""
    monkeypatch.setattr(attn, "QUERY_CHUNK", 64)
    q, k, v = inputs(200, 8, heads=4, batch=4)
    grad = jax.jit(jax.grad(lambda q, k, v: (backend_fn("chunked", 4, causal=True)(q, k, v) ** 2).sum(),
                            argnums=(0, 1, 2)))
    mesh = make_mesh({"data": 2, "tensor": 2}, devices=jax.devices()[:4])
    sharded = grad(*(jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor"))) for x in (q, k, v)))
    for ours, ref in zip(sharded, grad(q, k, v)):
        assert len(ours.sharding.device_set) == 4
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-5 * float(np.abs(ref).max()))


# --------------------------------------------------------------------------------------- splash


@pytest.mark.parametrize("t,head_dim,dtype", [(64, 40, jnp.float32), (200, 80, jnp.float32),
                                              (256, 40, jnp.bfloat16)])
def test_splash_matches_xla(t, head_dim, dtype):
    """Head dims 40/80 padded to 128 lanes; 64 and 200 tokens padded to 128/256 (masked by segment ids)."""
    assert_parity(backend_fn("splash", 2), backend_fn("xla", 2), *inputs(t, head_dim, dtype=dtype), TOL[dtype])


def test_splash_causal_matches_xla():
    assert_parity(backend_fn("splash", 2, causal=True), backend_fn("xla", 2, causal=True), *inputs(77, 64),
                  TOL[jnp.float32])


def test_splash_interpret_mode_is_announced(caplog):
    attn._warn_interpret.cache_clear()
    with caplog.at_level("WARNING", logger=attn.__name__):
        jax.eval_shape(backend_fn("splash", 2), *inputs(64, 40))
    assert any("interpret mode" in r.getMessage() for r in caplog.records)


def test_splash_leaves_cross_attention_to_xla():
    q, k, v = inputs(64, 40, t_k=77)
    np.testing.assert_array_equal(jax.jit(backend_fn("splash", 2))(q, k, v), jax.jit(backend_fn("xla", 2))(q, k, v))
    with pytest.raises(ValueError, match="splash.*self-attention.*77 keys"):  # the kernel wrapper itself refuses
        attn.splash_attention(*(x.reshape(2, x.shape[1], 2, 40) for x in (q, k, v)), 40**-0.5)


@pytest.mark.parametrize("axes,t", [({"data": 2, "fsdp": 4}, 200), ({"data": 2, "fsdp": 2, "tensor": 2}, 256)])
def test_splash_under_a_mesh_shards_with_shard_map(axes, t):
    """8 simulated devices: the batch is split over data×fsdp (and the 2 heads over tensor) by shard_map;
    200 tokens need padding (segment ids), 256 do not."""
    mesh = make_mesh(axes)
    batch = 8 if "tensor" not in axes else 4
    q, k, v = inputs(t, 40, batch=batch)
    sharded = [jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))) for x in (q, k, v)]
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(backend_fn("splash", 2))(*sharded))
        errors = assert_parity(backend_fn("splash", 2), backend_fn("xla", 2), *sharded, TOL[jnp.float32])
    assert "shard_map" in jaxpr
    assert max(errors) <= TOL[jnp.float32]


def test_splash_lowers_for_tpu_from_a_cpu_host():
    """platform="tpu" (as for AOT compilation against a TPU topology): `auto` picks splash at 4096 tokens and
    the real Mosaic kernel (not interpret mode) is lowered, forward and fused backward."""
    q = jnp.zeros((2, 4096, 8 * 40), jnp.bfloat16)

    def loss(q, k, v):
        return attn.attention(q, k, v, 8, backend="auto", platform="tpu").astype(jnp.float32).sum()

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 2  # forward kernel + fused dq/dk/dv kernel


# ---------------------------------------------------------------------------------- cudnn, auto


def test_cudnn_refuses_clearly_off_gpu():
    with pytest.raises(ValueError, match=r"^attention 'cudnn' needs an NVIDIA GPU, but the platform is cpu"):
        jax.eval_shape(backend_fn("cudnn", 2), *inputs(64, 40, dtype=jnp.bfloat16))


def test_cudnn_reasons_for_float32_and_head_dims():
    assert "bfloat16 or float16" in attn.cudnn_problem(jnp.float32, 40, "gpu")
    assert "multiples of 8" in attn.cudnn_problem(jnp.bfloat16, 160, "gpu")  # no local Hopper: limit 128
    assert "multiples of 8" in attn.cudnn_problem(jnp.bfloat16, 36, "gpu")
    assert attn.cudnn_problem(jnp.bfloat16, 80, "gpu") is None


def test_auto_picks_per_platform_and_shape():
    choose = attn.choose_backend
    assert choose("auto", "tpu", 4096, 4096, 40, jnp.bfloat16) == "splash"
    assert choose("auto", "tpu", 1024, 1024, 80, jnp.float32) == "splash"
    assert choose("auto", "tpu", 256, 256, 160, jnp.bfloat16) == "xla"
    assert choose("auto", "tpu", 4096, 1, 40, jnp.bfloat16) == "xla"  # cross-attention
    assert choose("auto", "gpu", 4096, 4096, 40, jnp.bfloat16) == "cudnn"
    assert choose("auto", "gpu", 4096, 4096, 40, jnp.float32) == "xla"
    assert choose("auto", "gpu", 256, 256, 160, jnp.bfloat16) == "xla"  # head dim 160 > 128 before Hopper
    assert choose("auto", "gpu", 4096, 77, 40, jnp.bfloat16) == "xla"
    n = attn.CPU_CHUNKED_MIN_TOKENS
    assert choose("auto", "cpu", n, n, 8, jnp.float32) == "chunked"
    assert choose("auto", "cpu", n // 4, n // 4, 8, jnp.float32) == "xla"
    assert choose("chunked", "tpu", 64, 1, 8, jnp.float32) == "chunked"  # explicit names are kept
    assert choose("splash", "cpu", 64, 64, 8, jnp.float32) == "splash"
    assert choose("splash", "tpu", 4096, 77, 40, jnp.float32) == "xla"  # except splash for cross-attention


def test_platform_resolution():
    assert attn.resolve_platform("TPU") == "tpu" and attn.resolve_platform("cuda") == "gpu"
    assert attn.resolve_platform() == jax.default_backend() == "cpu"
    with jax.set_mesh(make_mesh({"data": -1})):
        assert attn.resolve_platform() == "cpu"  # from the mesh's devices
        assert attn.resolve_platform("tpu") == "tpu"


def test_unknown_backend_is_one_line_error():
    with pytest.raises(ValueError, match=r"^unknown attention backend 'flash'; choose one of auto, xla, chunked"):
        ModelConfig(attention="flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_networks(ModelConfig(), attention="flash")


def test_config_round_trip_and_old_configs():
    cfg = ModelConfig(attention="chunked")
    raw = cfg.to_dict()
    assert raw["attention"] == "chunked" and ModelConfig.from_dict(raw) == cfg
    del raw["attention"]  # a config.json written before the option
    assert ModelConfig.from_dict(raw).attention == "auto"
    nets = build_networks(cfg)
    assert nets.unet.attention == "chunked"
    assert build_networks(cfg, attention="xla", platform="tpu").unet.platform == "tpu"
    assert build_networks(cfg, attention="xla").unet.attention == "xla"


def test_cli_flags_offer_every_backend():
    choices = '["auto", "xla", "chunked", "splash", "cudnn"]'
    assert list(attn.BACKENDS) == ["auto", "xla", "chunked", "splash", "cudnn"]
    for tool in ("sample.py", "app.py", "evaluate.py"):
        assert f'flags.DEFINE_enum("attention", None, {choices}' in (REPO_ROOT / "launch" / tool).read_text()


# ------------------------------------------------------------------------------------- goldens


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("backend", ["chunked", "splash"])
def test_unet_golden_with_backend(tiny_model, fixtures_dir, monkeypatch, backend):
    """The tiny U-Net (256 and 64 tokens; chunks of 64 queries) still matches the original's eps (1e-4, as
    tests/test_parity_fixtures.py)."""
    monkeypatch.setattr(attn, "QUERY_CHUNK", 64)
    io = np.load(fixtures_dir / "unet_io.npz")
    unet = build_networks(tiny_model.config, attention=backend).unet
    eps = jax.jit(unet.apply)({"params": tiny_model.params["unet"]}, jnp.asarray(nhwc(io["x"])),
                              jnp.asarray(io["timesteps"]), jnp.asarray(io["context"]))
    golden = nhwc(io["eps"])
    assert np.abs(np.asarray(eps) - golden).max() <= 1e-4 * np.abs(golden).max()


def run_sample_cli(model_dir, e2e, out, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "sample.py"), "--model", str(model_dir),
         "--image", "image.png", "--mask", "mask.png", "--sketch", "sketch.png", "--reference", "reference.png",
         "--out", str(out), "--steps", "10", "--guidance_scale", "5", "--sketch_drop_after", "0.5",
         "--sampler", "plms", "--vae_encode", "mean", "--noise", "noise.npy", *extra],
        cwd=e2e, capture_output=True, text=True, env=env, timeout=600,
    )


# Each CLI run is a process start, a model load and a compile; the default suite keeps the splash one (the kernel
# path) and the chunked U-Net golden above; the chunked CLI run is `-m slow`.
@pytest.mark.parametrize("backend", [pytest.param("chunked", marks=pytest.mark.slow), "splash"])
def test_sample_cli_with_backend_reproduces_expected_png(tiny_model_dir, fixtures_dir, tmp_path, backend):
    """`launch/sample.py --attention B` on the end-to-end fixture: same tolerance as the default path
    (tests/test_pipeline.py: pixels within 1 level, at most 1 % of them off)."""
    e2e = fixtures_dir / "e2e"
    out = tmp_path / "out.png"
    proc = run_sample_cli(tiny_model_dir, e2e, out, "--attention", backend)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if backend == "splash":
        assert "interpret mode" in proc.stderr
    diff = np.abs(np.asarray(Image.open(out), np.int16) - np.asarray(Image.open(e2e / "expected.png"), np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


@pytest.mark.slow  # a whole CLI start for an error already asserted at the API level above
def test_sample_cli_cudnn_on_cpu_is_one_line_error(tiny_model_dir, fixtures_dir, tmp_path):
    proc = run_sample_cli(tiny_model_dir, fixtures_dir / "e2e", tmp_path / "out.png", "--attention", "cudnn")
    assert proc.returncode == 2
    assert "sample.py: error: attention 'cudnn' needs an NVIDIA GPU" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out.png").exists()
