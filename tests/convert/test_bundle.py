"""Model bundles: our layout round trip, BFL and diffusers layouts that load and generate, bad directories."""

import json

import pytest
import torch

from rectiflow.convert.autoencoder import build_autoencoder, save_autoencoder
from rectiflow.convert.bundle import (
    SAMPLERS,
    SamplingDefaults,
    bundle_layout,
    defaults_for_model,
    load_bundle,
    save_bundle,
    weights_hash,
)
from rectiflow.convert.transformer import build_transformer, save_transformer
from rectiflow.errors import ConfigError, FormatError
from rectiflow.flow import METHODS
from rectiflow.models.text import load_text_encoder


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    return build_transformer("micro"), build_autoencoder("tiny"), load_text_encoder("minilm")


def _equal_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_our_layout_round_trip(parts, tmp_path):
    t, ae, enc = parts
    defaults = SamplingDefaults(steps=6, sampler="heun", shift=3.0, cfg_scale=2.5, width=64, height=32)
    root = save_bundle(tmp_path / "m", t, ae, enc, defaults, {"description": "test", "license": "MIT"},
                       name="micro-test")
    card = json.loads((root / "model.json").read_text())
    assert card["format"] == "rectiflow-bundle" and card["format_version"] == 1
    assert card["name"] == "micro-test" and card["description"] == "test"
    assert card["text_encoder"] == enc.spec() and card["defaults"]["sampler"] == "heun"
    assert bundle_layout(root) == "rectiflow"
    b = load_bundle(root)
    assert b.layout == "rectiflow" and b.name == "micro-test" and b.defaults == defaults
    assert _equal_state(b.transformer, t) and _equal_state(b.autoencoder, ae)
    assert b.card["license"] == "MIT" and len(b.model_hash) == 12
    assert load_bundle(root).model_hash == b.model_hash  # stable
    with torch.no_grad():
        t2 = build_transformer("micro")
    other = save_bundle(tmp_path / "m2", t2, ae, enc.spec(), defaults)
    assert load_bundle(other).model_hash != b.model_hash  # different weights, different identity
    bf = load_bundle(root, dtype=torch.bfloat16)
    assert next(bf.transformer.parameters()).dtype == torch.bfloat16


def test_save_bundle_refuses_to_clobber_and_bad_cards(parts, tmp_path):
    t, ae, enc = parts
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(FormatError, match="exists and is not a rectiflow bundle"):
        save_bundle(tmp_path / "home", t, ae, enc)
    assert (tmp_path / "home" / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="may not override"):
        save_bundle(tmp_path / "x", t, ae, enc, card_extra={"transformer": "evil.safetensors"})
    root = save_bundle(tmp_path / "ok", t, ae, enc, SamplingDefaults(width=64, height=64))
    save_bundle(root, t, ae, enc, SamplingDefaults(steps=9, width=64, height=64))  # replacing a bundle: ok
    assert load_bundle(root).defaults.steps == 9
    card = json.loads((root / "model.json").read_text())
    (root / "model.json").write_text(json.dumps(dict(card, format_version=99)))
    with pytest.raises(FormatError, match="format_version 99"):
        load_bundle(root)
    (root / "model.json").write_text(json.dumps(dict(card, defaults={"stepz": 3})))
    with pytest.raises(ConfigError, match="unknown sampling default"):
        load_bundle(root)
    (root / "model.json").write_text(json.dumps(card))
    (root / "ae.safetensors").unlink()
    with pytest.raises(FormatError, match="names autoencoder file 'ae.safetensors', which is missing"):
        load_bundle(root)
    (root / "model.json").write_text("{not json")
    with pytest.raises(FormatError, match="cannot read"):
        load_bundle(root)


def test_wrong_paths_name_what_was_expected(tmp_path):
    with pytest.raises(FormatError, match="does not exist; pass a directory holding model.json"):
        bundle_layout(tmp_path / "missing")
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(FormatError, match="is a file"):
        bundle_layout(tmp_path / "file.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="is not a model bundle: expected model.json"):
        load_bundle(tmp_path / "empty")
    sd = tmp_path / "sdxl"
    sd.mkdir()
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(FormatError, match="StableDiffusionXLPipeline, not a FLUX pipeline"):
        load_bundle(sd)


def test_bfl_layout_needs_text_encoder_folders(parts, tmp_path):
    t, ae, _ = parts
    save_transformer(t, tmp_path / "flux1-schnell.safetensors", format="bfl")
    save_autoencoder(ae, tmp_path / "ae.safetensors", format="bfl")
    assert bundle_layout(tmp_path) == "bfl"
    with pytest.raises(FormatError, match="lacks the text-encoder folder"):
        load_bundle(tmp_path)


def test_defaults_validation_and_published_defaults():
    assert SAMPLERS == METHODS  # the bundle layer's copy stays in sync with the solvers
    assert defaults_for_model(False) == SamplingDefaults(steps=4, shift=None, width=1024, height=1024)
    dev = defaults_for_model(True)
    assert (dev.steps, dev.shift, dev.guidance) == (28, "flux", 3.5)
    assert defaults_for_model(False, {"use_dynamic_shifting": False, "shift": 3.0}).shift == 3.0
    assert defaults_for_model(False, {"use_dynamic_shifting": True}).shift == "flux"
    for bad, match in [(dict(steps=0), "steps"), (dict(sampler="dpm"), "unknown sampler"),
                       (dict(width=100), "multiple of 16"), (dict(shift="sd3"), "shift"),
                       (dict(shift=-1.0), "shift"), (dict(cfg_scale=-1.0), "cfg_scale")]:
        with pytest.raises(ConfigError, match=match):
            SamplingDefaults(**bad)


def test_weights_hash_sampled_for_large_files(tmp_path, monkeypatch):
    import rectiflow.convert.bundle_types as bundle

    f = tmp_path / "w.safetensors"
    f.write_bytes(bytes(range(256)) * 64)
    full = weights_hash([f])
    monkeypatch.setattr(bundle, "FULL_HASH_LIMIT", 1024)
    monkeypatch.setattr(bundle, "_HASH_SAMPLE", 64)
    sampled = weights_hash([f])
    assert full != sampled and len(sampled) == 12
    data = bytearray(f.read_bytes())
    data[0] ^= 1
    f.write_bytes(bytes(data))
    assert weights_hash([f]) != sampled  # the first sample starts at offset 0


# --------------------------------------------------------------------------------- diffusers and BFL layouts

WORDS = ["<pad>", "<unk>", "</s>", "<s>", "a", "red", "circle", "blue", "square", "photo", "of"]


def _save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                            bos_token="<s>").save_pretrained(folder)


def _save_text_encoders(root):
    """Tiny random CLIP (text_encoder/) and T5 (text_encoder_2/) with locally built tokenizers."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    _save_tokenizer(root / "tokenizer")
    _save_tokenizer(root / "tokenizer_2")
    clip = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, eos_token_id=2, bos_token_id=3,
                          pad_token_id=0)
    CLIPTextModel(clip).save_pretrained(root / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                            pad_token_id=0, eos_token_id=2)).save_pretrained(root / "text_encoder_2")


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    """A FluxPipeline folder written by diffusers / transformers themselves (tiny random components)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    root = tmp_path_factory.mktemp("diffusers") / "tiny-flux"
    torch.manual_seed(0)
    _save_text_encoders(root)
    # head dim 128 with FLUX's RoPE axes (16, 56, 56): a BFL file of it needs no config to load
    FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                           attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32,
                           pooled_projection_dim=32, guidance_embeds=False,
                           axes_dims_rope=(16, 56, 56)).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32),
                  layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                  use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
                  ).save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0,
                                                                          "use_dynamic_shifting": False}))
    return root


def test_diffusers_layout_loads_and_generates(diffusers_dir):
    from rectiflow.sample import Pipeline

    b = load_bundle(diffusers_dir)
    assert b.layout == "diffusers" and b.name == "tiny-flux" and b.defaults.shift == 3.0
    assert b.defaults.steps == 4 and b.defaults.guidance is None  # schnell-like: no guidance embedding
    pipe = Pipeline.from_bundle(diffusers_dir)
    res = pipe("a red circle", steps=2, width=32, height=32, progress=False)
    assert res.images[0].size == (32, 32) and res.settings[0]["model_hash"] == b.model_hash


def test_bfl_layout_loads_and_generates_like_diffusers(diffusers_dir, tmp_path):
    import shutil

    from rectiflow.convert.autoencoder import load_autoencoder
    from rectiflow.convert.transformer import load_transformer
    from rectiflow.sample import Pipeline

    bfl = tmp_path / "bfl"
    bfl.mkdir()
    save_transformer(load_transformer(diffusers_dir / "transformer"), bfl / "flux1-schnell.safetensors",
                     format="bfl")
    save_autoencoder(load_autoencoder(diffusers_dir / "vae"), bfl / "ae.safetensors", format="bfl")
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(diffusers_dir / sub, bfl / sub)
    b = load_bundle(bfl)
    assert b.layout == "bfl" and b.name == "flux1-schnell" and b.defaults.shift is None
    kw = dict(steps=2, width=32, height=32, seed=4, shift=None, progress=False)
    a = Pipeline.from_bundle(bfl)("a blue square", **kw)
    d = Pipeline.from_bundle(diffusers_dir)("a blue square", **kw)
    torch.testing.assert_close(a.latents, d.latents, rtol=1e-5, atol=1e-5)  # same weights, both layouts
