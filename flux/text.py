"""FLUX.1's prompt encoder: T5-XXL and CLIP-L, called as diffusers' FluxPipeline calls them.

T5 gives one 4096-wide vector per token, always for exactly `max_length` tokens (512 for dev, 256
for schnell): T5 attends to the padding, so the pad count changes the features and must match what
the model was trained with. CLIP gives one pooled 768-wide vector (its final-norm state at the
end-of-text token) over 77 tokens. The models load from a snapshot's `text_encoder_2/` and
`tokenizer_2/` (T5) and `text_encoder/` and `tokenizer/` (CLIP).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zflux.common.text import as_list, load_text_model, load_tokenizer, warn_if_cut

if TYPE_CHECKING:  # transformers loads with the models (common/text.py says why)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class FluxPromptEncoder:
    """FLUX.1's text conditioning: the T5 token sequence and the pooled CLIP vector."""

    def __init__(self, t5: PreTrainedModel, t5_tokenizer: PreTrainedTokenizerBase, clip: PreTrainedModel,
                 clip_tokenizer: PreTrainedTokenizerBase):
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.clip, self.clip_tokenizer = clip, clip_tokenizer

    @classmethod
    def from_pretrained(cls, t5: str | Path, t5_tokenizer: str | Path, clip: str | Path, clip_tokenizer: str | Path,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> "FluxPromptEncoder":
        """Load from T5 encoder, T5 tokenizer, CLIP text model and CLIP tokenizer folders."""
        return cls(t5=load_text_model("T5EncoderModel", t5, model_types=("t5", "umt5"), device=device, dtype=dtype),
                   t5_tokenizer=load_tokenizer(t5_tokenizer),
                   clip=load_text_model("CLIPTextModel", clip, model_types=("clip_text_model", "clip"), device=device, dtype=dtype),
                   clip_tokenizer=load_tokenizer(clip_tokenizer))

    @classmethod
    def from_snapshot(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> "FluxPromptEncoder":
        """Load from a diffusers FLUX.1 snapshot folder (T5 in `text_encoder_2/`, `tokenizer_2/`; CLIP in `text_encoder/`, `tokenizer/`)."""
        path = Path(path)
        return cls.from_pretrained(t5=path / "text_encoder_2", t5_tokenizer=path / "tokenizer_2", clip=path / "text_encoder",
                                   clip_tokenizer=path / "tokenizer", device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.t5.device

    def to(self, device: torch.device | str) -> "FluxPromptEncoder":
        """Move both models (for CPU offload between prompt encoding and denoising)."""
        self.t5.to(device)
        self.clip.to(device)
        return self

    def _ids(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, device: torch.device,
             encoder: str) -> Tensor:
        warn_if_cut(tokenizer, prompts, max_length, encoder)
        tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return tokens.input_ids.to(device)  # (B, max_length)

    def tokens(self, prompts: str | list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """T5 ids (B, max_length) and CLIP ids (B, 77), each on its model's device."""
        prompts = as_list(prompts)
        # 77 for CLIP-L; capped by the position table in case a tokenizer config leaves model_max_length unset (huge)
        clip_length = min(self.clip_tokenizer.model_max_length, self.clip.config.max_position_embeddings)
        return (self._ids(self.t5_tokenizer, prompts, max_length=max_length, device=self.t5.device, encoder="T5"),
                self._ids(self.clip_tokenizer, prompts, max_length=clip_length, device=self.clip.device, encoder="CLIP"))

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """T5 features (B, max_length, 4096) and CLIP pooled (B, 768), each in its model's dtype."""
        return flux_features(self.t5, self.clip, *self.tokens(prompts, max_length))


def flux_features(t5: PreTrainedModel, clip: PreTrainedModel, t5_ids: Tensor, clip_ids: Tensor) -> tuple[Tensor, Tensor]:
    """FLUX.1's text conditioning from token ids: T5's last hidden states (B, L, 4096) and CLIP's pooled vector (B, 768),
    with gradients if enabled."""
    return t5(t5_ids).last_hidden_state, clip(clip_ids).pooler_output
