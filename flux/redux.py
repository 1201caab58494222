"""FLUX.1 Redux: a reference image as extra prompt tokens for the unchanged FLUX.1 dev (or schnell) transformer.

SigLIP so400m (patch 14 at 384x384, `transformers`' SiglipVisionModel) turns the image into 27 x 27 = 729
feature vectors of width 1152 (its last hidden state). The Redux projector, an MLP `redux_up`
Linear(1152, 3 * 4096) -> SiLU -> `redux_down` Linear(3 * 4096, 4096), maps each into T5's 4096-wide
space, and the 729 tokens are appended after the prompt's T5 tokens. Nothing else changes: their
text position ids are zeros like every text token's.

Black Forest Labs' `flux1-redux-dev.safetensors` and diffusers' `image_embedder/` (ReduxImageEncoder)
hold the same four tensors under the same names, so one layout loads both.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from zflux.common.identify import read_header
from zflux.common.text import load_text_model
from zflux.common.weights import CheckpointError, config_from_dict, load_model

if TYPE_CHECKING:  # transformers is imported where SigLIP loads (its processor's import warns that torchvision is missing)
    from transformers import SiglipImageProcessor, SiglipVisionModel

UP_FACTOR = 3  # redux_up widens to 3x the T5 width


@dataclass(frozen=True)
class ReduxConfig:
    """Projector shape; field names as in diffusers' ReduxImageEncoder config.json."""

    redux_dim: int = 1152  # SigLIP so400m's hidden size
    txt_in_features: int = 4096  # T5-XXL's, what FLUX.1's txt_in reads

    @classmethod
    def from_diffusers(cls, config: dict) -> "ReduxConfig":
        """Build from a diffusers image_embedder/config.json dict."""
        return config_from_dict(cls, config)


class ReduxProjector(nn.Module):
    """SigLIP features (B, N, redux_dim) -> T5-space tokens (B, N, txt_in_features)."""

    def __init__(self, cfg: ReduxConfig = ReduxConfig()):
        super().__init__()
        self.cfg = cfg
        self.redux_up = nn.Linear(cfg.redux_dim, UP_FACTOR * cfg.txt_in_features)
        self.redux_down = nn.Linear(UP_FACTOR * cfg.txt_in_features, cfg.txt_in_features)

    def forward(self, features: Tensor) -> Tensor:
        return self.redux_down(F.silu(self.redux_up(features)))


def config_from_state_dict(state_dict: dict[str, Tensor]) -> ReduxConfig:
    """The ReduxConfig a projector checkpoint was made for, read off redux_up's shape."""
    hidden, redux_dim = state_dict["redux_up.weight"].shape
    return ReduxConfig(redux_dim=redux_dim, txt_in_features=hidden // UP_FACTOR)


def load_projector(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> ReduxProjector:
    """Load the projector from BFL's `flux1-redux-dev.safetensors`, a diffusers `image_embedder/` folder, or a
    FluxPriorReduxPipeline snapshot folder (its `image_embedder/`)."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / "image_embedder"
    if "redux_up.weight" not in read_header(path):  # before a config.json beside it is read, or any weight
        raise CheckpointError(f"{path} is not a FLUX.1 Redux projector: it has no redux_up.weight")
    return load_model(path, ReduxProjector, dict, parse_config=ReduxConfig.from_diffusers, infer_config=config_from_state_dict,
                      device=device, dtype=dtype)


def siglip_folders(path: str | Path) -> tuple[Path, Path]:
    """(model folder, image-processor folder) of a SigLIP checkpoint.

    The processor's preprocessor_config.json sits in the model folder (google/siglip-so400m-patch14-384),
    or beside it in `feature_extractor/` as a diffusers snapshot lays it out (FLUX.1-Redux-dev's
    `image_encoder/`); a FluxPriorReduxPipeline snapshot folder itself stands for its `image_encoder/`.
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / "image_encoder"
    if not path.is_dir():
        raise CheckpointError(f"no SigLIP folder at {path}: pass the SigLIP model folder (siglip=, --siglip), "
                              "e.g. google/siglip-so400m-patch14-384")
    for processor in (path, path.parent / "feature_extractor"):
        if (processor / "preprocessor_config.json").is_file():
            return path, processor
    raise CheckpointError(f"no SigLIP image-processor config (preprocessor_config.json) in {path} or {path.parent / 'feature_extractor'}")


class ReduxImageEncoder:
    """Images -> Redux tokens: SigLIP's image processor and vision tower (from `transformers`), then the projector."""

    def __init__(self, siglip: "SiglipVisionModel", processor: "SiglipImageProcessor", projector: ReduxProjector):
        if siglip.config.hidden_size != projector.cfg.redux_dim:
            raise CheckpointError(f"the SigLIP model gives {siglip.config.hidden_size}-wide features; the Redux projector "
                                  f"reads {projector.cfg.redux_dim}")
        self.siglip, self.processor, self.projector = siglip, processor, projector

    @classmethod
    def from_pretrained(cls, redux: str | Path, siglip: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.bfloat16) -> "ReduxImageEncoder":
        """Load the projector (see load_projector) and SigLIP (see siglip_folders) onto `device` in `dtype`."""
        from transformers import SiglipImageProcessor

        model, processor = siglip_folders(siglip)
        return cls(load_text_model("SiglipVisionModel", model, ("siglip", "siglip_vision_model"), device, dtype),
                   SiglipImageProcessor.from_pretrained(processor), load_projector(redux, device, dtype))

    @property
    def device(self) -> torch.device:
        return self.siglip.device

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> Tensor:
        """(n, N, txt_in_features) tokens for n images, N = SigLIP's patch count (729 for so400m at 384x384)."""
        pixels = self.processor.preprocess(images=images, do_resize=True, return_tensors="pt", do_convert_rgb=True).pixel_values
        features = self.siglip(pixel_values=pixels.to(self.device, self.siglip.dtype)).last_hidden_state  # (n, N, redux_dim)
        return self.projector(features)  # (n, N, txt_in_features)


def redux_conditioning(features: Tensor, pooled: Tensor, tokens: Tensor, prompt_scale: float = 1.0,
                       pooled_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """The prompt's T5 features (1, L, D) and pooled CLIP vector (1, P) with n images' Redux tokens (n, N, D) appended.

    As diffusers' FluxPriorReduxPipeline combines them: every image contributes prompt_scale * [prompt
    tokens; its own tokens] and pooled_scale * pooled, summed over the images, so one image gives
    [T5; Redux] * prompt_scale and n images repeat the prompt's share n times. Returns (1, L + N, D), (1, P).
    """
    n = tokens.shape[0]
    txt = torch.cat([features.expand(n, -1, -1), tokens.to(features.dtype)], dim=1)  # (n, L + N, D)
    txt = txt * torch.tensor(prompt_scale, dtype=txt.dtype, device=txt.device)
    vec = pooled.expand(n, -1) * torch.tensor(pooled_scale, dtype=pooled.dtype, device=pooled.device)  # (n, P)
    return txt.sum(dim=0, keepdim=True), vec.sum(dim=0, keepdim=True)
