"""Offload modes (common/offload.py) on the CPU: each mode's plan followed stage by stage, the block streamer's copy order,
and what --offload auto picks from the memory estimate (common/memory.py).

Where a component is cannot be told from its device on a CPU-only machine, so a visit "to the device"
is made a real copy (Parked.load clones): a component whose tensors are their CPU homes is parked
(CPU), one whose tensors are copies is on the device, and a streamed one has its rest's tensors
copied and its repeated layers at home but for the one or two passing through. The GPU counterpart
(each mode bit-identical to none at full size) is tests/test_offload_gpu.py.
"""

import pytest
import torch
from torch import nn

from zflux.common import offload as offload_module
from zflux.common.memory import Footprint
from zflux.common.offload import CPU, DEVICE, MODES, STREAMED, BlockStreamer, Parked, Streamed, make_plan, modules_of, repeated_blocks
from zflux.common.step_cache import step_cache
from zflux.flux.flux2.pipeline import Flux2Pipeline
from zflux.flux.pipeline import FluxPipeline
from zflux.zimg.pipeline import ZImagePipeline
from tiny_flux2 import flux2_snapshot
from tiny_pipelines import flux_snapshot, one_thread, zimage_snapshot  # noqa: F401 (one_thread: autouse fixture)

FP32 = dict(device="cpu", dtype=torch.float32)
RUN = dict(height=32, width=32, steps=2, seed=3, progress=False)
PIPELINES = {"z-image-turbo": ZImagePipeline, "flux-dev": FluxPipeline, "flux2-klein-base": Flux2Pipeline, "flux2-dev": Flux2Pipeline}
# The text encoders' repeated layers, as named by transformers: Qwen3; T5 and CLIP; Qwen3; Mistral 3's language model.
TEXT_LAYERS = {"z-image-turbo": ["model.layers"], "flux-dev": ["t5.encoder.block", "clip.encoder.layers"],
               "flux2-klein-base": ["model.layers"], "flux2-dev": ["model.language_model.layers"]}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("offload")
    return {"z-image-turbo": zimage_snapshot(root / "z"), "flux-dev": flux_snapshot(root / "dev", "flux-dev"),
            "flux2-klein-base": flux2_snapshot(root / "klein", "flux2-klein-base"),
            "flux2-dev": flux2_snapshot(root / "flux2-dev", "flux2-dev")}


@pytest.fixture
def real_copies(monkeypatch):
    """A visit to the device (the CPU here) makes copies, so that parked and visiting tensors differ."""
    monkeypatch.setattr(Parked, "load", lambda self, device: self._load_copies())

    def load_copies(self):
        copies = [t.clone() for t in self.home]
        for slot, copy in zip(self.slots, copies):
            self._set(slot, copy)
        return copies

    monkeypatch.setattr(Parked, "_load_copies", load_copies, raising=False)


def is_home(parked: Parked) -> bool:
    return all(Parked._get(slot).data_ptr() == home.data_ptr() for slot, home in zip(parked.slots, parked.home))


def place_of(held) -> str:
    """Where a held component is, read from its tensors: parked at home, on the device, or streamed (its rest on the device)."""
    if isinstance(held, Streamed):
        return CPU if is_home(held.rest) else STREAMED
    return CPU if is_home(held) else DEVICE


def placement(pipe) -> dict[str, str]:
    """Where each component is now, read from its tensors."""
    off = pipe.offload
    return {name: place_of(off.held[name]) if name in off.held else DEVICE for name in off.components}


def layers_away(held) -> int:
    """How many of a streamed component's repeated layers are on the device (their tensors are copies) now."""
    return sum(not is_home(layer) for layer in held.streamer.blocks)


def record_stages(pipe) -> dict[str, dict[str, str]]:
    """The placement seen when the prompt encoder, the transformer and the decoder run, by stage name; and "text layers",
    the most text-encoder layers on the device while one of them runs."""
    seen = {}
    encoder = type(pipe.text_encoder)
    call = encoder.__call__
    pipe.text_encoder.__class__ = type("Spy", (encoder,), {"__call__": lambda self, *a, **k: seen.setdefault("encode", placement(pipe))
                                                                       and call(self, *a, **k)})
    pipe.transformer.register_forward_pre_hook(lambda *_: seen.setdefault("denoise", placement(pipe)) and None)
    pipe.vae.decoder.register_forward_pre_hook(lambda *_: seen.setdefault("decode", placement(pipe)) and None)
    held = pipe.offload.held["text_encoder"]
    for model in modules_of(pipe.text_encoder):
        for layer in repeated_blocks(model):  # hooked after the streamer's own: the layer has arrived
            layer.register_forward_pre_hook(lambda *_: seen.update({"text layers": max(seen.get("text layers", 0), layers_away(held))}))
    return seen


def test_plans():
    """The modes in words (common/offload.py's docstring), as tables."""
    none, text, model, blocks = (make_plan(mode) for mode in MODES)
    assert all(place == DEVICE for stage in none.values() for place in stage.values())
    for plan in (text, model, blocks):
        assert [plan[s]["text_encoder"] for s in ("load", "encode", "denoise", "decode")] == [CPU, STREAMED, CPU, CPU]
    assert all(text[s]["transformer"] == DEVICE for s in text)
    assert [model[s]["transformer"] for s in ("load", "encode", "denoise", "decode")] == [CPU, CPU, DEVICE, CPU]
    assert all(blocks[s]["transformer"] == STREAMED for s in blocks)
    assert all(plan[s]["vae"] == DEVICE for plan in (none, text, model, blocks) for s in plan)
    with pytest.raises(ValueError, match="offload 'disk': choose one of none, text-encoder, model, blocks"):
        make_plan("disk")


def expected_plan(mode: str) -> dict[str, dict[str, str]]:
    """Each mode's plan written out (not read from make_plan): (text encoder, transformer) per stage; the VAE stays."""
    stages = ("load", "encode", "denoise", "decode")
    places = {"text-encoder": [(CPU, DEVICE), (STREAMED, DEVICE), (CPU, DEVICE), (CPU, DEVICE)],
              "model": [(CPU, CPU), (STREAMED, CPU), (CPU, DEVICE), (CPU, CPU)],
              "blocks": [(CPU, STREAMED), (STREAMED, STREAMED), (CPU, STREAMED), (CPU, STREAMED)]}[mode]
    return {stage: {"text_encoder": text, "transformer": transformer, "vae": DEVICE} for stage, (text, transformer) in zip(stages, places)}


def assert_same_output(got: torch.Tensor, want: torch.Tensor, name: str, mode: str) -> None:
    """Bit for bit, but for FLUX.1 with streamed blocks: each of its steps takes the blocks' modulations in the blocks
    (their weights arrive with them), where a resident transformer takes every step's at once (Flux.modulations), one
    matmul of many rows against many of one: their sums round alike only up to order (1.6e-7 relative here)."""
    if name == "flux-dev" and mode == "blocks":
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("mode", MODES[1:])
def test_each_mode_follows_its_plan_and_changes_nothing(snapshots, real_copies, name, mode):
    """Before and after each stage, each component is where the plan says; the text encoder's layers pass through the
    device one or two at a time and are all home after the encode; the output equals the run without offload."""
    cls = PIPELINES[name]
    reference = cls.from_pretrained(snapshots[name], **FP32).generate("a red fox", output_type="latent", **RUN)
    pipe = cls.from_pretrained(snapshots[name], offload=mode, **FP32)
    plan = expected_plan(mode)
    assert placement(pipe) == plan["load"]
    seen = record_stages(pipe)
    image = pipe.generate("a red fox", **RUN)
    assert seen == {**{stage: plan[stage] for stage in ("encode", "denoise", "decode")}, "text layers": 2}
    assert placement(pipe) == plan["decode"]  # what the last stage left
    assert layers_away(pipe.offload.held["text_encoder"]) == 0
    assert image.size == (32, 32)
    assert_same_output(pipe.generate("a red fox", output_type="latent", **RUN), reference, name, mode)


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_offload_composes_with_fp8_weights(snapshots, real_copies, name, mode):
    """fp8 transformers (e4m3 weights and their scales, common/fp8.py) park and stream like bf16 ones: the same output."""
    cls = PIPELINES[name]
    reference = cls.from_pretrained(snapshots[name], precision="fp8", **FP32).generate("a red fox", output_type="latent", **RUN)
    pipe = cls.from_pretrained(snapshots[name], precision="fp8", offload=mode, **FP32)
    assert any(t.dtype == torch.float8_e4m3fn for t in pipe.transformer.buffers())
    assert_same_output(pipe.generate("a red fox", output_type="latent", **RUN), reference, name, mode)


@pytest.mark.parametrize("name", PIPELINES)
def test_the_text_encoders_repeated_layers_are_found(snapshots, name):
    """Each family's text models stream the layers transformers names (TEXT_LAYERS), each one a block of the streamer; the
    rest (embeddings, final norms, Mistral 3's vision tower) is parked whole: every tensor once, in one or the other."""
    pipe = PIPELINES[name].from_pretrained(snapshots[name], offload="text-encoder", **FP32)
    held = pipe.offload.held["text_encoder"]
    where = {}  # each module's shortest name from the encoder's attributes
    for attribute, model in vars(pipe.text_encoder).items():
        if isinstance(model, nn.Module):
            for path, module in model.named_modules():
                where[id(module)] = min(where.get(id(module), f"{attribute}.{path}"), f"{attribute}.{path}", key=len)
    layers = [layer for model in modules_of(pipe.text_encoder) for layer in repeated_blocks(model)]
    lists = {where[id(layer)].rsplit(".", 1)[0] for layer in layers}
    assert sorted(lists) == sorted(TEXT_LAYERS[name]) and len(held.streamer.blocks) == len(layers) == len(set(map(id, layers))) > 1
    tensors = {id(t) for model in modules_of(pipe.text_encoder) for t in [*model.parameters(), *model.buffers()]}
    slots = [id(Parked._get(slot)) for parked in (held.rest, *held.streamer.blocks) for slot in parked.slots]
    assert len(slots) == len(set(slots)) == len(tensors)


def test_a_repeated_prompt_reuses_its_encoding(snapshots, real_copies):
    pipe = ZImagePipeline.from_pretrained(snapshots["z-image-turbo"], offload="text-encoder", **FP32)
    stages = []
    enter = pipe.offload.enter
    pipe.offload.enter = lambda stage: stages.append(stage) or enter(stage)
    for prompt in ("a red fox", "a red fox", "a blue fox", "a red fox"):
        pipe.generate(prompt, output_type="latent", **RUN)
    assert stages.count("encode") == 3  # the second run's prompt is the first's: no trip


class FakeCopies:
    """A block copier that only records: ("start", k) when block k's copy is queued, ("wait", k) when compute waits for it."""

    def __init__(self):
        self.index: dict[int, int] = {}  # id(Parked) -> block index
        self.log = []

    def start(self, parked: Parked):
        k = self.index[id(parked)]
        self.log.append(("start", k))
        return k

    def wait(self, k: int) -> None:
        self.log.append(("wait", k))


def streamed(blocks: list[nn.Module], cyclic: bool = True) -> tuple[BlockStreamer, FakeCopies]:
    copies = FakeCopies()
    streamer = BlockStreamer(blocks, copies, cyclic=cyclic)
    copies.index = {id(parked): k for k, parked in enumerate(streamer.blocks)}
    return streamer, copies


def test_streaming_copies_the_next_block_while_the_current_one_runs():
    blocks = [nn.Linear(4, 4) for _ in range(3)]
    streamer, copies = streamed(blocks)
    x = torch.randn(2, 4)
    for _ in range(2):  # two calls of the model: the second's first block was queued during the first's last
        for block in blocks:
            x = block(x)
    assert copies.log == [("start", 0), ("start", 1), ("wait", 0), ("start", 2), ("wait", 1), ("start", 0), ("wait", 2),
                          ("start", 1), ("wait", 0), ("start", 2), ("wait", 1), ("start", 0), ("wait", 2)]
    streamer.remove()
    assert all(not block._forward_pre_hooks for block in blocks)


def test_an_encoder_streams_each_layer_once_per_call():
    """Not cyclic (a text encoder, called once per new prompt): after the last layer no copy is started for a next call."""
    blocks = [nn.Linear(4, 4) for _ in range(3)]
    streamer, copies = streamed(blocks, cyclic=False)
    x = torch.randn(2, 4)
    for block in blocks:
        x = block(x)
    assert copies.log == [("start", 0), ("start", 1), ("wait", 0), ("start", 2), ("wait", 1), ("wait", 2)]
    assert streamer.pending == {}


def test_streaming_follows_the_models_block_order_and_skips():
    """On a Z-Image-shaped model, repeated_blocks is the forward's order (refiners, then layers); a step the cache skips
    leaves the queued block for the next call, which starts from block 0 again."""
    from zflux.zimg.model import ZImageConfig, ZImageTransformer

    cfg = ZImageConfig(dim=32, n_heads=2, n_kv_heads=2, n_layers=3, n_refiner_layers=1, cap_feat_dim=16, axes_dims=(4, 6, 6),
                       axes_lens=(64, 16, 16))
    torch.manual_seed(0)
    model = ZImageTransformer(cfg).eval()
    blocks = repeated_blocks(model)
    assert blocks == [*model.noise_refiner, *model.context_refiner, *model.layers]
    streamer, copies = streamed(blocks)
    args = (torch.randn(1, 16, 4, 4), torch.full((1,), 0.5), torch.randn(1, 8, 16))
    with torch.no_grad(), step_cache(model, threshold=10.0):  # everything after the first step is skipped
        model(*args)
        copies.log.clear()
        model(*args)  # blocks 0-1 (refiners), 2 (the first layer), then skipped: block 3's copy was queued, waits unused
        assert copies.log == [("start", 1), ("wait", 0), ("start", 2), ("wait", 1), ("start", 3), ("wait", 2)]
        copies.log.clear()
        model(*args)  # block 0 is not queued: started now; block 3 is still queued, not copied again
    assert copies.log == [("start", 0), ("start", 1), ("wait", 0), ("start", 2), ("wait", 1), ("wait", 2)]
    streamer.remove()


def test_parked_moves_every_tensor_once_and_keeps_ties():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Linear(3, 3))
    model[2].weight = model[0].weight  # tied
    parked = Parked([model])
    assert len(parked.slots) == len(set(map(id, [*model.parameters(), *model.buffers()])))
    copies = parked.load(torch.device("cpu"))
    assert model[2].weight is model[0].weight and len(copies) == len(parked.slots)
    parked.park()
    assert is_home(parked)


def test_modules_of_a_wrapper():
    class Encoder:
        def __init__(self):
            self.t5, self.clip, self.name = nn.Linear(2, 2), nn.Linear(2, 2), "x"

    encoder = Encoder()
    assert modules_of(encoder) == [encoder.t5, encoder.clip]
    encoder.both = nn.Sequential(encoder.t5)  # a module wrapping another it holds: the outer one only
    assert modules_of(encoder) == [encoder.clip, encoder.both]


GIB = 2**30
# FLUX.1-dev's parameter counts; streamed, T5-XXL and CLIP-L hold their embeddings (132 M, 38 M) and two 193 M T5 layers.
FLUX_DEV = Footprint(transformer_params=11_900_000_000, block_params=340_000_000, vae_params=84_000_000,
                     text_params=4_880_000_000, text_streamed_params=556_000_000, pixels=1024 * 1024)
TILE = 512 * 512


@pytest.mark.parametrize("room_gib, chosen", [
    (32, "none"),  # 31.9 GiB: every weight, and the decode's activations (the decode is tiled)
    (24, "text-encoder"),  # 23.4: the transformer, and the text encoders' embeddings and two T5 layers as they stream
    (23, "model"),  # 22.7: the transformer alone, denoising
    (16, "blocks"),  # 2.5: the T5 streaming beside two transformer blocks
    (2, None),  # not even that
])
def test_auto_picks_the_least_offload_that_fits(room_gib, chosen):
    """FLUX.1-dev in bf16 at 1024 x 1024 (its parameter counts): the first mode, least moving first, that fits."""
    assert FLUX_DEV.choose_offload("bf16", room=int(room_gib * GIB), tile_pixels=TILE) == chosen


def test_streamed_text_encoders_count_their_rest_and_two_layers(tmp_path):
    """From the headers: each encoder's all but its largest list of layers (a Mistral 3's vision layers count as its
    rest), and two of the largest layer of them all."""
    from safetensors.torch import save_file

    from zflux.common.memory import streamed_numel

    save_file({"embed.weight": torch.zeros(10), "layers.0.w": torch.zeros(4), "layers.1.w": torch.zeros(6),
               "vision.layers.0.w": torch.zeros(1)}, tmp_path / "llm.safetensors")
    save_file({"shared.weight": torch.zeros(2), "encoder.block.0.w": torch.zeros(3)}, tmp_path / "t5.safetensors")
    assert streamed_numel([tmp_path / "llm.safetensors"]) == 10 + 1 + 2 * 6
    assert streamed_numel([tmp_path / "llm.safetensors", tmp_path / "t5.safetensors"]) == 10 + 1 + 2 + 2 * 6


def test_estimate_per_stage():
    """Weights by place and precision: fp8 halves the transformer, streaming keeps two blocks; tiles cap the decode."""
    bf16 = FLUX_DEV.bytes("bf16", "none")
    assert FLUX_DEV.bytes("fp32", "none") > bf16 > FLUX_DEV.bytes("fp8", "none")
    assert FLUX_DEV.weights("transformer", "fp8", DEVICE) == FLUX_DEV.transformer_params
    assert FLUX_DEV.weights("transformer", "bf16", STREAMED) == 4 * FLUX_DEV.block_params
    assert FLUX_DEV.weights("text_encoder", "bf16", CPU) == 0
    assert FLUX_DEV.weights("text_encoder", "bf16", STREAMED) == 2 * FLUX_DEV.text_streamed_params
    assert FLUX_DEV.activations("decode", "bf16", tile_pixels=TILE) * 4 == FLUX_DEV.activations("decode", "bf16")
    big = Footprint(transformer_params=0, block_params=0, vae_params=0, text_params=0, text_streamed_params=0, pixels=2048 * 2048)
    assert big.activations("decode", "bf16", tile_pixels=TILE) * 16 == big.activations("decode", "bf16") == 8 * GIB


def test_resolve_mode():
    assert offload_module.resolve_mode("none", offload_text_encoder=True) == "text-encoder"
    with pytest.raises(ValueError, match="offload_text_encoder=True is offload='text-encoder'"):
        offload_module.resolve_mode("blocks", offload_text_encoder=True)


def test_cuda_graphs_only_for_a_transformer_that_stays_on_the_device():
    """Streaming's copies and host waits, and the cache's skip decision, sit inside the forward: a CUDA graph cannot hold
    them; a transformer that visits the device for each run (model mode) comes back at new addresses, which would make
    every run capture its graphs again (common/graphs.py drops graphs whose weights moved)."""
    model = nn.Sequential(nn.ModuleList([nn.Linear(2, 2)]))
    allowed = {mode: offload_module.graphs_allowed(offload_module.Offload(mode, {"transformer": model}, torch.device("cpu")), None)
               for mode in MODES}
    assert allowed == {"none": True, "text-encoder": True, "model": False, "blocks": False}
    assert not offload_module.graphs_allowed(offload_module.Offload("none", {"transformer": model}, torch.device("cpu")), 0.1)


def test_a_pipeline_takes_over_components_another_placed():
    """Two Offloads over one text encoder (two pipelines built on the same objects, in different modes): the one used
    last owns the placement. The streaming one's hooks come off while the resident one runs (they would stream inside
    its forward, where its CUDA graphs cannot follow) and go back on when it runs again; the outputs never change."""
    encoder = nn.Sequential(nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    x = torch.randn(2, 4)

    def run(offload):
        with offload.stage("encode"):
            out = x
            for layer in encoder[0]:
                out = layer(out)
            return out

    hooked = lambda: all(layer._forward_pre_hooks for layer in encoder[0])  # noqa: E731
    streaming = offload_module.Offload("text-encoder", {"text_encoder": encoder}, torch.device("cpu"))
    expected = run(streaming)
    assert hooked()
    resident = offload_module.Offload("none", {"text_encoder": encoder}, torch.device("cpu"))
    assert torch.equal(run(resident), expected) and not any(layer._forward_pre_hooks for layer in encoder[0])
    assert torch.equal(run(streaming), expected) and hooked()
    assert all(len(layer._forward_pre_hooks) == 1 for layer in encoder[0])  # its own hooks, once


def test_an_offload_is_freed_with_its_pipeline():
    """The registry of who placed a component last does not keep an Offload (and its pinned copies) alive."""
    import gc
    import weakref

    encoder = nn.Sequential(nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))
    offload = offload_module.Offload("text-encoder", {"text_encoder": encoder}, torch.device("cpu"))
    ref = weakref.ref(offload)
    del offload
    gc.collect()
    assert ref() is None
