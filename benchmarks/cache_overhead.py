"""Cost of caching the residual stream, relative to a bare Hugging Face forward of the same checkpoint.

Measured side by side in one run, interleaved, best of several repeats, on one thread:
  * bare HF forward   -- AutoModelForCausalLM (eager attention), no hooks
  * mechun            -- cache_residuals(all layers, last position)
  * TL run_with_cache -- the TransformerLens bridge caching every hook point

    python benchmarks/cache_overhead.py [--model DIR] [--batch 64] [--repeats 7]

Without --model it trains the tiny organism into a temporary directory first. Goal: mechun <= 1.10x.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import organism
from transformers import AutoModelForCausalLM

import mechun
import mechun.models


def best_time(fn, inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="organism checkpoint dir (default: train the tiny organism)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.model, world, model, tmp = organism(args.model)
    bare = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager").eval()
    mechun.models.fuse_activations(bare)  # as load_model does: the same GELU kernel on both sides
    prompts = [p.text for p in world.prompts()][: args.batch]
    ids, mask = mechun.tokenize(model, prompts)

    contenders = {
        "bare HF forward": lambda: bare(ids, attention_mask=mask),
        "mechun cache_residuals (all layers, last pos)": lambda: mechun.cache_residuals(
            model, ids, attention_mask=mask, batch_size=len(prompts), progress=False),
        "TL run_with_cache (bridge, every hook)": lambda: model.run_with_cache(ids, attention_mask=mask),
        "bridge forward, no hooks": lambda: model(ids, attention_mask=mask),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    with torch.inference_mode():
        for fn in contenders.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                times[name].append(best_time(fn, args.inner))
    base = min(times["bare HF forward"])
    print(f"model {args.model}: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}, "
          f"batch {ids.shape[0]}x{ids.shape[1]}, {args.threads} thread(s)")
    for name, ts in times.items():
        print(f"{name:<48} {min(ts) * 1e3:8.2f} ms   {min(ts) / base:5.2f}x bare forward")
    ratio = min(times["mechun cache_residuals (all layers, last pos)"]) / base
    print(f"goal <= 1.10x: {'met' if ratio <= 1.10 else 'NOT met'} ({ratio:.2f}x)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
