"""FLUX.2 prompt encoders: parity with diffusers' Flux2KleinPipeline (Qwen3) and Flux2Pipeline (Mistral 3) prompt
encoding, loading errors.

Tiny random LLMs with more layers than the real indices need (Qwen3 30, Mistral 33: the encoder drops the rest) and tiny
tokenizers are built offline and saved as a snapshot holds them. Both sides call the same
`transformers` modules on the same token ids: the tolerance is exact equality.
"""

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Pipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
                          PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, T5Config, T5EncoderModel)

from zflux.common.weights import CheckpointError
from zflux.flux.flux2.text import SYSTEM_MESSAGE, Flux2PromptEncoder
from test_text import BYTES, qwen_tokenizer
from tiny_pipelines import one_thread  # noqa: F401 (autouse: one CPU thread for this module)

PROMPTS = ["a photo of a cat", "[IMG]Ein Hund im Schnee, 一只猫 and a considerably longer prompt that fills more tokens"]
# Mistral Small 3's template, cut down to a system turn and user turns with text content.
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{- '[SYSTEM_PROMPT]' + m.content[0].text + '[/SYSTEM_PROMPT]' }}"
    "{%- else %}{{- '[INST]' + m.content[0].text + '[/INST]' }}{%- endif %}{%- endfor %}"
)


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with Mistral's control tokens, padding on the left as Mistral's does."""
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(BYTES)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"additional_special_tokens": ["[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]})
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def tiny_qwen3(tokenizer, hidden: int = 16) -> Qwen3ForCausalLM:
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=30,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=640,
                         pad_token_id=tokenizer.pad_token_id)
    return Qwen3ForCausalLM(config).eval()


def tiny_mistral3(tokenizer, hidden: int = 16) -> Mistral3ForConditionalGeneration:
    text = MistralConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=33,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=640,
                         pad_token_id=tokenizer.pad_token_id)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                                 image_size=32, patch_size=16)
    return Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                           image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"))).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """text_encoder/ + tokenizer/ folders of a tiny klein (Qwen3) and a tiny dev (Mistral 3) snapshot."""
    root = tmp_path_factory.mktemp("flux2_text")
    torch.manual_seed(0)
    for name, tokenizer, build in (("klein", qwen_tokenizer(), tiny_qwen3), ("dev", mistral_tokenizer(), tiny_mistral3)):
        tokenizer.save_pretrained(root / name / "tokenizer")
        build(tokenizer).save_pretrained(root / name / "text_encoder")
    return root


@pytest.mark.parametrize("max_length", [512, 40])  # 40: the longer prompt is cut
@torch.no_grad()
def test_qwen3_matches_flux2_klein_pipeline(folders, max_length):
    ours = Flux2PromptEncoder.from_pretrained(folders / "klein" / "text_encoder", folders / "klein" / "tokenizer", dtype=torch.float32)
    expected = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=Qwen3ForCausalLM.from_pretrained(folders / "klein" / "text_encoder").eval(), tokenizer=ours.tokenizer,
        prompt=PROMPTS, max_sequence_length=max_length)
    got = ours(PROMPTS, max_length)
    assert got.shape == (2, max_length, 3 * 16) and ours.width == 48
    assert torch.equal(got, expected)


@pytest.mark.parametrize("max_length", [512, 40])
@torch.no_grad()
def test_mistral3_matches_flux2_pipeline(folders, max_length):
    ours = Flux2PromptEncoder.from_pretrained(folders / "dev" / "text_encoder", folders / "dev" / "tokenizer", dtype=torch.float32)
    expected = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        text_encoder=Mistral3ForConditionalGeneration.from_pretrained(folders / "dev" / "text_encoder").eval(),
        tokenizer=ours.tokenizer, prompt=PROMPTS, max_sequence_length=max_length)
    got = ours(PROMPTS, max_length)
    assert got.shape == (2, max_length, 3 * 16)
    assert torch.equal(got, expected)
    assert ours.template("a [IMG]cat").startswith("<s>[SYSTEM_PROMPT]" + SYSTEM_MESSAGE) and "[IMG]" not in ours.template("[IMG]")


def test_loading_errors_are_named(folders, tmp_path):
    T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)).save_pretrained(tmp_path / "t5")
    with pytest.raises(CheckpointError, match="holds a 't5' model; expected 'qwen3' or 'mistral3'"):
        Flux2PromptEncoder.from_pretrained(tmp_path / "t5", folders / "klein" / "tokenizer")
    tokenizer = mistral_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="the tokenizer has no chat template"):
        Flux2PromptEncoder.from_pretrained(folders / "dev" / "text_encoder", tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no tokenizer folder at"):
        Flux2PromptEncoder.from_pretrained(folders / "dev" / "text_encoder", tmp_path / "missing")


def test_unread_layers_are_dropped(folders):
    ours = Flux2PromptEncoder.from_pretrained(folders / "dev" / "text_encoder", folders / "dev" / "tokenizer", dtype=torch.float32)
    assert len(ours.model.language_model.layers) == 31  # of 33: hidden state 30 is the last one read
    ours = Flux2PromptEncoder.from_pretrained(folders / "klein" / "text_encoder", folders / "klein" / "tokenizer", dtype=torch.float32)
    assert len(ours.model.layers) == ours.model.config.num_hidden_layers == 28
