"""FLUX.1: a rectified-flow MM-DiT transformer.

Text tokens (T5 hidden states) and image tokens (packed 2x2 latent patches) first pass through
`double_blocks`, which keep separate weights per stream but attend jointly over `[text; image]`;
then the two streams are concatenated and pass through `single_blocks`, whose one input
projection (`linear1`) yields q, k, v and the MLP input at once and whose attention and GELU-tanh
MLP run in parallel. Every block is modulated (adaLN: shift, scale, gate) from one vector `vec` =
embedding of the timestep (+ the guidance scale for guidance-distilled models) + the pooled CLIP
vector. Attention uses QK-RMSNorm and a 3-axis RoPE over (index, row, column) positions.

The parameter names are those of Black Forest Labs' single-file checkpoints (`img_in`,
`double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...), so `flux1-dev.safetensors` loads
with no renaming.
"""

from dataclasses import dataclass

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

ROPE_THETA = 10000.0
MLP_RATIO = 4.0
EPS = 1e-6  # every LayerNorm and QK-RMSNorm in FLUX
TIME_DIM = 256  # width of the sinusoidal timestep / guidance features
TIME_FACTOR = 1000.0  # timesteps in [0, 1] and the raw guidance scale are embedded at 1000x


@dataclass(frozen=True)
class FluxConfig:
    """Transformer shape; field names as in diffusers' FluxTransformer2DModel config.json."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None  # None: same as in_channels
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.patch_size != 1:
            raise ValueError(f"FLUX patchifies outside the transformer (pack_latents): patch_size must be 1, got {self.patch_size}")
        check_axes_dims(self.axes_dims_rope, self.attention_head_dim)

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, config: dict) -> "FluxConfig":
        """Build from a diffusers transformer config.json dict (unknown bookkeeping keys are ignored)."""
        return config_from_dict(cls, config)


# The guidance-distilled models (dev and its tools) embed the guidance scale; schnell does not.
# Fill takes 64 noise + 64 masked-image + 256 mask channels, Canny/Depth 64 noise + 64 control
# channels; all predict 64. Kontext has dev's shape: its reference image only adds tokens (flux/tools.py).
PRESETS = {
    "flux-schnell": FluxConfig(),
    "flux-dev": FluxConfig(guidance_embeds=True),
    "flux-kontext": FluxConfig(guidance_embeds=True),
    "flux-fill": FluxConfig(in_channels=384, out_channels=64, guidance_embeds=True),
    "flux-canny": FluxConfig(in_channels=128, out_channels=64, guidance_embeds=True),
    "flux-depth": FluxConfig(in_channels=128, out_channels=64, guidance_embeds=True),
}


class MLPEmbedder(nn.Module):
    """Linear -> SiLU -> Linear, for the timestep, guidance and pooled-text vectors."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, dim)
        self.out_layer = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMSNorm with its weight under BFL's name `scale`. QKNorm reads the weight directly, to norm and
    rotate q and k in one fused op; calling the module norms alone."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.scale, EPS)


class QKNorm(nn.Module):
    """The weights of the RMSNorm of q and k over the head dim, before RoPE (ops.attention_inputs does both)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def heads(self, qkv: Tensor, num_heads: int) -> ops.Heads:
        """A stream's fused projection (B, S, 3 * dim) as q, k, v (B, H, S, D) views, with these norm weights."""
        q, k, v = rearrange(qkv, "b s (k h d) -> k b h s d", k=3, h=num_heads)  # (B, H, S, D) each
        return ops.Heads(q, k, v, self.query_norm.scale, self.key_norm.scale)


class Modulation(nn.Module):
    """SiLU(vec) -> the block's modulation, packed (B, n * dim); `split` reads it as one ModulationOut (single blocks), or
    two (double blocks: attention, then MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.n = 6 if double else 3
        self.lin = nn.Linear(dim, self.n * dim)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(F.silu(vec))  # (B, n * dim)

    def split(self, packed: Tensor) -> tuple[ModulationOut, ...]:
        chunks = packed[:, None].chunk(self.n, dim=-1)  # n x (B, 1, dim)
        return tuple(ModulationOut(*chunks[i:i + 3]) for i in range(0, self.n, 3))


class SelfAttention(nn.Module):
    """One stream's share of the joint attention: fused qkv and QK-norm here; the block joins the streams for
    attention and applies each stream's output projection `proj`."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor | Fp8Tensor) -> ops.Heads:
        """x (B, S, dim) -> this stream's q, k, v (B, H, S, D), to be normed, rotated and joined by ops.attention_inputs."""
        return self.norm.heads(self.qkv(x), self.num_heads)


class MLP(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear, keyed `.0` and `.2` as in the checkpoints. An fp8 second linear gets the
    activation as e4m3 rows from the activation's own kernel (ops.gelu_tanh with fp8=True)."""

    def __init__(self, dim: int):
        hidden = int(dim * MLP_RATIO)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor | Fp8Tensor) -> Tensor:
        up, gelu, down = self
        return down(ops.gelu_tanh(up(x), fp8=True) if wants_fp8(down) else gelu(up(x)))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one attention over [text; image]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.img_mod, self.txt_mod = Modulation(dim, double=True), Modulation(dim, double=True)
        self.img_attn, self.txt_attn = SelfAttention(dim, num_heads), SelfAttention(dim, num_heads)
        self.img_mlp, self.txt_mlp = MLP(dim), MLP(dim)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor | None, rope: tuple[Tensor, Tensor],
                modulation: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """`modulation`: the image and text streams' packed modulations (B, 6 * dim) each, taken ahead (Flux.modulations);
        None: from vec (B, dim) here."""
        L = txt.shape[1]
        img_mod, txt_mod = (self.img_mod(vec), self.txt_mod(vec)) if modulation is None else modulation
        img_mod, txt_mod = self.img_mod.split(img_mod), self.txt_mod.split(txt_mod)
        out = ops.attention(*self._joint_qkv(img, txt, img_mod, txt_mod, rope), fp8=wants_fp8(self.img_attn.proj))  # (B, L+S, dim)
        txt_out, img_out = ops.split_tokens(out, L)
        img = self._residuals(img, img_out, img_mod, self.img_attn, self.img_mlp)
        txt = self._residuals(txt, txt_out, txt_mod, self.txt_attn, self.txt_mlp)
        return img, txt

    def _joint_qkv(self, img: Tensor, txt: Tensor, img_mod: tuple[ModulationOut, ...], txt_mod: tuple[ModulationOut, ...],
                   rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, L+S, D) over [text; image].

        A function of its own so that each stream's projections die on return: only the joined
        tensors live through attention and none through the MLPs.
        """
        txt_attn_mod, img_attn_mod = txt_mod[0], img_mod[0]
        txt_heads = self.txt_attn(ops.layer_norm_modulate(txt, txt_attn_mod.shift, txt_attn_mod.scale, EPS, fp8=wants_fp8(self.txt_attn.qkv)))
        img_heads = self.img_attn(ops.layer_norm_modulate(img, img_attn_mod.shift, img_attn_mod.scale, EPS, fp8=wants_fp8(self.img_attn.qkv)))
        return ops.attention_inputs([txt_heads, img_heads], EPS, *rope)  # rope: (B, L+S, D/2) tables, text positions first

    @staticmethod
    def _residuals(x: Tensor, attn_out: Tensor | Fp8Tensor, mod: tuple[ModulationOut, ModulationOut], attn: SelfAttention,
                   ffn: nn.Module) -> Tensor:
        """Gated attention residual, then the gated, modulated MLP residual, for one stream."""
        attn_mod, mlp_mod = mod
        x, normed = ops.gated_residual_layer_norm_modulate(x, attn.proj(attn_out), attn_mod.gate, mlp_mod.shift, mlp_mod.scale, EPS,
                                                           fp8=wants_fp8(ffn[0]))
        return ops.gated_residual(x, ffn(normed), mlp_mod.gate)


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel from one input projection, over the concatenated sequence."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.mlp_hidden = int(dim * MLP_RATIO)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: Tensor, vec: Tensor | None, rope: tuple[Tensor, Tensor], modulation: Tensor | None = None) -> Tensor:
        """`modulation`: the packed modulation (B, 3 * dim), taken ahead (Flux.modulations); None: from vec (B, dim) here."""
        (mod,) = self.modulation.split(self.modulation(vec) if modulation is None else modulation)
        h = ops.layer_norm_modulate(x, mod.shift, mod.scale, EPS, fp8=wants_fp8(self.linear1))
        return ops.gated_residual(x, self.linear2(self._attention_and_mlp(h, rope)), mod.gate)

    def _attention_and_mlp(self, x: Tensor | Fp8Tensor, rope: tuple[Tensor, Tensor]) -> Tensor | Fp8Tensor:
        """linear2's input (B, S, dim + mlp_hidden): the attention output, then the GELU activation (ops.join_activation:
        e4m3 rows from one kernel for an fp8 linear2); the projection dies on return."""
        projected = self.linear1(x)  # (B, S, 3 * dim + mlp_hidden)
        qkv, hidden = projected.split([3 * self.dim, self.mlp_hidden], dim=-1)
        q, k, v = ops.attention_inputs([self.norm.heads(qkv, self.num_heads)], EPS, *rope)
        return ops.join_activation(ops.attention(q, k, v), hidden, fp8=wants_fp8(self.linear2))


class LastLayer(nn.Module):
    """adaLN (shift, scale; no gate) and the projection back to latent channels."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor | None, modulation: Tensor | None = None) -> Tensor:
        """`modulation`: adaLN_modulation(vec) (B, 2 * dim), taken ahead (Flux.modulations); None: from vec here."""
        mod = self.adaLN_modulation(vec) if modulation is None else modulation
        shift, scale = mod[:, None].chunk(2, dim=-1)  # (B, 1, dim) each
        return self.linear(ops.layer_norm_modulate(x, shift, scale, EPS))


class Flux(nn.Module):
    """The FLUX.1 transformer: packed latents + text -> velocity, both (B, S, channels)."""

    # fp8 attention is not FLUX.1's default under precision fp8: over a whole 28-step FLUX.1-dev run (random full-size
    # weights, H100) it took the final latents' error from bf16 from 0.050 (fp8 GEMMs) to 0.067, past the per-tensor
    # scheme's 0.050 (bench/RESULTS.md, 2026-11-24); Z-Image's moved 0.046 -> 0.047, FLUX.2 klein's not at all. The
    # cause: P V added into its running accumulator at the fp8 tensor cores' reduced precision; a fresh accumulator per
    # key block brought FLUX.1 back to 0.046 but halved the kernel's speed (320-405 TFLOP/s at best, below cuDNN's bf16).
    FP8_ATTENTION = False

    def __init__(self, cfg: FluxConfig, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.backend = backend  # None: $ZFLUX_BACKEND or auto (zflux.common.ops)
        self.fp8_attention = False  # common.fp8.apply_precision sets it (to FP8_ATTENTION) for precision fp8
        dim, heads = cfg.hidden_size, cfg.num_attention_heads
        self.img_in = nn.Linear(cfg.in_channels, dim)
        self.time_in = MLPEmbedder(TIME_DIM, dim)
        self.vector_in = MLPEmbedder(cfg.pooled_projection_dim, dim)
        if cfg.guidance_embeds:
            self.guidance_in = MLPEmbedder(TIME_DIM, dim)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads) for _ in range(cfg.num_layers))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, heads) for _ in range(cfg.num_single_layers))
        self.final_layer = LastLayer(dim, cfg.out_channels)
        self.step_cache: StepCache | None = None  # on for a run: common.step_cache.step_cache

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                guidance: Tensor | None = None, modulations: Tensor | None = None) -> Tensor:
        """img (B, S, in_channels) packed latents, ids (B, S|L, 3), txt (B, L, 4096), timesteps (B,) in [0, 1]
        with 1 = pure noise, y (B, 768) pooled CLIP, guidance (B,) raw scale (guidance-distilled models only).

        `modulations`: what self.modulations(timesteps, y, guidance) returns for these inputs (not checked), taken by
        the caller for every step of a run at once: the blocks' adaLN weights are a quarter of FLUX.1's (3.2 B
        parameters), read in full to multiply one vector, once per step unless taken ahead (flux/pipeline.py does)."""
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        if modulations is not None and modulations.shape != (img.shape[0], sum(self.modulation_widths)):
            raise ValueError(f"modulations must have shape ({img.shape[0]}, {sum(self.modulation_widths)}), got {tuple(modulations.shape)}")
        with ops.use_backend(self.backend, fp8_attention=self.fp8_attention):
            if modulations is None:  # each block takes its own from vec: streamed blocks (common/offload.py) have their weights then
                return self._forward(img, img_ids, txt, txt_ids, self.conditioning(timesteps, y, guidance), None)
            return self._forward(img, img_ids, txt, txt_ids, None, modulations.split(self.modulation_widths, dim=-1))

    @property
    def modulation_widths(self) -> list[int]:
        """The widths of the packed modulations, block by block: each double block's image then text stream, each single
        block, the last layer."""
        dim, cfg = self.cfg.hidden_size, self.cfg
        return [6 * dim] * (2 * cfg.num_layers) + [3 * dim] * cfg.num_single_layers + [2 * dim]

    def conditioning(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """vec (B, dim), what every block's modulation is made from: the embeddings of the timesteps (B,), the guidance
        scale (B,) and the pooled text y (B, 768), summed in the model's dtype."""
        dtype = self.dtype
        # The sinusoidal features are taken in fp32 from the caller's timesteps, whatever the model dtype.
        vec = self.time_in(timestep_embedding(timesteps.float() * TIME_FACTOR, TIME_DIM).to(dtype))  # (B, dim)
        if self.cfg.guidance_embeds:
            vec = vec + self.guidance_in(timestep_embedding(guidance.float() * TIME_FACTOR, TIME_DIM).to(dtype))
        return vec + self.vector_in(y.to(dtype))

    def modulations(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """Every block's modulation for conditioning(timesteps, y, guidance), packed (B, sum(modulation_widths)) in
        modulation_widths' order. Calls the blocks' adaLN linears directly: the blocks must be on the device whole (not
        streamed)."""
        vec = self.conditioning(timesteps, y, guidance)  # (B, dim)
        doubles = [m(vec) for block in self.double_blocks for m in (block.img_mod, block.txt_mod)]
        singles = [block.modulation(vec) for block in self.single_blocks]
        return torch.cat([*doubles, *singles, self.final_layer.adaLN_modulation(vec)], dim=-1)  # (B, W)

    def _forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, vec: Tensor | None,
                 mods: tuple[Tensor, ...] | None) -> Tensor:
        """vec (B, dim), or the blocks' modulations taken ahead, (B, width) each in modulation_widths' order."""
        dtype, out_dtype, L = self.dtype, img.dtype, txt.shape[1]
        n_double = len(self.double_blocks)
        double_mods = [None] * n_double if mods is None else list(zip(mods[:2 * n_double:2], mods[1:2 * n_double:2]))
        single_mods = [None] * len(self.single_blocks) if mods is None else mods[2 * n_double:-1]

        img = self.img_in(img.to(dtype))  # (B, S, dim)
        txt = self.txt_in(txt.to(dtype))  # (B, L, dim)
        ids = torch.cat([txt_ids, img_ids], dim=1)  # (B, L+S, 3)
        rope = rope_tables(ids, self.cfg.axes_dims_rope, ROPE_THETA)  # (B, L+S, D/2) each

        x, rope, shards = shard_joint(txt, img, rope)  # this rank's tokens, with sequence parallelism: (B, local, dim)
        L_local = shards.count(L)  # of which text
        txt, img = x[:, :L_local], x[:, L_local:]

        def doubles(img: Tensor, txt: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
            for block, modulation in zip(self.double_blocks[start:stop], double_mods[start:stop]):
                img, txt = block(img, txt, vec, rope, modulation)
            return img, txt

        def rest(img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:  # the blocks after the first
            img, txt = doubles(img, txt, 1, n_double)
            x = torch.cat([txt, img], dim=1)  # (B, local, dim)
            for block, modulation in zip(self.single_blocks, single_mods):
                x = block(x, vec, rope, modulation)
            return x[:, L_local:], x[:, :L_local]

        with shards.attending():
            img, txt = run_blocks(self.step_cache, (img, txt), lambda img, txt: doubles(img, txt, 0, 1), rest)
        img = shards.gather_after(L, txt, img)  # (B, S, dim): the image tokens of every rank
        return self.final_layer(img, vec, None if mods is None else mods[-1]).to(out_dtype)  # (B, S, out_channels)

    def _check_inputs(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
                      guidance: Tensor | None) -> None:
        """Validate shapes and the guidance argument at the boundary."""
        cfg, n_axes = self.cfg, len(self.cfg.axes_dims_rope)
        if img.ndim != 3 or img.shape[2] != cfg.in_channels:
            raise ValueError(f"img must be packed latents (B, S, {cfg.in_channels}), got {tuple(img.shape)}")
        B, S = img.shape[:2]
        if txt.ndim != 3 or txt.shape[0] != B or txt.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"txt must be ({B}, L, {cfg.joint_attention_dim}), got {tuple(txt.shape)}")
        L = txt.shape[1]
        for name, ids, n in (("img_ids", img_ids, S), ("txt_ids", txt_ids, L)):
            if ids.shape != (B, n, n_axes):
                raise ValueError(f"{name} must have shape ({B}, {n}, {n_axes}), got {tuple(ids.shape)}")
        if timesteps.shape != (B,):
            raise ValueError(f"timesteps must have shape ({B},), got {tuple(timesteps.shape)}")
        if y.shape != (B, cfg.pooled_projection_dim):
            raise ValueError(f"y must have shape ({B}, {cfg.pooled_projection_dim}), got {tuple(y.shape)}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this model embeds the guidance scale (FLUX.1 dev and its tools): pass guidance (B,), e.g. 3.5")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("this model has no guidance embedding (FLUX.1 schnell): pass guidance=None")
        if guidance is not None and guidance.shape != (B,):
            raise ValueError(f"guidance must have shape ({B},), got {tuple(guidance.shape)}")
