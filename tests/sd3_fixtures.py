"""Tiny random SD3 text encoders with local tokenizers, in a diffusers SD3 repo's folder layout (shared by
the text-stack and pipeline tests)."""

import torch

from text_fixtures import WORDS, save_word_tokenizer


def _save_tokenizer(folder, template):
    save_word_tokenizer(folder, template, model_max_length=77)


def save_sd3_text(root, seed=0, max_length=12):
    """tokenizer{,_2,_3}/ and text_encoder{,_2,_3}/ as in a diffusers SD3 repo, tiny and random; T5's width
    (64) is the transformer's context width and exceeds CLIP-L + CLIP-G (24 + 32)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    for name in ("tokenizer", "tokenizer_2"):
        _save_tokenizer(root / name, "<s> $A </s>")
    _save_tokenizer(root / "tokenizer_3", "$A </s>")
    for name, width in (("text_encoder", 24), ("text_encoder_2", 32)):
        CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(WORDS), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, eos_token_id=2,
            bos_token_id=3, pad_token_id=0)).save_pretrained(root / name)
    T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=64, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                            pad_token_id=0, eos_token_id=2)).save_pretrained(root / "text_encoder_3")
    paths = {"clip_l_path": "text_encoder", "clip_g_path": "text_encoder_2",
             "clip_l_tokenizer_path": "tokenizer", "clip_g_tokenizer_path": "tokenizer_2",
             "t5_path": "text_encoder_3",
             "t5_tokenizer_path": "tokenizer_3"}
    return {"kind": "sd3", **{k: str(root / v) for k, v in paths.items()}, "max_length": max_length}
