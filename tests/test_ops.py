"""common/ops.py: which implementation each op runs under each backend, and where the backend comes from.

The kernel tests (test_kernels_*.py) check that every backend computes the same numbers; these check
that each backend runs what it claims, which equal numbers cannot show. Every implementation ops can
pick is replaced by a spy that records its name and returns the plain math's result, so nothing
here runs Triton, on any machine.
"""

import pytest
import torch
import torch.nn.functional as F

from zflux.common import attention as attention_math
from zflux.common import norms, ops, rope
from zflux.zimg.model import ZImageConfig, ZImageTransformer

pytest.importorskip("triton", reason="the kernel modules need triton (Linux)")
from zflux.kernels import attention as flash, modulate, rmsnorm  # noqa: E402

# (module, function) ops may call -> the name it is recorded under
FUSED = ["gated_residual", "gated_rms_residual_norm_scale", "gated_residual_layer_norm_modulate"]
MATH = {(norms, "rms_norm"): "rms_norm", (norms, "layer_norm_modulate"): "layer_norm_modulate",
        (norms, "rms_norm_scale"): "rms_norm_scale", (norms, "gated_rms_residual"): "gated_rms_residual",
        **{(norms, name): name for name in FUSED},
        (rope, "qk_norm_rope"): "qk_norm_rope", (F, "scaled_dot_product_attention"): "sdpa",
        (attention_math, "reference_attention"): "reference attention"}
KERNELS = {(rmsnorm, "rms_norm"): norms.rms_norm, (modulate, "layer_norm_modulate"): norms.layer_norm_modulate,
           (modulate, "rms_norm_scale"): norms.rms_norm_scale, (modulate, "gated_rms_residual"): norms.gated_rms_residual,
           (rmsnorm, "qk_norm_rope"): rope.qk_norm_rope, (flash, "flash_attention"): attention_math.reference_attention,
           **{(modulate, name): getattr(norms, name) for name in FUSED}}
MATH_OPS = ["rms_norm", "layer_norm_modulate", "rms_norm_scale", "gated_rms_residual", *FUSED, "qk_norm_rope"]
EXPECTED = {  # on CPU tensors, with Triton's interpreter on (as in the CPU suite)
    "auto": MATH_OPS + ["sdpa", "sdpa"],
    "sdpa": MATH_OPS + ["sdpa", "sdpa"],
    "triton": [f"triton {op}" for op in MATH_OPS] + ["triton flash_attention"] * 2,
    "reference": MATH_OPS + ["reference attention"] * 2,
}


@pytest.fixture
def calls(monkeypatch):
    """The names of the implementations ops called, in order (not those they call in turn)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("ZFLUX_BACKEND", raising=False)
    called, depth = [], [0]

    def spy(name, function):
        def record(*args, **kwargs):  # the outermost call only: the math functions call each other
            if not depth[0]:
                called.append(name)
            depth[0] += 1
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
        return record

    for (module, function), name in MATH.items():
        monkeypatch.setattr(module, function, spy(name, getattr(module, function)))
    for (module, function), math in KERNELS.items():  # the kernels' stand-ins compute with the math ops' originals
        monkeypatch.setattr(module, function, spy(f"triton {function}", math))
    return called


def run_every_op() -> None:
    """Each op of ops.py once on small CPU tensors; attention with and without padded keys."""
    g = torch.Generator().manual_seed(0)
    x, w, s = torch.randn(2, 5, 16, generator=g), torch.rand(16, generator=g), torch.randn(2, 1, 16, generator=g)
    q, k, v = (torch.randn(2, 2, 5, 16, generator=g) for _ in range(3))  # (B, H, S, D)
    cos, sin = torch.rand(2, 5, 8, generator=g), torch.rand(2, 5, 8, generator=g)  # (B, S, D/2)
    ops.rms_norm(x, w, 1e-6)
    ops.layer_norm_modulate(x, s, s, 1e-6)
    ops.rms_norm_scale(x, w, s, 1e-6)
    ops.gated_rms_residual(x, x, w, s, 1e-6)
    ops.gated_residual(x, x, s)
    ops.gated_rms_residual_norm_scale(x, x, w, s, w, s, 1e-6)
    ops.gated_residual_layer_norm_modulate(x, x, s, s, s, 1e-6)
    ops.attention_inputs([ops.Heads(q, k, v, w, w)], 1e-6, cos, sin)
    ops.attention(q, k, v)
    ops.attention(q, k, v, key_lens=torch.tensor([5, 3]))


@pytest.mark.parametrize("backend", ops.BACKENDS)
def test_each_backend_runs_its_implementations(calls, backend):
    with ops.use_backend(backend):
        run_every_op()
    assert calls == EXPECTED[backend]


def test_triton_on_cpu_tensors_needs_the_interpreter(calls, monkeypatch):
    """Without TRITON_INTERPRET=1 the kernels cannot run on CPU tensors: backend triton runs the PyTorch math there."""
    monkeypatch.delenv("TRITON_INTERPRET")
    with ops.use_backend("triton"):
        run_every_op()
    assert calls == EXPECTED["sdpa"]


def test_the_backend_comes_from_scope_then_environment_then_auto(monkeypatch):
    monkeypatch.delenv("ZFLUX_BACKEND", raising=False)
    assert ops.current_backend() == "auto"
    monkeypatch.setenv("ZFLUX_BACKEND", "reference")
    assert ops.current_backend() == "reference"
    with ops.use_backend("sdpa"):
        assert ops.current_backend() == "sdpa"
        with ops.use_backend(None):  # a model without a backend of its own leaves the choice as it is
            assert ops.current_backend() == "sdpa"
        with ops.use_backend("triton"):
            assert ops.current_backend() == "triton"
        assert ops.current_backend() == "sdpa"
    assert ops.current_backend() == "reference"
    monkeypatch.setenv("ZFLUX_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="unknown backend 'cudnn'; choose one of auto, sdpa, triton, reference"):
        ops.current_backend()
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.use_backend("fast").__enter__()


@torch.no_grad()
def test_a_models_backend_beats_the_environment(calls, monkeypatch):
    """model.backend scopes its forward; without one, ZFLUX_BACKEND decides."""
    cfg = ZImageConfig(dim=32, n_heads=2, n_kv_heads=2, n_layers=1, n_refiner_layers=1, cap_feat_dim=8, axes_dims=(4, 6, 6),
                       axes_lens=(64, 16, 16))
    model = ZImageTransformer(cfg).eval()
    inputs = (torch.zeros(1, 16, 4, 4), torch.zeros(1), torch.zeros(1, 3, 8))
    monkeypatch.setenv("ZFLUX_BACKEND", "reference")
    model(*inputs)
    assert "reference attention" in calls and "sdpa" not in calls
    calls.clear()
    model.backend = "sdpa"
    model(*inputs)
    assert "sdpa" in calls and "reference attention" not in calls


def test_per_token_vectors_run_the_math(calls):
    """Z-Image Omni's per-token (B, S, C) gates and scales: under triton the fused residual ops run the PyTorch math,
    also where only one of the vectors is per token."""
    g = torch.Generator().manual_seed(0)
    x, w, s = torch.randn(2, 5, 16, generator=g), torch.rand(16, generator=g), torch.randn(2, 1, 16, generator=g)
    per_token = torch.randn(2, 5, 16, generator=g)
    with ops.use_backend("triton"):
        ops.gated_residual(x, x, per_token)
        ops.gated_rms_residual_norm_scale(x, x, w, s, w, per_token, 1e-6)
        ops.gated_rms_residual_norm_scale(x, x, w, per_token, w, s, 1e-6)
        ops.gated_residual_layer_norm_modulate(x, x, s, per_token, s, 1e-6)
        ops.gated_residual_layer_norm_modulate(x, x, s, s, s, 1e-6)
    assert calls == ["gated_residual"] + ["gated_rms_residual_norm_scale"] * 2 + ["gated_residual_layer_norm_modulate",
                                                                                "triton gated_residual_layer_norm_modulate"]
