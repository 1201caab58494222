"""The KL autoencoders of FLUX.1 and Z-Image (16 channels; diffusers' AutoencoderKL) and of FLUX.2
(32 channels; AutoencoderKLFlux2), BFL's AutoEncoder in both cases.

Encoder: conv_in, then per resolution level `layers_per_block` ResNet blocks and, except at the
last level, a stride-2 downsample; a mid block (ResNet, single-head self-attention over all pixels,
ResNet); GroupNorm, SiLU, conv_out to 2 x latent_channels (mean, log-variance), and for FLUX.2 a
1x1 quant_conv. The decoder mirrors it (FLUX.2: a 1x1 post_quant_conv first) with one more ResNet
block per level and nearest x2 upsampling.

`encode` and `decode` work on raw latents, as in diffusers' autoencoders. FLUX.1 and Z-Image
pipelines apply `(z - shift_factor) * scaling_factor` after encoding and its inverse before
decoding. FLUX.2 instead folds each 2x2 patch of the raw latent into the channels and standardizes
the 4 x 32 = 128 channels with the running statistics of a batch norm stored with the weights:
`normalize` / `denormalize` here, the one place that does it.

The parameter names are those of BFL's `ae.safetensors`. diffusers' `vae/` layout differs in names,
in the order of the decoder's levels, and in the attention projections (Linear, not 1x1 conv):

    BFL (ours)                              diffusers
    {en,de}coder.norm_out.*                 {en,de}coder.conv_norm_out.*
    encoder.quant_conv.* (FLUX.2)           quant_conv.*
    decoder.post_quant_conv.* (FLUX.2)      post_quant_conv.*
    encoder.down.{i}.block.{j}.*            encoder.down_blocks.{i}.resnets.{j}.*
    encoder.down.{i}.downsample.conv.*      encoder.down_blocks.{i}.downsamplers.0.conv.*
    decoder.up.{i}.block.{j}.*              decoder.up_blocks.{n-1-i}.resnets.{j}.*
    decoder.up.{i}.upsample.conv.*          decoder.up_blocks.{n-1-i}.upsamplers.0.conv.*
    *.nin_shortcut.*                        *.conv_shortcut.*
    *.mid.block_1.* / mid.block_2.*         *.mid_block.resnets.0.* / .1.*
    *.mid.attn_1.{norm,q,k,v,proj_out}.*    *.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}.*
    attention weights (C, C, 1, 1)          (C, C)
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.nn import functional as F

from zflux.common import ops
from zflux.common.graphs import forward_of
from zflux.common.weights import check_model, config_from_dict, config_to_dict, load_model, save_model_folder

EPS = 1e-6  # every GroupNorm
LOGVAR_RANGE = (-30.0, 20.0)  # the posterior's log-variance is clamped here (BFL's and diffusers' DiagonalGaussian)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Autoencoder shape and latent statistics; field names as in diffusers' AutoencoderKL config.json."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    patch_size: tuple[int, int] | None = None  # FLUX.2: latents are 2x2-patchified and batch-normalized
    batch_norm_eps: float = 1e-4

    def __post_init__(self):
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups {self.norm_num_groups}")
        if self.patch_size not in (None, (2, 2)):
            raise ValueError(f"patch_size must be (2, 2) (FLUX.2) or None, got {self.patch_size}")

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each side (8 for the FLUX autoencoder)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: dict) -> "AutoencoderConfig":
        """Build from a diffusers vae/config.json dict (AutoencoderKL or AutoencoderKLFlux2); variants this module
        does not implement are refused."""
        class_name = config.get("_class_name", "AutoencoderKL")
        if class_name not in CLASS_DEFAULTS:
            raise ValueError(f"config is for {class_name}, not {' or '.join(CLASS_DEFAULTS)}")
        config = CLASS_DEFAULTS[class_name] | config  # the diffusers class's defaults where they differ from ours
        unsupported = {  # option -> whether the config asks for it
            f"act_fn={config.get('act_fn')!r}": config.get("act_fn", "silu") != "silu",
            "decoder_block_out_channels": config.get("decoder_block_out_channels") not in (None, config.get("block_out_channels")),
            "mid_block_add_attention=False": not config.get("mid_block_add_attention", True),
            "down_block_types": set(config.get("down_block_types", ["DownEncoderBlock2D"])) != {"DownEncoderBlock2D"},
            "up_block_types": set(config.get("up_block_types", ["UpDecoderBlock2D"])) != {"UpDecoderBlock2D"},
        }
        if any(unsupported.values()):
            raise ValueError(f"unsupported {class_name} variant: {', '.join(k for k, on in unsupported.items() if on)}")
        return config_from_dict(cls, config)


    def to_diffusers(self) -> dict:
        """This config as a diffusers AutoencoderKL config.json dict (FLUX.1's and Z-Image's kind, not FLUX.2's)."""
        if self.patch_size is not None:
            raise ValueError("a FLUX.2 autoencoder config (patch_size set) is not an AutoencoderKL config")
        levels = len(self.block_out_channels)
        config = config_to_dict(self, "AutoencoderKL") | {
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "act_fn": "silu", "mid_block_add_attention": True}
        del config["patch_size"], config["batch_norm_eps"]  # FLUX.2's, unknown to AutoencoderKL
        return config

# diffusers' defaults that differ from this module's, per class, for keys a config.json leaves out.
CLASS_DEFAULTS = {
    "AutoencoderKL": {"use_quant_conv": True, "use_post_quant_conv": True},
    "AutoencoderKLFlux2": {"use_quant_conv": True, "use_post_quant_conv": True, "latent_channels": 32, "patch_size": (2, 2),
                           "scaling_factor": 1.0, "shift_factor": 0.0},
}
# FLUX.1 (dev, schnell, tools) and Z-Image ship the 16-channel autoencoder; every FLUX.2 model the 32-channel one.
PRESETS = {
    "flux": AutoencoderConfig(),
    "flux2": AutoencoderConfig(latent_channels=32, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=True,
                               use_post_quant_conv=True, patch_size=(2, 2)),
}


class ResnetBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 conv on x where the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # At 1024x1024 every temporary is 256-512 MiB in bf16: the residual add works in place on a fresh
        # tensor, and rebinding `h` step by step frees each one as soon as it is used.
        # The convolutions run without their biases, which the next op adds on its way (no pass of their own).
        h = ops.group_norm_silu(x, self.norm1)  # (B, C_in, H, W)
        h = F.conv2d(h, self.conv1.weight, padding=1)  # (B, C_out, H, W)
        h = ops.group_norm_silu(h, self.norm2, x_bias=self.conv1.bias)  # (B, C_out, H, W)
        h = F.conv2d(h, self.conv2.weight, padding=1)  # (B, C_out, H, W)
        if isinstance(self.nin_shortcut, nn.Conv2d):  # the shortcut's bias joins conv2's, added in the same pass
            shortcut = F.conv2d(x, self.nin_shortcut.weight)  # (B, C_out, H, W)
            return ops.bias_residual(h, self.conv2.bias + self.nin_shortcut.bias, shortcut)
        return ops.bias_residual(h, self.conv2.bias, x)


class AttnBlock(nn.Module):
    """Single-head self-attention across all H*W positions; the projections are stored as 1x1 convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        tokens = rearrange(ops.group_norm_silu(x, self.norm, silu=False), "b c h w -> b 1 (h w) c")  # (B, 1, HW, C)
        q, k, v = (_pointwise(tokens, conv) for conv in (self.q, self.k, self.v))  # each (B, 1, HW, C)
        # 128x128 latents are 16384 tokens, a 1 GiB score matrix in fp32: a fused kernel, SDPA's or (512 channels, past
        # SDPA's fast kernels) the wide-head Triton one.
        out = _pointwise(ops.wide_attention(q, k, v), self.proj_out)  # (B, 1, HW, C)
        return x + rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2])  # (B, C, H, W)


def _pointwise(tokens: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 convolution applied as a Linear layer to channels-last tokens (as diffusers computes it)."""
    return F.linear(tokens, rearrange(conv.weight, "o i 1 1 -> o i"), conv.bias)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding only the right and bottom edges by one pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv; computed without making the upsampled tensor.

    After a nearest x2 upsample, an output pixel's 3x3 window covers a 2x2 block of input pixels, and
    which taps fall on which input pixel depends only on the pixel's parity (its phase): output row 2i
    reads input rows i-1 (tap row 0) and i (tap rows 1 + 2), output row 2i+1 rows i (taps 0 + 1) and
    i+1 (tap 2); columns alike. So the four phases are four 2x2 convolutions of the input, run as one
    (4C outputs, padding 1), then interleaved: 16 C^2 multiply-adds per input pixel where the conv of
    the upsampled tensor takes 36, and the upsampled tensor (4x the input) is never written.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self._phases: tuple[tuple, Tensor, Tensor] | None = None  # `_phase_weight`'s cache, no state

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        # Phase (a, b) sits at channels (2a + b) C.. of y, its H x W window starting at row a, column b. The conv runs
        # without its bias, added as the phases are interleaved: PyTorch adds it in a pass of its own over y.
        y = F.conv2d(x, self._phase_weight(x, layout), padding=1)  # (B, 4C, H+1, W+1)
        sb, sc, sh, sw = y.stride()
        phases = y.as_strided((B, C, H, 2, W, 2), (sb, sc, sh, 2 * C * sc + sh, sw, C * sc + sw))  # (B, C, H, a, W, b)
        out = torch.empty(B, C, 2 * H, 2 * W, dtype=x.dtype, device=x.device, memory_format=layout)
        pixels = out.unflatten(3, (W, 2)).unflatten(2, (H, 2))  # (B, C, H, a, W, b), a view of out
        bias = rearrange(self.conv.bias, "c -> c 1 1 1 1")
        if torch.is_grad_enabled() and (phases.requires_grad or bias.requires_grad):
            pixels.copy_(phases + bias)  # out= takes no autograd
        else:
            torch.add(phases, bias, out=pixels)
        return out  # (B, C, 2H, 2W)

    def _phase_weight(self, x: Tensor, layout: torch.memory_format) -> Tensor:
        """The phases' weight (4C, C, 2, 2) in `layout`, made once per state of the conv's weight.

        Making it is a few dozen small ops, which ran on every call (launch gaps in an eager decode). The cache
        key holds what a change of the weight changes: its address (`.to()`, offload's copies, a replaced tensor),
        its version counter (in-place updates: an optimizer step, a merged LoRA), dtype and device. The cache
        holds the weight it was made from, so that no other tensor can take that address while it is kept (the
        allocator would hand a freed weight's memory to the next copy of the same size). Where autograd records
        (training) it is made afresh, so that the gradients reach the conv's weight.
        """
        w = self.conv.weight
        if ops.training(x, w):
            return phase_weights(w).contiguous(memory_format=layout)
        key = (layout, w.dtype, w.device, w.data_ptr(), _version(w))
        if self._phases is None or self._phases[0] != key:
            self._phases = key, w.detach(), phase_weights(w).contiguous(memory_format=layout)
        return self._phases[2]


def phase_weights(weight: Tensor) -> Tensor:
    """A 3x3 conv's weight (O, I, 3, 3) as the four 2x2 convs (4 O, I, 2, 2) of Upsample's phases, (a, b) at rows (2a + b) O..;
    taps summed in fp32 (or finer), rounded once."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))

    def collapse(taps: Tensor, dim: int) -> Tensor:  # 3 taps along `dim` -> (2 phases, ..., 2 taps along `dim`)
        t0, t1, t2 = taps.unbind(dim)
        return torch.stack([torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)])

    rows = collapse(w, dim=2)  # (2, O, I, 2, 3): phase a
    both = collapse(rows, dim=4)  # (2, 2, O, I, 2, 2): phase b, phase a
    return both.transpose(0, 1).reshape(-1, *w.shape[1:2], 2, 2).to(weight.dtype)  # (4 O, I, 2, 2)


def _version(t: Tensor) -> int | None:
    """t's version counter, which each in-place update bumps; None for an inference tensor (made under
    torch.inference_mode, as the autoencoder's channels-last weights are in a pipeline's first decode): it keeps
    none, so an in-place update under inference mode goes unseen (zflux makes none: training runs outside it)."""
    return None if t.is_inference() else t._version


def _resnets(in_channels: int, out_channels: int, n_blocks: int, groups: int) -> nn.ModuleList:
    widths = [in_channels] + [out_channels] * n_blocks
    return nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:]))


class DownLevel(nn.Module):
    """ResNet blocks at one resolution of the encoder, then (except at the last level) a downsample."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = _resnets(in_channels, out_channels, n_blocks, groups)
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """ResNet blocks at one resolution of the decoder, then (except at full size) an upsample."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = _resnets(in_channels, out_channels, n_blocks, groups)
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class Encoder(nn.Module):
    """(B, 3, H, W) image -> (B, 2 * latent_channels, H/8, W/8) mean and log-variance."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, downsample=i < n - 1)
            for i in range(n)
        )
        self.mid = MidBlock(ch[-1], groups)
        self.norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)
        moments = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if cfg.use_quant_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)  # (B, ch[0], H, W)
        for level in self.down:
            x = level(x)  # (B, ch[i], H/2^i, W/2^i), halved once more except at the last level
        x = self.mid(x)
        x = ops.group_norm_silu(x, self.norm_out)  # (B, ch[-1], H/8, W/8)
        return self.quant_conv(self.conv_out(x))  # (B, 2*C, H/8, W/8)


class Decoder(nn.Module):
    """(B, latent_channels, h, w) raw latent -> (B, 3, 8h, 8w) image."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        C = cfg.latent_channels
        self.post_quant_conv = nn.Conv2d(C, C, 1) if cfg.use_post_quant_conv else nn.Identity()
        self.conv_in = nn.Conv2d(C, ch[-1], 3, padding=1)
        self.mid = MidBlock(ch[-1], groups)
        # up[i] works at the resolution of the encoder's down[i]: up[0] is full size and runs last.
        self.up = nn.ModuleList(
            UpLevel(ch[min(i + 1, n - 1)], ch[i], cfg.layers_per_block + 1, groups, upsample=i > 0)
            for i in range(n)
        )
        self.norm_out = nn.GroupNorm(groups, ch[0], eps=EPS)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid(self.conv_in(self.post_quant_conv(z)))  # (B, ch[-1], h, w)
        for level in reversed(self.up):
            x = level(x)  # (B, ch[i], ...), doubled in size except at the last level
        x = ops.group_norm_silu(x, self.norm_out)  # (B, ch[0], 8h, 8w)
        return self.conv_out(x)  # (B, 3, 8h, 8w)


class Autoencoder(nn.Module):
    """The KL autoencoder used for inference: `encode` gives the latent mean, `decode` the image."""

    def __init__(self, cfg: AutoencoderConfig = PRESETS["flux"]):
        super().__init__()
        self.cfg = cfg
        self.tiling: bool | None = None  # a run's images encode in tiles (True), whole, or auto (None): common.pipeline.encode_raw
        self.cuda_graphs = False  # replay decodes as CUDA graphs (the pipelines turn it on where the weights stay put)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.patch_size is not None:  # only the running statistics are used (and stored)
            self.bn = nn.BatchNorm2d(4 * cfg.latent_channels, eps=cfg.batch_norm_eps, affine=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @torch.no_grad()
    def encode(self, image: Tensor, noise: Tensor | None = None) -> Tensor:
        """(B, 3, H, W) image in [-1, 1] -> (B, C, H/8, W/8) raw latent: the mean, or `mean + std * noise`."""
        _check_shape(image, self.cfg.in_channels, self.cfg.downscale, "image")
        mean, logvar = self.encoder(self._memory_format(image)).contiguous().chunk(2, dim=1)  # each (B, C, H/8, W/8)
        if noise is None:
            return mean
        if noise.shape != mean.shape:
            raise ValueError(f"noise must have the latent's shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
        # A posterior sample, which diffusers' FLUX and Z-Image img2img pipelines take (latent_dist.sample).
        return mean + torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE)) * noise.to(mean)  # (B, C, H/8, W/8)

    @torch.no_grad()
    def decode(self, latent: Tensor) -> Tensor:
        """(B, C, h, w) raw latent (already unscaled and unshifted) -> (B, 3, 8h, 8w) image, about [-1, 1]."""
        _check_shape(latent, self.cfg.latent_channels, 1, "latent")
        # A 1024x1024 decode is ~300 kernels: eagerly, the GPU waits on Python between them (~6 ms of 33 on the H100).
        # A 1024x1024 decode is ~300 kernels: eagerly, the GPU waits on Python between them (~6 ms of 33 on the H100).
        return forward_of(self.decoder, self.cuda_graphs)(self._memory_format(latent)).contiguous()

    def _memory_format(self, x: Tensor) -> Tensor:
        """x in the weights' dtype, and on a GPU channels-last, weights included (converted once): cuDNN's NHWC
        convolutions are the fast ones there, and the GroupNorm + SiLU kernel reads whole pixels in one run."""
        if not x.is_cuda:
            return x.to(self.dtype)
        if not self.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last):
            self.to(memory_format=torch.channels_last)
        return x.to(self.dtype, memory_format=torch.channels_last)

    def forward(self, image: Tensor, noise: Tensor | None = None) -> Tensor:
        """The reconstruction decode(encode(image, noise)) of a (B, 3, H, W) image."""
        return self.decode(self.encode(image, noise))

    def normalize(self, latent: Tensor) -> Tensor:
        """FLUX.2: raw latent (B, C, h, w) -> (B, 4C, h/2, w/2), each 2x2 patch in the channels (c, row, col), standardized
        by the batch-norm running statistics, in the latent's dtype."""
        patches = rearrange(latent, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=2, pw=2)  # (B, 4C, h/2, w/2)
        mean, std = self._latent_stats(patches)
        return (patches - mean) / std

    def denormalize(self, latent: Tensor) -> Tensor:
        """The inverse of `normalize`: (B, 4C, h/2, w/2) standardized patches -> raw latent (B, C, h, w)."""
        mean, std = self._latent_stats(latent)
        return rearrange(latent * std + mean, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=2, pw=2)  # (B, C, h, w)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Running mean and sqrt(var + eps), each (1, 4C, 1, 1), computed in the weights' dtype and cast to `like`'s (as diffusers does)."""
        if self.cfg.patch_size is None:
            raise ValueError("this autoencoder keeps no latent statistics (FLUX.1 / Z-Image scale and shift instead)")
        std = torch.sqrt(self.bn.running_var + self.cfg.batch_norm_eps)
        return tuple(rearrange(t, "c -> 1 c 1 1").to(like) for t in (self.bn.running_mean, std))


def _check_shape(x: Tensor, channels: int, multiple: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{name} height {x.shape[2]} and width {x.shape[3]} must be multiples of {multiple}")


RENAMES = [  # (ours, diffusers) substrings, tried in this order; level indices are mapped separately
    (".mid.block_1.", ".mid_block.resnets.0."),
    (".mid.block_2.", ".mid_block.resnets.1."),
    (".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm."),
    (".mid.attn_1.q.", ".mid_block.attentions.0.to_q."),
    (".mid.attn_1.k.", ".mid_block.attentions.0.to_k."),
    (".mid.attn_1.v.", ".mid_block.attentions.0.to_v."),
    (".mid.attn_1.proj_out.", ".mid_block.attentions.0.to_out.0."),
    (".norm_out.", ".conv_norm_out."),
    (".nin_shortcut.", ".conv_shortcut."),
    (".block.", ".resnets."),
    (".downsample.", ".downsamplers.0."),
    (".upsample.", ".upsamplers.0."),
]
ATTN_WEIGHTS = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")


def _n_levels(keys, pattern: str) -> int:
    return 1 + max((int(m.group(1)) for k in keys if (m := re.match(pattern, k))), default=-1)


def from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL / AutoencoderKLFlux2 keys (or keys already in BFL's layout) -> BFL's `ae.safetensors` layout."""
    n = _n_levels(state_dict, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(post_)?quant_conv\.", lambda m: ("decoder." if m.group(1) else "encoder.") + m.group(0), key)
        for ours, theirs in RENAMES:
            key = key.replace(theirs, ours)
        key = re.sub(r"^encoder\.down_blocks\.(\d+)\.", r"encoder.down.\1.", key)
        key = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.", key)
        out[key] = rearrange(value, "o i -> o i 1 1") if ATTN_WEIGHTS.search(key) and value.ndim == 2 else value
    return out


def to_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """BFL's `ae.safetensors` layout -> diffusers AutoencoderKL / AutoencoderKLFlux2 keys."""
    n = _n_levels(state_dict, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(encoder\.quant_conv|decoder\.post_quant_conv)\.", lambda m: m.group(0).split(".", 1)[1], key)
        if ATTN_WEIGHTS.search(key):
            value = rearrange(value, "o i 1 1 -> o i")
        key = re.sub(r"^encoder\.down\.(\d+)\.", r"encoder.down_blocks.\1.", key)
        key = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up_blocks.{n - 1 - int(m.group(1))}.", key)
        for ours, theirs in RENAMES:
            key = key.replace(ours, theirs)
        out[key] = value
    return out


def preset_of(state_dict: dict[str, Tensor]) -> AutoencoderConfig:
    """The FLUX.2 autoencoder's config for a BFL-layout state dict with batch-norm statistics, else FLUX.1's."""
    return PRESETS["flux2" if "bn.running_mean" in state_dict else "flux"]


# How to build the model a checkpoint holds (weights.load_model / check_model).
CHECKPOINTS = dict(build=Autoencoder, convert=from_diffusers, to_diffusers=to_diffusers, parse_config=AutoencoderConfig.from_diffusers,
                   infer_config=preset_of)


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                     cfg: AutoencoderConfig | None = None) -> Autoencoder:
    """Load from BFL's `ae.safetensors` (FLUX.1's or FLUX.2's) or a diffusers `vae/` folder (config.json + safetensors)."""
    return load_model(path, **CHECKPOINTS, cfg=cfg, device=device, dtype=dtype)


def check_autoencoder(path: str | Path, cfg: AutoencoderConfig | None = None) -> AutoencoderConfig:
    """What load_autoencoder checks before it reads a tensor (config, keys, shapes, from the header); the config it would use."""
    return check_model(path, **CHECKPOINTS, cfg=cfg)


def save_autoencoder(vae: Autoencoder, folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write `vae` as a diffusers `vae/` folder (AutoencoderKL config.json + weights in `dtype`)."""
    return save_model_folder(folder, to_diffusers(vae.state_dict()), vae.cfg.to_diffusers(), dtype)
