"""Local word-level tokenizers for tiny random text encoders (FLUX's T5 / CLIP pair and SD3's three), saved
in the transformers layout the encoders load from disk; nothing is downloaded."""

WORDS = ["<pad>", "<unk>", "</s>", "<s>", "a", "red", "circle", "blue", "square", "photo", "of", "and", "two"]


def save_word_tokenizer(folder, template, **kwargs):
    """A word-level tokenizer over WORDS in `folder`; `template` adds the special tokens the way T5
    ("$A </s>") / CLIP ("<s> $A </s>") do; kwargs go to PreTrainedTokenizerFast (e.g. model_max_length)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=template,
                                                       special_tokens=[("</s>", 2), ("<s>", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                            bos_token="<s>", **kwargs).save_pretrained(folder)
