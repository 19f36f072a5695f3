"""Batched activation patching vs TransformerLens' patching, side by side in one run on the organism.

Both sweep resid_pre over every (layer, position) of one clean/corrupt pair with the logit-difference metric;
the script checks they agree (max |diff|) and prints the speed-up. Goal: >= 10x.

    python benchmarks/patching_speed.py [--model DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import organism
from transformer_lens import patching

import mechun
from mechun.localize import activation_patching, logit_diff_metric


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="organism checkpoint dir (default: train the tiny organism)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.model, world, model, tmp = organism(args.model)
    facts = world.facts_of(relation="transmission")
    a = facts[0]
    b = next(f for f in facts[1:] if f.answer != a.answer)
    clean, corrupt = f"{a.subject} is transmitted by", f"{b.subject} is transmitted by"
    metric = logit_diff_metric(model, a.answer, b.answer)
    ids_c, _ = mechun.tokenize(model, [clean])
    ids_x, _ = mechun.tokenize(model, [corrupt])

    def ours():
        return activation_patching(model, clean, corrupt, metric, hook="resid_pre").scores

    def theirs():
        _, cache = model.run_with_cache(ids_c)
        return patching.get_act_patch_resid_pre(model, ids_x, cache, lambda logits: metric(logits)[0])

    with torch.inference_mode():
        diff = float((ours() - theirs().cpu()).abs().max())
        t_ours, t_tl = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ours()
            t_ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            theirs()
            t_tl.append(time.perf_counter() - t)
    n = model.cfg.n_layers * ids_c.shape[1]
    print(f"model {args.model}: {model.cfg.n_layers} layers x {ids_c.shape[1]} positions = {n} patches")
    print(f"mechun activation_patching (batched)  {min(t_ours) * 1e3:8.1f} ms")
    print(f"TL patching.get_act_patch_resid_pre   {min(t_tl) * 1e3:8.1f} ms")
    print(f"speed-up {min(t_tl) / min(t_ours):.1f}x (goal >= 10x); max |difference| {diff:.2e}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
