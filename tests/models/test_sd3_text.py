"""SD3's text stack against diffusers' StableDiffusion3Pipeline.encode_prompt on tiny random CLIP-L, CLIP-G
and T5 with locally built tokenizers; T5 optional (zeros) and T5 asked for but missing."""

import pytest
import torch

from rectiflow.errors import ConfigError
from rectiflow.models.text import load_text_encoder
from sd3_fixtures import save_sd3_text

diffusers = pytest.importorskip("diffusers")

T5_LEN = 12
PROMPTS = ["a photo of a red circle", "two blue square and a circle"]


@pytest.fixture(scope="module")
def sd3_spec(tmp_path_factory):
    return save_sd3_text(tmp_path_factory.mktemp("sd3text"), max_length=T5_LEN)


def _reference(spec, with_t5: bool):
    """diffusers' encode_prompt on the same folders (the transformer gives the zero-T5 width)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=56, pos_embed_max_size=8)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=CLIPTextModelWithProjection.from_pretrained(spec["clip_l_path"]),
        tokenizer=AutoTokenizer.from_pretrained(spec["clip_l_tokenizer_path"]),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(spec["clip_g_path"]),
        tokenizer_2=AutoTokenizer.from_pretrained(spec["clip_g_tokenizer_path"]),
        text_encoder_3=T5EncoderModel.from_pretrained(spec["t5_path"]) if with_t5 else None,
        tokenizer_3=AutoTokenizer.from_pretrained(spec["t5_tokenizer_path"]) if with_t5 else None)
    with torch.no_grad():
        txt, _, vec, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                            do_classifier_free_guidance=False, max_sequence_length=T5_LEN)
    return txt, vec


@pytest.mark.parametrize("with_t5", [True, False], ids=["clip+t5", "clip-only"])
def test_equals_diffusers_encode_prompt(sd3_spec, with_t5):
    spec = sd3_spec if with_t5 else {**{k: v for k, v in sd3_spec.items() if not k.startswith("t5")},
                                     "t5_dim": 64}
    enc = load_text_encoder(spec)
    txt, vec = enc.encode(PROMPTS)
    ref_txt, ref_vec = _reference(sd3_spec, with_t5)
    assert txt.shape == ref_txt.shape == (2, 77 + T5_LEN, 64) and vec.shape == ref_vec.shape == (2, 56)
    torch.testing.assert_close(txt, ref_txt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vec, ref_vec, rtol=1e-5, atol=1e-6)
    assert (txt[:, :77, 56:] == 0).all()  # CLIP features zero-padded to T5's width
    assert (txt[:, 77:] == 0).all() != with_t5  # T5 tokens: zeros exactly when there is no T5
    assert (enc.txt_dim, enc.vec_dim) == (64, 56)
    assert load_text_encoder(enc.spec()).fingerprint() == enc.fingerprint()


def test_t5_asked_for_but_missing(sd3_spec):
    spec = {k: v for k, v in sd3_spec.items() if not k.startswith("t5")}
    with pytest.raises(ConfigError, match="T5 was asked for .* but no t5_path is given"):
        load_text_encoder({**spec, "require_t5": True})
    with pytest.raises(ConfigError, match="give both t5_path and t5_tokenizer_path"):
        load_text_encoder({**spec, "t5_path": sd3_spec["t5_path"]})
