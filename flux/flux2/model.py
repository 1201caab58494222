"""FLUX.2: the rectified-flow MM-DiT of FLUX.2 [dev] (32B) and [klein] (4B, 9B).

The scheme is FLUX.1's: text tokens (stacked hidden states of an LLM) and image tokens (2x2-patchified
32-channel latents, 128 channels each) pass through `double_blocks`, which keep separate weights
per stream but attend jointly over `[text; image]`, then through `single_blocks` over the
concatenated sequence, whose one input projection feeds attention and MLP in parallel. What
FLUX.2 changes:

- no biases anywhere; LayerNorms without affine parameters;
- shared modulation: three Linears for the whole network (`double_stream_modulation_img/_txt`,
  `single_stream_modulation`) turn SiLU(vec) into the (shift, scale, gate) every block uses;
  `vec` embeds only the timestep (+ the guidance scale for [dev]), there is no pooled text vector;
- SwiGLU MLPs of width 3 x hidden (`silu(first half) * second half`);
- RoPE over 4 position axes (t, h, w, l), 32 channels each, theta 2000: text token i sits at
  (0, 0, 0, i), target latent (r, c) at (0, r, c, 0), reference image j at (10 + 10 j, r, c, 0).

Reference images are extra image tokens after the target's; they go through the same blocks with
the same modulation, and the caller keeps the first rows of the output. [klein] 9B KV instead runs
its references once (`extract_ref_kv`): modulated as at t = 0, attending only to themselves, their
keys and values (after RoPE) kept per block in a `RefKV`; later steps (`forward(..., ref_kv=)`)
add those keys and values to every attention and carry no reference tokens at all.

The parameter names are those of Black Forest Labs' single-file checkpoints (`img_in`,
`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...): `flux2-dev.safetensors` and the
klein files load with no renaming.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from zflux.common import ops
from zflux.common.parallel import shard_joint
from zflux.common.embeddings import timestep_embedding
from zflux.common.fp8 import wants_fp8
from zflux.common.norms import ModulationOut
from zflux.common.quant import Fp8Tensor
from zflux.common.rope import check_axes_dims, rope_tables
from zflux.common.step_cache import StepCache, run_blocks
from zflux.common.weights import config_from_dict

TIME_FACTOR = 1000.0  # timesteps in [0, 1] and the raw guidance scale are embedded at 1000x
REF_TIME = 0.0  # the time KV-extract mode modulates reference tokens with (clean latents)

Rope = tuple[Tensor, Tensor]  # cos, sin tables (B, S, D/2)
KV = tuple[Tensor, Tensor]  # keys, values (B, H, S, D) after QK-norm and RoPE


@dataclass(frozen=True)
class Flux2Config:
    """Transformer shape; field names and defaults ([dev]) as in diffusers' Flux2Transformer2DModel config.json."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None  # None: same as in_channels
    num_layers: int = 8
    num_single_layers: int = 48
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.patch_size != 1:
            raise ValueError(f"FLUX.2 patchifies outside the transformer: patch_size must be 1, got {self.patch_size}")
        check_axes_dims(self.axes_dims_rope, self.attention_head_dim)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_diffusers(cls, config: dict) -> "Flux2Config":
        """Build from a diffusers transformer config.json dict (unknown bookkeeping keys are ignored)."""
        return config_from_dict(cls, config)


# [dev] reads Mistral Small 3.x (3 x 5120 text features) and embeds the guidance scale; klein reads
# Qwen3-4B (3 x 2560) or Qwen3-8B (3 x 4096) and has no guidance input. Base and distilled klein,
# and klein 9B KV, share their size's shapes exactly.
PRESETS = {
    "flux2-dev": Flux2Config(),
    "flux2-klein-4b": Flux2Config(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                                  guidance_embeds=False),
    "flux2-klein-9b": Flux2Config(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                                  guidance_embeds=False),
}


@dataclass
class RefKV:
    """The reference tokens' keys and values of every block, from `Flux2.extract_ref_kv`, for later steps."""

    double: list[KV] = field(default_factory=list)
    single: list[KV] = field(default_factory=list)


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear (no biases), for the timestep and guidance features."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim, bias=False)
        self.out_layer = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm weight under BFL's name `scale`; QKNorm hands it to the fused norm + RoPE op."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    """The weights of the RMSNorm of q and k over the head dim, before RoPE (ops.attention_inputs does both)."""

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def heads(self, qkv: Tensor, num_heads: int) -> ops.Heads:
        """A stream's fused projection (B, S, 3 * dim) as q, k, v (B, H, S, D) views, with these norm weights."""
        q, k, v = rearrange(qkv, "b s (k h d) -> k b h s d", k=3, h=num_heads)  # (B, H, S, D) each
        return ops.Heads(q, k, v, self.query_norm.scale, self.key_norm.scale)


class Modulation(nn.Module):
    """SiLU(vec) -> `sets` ModulationOuts: shared by every block of one kind (double: 2 per stream, single: 1)."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.lin = nn.Linear(dim, 3 * sets * dim, bias=False)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ...]:
        chunks = self.lin(F.silu(vec))[:, None].chunk(3 * self.sets, dim=-1)  # 3 * sets x (B, 1, dim)
        return tuple(ModulationOut(*chunks[i:i + 3]) for i in range(0, 3 * self.sets, 3))


class SwiGLU(nn.Module):
    """silu(gate) * up, the gate being the first half of the channels: (..., 2F) -> (..., F); fp8: quantized per token."""

    def forward(self, x: Tensor, fp8: bool = False) -> Tensor | Fp8Tensor:
        return ops.silu_mul(*x.chunk(2, dim=-1), fp8=fp8)


class MLP(nn.Sequential):
    """Linear -> SwiGLU -> Linear, keyed `.0` and `.2` as in the checkpoints. An fp8 second linear gets the activation
    as e4m3 rows from the activation's own kernel."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, x: Tensor | Fp8Tensor) -> Tensor:
        up, swiglu, down = self
        return down(swiglu(up(x), fp8=wants_fp8(down)))


def attend(q: Tensor | Fp8Tensor, k: Tensor | Fp8Tensor, v: Tensor | ops.Fp8Values, extra: KV | None, fp8: bool = False) -> Tensor | Fp8Tensor:
    """Attention of q over its own keys plus `extra` (cached reference) keys and values -> (B, S, H*D) (fp8: see
    ops.attention)."""
    if extra is not None:  # more keys than queries: a bf16 kernel's, so quantized q and k go back to v's dtype
        q, k = (ops.dequantize_heads(t, v.dtype) for t in (q, k))
        k, v = torch.cat([k, extra[0]], dim=2), torch.cat([v, extra[1]], dim=2)  # (B, H, S + R, D)
    return ops.attention(q, k, v, fp8=fp8)


class SelfAttention(nn.Module):
    """One stream's share of the joint attention: fused qkv and QK-norm; `proj` maps the stream's output back."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.norm = QKNorm(dim // num_heads, eps)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor | Fp8Tensor) -> ops.Heads:
        """x (B, S, dim), already modulated -> this stream's q, k, v (B, H, S, D), to be normed, rotated and joined by
        ops.attention_inputs."""
        return self.norm.heads(self.qkv(x), self.num_heads)


class RefTokens(NamedTuple):
    """KV-extract mode's reference stream entering one block: hidden states (B, R, dim), their modulation, RoPE."""

    x: Tensor
    mod: tuple[ModulationOut, ...]
    rope: Rope


class RefStep(NamedTuple):
    """The reference stream leaving one block in KV-extract mode: new hidden states and this block's K/V."""

    x: Tensor
    kv: KV


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one attention over [text; image]."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.img_attn, self.txt_attn = SelfAttention(dim, num_heads, eps), SelfAttention(dim, num_heads, eps)
        self.img_mlp, self.txt_mlp = MLP(dim, mlp_hidden), MLP(dim, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, img_mod: tuple[ModulationOut, ...], txt_mod: tuple[ModulationOut, ...],
                rope: Rope, ref_kv: KV | None = None, refs: RefTokens | None = None) -> tuple[Tensor, Tensor, RefStep | None]:
        """Image (B, S, dim) and text (B, L, dim) tokens through the block; `rope` covers [text; image].

        With `ref_kv` (cached mode) every query also sees those reference keys. With `refs` (extract
        mode) the reference tokens run as a third stream on the image weights with their own
        modulation; they see only each other, while text and image see them too.
        """
        L = txt.shape[1]
        # (B, H, L+S, D) each; v kept plain where it joins reference values
        q, k, v = self._joint_qkv(img, txt, img_mod[0], txt_mod[0], rope, keep_v=ref_kv is not None or refs is not None)
        step = None
        if refs is not None:
            ref_heads = self.img_attn(self._modulated(refs.x, refs.mod[0], self.img_attn.qkv))
            ref_q, ref_k, ref_v = ops.attention_inputs([ref_heads], self.eps, *refs.rope, plain_v=True)  # (B, H, R, D) each
            ref_kv = (ops.dequantize_heads(ref_k, ref_v.dtype), ref_v)  # the cache holds plain keys
            ref_out = self._residuals(refs.x, ops.attention(ref_q, ref_k, ref_v), refs.mod, self.img_attn, self.img_mlp)
            step = RefStep(ref_out, ref_kv)
        out = attend(q, k, v, ref_kv, fp8=wants_fp8(self.img_attn.proj))  # (B, L+S, dim)
        txt_out, img_out = ops.split_tokens(out, L)
        img = self._residuals(img, img_out, img_mod, self.img_attn, self.img_mlp)
        txt = self._residuals(txt, txt_out, txt_mod, self.txt_attn, self.txt_mlp)
        return img, txt, step

    def _joint_qkv(self, img: Tensor, txt: Tensor, img_mod: ModulationOut, txt_mod: ModulationOut, rope: Rope,
                   keep_v: bool) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, L+S, D) over [text; image] (ops.attention_inputs; keep_v: its plain_v); each stream's own
        projections die on return."""
        txt_heads = self.txt_attn(self._modulated(txt, txt_mod, self.txt_attn.qkv))
        img_heads = self.img_attn(self._modulated(img, img_mod, self.img_attn.qkv))
        return ops.attention_inputs([txt_heads, img_heads], self.eps, *rope, plain_v=keep_v)

    def _modulated(self, x: Tensor, mod: ModulationOut, into: nn.Module) -> Tensor | Fp8Tensor:
        """The modulated norm of x, quantized to fp8 where the linear it goes `into` takes that."""
        return ops.layer_norm_modulate(x, mod.shift, mod.scale, self.eps, fp8=wants_fp8(into))

    def _residuals(self, x: Tensor, attn_out: Tensor | Fp8Tensor, mod: tuple[ModulationOut, ModulationOut], attn: SelfAttention,
                   ffn: nn.Module) -> Tensor:
        """Gated attention residual, then the gated, modulated MLP residual, for one stream."""
        attn_mod, mlp_mod = mod
        x, normed = ops.gated_residual_layer_norm_modulate(x, attn.proj(attn_out), attn_mod.gate, mlp_mod.shift, mlp_mod.scale,
                                                           self.eps, fp8=wants_fp8(ffn[0]))
        return ops.gated_residual(x, ffn(normed), mlp_mod.gate)


class SingleStreamBlock(nn.Module):
    """Attention and SwiGLU MLP in parallel from one input projection, over the concatenated sequence."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps, self.num_heads, self.mlp_hidden = eps, num_heads, mlp_hidden
        self.linear1 = nn.Linear(dim, 3 * dim + 2 * mlp_hidden, bias=False)
        self.linear2 = nn.Linear(dim + mlp_hidden, dim, bias=False)
        self.norm = QKNorm(dim // num_heads, eps)

    def forward(self, x: Tensor, mod: ModulationOut, rope: Rope, ref_kv: KV | None = None,
                refs: RefTokens | None = None) -> tuple[Tensor, RefStep | None]:
        """x (B, S, dim) through the block; `ref_kv` and `refs` as in DoubleStreamBlock.forward."""
        step = None
        if refs is not None:
            (ref_mod,) = refs.mod
            ref_q, ref_k, ref_v, ref_hidden = self._project(refs.x, ref_mod, refs.rope)
            ref_kv = (ops.dequantize_heads(ref_k, ref_v.dtype), ref_v)  # the cache holds plain keys
            step = RefStep(self._output(refs.x, self._joined(ops.attention(ref_q, ref_k, ref_v), ref_hidden), ref_mod), ref_kv)
        return self._output(x, self._attention_and_mlp(x, mod, rope, ref_kv), mod), step

    def _attention_and_mlp(self, x: Tensor, mod: ModulationOut, rope: Rope, ref_kv: KV | None) -> Tensor | Fp8Tensor:
        """linear2's input (B, S, dim + mlp_hidden): both branches from the one input projection, side by side; the
        projection dies on return."""
        q, k, v, hidden = self._project(x, mod, rope, keep_v=ref_kv is not None)
        return self._joined(attend(q, k, v, ref_kv), hidden)

    def _project(self, x: Tensor, mod: ModulationOut, rope: Rope, keep_v: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (B, H, S, D) for attention (ops.attention_inputs; keep_v: its plain_v, where v is cached or joins cached
        values), and the SwiGLU input (B, S, 2 * mlp_hidden), a view of the projection."""
        h = ops.layer_norm_modulate(x, mod.shift, mod.scale, self.eps, fp8=wants_fp8(self.linear1))
        qkv, hidden = self.linear1(h).split([3 * x.shape[-1], 2 * self.mlp_hidden], dim=-1)
        return *ops.attention_inputs([self.norm.heads(qkv, self.num_heads)], self.eps, *rope, plain_v=keep_v), hidden

    def _joined(self, attn_out: Tensor, hidden: Tensor) -> Tensor | Fp8Tensor:
        """[attention output | SwiGLU(hidden)] (B, S, dim + mlp_hidden) (ops.join_activation: e4m3 rows from one kernel
        for an fp8 linear2)."""
        return ops.join_activation(attn_out, *hidden.chunk(2, dim=-1), fp8=wants_fp8(self.linear2))

    def _output(self, x: Tensor, joined: Tensor | Fp8Tensor, mod: ModulationOut) -> Tensor:
        return ops.gated_residual(x, self.linear2(joined), mod.gate)


class LastLayer(nn.Module):
    """adaLN (shift, scale; no gate) and the projection back to latent channels."""

    def __init__(self, dim: int, out_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(dim, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim, bias=False))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)  # (B, 1, dim) each
        return self.linear(ops.layer_norm_modulate(x, shift, scale, self.eps))


class Flux2(nn.Module):
    """The FLUX.2 transformer: packed latent tokens + text features -> velocity, (B, S, 128)."""

    FP8_ATTENTION = True  # under precision fp8 (common/fp8.py): klein 4B's whole runs as far from bf16 with it as without

    def __init__(self, cfg: Flux2Config, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.backend = backend  # None: $ZFLUX_BACKEND or auto (zflux.common.ops)
        self.fp8_attention = False  # common.fp8.apply_precision sets it (to FP8_ATTENTION) for precision fp8
        dim, heads, hidden, eps = cfg.hidden_size, cfg.num_attention_heads, cfg.mlp_hidden, cfg.eps
        self.img_in = nn.Linear(cfg.in_channels, dim, bias=False)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim, bias=False)
        self.time_in = MLPEmbedder(cfg.timestep_guidance_channels, dim)
        if cfg.guidance_embeds:
            self.guidance_in = MLPEmbedder(cfg.timestep_guidance_channels, dim)
        self.double_stream_modulation_img = Modulation(dim, sets=2)
        self.double_stream_modulation_txt = Modulation(dim, sets=2)
        self.single_stream_modulation = Modulation(dim, sets=1)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads, hidden, eps) for _ in range(cfg.num_layers))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, heads, hidden, eps) for _ in range(cfg.num_single_layers))
        self.final_layer = LastLayer(dim, cfg.out_channels, eps)
        self.step_cache: StepCache | None = None  # on for a run: common.step_cache.step_cache

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                guidance: Tensor | None = None, ref_kv: RefKV | None = None) -> Tensor:
        """Velocity (B, S, out_channels), one row per image token.

        img (B, S, in_channels): the target's packed latent tokens, then any reference tokens (the
        caller keeps the target's rows); img_ids (B, S, 4) and txt_ids (B, L, 4) integer positions;
        txt (B, L, joint_attention_dim); timesteps (B,) in [0, 1], 1 = pure noise; guidance (B,)
        the raw scale, for [dev] only. `ref_kv` (klein KV, steps after the first) adds the cached
        reference keys and values to every attention; img then holds no reference tokens.
        """
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, guidance)
        if ref_kv is not None and (len(ref_kv.double), len(ref_kv.single)) != (self.cfg.num_layers, self.cfg.num_single_layers):
            raise ValueError(f"ref_kv holds {len(ref_kv.double)} + {len(ref_kv.single)} blocks' K/V, this model has "
                             f"{self.cfg.num_layers} + {self.cfg.num_single_layers}: make it with this model's extract_ref_kv")
        with ops.use_backend(self.backend, fp8_attention=self.fp8_attention):
            return self._forward(img, img_ids, txt, txt_ids, timesteps, guidance, ref_kv=ref_kv)[0]

    def extract_ref_kv(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, ref: Tensor,
                       ref_ids: Tensor, guidance: Tensor | None = None) -> tuple[Tensor, RefKV]:
        """KV-extract step (klein 9B KV's first step): velocity (B, S, out_channels) of the target tokens, and the K/V
        of the reference tokens `ref` (B, R, in_channels) at `ref_ids` (B, R, 4) in every block.

        The references are modulated as at t = 0 and attend only to each other; text and image tokens
        attend to everything. Pass the returned RefKV to later steps' forward(..., ref_kv=).
        """
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, guidance)
        self._check_inputs(ref, ref_ids, txt, txt_ids, timesteps, guidance)
        with ops.use_backend(self.backend, fp8_attention=self.fp8_attention):
            return self._forward(img, img_ids, txt, txt_ids, timesteps, guidance, refs=(ref, ref_ids))

    def _vec(self, timesteps: Tensor, guidance: Tensor | None) -> Tensor:
        """The conditioning vector (B, dim): embedded time (+ embedded guidance). Features in fp32 from the caller's values."""
        dtype, channels = self.dtype, self.cfg.timestep_guidance_channels
        vec = self.time_in(timestep_embedding(timesteps.float() * TIME_FACTOR, channels).to(dtype))  # (B, dim)
        if self.cfg.guidance_embeds:
            vec = vec + self.guidance_in(timestep_embedding(guidance.float() * TIME_FACTOR, channels).to(dtype))
        return vec

    def _forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, guidance: Tensor | None,
                 ref_kv: RefKV | None = None, refs: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, RefKV | None]:
        dtype, out_dtype, L = self.dtype, img.dtype, txt.shape[1]
        vec = self._vec(timesteps, guidance)
        img_mod, txt_mod = self.double_stream_modulation_img(vec), self.double_stream_modulation_txt(vec)
        (single_mod,) = self.single_stream_modulation(vec)

        img = self.img_in(img.to(dtype))  # (B, S, dim)
        txt = self.txt_in(txt.to(dtype))  # (B, L, dim)
        rope = rope_tables(torch.cat([txt_ids, img_ids], dim=1), self.cfg.axes_dims_rope, self.cfg.rope_theta)  # (B, L+S, D/2) each
        ref_stream, extracted = None, None
        if refs is not None:
            ref, ref_ids = refs
            ref_vec = self._vec(torch.full_like(timesteps, REF_TIME), guidance)
            ref_rope = rope_tables(ref_ids, self.cfg.axes_dims_rope, self.cfg.rope_theta)  # (B, R, D/2) each
            ref_stream = RefTokens(self.img_in(ref.to(dtype)), self.double_stream_modulation_img(ref_vec), ref_rope)  # x: (B, R, dim)
            ref_single_mod = self.single_stream_modulation(ref_vec)
            extracted = RefKV()

        # With sequence parallelism, this rank's tokens (B, local, dim); klein KV's reference keys are not sharded: it runs whole.
        x, rope, shards = shard_joint(txt, img, rope, whole=ref_kv is not None or refs is not None)
        L_local = shards.count(L)  # of which text
        txt, img = x[:, :L_local], x[:, L_local:]

        def doubles(img: Tensor, txt: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
            nonlocal ref_stream
            for i in range(start, stop):
                img, txt, step = self.double_blocks[i](img, txt, img_mod, txt_mod, rope, ref_kv=ref_kv.double[i] if ref_kv else None,
                                                       refs=ref_stream)
                if step is not None:
                    ref_stream = ref_stream._replace(x=step.x)
                    extracted.double.append(step.kv)
            return img, txt

        def rest(img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:  # the blocks after the first
            nonlocal ref_stream
            img, txt = doubles(img, txt, 1, len(self.double_blocks))
            if ref_stream is not None:
                ref_stream = ref_stream._replace(mod=ref_single_mod)
            x = torch.cat([txt, img], dim=1)  # (B, local, dim)
            for i, block in enumerate(self.single_blocks):
                x, step = block(x, single_mod, rope, ref_kv=ref_kv.single[i] if ref_kv else None, refs=ref_stream)
                if step is not None:
                    ref_stream = ref_stream._replace(x=step.x)
                    extracted.single.append(step.kv)
            return x[:, L_local:], x[:, :L_local]

        cache = self.step_cache if refs is None else None  # extracting the references' K/V needs every block
        with shards.attending():
            img, txt = run_blocks(cache, (img, txt), lambda img, txt: doubles(img, txt, 0, 1), rest)
        img = shards.gather_after(L, txt, img)  # (B, S, dim): the image tokens of every rank
        return self.final_layer(img, vec).to(out_dtype), extracted  # (B, S, out_channels)

    def _check_inputs(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor,
                      guidance: Tensor | None) -> None:
        """Validate shapes and the guidance argument at the boundary."""
        cfg, n_axes = self.cfg, len(self.cfg.axes_dims_rope)
        if img.ndim != 3 or img.shape[2] != cfg.in_channels:
            raise ValueError(f"img must be packed latent tokens (B, S, {cfg.in_channels}), got {tuple(img.shape)}")
        if txt.ndim != 3:
            raise ValueError(f"txt must be text features (B, L, {cfg.joint_attention_dim}), got {tuple(txt.shape)}")
        (B, S), L = img.shape[:2], txt.shape[1]
        expected = {"txt": (txt, (B, L, cfg.joint_attention_dim)), "img_ids": (img_ids, (B, S, n_axes)),
                    "txt_ids": (txt_ids, (B, L, n_axes)), "timesteps": (timesteps, (B,))}
        if guidance is not None:
            expected["guidance"] = (guidance, (B,))
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this model embeds the guidance scale (FLUX.2 dev): pass guidance (B,), e.g. 4.0")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("this model has no guidance embedding (FLUX.2 klein): pass guidance=None")
