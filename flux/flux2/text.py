"""FLUX.2's prompt encoder: stacked intermediate hidden states of an LLM, called as diffusers' pipelines call it.

- [klein] reads Qwen3 (4B: Qwen3-4B, 9B: Qwen3-8B). Each prompt is one user turn in Qwen3's chat
  template with the assistant prompt opened and thinking switched off (an empty think block), no
  system message.
- [dev] reads Mistral Small 3.x (24B). Each prompt is a user turn after BFL's system message
  (`SYSTEM_MESSAGE`), `[IMG]` markers removed, no generation prompt.

Either way the text is padded (or cut) to exactly 512 tokens; the LLM sees the attention mask,
but the transformer later gets all 512 rows unmasked. The features are the hidden states after
three layers, (9, 18, 27) for Qwen3 and (10, 20, 30) for Mistral (index 0 = the embeddings),
concatenated per token: (B, 512, 3 x hidden).

Models and tokenizers load with `transformers` from a snapshot's `text_encoder/` and `tokenizer/`
folders. Only the language model runs (Qwen3Model, Mistral3Model), and only up to the last layer read:
no logits, no later layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor

from zflux.common.text import load_text_model, load_tokenizer
from zflux.common.weights import CheckpointError

if TYPE_CHECKING:  # transformers loads with the model (common/text.py says why)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MAX_LENGTH = 512  # text tokens, always (FLUX.2 was trained on padded 512-token sequences)
# BFL's system message for [dev] (flux2 system_messages.py; diffusers' SYSTEM_MESSAGE), line break included.
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on object "
                  "relationships, object\nattribution and actions without speculation.")


@dataclass(frozen=True)
class TextModel:
    """What tells the two LLMs apart: the stacked layers and [dev]'s system turn."""

    layers: tuple[int, ...]
    system_message: str | None


TEXT_MODELS = {  # config.json model_type -> how FLUX.2 reads that model
    "qwen3": TextModel(layers=(9, 18, 27), system_message=None),
    "mistral3": TextModel(layers=(10, 20, 30), system_message=SYSTEM_MESSAGE),
}


class Flux2PromptEncoder:
    """Qwen3 ([klein]) or Mistral Small 3 ([dev]) text features for the FLUX.2 transformer."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        if model.config.model_type not in TEXT_MODELS:
            raise CheckpointError(f"FLUX.2 reads Qwen3 or Mistral 3 text features, not a {model.config.model_type!r} model")
        if tokenizer.chat_template is None:
            raise CheckpointError("the tokenizer has no chat template (a FLUX.2 snapshot's tokenizer/ folder brings one)")
        self.model, self.tokenizer = model, tokenizer
        self.kind = TEXT_MODELS[model.config.model_type]
        # The layers after the last one read change none of the features: drop them (Mistral 9 of 40, Qwen3 8 of 36).
        # One past it stays, because the model applies its final norm to the last hidden state it returns.
        language_model = getattr(model, "language_model", model)  # Mistral3Model wraps its MistralModel
        keep = max(self.kind.layers) + 1
        del language_model.layers[keep:]
        language_model.config.num_hidden_layers = min(language_model.config.num_hidden_layers, keep)

    @classmethod
    def from_pretrained(cls, text_encoder: str | Path, tokenizer: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "Flux2PromptEncoder":
        """Load from a Qwen3 or Mistral 3 model folder (config.json + safetensors) and a tokenizer folder."""
        # AutoModel builds the bare language model (Qwen3Model, Mistral3Model) from the checkpoints' *ForCausalLM /
        # *ForConditionalGeneration weights: no logits head. It reaches `device` once the unread layers are dropped
        # (Mistral: 9 of 40 layers, ~10 GB in bf16, that would cross to the device for nothing).
        encoder = cls(load_text_model("AutoModel", text_encoder, tuple(TEXT_MODELS), "cpu", dtype), load_tokenizer(tokenizer))
        return encoder.to(device)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def width(self) -> int:
        """Features per token: 3 x the LLM's hidden size (the transformer's joint_attention_dim)."""
        return len(self.kind.layers) * self.model.config.get_text_config().hidden_size

    def to(self, device: torch.device | str) -> "Flux2PromptEncoder":
        """Move the model (for CPU offload between prompt encoding and denoising)."""
        self.model.to(device)
        return self

    def template(self, prompt: str) -> str:
        """The prompt as the LLM sees it, chat template applied."""
        if self.kind.system_message is None:  # Qwen3 (klein)
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, enable_thinking=False)
        turns = [("system", self.kind.system_message), ("user", prompt.replace("[IMG]", ""))]
        messages = [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in turns]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], max_length: int = MAX_LENGTH) -> Tensor:
        """Features (B, max_length, 3 x hidden) in the model's dtype."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode")
        # Mistral's template writes the BOS token itself; Qwen3's tokenizer adds none either way.
        tokens = self.tokenizer([self.template(p) for p in prompts], padding="max_length", max_length=max_length, truncation=True,
                                add_special_tokens=self.kind.system_message is None, return_tensors="pt")
        hidden = self.model(input_ids=tokens.input_ids.to(self.device), attention_mask=tokens.attention_mask.to(self.device),
                            output_hidden_states=True, use_cache=False).hidden_states
        stacked = torch.stack([hidden[k] for k in self.kind.layers], dim=1)  # (B, 3, L, hidden)
        return rearrange(stacked, "b n l d -> b l (n d)")  # (B, L, 3 * hidden)
