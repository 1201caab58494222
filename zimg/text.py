"""Z-Image's prompt encoder: Qwen3 (4B), called as diffusers' ZImagePipeline calls it.

The prompt is wrapped in Qwen3's chat template as one user turn followed by the assistant prompt
(thinking enabled, i.e. no empty <think></think> block), padded to `max_length` tokens; the features
are the hidden states of the second-to-last layer, and the mask says which tokens are real (the
transformer keeps only those). The model loads from a snapshot's `text_encoder/` and `tokenizer/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zflux.common.text import as_list, load_text_model, load_tokenizer, warn_if_cut

if TYPE_CHECKING:  # transformers loads with the model (common/text.py says why)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class Qwen3PromptEncoder:
    """Z-Image's text conditioning: Qwen3 hidden states (second-to-last layer) after the chat template."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, text_encoder: str | Path, tokenizer: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "Qwen3PromptEncoder":
        """Load from a Qwen3 model folder (config.json + safetensors) and a tokenizer folder."""
        return cls(load_text_model("Qwen3Model", text_encoder, model_types=("qwen3",), device=device, dtype=dtype), load_tokenizer(tokenizer))

    @classmethod
    def from_snapshot(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> "Qwen3PromptEncoder":
        """Load from a diffusers Z-Image snapshot folder (`text_encoder/`, `tokenizer/`)."""
        path = Path(path)
        return cls.from_pretrained(path / "text_encoder", path / "tokenizer", device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: torch.device | str) -> "Qwen3PromptEncoder":
        """Move the model (for CPU offload between prompt encoding and denoising)."""
        self.model.to(device)
        return self

    def template(self, prompt: str) -> str:
        """The prompt as Qwen3 sees it: one user turn and the opening of the assistant's answer."""
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=True)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """Features (B, max_length, hidden) in the model's dtype and mask (B, max_length) bool, True = real token."""
        prompts = as_list(prompts)
        texts = [self.template(p) for p in prompts]
        warn_if_cut(self.tokenizer, texts, prompts, max_length, encoder="Qwen3")
        tokens = self.tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)  # (B, L)
        mask = tokens.attention_mask.to(self.device).bool()  # (B, L)
        hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return hidden[-2], mask  # (B, L, hidden), (B, L)
