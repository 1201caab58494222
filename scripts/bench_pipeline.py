"""Whole pipelines, zflux's and diffusers', timed in one process on the same random full-size snapshot.

    python scripts/bench_pipeline.py --pipelines z-image-turbo --modes eager compiled --out bench/pipeline
    python scripts/bench_pipeline.py --pipelines flux-dev --impls diffusers zflux
    python scripts/bench_pipeline.py --tiny --device cpu --pipelines z-image-turbo flux-schnell    (the CPU test's run)

Per pipeline: diffusers' own pipeline is assembled from random components at the real sizes (the
transformer, the autoencoder, the text encoders built from `transformers` configs: Qwen3-4B for
Z-Image and FLUX.2 klein 4B, T5-XXL + CLIP-L for FLUX.1) and saved with `save_pretrained` under
--work. Then, per mode and implementation, that snapshot is loaded (timed), one image is generated
to warm up (timed: it holds the compiling and the graph capture), --iters more are timed end to end
(the median is reported), and one more with its parts timed (text encode and decode measured, with
a device sync around each; denoise is the rest: the loop and its small steps); the peak memory is
that of the timed calls, weights included. Each implementation is released before the next loads,
and the snapshot is deleted before the next pipeline's is built: one family on disk at a time
(FLUX.1-dev's snapshot is 34 GB). FLUX.2 [dev]'s (112 GB) fits no disk of the GPU machines: its diffusers pipeline
is assembled in memory instead, and each zflux implementation is made from its tensors (shared, not copied; see
bench_in_memory): the same weights for both, as with a snapshot. Both models resident take an H200:

    python scripts/bench_pipeline.py --pipelines flux2-dev --impls diffusers zflux zflux-fp8 --iters 1 [--modes compiled]

(one mode per run there: zflux-fp8, timed last, takes the transformer's weights over).

Implementations: `diffusers`; `zflux` (CUDA graphs on, the default); `zflux-nographs`; `zflux-fp8`
(precision fp8: the blocks' linears quantized at load, common/fp8.py; CUDA graphs on). Modes:
`eager`; `compiled`: diffusers' `transformer.compile_repeated_blocks(fullgraph=True)`, and each
repeated block of zflux's transformer compiled the same way (fullgraph, in place).

The tokenizers are the tests' byte-level ones (tests/test_text.py, tests/test_flux2_text.py), built
offline (the GPU machine reaches no hub): the prompt below is ~170 Qwen3 tokens with its chat
template; T5 and FLUX.2's encoders pad to their maximum length whatever the tokenizer. Random
weights: the images are noise, the times are those of the real models' shapes.

With --tiny the snapshots are the tests' tiny ones (tests/tiny_pipelines.py, tests/tiny_flux2.py) at
64x64: the whole script runs on the CPU in seconds (tests/test_bench_pipeline.py).
"""

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

TESTS = Path(__file__).resolve().parents[1] / "tests"
DTYPE = torch.bfloat16
PROMPT = ("a red fox standing in fresh snow at the edge of a pine forest, early morning light, soft mist between the trees, "
          "a wooden cabin in the distance, photographed with a telephoto lens")
IMPLS = ("diffusers", "zflux", "zflux-nographs", "zflux-fp8")
MODES = ("eager", "compiled")


@dataclass(frozen=True)
class Spec:
    """One pipeline to time: how to build its snapshot, the diffusers class that runs it, zflux's pipeline and variant."""

    diffusers_class: str
    family: str  # the zflux module holding the pipeline class `ours`
    ours: str
    build: Callable[[Path, str], None]  # saves the full-size random snapshot to the folder, building on the device
    tiny: Callable[[Path], None]  # saves the tests' tiny snapshot to the folder
    snapshot_gb: float  # its size on disk in bf16


def random_transformer(factory: Callable[[], nn.Module], device: str) -> nn.Module:
    """A diffusers transformer built on meta, allocated in bf16 on `device`, filled with random weights (norm scales ~1)."""
    from zflux.common.weights import build_on_meta

    model = build_on_meta(factory).to(DTYPE).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and "norm" in name else 0.0, 0.02)
    return model.eval()


def built_on(device: str, factory: Callable[[], nn.Module]) -> nn.Module:
    """A module constructed (and initialised by its own code) on `device`, then cast to bf16."""
    with torch.device(device):
        return factory().to(DTYPE).eval()


def tests_module(name: str):
    """A helper module of tests/ (the offline tokenizers, the tiny snapshots)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return __import__(name)


def qwen3_4b(causal_lm: bool):
    """Qwen3-4B at its real shape, random; Z-Image reads the base model, FLUX.2 klein the causal LM."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=40960)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def zimage_build(shift: float) -> Callable[[Path, str], None]:
    def build(root: Path, device: str) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

        from zflux.common.vae import PRESETS as VAE
        from zflux.zimg.model import PRESETS

        ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
                       vae=built_on(device, lambda: AutoencoderKL.from_config(VAE["flux"].to_diffusers())),
                       text_encoder=built_on(device, lambda: qwen3_4b(causal_lm=False)), tokenizer=tests_module("test_text").qwen_tokenizer(),
                       transformer=random_transformer(lambda: ZImageTransformer2DModel(axes_lens=list(PRESETS["z-image"].axes_lens)),
                                                      device)).save_pretrained(root)
    return build


def flux_build(dev: bool) -> Callable[[Path, str], None]:
    def build(root: Path, device: str) -> None:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from zflux.common.vae import PRESETS as VAE

        text = tests_module("test_text")
        clip_tok, t5_tok = text.clip_tokenizer(), text.t5_tokenizer()
        clip = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                              eos_token_id=clip_tok.eos_token_id, bos_token_id=0, pad_token_id=clip_tok.pad_token_id)
        t5 = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                      relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
        scheduler = (FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                     base_image_seq_len=256, max_image_seq_len=4096) if dev
                     else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
        FluxPipeline(scheduler=scheduler, vae=built_on(device, lambda: AutoencoderKL.from_config(VAE["flux"].to_diffusers())),
                     text_encoder=built_on(device, lambda: CLIPTextModel(clip)), tokenizer=clip_tok,
                     text_encoder_2=built_on(device, lambda: T5EncoderModel(t5)), tokenizer_2=t5_tok,
                     transformer=random_transformer(lambda: FluxTransformer2DModel(guidance_embeds=dev), device)).save_pretrained(root)
    return build


def flux2_parts(variant: str, device: str) -> dict:
    """What every FLUX.2 pipeline built here shares: diffusers' transformer at `variant`'s size (random), its autoencoder
    and the shipped scheduler settings."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    from zflux.flux.flux2.model import PRESETS

    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in PRESETS[variant].__dict__.items()}
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(**tests_module("tiny_flux2").SCHEDULER),
                vae=built_on(device, AutoencoderKLFlux2),
                transformer=random_transformer(lambda: Flux2Transformer2DModel(**kwargs), device))


def flux2_klein_build(root: Path, device: str) -> None:
    from diffusers import Flux2KleinPipeline

    Flux2KleinPipeline(text_encoder=built_on(device, lambda: qwen3_4b(causal_lm=True)),
                       tokenizer=tests_module("test_text").qwen_tokenizer(), is_distilled=True,
                       **flux2_parts("flux2-klein-4b", device)).save_pretrained(root)


# Mistral Small 3's language model (FLUX.2 [dev]'s text encoder), as its config.json gives it.
MISTRAL_SMALL_3 = dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=131072)


def flux2_dev_assemble(device: str, tiny: bool):
    """FLUX.2 [dev]'s diffusers pipeline assembled in memory on `device`, its snapshot (112 GB in bf16) being more than
    the GPU machines' disk holds: random components at the real sizes (the 32 B transformer; Mistral Small 3's 24 B
    language model, built on the device in bf16, with a one-layer stand-in for the vision tower FLUX.2 does not read;
    the autoencoder), or the tests' tiny ones. On one GPU it needs an H200 (both models resident: 112 GB)."""
    if tiny:
        pipe = tests_module("tiny_flux2").flux2_pipeline("flux2-dev").to(device)
    else:
        from diffusers import Flux2Pipeline
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

        tokenizer = tests_module("test_flux2_text").mistral_tokenizer()
        text = MistralConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **MISTRAL_SMALL_3)
        vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, head_dim=32)
        config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))
        pipe = Flux2Pipeline(tokenizer=tokenizer, text_encoder=built_in_dtype(device, lambda: Mistral3ForConditionalGeneration(config)),
                             **flux2_parts("flux2-dev", device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def built_in_dtype(device: str, factory: Callable[[], nn.Module]) -> nn.Module:
    """A module constructed on `device` straight in bf16 (and initialised by its own code): 24 B parameters in fp32 first
    would take twice the memory."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(device):
            return factory().eval()
    finally:
        torch.set_default_dtype(default)


def flux2_from_diffusers(source, folder: Path, device: torch.device, dtype: torch.dtype, impl: str):
    """zflux's FLUX.2 [dev] pipeline from diffusers' in-memory one: the transformer converted with its tensors shared
    (the fused double-block qkv excepted), the same Mistral 3 module and tokenizer, the autoencoder and the scheduler
    through `folder` (small). zflux-fp8 takes the transformer's weights out of diffusers' pipeline first: each bf16
    weight is then freed as it is quantized, where an e4m3 copy beside them would not fit."""
    from zflux.common.fp8 import apply_precision
    from zflux.common.pipeline import read_scheduler
    from zflux.common.vae import load_autoencoder
    from zflux.common.weights import build_on_meta, load_into
    from zflux.flux.flux2.convert import from_diffusers
    from zflux.flux.flux2.model import Flux2, Flux2Config
    from zflux.flux.flux2.pipeline import Flux2Pipeline
    from zflux.flux.flux2.text import Flux2PromptEncoder

    cfg = Flux2Config.from_diffusers(dict(source.transformer.config))
    state_dict = from_diffusers(source.transformer.state_dict())
    precision = "fp8" if impl == "zflux-fp8" else None
    if precision:
        source.transformer.to("meta")  # diffusers' references to the weights go: ours hold them
    transformer = apply_precision(load_into(build_on_meta(lambda: Flux2(cfg)), state_dict), precision)
    source.vae.save_pretrained(folder / "vae")
    source.scheduler.save_pretrained(folder / "scheduler")
    return Flux2Pipeline(transformer, load_autoencoder(folder / "vae", device, dtype),
                         Flux2PromptEncoder(source.text_encoder.model, source.tokenizer), "flux2-dev",
                         scheduler=read_scheduler(folder / "scheduler"), device=device)


class InMemory(NamedTuple):
    """A pipeline timed without a snapshot on disk: diffusers' assembled in memory, zflux's made from its tensors."""

    assemble: Callable[[str, bool], object]  # (device, tiny) -> diffusers' pipeline
    ours: Callable[[object, Path, torch.device, torch.dtype, str], object]  # (diffusers', folder, device, dtype, impl)


IN_MEMORY = {"flux2-dev": InMemory(flux2_dev_assemble, flux2_from_diffusers)}


def tiny_build(module: str, builder: str, name: str) -> Callable[[Path], None]:
    return lambda root: getattr(tests_module(module), builder)(root, name)


SPECS = {
    "z-image-turbo": Spec("ZImagePipeline", "zimg", "ZImagePipeline", zimage_build(3.0),
                          tiny_build("tiny_pipelines", "zimage_snapshot", "z-image-turbo"), 20.6),
    "z-image": Spec("ZImagePipeline", "zimg", "ZImagePipeline", zimage_build(6.0),
                    tiny_build("tiny_pipelines", "zimage_snapshot", "z-image"), 20.6),
    "flux-schnell": Spec("FluxPipeline", "flux", "FluxPipeline", flux_build(dev=False),
                         tiny_build("tiny_pipelines", "flux_snapshot", "flux-schnell"), 34.0),
    "flux-dev": Spec("FluxPipeline", "flux", "FluxPipeline", flux_build(dev=True),
                     tiny_build("tiny_pipelines", "flux_snapshot", "flux-dev"), 34.0),
    "flux2-klein-4b": Spec("Flux2KleinPipeline", "flux.flux2", "Flux2Pipeline", flux2_klein_build,
                           tiny_build("tiny_flux2", "flux2_snapshot", "flux2-klein"), 16.0),
}


def diffusers_call(name: str) -> dict:
    """diffusers' call arguments for the settings zflux's variant runs with by default."""
    from zflux.flux.flux2.pipeline import VARIANTS as FLUX2
    from zflux.flux.pipeline import VARIANTS as FLUX
    from zflux.zimg.pipeline import VARIANTS as ZIMAGE

    d = (ZIMAGE | FLUX | FLUX2)[name].defaults
    call = dict(num_inference_steps=d.steps, guidance_scale=d.guidance)
    return call | (dict(max_sequence_length=d.max_sequence_length) if name.startswith("flux-") else {})


class Clock:
    """Wall time around device work: syncs the device before reading the clock."""

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: dict[str, float] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def timed(self, part: str, fn: Callable) -> Callable:
        """fn, adding the seconds each call takes to parts[part]."""
        def call(*args, **kwargs):
            start = self.now()
            out = fn(*args, **kwargs)
            self.parts[part] = self.parts.get(part, 0.0) + self.now() - start
            return out
        return call


class TimedEncoder:
    """zflux's prompt encoder with its calls timed; everything else passes through."""

    def __init__(self, encoder, call: Callable):
        self.encoder, self.call = encoder, call

    def __call__(self, *args, **kwargs):
        return self.call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.encoder, name)


def compile_blocks(transformer: nn.Module) -> None:
    """Compile every repeated block of a zflux transformer in place (each ModuleList child), as compile_repeated_blocks does."""
    for child in transformer.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                block.compile(fullgraph=True)


def load(impl: str, spec: Spec, name: str, root: Path, device: torch.device, dtype: torch.dtype, compiled: bool):
    """The implementation's pipeline from the snapshot, ready to generate."""
    if impl == "diffusers":
        import diffusers

        pipe = getattr(diffusers, spec.diffusers_class).from_pretrained(root, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        return diffusers_configured(pipe, compiled)
    module = __import__(f"zflux.{spec.family}.pipeline", fromlist=[spec.ours])
    pipe = getattr(module, spec.ours).from_pretrained(root, device=device, dtype=dtype, variant=name,
                                                      precision="fp8" if impl == "zflux-fp8" else None)
    return configured(pipe, impl, compiled)


def diffusers_configured(pipe, compiled: bool):
    """diffusers' pipeline in the mode: its transformer's repeated blocks compiled if asked."""
    if compiled:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    return pipe


def configured(pipe, impl: str, compiled: bool):
    """zflux's pipeline as `impl` runs it: CUDA graphs on unless zflux-nographs; its repeated blocks compiled if asked."""
    pipe.cuda_graphs = impl != "zflux-nographs"
    if compiled:
        compile_blocks(pipe.transformer)
    return pipe


def generator(impl: str, pipe, name: str, size: int) -> Callable[[], object]:
    """One image, seed 0, at size x size: diffusers' call or zflux's generate()."""
    if impl == "diffusers":
        call = diffusers_call(name)
        return lambda: pipe(prompt=PROMPT, height=size, width=size, generator=torch.Generator("cpu").manual_seed(0), **call).images[0]
    return lambda: pipe.generate(PROMPT, seed=0, height=size, width=size, progress=False)


def timed_parts(impl: str, pipe, run: Callable, clock: Clock) -> dict[str, float]:
    """One more run with the text encoding and the decoding timed: seconds of encode, denoise (the rest) and decode."""
    clock.parts = {}
    if impl == "diffusers":
        pipe.encode_prompt = clock.timed("encode", pipe.encode_prompt)
        pipe.vae.decode = clock.timed("decode", pipe.vae.decode)
    else:
        encoder = pipe.text_encoder
        pipe.text_encoder = TimedEncoder(encoder, clock.timed("encode", encoder))
        pipe.vae.decode = clock.timed("decode", pipe.vae.decode)
    start = clock.now()
    run()
    total = clock.now() - start
    if impl == "diffusers":
        del pipe.encode_prompt
    else:
        pipe.text_encoder = encoder
    del pipe.vae.decode
    encode, decode = clock.parts.get("encode", 0.0), clock.parts.get("decode", 0.0)
    return dict(encode=encode, denoise=total - encode - decode, decode=decode)


def measure(impl: str, name: str, mode: str, args: argparse.Namespace, load_pipe: Callable[[], object]) -> dict:
    """Load (load_pipe()), warm up, time one implementation of one pipeline in one mode; release it."""
    device, clock = torch.device(args.device), Clock(torch.device(args.device))
    start = clock.now()
    pipe = load_pipe()
    loaded = clock.now() - start
    run = generator(impl, pipe, name, args.size)
    start = clock.now()
    run()
    first = clock.now() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        start = clock.now()
        run()
        times.append(clock.now() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = dict(pipeline=name, mode=mode, impl=impl, load_s=loaded, first_s=first, e2e_s=statistics.median(times), peak_gib=peak,
               **{f"{part}_s": s for part, s in timed_parts(impl, pipe, run, clock).items()})
    if args.profile and device.type == "cuda":
        profile_run(f"{name} {mode} {impl}", run)
    del pipe, run
    release(device)
    return row


def profile_run(label: str, run: Callable) -> None:
    """One more run under the profiler, to stderr: its wall time against the GPU's busy time (the rest is the GPU
    waiting on the host), the kernels that took longest, and the host ops that took longest (self time)."""
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3
    print(f"\n{label}: {wall:.0f} ms wall (profiled), GPU busy {busy:.0f} ms", file=sys.stderr)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  gpu {e.self_device_time_total / 1e3:8.2f} ms x{e.count:<5d} {e.key[:100]}", file=sys.stderr)
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  host {e.self_cpu_time_total / 1e3:7.2f} ms x{e.count:<5d} {e.key[:100]}", file=sys.stderr)


def release(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def markdown(rows: list[dict]) -> str:
    """The results as a markdown table: times, parts, peak, and the speed-up over diffusers eager and over diffusers in the same mode."""
    ms = lambda s: f"{s * 1e3:.0f}"  # noqa: E731
    base = {(r["pipeline"], r["mode"]): r["e2e_s"] for r in rows if r["impl"] == "diffusers"}
    lines = ["| pipeline | mode | implementation | load s | first call s | end to end ms | encode ms | denoise ms | decode ms "
             "| peak GiB | vs diffusers eager | vs diffusers same mode |", "|" + "---|" * 12]
    for r in rows:
        eager, same = base.get((r["pipeline"], "eager")), base.get((r["pipeline"], r["mode"]))
        ratio = lambda ref: "" if ref is None else f"{ref / r['e2e_s']:.2f}x"  # noqa: E731
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['pipeline']} | {r['mode']} | {r['impl']} | {r['load_s']:.1f} | {r['first_s']:.1f} | {ms(r['e2e_s'])} | "
                     f"{ms(r['encode_s'])} | {ms(r['denoise_s'])} | {ms(r['decode_s'])} | {peak} | {ratio(eager)} | {ratio(same)} |")
    return "\n".join(lines)


def check_disk(spec: Spec, work: Path, tiny: bool) -> None:
    free = shutil.disk_usage(work).free / 1e9
    if not tiny and free < spec.snapshot_gb * 1.05:
        raise SystemExit(f"{work} has {free:.0f} GB free; the snapshot needs {spec.snapshot_gb:.0f} GB (--work elsewhere)")


def run_dtype(args: argparse.Namespace) -> torch.dtype:
    """The pipelines' dtype: fp32 for the tiny snapshots (the CPU), bf16 at full size."""
    return torch.float32 if args.tiny else DTYPE


def bench(name: str, args: argparse.Namespace) -> list[dict]:
    """Build the pipeline's snapshot, time every implementation in every mode on it, delete it."""
    if name in IN_MEMORY:
        return bench_in_memory(name, args)
    spec = SPECS[name]
    device, dtype = torch.device(args.device), run_dtype(args)
    root = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work))
    check_disk(spec, root, args.tiny)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            if args.tiny:
                spec.tiny(root)
            else:
                spec.build(root, args.device)
        release(torch.device(args.device))
        print(f"{name}: snapshot built and saved in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        rows = []
        for mode in args.modes:
            for impl in args.impls:
                rows.append(measure(impl, name, mode, args, partial(load, impl, spec, name, root, device, dtype, mode == "compiled")))
                print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_in_memory(name: str, args: argparse.Namespace) -> list[dict]:
    """Assemble diffusers' pipeline in memory (IN_MEMORY), time it (its load time: the assembling), then each zflux
    implementation made from its tensors (its load time: the conversion), zflux-fp8 last since it takes the
    transformer's weights over. So one mode per run: the one assembly serves one pass over the implementations."""
    if len(args.modes) != 1:
        raise SystemExit(f"{name} is assembled in memory once, and zflux-fp8 takes its weights over: one --modes per run")
    spec, device, dtype = IN_MEMORY[name], torch.device(args.device), run_dtype(args)
    mode = args.modes[0]
    compiled = mode == "compiled"
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work))  # the autoencoder and scheduler, for zflux to read
    try:
        start = time.perf_counter()
        with torch.no_grad():
            source = spec.assemble(args.device, args.tiny)
        assembled = time.perf_counter() - start
        print(f"{name}: assembled in memory in {assembled:.0f} s", file=sys.stderr, flush=True)
        rows = []
        for impl in sorted(args.impls, key=lambda impl: impl == "zflux-fp8"):
            load_pipe = (lambda: diffusers_configured(source, compiled)) if impl == "diffusers" else (
                lambda impl=impl: configured(spec.ours(source, folder / impl, device, dtype, impl), impl, compiled))
            rows.append(measure(impl, name, mode, args, load_pipe) | ({"load_s": assembled} if impl == "diffusers" else {}))
            print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        return rows
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipelines", nargs="+", choices=(*SPECS, *IN_MEMORY), default=["z-image-turbo"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["eager"])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--iters", type=int, default=2, help="timed runs after the warm-up one (the median is reported)")
    parser.add_argument("--size", type=int, help="image height and width in pixels (default 1024; 64 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny snapshots instead of full-size ones")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work", default=tempfile.gettempdir(), help="where each snapshot is saved while it is timed")
    parser.add_argument("--out", help="folder to write <pipeline>.json and <pipeline>.md into")
    parser.add_argument("--profile", action="store_true", help="one more profiled run per implementation (to stderr): "
                        "wall against GPU busy time, the longest kernels and host ops")
    args = parser.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 1024)
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    header = f"{device}, torch {torch.__version__}, {args.size}x{args.size}, {'tiny random' if args.tiny else 'full-size random'} weights"
    print(header + "\n")
    for name in args.pipelines:
        rows = bench(name, args)
        table = markdown(rows)
        print(table + "\n", flush=True)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.json").write_text(json.dumps(dict(header=header, rows=rows), indent=1))
            (out / f"{name}.md").write_text(f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
