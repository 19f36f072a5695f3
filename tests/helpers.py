"""Small builders the tests share: random checkpoints of every tested architecture, with a word-level tokenizer."""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
)

VOCAB = ["<pad>", "<unk>", "<bos>", "<eos>"] + [f"w{i}" for i in range(60)]
IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)


def arch_configs(gemma_window: int = 32):
    """One small config per architecture of ``mechun.models.TESTED_ARCHITECTURES`` (GQA where it exists)."""
    small = dict(vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, max_position_embeddings=64, **IDS)
    return {
        "gpt2": GPT2Config(vocab_size=len(VOCAB), n_embd=64, n_layer=3, n_head=4, n_positions=64, **IDS),
        "llama-gqa": LlamaConfig(num_key_value_heads=2, **small),
        "mistral-gqa": MistralConfig(num_key_value_heads=2, sliding_window=None, **small),
        "gemma2": Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=gemma_window, **small),
    }


def random_checkpoint(cfg, path):
    """A random-weight checkpoint dir of ``cfg`` with a word-level tokenizer over :data:`VOCAB`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # make the norms non-trivial so a wrongly applied final norm shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                            eos_token="<eos>").save_pretrained(path)
    return path
