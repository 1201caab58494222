"""The training data: the scene grammar (common/shapes.py), the seeded dataset and the caption tokenizer (common/data.py)."""

from collections import Counter

import numpy as np
import pytest
import torch

from zflux.common.data import SceneDataset, batches, byte_level_bpe, training_captions
from zflux.common.shapes import COLOURS, HELD_OUT, SHAPES, Scene, caption, draw, shape_centre

SIZE = 64


def test_captions_follow_the_grammar():
    assert caption(Scene("red", "circle", "blue")) == "a red circle on a blue background"
    assert caption(Scene("red", "circle", "blue"), "zh") == "蓝色背景上的一个红色圆形"
    scene = Scene("orange", "triangle", "white", size="small", place="left", word="sun")
    assert caption(scene) == 'a small orange triangle on the left on a white background with the word "sun"'
    assert caption(scene, "zh") == '白色背景上的一个小的橙色三角形，位于左侧，写着"sun"'
    assert caption(Scene("orange", "square", "blue")) == "an orange square on a blue background"
    assert caption(Scene("red", "square", "orange", size="large")) == "a large red square on an orange background"


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="would not show"):
        Scene("red", "circle", "red")
    with pytest.raises(ValueError, match="'hexagon' is not one of"):
        Scene("red", "hexagon", "blue")
    with pytest.raises(ValueError, match="unknown language"):
        caption(Scene("red", "circle", "blue"), "fr")


def test_held_out_triples_are_spread_and_never_drawn():
    assert len(HELD_OUT) == 24
    for position in range(3):
        counts = Counter(triple[position] for triple in HELD_OUT)
        assert set(counts.values()) == ({8} if position == 1 else {3})  # every shape 8 times, every colour 3 times per role
    dataset = SceneDataset(SIZE)
    assert not any(dataset.scene(i)[0].triple in HELD_OUT for i in range(2000))
    captions = set(training_captions())
    assert len(captions) == 2 * (8 * 7 * 3 - 24) * 3 * 5 * 9
    assert "a red circle on a blue background" in captions and "a green circle on a blue background" not in captions


def nearest_colour(pixel: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: np.square(np.subtract(COLOURS[name], pixel, dtype=float)).sum())


@pytest.mark.parametrize("shape", SHAPES)
def test_pictures_show_their_caption(shape):
    """The background colour fills the corners, the shape's colour sits at the shape's centre, in its place."""
    for place in ("centre", "left", "top"):
        scene = Scene("yellow", shape, "purple", place=place, word="hi")
        pixels = np.asarray(draw(scene, SIZE))  # (H, W, 3)
        x, y = shape_centre(scene)
        assert nearest_colour(pixels[int(y * SIZE), int(x * SIZE)]) == "yellow"
        assert all(nearest_colour(pixels[r, c]) == "purple" for r, c in ((0, 0), (0, -1), (-1, 0), (-1, -1)))


def test_samples_are_seeded():
    a, b = SceneDataset(SIZE, seed=1), SceneDataset(SIZE, seed=2)
    assert torch.equal(a[5][0], SceneDataset(SIZE, seed=1)[5][0]) and a[5][1] == SceneDataset(SIZE, seed=1)[5][1]
    assert a[5][1] != a[6][1] and a[5][1] != b[5][1]
    pictures, captions = next(batches(a, batch_size=3, start_step=2))
    assert pictures.shape == (3, 3, SIZE, SIZE) and pictures.dtype == torch.uint8
    assert captions == [a[i][1] for i in (6, 7, 8)] and torch.equal(pictures[0], a[6][0])


def test_tokenizer_keeps_words_whole():
    """Every English word of the grammar is one token, every Chinese character one, so a held-out caption is made
    of tokens that training captions contain."""
    tokenizer = byte_level_bpe(["<|endoftext|>"])
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    assert len(tokenizer.encode("a purple triangle on an orange background").ids) == 7
    assert len(tokenizer.encode("紫色背景上的一个黄色正方形").ids) == 13
    seen = {t for encoding in tokenizer.encode_batch(list(training_captions())) for t in encoding.ids}
    for colour, shape, background in HELD_OUT:
        for language in ("en", "zh"):
            assert set(tokenizer.encode(caption(Scene(colour, shape, background), language)).ids) <= seen
    assert tokenizer.decode(tokenizer.encode("未知 text ✓").ids) == "未知 text ✓"  # byte-level: anything encodes
