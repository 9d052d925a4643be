"""A BERT encoder in plain torch, for the MiniLM text encoder: loading it through transformers costs more
than a whole cold `rectiflow generate` should (importing transformers pulls in torch.distributed, dynamo and
sympy), and generation needs only the forward pass.

Module and parameter names are those of transformers' BertModel (modeling_bert.py: embeddings.*,
encoder.layer.N.attention.self.query/key/value, attention.output.dense/LayerNorm, intermediate.dense,
output.dense/LayerNorm, pooler.dense), so its checkpoints load with strict=True and its state_dict is the
same.
The forward pass is BertModel's in eval mode: word + position + token-type (0) embeddings, LayerNorm; per
layer, softmax(q k^T / sqrt(d_head) masked on padded keys) v, dense, residual LayerNorm, GELU (erf) MLP,
residual LayerNorm. Parity with transformers: tests/models/test_bert.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rectiflow.errors import FormatError

__all__ = ["BertEncoder", "load_bert"]


class _Embeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["hidden_size"]

        def table(n: int, **kw) -> nn.Embedding:  # uninitialised: the checkpoint fills it
            return nn.Embedding(n, d, _weight=torch.empty(n, d), **kw)

        self.word_embeddings = table(cfg["vocab_size"], padding_idx=cfg.get("pad_token_id", 0))
        self.position_embeddings = table(cfg["max_position_embeddings"])
        self.token_type_embeddings = table(cfg.get("type_vocab_size", 2))
        self.LayerNorm = nn.LayerNorm(d, eps=cfg["layer_norm_eps"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, L] -> [B, L, D]
        pos = torch.arange(ids.shape[1], device=ids.device)
        # transformers' order of the sums: (word + token type) + position
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x + self.position_embeddings(pos))


class _Linear(nn.Module):
    """A `dense` Linear with an optional `LayerNorm` (BertSelfOutput / BertOutput / BertIntermediate)."""

    def __init__(self, d_in: int, d_out: int, eps: float | None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class _SelfAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class _Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.self = _SelfAttention(cfg["hidden_size"])
        self.output = _Linear(cfg["hidden_size"], cfg["hidden_size"], cfg["layer_norm_eps"])


class _Layer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.heads = cfg["num_attention_heads"]
        self.attention = _Attention(cfg)
        self.intermediate = _Linear(d, cfg["intermediate_size"], None)
        self.output = _Linear(cfg["intermediate_size"], d, eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        a = self.attention.self

        def heads(t):  # [B, L, D] -> [B, H, L, D / H]
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = heads(a.query(x)), heads(a.key(x)), heads(a.value(x))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1 / math.sqrt(d // self.heads))
        ctx = ctx.transpose(1, 2).reshape(b, n, d)  # [B, H, L, D / H] -> [B, L, D]
        out = self.attention.output
        x = out.LayerNorm(x + out.dense(ctx))
        h = F.gelu(self.intermediate.dense(x))  # hidden_act "gelu": the exact (erf) GELU
        return self.output.LayerNorm(x + self.output.dense(h))


class _Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg["num_hidden_layers"]))


class _Pooler(nn.Module):  # unused by the text encoder; kept so that checkpoints load strictly
    def __init__(self, d: int):
        super().__init__()
        self.dense = nn.Linear(d, d)


class BertEncoder(nn.Module):
    """BertModel's encoder stack; `forward` returns the last hidden state and, on request, every hidden
    state (index 0: the embeddings, as transformers' `hidden_states`)."""

    hf_class_name = "BertModel"  # the identity the text encoder's fingerprint has always recorded

    def __init__(self, config: dict):
        super().__init__()
        if config.get("position_embedding_type", "absolute") != "absolute" or config["hidden_act"] != "gelu":
            raise FormatError("only BERT models with absolute positions and GELU are supported")
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.pooler = _Pooler(config["hidden_size"])

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        keep = attention_mask.bool()[:, None, None, :]  # [B, L] -> [B, 1, 1, L]: padded keys masked
        x = self.embeddings(input_ids)
        states = [x]
        for layer in self.encoder.layer:
            x = layer(x, keep)
            states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


def load_bert(folder: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> BertEncoder:
    """config.json + model.safetensors of a BERT checkpoint (transformers' layout), loaded strictly."""
    from rectiflow.io.safetensors_io import load_tensors

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    # On the meta device: no time spent initialising weights that the checkpoint replaces. (The embedding
    # tables are created from empty tensors: initialising one there, normal_, would import torch._dynamo.)
    with torch.device("meta"):
        model = BertEncoder(config)
    state = load_tensors(folder / "model.safetensors")
    state = {k.removeprefix("bert."): v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise FormatError(f"{folder / 'model.safetensors'} is not a BERT checkpoint of this shape: missing "
                          f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
