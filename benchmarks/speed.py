"""mechun's hot paths against their references, measured side by side in one run and printed as ratios.

For each model -- the model organism (the cached main organism) and a random-weight model of GPT-2-small shape
(12 layers, d_model 768, vocabulary 50,257) -- three measurements, each the best of ``--repeats`` timed calls, the
contenders taking turns:

1. **caching**: ``cache_residuals`` (every layer, last position) against a bare Hugging Face forward of the model
   *body* (``AutoModel``: the decoder without the LM head, eager attention), and TransformerLens' ``run_with_cache``
   on the bridge; three times ``--repeats`` turns, and the ratio is the median over turns of the two times in the
   same turn (it sits near 1, where one lucky turn would move a ratio of best times more than the difference
   measured; both are printed). Goal <= 1.05x.
2. **activation patching**: resid_pre at every layer x 16 positions (one clean/corrupt pair, logit-difference
   metric), mechun against ``transformer_lens.patching.get_act_patch_resid_pre``; the max |difference| of the two
   score grids is printed too. Goal >= 10x.
3. **attribution patching**: resid_pre, attn_out and mlp_out at every layer x 64 positions against one bare HF
   forward of the whole model on that prompt. Goal <= 3.5x.

    python benchmarks/speed.py [--threads 2] [--repeats 5] [--organism DIR] [--only organism|gpt2-small]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from common import best_times, paired_ratio, prompt, random_checkpoint, turns
from transformer_lens import patching
from transformers import AutoModel, AutoModelForCausalLM

import mechun
from mechun.io import write_json
from mechun.localize import activation_patching, attribution_patching, last_position
from mechun.models import fuse_activations


def _bare(path: Path, cls):
    model = cls.from_pretrained(path, attn_implementation="eager").eval()
    fuse_activations(model)  # as load_model does: the same GELU kernel on both sides
    return model


def _fit(model, words: str, n_tokens: int) -> str:
    """``words`` cut or repeated to a prompt of exactly ``n_tokens`` tokens (special tokens counted)."""
    base = words.split()
    extra = mechun.tokenize(model, [base[0]])[0].shape[1] - 1  # tokens the tokenizer adds (BOS)
    need = n_tokens - extra
    return " ".join((base * (need // len(base) + 1))[:need])


def measure(name: str, path: Path, texts: list[str], words: str, swap: tuple[str, str], repeats: int) -> dict:
    model = mechun.load_model(path, device="cpu")
    body, full = _bare(path, AutoModel), _bare(path, AutoModelForCausalLM)
    out = {}
    with torch.inference_mode():
        ids, mask = mechun.tokenize(model, texts)
        t = turns({
            "body": lambda: body(ids, attention_mask=mask, use_cache=False),
            "mechun": lambda: mechun.cache_residuals(model, ids, attention_mask=mask, batch_size=len(texts),
                                                     progress=False),
            "tl": lambda: model.run_with_cache(ids, attention_mask=mask)}, 3 * repeats)  # a ratio near 1: more turns
        t_body, t_cache, t_tl = (min(t[k]) for k in ("body", "mechun", "tl"))
        out["caching"] = {"batch": list(ids.shape), "bare_body_s": t_body, "mechun_s": t_cache,
                          "tl_run_with_cache_s": t_tl, "ratio": paired_ratio(t, "mechun", "body"),
                          "ratio_of_best": t_cache / t_body, "tl_ratio": paired_ratio(t, "tl", "body")}

        clean = _fit(model, words, 16)
        corrupt = clean.replace(*swap)
        assert corrupt != clean
        vocab = list(model.tokenizer.get_vocab().values())
        a, b = vocab[5], vocab[6]
        metric = last_position(lambda logits: logits[:, -1, a] - logits[:, -1, b])
        ids_c, _ = mechun.tokenize(model, [clean])
        ids_x, _ = mechun.tokenize(model, [corrupt])
        ours = activation_patching(model, clean, corrupt, metric)

        def tl():
            _, cache = model.run_with_cache(ids_c)
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                return patching.get_act_patch_resid_pre(model, ids_x, cache, lambda logits: metric(logits)[0])

        theirs = tl()
        # TransformerLens takes tens of seconds a sweep at GPT-2-small shape: two turns there
        t = best_times({"mechun": lambda: activation_patching(model, clean, corrupt, metric), "tl": tl},
                       repeats if name == "organism" else min(repeats, 2))
        t_ours, t_tl = t["mechun"], t["tl"]
        out["activation_patching"] = {
            "layers": int(model.cfg.n_layers), "positions": int(ids_c.shape[1]), "mechun_s": t_ours, "tl_s": t_tl,
            "speedup": t_tl / t_ours, "max_abs_difference": float((ours.scores - theirs.cpu()).abs().max())}

        long_clean = _fit(model, words, 64)
        long_corrupt = long_clean.replace(*swap)
        ids_long, _ = mechun.tokenize(model, [long_clean])

    def forward():
        with torch.inference_mode():
            full(ids_long, use_cache=False)

    t = best_times({"forward": forward,
                    "mechun": lambda: attribution_patching(model, long_clean, long_corrupt, metric)}, repeats)
    t_fwd, t_attr = t["forward"], t["mechun"]
    out["attribution_patching"] = {"positions": int(ids_long.shape[1]), "bare_forward_s": t_fwd, "mechun_s": t_attr,
                                   "ratio": t_attr / t_fwd}
    return out


def report(name: str, r: dict) -> None:
    c, a, t = r["caching"], r["activation_patching"], r["attribution_patching"]
    print(f"\n== {name}")
    print(f"caching, batch {c['batch'][0]} x {c['batch'][1]} tokens: bare HF body {c['bare_body_s'] * 1e3:.1f} ms, "
          f"mechun {c['mechun_s'] * 1e3:.1f} ms (best turns); median of per-turn ratios {c['ratio']:.2f}x "
          f"(goal <= 1.05x; ratio of best turns {c['ratio_of_best']:.2f}x); TL run_with_cache {c['tl_ratio']:.2f}x")
    print(f"activation patching, resid_pre {a['layers']} layers x {a['positions']} positions: mechun "
          f"{a['mechun_s']:.3f} s, TL {a['tl_s']:.3f} s = {a['speedup']:.1f}x faster (goal >= 10x); "
          f"max |difference| {a['max_abs_difference']:.1e}")
    print(f"attribution patching, 3 hooks x {t['positions']} positions: {t['mechun_s'] * 1e3:.1f} ms = "
          f"{t['ratio']:.2f}x one bare forward ({t['bare_forward_s'] * 1e3:.1f} ms) (goal <= 3.5x)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--organism", help="organism checkpoint dir (default: the cached main organism, seed 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["organism", "gpt2-small"])
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    if args.json and (args.json.exists() or args.json.is_symlink()):  # before any work; never replaces a file
        raise SystemExit(f"--json {args.json} already exists; pass a new path (the benchmark never replaces a file)")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.repeats}")
    results = {}
    if args.only in (None, "organism"):
        from mechun.organism.train import cached_organism
        from mechun.organism.world import World

        path = Path(args.organism) if args.organism else cached_organism("main", 0)
        world = World.load(path)
        facts = world.facts_of(relation="transmission")
        a = facts[0]
        b = next(f for f in facts[1:] if f.answer != a.answer)
        texts = [p.text for p in world.prompts()][:64]
        results["organism"] = measure("organism", path, texts, f"{a.subject} is transmitted by {a.answer} .",
                                      (a.subject, b.subject), args.repeats)
        report(f"organism {path}", results["organism"])
    if args.only in (None, "gpt2-small"):
        with tempfile.TemporaryDirectory() as tmp:
            path = random_checkpoint("gpt2-small", Path(tmp) / "gpt2-small")
            texts = [prompt(32, 100 + 40 * i) for i in range(32)]
            results["gpt2-small"] = measure("gpt2-small", path, texts, prompt(80), ("w103", "w777"), args.repeats)
        report("GPT-2-small shape (random weights)", results["gpt2-small"])
    if args.json:
        write_json(args.json, results, indent=2)
    return results


if __name__ == "__main__":
    main()
