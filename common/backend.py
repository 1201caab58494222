"""Run-time choice of the compute backend for attention and the fused norm ops.

`sdpa` is plain PyTorch (torch SDPA for attention), `triton` the kernels in `kernels/`, `reference`
the explicit fp32 math the kernels are tested against. The choice comes from, in order: an active
`use_backend(...)` scope (models open one around their forward with their own `backend`
attribute), the `ZFLUX_BACKEND` environment variable, then `sdpa`. The Triton kernels run on CUDA
tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, the CPU tests); anywhere
else `triton` falls back to the PyTorch path.
"""

import os
from contextlib import contextmanager
from typing import Iterator

from torch import Tensor

BACKENDS = ("sdpa", "triton", "reference")
# A plain module global rather than a ContextVar: torch.compile traces global reads (and guards on
# them), but not ContextVar.get.
_scoped: str | None = None


def check_backend(name: str) -> str:
    """Return `name` if it is a known backend, else raise naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    """The backend in force here: scope, then $ZFLUX_BACKEND, then 'sdpa'."""
    return check_backend(_scoped or os.environ.get("ZFLUX_BACKEND") or "sdpa")


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
    """Whether an op on `x` runs the Triton kernel: backend `triton` and a device Triton can run it on."""
    return current_backend() == "triton" and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
