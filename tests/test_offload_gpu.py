"""Offload modes on the GPU at full size (random bf16 weights): the transformer's output in each mode is bit-identical
to the resident one, and block streaming keeps its weights off the device; streamed text encoders' features are
bit-identical to the resident ones, in about their embeddings and a few layers of device memory; Z-Image-Turbo end to
end in text-encoder mode gives the image of no offload.

Z-Image-Turbo (6 B), FLUX.1-dev (12 B) and FLUX.2 klein 4B, one 1024 x 1024 call each; Qwen3-4B (Z-Image, klein 4B) and
T5-XXL + CLIP-L (FLUX.1) encoding a prompt and an empty negative one. Which component is where in each stage is
checked on the CPU (tests/test_offload.py).
"""

import pytest
import torch

from zflux.common.offload import Offload, repeated_blocks
from zflux.common.weights import build_on_meta
from test_text import clip_tokenizer, qwen_tokenizer, t5_tokenizer

DEVICE = torch.device("cuda")
GIB = 2**30


def random_model(factory):
    model = build_on_meta(factory).to(torch.bfloat16).to_empty(device=DEVICE)
    gen = torch.Generator(DEVICE).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if p.ndim == 1 and "norm" in name else 0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


def zimage():
    from zflux.zimg.model import PRESETS, ZImageTransformer

    model = random_model(lambda: ZImageTransformer(PRESETS["z-image-turbo"]))
    x, t = torch.randn(2, 16, 128, 128, device=DEVICE), torch.full((2,), 0.5, device=DEVICE)
    cap = torch.randn(2, 200, model.cfg.cap_feat_dim, device=DEVICE, dtype=torch.bfloat16)
    return model, lambda: model(x, t, cap)


def flux():
    from zflux.flux.model import PRESETS, Flux
    from zflux.flux.pipeline import img_ids, txt_ids

    model = random_model(lambda: Flux(PRESETS["flux-dev"]))
    args = dict(img=torch.randn(1, 4096, 64, device=DEVICE, dtype=torch.bfloat16), img_ids=img_ids(1, 64, 64, device=DEVICE),
                txt=torch.randn(1, 512, 4096, device=DEVICE, dtype=torch.bfloat16), txt_ids=txt_ids(1, 512, device=DEVICE),
                timesteps=torch.full((1,), 0.5, device=DEVICE), y=torch.randn(1, 768, device=DEVICE, dtype=torch.bfloat16),
                guidance=torch.full((1,), 3.5, device=DEVICE))
    return model, lambda: model(**args)


def flux2_klein():
    from zflux.flux.flux2.model import PRESETS, Flux2
    from zflux.flux.flux2.pipeline import grid_ids, text_ids

    model = random_model(lambda: Flux2(PRESETS["flux2-klein-4b"]))
    img = torch.randn(1, 4096, model.cfg.in_channels, device=DEVICE, dtype=torch.bfloat16)
    txt = torch.randn(1, 512, model.cfg.joint_attention_dim, device=DEVICE, dtype=torch.bfloat16)
    ids = grid_ids(64, 64, device=DEVICE)  # (1, 4096, 4)
    return model, lambda: model(img, ids, txt, text_ids(1, 512, DEVICE), torch.full((1,), 0.5, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("build", [zimage, flux, flux2_klein], ids=["z-image-turbo", "flux-dev", "flux2-klein-4b"])
@pytest.mark.parametrize("mode", ["model", "blocks"])
@torch.inference_mode()
def test_offloaded_transformer_is_bit_identical(build, mode):
    torch.cuda.empty_cache()
    model, call = build()
    resident = call()
    off = Offload(mode, {"transformer": model}, DEVICE)
    if mode == "model":
        off.enter("encode")
        assert all(p.device.type == "cpu" for p in model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with off.stage("denoise"):
        offloaded = call()
    torch.cuda.synchronize()
    assert torch.equal(offloaded, resident)
    if mode == "blocks":
        blocks = repeated_blocks(model)
        # parked again after each call, but the first block: its copy for the next call starts during the last block
        assert all(p.device.type == "cpu" for b in blocks[1:] for p in b.parameters())
        block_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
        print(f"\n{build.__name__} blocks mode: peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, "
              f"blocks {block_bytes / 2**30:.1f} GiB streamed")


def qwen3_4b():
    """Z-Image's (and klein 4B's) Qwen3-4B prompt encoder with random bf16 weights on the GPU (the tests' small tokenizer)."""
    from transformers import Qwen3Config, Qwen3Model

    from zflux.zimg.text import Qwen3PromptEncoder

    with torch.device(DEVICE):  # built in place: the rotary tables are buffers
        qwen = Qwen3Model(Qwen3Config(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                                      max_position_embeddings=40960)).to(torch.bfloat16).eval()
    return Qwen3PromptEncoder(qwen, qwen_tokenizer())


def t5_xxl_and_clip_l():
    """FLUX.1's prompt encoder: T5-XXL (v1.1) and CLIP-L with random bf16 weights on the GPU."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from zflux.flux.text import FluxPromptEncoder

    with torch.device(DEVICE):
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                     feed_forward_proj="gated-gelu")).to(torch.bfloat16).eval()
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                                            hidden_act="quick_gelu")).to(torch.bfloat16).eval()
    return FluxPromptEncoder(t5, t5_tokenizer(), clip, clip_tokenizer())


@pytest.mark.gpu
@pytest.mark.parametrize("build", [qwen3_4b, t5_xxl_and_clip_l], ids=["qwen3-4b", "t5-xxl+clip-l"])
@torch.inference_mode()
def test_streamed_text_encoder_is_bit_identical(build):
    torch.cuda.empty_cache()
    encoder = build()
    prompts = ["a red fox in the snow, photographed at dawn", ""]
    resident = encoder(prompts, 512)
    off = Offload("text-encoder", {"text_encoder": encoder}, DEVICE)
    held = off.held["text_encoder"]
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    streamed = off.encode(encoder, prompts, 512)
    off.enter("denoise")
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert all(torch.equal(a, b) for a, b in zip(streamed, resident))
    layers = [parked.nbytes() for parked in held.streamer.blocks]
    print(f"\n{build.__name__} streamed: peak {peak / GIB:.2f} GiB above the start; rest {held.rest.nbytes() / GIB:.2f} GiB, "
          f"{len(layers)} layers of up to {max(layers) / GIB:.2f} GiB, {(sum(layers) + held.rest.nbytes()) / GIB:.1f} GiB in all")
    assert peak <= held.rest.nbytes() + 4 * max(layers) + GIB  # the rest, ~3 layers' copies alive, and the activations
    assert all(t.device.type == "cpu" for m in vars(encoder).values() if isinstance(m, torch.nn.Module)
               for t in [*m.parameters(), *m.buffers()])


@pytest.mark.gpu
@torch.inference_mode()
def test_zimage_text_encoder_mode_is_bit_identical_end_to_end():
    """Z-Image-Turbo, 512 x 512, 2 steps: text-encoder mode (Qwen3-4B streamed) makes the image of no offload."""
    from zflux.common.vae import PRESETS as VAE_PRESETS
    from zflux.common.vae import Autoencoder
    from zflux.zimg.model import PRESETS, ZImageTransformer
    from zflux.zimg.pipeline import ZImagePipeline

    torch.cuda.empty_cache()
    transformer = random_model(lambda: ZImageTransformer(PRESETS["z-image-turbo"]))
    vae = random_model(lambda: Autoencoder(VAE_PRESETS["flux"]))
    encoder = qwen3_4b()
    run = dict(height=512, width=512, steps=2, seed=0, output_type="latent", progress=False)
    resident = ZImagePipeline(transformer, vae, encoder, "z-image-turbo", device=DEVICE).generate("a red fox", **run)
    pipe = ZImagePipeline(transformer, vae, encoder, "z-image-turbo", offload="text-encoder", device=DEVICE)
    assert torch.equal(pipe.generate("a red fox", **run), resident)
    assert torch.equal(pipe.generate("a blue fox", **run), ZImagePipeline(transformer, vae, encoder, "z-image-turbo",
                                                                            device=DEVICE).generate("a blue fox", **run))
