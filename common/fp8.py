"""fp8 linears (`precision="fp8"`): e4m3 weights and activations, rowwise-scaled GEMMs, and fp8 checkpoints.

`quantize_model(model)` replaces the transformer blocks' linears by `FP8Linear`s, quantizing their
weights (bf16 from the checkpoint) to e4m3 with one fp32 scale per output channel (`common.quant`).
An FP8Linear takes its input either already quantized, an `Fp8Tensor` of e4m3 values with one scale
per token, made by the Triton kernel that precedes it (`ops.layer_norm_modulate`, `ops.rms_norm_scale`
with fp8=True, and the gated residuals fused with the MLP's norm, `ops.gated_residual_layer_norm_modulate` /
`ops.gated_rms_residual_norm_scale`: the per-token amax is one more row reduction in a kernel that already reduces
each row for its norm; the MLP activations, `ops.silu_mul` / `ops.gelu_tanh` with fp8=True, and the FLUX single
blocks' [attention output | activation], `ops.join_activation`; the fp8 attention kernel's output for the output
projections, `ops.attention` with fp8=True), or a bf16 tensor it quantizes itself (`ops.quantize_fp8`, one small fused
kernel: the attention outputs where attention runs in bf16). It then runs `torch._scaled_mm` with the
row scales of both operands, bf16 output and the bias fused, on GPUs with fp8 tensor cores (compute
capability 8.9 and up); elsewhere (the CPU, older GPUs, the `reference` backend) the same numbers go
through `quant.reference_linear`: dequantize, matmul in fp32.

The GEMMs accumulate fast (`use_fast_accum`): the fp8 tensor cores' own accumulator, which keeps fewer bits of the
running sum than fp32 (about 22), instead of cuBLAS's periodic promotion to fp32 registers. On the H100 that is
7-19% faster per GEMM at most of the models' shapes, and whole NFEs 7-12% (Z-Image 67.1-67.6 -> 62.2-63.3 ms, FLUX.1-dev
99.2-99.4 -> 87.5-90.8, the two alternating in one run), for 1e-3 to 3e-3
relative error per GEMM against the exact product of the same e4m3 values (exact accumulation: 1.3e-4), far under
e4m3's rounding of the operands themselves (2-4e-2): whole runs land as far from bf16 either way (bench/RESULTS.md).
$ZFLUX_FP8_EXACT_ACCUMULATION=1 takes cuBLAS's exact accumulation instead.

Which linears stay in the model's dtype, and why:
- Embedders (x/cap/img/txt/time/vector/guidance embedders) and final layers: they run once per step
  (not once per block), most on narrow inputs or outputs (64 latent channels, 256 frequencies) where
  a GEMM is not compute-bound, and their error is not averaged over blocks: the first feeds every
  block, the last is the prediction itself.
- Modulation (adaLN) linears: they act on one row per sample (M = batch size), a matrix-vector product
  bound by reading the weight, not by the tensor cores; and the shift, scale and gate they make
  multiply every token of a stream, so an error there is an error everywhere.
- Linears outside the transformer blocks (ControlNet, Redux, Omni's SigLIP embedder): not the cost.
So the quantized ones are the blocks' attention (qkv, out/proj) and MLP linears, and FLUX's fused
single-block linear1/linear2: the GEMMs that take nearly all of an NFE's FLOPs.

fp8 checkpoints (ComfyUI's "scaled fp8" files, and the fp8 files published in ComfyUI's layout) hold
e4m3 weights with one fp32 scale each, named `<layer>.scale_weight` (ComfyUI's first layout, marked by
a root `scaled_fp8` tensor) or `<layer>.weight_scale` (its newer one, with `<layer>.comfy_quant` JSON
configs); ComfyUI computes with weight * scale. They may also carry a static activation scale
(`scale_input` / `input_scale`), which zflux does not need: it scales activations per token at run
time, as finely as the kernel allows. `load_tensor` turns such a file's tensors into plain
weights (weight * scale, in the load dtype) as it is read, so every precision loads them; under fp8
they are quantized again, per output channel (a per-tensor-scaled weight re-scaled per row: each
channel gets a finer grid or the same one).
"""

import os

import torch
from torch import Tensor, nn

from zflux.common import ops
from zflux.common.quant import Fp8Tensor, check_granularity, quantize, reference_linear

PRECISIONS = ("fp8",)
WEIGHT_SCALES = (".scale_weight", ".weight_scale")
# Per-layer tensors fp8 files carry beside a weight that the dequantized weight no longer needs.
QUANT_KEYS = WEIGHT_SCALES + (".scale_input", ".input_scale", ".comfy_quant")
FP8_MARKER = "scaled_fp8"  # ComfyUI's root tensor marking a scaled-fp8 file (under its key prefix, if any)
MODULATION = {"adaLN_modulation", "img_mod", "txt_mod", "modulation"}  # the modules holding the blocks' adaLN linears


def check_precision(precision: str | None) -> str | None:
    """Return `precision` (None: everything in the load dtype) if known, else raise naming the choices."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} (or none)")
    return precision


def scaled_mm_runs(x: Tensor, dtype: torch.dtype) -> bool:
    """Whether `torch._scaled_mm` can multiply fp8 `x` into `dtype` here: an fp8-capable GPU, not the reference backend,
    and bf16 out (the only output its rowwise-scaled kernels write in every torch version zflux supports)."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9) and ops.current_backend() != "reference"
            and dtype == torch.bfloat16)


def fast_accumulation() -> bool:
    """Whether fp8 GEMMs accumulate in the tensor cores (see the module docstring): unless $ZFLUX_FP8_EXACT_ACCUMULATION=1."""
    return os.environ.get("ZFLUX_FP8_EXACT_ACCUMULATION") != "1"


class FP8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 and fp32 scales per output channel (or one), x quantized per token (or per tensor)."""

    def __init__(self, weight: Fp8Tensor, bias: Tensor | None, dtype: torch.dtype, granularity: str):
        super().__init__()
        self.register_buffer("weight", weight.data)  # (N, K) e4m3
        self.register_buffer("weight_scale", weight.scale)  # (N, 1) or ()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (N,) in dtype
        self.dtype, self.granularity = dtype, granularity

    @classmethod
    def from_linear(cls, linear: nn.Linear, granularity: str = "per-row") -> "FP8Linear":
        """The linear's weight quantized with one scale per output channel (`per-row`) or one in all (`per-tensor`)."""
        return cls(quantize(linear.weight, granularity), linear.bias, linear.weight.dtype, granularity)

    def forward(self, x: Tensor | Fp8Tensor) -> Tensor:
        if not isinstance(x, Fp8Tensor):
            x = ops.quantize_fp8(x, self.granularity)
        lead, N = x.data.shape[:-1], self.weight.shape[0]
        rows = x.data.reshape(-1, x.data.shape[-1])  # (M, K)
        scale = x.scale.reshape(-1, 1) if x.scale.ndim else x.scale  # (M, 1) or ()
        if scaled_mm_runs(rows, self.dtype):
            weight_scale = self.weight_scale.reshape(1, -1) if self.weight_scale.ndim else self.weight_scale  # (1, N) or ()
            out = torch._scaled_mm(rows, self.weight.T, scale_a=scale, scale_b=weight_scale, bias=self.bias,
                                   out_dtype=self.dtype, use_fast_accum=fast_accumulation())  # (M, N)
        else:
            out = reference_linear(Fp8Tensor(rows, scale), Fp8Tensor(self.weight, self.weight_scale), self.bias, self.dtype)
        return out.reshape(*lead, N)  # (..., N)


def quantized_names(model: nn.Module) -> list[str]:
    """The linears `quantize_model` turns to fp8: those of the transformer blocks (a ModuleList's), except modulation."""
    blocks = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(name.startswith(b + ".") for b in blocks) and not MODULATION & set(name.split("."))]


def quantize_model(model: nn.Module, granularity: str = "per-row") -> nn.Module:
    """Replace the blocks' linears (see `quantized_names`) by FP8Linears, one at a time (the bf16 weight freed as it goes)."""
    check_granularity(granularity)
    for name in quantized_names(model):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, FP8Linear.from_linear(getattr(owner, child), granularity))
    return model


def apply_precision(model: nn.Module, precision: str | None) -> nn.Module:
    """The loaded `model` as `precision` asks: for "fp8", its blocks' linears in fp8 (per-row scales), and its attention
    through the fp8 flash kernel where that runs (ops.use_fp8_attention; $ZFLUX_FP8_ATTENTION=0 keeps it in bf16) for
    the families whose whole runs it leaves within the fp8 GEMMs' error (the model class's FP8_ATTENTION; set
    `model.fp8_attention` to choose otherwise)."""
    if check_precision(precision) != "fp8":
        return model
    model.fp8_attention = type(model).FP8_ATTENTION
    return quantize_model(model)


def wants_fp8(linear: nn.Module) -> bool:
    """Whether the norm before `linear` should hand it e4m3 rows with per-token scales (what the fused kernels make)."""
    return isinstance(linear, FP8Linear) and linear.granularity == "per-row"


def is_quant_key(key: str) -> bool:
    """Whether `key` is one of an fp8 file's scale/config tensors rather than a model weight."""
    return key.endswith(QUANT_KEYS) or key.rpartition(".")[2] == FP8_MARKER


def weight_scale_key(key: str, keys: set[str]) -> str | None:
    """The key of the scale `key`'s weight is stored with in an fp8 file holding `keys`, if it has one."""
    layer = key.removesuffix(".weight")
    return next((layer + s for s in WEIGHT_SCALES if layer + s in keys), None)


def load_tensor(tensor: Tensor, scale: Tensor | None, dtype: torch.dtype | None) -> Tensor:
    """A checkpoint tensor as the model takes it: an fp8 one times its scale (if any) in fp32, then in `dtype` (None:
    bf16); another floating-point one cast to `dtype` (None: as it is)."""
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.float() if scale is None else tensor.float() * _broadcast(scale.float(), tensor)
        return tensor.to(dtype or torch.bfloat16)
    return tensor if dtype is None or not tensor.is_floating_point() else tensor.to(dtype)


def _broadcast(scale: Tensor, weight: Tensor) -> Tensor:
    """A weight scale, one in all or one per output channel, shaped to multiply `weight`."""
    return scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, *[1] * (weight.ndim - 1))
