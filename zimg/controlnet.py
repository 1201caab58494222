"""Z-Image ControlNet Union (alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union): hints from a control image.

A ControlNet owns only its control weights. It runs on the token stream the base transformer has
prepared for the same call (time embedding, image tokens before and after the noise refiner, refined
caption tokens, RoPE tables: `zimg.model.Stream`) and calls the base's own noise refiner where it
needs one, so the base's embedders, refiners and pad tokens are shared, never copied. It returns one
hint per main layer it names; the base adds `scale * hint` to its unified sequence after that layer.

The control input has `control_in_dim` = 33 channels: the control image's latent (16), then either
zeros (17, text to image) or the keep-mask (1) and the masked image's latent (16, inpainting). Its
2x2 patches are embedded by the ControlNet's own `control_x_embedder` and padded like image tokens.

The shipped variants, told apart by their keys as diffusers does:
- v1 (`...-Union.safetensors`): 6 control blocks hinting main layers 0, 5, ..., 25; two plain
  modulated blocks (`control_noise_refiner`) first refine the control tokens alone.
- 2.0 and 2.1 (`...-Union-2.0/2.1.safetensors`): 15 control blocks hinting layers 0, 2, ..., 28, and
  a refiner stage: control blocks paired with the unrefined image tokens give hints that are added
  after noise-refiner layers 0 and 1 in the ControlNet's own pass over the image tokens. 2.1 has two
  dedicated blocks for that stage (`control_noise_refiner`); 2.0 runs all 15 `control_layers` there
  (its file's `control_noise_refiner` weights are unused, zero, and dropped on load).

Every control block is a modulated Z-Image block on the control stream c plus a zero-initialised
`after_proj` giving the hint; the first of a chain also adds `before_proj(c)` to the base stream it is
paired with. The parameter names are the published files', with the attention projections fused
(`attention.qkv`) as in zimg/model.py; zimg/convert.py maps between the two.
"""

from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from zflux.common.weights import config_from_dict
from zflux.zimg.model import Block, Stream, TokenTimes, ZImageConfig, ZImageTransformer

REFINER_MODES = (None, "control_layers", "control_noise_refiner")  # diffusers' add_control_noise_refiner values


@dataclass(frozen=True)
class ControlNetConfig:
    """ControlNet shape; field names as in diffusers' ZImageControlNetModel config.json."""

    control_layers_places: tuple[int, ...] = tuple(range(0, 29, 2))
    control_refiner_layers_places: tuple[int, ...] = (0, 1)
    control_in_dim: int = 33
    add_control_noise_refiner: str | None = "control_noise_refiner"
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    def __post_init__(self):
        if 0 not in self.control_layers_places:
            raise ValueError(f"control_layers_places must include 0 (the block that reads the base stream), "
                             f"got {self.control_layers_places}")
        if self.add_control_noise_refiner not in REFINER_MODES:
            raise ValueError(f"add_control_noise_refiner must be one of {REFINER_MODES}, got {self.add_control_noise_refiner!r}")
        if self.all_patch_size != (2,) or self.all_f_patch_size != (1,):
            raise ValueError(f"only patch size 2 and frame patch 1 are supported, got {self.all_patch_size}, {self.all_f_patch_size}")
        if self.n_kv_heads != self.n_heads or not self.qk_norm or self.dim % self.n_heads:
            raise ValueError("Z-Image ControlNets use full multi-head attention with QK-norm (n_kv_heads == n_heads, qk_norm)")

    @classmethod
    def from_diffusers(cls, config: dict) -> "ControlNetConfig":
        """Build from a diffusers ZImageControlNetModel config.json dict."""
        return config_from_dict(cls, config)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], variant: str) -> "ControlNetConfig":
        """The config of a published file: the variant's (PRESETS), with the widths its tensors' shapes (published keys) give."""
        dim, width = shapes["control_all_x_embedder.2-1.weight"]
        heads = dim // shapes["control_layers.0.attention.norm_q.weight"][0]
        refiners = {key.split(".")[1] for key in shapes if key.startswith("control_noise_refiner.")}
        return replace(PRESETS[variant], dim=dim, n_heads=heads, n_kv_heads=heads, control_in_dim=width // 4,
                       n_refiner_layers=len(refiners) or PRESETS[variant].n_refiner_layers)

    @property
    def refiner_hints(self) -> bool:
        """Whether the ControlNet also hints the noise refiner (2.0, 2.1)."""
        return self.add_control_noise_refiner is not None

    def check_fits(self, base: ZImageConfig) -> None:
        """Raise ValueError unless hints of this ControlNet can be added to the transformer `base`."""
        problems = []
        if (self.dim, self.n_heads) != (base.dim, base.n_heads):
            problems.append(f"width {self.dim} with {self.n_heads} heads, the transformer {base.dim} with {base.n_heads}")
        if max(self.control_layers_places) >= base.n_layers:
            problems.append(f"it hints main layer {max(self.control_layers_places)}, the transformer has {base.n_layers}")
        if self.refiner_hints and max(self.control_refiner_layers_places) >= base.n_refiner_layers:
            problems.append(f"it hints noise-refiner layer {max(self.control_refiner_layers_places)}, "
                            f"the transformer has {base.n_refiner_layers}")
        if base.is_omni:
            problems.append("the transformer is Z-Image Omni")
        if problems:
            raise ValueError("this ControlNet does not fit the transformer: " + "; ".join(problems))


# The published files: diffusers' model types (single_file_utils) and their shapes.
V1_PLACES = tuple(range(0, 26, 5))
PRESETS = {
    "z-image-turbo-controlnet": ControlNetConfig(control_layers_places=V1_PLACES, control_refiner_layers_places=(),
                                                 add_control_noise_refiner=None),
    "z-image-turbo-controlnet-2.0": ControlNetConfig(add_control_noise_refiner="control_layers"),
    "z-image-turbo-controlnet-2.1": ControlNetConfig(),
}


class ControlBlock(Block):
    """A modulated block over the control stream c that emits a hint; the first of a chain adds the base stream to c."""

    def __init__(self, dim: int, n_heads: int, eps: float, first: bool):
        super().__init__(dim, n_heads, eps, modulated=True)
        self.before_proj = nn.Linear(dim, dim) if first else None
        self.after_proj = nn.Linear(dim, dim)

    def forward(self, c: Tensor, x: Tensor, rope: tuple[Tensor, Tensor], key_lens: Tensor | None,
                t: Tensor | TokenTimes) -> tuple[Tensor, Tensor]:
        """c, x (B, S, dim) -> (hint, new c), both (B, S, dim)."""
        if self.before_proj is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, rope, key_lens, t)
        return self.after_proj(c), c


def run_chain(blocks: nn.ModuleList, c: Tensor, *, x: Tensor, rope: tuple[Tensor, Tensor], key_lens: Tensor | None,
              t: Tensor) -> tuple[list[Tensor], Tensor]:
    """Control blocks in turn over c, paired with the base stream x: every block's hint and the final c."""
    hints = []
    for block in blocks:
        hint, c = block(c, x, rope=rope, key_lens=key_lens, t=t)
        hints.append(hint)
    return hints, c


class ZImageControlNet(nn.Module):
    """Control weights only; called with the base transformer and its prepared stream (see the module docstring)."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.all_patch_size[0]
        self.control_x_embedder = nn.Linear(p * p * cfg.control_in_dim, cfg.dim)
        self.control_layers = self._chain(len(cfg.control_layers_places))
        if cfg.add_control_noise_refiner == "control_noise_refiner":
            self.control_noise_refiner = self._chain(cfg.n_refiner_layers)
        elif cfg.add_control_noise_refiner is None:
            self.control_noise_refiner = nn.ModuleList(Block(cfg.dim, cfg.n_heads, cfg.norm_eps, modulated=True)
                                                       for _ in range(cfg.n_refiner_layers))

    def _chain(self, n: int) -> nn.ModuleList:
        return nn.ModuleList(ControlBlock(self.cfg.dim, self.cfg.n_heads, self.cfg.norm_eps, first=i == 0) for i in range(n))

    def bind(self, base: ZImageTransformer, control: Tensor, scale: float = 1.0) -> Callable[[Stream], dict[int, Tensor]]:
        """The `control=` argument of `base(...)` that adds this ControlNet's hints for the control latents `control`."""
        return partial(self, base, control=control, scale=scale)

    def forward(self, base: ZImageTransformer, stream: Stream, control: Tensor, scale: float = 1.0) -> dict[int, Tensor]:
        """Hints {main layer: (B, Ni+Lc, dim)} for `base`'s call that prepared `stream`.

        control (B or 1, control_in_dim, H, W) at the latents' size; scale multiplies every hint (diffusers'
        controlnet_conditioning_scale).
        """
        c = stream.c
        ctx = base.embed_image(base.patchify(control), self.control_x_embedder)  # (1 or B, Ni, dim)
        ctx = ctx.expand(stream.img.shape[0], -1, -1)  # (B, Ni, dim)
        if self.cfg.refiner_hints:  # 2.x: hint the ControlNet's own pass through the base's noise refiner
            blocks = self.control_layers if self.cfg.add_control_noise_refiner == "control_layers" else self.control_noise_refiner
            hints, ctx = run_chain(blocks, ctx, x=stream.img, rope=stream.img_rope, key_lens=None, t=c)
            refiner_hints = dict(zip(self.cfg.control_refiner_layers_places, hints))
            img = stream.img
            for i, block in enumerate(base.noise_refiner):
                img = block(img, stream.img_rope, None, c)
                if i in refiner_hints:
                    img = img + refiner_hints[i] * scale
        else:  # v1: the control tokens are refined alone; the image tokens are the base's own
            for block in self.control_noise_refiner:
                ctx = block(ctx, stream.img_rope, None, c)
            img = stream.img_refined
        seq = torch.cat([img, stream.cap], dim=1)  # (B, Ni+Lc, dim)
        ctx = torch.cat([ctx, stream.cap], dim=1)  # (B, Ni+Lc, dim)
        hints, _ = run_chain(self.control_layers, ctx, x=seq, rope=stream.rope, key_lens=stream.key_lens, t=c)
        return {place: hint * scale for place, hint in zip(self.cfg.control_layers_places, hints)}
