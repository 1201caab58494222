"""Loading the `transformers` text models the families condition on, from local folders.

The models come from a diffusers snapshot's sub-folders (`text_encoder/`, `tokenizer/`, ...) or from
any folders given explicitly; each family's text.py wraps them into its prompt encoder, called as
diffusers calls it.

`transformers` is imported when a model or tokenizer loads, not with this module: its import takes
seconds, and `zflux generate` checks a whole request before it loads anything.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zflux.common.files import CheckpointError, safetensors_files

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def _folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no {what} folder at {path}")
    return path


def load_text_model(class_name: str, path: str | Path, model_types: tuple[str, ...],
                    device: torch.device | str, dtype: torch.dtype) -> PreTrainedModel:
    """Load the `transformers` model class `class_name` (e.g. "Qwen3Model") from a local folder, checking its config's model_type first."""
    path = _folder(path, f"{class_name} text encoder")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json (a transformers model folder is needed)")
    import transformers
    model_type = transformers.AutoConfig.from_pretrained(path).model_type
    if model_type not in model_types:
        raise CheckpointError(f"{path} holds a {model_type!r} model; expected {' or '.join(map(repr, model_types))}")
    safetensors_files(path)  # refuses a folder of pickles (pytorch_model.bin) with a line saying to convert it
    model = getattr(transformers, class_name).from_pretrained(path, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_folder(path, "tokenizer"))


def as_list(prompts: str | list[str]) -> list[str]:
    """One prompt or several as a non-empty list."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    return prompts


def warn_if_cut(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int, encoder: str) -> None:
    """Warn (warnings module) for each text the `encoder` will cut to `max_length` tokens, saying how many it drops."""
    for ids in tokenizer(texts, verbose=False).input_ids:
        if len(ids) > max_length:
            warnings.warn(f"{encoder} reads {max_length} tokens: the last {len(ids) - max_length} of a prompt's {len(ids)} "
                          "are dropped", stacklevel=3)
