"""Images in and out of the pipelines: PIL images <-> (B, 3, H, W) tensors in [-1, 1], the autoencoder's range;
inpainting masks (pixels -> a binary tensor -> the latent grid; outpainting's grown canvas); the Canny edge
preprocessor for structural control.

The conversions are diffusers' VaeImageProcessor's (x / 2 + 0.5, clamped, times 255, rounded), so the
same decoded tensor gives the same pixels here and there.
"""

import io
from pathlib import Path

import cv2
import numpy as np
import torch
from einops import rearrange
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor
from torch.nn import functional as F

from zflux.common.files import atomic_write, check_writable

CANNY_LOW, CANNY_HIGH = 50, 200  # hysteresis thresholds on 8-bit gradients (BFL's and the control models' documentation)
MASK_THRESHOLD = 128  # a mask pixel at or above this 8-bit gray level repaints (diffusers binarizes at 0.5)
PARAMETERS = "parameters"  # the PNG text chunk holding the generation settings, which image tools read


def to_tensor(image: Image.Image) -> Tensor:
    """An image (any mode) -> (1, 3, H, W) fp32 in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)[None] / 255.0)  # (1, H, W, 3)
    # Left channels-last in memory, exactly as diffusers' image processor leaves it: convolutions take another
    # path on another layout and round differently (~1e-4 relative through a randomly initialised autoencoder).
    return rearrange(pixels, "b h w c -> b c h w") * 2 - 1  # (1, 3, H, W)


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in about [-1, 1] (any dtype or device) -> B RGB images."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    pixels = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(p) for p in rearrange(pixels, "b c h w -> b h w c").cpu().numpy()]


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no image file at {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"cannot read {path} as an image: {e}") from e


def open_image(image: Image.Image | str | Path | None) -> Image.Image | None:
    """`image` itself, or the image file at that path opened (load_image); None stays None."""
    return image if image is None or isinstance(image, Image.Image) else load_image(image)


def fit_image(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` resized to width x height (Lanczos, as diffusers' image processor), unchanged if it already fits."""
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def image_format(path: str | Path) -> str:
    """The Pillow format its suffix gives `path` (.png: "PNG"), checked to write an RGB image: ValueError if none does."""
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"{path} has no file extension (e.g. .png) to choose the image format")
    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)  # a missing plugin or a mode the format cannot hold fails here
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"cannot write an image as {path}: Pillow writes no RGB {path.suffix} file (use .png, .jpg or .webp)") from e
    return fmt


def check_image_path(path: str | Path) -> Path:
    """Raise ValueError unless an image can be written at `path`: a format Pillow writes, a folder that exists or can be made."""
    image_format(path)
    return check_writable(path)


def save_image(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Save `image` (format from the suffix, e.g. .png) whole or not at all, creating the folder; return the path.

    `parameters` (PNG only) is stored as the PARAMETERS text chunk.
    """
    fmt = image_format(path)
    options = {}
    if parameters is not None and fmt == "PNG":
        options["pnginfo"] = PngInfo()
        options["pnginfo"].add_text(PARAMETERS, parameters)
    with atomic_write(path) as tmp:
        image.save(tmp, format=fmt, **options)
    return Path(path)


def mask_tensor(mask: Image.Image, width: int, height: int) -> Tensor:
    """A mask image (any mode) -> (1, 1, height, width) fp32, 1 = repaint and 0 = keep, as diffusers' mask processor makes it:
    resized like an image (Lanczos), then its luminance binarized at 0.5."""
    gray = np.asarray(fit_image(mask, width, height).convert("L"))  # (H, W) uint8
    return torch.from_numpy(gray >= MASK_THRESHOLD).float()[None, None]  # (1, 1, H, W)


def mask_latents(mask: Tensor, height: int, width: int) -> Tensor:
    """A pixel mask (B, 1, H, W) -> the latent grid (B, 1, height, width), nearest neighbour (each block's top-left pixel)."""
    return F.interpolate(mask, size=(height, width), mode="nearest")  # (B, 1, h, w)


def check_mask(mask: Image.Image, image: Image.Image) -> None:
    """Refuse a mask whose size differs from its image's (resizing either would silently move the masked region)."""
    if mask.size != image.size:
        raise ValueError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: "
                         "they must have the same size")


OUTPAINT_FILL = (128, 128, 128)  # the new border's color: mid-gray, about 0 in the autoencoder's [-1, 1] range


def outpaint_canvas(image: Image.Image, borders: tuple[int, int, int, int],
                    mask: Image.Image | None = None) -> tuple[Image.Image, Image.Image]:
    """Grow `image` by (left, top, right, bottom) pixels of mid-gray; return it with its mask (new border white = repaint).

    A given `mask` (same size as the image) is kept inside the border, so inpainting and outpainting combine.
    """
    if len(borders) != 4 or any(not isinstance(b, int) or b < 0 for b in borders):
        raise ValueError(f"outpaint must be four non-negative pixel counts (left, top, right, bottom), got {borders}")
    if not any(borders):
        raise ValueError("outpaint (0, 0, 0, 0) adds no border: give at least one side a width")
    if mask is not None:
        check_mask(mask, image)
    left, top, right, bottom = borders
    size = (image.width + left + right, image.height + top + bottom)
    canvas = Image.new("RGB", size, OUTPAINT_FILL)
    canvas.paste(image.convert("RGB"), (left, top))
    canvas_mask = Image.new("L", size, 255)
    canvas_mask.paste(Image.new("L", image.size, 0) if mask is None else mask.convert("L"), (left, top))
    return canvas, canvas_mask


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """OpenCV's Canny edges of the 8-bit RGB image: white edges on black, as an RGB image of the same size."""
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got {low} and {high}")
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(edges).convert("RGB")


PREPROCESSORS = {"canny": canny}  # what may turn a photo into a control image first (depth maps are taken as given)
