"""First-block residual step cache: skip most of the transformer on steps where its input changed little.

Each call runs the first block, and takes its residual (output - input) on the image stream. When
that residual differs from the one of the last fully computed step by a relative L1 distance
mean|r - r_prev| / mean|r_prev| below `threshold`, the remaining blocks are skipped and their
residual from that step (their output - their input, on each stream) is added to the first block's
output instead. Otherwise every block runs, and both residuals are kept as the new reference.
The idea is ParaAttention's First Block Cache (also diffusers' FirstBlockCache); with CFG rows in one
batch, one decision covers the whole batch, as they decide per call.

The distance is compared on the host, one sync per call. Threshold 0 never skips (the comparison
is strict): the output is then the uncached forward's, exactly.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

Streams = tuple[Tensor, ...]  # the hidden states the blocks pass along: (image,) or (image, text)


class StepCache:
    """The residuals of the last fully computed step, and the count of steps computed and skipped."""

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"cache threshold {threshold}: use 0 (never skip) or more, e.g. 0.1")
        self.threshold = threshold
        self.first: Tensor | None = None  # the first block's residual on the image stream, (B, S, dim)
        self.rest: Streams | None = None  # the remaining blocks' residual on each stream
        self.computed = self.skipped = 0

    def similar(self, residual: Tensor) -> bool:
        """Whether `residual` is within the threshold of the reference (never, before a step has run whole)."""
        if self.first is None or self.first.shape != residual.shape:
            return False
        distance = (residual - self.first).abs().mean() / self.first.abs().mean()
        return distance.item() < self.threshold

    def __call__(self, hidden: Streams, first: Callable[..., Streams], rest: Callable[..., Streams]) -> Streams:
        """rest(*first(*hidden)), or the first block's output plus the reference's residual when similar (see the module)."""
        after_first = first(*hidden)
        residual = after_first[0] - hidden[0]
        if self.similar(residual):
            self.skipped += 1
            return tuple(h + r for h, r in zip(after_first, self.rest))
        out = rest(*after_first)
        self.first, self.rest = residual, tuple(o - h for o, h in zip(out, after_first))
        self.computed += 1
        return out


def run_blocks(cache: StepCache | None, hidden: Streams, first: Callable[..., Streams], rest: Callable[..., Streams]) -> Streams:
    """The blocks' output for `hidden`: first, then rest; through `cache` when one is on (a model's step_cache)."""
    if cache is None:
        return rest(*first(*hidden))
    return cache(hidden, first, rest)


@contextmanager
def step_cache(transformer: nn.Module, threshold: float | None) -> Iterator[StepCache | None]:
    """Turn the transformer's step cache on for one run (threshold None: off); yields it (its counts) or None."""
    cache = None if threshold is None else StepCache(threshold)
    transformer.step_cache = cache
    try:
        yield cache
    finally:
        transformer.step_cache = None
