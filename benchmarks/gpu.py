"""The GPU benchmark: a random-weight, 7B-shaped Mistral in bf16, built on the GPU, and mechun's hot paths on it.

One command, a few minutes (no download, nothing written to disk but the JSON):

    python benchmarks/gpu.py [--json gpu.json]                    # on a machine with a CUDA GPU
    python benchmarks/gpu.py --shape mistral-tiny --device cpu     # the same script in seconds (what the tests run)

It builds the model from its config on the device (Mistral-7B: 32 layers, d_model 4096, 32 query / 8 key-value
heads, MLP 14336, vocabulary 32000), wraps it as mechun does a checkpoint (:func:`mechun.models.wrap_model`), and
prints, side by side and as ratios (each the best of ``--repeats`` turns, contenders alternating, CUDA synchronised):

* caching every layer's last position (``cache_residuals``) vs a bare forward of the model body, and TL's
  ``run_with_cache``;
* activation patching, resid_pre at every layer x 16 positions, vs ``transformer_lens.patching`` (and the max
  |difference|, bf16);
* attribution patching, resid_pre / attn_out / mlp_out at every layer x 64 positions, vs one forward;

and the peak GPU memory of caching 1,000 prompts (every layer, last position) and of one RMU step (with the
frozen copy RMU needs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import best_times, prompt, random_config, word_tokenizer
from transformer_lens import patching
from transformers import AutoModelForCausalLM

import mechun
from mechun.io import write_json
from mechun.localize import activation_patching, attribution_patching, last_position
from mechun.models import bare_forward_view, hf_state_dict


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="mistral-7b", choices=["mistral-7b", "mistral-tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=1000, help="prompts cached for the peak-memory measurement")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.json and (args.json.exists() or args.json.is_symlink()):  # before any work; never replaces a file
        raise SystemExit(f"--json {args.json} already exists; pass a new path (the benchmark never replaces a file)")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run with --device cpu --shape mistral-tiny to check the script")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    started = time.perf_counter()
    out: dict = {"shape": args.shape, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                 "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__}

    cfg = random_config(args.shape)
    torch.manual_seed(0)
    with torch.device(dev):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    model = mechun.wrap_model(hf, word_tokenizer(cfg.vocab_size))
    weights_gib = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**30
    out["build_s"], out["weights_gib"] = time.perf_counter() - started, weights_gib
    print(f"{args.shape} on {out['device']} ({out['dtype']}): {weights_gib:.1f} GiB of weights, built in "
          f"{out['build_s']:.0f} s")
    bare, _ = bare_forward_view(model)

    with torch.inference_mode():
        ids, mask = mechun.tokenize(model, [prompt(127, 100 + 50 * i) for i in range(8)])
        ids, mask = ids.to(dev), mask.to(dev)
        t = best_times({
            "body": lambda: bare.base_model(ids, attention_mask=mask, use_cache=False),
            "mechun": lambda: mechun.cache_residuals(model, ids, attention_mask=mask, batch_size=len(ids),
                                                     progress=False, store_device=dev),
            "tl": lambda: model.run_with_cache(ids, attention_mask=mask)}, args.repeats, sync)
        out["caching"] = {"batch": list(ids.shape), **{f"{k}_s": v for k, v in t.items()},
                          "ratio": t["mechun"] / t["body"], "tl_ratio": t["tl"] / t["body"]}

        clean = prompt(15)
        corrupt = clean.replace("w103", "w777")
        metric = last_position(lambda logits: logits[:, -1, 5].float() - logits[:, -1, 6].float())
        ids_c = mechun.tokenize(model, [clean])[0].to(dev)
        ids_x = mechun.tokenize(model, [corrupt])[0].to(dev)

        def tl():
            _, cache = model.run_with_cache(ids_c)
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                return patching.get_act_patch_resid_pre(model, ids_x, cache, lambda logits: metric(logits)[0])

        ours, theirs = activation_patching(model, clean, corrupt, metric), tl()
        t = best_times({"mechun": lambda: activation_patching(model, clean, corrupt, metric), "tl": tl},
                       args.repeats, sync)
        out["activation_patching"] = {"layers": int(model.cfg.n_layers), "positions": int(ids_c.shape[1]),
                                      "mechun_s": t["mechun"], "tl_s": t["tl"], "speedup": t["tl"] / t["mechun"],
                                      "max_abs_difference": float((ours.scores - theirs.float().cpu()).abs().max()),
                                      "score_range": float(theirs.float().abs().max())}
        long_clean = prompt(63)
        long_corrupt = long_clean.replace("w103", "w777")
        ids_long = mechun.tokenize(model, [long_clean])[0].to(dev)

    def forward():
        with torch.inference_mode():
            hf(ids_long, use_cache=False)

    t = best_times({"forward": forward,
                    "mechun": lambda: attribution_patching(model, long_clean, long_corrupt, metric)}, args.repeats, sync)
    out["attribution_patching"] = {"positions": int(ids_long.shape[1]), "forward_s": t["forward"],
                                   "mechun_s": t["mechun"], "ratio": t["mechun"] / t["forward"]}

    def peak(fn) -> float:
        if not cuda:
            fn()
            return float("nan")
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync()
        return torch.cuda.max_memory_allocated(dev) / 2**30

    texts = [prompt(32, 100 + 7 * i) for i in range(args.prompts)]
    t0 = time.perf_counter()
    out["cache_1k"] = {"prompts": len(texts), "tokens_each": 32, "peak_gib": peak(
        lambda: mechun.cache_residuals(model, texts, batch_size=64, progress=False))}
    out["cache_1k"]["seconds"] = time.perf_counter() - t0

    from mechun.unlearn.rmu import RMUConfig, rmu_unlearn

    with torch.device(dev):  # the frozen copy RMU compares with: the same weights, copied in
        frozen_hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    frozen_hf.load_state_dict(hf_state_dict(model))
    frozen = mechun.wrap_model(frozen_hf, word_tokenizer(cfg.vocab_size))
    forget = {"bio": [prompt(64, 1000 + 11 * i) for i in range(64)]}
    retain = [prompt(64, 9000 + 13 * i) for i in range(64)]
    t0 = time.perf_counter()
    out["rmu_step"] = {"batch": 4, "tokens_each": 64, "peak_gib": peak(lambda: rmu_unlearn(
        model, frozen, forget, retain, RMUConfig(forget_domains=["bio"], steps=1, batch_size=4), progress=False))}
    out["rmu_step"]["seconds"] = time.perf_counter() - t0
    out["total_s"] = time.perf_counter() - started

    c, a, r = out["caching"], out["activation_patching"], out["attribution_patching"]
    print(f"caching, {c['batch'][0]} x {c['batch'][1]} tokens: {c['ratio']:.2f}x a bare body forward "
          f"({c['body_s'] * 1e3:.1f} ms); TL run_with_cache {c['tl_ratio']:.2f}x")
    print(f"activation patching, resid_pre {a['layers']} layers x {a['positions']} positions: mechun "
          f"{a['mechun_s']:.2f} s, TL {a['tl_s']:.2f} s = {a['speedup']:.1f}x; max |difference| "
          f"{a['max_abs_difference']:.1e} (scores up to {a['score_range']:.2f})")
    print(f"attribution patching, 3 hooks x {r['positions']} positions: {r['ratio']:.2f}x one forward "
          f"({r['forward_s'] * 1e3:.1f} ms)")
    print(f"peak GPU memory: caching {len(texts)} prompts {out['cache_1k']['peak_gib']:.1f} GiB, one RMU step "
          f"{out['rmu_step']['peak_gib']:.1f} GiB (weights {weights_gib:.1f} GiB per copy); total "
          f"{out['total_s']:.0f} s")
    if args.json:
        write_json(args.json, out, indent=2)
    return out


if __name__ == "__main__":
    main()
