"""Prompt encoders: the `transformers` text models each family conditions on, called as diffusers calls them.

- Z-Image reads Qwen3 (4B). The prompt is wrapped in Qwen3's chat template as one user turn
  followed by the assistant prompt (thinking enabled, i.e. no empty <think></think> block), padded
  to `max_length` tokens; the features are the hidden states of the second-to-last layer, and the
  mask says which tokens are real (the transformer keeps only those).
- FLUX.1 reads T5-XXL and CLIP-L. T5 gives one 4096-wide vector per token, always for exactly
  `max_length` tokens (512 for dev, 256 for schnell): T5 attends to the padding, so the pad count
  changes the features and must match what the model was trained with. CLIP gives one pooled
  768-wide vector (its final-norm state at the end-of-text token) over 77 tokens.

The models are loaded with `transformers` from a diffusers snapshot's sub-folders (`text_encoder/`,
`tokenizer/`, and for FLUX.1 `text_encoder_2/`, `tokenizer_2/`) or from any folders given explicitly.
"""

from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, PreTrainedModel, PreTrainedTokenizerBase, Qwen3Model, T5EncoderModel

from zflux.common.weights import CheckpointError


def _folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no {what} folder at {path}")
    return path


def load_text_model(cls: type[PreTrainedModel], path: str | Path, model_types: tuple[str, ...],
                    device: torch.device | str, dtype: torch.dtype) -> PreTrainedModel:
    """Load a `transformers` model of class `cls` from a local folder, checking its config's model_type first."""
    path = _folder(path, f"{cls.__name__} text encoder")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json (a transformers model folder is needed)")
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in model_types:
        raise CheckpointError(f"{path} holds a {model_type!r} model; expected {' or '.join(map(repr, model_types))}")
    return cls.from_pretrained(path, dtype=dtype).to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder."""
    return AutoTokenizer.from_pretrained(_folder(path, "tokenizer"))


def _as_list(prompts: str | list[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    return prompts


class Qwen3PromptEncoder:
    """Z-Image's text conditioning: Qwen3 hidden states (second-to-last layer) after the chat template."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, text_encoder: str | Path, tokenizer: str | Path, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "Qwen3PromptEncoder":
        """Load from a Qwen3 model folder (config.json + safetensors) and a tokenizer folder."""
        return cls(load_text_model(Qwen3Model, text_encoder, ("qwen3",), device, dtype), load_tokenizer(tokenizer))

    @classmethod
    def from_snapshot(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> "Qwen3PromptEncoder":
        """Load from a diffusers Z-Image snapshot folder (`text_encoder/`, `tokenizer/`)."""
        path = Path(path)
        return cls.from_pretrained(path / "text_encoder", path / "tokenizer", device, dtype)

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

    def tokens(self, prompts: str | list[str], max_length: int = 512, padding: str = "max_length") -> tuple[Tensor, Tensor]:
        """Token ids (B, L) and mask (B, L) bool (True = real token) of the templated prompts, on the model's device.

        L is `max_length` with padding "max_length" (the pipelines), the longest prompt's with "longest" (training).
        """
        tokens = self.tokenizer([self.template(p) for p in _as_list(prompts)], padding=padding, max_length=max_length,
                                truncation=True, return_tensors="pt")
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device).bool()

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """Features (B, max_length, hidden) in the model's dtype and mask (B, max_length) bool, True = real token."""
        ids, mask = self.tokens(prompts, max_length)
        return qwen3_features(self.model, ids, mask), mask


def qwen3_features(model: PreTrainedModel, ids: Tensor, mask: Tensor) -> Tensor:
    """Z-Image's caption features: the hidden states of Qwen3's second-to-last layer (B, L, hidden), with gradients if enabled."""
    return model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]


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
        return cls(load_text_model(T5EncoderModel, t5, ("t5", "umt5"), device, dtype), load_tokenizer(t5_tokenizer),
                   load_text_model(CLIPTextModel, clip, ("clip_text_model", "clip"), device, dtype), load_tokenizer(clip_tokenizer))

    @classmethod
    def from_snapshot(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> "FluxPromptEncoder":
        """Load from a diffusers FLUX.1 snapshot folder (T5 in `text_encoder_2/`, `tokenizer_2/`; CLIP in `text_encoder/`, `tokenizer/`)."""
        path = Path(path)
        return cls.from_pretrained(path / "text_encoder_2", path / "tokenizer_2", path / "text_encoder", path / "tokenizer", device, dtype)

    @property
    def device(self) -> torch.device:
        return self.t5.device

    def to(self, device: torch.device | str) -> "FluxPromptEncoder":
        """Move both models (for CPU offload between prompt encoding and denoising)."""
        self.t5.to(device)
        self.clip.to(device)
        return self

    def _ids(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, device: torch.device) -> Tensor:
        tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        return tokens.input_ids.to(device)  # (B, max_length)

    def tokens(self, prompts: str | list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """T5 ids (B, max_length) and CLIP ids (B, 77), each on its model's device."""
        prompts = _as_list(prompts)
        # 77 for CLIP-L; capped by the position table in case a tokenizer config leaves model_max_length unset (huge)
        clip_length = min(self.clip_tokenizer.model_max_length, self.clip.config.max_position_embeddings)
        return (self._ids(self.t5_tokenizer, prompts, max_length, self.t5.device),
                self._ids(self.clip_tokenizer, prompts, clip_length, self.clip.device))

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """T5 features (B, max_length, 4096) and CLIP pooled (B, 768), each in its model's dtype."""
        return flux_features(self.t5, self.clip, *self.tokens(prompts, max_length))


def flux_features(t5: PreTrainedModel, clip: PreTrainedModel, t5_ids: Tensor, clip_ids: Tensor) -> tuple[Tensor, Tensor]:
    """FLUX.1's text conditioning from token ids: T5's last hidden states (B, L, D) and CLIP's pooled vector (B, D'),
    with gradients if enabled."""
    return t5(t5_ids).last_hidden_state, clip(clip_ids).pooler_output
