"""Loading the `transformers` text models the families condition on, from local folders.

The models come from a diffusers snapshot's sub-folders (`text_encoder/`, `tokenizer/`, ...) or from
any folders given explicitly; each family's text.py wraps them into its prompt encoder, called as
diffusers calls it.
"""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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


def as_list(prompts: str | list[str]) -> list[str]:
    """One prompt or several as a non-empty list."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts to encode")
    return prompts
