"""Z-Image Omni: the Z-Image transformer conditioned on images too (text to image and editing).

The same weights as zimg/model.py's transformer plus a third input, SigLIP2 image features, with its
own embedder (`siglip_embedder`), unmodulated refiner (`siglip_refiner`) and pad token. One sample's
sequence is

    [caption segments | images: condition 1..K, then the noisy target | SigLIP maps: 1..K, then pads]

each segment padded to a multiple of 32 on its own (captions and images with their pad tokens as in
plain mode, SigLIP with `siglip_pad_token`; the target's missing SigLIP map is 32 pad tokens). The
condition images are clean: every modulated layer (noise refiner, main layers) conditions each token
on one of two time embeddings, the sampler's time for the target's tokens and t = 1 ("clean") for a
condition's, chosen per token by its image's noise bit; caption segment j takes image j's bit (1 past
the last image), SigLIP map j image j's.

Positions, as diffusers' ZImageTransformer2DModel assigns them (quirks included, since the weights
were trained with them): a running text position p starts at 1; caption segment j covers p, p+1, ...,
then p advances by its real length L_j to `end_j` and by 2 more (one slot for image j, one for its
SigLIP map). Image j sits at (end_j, row, col); SigLIP map j at end_j + 1 with its (row, col) stretched
onto the image's latent grid: int(row / max(h - 1, 1) * (H_latent - 1)) in fp32 (H_latent, the latent
height before 2x2 patching, so SigLIP can reach past the image tokens' rows). Pads sit at (0, 0, 0).
Caption quirk: each segment's position list is its padded length of running positions followed by
as many (0, 0, 0) rows as it has pads, and the caption tokens read that concatenated list by index,
so with several segments the later ones read positions shifted by the earlier segments' pad counts.
SigLIP quirk: an (h, w, C) map becomes h*w tokens by a reshape of its (C, h, w) permutation, i.e. the
channel-major buffer cut into rows of C values, not the (h*w, C) transpose.

Z-Image-Edit is not published; were its checkpoint of this layout (it is "fine-tuned on Z-Image for
editing"), it would load here unchanged. Nothing else about it is assumed.
"""

from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from zflux.common import ops
from zflux.common.ops import RMSNorm
from zflux.common.rope import rope_tables
from zflux.zimg.model import SEQ_MULTIPLE, TokenTimes, ZImageConfig, ZImageTransformer, round_up

TEXT_START = 1  # first text position, as in plain mode


class Layout(NamedTuple):
    """One sample's token positions (S_group, 3) and noise bits (S_group,) per token group."""

    cap_ids: Tensor
    img_ids: Tensor
    sig_ids: Tensor | None
    cap_bits: Tensor
    img_bits: Tensor
    sig_bits: Tensor | None


def caption_ids(lens: list[int]) -> tuple[Tensor, list[int]]:
    """Position rows (sum of padded lengths, 3) read by one sample's caption tokens, and each segment's end position."""
    rows, ends, p = [], [], TEXT_START
    for n in lens:
        pads = round_up(n) - n
        # the padded length of running positions, then a zero row per pad
        rows += [torch.arange(p, p + n + pads), torch.zeros(pads, dtype=torch.long)]
        p += n
        ends.append(p)
        p += 2  # one slot for the segment's image, one for its SigLIP map
    first = torch.cat(rows)[: sum(round_up(n) for n in lens)]  # token i reads row i of the concatenation (the quirk)
    return torch.stack([first, torch.zeros_like(first), torch.zeros_like(first)], dim=-1), ends  # (Lc, 3)


def grid_ids(first: int, h: int, w: int, stretch_to: tuple[int, int] | None = None) -> Tensor:
    """Positions (round_up(h*w), 3) of an h x w token grid at `first` on axis 0, pads at (0, 0, 0).

    `stretch_to` (H, W) maps row i to int(i / max(h - 1, 1) * (H - 1)) in fp32 (columns likewise), as SigLIP's are.
    """
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()  # (h*w,) each
    if stretch_to is not None:
        rows = (rows.float() / max(h - 1, 1) * (stretch_to[0] - 1)).long()
        cols = (cols.float() / max(w - 1, 1) * (stretch_to[1] - 1)).long()
    ids = torch.stack([torch.full_like(rows, first), rows, cols], dim=-1)  # (h*w, 3)
    return torch.cat([ids, ids.new_zeros(round_up(h * w) - h * w, 3)])  # (round_up(h*w), 3)


def sample_layout(cap_lens: list[int], grids: list[tuple[int, int]], sig_grids: list[tuple[int, int]] | None) -> Layout:
    """Positions and noise bits of one sample: caption segments, images (token grids, the noisy target last), SigLIP maps."""
    bits = [0] * (len(grids) - 1) + [1]  # conditions are clean, the target noisy
    cap_ids, ends = caption_ids(cap_lens)
    cap_bits = torch.cat([torch.full((round_up(n),), bits[j] if j < len(bits) else 1) for j, n in enumerate(cap_lens)])
    img_ids = torch.cat([grid_ids(ends[j], h, w) for j, (h, w) in enumerate(grids)])
    img_bits = torch.cat([torch.full((round_up(h * w),), bit) for (h, w), bit in zip(grids, bits)])
    if sig_grids is None:
        return Layout(cap_ids, img_ids, None, cap_bits, img_bits, None)
    # SigLIP j is stretched onto image j's latent grid (twice its token grid); the target's map is 32 pads.
    sig_ids = [grid_ids(ends[j] + 1, h, w, stretch_to=(2 * grids[j][0], 2 * grids[j][1])) for j, (h, w) in enumerate(sig_grids)]
    sig_ids.append(torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.long))
    sig_bits = torch.cat([torch.full((ids.shape[0],), bit) for ids, bit in zip(sig_ids, bits)])
    return Layout(cap_ids, img_ids, torch.cat(sig_ids), cap_bits, img_bits, sig_bits)


def siglip_tokens(features: Tensor) -> Tensor:
    """An (h, w, C) SigLIP map -> (h*w, C) tokens, cut from its channel-major buffer as the trained model saw them."""
    h, w, C = features.shape
    return rearrange(features, "h w c -> c h w").reshape(h * w, C)  # not "(h w) c": the reference's reshape


def pad_to(tokens: Tensor, total: int) -> Tensor:
    """(S, ...) -> (total, ...) with zeros appended (batch padding, masked out of attention)."""
    return torch.cat([tokens, tokens.new_zeros(total - tokens.shape[0], *tokens.shape[1:])])


def stack_padded(rows: list[Tensor], device: torch.device) -> Tensor:
    """B tensors (S_b, ...) -> (B, max S_b, ...) on `device`, zero-padded at the end."""
    n = max(r.shape[0] for r in rows)
    return torch.stack([pad_to(r, n) for r in rows]).to(device)


class ZImageOmniTransformer(ZImageTransformer):
    """Z-Image Omni: target latents, time, caption segments, condition latents and SigLIP maps -> the target's prediction."""

    def __init__(self, cfg: ZImageConfig, backend: str | None = None):
        if not cfg.is_omni:
            raise ValueError("an Omni transformer needs siglip_feat_dim (the SigLIP2 feature width)")
        super().__init__(cfg, backend)
        self.siglip_embedder = nn.Sequential(RMSNorm(cfg.siglip_feat_dim, cfg.norm_eps), nn.Linear(cfg.siglip_feat_dim, cfg.dim))
        self.siglip_refiner = nn.ModuleList(self._block(modulated=False) for _ in range(cfg.n_refiner_layers))
        self.siglip_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))

    def forward(self, x: Tensor, t: Tensor, captions: list[list[Tensor]], images: list[Tensor] = (),
                siglip: list[Tensor] | None = None) -> Tensor:
        """x (B, C, H, W) noisy target latents, t (B,) with 0 = pure noise -> (B, C, H, W).

        captions: per sample its segments (L_j, cap_feat_dim) of real tokens, at least one per image
        (the pipeline's template gives K + 2 for K condition images, 1 without); images: the K clean
        condition latents (C, H_k, W_k), siglip: their K SigLIP2 maps (h_k, w_k, siglip_feat_dim) or
        None (no SigLIP tokens: text to image); both shared by every sample of the batch.
        """
        self._check_omni(x, t, captions, images, siglip)
        with ops.use_backend(self.backend, fp8_attention=self.fp8_attention):
            return self._forward_omni(x, t, captions, list(images), siglip)

    def _segment(self, tokens: Tensor, embedder: nn.Module, pad_token: Tensor) -> Tensor:
        """(L, width) features -> (round_up(L), dim) embedded tokens followed by the pad token."""
        n = tokens.shape[0]
        return self._pad(embedder(tokens.to(self.dtype))[None], pad_token, n, round_up(n))[0]

    def _forward_omni(self, x: Tensor, t: Tensor, captions: list[list[Tensor]], images: list[Tensor],
                      siglip: list[Tensor] | None) -> Tensor:
        B, device, p = x.shape[0], x.device, self.cfg.patch_size
        noisy, clean = self.t_embedder(t, self.dtype), self.t_embedder(torch.ones_like(t), self.dtype)  # (B, A) each
        grids = [(lat.shape[-2] // p, lat.shape[-1] // p) for lat in [*images, x]]  # token grids, the target last
        sig_grids = None if siglip is None else [tuple(f.shape[:2]) for f in siglip]
        layouts = [sample_layout([seg.shape[0] for seg in segments], grids, sig_grids) for segments in captions]
        groups = ("cap", "img") if siglip is None else ("cap", "img", "sig")

        def rope(*names: str) -> tuple[Tensor, Tensor]:  # (B, S, D/2) cos, sin of the named token groups, in order
            ids = stack_padded([torch.cat([getattr(layout, f"{name}_ids") for name in names]) for layout in layouts], device)
            return rope_tables(ids, self.cfg.axes_dims, self.cfg.rope_theta, fp32_angles=True)

        def times(*names: str) -> TokenTimes:  # each token of the named groups on the noisy or the clean time
            bits = stack_padded([torch.cat([getattr(layout, f"{name}_bits") for name in names]) for layout in layouts], device)
            return TokenTimes(noisy, clean, bits.bool()[..., None])  # is_noisy (B, S, 1)

        # Images: the shared conditions, then each sample's target, each padded with the image pad token.
        conditions = [self.embed_image(self.patchify(image[None]), self.x_embedder) for image in images]  # (1, Ni_k, dim) each
        targets = self.embed_image(self.patchify(x), self.x_embedder)  # (B, Nt, dim)
        img = torch.cat([c.expand(B, -1, -1) for c in conditions] + [targets], dim=1)  # (B, Ni, dim)
        img_rope, img_times = rope("img"), times("img")  # at positions after each sample's own captions
        for block in self.noise_refiner:
            img = block(img, img_rope, None, img_times)

        cap = stack_padded([torch.cat([self._segment(seg, self.cap_embedder, self.cap_pad_token) for seg in segments])
                            for segments in captions], device)  # (B, Lc, dim)
        cap_lens = [layout.cap_ids.shape[0] for layout in layouts]
        cap_key_lens = torch.tensor(cap_lens, device=device) if min(cap_lens) < max(cap_lens) else None  # (B,)
        cap_rope = rope("cap")
        for block in self.context_refiner:
            cap = block(cap, cap_rope, cap_key_lens)
        parts = [[cap[b, : cap_lens[b]], img[b]] for b in range(B)]

        if siglip is not None:  # the maps are shared; their positions (after each sample's captions) are not
            maps = [self._segment(siglip_tokens(f), self.siglip_embedder, self.siglip_pad_token) for f in siglip]
            sig = torch.cat([*maps, self.siglip_pad_token.to(self.dtype).expand(SEQ_MULTIPLE, -1)]).expand(B, -1, -1)  # (B, Ns, dim)
            sig_rope = rope("sig")
            for block in self.siglip_refiner:
                sig = block(sig, sig_rope, None)
            for b in range(B):
                parts[b].append(sig[b])

        seq = stack_padded([torch.cat(sample) for sample in parts], device)  # (B, S, dim): [captions, images, SigLIP]
        lens = [sum(part.shape[0] for part in sample) for sample in parts]
        key_lens = torch.tensor(lens, device=device) if min(lens) < max(lens) else None  # (B,)
        seq_rope, seq_times = rope(*groups), times(*groups)
        for block in self.layers:
            seq = block(seq, seq_rope, key_lens, seq_times)

        h, w = grids[-1]
        start = img.shape[1] - round_up(h * w)  # the target is the last image
        target = torch.stack([seq[b, cap_lens[b] + start: cap_lens[b] + start + h * w] for b in range(B)])  # (B, h*w, dim)
        return self.unpatchify(self.final_layer(target, noisy), x)  # (B, C, H, W): the target's tokens are all noisy

    def _check_omni(self, x: Tensor, t: Tensor, captions: list[list[Tensor]], images: list[Tensor],
                    siglip: list[Tensor] | None) -> None:
        """Validate the inputs at the boundary, with one line naming what is wrong."""
        cfg, p = self.cfg, self.cfg.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"x must be latents (B, {cfg.in_channels}, H, W) with H, W multiples of {p}, got {tuple(x.shape)}")
        B = x.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        for k, image in enumerate(images):
            if image.ndim != 3 or image.shape[0] != cfg.in_channels or image.shape[1] % p or image.shape[2] % p:
                raise ValueError(f"condition image {k} must be latents ({cfg.in_channels}, H, W) with H, W multiples of {p}, "
                                 f"got {tuple(image.shape)}")
        if len(captions) != B:
            raise ValueError(f"captions must hold one list of segments per sample ({B}), got {len(captions)}")
        for segments in captions:
            if len(segments) < len(images) + 1:
                raise ValueError(f"{len(images)} condition images need at least {len(images) + 1} caption segments, "
                                 f"got {len(segments)}")
            for seg in segments:
                if seg.ndim != 2 or seg.shape[0] == 0 or seg.shape[1] != cfg.cap_feat_dim:
                    raise ValueError(f"caption segments must be (L >= 1, {cfg.cap_feat_dim}), got {tuple(seg.shape)}")
        if siglip is not None:
            if len(siglip) != len(images):
                raise ValueError(f"siglip must hold one map per condition image ({len(images)}), got {len(siglip)}")
            for f in siglip:
                if f.ndim != 3 or f.shape[2] != cfg.siglip_feat_dim:
                    raise ValueError(f"SigLIP maps must be (h, w, {cfg.siglip_feat_dim}), got {tuple(f.shape)}")
        text = max(sum(round_up(seg.shape[0]) + 2 for seg in segments) for segments in captions) + TEXT_START
        sizes = [x.shape[2:], *(image.shape[1:] for image in images)]
        for what, pos, limit in (("text + images (axis 0)", text, cfg.axes_lens[0]),
                                 ("latent height (axis 1)", max(s[0] for s in sizes) - 1, cfg.axes_lens[1]),
                                 ("latent width (axis 2)", max(s[1] for s in sizes) - 1, cfg.axes_lens[2])):
            if pos >= limit:
                raise ValueError(f"RoPE position {pos} for the {what} is out of range: axes_lens allows < {limit}")
