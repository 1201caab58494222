"""Sequence parallel over NCCL on 2 or 4 GPUs (4 where there are: Z-Image's 30 heads then padded to 32): each
family at its real width and heads (a few blocks), 1024x1024 inputs, fp32 with TF32 off, equals the same
model run whole on one GPU to <= 1e-5 relative (the split changes only which kernel sums what, as on the CPU).

    pytest -m gpu tests/test_parallel_gpu.py        # needs 2 or more CUDA GPUs
"""

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from parallel_worker import free_port, gpu_worker
from util import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]
TOL = 1e-5  # fp32, see the module docstring


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("nccl")
    world = 4 if torch.cuda.device_count() >= 4 else 2
    mp.spawn(gpu_worker, args=(world, free_port(), out), nprocs=world)  # spawn: CUDA does not survive a fork
    return out


@pytest.mark.parametrize("name", ["z-image", "flux-dev", "flux2-klein-9b"])
def test_sequence_parallel_on_gpus_matches_one_gpu(results, name):
    saved = load_file(results / f"{name}.safetensors")
    whole, sharded = saved["whole"], saved["sharded"]
    assert torch.isfinite(whole).all()
    assert rel_err(sharded, whole) <= TOL, rel_err(sharded, whole)
