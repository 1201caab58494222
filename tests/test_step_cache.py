"""The first-block step cache (common/step_cache.py) on the CPU, in all three transformers and through the pipelines.

Threshold 0 never skips: the output equals the uncached run's exactly. A positive threshold skips the
steps whose first-block residual moved less than it, adding the last computed residual of the
remaining blocks instead.
"""

import pytest
import torch

from zflux.common.step_cache import StepCache, run_blocks, step_cache
from zflux.flux.flux2.pipeline import Flux2Pipeline
from zflux.flux.pipeline import FluxPipeline
from zflux.zimg.pipeline import ZImagePipeline
from tiny_flux2 import flux2_snapshot
from tiny_pipelines import flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)

FP32 = dict(device="cpu", dtype=torch.float32)
RUN = dict(height=32, width=32, steps=8, seed=5, output_type="latent", progress=False)
CASES = {"z-image": (ZImagePipeline, {}), "flux-dev": (FluxPipeline, {}), "flux2-dev": (Flux2Pipeline, {}),
         "flux2-klein-base": (Flux2Pipeline, {})}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    snapshots = {"z-image": zimage_snapshot(root / "z", "z-image"), "flux-dev": flux_snapshot(root / "dev", "flux-dev"),
                 "flux2-dev": flux2_snapshot(root / "f2dev", "flux2-dev"),
                 "flux2-klein-base": flux2_snapshot(root / "klein", "flux2-klein-base")}
    return {name: cls.from_pretrained(snapshots[name], **FP32) for name, (cls, _) in CASES.items()}




@pytest.fixture
def caches(monkeypatch):
    made = []
    init = StepCache.__init__

    def spy(self, threshold):
        init(self, threshold)
        made.append(self)

    monkeypatch.setattr(StepCache, "__init__", spy)
    return made


@pytest.mark.parametrize("name", CASES)
def test_threshold_zero_is_the_uncached_run_exactly(pipes, caches, name):
    pipe = pipes[name]
    plain = pipe.generate("a red fox", **RUN)
    cached = pipe.generate("a red fox", cache=0.0, **RUN)
    assert torch.equal(cached, plain)
    assert (caches[0].computed, caches[0].skipped) == (8, 0)
    assert pipe.transformer.step_cache is None  # off again after the run


@pytest.mark.parametrize("name", CASES)
def test_a_large_threshold_skips_steps(pipes, caches, name):
    """Z-Image base and klein base run their CFG rows in one batch: one decision per step for both."""
    pipe = pipes[name]
    plain = pipe.generate("a red fox", **RUN)
    cached = pipe.generate("a red fox", cache=1e9, **RUN)
    assert (caches[0].computed, caches[0].skipped) == (1, 7)  # the first step runs whole, every later one is skipped
    assert cached.shape == plain.shape and torch.isfinite(cached).all() and not torch.equal(cached, plain)


def test_skip_adds_the_last_residual_of_the_remaining_blocks():
    cache = StepCache(threshold=0.5)
    first = lambda x: (x + 1,)  # noqa: E731  the first block: residual 1 everywhere
    rest = lambda x: (x * 3,)  # noqa: E731
    x = torch.ones(2, 3)
    (out,) = run_blocks(cache, (x,), first, rest)
    assert torch.equal(out, torch.full((2, 3), 6.0))  # computed: (1 + 1) * 3; the remaining blocks' residual is 4
    (out,) = run_blocks(cache, (x * 5,), first, rest)  # same first-block residual: skipped
    assert torch.equal(out, torch.full((2, 3), 6.0 + 4.0)) and cache.skipped == 1
    (out,) = run_blocks(cache, (x,), lambda x: (x + 2,), rest)  # residual 2 against 1: 100% apart, computed again
    assert torch.equal(out, torch.full((2, 3), 9.0)) and cache.computed == 2


def test_threshold_zero_computes_even_an_unchanged_step():
    """The skip test is strict: at threshold 0 an identical first-block residual still runs every block (h + (out - h)
    need not round back to out)."""
    cache = StepCache(threshold=0.0)
    for _ in range(2):
        run_blocks(cache, (torch.ones(2, 3),), lambda x: (x + 1,), lambda x: (x * 3,))
    assert (cache.computed, cache.skipped) == (2, 0)


def test_the_reference_is_the_last_computed_step():
    """Residuals drifting by less than the threshold per step still add up: each is compared with the last step that ran
    whole, not with the last step."""
    cache = StepCache(threshold=0.5)
    rest = lambda x: (x * 3,)  # noqa: E731
    for residual in (1.0, 1.4, 1.8):  # 0.4 from the reference: skipped; then 0.8 from it (0.29 from the skipped step): run
        run_blocks(cache, (torch.ones(2, 3),), lambda x, r=residual: (x + r,), rest)
    assert (cache.computed, cache.skipped) == (2, 1)


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="cache threshold -0.1: use 0"):
        with step_cache(torch.nn.Module(), -0.1):
            pass
