"""Where the kernel tests run: natively on a CUDA GPU, else on the CPU through Triton's interpreter.

`triton.jit` reads TRITON_INTERPRET when a function is decorated, and Triton's own library (tl.zeros,
tl.sum, ...) is decorated when triton is first imported, which other test modules may already have
done (diffusers imports it). So the variable must be set before that import: tests/conftest.py is the
place; a kernel test module that finds triton already imported without it skips, naming the cause.
"""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter rounds fp32 -> bf16 by truncation and its bf16 tl.dot is wrong: bf16 on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def require_triton() -> None:
    """Call before importing kernels/: on the CPU, switch the interpreter on, or skip if triton came too early."""
    if DEVICE == "cuda":
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; set it in tests/conftest.py (or the "
                    "environment) before anything imports triton", allow_module_level=True)
