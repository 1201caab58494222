"""Z-Image S3-DiT: a single-stream diffusion transformer.

Caption tokens (Qwen3 hidden states) and image tokens (2x2 latent patches) are first refined
separately (`context_refiner` without modulation, `noise_refiner` with it), then concatenated into
one sequence `[image; caption]` that passes through `layers`: pre/post ("sandwich") RMSNorms,
QK-RMSNorm, 3-axis RoPE, SwiGLU, and tanh-gated adaLN modulation from the timestep.

The parameter names are those of the official single-file checkpoint (fused `attention.qkv`,
`attention.out`, `q_norm`/`k_norm`, `x_embedder`, `final_layer`), so it loads with no renaming.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from zflux.common import ops, parallel
from zflux.common.embeddings import timestep_embedding
from zflux.common.fp8 import wants_fp8
from zflux.common.ops import RMSNorm
from zflux.common.quant import Fp8Tensor
from zflux.common.rope import rope_tables
from zflux.common.step_cache import StepCache, run_blocks
from zflux.common.weights import config_from_dict

SEQ_MULTIPLE = 32  # every caption and every image is padded to a multiple of this many tokens
ADALN_DIM = 256  # width of the timestep conditioning vector (capped at dim)
TIME_FREQ_DIM = 256  # sinusoidal features of the timestep (the official TimestepEmbedder's frequency_embedding_size)
TIME_HIDDEN = 1024  # the timestep MLP's hidden width (the official mid_size)
QK_NORM_EPS = 1e-5  # the official Attention's q_norm / k_norm, independent of cfg.norm_eps
FINAL_NORM_EPS = 1e-6  # the final layer's LayerNorm (official FinalLayer)


def adaln_width(dim: int) -> int:
    """Width of the timestep conditioning vector for a model of width `dim`."""
    return min(dim, ADALN_DIM)


@dataclass(frozen=True)
class ZImageConfig:
    """Transformer shape; field names as in diffusers' ZImageTransformer2DModel config.json."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None  # set for Omni (SigLIP2 image features as a third input): zimg/omni.py
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)

    def __post_init__(self):
        if len(self.all_patch_size) != 1 or self.all_f_patch_size != (1,):
            raise ValueError(f"only one spatial patch size and frame patch 1 are supported, got {self.all_patch_size}, {self.all_f_patch_size}")
        if self.n_kv_heads != self.n_heads or not self.qk_norm:
            raise ValueError("Z-Image uses full multi-head attention with QK-norm (n_kv_heads == n_heads, qk_norm)")
        if self.dim % self.n_heads or sum(self.axes_dims) != self.dim // self.n_heads:
            raise ValueError(f"axes_dims {self.axes_dims} must sum to the head dim {self.dim // max(self.n_heads, 1)}")

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def adaln_dim(self) -> int:
        return adaln_width(self.dim)

    @property
    def is_omni(self) -> bool:
        return self.siglip_feat_dim is not None

    @classmethod
    def from_diffusers(cls, config: dict) -> "ZImageConfig":
        """Build from a diffusers transformer config.json dict (unknown bookkeeping keys are ignored)."""
        return config_from_dict(cls, config)


# Z-Image-Turbo (distilled, 8 steps, no CFG) and Z-Image base share the transformer shape.
PRESETS = {"z-image-turbo": ZImageConfig(), "z-image": ZImageConfig()}


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads, head_dim = n_heads, dim // n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps=QK_NORM_EPS)
        self.k_norm = RMSNorm(head_dim, eps=QK_NORM_EPS)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor | Fp8Tensor, rope: tuple[Tensor, Tensor], key_lens: Tensor | None) -> Tensor:
        q, k, v = rearrange(self.qkv(x), "b s (k h d) -> k b h s d", k=3, h=self.n_heads)  # (B, H, S, D) each
        heads = ops.Heads(q, k, v, self.q_norm.weight, self.k_norm.weight)
        return self.out(ops.attention(*ops.attention_inputs([heads], self.q_norm.eps, *rope), key_lens,
                                      fp8=wants_fp8(self.out)))  # (B, S, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor | Fp8Tensor) -> Tensor:
        return self.w2(ops.silu_mul(self.w1(x), self.w3(x), fp8=wants_fp8(self.w2)))


class TokenTimes(NamedTuple):
    """Omni mode's conditioning: each token is modulated by the noisy time or by the clean one (t = 1)."""

    noisy: Tensor  # (B, A) embedding of the sampler's time
    clean: Tensor  # (B, A) embedding of t = 1
    is_noisy: Tensor  # (B, S, 1) bool: which tokens take `noisy`

    def select(self, project: Callable[[Tensor], Tensor]) -> Tensor:
        """project(c) for each token's c: (B, S, out)."""
        return torch.where(self.is_noisy, project(self.noisy)[:, None], project(self.clean)[:, None])


class Block(nn.Module):
    """Sandwich-norm transformer block; `modulated` blocks scale and gate both branches from `c`."""

    def __init__(self, dim: int, n_heads: int, eps: float, modulated: bool):
        super().__init__()
        self.eps = eps
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))  # SwiGLU's 8/3 width, rounded as the official code
        self.attention_norm1 = RMSNorm(dim, eps)
        self.attention_norm2 = RMSNorm(dim, eps)
        self.ffn_norm1 = RMSNorm(dim, eps)
        self.ffn_norm2 = RMSNorm(dim, eps)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.Sequential(nn.Linear(adaln_width(dim), 4 * dim))

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], key_lens: Tensor | None,
                c: Tensor | TokenTimes | None = None) -> Tensor:
        """x (B, S, dim); c (B, A) for every token alike, or TokenTimes choosing per token (Omni)."""
        if self.modulated:
            per_token = isinstance(c, TokenTimes)
            mod = c.select(self.adaLN_modulation) if per_token else self.adaLN_modulation(c)[:, None]  # (B, 1 or S, 4*dim)
            scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=-1)  # (B, 1 or S, dim) each
            gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
            h = self.attention(ops.rms_norm_scale(x, self.attention_norm1.weight, scale_msa, self.eps,
                                                    fp8=wants_fp8(self.attention.qkv)), rope, key_lens)
            x, normed = ops.gated_rms_residual_norm_scale(x, h, self.attention_norm2.weight, gate_msa, self.ffn_norm1.weight,
                                                          scale_mlp, self.eps, fp8=wants_fp8(self.feed_forward.w1))
            return ops.gated_rms_residual(x, self.feed_forward(normed), self.ffn_norm2.weight, gate_mlp, self.eps)
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, key_lens))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class TimestepEmbedder(nn.Module):
    """t (B,) -> the conditioning vector (B, adaln_dim): sinusoidal features of t * t_scale through an MLP."""

    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.t_scale = cfg.t_scale
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQ_DIM, TIME_HIDDEN), nn.SiLU(), nn.Linear(TIME_HIDDEN, cfg.adaln_dim))

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        # t * t_scale in fp32 whatever t's dtype (as flux/model.py): the same as diffusers for the fp32 t that
        # both pipelines pass; for a bf16 t diffusers would also round the product to bf16 (400.39 -> 400).
        return self.mlp(timestep_embedding(t.float() * self.t_scale, TIME_FREQ_DIM).to(dtype))


class FinalLayer(nn.Module):
    def __init__(self, cfg: ZImageConfig):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))
        self.linear = nn.Linear(cfg.dim, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        scale = self.adaLN_modulation(c)[:, None]  # (B, 1, dim)
        return self.linear(ops.layer_norm_modulate(x, None, scale, eps=FINAL_NORM_EPS))


def round_up(n: int, multiple: int = SEQ_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


class Stream(NamedTuple):
    """The token groups one call of the transformer builds before its main layers (B samples)."""

    c: Tensor  # (B, A) time embedding
    img: Tensor  # (B, Ni, dim) embedded image tokens, padded with the pad token to Ni, a multiple of 32
    img_refined: Tensor  # (B, Ni, dim) the same after the noise refiner
    cap: Tensor  # (B, Lc, dim) caption tokens after the context refiner
    img_rope: tuple[Tensor, Tensor]  # (B, Ni, D/2) cos, sin of the image tokens
    rope: tuple[Tensor, Tensor]  # (B, Ni+Lc, D/2) cos, sin of the unified sequence [image; caption]
    key_lens: Tensor | None  # (B,) valid keys of the unified sequence; None when no caption is padded
    n_img: int  # real image tokens, (H/p) * (W/p)


class ZImageTransformer(nn.Module):
    """The Z-Image transformer: latents (B, C, H, W), timestep t (B,), caption features -> velocity-like output."""

    FP8_ATTENTION = True  # under precision fp8 (common/fp8.py): whole Z-Image-Turbo runs 0.046 -> 0.047 from bf16

    def __init__(self, cfg: ZImageConfig, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.backend = backend  # None: $ZFLUX_BACKEND or auto (zflux.common.ops)
        self.fp8_attention = False  # common.fp8.apply_precision sets it (to FP8_ATTENTION) for precision fp8
        p = cfg.patch_size
        self.t_embedder = TimestepEmbedder(cfg)
        self.x_embedder = nn.Linear(p * p * cfg.in_channels, cfg.dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.noise_refiner = nn.ModuleList(self._block(modulated=True) for _ in range(cfg.n_refiner_layers))
        self.context_refiner = nn.ModuleList(self._block(modulated=False) for _ in range(cfg.n_refiner_layers))
        self.layers = nn.ModuleList(self._block(modulated=True) for _ in range(cfg.n_layers))
        self.final_layer = FinalLayer(cfg)
        self.step_cache: StepCache | None = None  # on for a run: common.step_cache.step_cache

    def _block(self, modulated: bool) -> Block:
        return Block(self.cfg.dim, self.cfg.n_heads, self.cfg.norm_eps, modulated)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    def forward(self, x: Tensor, t: Tensor, cap_feats: Tensor, cap_mask: Tensor | None = None,
                control: Callable[["Stream"], dict[int, Tensor]] | None = None,
                cap_lens: tuple[int, ...] | None = None) -> Tensor:
        """x (B, C, H, W) latents, t (B,) with 0 = pure noise, cap_feats (B, L, cap_feat_dim), cap_mask (B, L) bool.

        `control`, given the prepared token stream, returns additions to the unified sequence after the
        main layers it names: how a ControlNet steers the model (zimg/controlnet.py).
        With a mask, its caption lengths are read on the host once (they set the padded shapes): one
        host sync per call, unless the caller passes them as `cap_lens` (each row's True count in
        cap_mask, not checked). Otherwise the forward makes none, and can be captured in a CUDA graph.
        """
        cap_lens, lens = self._check_inputs(x, t, cap_feats, cap_mask, cap_lens)
        with ops.use_backend(self.backend, fp8_attention=self.fp8_attention):
            stream = self._prepare(x, t, cap_feats, cap_mask, cap_lens, lens)
            hints = control(stream) if control is not None else {}
            seq = torch.cat([stream.img_refined, stream.cap], dim=1)  # (B, Ni+Lc, dim): each sample's padding sits at its end
            shards = parallel.sequence_shards(seq.shape[1])  # this rank's tokens, with sequence parallelism
            seq, rope = shards.split(seq), tuple(shards.split(table) for table in stream.rope)  # (B, local, dim)

            def layers(seq: Tensor, start: int, stop: int) -> tuple[Tensor]:
                for i in range(start, stop):
                    seq = self.layers[i](seq, rope, stream.key_lens, stream.c)
                    seq = seq + shards.split(hints[i]) if i in hints else seq
                return (seq,)

            n = len(self.layers)
            with shards.attending():
                (seq,) = run_blocks(self.step_cache, (seq,), lambda x: layers(x, 0, 1), lambda x: layers(x, 1, n))
            seq = shards.gather(seq)  # (B, Ni+Lc, dim)
            return self.unpatchify(self.final_layer(seq[:, : stream.n_img], stream.c), x)  # (B, C, H, W)

    def patchify(self, x: Tensor) -> Tensor:
        """Latents (B, C, H, W) -> one token per p x p patch, (B, H/p * W/p, p*p*C) in the model's dtype."""
        p = self.cfg.patch_size
        return rearrange(x.to(self.dtype), "b c (h ph) (w pw) -> b (h w) (ph pw c)", ph=p, pw=p)  # (B, N, p*p*C)

    def unpatchify(self, tokens: Tensor, like: Tensor) -> Tensor:
        """Output tokens (B, N, p*p*C) -> latents shaped and typed like `like` (B, C, H, W)."""
        p = self.cfg.patch_size
        return rearrange(tokens, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=like.shape[2] // p, ph=p, pw=p).to(like.dtype)

    def embed_image(self, tokens: Tensor, embedder: nn.Linear) -> Tensor:
        """Patch tokens (B, N, width) -> `embedder`'s (B, Ni, dim), padded with the image pad token to a multiple of 32."""
        n = tokens.shape[1]
        return self._pad(embedder(tokens), self.x_pad_token, n, round_up(n))  # (B, Ni, dim)

    def _prepare(self, x: Tensor, t: Tensor, cap_feats: Tensor, cap_mask: Tensor | None, cap_lens: list[int],
                 lens: Tensor) -> "Stream":
        """Everything the main layers need: the time embedding, both refined token groups, RoPE tables and masks."""
        H, W = x.shape[2:]
        p, dtype = self.cfg.patch_size, self.dtype
        c = self.t_embedder(t, dtype)  # (B, A)
        img = self.embed_image(self.patchify(x), self.x_embedder)  # (B, Ni, dim)

        # Caption tokens: real ones first, each caption padded to a multiple of 32 with the pad token.
        # Their lengths set shapes on the host (cap_lens) and masks and positions on the device (lens).
        pad_lens = round_up(lens)  # (B,)
        cap_pad_lens = [round_up(m) for m in cap_lens]
        n_cap = max(cap_pad_lens)
        cap = cap_feats.to(dtype)
        if cap_mask is not None:  # move each caption's real tokens to the front, keeping their order
            order = torch.argsort((~cap_mask).to(torch.int8), dim=1, stable=True)  # (B, L)
            cap = torch.gather(cap, 1, order[..., None].expand_as(cap))
        cap = F.pad(cap, (0, 0, 0, max(0, n_cap - cap.shape[1])))[:, :n_cap]  # (B, Lc, cap_feat_dim)
        cap = self._pad(self.cap_embedder(cap), self.cap_pad_token, lens[:, None], n_cap)  # (B, Lc, dim)

        cos, sin = self._rope(pad_lens, img.shape[1], n_cap, H // p, W // p)  # (B, Ni+Lc, D/2)
        n = img.shape[1]
        img_rope, cap_rope = (cos[:, :n], sin[:, :n]), (cos[:, n:], sin[:, n:])
        padded = min(cap_pad_lens) < n_cap  # some caption is shorter than the longest: attention masks its pad keys
        cap_key_lens = pad_lens if padded else None  # (B,)

        shards = parallel.sequence_shards(n)
        refined, local_rope = shards.split(img), tuple(shards.split(table) for table in img_rope)  # (B, local, dim)
        with shards.attending():
            for block in self.noise_refiner:
                refined = block(refined, local_rope, None, c)
        refined = shards.gather(refined)  # (B, Ni, dim)
        for block in self.context_refiner:
            cap = block(cap, cap_rope, cap_key_lens)
        return Stream(c=c, img=img, img_refined=refined, cap=cap, img_rope=img_rope, rope=(cos, sin),
                      key_lens=n + pad_lens if padded else None, n_img=(H // p) * (W // p))

    @staticmethod
    def _pad(tokens: Tensor, pad_token: Tensor, lens: Tensor | int, total: int) -> Tensor:
        """Extend (B, S, dim) to `total` tokens; positions >= lens (B, 1), or one int for all, become `pad_token`."""
        tokens = F.pad(tokens, (0, 0, 0, total - tokens.shape[1]))  # (B, total, dim)
        is_pad = torch.arange(total, device=tokens.device) >= lens  # (B, total) or (total,)
        return torch.where(is_pad[..., None], pad_token.to(tokens.dtype), tokens)

    def _rope(self, lpad: Tensor, n_img: int, n_cap: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        """RoPE tables for the unified sequence [image (n_img); caption (n_cap)] of every sample.

        Caption token j sits at (1 + j, 0, 0), pads included; image token (r, c) at
        (Lpad + 1, r, c) with Lpad (lpad, (B,)) the sample's padded caption length; image pads at (0, 0, 0).
        """
        B, device = lpad.shape[0], lpad.device
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        img_ids = torch.zeros(B, n_img, 3, dtype=torch.long, device=device)
        img_ids[:, : h * w, 0] = lpad[:, None] + 1
        img_ids[:, : h * w, 1] = rows.flatten()
        img_ids[:, : h * w, 2] = cols.flatten()
        cap_ids = torch.zeros(B, n_cap, 3, dtype=torch.long, device=device)
        cap_ids[..., 0] = torch.arange(1, n_cap + 1, device=device)
        return rope_tables(torch.cat([img_ids, cap_ids], dim=1), self.cfg.axes_dims, self.cfg.rope_theta, fp32_angles=True)

    def _check_inputs(self, x: Tensor, t: Tensor, cap_feats: Tensor, cap_mask: Tensor | None,
                      known_lens: tuple[int, ...] | None) -> tuple[list[int], Tensor]:
        """Validate shapes at the boundary; return each caption's number of real tokens, on the host (`known_lens` if
        given) and as (B,) on x's device.

        The device copy is computed there (from cap_mask, or filled in), never copied from the host,
        which would wait for the device's queue like a read does.
        """
        cfg, p = self.cfg, self.cfg.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be latents (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        if cap_feats.ndim != 3 or cap_feats.shape[0] != B or cap_feats.shape[2] != cfg.cap_feat_dim:
            raise ValueError(f"cap_feats must be ({B}, L, {cfg.cap_feat_dim}), got {tuple(cap_feats.shape)}")
        if cap_mask is None:
            lens = torch.full((B,), cap_feats.shape[1], device=x.device)  # (B,)
            cap_lens = [cap_feats.shape[1]] * B
        else:
            if cap_mask.dtype != torch.bool or cap_mask.shape != cap_feats.shape[:2]:
                raise ValueError(f"cap_mask must be bool {tuple(cap_feats.shape[:2])}, got {cap_mask.dtype} {tuple(cap_mask.shape)}")
            lens = cap_mask.sum(dim=1)  # (B,)
            # the forward's one host sync, unless the caller knows the lengths: they set the padded shapes
            cap_lens = list(known_lens) if known_lens is not None else lens.tolist()
        if min(cap_lens) == 0:
            raise ValueError("every caption needs at least one token")
        limits = {"caption + image (axis 0)": (round_up(max(cap_lens)) + 1, cfg.axes_lens[0]),
                  "latent height / patch (axis 1)": (H // p - 1, cfg.axes_lens[1]),
                  "latent width / patch (axis 2)": (W // p - 1, cfg.axes_lens[2])}
        for what, (pos, limit) in limits.items():
            if pos >= limit:
                raise ValueError(f"RoPE position {pos} for the {what} is out of range: axes_lens allows < {limit}")
        return cap_lens, lens
