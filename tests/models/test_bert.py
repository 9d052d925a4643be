"""The plain-torch BERT behind the MiniLM text encoder against transformers' BertModel (same weights), the
fingerprint it keeps, and the cold-start promise: encoding with MiniLM imports no transformers."""

import subprocess
import sys

import pytest
import torch

from rectiflow.errors import FormatError
from rectiflow.models.bert import load_bert
from rectiflow.models.text import MiniLMTextEncoder, _minilm_dir, load_text_encoder
from rectiflow.models.text_base import FrozenEncoder

PROMPTS = ["a photo of a red circle", "", "a photo of an orange triangle and a purple diamond left of a star",
           "Ünïcode, punctuation!? and UPPER case", "photo " * 40]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer, BertModel

    return AutoTokenizer.from_pretrained(_minilm_dir()), BertModel.from_pretrained(_minilm_dir()).eval()


def test_bert_equals_transformers_on_a_padded_batch(hf):
    tok, reference = hf
    ours = load_bert(_minilm_dir())
    assert ours.state_dict().keys() == reference.state_dict().keys()
    batch = tok(PROMPTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want = reference(**batch, output_hidden_states=True)
        last, hidden = ours(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    assert len(hidden) == len(want.hidden_states) == 7
    keep = batch["attention_mask"].bool()  # padded rows of the output are not used by anyone
    for a, b in zip(hidden, want.hidden_states):
        torch.testing.assert_close(a[keep], b[keep], rtol=0, atol=1e-5)
    torch.testing.assert_close(last[keep], want.last_hidden_state[keep], rtol=0, atol=1e-5)


def test_minilm_tokenizer_and_fingerprint_equal_the_transformers_ones(hf):
    tok, reference = hf
    enc = load_text_encoder("minilm:24")
    assert [enc.count_tokens(p) for p in PROMPTS] == [len(i) for i in tok(PROMPTS)["input_ids"]]
    ids = tok(PROMPTS, padding="max_length", max_length=24, truncation=True)
    mine = enc._padding_tokenizer.encode_batch(PROMPTS)
    assert [e.ids for e in mine] == ids["input_ids"]
    assert [e.attention_mask for e in mine] == ids["attention_mask"]
    # the identity caches record (rectiflow.data.cache_writer), as it was computed with transformers' objects
    old = MiniLMTextEncoder.__new__(MiniLMTextEncoder)
    FrozenEncoder.__init__(old)
    old.max_length, old.normalize, old.layer, old.tokenizer, old.model = 24, True, None, tok, reference
    assert enc.fingerprint() == old.fingerprint()


def test_encoding_with_minilm_imports_no_transformers():
    code = ("import sys; from rectiflow.models.text import load_text_encoder; "
            "txt, vec = load_text_encoder('minilm').encode(['a photo of a red circle']); "
            "assert txt.shape == (1, 16, 384); assert 'transformers' not in sys.modules, 'transformers'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_load_bert_refuses_other_checkpoints(tmp_path):
    import json

    from safetensors.torch import save_file

    config = json.loads((_minilm_dir() / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"embeddings.word_embeddings.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(FormatError, match="not a BERT checkpoint of this shape"):
        load_bert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, position_embedding_type="relative_key")))
    with pytest.raises(FormatError, match="absolute positions"):
        load_bert(tmp_path)
