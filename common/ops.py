"""The one place that chooses, at run time, between plain PyTorch math and a Triton kernel.

Models call the ops here (norms, QK-norm + RoPE, modulation, SwiGLU's activation, attention); the math
itself is defined once in `norms.py`, `rope.py`, `activations.py` and `attention.py`, which know nothing of kernels, and each kernel in
`zflux.kernels` is tested against that math. This module is the only one that imports
`zflux.kernels`, and only inside the functions that need a kernel, so nothing else knows Triton exists.

Backends:
- `auto` (the default): the fastest measured mix on a CUDA GPU, the Triton norm/RoPE/modulation
  kernels with torch SDPA (cuDNN) attention, or the Triton flash kernel where keys are padded and
  the wide-head one past head dim 256 (the autoencoders' mid block); plain PyTorch elsewhere.
- `sdpa`: plain PyTorch throughout (torch SDPA for attention).
- `triton`: every op in `zflux.kernels`, the flash-attention kernels included.
- `reference`: the explicit fp32 math the kernels are tested against.

The choice comes from, in order: an active `use_backend(...)` scope (models open one around their
forward with their own `backend` attribute), the `ZFLUX_BACKEND` environment variable, then `auto`.
The Triton kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, the CPU tests, with `triton` named explicitly); anywhere else the PyTorch path
runs.
"""

import os
from contextlib import contextmanager
from importlib.util import find_spec
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from zflux.common import activations, norms, parallel, quant, rope
from zflux.common import attention as attention_math
from zflux.common.quant import Fp8Tensor

BACKENDS = ("auto", "sdpa", "triton", "reference")
HAS_TRITON = find_spec("triton") is not None
# Plain module globals rather than ContextVars: torch.compile traces global reads (and guards on
# them), but not ContextVar.get.
_scoped: str | None = None
_fp8_attention = False


def check_backend(name: str) -> str:
    """Return `name` if it is a known backend, else raise naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    """The backend in force here: scope, then $ZFLUX_BACKEND, then 'auto'."""
    return check_backend(_scoped or os.environ.get("ZFLUX_BACKEND") or "auto")


@contextmanager
def use_backend(name: str | None, fp8_attention: bool | None = None) -> Iterator[None]:
    """Run the enclosed code with backend `name` and, if `fp8_attention`, the fp8 flash kernel where it runs (None leaves
    the current choices)."""
    global _scoped, _fp8_attention
    previous = _scoped, _fp8_attention
    _scoped = check_backend(name) if name else _scoped
    _fp8_attention = _fp8_attention if fp8_attention is None else fp8_attention
    try:
        yield
    finally:
        _scoped, _fp8_attention = previous


def triton_runs_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: a CUDA GPU, or the CPU under Triton's interpreter."""
    return HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def use_kernels(x: Tensor) -> bool:
    """Whether a norm/RoPE/modulation op on `x` runs its Triton kernel under the current backend."""
    backend = current_backend()
    if backend == "auto":
        return x.is_cuda and HAS_TRITON
    return backend == "triton" and triton_runs_on(x.device)


def use_flash_kernel(q: Tensor, masked: bool) -> bool:
    """Whether attention on `q` runs the Triton flash-attention kernel.

    Always under `triton`. Under `auto` only for key-padded bf16/fp16 batches (Z-Image's CFG rows with
    captions of different lengths), where it beats SDPA, whose fast kernels take no mask (H100: 484
    vs 413 TFLOP/s, bench/RESULTS.md); unmasked attention stays on cuDNN, which is faster there.
    """
    backend = current_backend()
    if backend == "auto":
        if not (masked and q.is_cuda and HAS_TRITON and q.dtype in (torch.float16, torch.bfloat16)):
            return False
        from zflux.kernels.attention import HEAD_DIMS

        return q.shape[-1] in HEAD_DIMS
    return backend == "triton" and use_kernels(q)


def use_fp8_attention(q: Tensor, k: Tensor) -> bool:
    """Whether attention on q, k runs the fp8 flash kernel: inside an fp8 model's forward (use_backend(fp8_attention=True))
    unless $ZFLUX_FP8_ATTENTION is 0, on one device (not inside a sequence-parallel scope), where the Triton kernels run
    (a GPU with fp8 tensor cores: compute capability 8.9+, or the interpreter under `triton`), at a head dim the kernel
    takes, with as many keys as queries.

    On the H100 the kernel runs at 671-795 TFLOP/s against cuDNN bf16's 607-633 at these models' shapes, given q and k
    quantized by the QK-norm + RoPE kernel (attention_inputs below). Which models turn it on under precision fp8: their
    class's FP8_ATTENTION (common/fp8.py apply_precision; FLUX.1's whole runs moved too far from bf16 with it)."""
    if not _fp8_attention or os.environ.get("ZFLUX_FP8_ATTENTION") == "0" or parallel.attending() is not None:
        return False
    if not use_kernels(q) or k.shape != q.shape:
        return False
    from zflux.kernels.attention import HEAD_DIMS

    return q.shape[-1] in HEAD_DIMS and (not q.is_cuda or torch.cuda.get_device_capability(q.device) >= (8, 9))


def per_sample(v: Tensor) -> bool:
    """Whether a modulation vector is one per sample, (B, 1, C), the kernels' form; Z-Image Omni's is per token, (B, S, C)."""
    return v.shape[-2] == 1


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """norms.rms_norm, or its fused kernel."""
    if use_kernels(x):
        from zflux.kernels.rmsnorm import rms_norm as fused

        return fused(x, weight, eps)
    return norms.rms_norm(x, weight, eps)


def layer_norm_modulate(x: Tensor, shift: Tensor | None, scale: Tensor, eps: float, fp8: bool = False) -> Tensor | Fp8Tensor:
    """norms.layer_norm_modulate ((1 + scale) * LayerNorm(x) + shift), or its fused kernel; fp8: quantized per token."""
    if use_kernels(x):
        from zflux.kernels import modulate

        return Fp8Tensor(*modulate.layer_norm_modulate_fp8(x, shift, scale, eps)) if fp8 else \
            modulate.layer_norm_modulate(x, shift, scale, eps)
    y = norms.layer_norm_modulate(x, shift, scale, eps)
    return quant.quantize(y) if fp8 else y


def rms_norm_scale(x: Tensor, weight: Tensor, scale: Tensor, eps: float, fp8: bool = False) -> Tensor | Fp8Tensor:
    """norms.rms_norm_scale (RMSNorm(x) * (1 + scale)), or its fused kernel (per-sample scale only); fp8: quantized per token."""
    if use_kernels(x) and per_sample(scale):
        from zflux.kernels import modulate

        return Fp8Tensor(*modulate.rms_norm_scale_fp8(x, weight, scale, eps)) if fp8 else \
            modulate.rms_norm_scale(x, weight, scale, eps)
    y = norms.rms_norm_scale(x, weight, scale, eps)
    return quant.quantize(y) if fp8 else y


def quantize_fp8(x: Tensor, granularity: str) -> Fp8Tensor:
    """quant.quantize (e4m3 and fp32 scales), or, per row, its fused kernel."""
    if granularity == "per-row" and use_kernels(x):
        from zflux.kernels.quantize import quantize_rows

        return Fp8Tensor(*quantize_rows(x))
    return quant.quantize(x, granularity)


def gated_rms_residual(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, eps: float) -> Tensor:
    """norms.gated_rms_residual (x + gate * RMSNorm(y)), or its fused kernel (per-sample gate only)."""
    if use_kernels(x) and per_sample(gate):
        from zflux.kernels.modulate import gated_rms_residual as fused

        return fused(x, y, weight, gate, eps)
    return norms.gated_rms_residual(x, y, weight, gate, eps)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """norms.gated_residual (x + gate * y, torch.addcmul), or its one-pass kernel (per-sample gate only): addcmul runs
    PyTorch's unvectorized elementwise kernel, 31 us for FLUX's (1, 4096, 3072) bf16 rows on the H100."""
    if use_kernels(x) and per_sample(gate):
        from zflux.kernels.modulate import gated_residual as fused

        return fused(x, y, gate)
    return norms.gated_residual(x, y, gate)


def gated_rms_residual_norm_scale(x: Tensor, y: Tensor, weight: Tensor, gate: Tensor, norm_weight: Tensor, scale: Tensor,
                                  eps: float, fp8: bool = False) -> tuple[Tensor, Tensor | Fp8Tensor]:
    """norms.gated_rms_residual_norm_scale: gated_rms_residual, and rms_norm_scale of its result (fp8: quantized per
    token), from one kernel (per-sample gate and scale only), else the two ops."""
    kernels = use_kernels(x) and per_sample(gate) and per_sample(scale)
    return _residual_and_norm("gated_rms_residual_norm_scale", (x, y, weight, gate, norm_weight, scale, eps), fp8, kernels)


def gated_residual_layer_norm_modulate(x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float,
                                       fp8: bool = False) -> tuple[Tensor, Tensor | Fp8Tensor]:
    """norms.gated_residual_layer_norm_modulate: gated_residual, and layer_norm_modulate of its result (fp8: quantized
    per token), from one kernel (per-sample vectors only), else the two ops."""
    kernels = use_kernels(x) and per_sample(gate) and per_sample(shift) and per_sample(scale)
    return _residual_and_norm("gated_residual_layer_norm_modulate", (x, y, gate, shift, scale, eps), fp8, kernels)


def _residual_and_norm(name: str, args: tuple, fp8: bool, kernels: bool) -> tuple[Tensor, Tensor | Fp8Tensor]:
    """The residual and the norm of it from the kernel `name` in kernels/modulate.py (its `_fp8` form for fp8), or from
    norms' `name` with the norm quantized by quant.quantize."""
    if kernels:
        from zflux.kernels import modulate

        if fp8:
            out, *rows = getattr(modulate, f"{name}_fp8")(*args)
            return out, Fp8Tensor(*rows)
        return getattr(modulate, name)(*args)
    out, normed = getattr(norms, name)(*args)
    return out, quant.quantize(normed) if fp8 else normed


def group_norm_silu(x: Tensor, norm: nn.GroupNorm, x_bias: Tensor | None = None, silu: bool = True) -> Tensor:
    """norms.group_norm_silu (SiLU(GroupNorm(x + x_bias)), or without the SiLU) with `norm`'s groups, parameters and eps,
    or its fused kernel (NCHW or channels-last x with power-of-two channels and groups). The kernel has no backward:
    training the autoencoder (common/training.py) runs the PyTorch math."""
    if use_kernels(x) and not training(x, norm.weight):
        from zflux.kernels.groupnorm import group_norm_silu as fused, supports

        if supports(x, norm.num_groups):
            return fused(x, norm.weight, norm.bias, norm.num_groups, norm.eps, x_bias, silu)
    return norms.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, x_bias, silu)


def bias_residual(h: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """norms.bias_residual (h + bias + x, in place in h), or its one-pass kernel (h and x dense in one memory format)."""
    if use_kernels(h) and not training(h, bias):
        from zflux.kernels.groupnorm import bias_residual_, supports_residual

        if supports_residual(h, x):
            bias_residual_(h, bias, x)
            return h
    return norms.bias_residual(h, bias, x)


def training(x: Tensor, weight: Tensor) -> bool:
    """Whether autograd records an op on x with `weight` (the kernels without a backward then run the PyTorch math)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


class Heads(NamedTuple):
    """One stream's queries, keys and values (B, H, S, D) as its projection gives them (views of it: any strides with
    unit channel stride), and the stream's QK-norm weights (D,)."""

    q: Tensor
    k: Tensor
    v: Tensor
    q_weight: Tensor
    k_weight: Tensor


class Fp8Values(NamedTuple):
    """Values quantized for the fp8 attention kernel: e4m3 `data` (B, H, D, S rounded up to 16), the tokens along the
    last axis, with fp32 `scale` (B, H, D), one per channel of each head; `dtype`: the attention output's."""

    data: Tensor
    scale: Tensor
    dtype: torch.dtype


def attention_inputs(streams: list[Heads], eps: float, cos: Tensor, sin: Tensor, plain_v: bool = False
                     ) -> tuple[Tensor, Tensor, Tensor] | tuple[Fp8Tensor, Fp8Tensor, Fp8Values | Tensor]:
    """q, k, v (B, H, S, D) for `attention` from one stream, or two joined along the tokens in order (FLUX's [text;
    image]): q and k RMS-normed over the head dim, then rotated (rope.qk_norm_rope) by the tables (B or 1, S, D/2) that
    cover every stream's tokens; one stream's v is its own view, two streams' are joined (torch.cat).

    Where the kernels run, one kernel per stream norms and rotates q and k into the joined tensors and copies v's rows
    into its join (no concatenation). Where attention will run the fp8 kernel (use_fp8_attention) that kernel quantizes
    q and k as it stores them: q with a scale per token (B, H, S, 1), k with one scale (), bounded by both streams' k
    norm weights; v is quantized per channel of each head (its maxima over every stream's tokens), each stream by one
    pass into its place in the joined v, as Fp8Values (no concatenation); `plain_v` keeps v plain (FLUX.2 KV caches it:
    attention then quantizes it itself)."""
    if len(streams) > 2:
        raise ValueError(f"attention_inputs joins one or two streams, got {len(streams)}")
    q0 = streams[0].q
    fp8 = use_fp8_attention(q0, streams[0].k)
    if not fp8 and not use_kernels(q0):
        parts = [(*rope.qk_norm_rope(s.q, s.k, s.q_weight, s.k_weight, eps, cos_i, sin_i), s.v)
                 for s, cos_i, sin_i in _tables(streams, cos, sin)]
        return parts[0] if len(parts) == 1 else tuple(torch.cat(joined, dim=2) for joined in zip(*parts))
    if not fp8 and len(streams) == 1:  # the single stream's v stays a view of its projection
        from zflux.kernels.rmsnorm import qk_norm_rope as fused

        (s,) = streams
        return *fused(s.q, s.k, s.q_weight, s.k_weight, eps, cos, sin), s.v
    return _fused_attention_inputs(streams, eps, cos, sin, fp8, plain_v)


def _tables(streams: list[Heads], cos: Tensor, sin: Tensor) -> Iterator[tuple[Heads, Tensor, Tensor]]:
    """Each stream with its tokens' RoPE tables (views of the joined ones)."""
    offset = 0
    for s in streams:
        S = s.q.shape[2]
        yield s, cos[:, offset:offset + S], sin[:, offset:offset + S]
        offset += S


def _fused_attention_inputs(streams: list[Heads], eps: float, cos: Tensor, sin: Tensor, fp8: bool, plain_v: bool
                            ) -> tuple[Tensor, Tensor, Tensor] | tuple[Fp8Tensor, Fp8Tensor, Fp8Values | Tensor]:
    """attention_inputs by the kernels: qk_norm_rope_into per stream, then under fp8 quantize_values."""
    from zflux.kernels.quantize import quantize_values
    from zflux.kernels.rmsnorm import qk_norm_rope_into

    B, H, _, D = streams[0].q.shape
    S = sum(s.q.shape[2] for s in streams)
    like = streams[0].v
    q, k = (like.new_empty((B, H, S, D), dtype=quant.E4M3 if fp8 else like.dtype) for _ in range(2))
    q_scale, k_scale = (like.new_empty((B, H, S), dtype=torch.float32), like.new_empty((1,), dtype=torch.float32)) if fp8 else (None, None)
    quantize_v = fp8 and not plain_v
    # The joined v where it stays plain (quantized values are joined as they are quantized, below).
    v = like.new_empty((B, H, S, D)) if len(streams) > 1 and not quantize_v else None
    offset = 0
    for i, (s, cos_i, sin_i) in enumerate(_tables(streams, cos, sin)):
        # Two streams' keys share one scale: each bounds it by the other's norm weight too.
        qk_norm_rope_into(s.q, s.k, None if v is None else s.v, s.q_weight, s.k_weight, streams[i - 1].k_weight, eps,
                          cos_i, sin_i, offset=offset, q_out=q, k_out=k, q_scale=q_scale, k_scale=k_scale, v_out=v)
        offset += s.q.shape[2]
    if fp8:
        q, k = Fp8Tensor(q, q_scale[..., None]), Fp8Tensor(k, k_scale.reshape(()))
    if quantize_v:
        return q, k, Fp8Values(*quantize_values([s.v for s in streams]), like.dtype)
    return q, k, streams[0].v if v is None else v


def split_tokens(x: Tensor | Fp8Tensor, n: int) -> tuple[Tensor | Fp8Tensor, Tensor | Fp8Tensor]:
    """Rows (B, S, K), plain or quantized per row (attention(fp8=True)), as their first n tokens and the rest: the text
    and image streams' shares of a joint attention's output."""
    if isinstance(x, Fp8Tensor):
        return Fp8Tensor(x.data[:, :n], x.scale[:, :n]), Fp8Tensor(x.data[:, n:], x.scale[:, n:])
    return x[:, :n], x[:, n:]


def dequantize_heads(x: Tensor | Fp8Tensor, dtype: torch.dtype) -> Tensor:
    """Queries or keys as plain tensors in `dtype`, where a path cannot take them quantized (keys joined with cached
    ones)."""
    return quant.dequantize(x).to(dtype) if isinstance(x, Fp8Tensor) else x


def silu_mul(gate: Tensor, up: Tensor, out: Tensor | None = None, fp8: bool = False) -> Tensor | Fp8Tensor:
    """activations.silu_mul (SwiGLU's silu(gate) * up), or its one-pass kernel; written into `out` (a view of rows,
    e.g. part of a concatenation's buffer) when given, and returned. fp8: quantized per token (no `out`), for an fp8 linear."""
    if fp8:
        return activation_fp8(gate, up)
    if out is None:
        out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    if use_kernels(gate):
        from zflux.kernels.activations import silu_mul_

        silu_mul_(gate, up, out)
    else:
        out.copy_(activations.silu_mul(gate, up))
    return out


def gelu_tanh(x: Tensor, out: Tensor | None = None, fp8: bool = False) -> Tensor | Fp8Tensor:
    """activations.gelu_tanh, or its one-pass kernel; written into `out` (a view of rows, e.g. part of a concatenation's
    buffer) when given, and returned. fp8: quantized per token (no `out`), for an fp8 linear."""
    if fp8:
        return activation_fp8(x)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if use_kernels(x):
        from zflux.kernels.activations import gelu_tanh_

        gelu_tanh_(x, out)
    else:
        out.copy_(activations.gelu_tanh(x))
    return out


def join_activation(before: Tensor, gate: Tensor, up: Tensor | None = None, fp8: bool = False) -> Tensor | Fp8Tensor:
    """[before | silu(gate) * up (or GELU-tanh(gate) without `up`)] along the channels: a single block's linear2 input,
    the attention output then the MLP activation, the activation written in place where a concatenation would copy it
    again. fp8: quantized per token, the activation and the quantization in one kernel where the kernels run."""
    if fp8:
        return activation_fp8(gate, up, before)
    D = before.shape[-1]
    joined = before.new_empty(*before.shape[:-1], D + gate.shape[-1])  # (..., D + F)
    rows_of(before[:, None], out=joined[..., :D])  # (B, S, D) as one head of width D
    if up is None:
        gelu_tanh(gate, out=joined[..., D:])
    else:
        silu_mul(gate, up, out=joined[..., D:])
    return joined


def activation_fp8(gate: Tensor, up: Tensor | None = None, before: Tensor | None = None) -> Fp8Tensor:
    """silu(gate) * up, or GELU-tanh(gate) without `up`, after `before`'s channels if given, quantized per token for an fp8
    linear: one kernel (one read, one e4m3 write), or quant.quantize of the plain activation (and concatenation)."""
    if use_kernels(gate):
        from zflux.kernels.activations import activation_fp8 as fused

        return Fp8Tensor(*fused(gate, up, before))
    y = activations.gelu_tanh(gate) if up is None else activations.silu_mul(gate, up)
    return quant.quantize(y if before is None else torch.cat([before, y], dim=-1))


def attention(q: Tensor | Fp8Tensor, k: Tensor | Fp8Tensor, v: Tensor | Fp8Values, key_lens: Tensor | None = None,
              fp8: bool = False) -> Tensor | Fp8Tensor:
    """Non-causal attention on (B, H, S, D) q, k, v -> (B, S, H*D), in v's dtype; q, k, v as attention_inputs returns them.

    `key_lens` (B,) marks right padding: keys at index >= key_lens[b] are masked out. Pass None
    when every sequence is full, which lets SDPA use its fastest (mask-free) kernels. Keys may
    outnumber queries (FLUX.2 KV's cached reference keys): the flash kernel takes equal lengths
    only, so such calls run on SDPA. In an fp8 model's forward, the fp8 flash kernel where it runs (see
    use_fp8_attention); elsewhere fp8 models attend as the others do. Inside a sequence-parallel scope
    (common/parallel.py) q, k, v hold this rank's tokens and `key_lens` counts keys of the whole sequence.

    fp8 (an fp8 linear next, fp8.wants_fp8): where the fp8 kernel runs, it writes e4m3 rows with their scales (one
    value per sample, bounded by v's: kernels/attention.py), and the linear takes them as they are; elsewhere the output
    is the plain one, which the linear quantizes itself.
    """
    shards = parallel.attending()
    if fp8 and isinstance(q, Fp8Tensor) and shards is None:
        from zflux.kernels.attention import flash_attention_fp8_rows

        data, scale = flash_attention_fp8_rows(*fp8_operands(q, k, v), key_lens)  # (B, S, H, D), (B, S, 1)
        return Fp8Tensor(rearrange(data, "b s h d -> b s (h d)"), scale)
    out = attend(q, k, v, key_lens) if shards is None else shards.attention(q, k, v, key_lens, attend=attend)  # (B, H, S, D)
    return rows_of(out)


def rows_of(heads: Tensor, out: Tensor | None = None) -> Tensor:
    """(B, H, S, D) heads as (B, S, H*D) rows: a free view where they are laid out (B, S, H, D) (the flash kernels'
    outputs) and no `out` (a view of rows, unit channel stride) is given, else one copy into `out` or a new tensor, by
    the layout kernel where the kernels run (PyTorch copies this transpose in its non-vectorized loop: kernels/layout.py)."""
    B, H, S, D = heads.shape
    if out is None:
        if heads.transpose(1, 2).is_contiguous():
            return rearrange(heads, "b h s d -> b s (h d)")
        out = heads.new_empty(B, S, H * D)
    if use_kernels(heads):
        from zflux.kernels.layout import heads_to_rows_

        heads_to_rows_(heads if heads.stride(-1) == 1 else heads.contiguous(), out)
    else:
        out.copy_(rearrange(heads, "b h s d -> b s (h d)"))
    return out


def fp8_operands(q: Fp8Tensor, k: Fp8Tensor, v: Tensor | Fp8Values) -> tuple[Tensor, ...]:
    """q, k, v as the fp8 kernel takes them: q and its scales per token (B, H, S), k and its one scale (1,), v transposed
    and its scales per channel (B, H, D); v as attention_inputs quantized it, or, kept plain (its plain_v), quantized
    here."""
    if not isinstance(v, Fp8Values):
        from zflux.kernels.quantize import quantize_heads

        v = Fp8Values(*quantize_heads(v, per="channel", transpose=True), v.dtype)
    return q.data, q.scale[..., 0], k.data, k.scale.reshape(1), v.data, v.scale


def attend(q: Tensor | Fp8Tensor, k: Tensor | Fp8Tensor, v: Tensor | Fp8Values, key_lens: Tensor | None) -> Tensor:
    """attention() on one device, (B, H, S, D) -> (B, H, S, D), by the backend in force; q, k, v quantized by
    attention_inputs go to the fp8 kernel."""
    if isinstance(q, Fp8Tensor):
        from zflux.kernels.attention import flash_attention_fp8_bshd

        out = flash_attention_fp8_bshd(*fp8_operands(q, k, v), key_lens, v.dtype)
        return rearrange(out, "b s h d -> b h s d")
    if use_fp8_attention(q, k):
        from zflux.kernels.attention import flash_attention_fp8

        return flash_attention_fp8(q, k, v, key_lens)
    if use_flash_kernel(q, masked=key_lens is not None) and k.shape == q.shape:
        from zflux.kernels.attention import flash_attention

        return flash_attention(q, k, v, key_lens)
    if current_backend() == "reference":
        return attention_math.reference_attention(q, k, v, key_lens)
    mask = None if key_lens is None else attention_math.key_padding_mask(key_lens, k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def wide_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unpadded attention on (B, H, S, D) q, k, v -> (B, H, S, D) for heads of any width (the autoencoders' one head of
    C channels): the Triton kernel for wide heads (kernels/wide_attention.py) where it runs, else SDPA.

    The kernel runs under `triton` for every head dim it takes, and under `auto` on a GPU for head dims past 256 (the
    autoencoders' 512), which SDPA's flash and cuDNN kernels do not take: SDPA runs its memory-efficient kernel there,
    4.6 ms at 1024x1024 on the H100 where the FLOPs take about 1 ms. Every other case runs SDPA, under `reference`
    too: the score matrix of a 1024x1024 image's latent is 1 GiB in fp32, too large for the explicit math.
    """
    backend = current_backend()
    if backend in ("auto", "triton") and use_kernels(q):
        from zflux.kernels.wide_attention import supports, wide_attention as fused

        if supports(q, k, v) and (backend == "triton" or q.shape[-1] > 256):
            return fused(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class RMSNorm(nn.Module):
    """RMSNorm with a learned per-channel `weight`, through `rms_norm` above."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)
