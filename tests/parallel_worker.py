"""What each process of tests/test_parallel.py runs, and the cases both sides share.

Each process (forked by the test) joins a gloo group as torchrun would set it up (MASTER_ADDR,
RANK, ...) and runs every case under its mode:
- MODEL_CASES: our transformers at shapes that a pipeline's tiny snapshot does not reach (3 heads
  on 2 ranks: padded heads; joint sequences of odd length: padded tokens; captions of unequal
  length), called directly;
- PIPELINE_CASES: each family's guided pipeline (its CFG rows, the prompt and a longer negative
  prompt) on its tiny snapshot, under sp and cfg; on 4 ranks, COMBINED_CASES under cfg+sp;
- CLI_CASES: `zflux generate --parallel ...` in this process, as torchrun would launch it;
- on GPUs (gpu_worker, NCCL): full_width_cases, each family at its real width, whole and under sp.
Rank 0 saves each result to the output folder; the test computes the single-process result and compares.
"""

import os
import socket
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from zflux.cli import main
from zflux.common import parallel
from zflux.flux.flux2.model import PRESETS as FLUX2_PRESETS
from zflux.flux.flux2.model import Flux2, Flux2Config
from zflux.flux.flux2.pipeline import Flux2Pipeline, grid_ids, text_ids
from zflux.flux.model import PRESETS as FLUX_PRESETS
from zflux.flux.model import Flux, FluxConfig
from zflux.flux.pipeline import FluxPipeline, img_ids, txt_ids
from zflux.zimg.model import PRESETS as ZIMAGE_PRESETS
from zflux.zimg.model import ZImageConfig, ZImageTransformer
from zflux.zimg.pipeline import ZImagePipeline

PROMPT = "a photo of a cat"
NEGATIVE = "blurry, dark, a low quality picture with watermarks"  # more tokens than the prompt: captions of unequal length
PIPELINES = {"z-image": ZImagePipeline, "flux-dev": FluxPipeline, "flux2-klein-base": Flux2Pipeline}  # snapshot -> our class
PIPELINE_CASES = {  # name -> (snapshot, mode, generate kwargs)
    "z-image-sp": ("z-image", "sp", dict(steps=2, height=48, width=64, negative_prompt=NEGATIVE)),
    "z-image-cfg": ("z-image", "cfg", dict(steps=2, height=48, width=64, negative_prompt=NEGATIVE)),
    "flux-dev-sp": ("flux-dev", "sp", dict(steps=2, height=48, width=64, true_cfg=2.0, negative_prompt=NEGATIVE)),
    "flux-dev-cfg": ("flux-dev", "cfg", dict(steps=2, height=48, width=64, true_cfg=2.0, negative_prompt=NEGATIVE)),
    "flux2-sp": ("flux2-klein-base", "sp", dict(steps=2, height=64, width=48, negative_prompt=NEGATIVE)),
    "flux2-cfg": ("flux2-klein-base", "cfg", dict(steps=2, height=64, width=48, negative_prompt=NEGATIVE)),
}
COMBINED_CASES = {  # run on 4 ranks: 2 CFG rows x 2 sequence shards
    f"{name[:-4]}-cfg+sp": (snapshot, "cfg+sp", kwargs) for name, (snapshot, mode, kwargs) in PIPELINE_CASES.items() if mode == "cfg"
}
CLI_CASES = {  # name -> (snapshot, zflux generate arguments after --weights; --out is added)
    "cli-z-image-sp": ("z-image", ["--model", "z-image", "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", "2",
                                   "--height", "48", "--width", "64", "--parallel", "sp"]),
    "cli-flux-dev-dp": ("flux-dev", ["--model", "flux-dev", "--prompt", PROMPT, "--num-images", "3", "--seed", "5", "--steps", "2",
                                     "--height", "48", "--width", "64", "--parallel", "dp"]),
}


def free_port() -> int:
    """A TCP port nobody listens on now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zimage_case() -> tuple[torch.nn.Module, dict]:
    """Z-Image with 3 heads (as its 30 on 4 ranks: padded), captions of 5 and 40 real tokens (masked keys)."""
    torch.manual_seed(0)
    cfg = ZImageConfig(dim=96, n_heads=3, n_kv_heads=3, n_layers=2, n_refiner_layers=1, cap_feat_dim=24, axes_dims=(8, 12, 12),
                       axes_lens=(128, 32, 32))
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(40)[None] < torch.tensor([[5], [40]])  # (2, 40)
    inputs = dict(x=torch.randn(2, 16, 6, 10, generator=g), t=torch.rand(2, generator=g),
                  cap_feats=torch.randn(2, 40, 24, generator=g), cap_mask=mask)
    return ZImageTransformer(cfg).eval(), inputs


def flux_case() -> tuple[torch.nn.Module, dict]:
    """FLUX.1 with 3 heads, 7 text and 12 image tokens: 19 in all, padded to 20 on 2 ranks."""
    torch.manual_seed(0)
    cfg = FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=3,
                     joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    g = torch.Generator().manual_seed(1)
    inputs = dict(img=torch.randn(2, 12, 16, generator=g), img_ids=img_ids(2, 3, 4), txt=torch.randn(2, 7, 32, generator=g),
                  txt_ids=txt_ids(2, 7), timesteps=torch.rand(2, generator=g), y=torch.randn(2, 24, generator=g),
                  guidance=torch.tensor([3.5, 1.5]))
    return Flux(cfg).eval(), inputs


def flux2_case() -> tuple[torch.nn.Module, dict]:
    """FLUX.2 with 3 heads, 5 text and 6 image tokens: 11 in all, padded to 12 on 2 ranks (the first rank holds all the text)."""
    torch.manual_seed(0)
    cfg = Flux2Config(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=3,
                      joint_attention_dim=20, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
    g = torch.Generator().manual_seed(1)
    inputs = dict(img=torch.randn(2, 6, 16, generator=g), img_ids=grid_ids(2, 3).expand(2, -1, -1),
                  txt=torch.randn(2, 5, 20, generator=g), txt_ids=text_ids(2, 5), timesteps=torch.rand(2, generator=g))
    return Flux2(cfg).eval(), inputs


MODEL_CASES = {"z-image-model": zimage_case, "flux-model": flux_case, "flux2-model": flux2_case}


def run_model(name: str) -> torch.Tensor:
    """MODEL_CASES[name]'s output."""
    model, inputs = MODEL_CASES[name]()
    with torch.inference_mode():
        return model(**inputs)


def run_pipeline(pipe, kwargs: dict) -> torch.Tensor:
    """A PIPELINE_CASES request's final latents."""
    return pipe.generate(PROMPT, seed=3, output_type="latent", progress=False, **kwargs)


def worker(rank: int, world: int, port: int, snapshots: dict[str, Path], out: Path) -> None:
    """One rank: join the group, run the cases for `world` ranks (2: every case but COMBINED_CASES; 4: those), save rank
    0's results (the CLI cases write their files)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cpu = torch.device("cpu")
    try:
        if world == 2:
            with parallel.session("sp", cpu) as plan:
                for name, case in MODEL_CASES.items():
                    model, inputs = case()
                    with plan.applied(model), torch.inference_mode():
                        result = model(**inputs)
                    if rank == 0:
                        save_file({"result": result.contiguous()}, out / f"{name}.safetensors")
        pipes = {}
        for name, (snapshot, mode, kwargs) in (PIPELINE_CASES if world == 2 else COMBINED_CASES).items():
            pipe = pipes.get(snapshot) or PIPELINES[snapshot].from_pretrained(snapshots[snapshot], device=cpu, dtype=torch.float32)
            pipes[snapshot] = pipe
            with parallel.session(mode, cpu) as plan, plan.applied(pipe.transformer):
                result = run_pipeline(pipe, kwargs)
            if rank == 0:
                save_file({"result": result.contiguous()}, out / f"{name}.safetensors")
        for name, (snapshot, args) in CLI_CASES.items() if world == 2 else ():
            main(["generate", "--weights", str(snapshots[snapshot]), "--dtype", "fp32", "--device", "cpu", *args,
                  "--out", str(out / name / "image.png")])
    finally:
        dist.destroy_process_group()


def full_width_cases(device: torch.device) -> dict[str, tuple[torch.nn.Module, dict]]:
    """Each family at its real width and heads (few blocks), fp32 on `device`, with 1024x1024 inputs: what NCCL's
    all-to-all meets in a real run (Z-Image: a CFG batch of two captions of unequal length, masked)."""
    g = torch.Generator().manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    torch.manual_seed(0)  # the same weights on every rank
    with device:
        zimage = ZImageTransformer(replace(ZIMAGE_PRESETS["z-image"], n_layers=2, n_refiner_layers=1))
        flux = Flux(replace(FLUX_PRESETS["flux-dev"], num_layers=1, num_single_layers=2))
        flux2 = Flux2(replace(FLUX2_PRESETS["flux2-klein-9b"], num_layers=1, num_single_layers=2))
    mask = (torch.arange(120)[None] < torch.tensor([[120], [37]])).to(device)  # (2, 120)
    return {
        "z-image": (zimage, dict(x=rand(2, 16, 128, 128), t=rand(2).abs(), cap_feats=rand(2, 120, zimage.cfg.cap_feat_dim),
                                 cap_mask=mask)),
        "flux-dev": (flux, dict(img=rand(1, 4096, 64), img_ids=img_ids(1, 64, 64, device=device),
                                txt=rand(1, 512, flux.cfg.joint_attention_dim), txt_ids=txt_ids(1, 512, device),
                                timesteps=rand(1).abs(), y=rand(1, flux.cfg.pooled_projection_dim),
                                guidance=torch.full((1,), 3.5, device=device))),
        "flux2-klein-9b": (flux2, dict(img=rand(1, 4096, 128), img_ids=grid_ids(64, 64, device=device),
                                       txt=rand(1, 512, flux2.cfg.joint_attention_dim), txt_ids=text_ids(1, 512, device),
                                       timesteps=rand(1).abs())),
    }


def gpu_worker(rank: int, world: int, port: int, out: Path) -> None:
    """One rank on GPU `rank` (NCCL): each full-width case whole, then under sp; rank 0 saves both."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    device = parallel.rank_device(torch.device("cuda"))
    with parallel.session("sp", device) as plan, torch.inference_mode():
        for name, (model, inputs) in full_width_cases(device).items():
            whole = model(**inputs)
            with plan.applied(model):
                sharded = model(**inputs)
            if rank == 0:
                save_file({"whole": whole.cpu().contiguous(), "sharded": sharded.cpu().contiguous()}, out / f"{name}.safetensors")
            del model, inputs, whole, sharded
            torch.cuda.empty_cache()
