"""Z-Image's prompt encoder: Qwen3 (4B), called as diffusers' ZImagePipeline calls it.

The prompt is wrapped in Qwen3's chat template as one user turn followed by the assistant prompt
(thinking enabled, i.e. no empty <think></think> block), cut to `max_length` tokens; the features
are the hidden states of the second-to-last layer, and the mask says which tokens are real (the
transformer keeps only those). The model loads from a snapshot's `text_encoder/` and `tokenizer/`.

diffusers pads every prompt to `max_length` (512) tokens before Qwen3 reads it, then keeps the real
tokens. Qwen3 is causal and the pads sit on the right, after every real token, so no real token
sees them: Qwen3 here reads only the positions some prompt uses (the longest prompt's length L'),
with no padding mask at all (the causal mask alone), and the features and mask come back (B, L', ...).
The real tokens' features are diffusers' up to rounding (other GEMM shapes): ~1e-7 relative in fp32.
With `cuda_graphs` on (the pipelines turn it on where the model stays on a GPU) the forward replays
a CUDA graph (common/graphs.py), one per batch size and length rounded up to a multiple of
GRAPH_LENGTH: Qwen3-4B over ~170 tokens is ~1.2 TFLOP, a few ms of GEMMs, and launching its
kernels one by one from Python takes longer than running them.

Z-Image Omni (ZImageOmniPipeline) writes its own chat strings instead, one caption segment per
condition image plus two, each encoded on its own (no chat template, no think tags); segment j
precedes image j in the Omni sequence, the last follows the generated image:

    0 images:  "<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n"
    K > 0:     "<|im_start|>user\\n<|vision_start|>", then K - 1 times "<|vision_end|><|vision_start|>", then
               "<|vision_end|>{prompt}<|im_end|>\\n<|im_start|>assistant\\n<|vision_start|>", then "<|vision_end|><|im_end|>"
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from zflux.common.graphs import forward_of
from zflux.common.text import as_list, load_text_model, load_tokenizer, warn_if_cut
from zflux.common.weights import CheckpointError

if TYPE_CHECKING:  # transformers loads with the model (common/text.py says why)
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


GRAPH_LENGTH = 64  # token positions: an encode pads its batch to a multiple of this, one CUDA graph per multiple
# The causal mask alone, in the prepared form Qwen3Model takes (as generate() passes it): a padding mask would make
# transformers build the mask from its values, reading them on the host, which a CUDA graph cannot hold.
CAUSAL_ONLY = {"full_attention": None}
# Attention implementations that apply causality themselves when given no mask ("eager" attends everywhere then).
CAUSAL_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def qwen3_features(model: PreTrainedModel, ids: Tensor) -> Tensor:
    """Z-Image's caption features of right-padded token ids (B, L): the hidden states of Qwen3's second-to-last layer
    (B, L, hidden), with gradients if enabled. The pads' own rows are not the masked model's (nothing reads them)."""
    return model(input_ids=ids, attention_mask=CAUSAL_ONLY, output_hidden_states=True, use_cache=False).hidden_states[-2]


class Qwen3Features(nn.Module):
    """Qwen3's second-to-last hidden states (B, L, hidden) of right-padded token ids (B, L): one module, for CUDA graphs."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return qwen3_features(self.model, ids)


def graph_length(length: int) -> int:
    """The length an encode runs at: `length` rounded up to a multiple of GRAPH_LENGTH (the pads change no real token)."""
    return -(-length // GRAPH_LENGTH) * GRAPH_LENGTH


class Qwen3PromptEncoder:
    """Z-Image's text conditioning: Qwen3 hidden states (second-to-last layer) after the chat template."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        if any(kind != "full_attention" for kind in model.config.layer_types):
            raise CheckpointError("Z-Image's Qwen3 attends causally over the whole prompt: this one has sliding-window layers")
        if model.config._attn_implementation not in CAUSAL_ATTENTION:
            raise CheckpointError(f"Qwen3's attention must be one of {', '.join(CAUSAL_ATTENTION)} (they mask causally "
                                  f"without a mask), not {model.config._attn_implementation!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.features = Qwen3Features(model)
        self.cuda_graphs = False  # replay the forward as CUDA graphs (the pipelines turn it on where the weights stay put)

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

    def __call__(self, prompts: str | list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """Features (B, L', hidden) in the model's dtype and mask (B, L') bool, True = real token; L' <= max_length
        is the longest prompt's length in tokens."""
        return self.encode([self.template(p) for p in as_list(prompts)], max_length)

    def tokens(self, texts: list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """Token ids (B, L') and mask (B, L') bool (True = real token) of texts in their final form, on the model's device.

        Each text is cut to `max_length` tokens and padded to the longest one's length L'. The pads go on the right
        whatever the tokenizer was saved with (Qwen3's pads there), after every real token: no real token sees them.
        """
        tokens = self.tokenizer(texts, padding="longest", max_length=max_length, truncation=True, padding_side="right",
                                return_tensors="pt")
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device).bool()  # (B, L') each

    @torch.no_grad()
    def encode(self, texts: list[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        """__call__ for texts already in their final form (Omni writes its own chat strings, zimg/reference.py)."""
        warn_if_cut(self.tokenizer, texts, max_length, encoder="Qwen3")
        ids, mask = self.tokens(texts, max_length)  # (B, L') each
        length = ids.shape[1]
        # Graphed or not, the forward runs at the bucket's length: the same GEMM shapes, so the same features to the
        # bit whether graphs are on, the encoder offloaded (graphs off) or resident.
        padded = F.pad(ids, (0, graph_length(length) - length), value=self.tokenizer.pad_token_id)  # (B, graph_length(L'))
        return forward_of(self.features, self.cuda_graphs)(padded)[:, :length], mask  # CPU tensors: eager (graphs.py)


def omni_segments(prompt: str, images: int) -> list[str]:
    """`prompt` as Z-Image Omni's caption segments for `images` condition images (see the module docstring)."""
    if images == 0:
        return [f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"]
    return (["<|im_start|>user\n<|vision_start|>"] + ["<|vision_end|><|vision_start|>"] * (images - 1)
            + [f"<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>", "<|vision_end|><|im_end|>"])


class OmniPromptEncoder:
    """Z-Image Omni's text conditioning: each prompt's segments (omni_segments), each segment's real-token features."""

    def __init__(self, encoder: Qwen3PromptEncoder, images: int):
        self.encoder, self.images = encoder, images

    def to(self, device: torch.device | str) -> "OmniPromptEncoder":
        """Move the Qwen3 model (for CPU offload between prompt encoding and denoising)."""
        self.encoder.to(device)
        return self

    def __call__(self, prompts: str | list[str], max_length: int = 512) -> list[list[Tensor]]:
        """Per prompt, its segments' features (L_j, hidden) in the model's dtype, real tokens only."""
        segments = [omni_segments(p, self.images) for p in as_list(prompts)]
        features, mask = self.encoder.encode([s for row in segments for s in row], max_length)  # (N, L, hidden), (N, L)
        real = [f[m] for f, m in zip(features, mask)]  # N x (L_j, hidden)
        n = len(segments[0])
        return [real[i * n: (i + 1) * n] for i in range(len(segments))]
