"""Run-time choice of the compute backend for attention and the fused norm ops.

- `auto` (the default): the fastest measured mix on a CUDA GPU, the Triton norm/RoPE/modulation
  kernels with torch SDPA (cuDNN) attention, or the Triton flash kernel where keys are padded;
  plain PyTorch elsewhere.
- `sdpa`: plain PyTorch throughout (torch SDPA for attention).
- `triton`: every op in `kernels/`, the flash-attention kernel included.
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
from typing import Iterator

import torch
from torch import Tensor

BACKENDS = ("auto", "sdpa", "triton", "reference")
HAS_TRITON = find_spec("triton") is not None
# A plain module global rather than a ContextVar: torch.compile traces global reads (and guards on
# them), but not ContextVar.get.
_scoped: str | None = None


def check_backend(name: str) -> str:
    """Return `name` if it is a known backend, else raise naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    """The backend in force here: scope, then $ZFLUX_BACKEND, then 'auto'."""
    return check_backend(_scoped or os.environ.get("ZFLUX_BACKEND") or "auto")


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the enclosed code with backend `name` (None leaves the current choice)."""
    global _scoped
    previous = _scoped
    _scoped = check_backend(name) if name else previous
    try:
        yield
    finally:
        _scoped = previous


def use_kernels(x: Tensor) -> bool:
    """Whether a norm/RoPE/modulation op on `x` runs its Triton kernel under the current backend."""
    backend = current_backend()
    if backend == "auto":
        return x.is_cuda and HAS_TRITON
    return backend == "triton" and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


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
