"""The Canny preprocessor: OpenCV's detector at FLUX.1 Canny's thresholds (50, 200) on 8-bit RGB, as BFL's
CannyImageEncoder runs it; the result is an RGB edge image, the same in all three channels."""

import numpy as np
import pytest
from PIL import Image

from zflux.common.images import CANNY_HIGH, CANNY_LOW, canny


def step_image(contrast: int, channel: int | None = None) -> Image.Image:
    """A 32 x 48 image with one vertical step of `contrast` gray levels (in one channel, or all) at column 24."""
    pixels = np.full((32, 48, 3), 60, dtype=np.uint8)
    pixels[:, 24:, slice(None) if channel is None else channel] += contrast
    return Image.fromarray(pixels)


def test_thresholds_are_bfls():
    assert (CANNY_LOW, CANNY_HIGH) == (50, 200)


def test_edges_of_a_strong_step():
    edges = canny(step_image(120))
    pixels = np.asarray(edges)
    assert edges.mode == "RGB" and edges.size == (48, 32)
    assert set(np.unique(pixels)) == {0, 255} and (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert set(np.nonzero(pixels[..., 0].any(axis=0))[0]) <= {23, 24}  # one line along the step


def test_weak_steps_give_no_edges():
    assert not np.asarray(canny(step_image(10))).any()


def test_a_step_in_one_channel_is_an_edge():
    """Color edges count: OpenCV takes the strongest channel's gradient (no conversion to gray first)."""
    assert np.asarray(canny(step_image(120, channel=2))).any()


def test_thresholds_matter():
    image = step_image(40)
    assert not np.asarray(canny(image)).any() and np.asarray(canny(image, low=10, high=20)).any()
    with pytest.raises(ValueError, match="thresholds"):
        canny(image, low=200, high=50)
