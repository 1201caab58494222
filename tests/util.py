"""Helpers shared by the tests."""

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Fill every parameter with N(0, std) (norm weights around 1) so that no path is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm = p.ndim == 1 and any(s in name for s in ("norm", "scale"))
            p.copy_(noise + 1 if is_norm else noise)
    return module
