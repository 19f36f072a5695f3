"""What the benchmark scripts share: the models they measure and a timer.

* the model organism (the cached main organism of ``mechun organism train``, or a checkpoint dir you name);
* :func:`random_checkpoint`: a random-weight checkpoint of a given shape (GPT-2-small, 7B Mistral) with a word-level
  tokenizer of the same vocabulary size, saved where asked and loaded through ``mechun.load_model`` like any other.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: Architectures by the shape their name gives (random weights: speed does not depend on what was learned).
SHAPES = {
    "gpt2-small": dict(model_type="gpt2"),  # GPT2Config() defaults: 12 layers, d 768, 12 heads, vocab 50257
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, sliding_window=None,
                       max_position_embeddings=4096),
    "mistral-tiny": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=16000, sliding_window=None),
}


def random_config(shape: str):
    from transformers import AutoConfig

    spec = dict(SHAPES[shape])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over ``w0 w1 ...`` filling the vocabulary (id 0 end of text, 1 unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<|endoftext|>", "<unk>"] + [f"w{i}" for i in range(vocab_size - 2)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", unk_token="<unk>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def random_checkpoint(shape: str, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A random-weight checkpoint of ``shape`` (:data:`SHAPES`) saved at ``out`` (reused if already there)."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").is_file():
        return out
    cfg = random_config(shape)
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = 0
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out)
    word_tokenizer(cfg.vocab_size).save_pretrained(out)
    return out


def prompt(n_tokens: int, offset: int = 100) -> str:
    """``n_tokens`` words of the word-level tokenizer (``w{offset} ...``)."""
    return " ".join(f"w{i}" for i in range(offset, offset + n_tokens))


def turns(contenders: dict[str, Callable[[], object]], repeats: int,
          sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Each contender's time in each of ``repeats`` turns, in seconds, after one untimed warm-up call each. The
    contenders take turns (a, b, c, a, b, c, ...), so a slow spell of a shared machine hits them alike."""
    for fn in contenders.values():
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def best_times(contenders: dict[str, Callable[[], object]], repeats: int,
               sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """The fastest of each contender's :func:`turns`."""
    return {name: min(ts) for name, ts in turns(contenders, repeats, sync).items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """The median over turns of ``a``'s time over ``b``'s in the same turn: for ratios near 1, where one lucky turn
    of either contender would move a ratio of best times more than the difference being measured."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))
