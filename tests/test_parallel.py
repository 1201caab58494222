"""Several processes (common/parallel.py): every mode's output equals the single-process output.

One run of 2 processes on gloo (CPU, fp32) runs every case of parallel_worker.py, each family's
model and pipeline under sequence parallel and CFG parallel, and the CLI under sp and dp, and one
of 4 processes each family's pipeline under both (2 CFG rows x 2 shards); this process computes
the same requests alone and compares. Tolerance: relative error <= 1e-5 in fp32;
the split changes only the order of sums (attention over the gathered sequence with padded keys
masked, each CFG row in a batch of its own): measured at most ~1e-6. Saved images may differ by one
8-bit level where a pixel sits at a rounding boundary.
The argument checks and the shard arithmetic are tested in this process.
"""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from zflux.cli import main
from zflux.common.graphs import graphed
from zflux.common.parallel import SINGLE, Axis, Plan, Shards, check_mode, per_row
from parallel_worker import (CLI_CASES, COMBINED_CASES, MODEL_CASES, PIPELINE_CASES, PIPELINES, free_port, run_model, run_pipeline,
                             worker)
from test_graphs import Scale, fake  # noqa: F401 (fake: the fixture standing in for CUDA graph capture)
from tiny_flux2 import flux2_snapshot
from tiny_pipelines import flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)
from util import rel_err

TOL = 1e-5  # see the module docstring


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("snapshots")
    return {"z-image": zimage_snapshot(root / "base", "z-image"), "flux-dev": flux_snapshot(root / "dev", "flux-dev"),
            "flux2-klein-base": flux2_snapshot(root / "klein-base", "flux2-klein-base")}


def run_ranks(world: int, snapshots: dict, out) -> None:
    """parallel_worker.worker on `world` processes, forked, not spawned: they start with this one's imports (torch,
    transformers) instead of repeating them."""
    mp.start_processes(worker, args=(world, free_port(), snapshots, out), nprocs=world, start_method="fork")


@pytest.fixture(scope="module")
def spawned(snapshots, tmp_path_factory):
    """The folder where rank 0 of one 2-process run saved every case's result."""
    out = tmp_path_factory.mktemp("parallel")
    run_ranks(2, snapshots, out)
    return out


@pytest.fixture(scope="module")
def combined(snapshots, tmp_path_factory):
    """The folder where rank 0 of one 4-process run (cfg+sp) saved its results."""
    out = tmp_path_factory.mktemp("combined")
    run_ranks(4, snapshots, out)
    return out


@pytest.mark.parametrize("name", MODEL_CASES)
def test_models_sequence_parallel(spawned, name):
    assert rel_err(load_file(spawned / f"{name}.safetensors")["result"], run_model(name)) <= TOL


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_pipelines_sequence_and_cfg_parallel(spawned, snapshots, name):
    snapshot, _, kwargs = PIPELINE_CASES[name]
    pipe = PIPELINES[snapshot].from_pretrained(snapshots[snapshot], device="cpu", dtype=torch.float32)
    assert rel_err(load_file(spawned / f"{name}.safetensors")["result"], run_pipeline(pipe, kwargs)) <= TOL


@pytest.mark.parametrize("name", COMBINED_CASES)
def test_pipelines_cfg_and_sequence_parallel_combined(combined, snapshots, name):
    snapshot, _, kwargs = COMBINED_CASES[name]
    pipe = PIPELINES[snapshot].from_pretrained(snapshots[snapshot], device="cpu", dtype=torch.float32)
    assert rel_err(load_file(combined / f"{name}.safetensors")["result"], run_pipeline(pipe, kwargs)) <= TOL


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_writes_each_image_once_as_one_process_would(spawned, snapshots, tmp_path, name):
    snapshot, args = CLI_CASES[name]
    alone = [a for a in args if a not in ("--parallel", "sp", "dp")]
    main(["generate", "--weights", str(snapshots[snapshot]), "--dtype", "fp32", "--device", "cpu", *alone,
          "--out", str(tmp_path / "image.png")])
    written = sorted(p.name for p in (spawned / name).iterdir())
    assert written == sorted(p.name for p in tmp_path.iterdir())  # sp: one file from rank 0; dp: each seed's, once
    for file in written:
        assert np.abs(pixels(spawned / name / file) - pixels(tmp_path / file)).max() <= 1


def test_shards_cut_and_count():
    x = torch.arange(5.0)[None, :, None]  # (1, 5, 1): 5 tokens on 2 ranks, 3 each, the last padded
    first, second = (Shards(5, Axis(None, 2, r)) for r in range(2))
    assert first.split(x).flatten().tolist() == [0, 1, 2] and second.split(x).flatten().tolist() == [3, 4, 0]
    assert [first.count(4), second.count(4), second.count(2), first.count(2)] == [3, 1, 0, 2]
    assert Shards(5, SINGLE).split(x) is x and Shards(5, SINGLE).gather(x) is x


def test_cfg_split_cuts_what_has_a_row_each():
    """Z-Image passes its caption lengths as a tuple, one per row: a rank running one row gets its row's (a longer
    one would only pad its caption further, which the key mask hides: the pipeline's output cannot tell)."""
    assert per_row(torch.zeros(2, 5), 2) and per_row((37, 120), 2)
    assert not per_row(torch.zeros(1, 5), 2) and not per_row(torch.tensor(2.0), 2) and not per_row((1, 2, 3), 2)
    assert not per_row(None, 2) and not per_row(lambda stream: {}, 2)


def test_data_parallel_shares_jobs():
    jobs = list(range(5))
    shares = [Plan(mode="dp", rank=r, world=2).share(jobs) for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]] and Plan(mode="dp", rank=1, world=2).writes
    assert Plan(mode="sp", rank=1, world=2).share(jobs) == jobs and not Plan(mode="sp", rank=1, world=2).writes


@torch.inference_mode()
def test_cuda_graphs_stay_off_under_a_plan(fake):
    model = Scale()
    forward = graphed(model)
    with Plan(mode="sp", rank=0, world=2, sequence=Axis(None, 2, 0)).applied(model):
        forward(torch.ones(2)), forward(torch.ones(2))
    assert fake.made == 0 and model.calls == 2  # eager: no rank captures its collectives
    forward(torch.ones(2))
    assert fake.made == 1


@pytest.mark.parametrize("mode, world, kwargs, message", [
    ("sp", 1, {}, "needs several processes: launch with torchrun"),
    ("cfg", 2, dict(guided=False), "no classifier-free guidance"),
    ("cfg", 4, {}, "runs on 2 processes"),
    ("cfg+sp", 6 - 1, {}, "even number of processes >= 4"),
    ("cfg+sp", 2, {}, "even number of processes >= 4"),
    ("sp", 4, dict(heads=3), "4 sequence shards for 3 attention heads"),
    ("dp", 4, dict(images=3), "makes 3 image"),
])
def test_modes_that_do_not_fit_are_named(mode, world, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_mode(mode, world, **dict(guided=True, heads=30, images=8) | kwargs)
    check_mode("cfg+sp", 4, guided=True, heads=30, images=1)


@pytest.mark.parametrize("model, extra, world, message", [
    ("z-image-turbo", ["--parallel", "cfg"], "2", "no classifier-free guidance"),
    ("flux-dev", ["--parallel", "cfg"], "2", "no classifier-free guidance"),
    ("flux-dev", ["--parallel", "dp", "--num-images", "2"], "4", "makes 2 image"),
    ("z-image", ["--parallel", "sp"], "1", "launch with torchrun"),
    ("z-image", ["--parallel", "sp", "--seed", "-1"], "2", "give one"),
    ("z-image", ["--parallel", "sp", "--seed", "1", "--cache", "0.1"], "2", "decide alone which steps to skip"),
])
def test_cli_refuses_before_loading(snapshots, monkeypatch, tmp_path, model, extra, world, message):
    monkeypatch.setenv("WORLD_SIZE", world)
    weights = snapshots["flux-dev" if model.startswith("flux") else "z-image"]
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--model", model, "--weights", str(weights), "--prompt", "a cat", "--out", str(tmp_path / "x.png"),
              "--device", "cpu", *extra])
    assert message in str(stop.value.code) and "\n" not in str(stop.value.code)
