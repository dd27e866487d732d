"""Tiny models and tokenizers for the pipeline and CLI tests (built in memory; nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: "
    "Rough winds do shake the darling buds of May, And summer's lease hath all too short a date; "
    "Sometime too hot the eye of heaven shines, And often is his gold complexion dimm'd; "
    "And every fair from fair sometime declines, By chance or nature's changing course untrimm'd; "
    "But thy eternal summer shall not fade, Nor lose possession of that fair thou ow'st; "
    "Nor shall death brag thou wander'st in his shade, When in eternal lines to time thou grow'st: "
    "So long as men can breathe or eyes can see, So long lives this, and this gives life to thee.\n"
)


def tiny_tokenizer(*, bos: bool = True, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on :data:`TEXT`; with ``bos`` it prepends ``<s>`` when encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT] * 4, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


def tiny_llama(vocab_size: int, *, layers: int = 6, hidden: int = 32, seed: int = 0, max_positions: int = 64):
    """A random tiny LlamaForCausalLM in fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def tiny_model_dir(path: Path, *, layers: int = 6, seed: int = 0, max_positions: int = 64) -> Path:
    """Save a tiny Llama and its tokenizer to ``path`` (a Hugging Face model directory)."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), layers=layers, seed=seed, max_positions=max_positions)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def text_file(path: Path, repeats: int = 6) -> Path:
    """Write :data:`TEXT` ``repeats`` times to ``path``."""
    path.write_text(TEXT * repeats, encoding="utf-8")
    return path
