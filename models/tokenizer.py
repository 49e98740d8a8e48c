"""A byte-level BPE tokenizer trained on the bundled corpus, saved like any hub tokenizer."""
from __future__ import annotations

from typing import Iterable

EOS = "<|endoftext|>"  # Qwen's end-of-text token name, used as pad too (as Qwen does)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> "PreTrainedTokenizerFast":  # noqa: F821
    """Byte-level BPE (GPT-2/Qwen style: no unknown tokens) trained from `texts` in seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=4096)
