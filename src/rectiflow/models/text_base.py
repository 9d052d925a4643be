"""What every text encoder of rectiflow.models.text and rectiflow.models.sd3_text shares: the frozen
transformers-backed encoder base (FrozenEncoder), tokenizer and weight loading, the truncation warning and
the spec checks. A module of its own so that the encoder families import it and not each other.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from rectiflow.errors import ConfigError

__all__ = ["CLIP_MAX_LENGTH", "FrozenEncoder", "truncation_warnings", "check_keys", "check_length",
           "hash_tensors", "dropped_warning", "load_hf", "load_tokenizer", "load_fast_tokenizer",
           "token_counts"]

log = logging.getLogger("rectiflow.models.text")  # one logger for every encoder's warnings

CLIP_MAX_LENGTH = 77  # CLIP-L's context length (BFL HFEmbedder max_length=77; diffusers tokenizer_max_length)
_HF_VOLATILE = ("transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
                "_attn_implementation_autoset", "architectures")


# ------------------------------------------------------------------------------------------- helpers
_WARN_TRUNCATION = contextvars.ContextVar("rectiflow_warn_truncation", default=True)


@contextlib.contextmanager
def truncation_warnings(enabled: bool):
    """Turn the encoders' per-call truncation warnings on or off inside the block (e.g. `rectiflow cache`
    encodes in many batches and says once, with the total, what it truncated)."""
    token = _WARN_TRUNCATION.set(enabled)
    try:
        yield
    finally:
        _WARN_TRUNCATION.reset(token)


def dropped_warning(needed: list[int], max_length: int, what: str, hint: str) -> str | None:
    """One message for all prompts of a call that need more than max_length tokens (None if none do, or
    inside `truncation_warnings(False)`)."""
    over = [n - max_length for n in needed if n > max_length]
    if not over or not _WARN_TRUNCATION.get():
        return None
    return (f"{what}: {len(over)} prompt(s) longer than max_length {max_length} tokens were truncated, "
            f"dropping {sum(over)} token(s) (longest needs {max(needed)}); {hint}")


def hash_tensors(h, state: dict[str, torch.Tensor]) -> None:
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())


def hf_config(model) -> dict:
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else transformers_config(model.config)
    return {k: v for k, v in sorted(cfg.items()) if k not in _HF_VOLATILE}


def transformers_config(config: dict) -> dict:
    """The dict transformers' config class would give for a raw config.json dict: the fingerprint of a
    plain-torch model (rectiflow.models.bert) hashes what it hashed when transformers loaded the model, so
    caches made before stay valid. Only fingerprints need it (caching), never generation."""
    import transformers

    return transformers.AutoConfig.for_model(**config).to_dict()


def tokenizer_identity(tok) -> str:
    """The whole fast tokenizer (vocab, merges, normaliser, special tokens) as JSON, else its vocab. Its
    truncation / padding state is left out: transformers rewrites it on every call with other settings."""
    backend = getattr(tok, "backend_tokenizer", tok if hasattr(tok, "to_str") else None)  # or `tokenizers`'
    if backend is not None:
        state = json.loads(backend.to_str())
        state = {k: v for k, v in state.items() if k not in ("truncation", "padding")}
        return json.dumps(state, sort_keys=True)
    return json.dumps(sorted(tok.get_vocab().items()))


def dtype_kw(transformers) -> str:
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype (the old name warns in v5).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def check_length(name: str, value: Any, low: int = 2) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"text encoder {name} must be an integer >= {low}, got {value!r}")
    return value


def check_keys(kind: str, spec: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    unknown = sorted(set(spec) - allowed - {"kind"})
    if unknown:
        raise ConfigError(f"text encoder spec of kind {kind!r} has unknown key(s) {unknown}; "
                          f"allowed: {sorted(allowed)}")
    missing = sorted(required - set(spec))
    if missing:
        raise ConfigError(f"text encoder spec of kind {kind!r} lacks {missing}")


# ------------------------------------------------------------------------- frozen transformers encoders
class FrozenEncoder:
    """Shared plumbing of the transformers-backed encoders (not nn.Modules: bundles do not copy their
    weights, which live in their own folders / package)."""

    txt_dim: int
    vec_dim: int
    max_length: int

    def __init__(self):
        self._fingerprint: tuple[torch.dtype, str] | None = None

    def _models(self) -> dict[str, Any]:
        raise NotImplementedError

    def _tokenizers(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(prompts)

    @property
    def device(self) -> torch.device:
        return next(iter(self._models().values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._models().values())).dtype

    def to(self, device: Any = None, dtype: torch.dtype | None = None):
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if kw:
            for m in self._models().values():
                m.to(**kw)
        return self

    def eval(self):
        for m in self._models().values():
            m.eval()
        return self

    def fingerprint(self) -> str:
        """sha256 over the spec (paths left out: a moved model keeps its identity), the tokenizers, the
        model configs and the weights in their current dtype. Computed once per dtype (weights are frozen)."""
        if self._fingerprint is None or self._fingerprint[0] != self.dtype:
            h = hashlib.sha256()
            spec = {k: v for k, v in self.spec().items() if not k.endswith("path")}
            h.update(json.dumps(spec, sort_keys=True).encode())
            for name, tok in sorted(self._tokenizers().items()):
                h.update(f"tokenizer {name}|".encode() + tokenizer_identity(tok).encode())
            for name, model in sorted(self._models().items()):
                h.update(f"model {name}|{getattr(model, 'hf_class_name', type(model).__name__)}|".encode())
                h.update(json.dumps(hf_config(model), sort_keys=True, default=str).encode())
                hash_tensors(h, model.state_dict())
            self._fingerprint = (self.dtype, h.hexdigest())
        return self._fingerprint[1]

    def spec(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


def load_hf(cls_name: str, path: str | Path, device, dtype):
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(str(path), local_files_only=True,
                                                            **{dtype_kw(transformers): dtype})
    return model.to(device).eval().requires_grad_(False)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_fast_tokenizer(folder: Path, max_length: int):
    """(counting, encoding) `tokenizers` Tokenizers from folder/tokenizer.json, as transformers' fast
    tokenizer uses it (same JSON): one without truncation or padding, one truncating and padding to
    max_length. Two objects, so that concurrent calls (a server's workers) never change each other's state."""
    from tokenizers import Tokenizer

    path = str(folder / "tokenizer.json")
    counting, encoding = Tokenizer.from_file(path), Tokenizer.from_file(path)
    counting.no_truncation()
    counting.no_padding()
    pad = encoding.token_to_id("[PAD]")
    encoding.enable_truncation(max_length)
    encoding.enable_padding(length=max_length, pad_id=pad, pad_token="[PAD]")
    return counting, encoding


def token_counts(tok, texts: list[str]) -> list[int]:
    if hasattr(tok, "encode_batch"):  # a `tokenizers` Tokenizer without truncation
        return [len(e.ids) for e in tok.encode_batch(list(texts))]
    # verbose=False: no "sequence longer than model_max_length" log, we report truncation ourselves.
    return [len(ids) for ids in tok(list(texts), truncation=False, verbose=False)["input_ids"]]
