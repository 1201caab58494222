"""Training data with no download: captioned scene pictures (common/shapes.py) drawn on the fly, and a
byte-level BPE tokenizer learnt from every caption the training grammar can produce.

Sample i of a dataset is drawn from its own generator seeded by (seed, i), so a batch is the same in
every run, on every worker and after a resume: training step s reads samples s*B .. s*B + B - 1.
"""

import itertools
import random
from typing import Iterator

import numpy as np
import torch
from einops import rearrange
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from zflux.common.shapes import COLOURS, HELD_OUT, LANGUAGES, PLACES, SHAPES, SIZES, WORDS, Scene, caption, draw, random_scene

VOCAB_LIMIT = 4096  # the BPE stops earlier, once every word of the grammar is one token (or one per Chinese character)


class SceneDataset(Dataset):
    """Sample i: a (3, size, size) uint8 picture and its caption, in English or Chinese with equal odds."""

    def __init__(self, size: int, seed: int = 0, length: int = 2**62):
        if size < 16 or size % 16:
            raise ValueError(f"picture size {size} is not a positive multiple of 16")
        self.size, self.seed, self.length = size, seed, length

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> tuple[Scene, str]:
        """Sample `index`'s scene and caption language."""
        rng = random.Random(self.seed * 1_000_003 + index)
        return random_scene(rng), rng.choice(LANGUAGES)

    def __getitem__(self, index: int) -> tuple[Tensor, str]:
        scene, language = self.scene(index)
        pixels = torch.from_numpy(np.array(draw(scene, self.size)))  # (H, W, 3) uint8
        return rearrange(pixels, "h w c -> c h w"), caption(scene, language)


def batches(dataset: SceneDataset, batch_size: int, start_step: int = 0, workers: int = 0) -> Iterator[tuple[Tensor, list[str]]]:
    """Endless batches (pictures (B, 3, S, S) uint8, captions) for steps start_step, start_step + 1, ...; `workers` draw in parallel."""
    indices = range(start_step * batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=workers, collate_fn=_collate,
                        pin_memory=workers > 0, persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    return iter(loader)


def _collate(samples: list[tuple[Tensor, str]]) -> tuple[Tensor, list[str]]:
    pictures, captions = zip(*samples)
    return torch.stack(pictures), list(captions)


def to_signed(pixels: Tensor) -> Tensor:
    """uint8 pictures -> float in [-1, 1], the autoencoder's range."""
    return pixels.float() / 127.5 - 1


def training_captions() -> Iterator[str]:
    """Every caption the training distribution can produce (no HELD_OUT triple), in both languages."""
    for colour, background, shape in itertools.product(COLOURS, COLOURS, SHAPES):
        if colour == background or (colour, shape, background) in HELD_OUT:
            continue
        for size, place, word, language in itertools.product(SIZES, PLACES, (None, *WORDS), LANGUAGES):
            yield caption(Scene(colour, shape, background, size=size, place=place, word=word), language)


def byte_level_bpe(special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer learnt from training_captions(), with `special_tokens` first in its vocabulary.

    Byte-level, as Qwen's: any text encodes, unknown characters as their UTF-8 bytes. Each Chinese
    character is a word of its own, so that no token spans two words of the grammar: a held-out
    combination is then made of tokens that training has seen.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\p{Han}"), "isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_LIMIT, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_captions(), trainer)
    return tokenizer
