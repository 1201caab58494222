import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where the bare folder names (kernels/, flux/,
# common/) would shadow the installed packages of those names: Hugging Face's `kernels` above all, which
# transformers imports. zflux itself is installed as `zflux.*`, so the root is not needed: drop it
# before anything imports those names.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # The Triton kernels run on the CPU through Triton's interpreter; triton.jit reads this at import,
    # and diffusers imports triton during collection, so it must be set before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly on machines without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

