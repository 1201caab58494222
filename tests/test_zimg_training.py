"""The small Z-Image's training (zimg/training.py): what it learns reaches the pipeline with the right time and sign.
Whole runs (the snapshot they write, warm starts) are tested with FLUX.1's in test_training.py."""


from zflux.common.vae import Autoencoder, AutoencoderConfig
from zflux.zimg.model import ZImageConfig
from zflux.zimg.text import Qwen3PromptEncoder
from zflux.zimg.training import RULE, build_denoiser, build_tokenizer, pipeline
from tiny_pipelines import one_thread  # noqa: F401 (autouse fixture)
from util import CAPTION_BATCH, draws_caption_values, learn_caption_values

TINY = ZImageConfig(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=(4, 6, 6),
                    axes_lens=(640, 8, 8))
TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=8, max_position_embeddings=512)
TINY_VAE = AutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


def test_learns_what_the_caption_says(tmp_path):
    """Trained for a moment to map two captions to latents of +1 and -1, the model samples them back through the
    Turbo pipeline (8 steps from noise, on average: a tiny model this short-trained leaves some noise): the
    training's time and sign are the pipeline's, and the caption reaches the transformer through the text encoder."""
    tokenizer = build_tokenizer()
    model = build_denoiser(tokenizer, seed=0, cfg=TINY, text_encoder=TINY_TEXT)
    encoder = Qwen3PromptEncoder(model.text_encoder, tokenizer)
    ids, mask = encoder.tokens([encoder.template(c) for c in CAPTION_BATCH])
    averaged = learn_caption_values(model, lambda m, x, t: m(x, t, ids, mask), RULE, tmp_path)
    assert draws_caption_values(pipeline(averaged, Autoencoder(TINY_VAE), tokenizer))
