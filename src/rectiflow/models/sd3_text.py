"""SD3 / SD3.5's text stack: CLIP-L + CLIP-G (+ T5-XXL, optional) -> txt [B, 77 + L_t5, 4096], vec [B, 2048].

The combination (Esser et al. 2024, section 3; diffusers StableDiffusion3Pipeline.encode_prompt, read for
the order of operations; Stability sd3_impls.py / sd3_infer.py agree):
- each CLIP tokenises to 77 tokens (padding to max_length, truncation, no attention mask); its token
  features are the penultimate hidden state (hidden_states[-2]), its pooled vector the projected
  `text_embeds` of CLIPTextModelWithProjection;
- CLIP-L (768) ++ CLIP-G (1280) on channels = 2048, zero-padded to T5's width (4096);
- T5-XXL's last hidden state (max_length tokens, 256 by default as diffusers; padding to max_length,
  truncation, no mask), or zeros of that shape when there is no T5 (the published models accept it);
- txt = [CLIP tokens; T5 tokens] on the sequence axis; vec = pooled CLIP-L ++ pooled CLIP-G.
transformers stays in rectiflow.models.text (its load_hf / load_tokenizer load the parts).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rectiflow.errors import ConfigError, FormatError
from rectiflow.models.text_base import (
    CLIP_MAX_LENGTH,
    FrozenEncoder,
    check_length,
    dropped_warning,
    load_hf,
    load_tokenizer,
    log,
    token_counts,
)

__all__ = ["SD3TextEncoder", "SD3_T5_MAX_LENGTH", "SD3_T5_DIM"]

# diffusers StableDiffusion3Pipeline: max_sequence_length=256 (Stability's sd3_infer.py uses 77).
SD3_T5_MAX_LENGTH = 256
SD3_T5_DIM = 4096  # T5-XXL d_model = the MMDiT's context width (joint_attention_dim)


class SD3TextEncoder(FrozenEncoder):
    """CLIP-L, CLIP-G and optionally T5 from local folders (text_encoder/, text_encoder_2/,
    text_encoder_3/ and tokenizer*/ of a diffusers SD3 repo). Without T5, its tokens are zeros of width
    `t5_dim`; `require_t5=True` makes a missing T5 an error instead."""

    CLIP_KEYS = ("clip_l_path", "clip_g_path", "clip_l_tokenizer_path", "clip_g_tokenizer_path")
    T5_KEYS = ("t5_path", "t5_tokenizer_path")
    PATH_KEYS = CLIP_KEYS + T5_KEYS

    def __init__(self, clip_l_path, clip_g_path, clip_l_tokenizer_path, clip_g_tokenizer_path,
                 t5_path=None, t5_tokenizer_path=None, max_length: int = SD3_T5_MAX_LENGTH,
                 t5_dim: int = SD3_T5_DIM, require_t5: bool = False, device="cpu",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        given = dict(zip(self.PATH_KEYS, (clip_l_path, clip_g_path, clip_l_tokenizer_path,
                                          clip_g_tokenizer_path, t5_path, t5_tokenizer_path)))
        self.paths = {k: str(v) for k, v in given.items() if v is not None}
        if (t5_path is None) != (t5_tokenizer_path is None):
            raise ConfigError("SD3 text encoder: give both t5_path and t5_tokenizer_path, or neither")
        if t5_path is None and require_t5:
            raise ConfigError("SD3 text encoder: T5 was asked for (require_t5) but no t5_path is given; "
                              "point it at text_encoder_3/ and tokenizer_3/, or allow running without T5")
        for key, p in self.paths.items():
            if not Path(p).is_dir():
                raise FormatError(f"SD3 text encoder: {key} {p} is not a directory; point it at the "
                                  "folder (text_encoder/, text_encoder_2/, text_encoder_3/, tokenizer*/ of "
                                  "an SD3 repo)")
        self.max_length = check_length("max_length", max_length)
        self.clip_l_tokenizer = load_tokenizer(self.paths["clip_l_tokenizer_path"])
        self.clip_g_tokenizer = load_tokenizer(self.paths["clip_g_tokenizer_path"])
        self.clip_l = load_hf("CLIPTextModelWithProjection", self.paths["clip_l_path"], device, dtype)
        self.clip_g = load_hf("CLIPTextModelWithProjection", self.paths["clip_g_path"], device, dtype)
        self.t5 = self.t5_tokenizer = None
        if t5_path is not None:
            self.t5_tokenizer = load_tokenizer(self.paths["t5_tokenizer_path"])
            self.t5 = load_hf("T5EncoderModel", self.paths["t5_path"], device, dtype)
            t5_dim = self.t5.config.d_model
        self.t5_dim = check_length("t5_dim", t5_dim, 1)
        clip_width = self.clip_l.config.hidden_size + self.clip_g.config.hidden_size
        if clip_width > self.t5_dim:
            raise ConfigError(f"SD3 text encoder: CLIP-L + CLIP-G give {clip_width} features, more than the "
                              f"T5 width {self.t5_dim} they are padded to")
        self.txt_dim = self.t5_dim
        self.vec_dim = self.clip_l.config.projection_dim + self.clip_g.config.projection_dim

    def _models(self):
        return {"clip_l": self.clip_l, "clip_g": self.clip_g, **({"t5": self.t5} if self.t5 else {})}

    def _tokenizers(self):
        toks = {"clip_l": self.clip_l_tokenizer, "clip_g": self.clip_g_tokenizer}
        return {**toks, **({"t5": self.t5_tokenizer} if self.t5_tokenizer else {})}

    def spec(self) -> dict:
        extra = {} if self.t5 is not None else {"t5_dim": self.t5_dim}
        return {"kind": "sd3", **self.paths, "max_length": self.max_length, **extra}

    def count_tokens(self, text: str) -> int:
        """Tokens `text` needs in the binding tokenizer (T5 if present, else CLIP-L) before truncation."""
        return token_counts(self.t5_tokenizer or self.clip_l_tokenizer, [text])[0]

    def _clip(self, model, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(prompts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                        return_tensors="pt")["input_ids"]  # [B, 77]
        out = model(input_ids=ids.to(model.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds  # penultimate layer [B, 77, D], projected pooled

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = list(prompts)
        msgs = [dropped_warning(token_counts(self.clip_l_tokenizer, prompts), CLIP_MAX_LENGTH, "CLIP", "")]
        if self.t5 is not None:
            msgs.append(dropped_warning(token_counts(self.t5_tokenizer, prompts), self.max_length, "T5", ""))
        msgs = [m.rstrip("; ") for m in msgs if m]
        if msgs:
            log.warning("SD3 text encoder: %s; shorten the prompts", "; ".join(msgs))
        l_txt, l_vec = self._clip(self.clip_l, self.clip_l_tokenizer, prompts)
        g_txt, g_vec = self._clip(self.clip_g, self.clip_g_tokenizer, prompts)
        clip = torch.cat([l_txt, g_txt], dim=-1)  # [B, 77, 768 + 1280]
        if self.t5 is not None:
            ids = self.t5_tokenizer(prompts, padding="max_length", max_length=self.max_length,
                                    truncation=True, return_tensors="pt")["input_ids"]  # [B, L]
            t5 = self.t5(input_ids=ids.to(self.t5.device)).last_hidden_state  # [B, L, 4096]
        else:
            t5 = clip.new_zeros(len(prompts), self.max_length, self.t5_dim)
        clip = F.pad(clip, (0, self.t5_dim - clip.shape[-1]))  # [B, 77, 4096], zeros on the right
        return torch.cat([clip, t5.to(clip.dtype)], dim=1), torch.cat([l_vec, g_vec], dim=-1)
