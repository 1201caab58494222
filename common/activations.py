"""The gated activation of the SwiGLU MLPs (Z-Image, FLUX.2): the plain PyTorch definition.

The single definition of its math; `zflux.kernels.activations` is tested against it and `ops.py`
chooses between the two at run time.
"""

import torch.nn.functional as F
from torch import Tensor


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, the silu rounded to the inputs' dtype before the product (as two PyTorch ops round)."""
    return F.silu(gate) * up
