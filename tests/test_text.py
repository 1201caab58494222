"""Prompt encoders: parity with diffusers' ZImagePipeline / FluxPipeline prompt encoding, loading errors, and
Z-Image's Qwen3 read over only the positions a prompt uses, graphed per length bucket.

The tests build tiny random Qwen3, T5 and CLIP models and tiny tokenizers offline, save them as a
diffusers snapshot would, and compare our encoders with the pipelines' own encode_prompt run on the
same folders, each side loading its own models and tokenizers from them (diffusers' with the classes
the real snapshots' model_index.json names), so that a loading setting of ours (the padding side,
say) cannot reach diffusers' side.

FLUX.1's encoders call the same `transformers` modules on the same token ids as diffusers: the
tolerance is exact equality. Z-Image's Qwen3 does not: diffusers runs it over 512 positions (the
pads masked), ours over the longest prompt's L' positions with the causal mask alone (zimg/text.py
says why that gives the same real-token features), so its GEMMs and attention run at other shapes
and round differently. The bar there is the project's: <= 1e-5 relative in fp32 (measured ~2e-8 at
these sizes), and in bf16 one bf16 rounding step, 2^-8 (measured ~2e-4).
"""

import pytest
import torch
from torch.nn import functional as F
from diffusers import FluxPipeline, ZImagePipeline
from tokenizers import pre_tokenizers
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Qwen2Tokenizer, Qwen3Config, Qwen3ForCausalLM,
                          Qwen3Model, T5Config, T5EncoderModel, T5Tokenizer, T5TokenizerFast)

from zflux.common.graphs import graphed
from zflux.common.weights import CheckpointError
from zflux.flux.text import FluxPromptEncoder
from zflux.zimg.text import GRAPH_LENGTH, Qwen3Features, Qwen3PromptEncoder, graph_length
from zflux.zimg.pipeline import ZImagePipeline as ZImagePipelineOurs
from test_graphs import fake  # noqa: F401 (fixture: CUDA graph capture faked on the CPU)
from util import rel_err

# Qwen3's chat template, cut down to what a single user turn needs (the real one also handles tools,
# reasoning history and system prompts); enable_thinking=False would add an empty think block.
QWEN_TEMPLATE = (
    r"{%- for message in messages %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endfor %}"
    r"{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    r"{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)
BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())  # byte-level BPE: every string is encodable
PROMPTS = ["a photo of a cat", "Ein Hund im Schnee, 一只猫 and a considerably longer prompt that fills more tokens"]
# Qwen3-4B's shape (its config.json; Z-Image's text encoder, FLUX.2 klein 4B's), for random full-size models.
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=True)


def qwen_tokenizer() -> Qwen2Tokenizer:
    merges = [("a", "t"), ("Ġ", "c"), ("Ġc", "at")]
    vocab = {c: i for i, c in enumerate(BYTES)} | {a + b: len(BYTES) + i for i, (a, b) in enumerate(merges)}
    tokenizer = Qwen2Tokenizer(vocab=vocab | {"<|endoftext|>": len(vocab)}, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


def t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,"]
    pieces += [("▁" + w, -3.0) for w in "a the cat photo of dog hund".split()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def clip_tokenizer() -> CLIPTokenizer:
    merges = [("c", "a"), ("ca", "t</w>")]
    vocab = {"<|startoftext|>": 0} | {c: 1 + i for i, c in enumerate(BYTES)} | {c + "</w>": 1 + len(BYTES) + i for i, c in enumerate(BYTES)}
    vocab |= {a + b: len(vocab) + i for i, (a, b) in enumerate(merges)}
    return CLIPTokenizer(vocab=vocab | {"<|endoftext|>": len(vocab)}, merges=merges, model_max_length=77)


@pytest.fixture(scope="module")
def zimage_snapshot(tmp_path_factory):
    """A diffusers-style Z-Image folder: text_encoder/ (saved as Qwen3ForCausalLM, as shipped) and tokenizer/."""
    root = tmp_path_factory.mktemp("zimage")
    tokenizer = qwen_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    Qwen3ForCausalLM(config).save_pretrained(root / "text_encoder")
    return root


@pytest.fixture(scope="module")
def flux_snapshot(tmp_path_factory):
    """A diffusers-style FLUX.1 folder: CLIP in text_encoder/ + tokenizer/, T5 in text_encoder_2/ + tokenizer_2/."""
    root = tmp_path_factory.mktemp("flux")
    clip_tok, t5_tok = clip_tokenizer(), t5_tokenizer()
    clip_tok.save_pretrained(root / "tokenizer")
    t5_tok.save_pretrained(root / "tokenizer_2")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                                        eos_token_id=clip_tok.eos_token_id, bos_token_id=0, pad_token_id=clip_tok.pad_token_id))
    clip.save_pretrained(root / "text_encoder")
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"))
    t5.save_pretrained(root / "text_encoder_2")
    return root


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8}  # relative, per caption (the module docstring says why)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_length", [128, 48])  # 128 pads both prompts, 48 truncates the long one
@torch.no_grad()
def test_qwen3_matches_zimage_pipeline(zimage_snapshot, dtype, max_length):
    ours = Qwen3PromptEncoder.from_snapshot(zimage_snapshot, dtype=dtype)
    features, mask = ours(PROMPTS, max_length=max_length)

    text_encoder = Qwen3Model.from_pretrained(zimage_snapshot / "text_encoder", dtype=dtype)
    tokenizer = Qwen2Tokenizer.from_pretrained(zimage_snapshot / "tokenizer")
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=tokenizer, transformer=None)
    expected = pipe._encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=max_length)  # one (L_i, D) per prompt

    lengths = [len(e) for e in expected]
    assert features.shape == (2, max(lengths), 32) and features.dtype == dtype and mask.dtype == torch.bool
    assert mask.tolist() == [[i < n for i in range(max(lengths))] for n in lengths]  # each caption's first n positions
    for f, m, e in zip(features, mask, expected):
        assert rel_err(f[m], e) <= TOLERANCE[dtype]


def test_qwen3_chat_template(zimage_snapshot):
    ours = Qwen3PromptEncoder.from_snapshot(zimage_snapshot, dtype=torch.float32)
    assert ours.template("a cat") == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"


@torch.no_grad()
def test_qwen3_pads_on_the_right_whatever_the_tokenizer_says(zimage_snapshot):
    """Qwen3 reads no padding mask: pads placed before a caption's tokens would be seen by them."""
    ours = Qwen3PromptEncoder.from_snapshot(zimage_snapshot, dtype=torch.float32)
    expected, expected_mask = ours(PROMPTS)
    ours.tokenizer.padding_side = "left"
    features, mask = ours(PROMPTS)
    assert torch.equal(mask, expected_mask) and torch.equal(features, expected)


def test_graphed_lengths_round_up_to_a_multiple():
    assert GRAPH_LENGTH == 64
    assert [graph_length(n) for n in (1, 63, 64, 65, 170, 196, 512)] == [64, 64, 64, 128, 192, 256, 512]


@torch.no_grad()
def test_graphed_encode_replays_one_graph_per_batch_and_length_bucket(zimage_snapshot, fake):
    """Through the fake capture of test_graphs.py: prompts of other lengths in one bucket replay one graph, batches
    of another size or bucket capture their own, and each gives the eager encode's features and mask."""
    ours = Qwen3PromptEncoder.from_snapshot(zimage_snapshot, dtype=torch.float32)
    batches = [["a cat"], ["a photo of a cat"], [PROMPTS[1]], ["a cat", PROMPTS[1]]]  # 21, 32, 102 tokens; CFG-like rows
    eager = [ours(prompts) for prompts in batches]
    ours.cuda_graphs = True
    for prompts, (expected, expected_mask), captured in zip(batches, eager, [1, 1, 2, 3]):
        features, mask = ours(prompts)
        assert fake.made == captured
        assert torch.equal(mask, expected_mask) and features.shape == expected.shape
        assert rel_err(features[mask], expected[mask]) <= TOLERANCE[torch.float32]  # other shapes: fp32 rounding
    assert sorted(key[0][1] for key in graphed(ours.features).graphs) == [(1, 64), (1, 128), (2, 128)]  # (B, ids' length)


def test_the_graphed_forward_reads_nothing_back_to_the_host():
    """A CUDA graph cannot hold a host read. On meta tensors (shapes, no values) our forward runs through, where
    transformers building the causal mask from a padding mask, or from none, reads values back."""
    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    ids = torch.zeros(2, 7, dtype=torch.long, device="meta")
    assert Qwen3Features(model)(ids).shape == (2, 7, 32)
    for mask in (None, torch.ones(2, 7, dtype=torch.bool, device="meta")):
        with pytest.raises(RuntimeError, match="meta"):
            model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)


def test_qwen3_must_mask_causally_by_itself():
    tiny = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8)
    with pytest.raises(CheckpointError, match="sliding-window"):
        Qwen3PromptEncoder(Qwen3Model(Qwen3Config(use_sliding_window=True, max_window_layers=1, **tiny)), qwen_tokenizer())
    model = Qwen3Model(Qwen3Config(**tiny))
    model.set_attn_implementation("eager")
    with pytest.raises(CheckpointError, match="not 'eager'"):
        Qwen3PromptEncoder(model, qwen_tokenizer())


@pytest.mark.parametrize("offload, cuda_graphs, graphs_on, decode_graphs", [("none", True, True, True),
                                                                            ("none", False, False, False),
                                                                            ("text-encoder", True, False, True),
                                                                            ("model", True, False, False)])
@torch.inference_mode()
def test_pipelines_graph_qwen3_where_its_weights_stay(tmp_path, fake, offload, cuda_graphs, graphs_on, decode_graphs):
    """An offloaded Qwen3 comes back at new addresses on every visit: graphs would be captured anew each time. The
    decode is graphed exactly where the transformer is (their graphs share one memory pool)."""
    from tiny_pipelines import zimage_snapshot as tiny_zimage_snapshot  # it imports this module's tokenizers

    pipe = ZImagePipelineOurs.from_pretrained(tiny_zimage_snapshot(tmp_path / "turbo", "z-image-turbo"), device="cpu",
                                              dtype=torch.float32, offload=offload)
    pipe.cuda_graphs = cuda_graphs
    pipe.generate("a cat", steps=1, height=32, width=32, output_type="latent", progress=False)
    assert pipe.text_encoder.cuda_graphs is graphs_on
    assert len(graphed(pipe.text_encoder.features).graphs) == int(graphs_on)
    assert pipe.vae.cuda_graphs is decode_graphs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_length", [32, 16])  # stand-ins for dev's 512 and schnell's 256
@torch.no_grad()
def test_flux_matches_flux_pipeline(flux_snapshot, dtype, max_length):
    ours = FluxPromptEncoder.from_snapshot(flux_snapshot, dtype=dtype)
    features, pooled = ours(PROMPTS, max_length=max_length)

    pipe = FluxPipeline(scheduler=None, vae=None, transformer=None,
                        text_encoder=CLIPTextModel.from_pretrained(flux_snapshot / "text_encoder", dtype=dtype),
                        tokenizer=CLIPTokenizer.from_pretrained(flux_snapshot / "tokenizer"),
                        text_encoder_2=T5EncoderModel.from_pretrained(flux_snapshot / "text_encoder_2", dtype=dtype),
                        tokenizer_2=T5TokenizerFast.from_pretrained(flux_snapshot / "tokenizer_2"))
    expected, expected_pooled, _ = pipe.encode_prompt(list(PROMPTS), prompt_2=None, device="cpu", max_sequence_length=max_length)

    assert features.shape == (2, max_length, 32) and pooled.shape == (2, 32)
    assert features.dtype == pooled.dtype == dtype
    assert torch.equal(features, expected) and torch.equal(pooled, expected_pooled)


@torch.no_grad()
def test_explicit_paths_and_single_prompt(flux_snapshot, zimage_snapshot):
    flux = FluxPromptEncoder.from_pretrained(t5=flux_snapshot / "text_encoder_2", t5_tokenizer=flux_snapshot / "tokenizer_2",
                                             clip=flux_snapshot / "text_encoder", clip_tokenizer=flux_snapshot / "tokenizer",
                                             dtype=torch.float32)
    features, pooled = flux("a cat", max_length=16)
    batch, batch_pooled = flux(["a cat", "a dog"], max_length=16)
    assert torch.allclose(features[0], batch[0], atol=1e-6) and torch.allclose(pooled[0], batch_pooled[0], atol=1e-6)

    qwen = Qwen3PromptEncoder.from_pretrained(zimage_snapshot / "text_encoder", zimage_snapshot / "tokenizer", dtype=torch.float32)
    assert qwen.to("cpu") is qwen and qwen.device == torch.device("cpu")
    assert flux.to("cpu") is flux and flux.device == torch.device("cpu")


def test_loading_errors(zimage_snapshot, flux_snapshot, tmp_path):
    with pytest.raises(CheckpointError, match="no .* folder"):
        Qwen3PromptEncoder.from_snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="'t5' model; expected 'qwen3'"):
        Qwen3PromptEncoder.from_pretrained(flux_snapshot / "text_encoder_2", zimage_snapshot / "tokenizer")
    with pytest.raises(CheckpointError, match="'qwen3' model; expected 't5'"):
        FluxPromptEncoder.from_pretrained(zimage_snapshot / "text_encoder", flux_snapshot / "tokenizer_2",
                                          flux_snapshot / "text_encoder", flux_snapshot / "tokenizer")
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        Qwen3PromptEncoder.from_pretrained(tmp_path / "text_encoder", zimage_snapshot / "tokenizer")
    with pytest.raises(ValueError, match="no prompts"):
        Qwen3PromptEncoder.from_snapshot(zimage_snapshot, dtype=torch.float32)([])


@pytest.mark.gpu
@torch.no_grad()
def test_encoders_on_cuda_and_offload(zimage_snapshot, flux_snapshot):
    """Tokens follow the model to its device; moving back and forth (CPU offload) keeps the results.

    Tiny models: memory a few MB, time a few seconds. fp32 CPU vs CUDA kernels: relative error <= 1e-5.
    """
    qwen = Qwen3PromptEncoder.from_snapshot(zimage_snapshot, device="cuda", dtype=torch.float32)
    features, mask = qwen(PROMPTS, max_length=128)
    assert features.device.type == mask.device.type == "cuda"
    cpu_features, cpu_mask = qwen.to("cpu")(PROMPTS, max_length=128)
    assert torch.equal(mask.cpu(), cpu_mask) and torch.allclose(features.cpu(), cpu_features, rtol=1e-5, atol=1e-5)

    flux = FluxPromptEncoder.from_snapshot(flux_snapshot, dtype=torch.float32)
    cpu_t5, cpu_pooled = flux(PROMPTS, max_length=32)
    t5, pooled = flux.to("cuda")(PROMPTS, max_length=32)
    assert t5.device.type == pooled.device.type == "cuda"
    assert torch.allclose(t5.cpu(), cpu_t5, rtol=1e-5, atol=1e-5) and torch.allclose(pooled.cpu(), cpu_pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@torch.inference_mode()
def test_graphed_qwen3_4b_encode():
    """Qwen3-4B at its real shape (random, bf16) over a ~200-token prompt, as the pipelines run it on a GPU.

    The graphed encode is bit-identical to the eager forward at its bucket's length (the same kernels, replayed); a
    prompt of another length in the same bucket replays the same graph. Against the fp32 encode of the same
    weights, its error is no worse than 1.25x that of diffusers' way in bf16 (512 padded tokens and the padding
    mask): 36 random layers amplify bf16 rounding to a few percent either way. Memory ~25 GB, time ~30 s.
    """
    tokenizer = qwen_tokenizer()
    with torch.device("cuda"):
        model = Qwen3Model(Qwen3Config(pad_token_id=tokenizer.pad_token_id, **QWEN3_4B)).to(torch.bfloat16).eval()
    ours = Qwen3PromptEncoder(model, tokenizer)
    prompt = ("a red fox standing in fresh snow at the edge of a pine forest, early morning light, soft mist between the trees, "
              "a wooden cabin in the distance, photographed with a telephoto lens")  # 196 tokens: bucket 256
    forward = graphed(ours.features)
    results = {}
    for text in (prompt, prompt + " in winter"):  # 196 and 206 tokens, one bucket
        _, mask = ours([text])
        ids, _ = ours.tokens([ours.template(text)])  # (1, L')
        at_bucket = ours.features(F.pad(ids, (0, graph_length(ids.shape[1]) - ids.shape[1]), value=tokenizer.pad_token_id))
        ours.cuda_graphs = True
        for _ in range(2):  # the first call of a bucket runs eagerly and captures, the next ones replay
            features, graphed_mask = ours([text])
            assert torch.equal(features, at_bucket[:, : ids.shape[1]]) and torch.equal(graphed_mask, mask)
        ours.cuda_graphs = False
        padded = tokenizer([ours.template(text)], padding="max_length", max_length=512, return_tensors="pt").to("cuda")
        as_diffusers = model(input_ids=padded.input_ids, attention_mask=padded.attention_mask, output_hidden_states=True,
                             use_cache=False).hidden_states[-2][:, : ids.shape[1]]
        results[text] = ids, features[mask], as_diffusers[mask]
    assert len(forward.graphs) == 1 and None not in forward.graphs.values()  # captured (no host sync), and reused
    model.float()
    for ids, features, as_diffusers in results.values():
        exact = ours.features(ids)[0]  # (L', hidden) fp32: every token is real
        error, theirs = rel_err(features, exact), rel_err(as_diffusers, exact)
        print(f"\n{ids.shape[1]} tokens vs fp32: graphed {error:.2e}, diffusers' way in bf16 {theirs:.2e}, ratio {error / theirs:.3f}")
        assert error <= 1.25 * theirs
