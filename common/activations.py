"""The MLPs' activations in plain PyTorch: SwiGLU's gated one (Z-Image, FLUX.2) and GELU-tanh (FLUX.1).

The single definition of their math; `zflux.kernels.activations` is tested against it and `ops.py`
chooses between the two at run time.
"""

import torch.nn.functional as F
from torch import Tensor


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, the silu rounded to the inputs' dtype before the product (as two PyTorch ops round)."""
    return F.silu(gate) * up


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), computed in fp32, rounded once."""
    return F.gelu(x, approximate="tanh")
