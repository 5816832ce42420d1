"""Multi-head scaled dot-product attention with selectable backends (`xla`, `chunked`, `splash`, `cudnn`, `auto`).

All backends take (B, T, heads*dim) inputs and return (B, Tq, heads*dim) in the query dtype. Heads are
split as PyTorch's `view(B, T, H, D)` does (head-major channel blocks). Logits accumulate in float32
(`preferred_element_type`) whatever the compute dtype, and the softmax runs in float32.

* `xla`: plain einsums materialising the (B, H, Tq, Tk) logits. Fastest for short sequences.
* `chunked`: head-major query blocks (`lax.map`) with FlashAttention's deferred normalisation and a written-out
  backward (`jax.custom_vjp`), so only a (B, H, chunk, Tk) slab of logits exists at a time, forward and
  backward. Any platform.
* `splash`: the Pallas TPU splash-attention kernel for self-attention (cross-attention uses `xla`).
  Head dims are zero-padded to a multiple of 128 lanes (scores unchanged; the scale is applied to q),
  sequences padded to a multiple of 128 with the padding in its own segment, the batch (and heads over
  `tensor`) split by `shard_map` when a mesh is set (`jax.set_mesh`). Off TPU it runs in interpret
  mode (tests only).
* `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU with bfloat16/float16 only.
* `auto`: chosen per call from the *target* platform (see `resolve_platform`) and the shapes; see
  `choose_backend`.

The target platform is `platform=` when given, else the platform of the mesh in context
(`jax.set_mesh`, e.g. TPU device descriptions for AOT compilation on a CPU host), else
`jax.default_backend()`.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "xla", "chunked", "splash", "cudnn")
# TPU: splash from this many query tokens up (self-attention). Below it the logits are small (at 256
# tokens 256 KiB per head and image) and padding to 128-lane blocks plus the kernel's fixed cost lose;
# at 1024 tokens 16 images x 8 heads of fp32 logits are already 512 MiB per layer, kept for backward.
TPU_SPLASH_MIN_TOKENS = 1024
# CPU: chunked from this many query tokens up; measured on the bench-sd head sizes (docs/attention.md):
# at 256 and 1024 tokens small query blocks are 3-4x faster than one (B, H, T, T) fusion, at 64 equal.
CPU_CHUNKED_MIN_TOKENS = 256
# `chunked`: query rows per chunk are the largest power of two (>= the platform's minimum) whose fp32 logits
# (B, H, rows, Tk) fit this many bytes. On CPU a 4 MiB slab stays in cache: with head-major blocks 4-8 MiB
# blocks are fastest and 16 MiB ones 2.5-5x slower (docs/attention.md). Elsewhere it only bounds memory.
CHUNK_BYTES = {"cpu": 4 * 2**20}
DEFAULT_CHUNK_BYTES = 256 * 2**20
QUERY_CHUNK: int | None = None  # a fixed number of query rows per chunk instead (tests)
MIN_QUERY_CHUNKS = {"cpu": 32}
MIN_QUERY_CHUNK = 64
SPLASH_LANES = 128  # the kernel's lane width: head dims and sequence blocks are multiples of it


def check_backend(name: str) -> str:
    """`name` if it is a known backend, else a one-line ValueError listing the valid names."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def _normalise_platform(platform: str) -> str:
    platform = platform.lower()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def resolve_platform(platform: str | None = None) -> str:
    """The platform attention is compiled for: `platform`, else the context mesh's, else the default backend.

    The mesh case matters for AOT compilation against a TPU topology from a CPU host, where
    `jax.default_backend()` is "cpu" but the mesh (under `jax.set_mesh`) holds TPU devices."""
    if platform:
        return _normalise_platform(platform)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        device = getattr(mesh, "abstract_device", None)
        if device is not None and getattr(device, "platform", None):
            return _normalise_platform(device.platform)
    return _normalise_platform(jax.default_backend())


def _cudnn_max_head_dim() -> int:
    """cuDNN flash attention: head dim <= 128 before Hopper, <= 256 from compute capability 9.0."""
    try:
        capability = jax.devices("gpu")[0].compute_capability
        return 256 if tuple(int(x) for x in str(capability).split(".")) >= (9, 0) else 128
    except Exception:  # no local GPU (e.g. compiling for one elsewhere): assume the common limit
        return 128


def cudnn_problem(dtype: Any, head_dim: int, platform: str) -> str | None:
    """Why cuDNN attention cannot run this call (a one-line reason), or None when it can."""
    if platform != "gpu":
        return f"needs an NVIDIA GPU, but the platform is {platform}; use --attention auto, xla or chunked"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return (f"needs bfloat16 or float16 compute, got {jnp.dtype(dtype).name}; use a bfloat16 compute dtype "
                "or --attention xla/chunked")
    max_dim = _cudnn_max_head_dim()
    if head_dim > max_dim or head_dim % 8:
        return (f"supports head dims that are multiples of 8 up to {max_dim} on this GPU, got {head_dim}; "
                "use --attention xla")
    return None


def choose_backend(backend: str, platform: str, t_q: int, t_k: int, head_dim: int, dtype: Any) -> str:
    """The concrete backend for one call. `auto`: TPU → splash for self-attention with >= 1024 tokens,
    xla otherwise (short sequences, cross-attention); GPU → cudnn for bf16/fp16 self-attention the card
    supports, xla otherwise; CPU → chunked from `CPU_CHUNKED_MIN_TOKENS` query tokens (measured), xla below.
    An explicit `splash` runs cross-attention (t_k != t_q: the U-Net's 1- or 77-token context) with xla,
    as the kernel is for self-attention and those logits are small."""
    check_backend(backend)
    self_attention = t_q == t_k
    if backend == "splash" and not self_attention:
        return "xla"
    if backend != "auto":
        return backend
    if platform == "tpu":
        return "splash" if self_attention and t_q >= TPU_SPLASH_MIN_TOKENS else "xla"
    if platform == "gpu":
        return "cudnn" if self_attention and cudnn_problem(dtype, head_dim, platform) is None else "xla"
    return "chunked" if t_q >= CPU_CHUNKED_MIN_TOKENS else "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, scale: float | None = None,
              causal: bool = False, backend: str = "xla", platform: str | None = None) -> jax.Array:
    """Multi-head scaled dot-product attention on (B, T, heads*dim) inputs.

    q: (B, Tq, H*D), k/v: (B, Tk, H*D) → (B, Tq, H*D) in q's dtype. `scale` (default D**-0.5)
    multiplies the logits. `causal` (self-attention, CLIP's text tower): query t attends to keys 0..t.
    `backend` is one of `BACKENDS`; `platform` the target platform (None: see `resolve_platform`).
    """
    batch, t_q, width = q.shape
    if width % num_heads:
        raise ValueError(f"attention: width {width} is not divisible into {num_heads} heads")
    head_dim = width // num_heads
    scale = head_dim**-0.5 if scale is None else scale
    target = resolve_platform(platform)
    chosen = choose_backend(backend, target, t_q, k.shape[1], head_dim, q.dtype)
    qh = q.reshape(batch, t_q, num_heads, head_dim)
    kh = k.reshape(batch, k.shape[1], num_heads, head_dim)
    vh = v.reshape(batch, v.shape[1], num_heads, head_dim)
    if chosen == "xla":
        out = xla_attention(qh, kh, vh, scale, causal)
    elif chosen == "chunked":
        out = chunked_attention(qh, kh, vh, scale, causal, query_chunk(batch, num_heads, k.shape[1], target))
    elif chosen == "splash":
        out = splash_attention(qh, kh, vh, scale, causal, target)
    else:
        problem = cudnn_problem(q.dtype, head_dim, target)
        if problem:
            raise ValueError(f"attention 'cudnn' {problem}")
        out = jax.nn.dot_product_attention(qh, kh, vh, scale=scale, is_causal=causal, implementation="cudnn")
    return out.reshape(batch, t_q, num_heads * head_dim).astype(q.dtype)


def _causal_allowed(q_positions: jax.Array, t_k: int) -> jax.Array:
    """(Tq, Tk) bool: key position <= query position."""
    return q_positions[:, None] >= jnp.arange(t_k)[None, :]


def _block_logits(q_block: jax.Array, keys: jax.Array, scale: float, causal: bool, q_offset: jax.Array | int,
                  head_major: bool) -> jax.Array:
    """(B, H, Tq, Tk) float32 scaled logits of queries starting at position `q_offset`: token-major (B, T, H, D)
    q and keys, or head-major (B, H, T, D) ones (`head_major`); -inf where causality forbids."""
    # The scale multiplies the logits, as the original's `einsum(q, k) * scale`.
    spec = "bhqd,bhkd->bhqk" if head_major else "bqhd,bkhd->bhqk"
    logits = jnp.einsum(spec, q_block, keys, preferred_element_type=jnp.float32) * scale
    if causal:
        # The diagonal is always allowed (padded query rows see every key), so no row is fully masked and -inf
        # is safe (exp gives exact 0, as transformers' additive finfo.min mask does).
        allowed = _causal_allowed(q_offset + jnp.arange(logits.shape[2]), logits.shape[3])
        logits = jnp.where(allowed[None, None], logits, -jnp.inf)
    return logits


def xla_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, scale: float, causal: bool = False) -> jax.Array:
    """Einsum attention on (B, T, H, D) arrays → (B, Tq, H, D), materialising (B, H, Tq, Tk) fp32 logits."""
    # Plain einsums: on CPU this is ~2.5x faster than jax.nn.dot_product_attention's XLA path, and XLA
    # fuses it well on TPU.
    logits = _block_logits(qh, kh, scale, causal, 0, head_major=False)
    weights = jax.nn.softmax(logits, axis=-1).astype(vh.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, vh, preferred_element_type=jnp.float32)
    return out.astype(qh.dtype)


def query_chunk(batch: int, heads: int, t_k: int, platform: str) -> int:
    """Query rows per chunk of the `chunked` backend: `QUERY_CHUNK`, else from the `CHUNK_BYTES` budget."""
    if QUERY_CHUNK:
        return QUERY_CHUNK
    rows = CHUNK_BYTES.get(platform, DEFAULT_CHUNK_BYTES) // (4 * batch * heads * t_k)
    return max(MIN_QUERY_CHUNKS.get(platform, MIN_QUERY_CHUNK), 2 ** int(math.log2(max(rows, 1))))


def chunked_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, scale: float, causal: bool = False,
                      query_chunk: int = 1024) -> jax.Array:
    """Attention over blocks of `query_chunk` queries; (B, T, H, D) → (B, Tq, H, D), as `xla_attention`.

    Neither pass holds more than one (B, H, query_chunk, Tk) block of logits. The blocks are head-major
    (q, k, v transposed to (B, H, T, D) once, outside the loop), so both products are plain batched matrix
    products; the softmax is normalised after the value product (O = (exp(S − m)·V) / Σ exp(S − m)), as
    FlashAttention does. The backward is written out (`jax.custom_vjp`, FlashAttention's): the forward keeps
    only the output and each row's log-sum-exp, the backward rebuilds a block's softmax as exp(S − lse) and
    accumulates dK, dV over the blocks in float32. Each of these measured faster on CPU than the einsum block
    under autodiff (docs/attention.md). Tq is zero-padded to a multiple of the chunk (padded rows are
    dropped; their gradient is zero)."""
    return _chunked_vjp(qh, kh, vh, scale, causal, min(query_chunk, qh.shape[1]))


def _head_major(x: jax.Array) -> jax.Array:
    """(B, T, H, D) → (B, H, T, D)."""
    return x.transpose(0, 2, 1, 3)


def _query_blocks(x: jax.Array, chunk: int, head_major: bool) -> jax.Array:
    """(B, T, H, D) → (n_blocks, B, H, chunk, D) if `head_major` else (n_blocks, B, chunk, H, D); T zero-padded
    to a multiple of `chunk`."""
    batch, t, heads, dim = x.shape
    n_blocks = -(-t // chunk)
    x = jnp.pad(x, ((0, 0), (0, n_blocks * chunk - t), (0, 0), (0, 0)))
    x = x.reshape(batch, n_blocks, chunk, heads, dim)
    return x.transpose(1, 0, 3, 2, 4) if head_major else x.swapaxes(0, 1)


def _from_query_blocks(x: jax.Array, t: int, head_major: bool) -> jax.Array:
    """Inverse of `_query_blocks`: blocks → (B, T, H, D)."""
    x = x.transpose(1, 0, 3, 2, 4) if head_major else x.swapaxes(0, 1)
    batch, n_blocks, chunk, heads, dim = x.shape
    return x.reshape(batch, n_blocks * chunk, heads, dim)[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_vjp(qh: jax.Array, kh: jax.Array, vh: jax.Array, scale: float, causal: bool, chunk: int) -> jax.Array:
    return _chunked_forward(qh, kh, vh, scale, causal, chunk)[0]


def _chunked_forward(qh, kh, vh, scale, causal, chunk):
    """Output and the residuals of `_chunked_backward`: q, k, v, the output and lse (n, B, H, chunk)."""
    k_heads, v_heads = _head_major(kh), _head_major(vh)

    def block(args):
        q_block, index = args
        logits = _block_logits(q_block, k_heads, scale, causal, index * chunk, head_major=True)
        row_max = logits.max(axis=-1, keepdims=True)
        unnormalised = jnp.exp(logits - row_max)
        row_sum = unnormalised.sum(axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", unnormalised.astype(vh.dtype), v_heads,
                         preferred_element_type=jnp.float32) / row_sum
        return out.astype(qh.dtype), (row_max + jnp.log(row_sum))[..., 0]

    q_blocks = _query_blocks(qh, chunk, head_major=True)
    out_blocks, lse = jax.lax.map(block, (q_blocks, jnp.arange(q_blocks.shape[0])))
    out = _from_query_blocks(out_blocks, qh.shape[1], head_major=True)
    return out, (qh, kh, vh, out, lse)


def _chunked_backward(scale, causal, chunk, residuals, d_out):
    """dQ per query block; dK, dV summed over the blocks (float32 carries), as FlashAttention's backward.
    Token-major blocks: head-major ones measured 2x slower here (the dK/dV products contract over the rows)."""
    qh, kh, vh, out, lse = residuals
    f32 = jnp.float32

    def block(carry, xs):
        dk, dv = carry
        q_block, out_block, d_out_block, lse_block, index = xs
        logits = _block_logits(q_block, kh, scale, causal, index * chunk, head_major=False)
        weights = jnp.exp(logits - lse_block[..., None])
        dv = dv + jnp.einsum("bhqk,bqhd->bkhd", weights.astype(vh.dtype), d_out_block, preferred_element_type=f32)
        d_weights = jnp.einsum("bqhd,bkhd->bhqk", d_out_block, vh, preferred_element_type=f32)
        # Σ_k P·dP per row equals Σ_d dO·O (the softmax Jacobian's row term, from the small arrays).
        row_term = jnp.einsum("bqhd,bqhd->bhq", d_out_block.astype(f32), out_block.astype(f32))
        d_logits = weights * (d_weights - row_term[..., None]) * scale
        dq = jnp.einsum("bhqk,bkhd->bqhd", d_logits.astype(kh.dtype), kh, preferred_element_type=f32)
        dk = dk + jnp.einsum("bhqk,bqhd->bkhd", d_logits.astype(qh.dtype), q_block, preferred_element_type=f32)
        return (dk, dv), dq.astype(qh.dtype)

    q_blocks = _query_blocks(qh, chunk, head_major=False)
    blocks = (q_blocks, _query_blocks(out, chunk, head_major=False), _query_blocks(d_out, chunk, head_major=False),
              lse, jnp.arange(q_blocks.shape[0]))
    zeros = (jnp.zeros(kh.shape, f32), jnp.zeros(vh.shape, f32))
    (dk, dv), dq_blocks = jax.lax.scan(block, zeros, blocks)
    return _from_query_blocks(dq_blocks, qh.shape[1], head_major=False), dk.astype(kh.dtype), dv.astype(vh.dtype)


_chunked_vjp.defvjp(_chunked_forward, _chunked_backward)


# ---------------------------------------------------------------------------------------------- splash


@functools.cache
def _warn_interpret(platform: str) -> None:
    log.warning("splash attention on %s runs the TPU kernel in Pallas interpret mode: slow, for testing only", platform)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _splash_block(padded_len: int) -> int:
    """The largest of 512/256/128 dividing the padded sequence (bigger blocks amortise the grid steps)."""
    return next(b for b in (512, 256, SPLASH_LANES) if padded_len % b == 0)


def _make_splash_kernel(heads: int, seq: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    block = _splash_block(seq)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    one = sa.CausalMask((seq, seq)) if causal else sa.FullMask((seq, seq))
    return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segments: jax.Array | None, causal: bool,
                  interpret: bool) -> jax.Array:
    """Splash on (B, H, Tp, Dp) blocks already padded and scaled; `segments` (Tp,) int32 or None."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kernel = _make_splash_kernel(q.shape[1], q.shape[2], causal, interpret)
    if segments is None:
        return jax.vmap(kernel)(q, k, v)
    ids = sa.SegmentIds(q=segments, kv=segments)
    return jax.vmap(kernel, in_axes=(0, 0, 0, None))(q, k, v, ids)


def _mesh_axes(batch: int, heads: int) -> tuple[Any, tuple[str, ...], str | None]:
    """(mesh, batch axes, head axis) for shard_map, or (None, (), None) when no mesh applies."""
    from sketchcomp_jax.parallel.mesh import BATCH_AXES

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:  # no mesh, or already inside a shard_map
        return None, (), None
    sizes = dict(mesh.shape)
    batch_axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if batch % math.prod(sizes[a] for a in batch_axes):
        log.warning("splash attention: batch %d does not divide over mesh axes %s; not sharding it", batch, batch_axes)
        batch_axes = ()
    head_axis = "tensor" if sizes.get("tensor", 1) > 1 and heads % sizes["tensor"] == 0 else None
    if not batch_axes and head_axis is None:
        return None, (), None
    return mesh, batch_axes, head_axis


def splash_attention(qh: jax.Array, kh: jax.Array, vh: jax.Array, scale: float, causal: bool = False,
                     platform: str | None = None) -> jax.Array:
    """Pallas TPU splash attention on (B, T, H, D) self-attention arrays → (B, T, H, D).

    q is multiplied by `scale` (zero-padded head dims leave the scores unchanged); sequences are padded
    to a multiple of 128 with the padding in segment 1 (real tokens never see it); under a mesh the
    batch is split over the mesh's batch axes (and heads over `tensor`) with `shard_map`. Off TPU the
    kernel runs in interpret mode."""
    batch, t_q, heads, dim = qh.shape
    if kh.shape[1] != t_q:
        raise ValueError(f"attention 'splash' is for self-attention; got {t_q} queries and {kh.shape[1]} keys "
                         "(use auto, xla or chunked)")
    target = resolve_platform(platform)
    interpret = target != "tpu"
    if interpret:
        _warn_interpret(target)
    seq, width = _round_up(t_q, SPLASH_LANES), _round_up(dim, SPLASH_LANES)
    pad = ((0, 0), (0, 0), (0, seq - t_q), (0, width - dim))

    def prepare(x: jax.Array, factor: float = 1.0) -> jax.Array:
        x = x.swapaxes(1, 2)  # (B, H, T, D): the kernel's head-major layout
        if factor != 1.0:
            x = (x.astype(jnp.float32) * factor).astype(x.dtype)
        return jnp.pad(x, pad)

    q, k, v = prepare(qh, scale), prepare(kh), prepare(vh)
    segments = None
    if seq != t_q:
        segments = jnp.asarray(np.arange(seq) >= t_q, dtype=jnp.int32)
    local = functools.partial(_splash_local, causal=causal, interpret=interpret)
    mesh, batch_axes, head_axis = _mesh_axes(batch, heads)
    if mesh is None:
        out = local(q, k, v, segments)
    else:
        from jax.sharding import PartitionSpec as P

        spec = P(batch_axes or None, head_axis, None, None)
        seg_spec = P() if segments is not None else None
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec,
                            check_vma=False)(q, k, v, segments)
    return out[:, :, :t_q, :dim].swapaxes(1, 2)
