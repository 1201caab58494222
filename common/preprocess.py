"""Control-image preprocessors: what a structural-control model is conditioned on, made from an ordinary photo.

Canny edges as Black Forest Labs' reference code (`CannyImageEncoder`) and diffusers' documentation
(controlnet_aux's CannyDetector) compute them for FLUX.1 Canny: OpenCV's Canny detector with hysteresis
thresholds 50 and 200 on the 8-bit RGB image (the gradient of the strongest channel at each pixel), the
binary edge map repeated to three channels. Depth maps are taken as given: no depth model is bundled.
"""

import cv2
import numpy as np
from PIL import Image

CANNY_LOW, CANNY_HIGH = 50, 200  # hysteresis thresholds on the gradient magnitude of 8-bit pixels


def canny(image: Image.Image, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> Image.Image:
    """The Canny edge map of `image` as an RGB image: white (255) edges on black, the same in all three channels."""
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got low {low}, high {high}")
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)  # (H, W) uint8, 0 or 255
    return Image.fromarray(edges).convert("RGB")
