"""Run-time choice of the compute backend for attention and the fused norm ops.

`sdpa` is plain PyTorch (torch SDPA for attention), `triton` the kernels in `kernels/`, `reference`
the explicit fp32 math the kernels are tested against. The choice comes from, in order: an active
`use_backend(...)` scope (models open one around their forward with their own `backend`
attribute), the `ZFLUX_BACKEND` environment variable, then `sdpa`.
"""

import os
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

BACKENDS = ("sdpa", "triton", "reference")
_scoped: ContextVar[str | None] = ContextVar("zflux_backend", default=None)


def check_backend(name: str) -> str:
    """Return `name` if it is a known backend, else raise naming the choices."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def current_backend() -> str:
    """The backend in force here: scope, then $ZFLUX_BACKEND, then 'sdpa'."""
    return check_backend(_scoped.get() or os.environ.get("ZFLUX_BACKEND") or "sdpa")


@contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run the enclosed code with backend `name` (None leaves the current choice)."""
    token = _scoped.set(check_backend(name) if name else _scoped.get())
    try:
        yield
    finally:
        _scoped.reset(token)
