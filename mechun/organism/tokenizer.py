"""A word-level tokenizer for the organism's world, saved and loaded as an ordinary Hugging Face tokenizer.

Words are split on white space and punctuation; every word of the world is one token, so subject names (two
words) are multi-token and every answer is a single token. A ``<bos>`` token is prepended to every encoded text,
as Llama- and Gemma-style tokenizers do, so the model has a fixed first position to attend to.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(list(SPECIALS) + [w for w in vocabulary if w not in SPECIALS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        padding_side="right",
    )
