"""FLUX.2 at full width on the GPU: bf16 accuracy against an fp32 reference, compared with diffusers.

Random weights, 1024x1024 (64x64 = 4096 image tokens) and 512 text tokens. The bar: our bf16 error
against diffusers' fp32 output is at most 1.25x diffusers' own bf16 error on the same inputs.

- [klein] 4B at full size (3.88 B): fp32 reference 15.5 GB, then bf16 copies of 7.8 GB each.
- [dev] at its full width (6144, 48 heads, 15360 text features) but 2 double and 6 single blocks
  (5.7 B): the whole 32 B model in fp32 (129 GB) fits no single GPU.
- klein 9B KV at full width with 2 + 4 blocks: the extract step and a cached step, each against
  diffusers' KV processors in fp32 and in bf16.

t = 0.5 and guidance 4.0 are exact in bf16 after the x1000 (diffusers rounds them in the model
dtype; we embed them from fp32), so the comparison is of the transformer's arithmetic alone.
"""

from dataclasses import replace

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor

from zflux.flux.flux2.convert import from_diffusers
from zflux.flux.flux2.model import PRESETS, Flux2, Flux2Config
from test_flux2_model import DEV, KLEIN, diffusers_kwargs, grid_ids, text_ids
from tiny_pipelines import one_thread  # noqa: F401 (autouse: one CPU thread for this module)
from util import bf16_vs_fp32, randomize_, rel_err


def make_ours(cfg: Flux2Config):
    def build(state_dict):
        with torch.device("meta"):
            ours = Flux2(cfg)
        ours.load_state_dict(from_diffusers(state_dict), strict=True, assign=True)
        return ours.eval()
    return build


def reference(cfg: Flux2Config, device: str) -> Flux2Transformer2DModel:
    with torch.device("meta"):
        ref = Flux2Transformer2DModel(**diffusers_kwargs(cfg))
    return randomize_(ref.to_empty(device=device), std=0.02).eval()  # no default init: every parameter is set here


def bf16_errors(cfg: Flux2Config, grid: int, txt_len: int, device: str) -> tuple[float, float]:
    """(diffusers bf16 error, our bf16 error) against diffusers fp32, random weights at `cfg`, a grid x grid token image."""
    ref = reference(cfg, device)
    g = torch.Generator(device).manual_seed(1)
    img = torch.randn(1, grid * grid, cfg.in_channels, generator=g, device=device)
    txt = torch.randn(1, txt_len, cfg.joint_attention_dim, generator=g, device=device)
    ids_img, ids_txt = grid_ids(1, grid, grid).to(device), text_ids(1, txt_len).to(device)
    t = torch.tensor([0.5], device=device)
    guidance = torch.tensor([4.0], device=device) if cfg.guidance_embeds else None

    def run_ref(model):
        dtype = next(model.parameters()).dtype
        return model(hidden_states=img.to(dtype), encoder_hidden_states=txt.to(dtype), timestep=t, img_ids=ids_img[0],
                     txt_ids=ids_txt[0], guidance=guidance, return_dict=False)[0]

    def run_ours(model):
        return model(img.to(model.dtype), ids_img, txt.to(model.dtype), ids_txt, t, guidance)

    return bf16_vs_fp32(ref, run_ref, make_ours(cfg), run_ours)


def kv_bf16_errors(cfg: Flux2Config, grid: int, ref_grid: int, txt_len: int, device: str) -> list[tuple[float, float]]:
    """For the KV extract step and one cached step: (diffusers bf16 error, ours) against diffusers' fp32 KV path."""
    ref32 = reference(cfg, device)
    for block in ref32.transformer_blocks:
        block.attn.set_processor(Flux2KVAttnProcessor())
    for block in ref32.single_transformer_blocks:
        block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    g = torch.Generator(device).manual_seed(1)
    img0, img1 = (torch.randn(1, grid * grid, cfg.in_channels, generator=g, device=device) for _ in range(2))
    refs = torch.randn(1, ref_grid * ref_grid, cfg.in_channels, generator=g, device=device)
    txt = torch.randn(1, txt_len, cfg.joint_attention_dim, generator=g, device=device)
    ids_img, ids_txt = grid_ids(1, grid, grid).to(device), text_ids(1, txt_len).to(device)
    ids_ref = grid_ids(1, ref_grid, ref_grid, t=10).to(device)
    t0, t1 = torch.tensor([1.0], device=device), torch.tensor([0.5], device=device)

    def run_ref(model):
        dtype = next(model.parameters()).dtype
        out0, cache = model(hidden_states=torch.cat([refs, img0], 1).to(dtype), encoder_hidden_states=txt.to(dtype), timestep=t0,
                            img_ids=torch.cat([ids_ref, ids_img], 1)[0], txt_ids=ids_txt[0], return_dict=False,
                            kv_cache_mode="extract", num_ref_tokens=refs.shape[1])
        out1 = model(hidden_states=img1.to(dtype), encoder_hidden_states=txt.to(dtype), timestep=t1, img_ids=ids_img[0],
                     txt_ids=ids_txt[0], return_dict=False, kv_cache=cache, kv_cache_mode="cached")[0]
        return torch.stack([out0, out1])

    def run_ours(model):
        out0, ref_kv = model.extract_ref_kv(img0.to(model.dtype), ids_img, txt.to(model.dtype), ids_txt, t0, refs.to(model.dtype), ids_ref)
        return torch.stack([out0, model(img1.to(model.dtype), ids_img, txt.to(model.dtype), ids_txt, t1, ref_kv=ref_kv)])

    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        expected = run_ref(ref32).float()
        ref16 = ref32.to(torch.bfloat16)
        got_ref = run_ref(ref16).float()
        got_ours = run_ours(make_ours(cfg)(ref16.state_dict())).float()
    return [(rel_err(got_ref[i], expected[i]), rel_err(got_ours[i], expected[i])) for i in range(2)]


@pytest.mark.parametrize("cfg", [DEV, KLEIN], ids=["dev", "klein"])
def test_bf16_error_tiny_cpu(cfg):
    """The GPU tests' code paths, at a tiny size on the CPU."""
    err_ref, err_ours = bf16_errors(cfg, 4, 7, "cpu")
    assert err_ours <= 1.25 * err_ref + 1e-3
    for err_ref, err_ours in kv_bf16_errors(replace(cfg, guidance_embeds=False), 3, 2, 5, "cpu"):
        assert err_ours <= 1.25 * err_ref + 1e-3


def report(what: str, err_ref: float, err_ours: float) -> None:
    print(f"\n{what} bf16 vs fp32: diffusers {err_ref:.3e}, zflux {err_ours:.3e}, ratio {err_ours / err_ref:.3f}, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


@pytest.mark.gpu
def test_bf16_error_klein_4b_full_size():
    err_ref, err_ours = bf16_errors(PRESETS["flux2-klein-4b"], 64, 512, "cuda")
    report("FLUX.2 klein 4B", err_ref, err_ours)
    assert err_ours <= 1.25 * err_ref


@pytest.mark.gpu
def test_bf16_error_dev_full_width():
    cfg = replace(PRESETS["flux2-dev"], num_layers=2, num_single_layers=6)
    err_ref, err_ours = bf16_errors(cfg, 64, 512, "cuda")
    report("FLUX.2 dev (full width, 2 + 6 blocks)", err_ref, err_ours)
    assert err_ours <= 1.25 * err_ref


@pytest.mark.gpu
def test_bf16_error_klein_9b_kv_full_width():
    cfg = replace(PRESETS["flux2-klein-9b"], num_layers=2, num_single_layers=4)
    for step, (err_ref, err_ours) in zip(("extract", "cached"), kv_bf16_errors(cfg, 64, 64, 512, "cuda")):
        report(f"FLUX.2 klein 9B KV {step} step (full width, 2 + 4 blocks)", err_ref, err_ours)
        assert err_ours <= 1.25 * err_ref


def skip_init():
    """transformers' context that builds a model without initializing its weights (its module moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def fill_quickly_(module: torch.nn.Module, std: float) -> None:
    """Every parameter from one 16 M-value random block, tiled at a random offset: CPU randn of 24 B values is too slow,
    and a run that measures time and memory needs finite values of the right scale, not independent ones."""
    block = torch.randn(2**24) * std
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
                continue
            flat, start = p.view(-1), int(torch.randint(0, 2**24, ()))
            for i in range(0, flat.numel(), 2**24):
                n = min(2**24, flat.numel() - i)
                flat[i:i + n].copy_(block.roll(start)[:n])


def dev_end_to_end(cfg: Flux2Config, text_config: dict, vae_cfg, size: int, device: str) -> tuple[float, float]:
    """[dev] with random weights built in memory, its Mistral 3 encoder offloaded between prompts: one 2-step
    generate() at size x size; returns (seconds, peak GPU GiB, 0 on the CPU)."""
    import time

    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from zflux.common.vae import Autoencoder
    from zflux.common.weights import build_on_meta
    from zflux.flux.flux2.pipeline import Flux2Pipeline
    from zflux.flux.flux2.text import Flux2PromptEncoder
    from test_flux2_text import mistral_tokenizer

    tokenizer = mistral_tokenizer()
    torch.set_default_dtype(torch.bfloat16)  # the 24 B encoder is built on the CPU straight in bf16 (48 GB)
    try:
        vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, head_dim=32)
        with skip_init():  # transformers' own init of 24 B values on the CPU takes minutes; fill_quickly_ takes seconds
            mistral = Mistral3ForConditionalGeneration(Mistral3Config(text_config=MistralConfig(vocab_size=len(tokenizer), **text_config),
                                                                      vision_config=vision)).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    fill_quickly_(mistral, std=0.02)
    transformer = randomize_(build_on_meta(lambda: Flux2(cfg)).to(torch.bfloat16).to_empty(device=device), std=0.02).eval()
    vae = randomize_(build_on_meta(lambda: Autoencoder(vae_cfg)).to(torch.bfloat16).to_empty(device=device), std=0.02).eval()
    vae.bn.running_mean.zero_(), vae.bn.running_var.fill_(1.0)
    pipe = Flux2Pipeline(transformer, vae, Flux2PromptEncoder(mistral.model, tokenizer), "flux2-dev", offload_text_encoder=True)
    start = time.perf_counter()
    image = pipe.generate("a red fox in the snow", steps=2, height=size, width=size, progress=False)
    took = time.perf_counter() - start
    assert image.size == (size, size) and next(transformer.parameters()).device.type == torch.device(device).type
    return took, torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0


def test_dev_end_to_end_tiny_cpu():
    """The GPU test's code path at a tiny size."""
    from zflux.common.vae import AutoencoderConfig

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=31, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    vae = AutoencoderConfig(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                            use_quant_conv=True, use_post_quant_conv=True, patch_size=(2, 2))
    dev_end_to_end(replace(DEV, joint_attention_dim=48), text, vae, 32, "cpu")


@pytest.mark.gpu
def test_dev_end_to_end_on_one_gpu():
    """FLUX.2 [dev] at full size (32 B transformer, 24 B Mistral Small 3.2 encoder offloaded) on one 80 GB GPU."""
    from zflux.common.vae import PRESETS as VAE_PRESETS

    text = dict(hidden_size=5120, intermediate_size=32768, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                head_dim=128, max_position_embeddings=131072)
    took, peak = dev_end_to_end(PRESETS["flux2-dev"], text, VAE_PRESETS["flux2"], 1024, "cuda")
    print(f"\nFLUX.2 dev end to end, 2 steps at 1024x1024, encoder offloaded: {took:.1f} s, peak {peak:.1f} GiB")
    assert peak < 79
