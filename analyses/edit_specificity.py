"""Do localized edits' side effects hide from static neighbourhood prompts? CounterFact+ on the model organism.

Hoelscher-Obermaier et al. (2023) found that ROME/MEMIT edits look specific on CounterFact's static neighbourhood
prompts but not once the edit statement is prepended (GPT-2 XL, ROME: NS 0.759 static -> 0.138 dynamic). Here:

1. Train (or reuse) the organism. Per seed, sample edits (subject, relation, true object -> new object) across all
   relations.
2. Per edit: causal tracing picks the MLP with the largest indirect effect at the subject's last token; only that
   MLP is fine-tuned (``mode="learn"``) to state the new object on the trained templates, with a maintain loss on
   every other fact (so the *static* neighbourhood prompts are protected by training) and an LM loss on filler.
3. Measure, for the unedited and the edited model: efficacy (edit prompts, paraphrases), neighbourhood score (NS)
   and magnitude (NM) on the neighbourhood prompts (other subjects of the relation), static and dynamic, and NKL
   (true KL, nats) static and dynamic. The weights are restored after every edit (checked by fingerprint).

Run as ``mechun reproduce edit-specificity --out DIR [--quick] [--seed N]``.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

import torch

from mechun import plots
from mechun.edit import localized_finetune, top_mlp_mask
from mechun.evaluate import cloze_accuracy, neighbourhood_scores, next_token_logprobs
from mechun.io import write_json
from mechun.localize import mlp_trace_scores
from mechun.models import bare_forward_view, load_model, model_fingerprint
from mechun.organism.world import Fact, World, other_values, relation
from mechun.report import table, write_report
from mechun.reproduce import prepare, seeds_for
from mechun.stats import over_seeds, seed_stat

KEYS = ("efficacy", "paraphrase_efficacy", "ns_static", "ns_dynamic", "nm_static", "nm_dynamic", "nkl_static",
        "nkl_dynamic")


def pick_edits(world: World, n: int, seed: int) -> list[tuple[Fact, str]]:
    rng = random.Random(f"edits-{seed}")
    one_token = [f for f in world.facts if len(f.answer.split()) == 1]  # causal tracing scores one answer token
    facts = rng.sample(one_token, n)
    return [(f, rng.choice(other_values(f))) for f in facts]


def measure(model: Any, world: World, fact: Fact, new: str) -> dict[str, Any]:
    """Efficacy and neighbourhood metrics of ``model`` for the edit ``fact -> new``."""
    edit_prompts = [p for p in world.prompts(facts=[fact])]
    para = world.prompts(facts=[fact], split="paraphrase")
    # neighbours whose own true object is the new object cannot tell P(true) from P(new): CounterFact's
    # neighbourhoods share the edited fact's true object, so this never arises there
    neigh = [p for p in world.neighbourhood(fact) if p.answer != new]
    texts, trues = [p.text for p in neigh], [p.answer for p in neigh]
    statement = world.statement(fact, new)
    static = neighbourhood_scores(model, texts, trues, new)
    dynamic = neighbourhood_scores(model, texts, trues, new, edit_statement=statement)
    return {
        "efficacy": cloze_accuracy(model, [type(p)(p.text, new, p.fact, p.template) for p in edit_prompts]),
        "paraphrase_efficacy": cloze_accuracy(model, [type(p)(p.text, new, p.fact, p.template) for p in para]),
        "ns_static": static.score, "ns_dynamic": dynamic.score, "nm_static": static.magnitude,
        "nm_dynamic": dynamic.magnitude,
        "_logp_static": next_token_logprobs(model, texts),
        "_logp_dynamic": next_token_logprobs(model, [f"{statement} {t}" for t in texts]),
    }


def edit_once(model: Any, world: World, fact: Fact, new: str, steps: int, seed: int) -> dict:
    """Localize, edit in place, return the mask description. The caller restores the weights."""
    prompt = relation(fact.relation).templates[0].format(s=fact.subject)
    scores = mlp_trace_scores(model, [(prompt, fact.answer, fact.subject)], seed=seed)
    mask = top_mlp_mask(model, scores, 1, "causal-tracing MLP")
    prompts = world.prompts(facts=[fact])
    others = [(p.text, p.answer) for p in world.prompts(facts=[f for f in world.facts if f.subject != fact.subject])]
    localized_finetune(model, mask, [p.text for p in prompts], [new] * len(prompts), mode="learn", maintain=others,
                       lm_texts=world.filler, steps=steps, lr=1e-3, seed=seed)
    return {"components": [list(c) for c in mask.components], "n_params": mask.n_params}


def run(out: Path, quick: bool = False, seed: int = 0, log=print, organism: str | Path | None = None) -> dict:
    out, ckpt, world, _ = prepare(out, quick, seed, organism)
    model = load_model(ckpt, device="cpu")
    bare, _ = bare_forward_view(model)
    original = {n: p.detach().clone() for n, p in bare.named_parameters()}
    fp0 = model_fingerprint(model)
    seeds, n_edits, steps = seeds_for(seed, quick), (4 if quick else 8), (30 if quick else 50)
    rows = []
    for s in seeds:
        for fact, new in pick_edits(world, n_edits, s):
            before = measure(model, world, fact, new)
            info = edit_once(model, world, fact, new, steps, s)
            after = measure(model, world, fact, new)
            with torch.no_grad():
                for n, p in bare.named_parameters():
                    p.copy_(original[n])
            row: dict[str, Any] = {"seed": s, "subject": fact.subject, "relation": fact.relation,
                                   "true": fact.answer, "new": new, **info}
            for cond, m in (("unedited", before), ("edited", after)):
                for k in KEYS[:6]:
                    row[f"{k}_{cond}"] = m[k]
            for kind in ("static", "dynamic"):
                lp_e, lp_u = after[f"_logp_{kind}"], before[f"_logp_{kind}"]
                row[f"nkl_{kind}_edited"] = float((lp_e.exp() * (lp_e - lp_u)).sum(-1).mean())
            rows.append(row)
            log(f"seed {s} {fact.subject} {fact.relation}: {fact.answer} -> {new}: efficacy "
                f"{row['efficacy_edited']:.2f}, NS static {row['ns_static_edited']:.2f} dynamic "
                f"{row['ns_dynamic_edited']:.2f}")
    if model_fingerprint(model) != fp0:
        raise RuntimeError("weights were not restored after the edits")

    def agg(key: str) -> dict[str, Any]:
        """Over seeds, of each seed's mean over its edits."""
        return over_seeds(seeds, lambda s: statistics.fmean(r[key] for r in rows if r["seed"] == s)).to_json()

    summary = {f"{k}_{c}": agg(f"{k}_{c}") for k in KEYS[:6] for c in ("unedited", "edited")}
    summary.update({f"nkl_{k}_edited": agg(f"nkl_{k}_edited") for k in ("static", "dynamic")})
    static, dynamic = summary["ns_static_edited"]["mean"], summary["ns_dynamic_edited"]["mean"]
    drop_edit = static - dynamic
    drop_base = summary["ns_static_unedited"]["mean"] - summary["ns_dynamic_unedited"]["mean"]
    lower = dynamic < static
    verdict = (f"Localized edits (one causal-tracing MLP, {steps} steps, efficacy "
               f"{summary['efficacy_edited']['mean']:.2f}): neighbourhood score {static:.2f} static vs {dynamic:.2f} "
               f"dynamic -- the dynamic score is {'lower' if lower else 'NOT lower'}"
               f" ({'a drop' if lower else 'a change'} of {drop_edit:+.2f}; the unedited model's own static-dynamic gap "
               f"is {drop_base:+.2f}, so the edit accounts for {drop_edit - drop_base:+.2f}). NKL static "
               f"{summary['nkl_static_edited']['mean']:.3f} vs dynamic {summary['nkl_dynamic_edited']['mean']:.3f} "
               f"nats.")
    results = {"seeds": seeds, "n_edits_per_seed": n_edits, "steps": steps, "organism": str(ckpt),
               "summary": summary, "dynamic_lower_than_static": lower, "verdict": verdict, "edits": rows}
    write_json(out / "results.json", results)
    write_report(out / "report.html", "Static vs dynamic neighbourhood scores of localized edits (CounterFact+)",
                 report_blocks(results), results=None)
    return results


def report_blocks(r: dict) -> list:
    s = r["summary"]
    keys = ("ns_static", "ns_dynamic", "nm_static", "nm_dynamic")
    fig = plots.grouped_bars(["NS static", "NS dynamic", "NM static", "NM dynamic"],
                             {cond: [seed_stat(s[f"{k}_{cond}"]["per_seed"]) for k in keys]
                              for cond in ("unedited", "edited")},
                             "Neighbourhood score and magnitude (mean ± std over seeds)", "score / magnitude")
    rows = [{"measure": k, "mean": v["mean"], "std over seeds": v["std"]} for k, v in s.items()]
    edits = [{k: e[k] for k in ("seed", "subject", "relation", "true", "new", "efficacy_edited", "ns_static_edited",
                                "ns_dynamic_edited", "ns_static_unedited", "ns_dynamic_unedited", "nkl_dynamic_edited")}
             for e in r["edits"]]
    return [f"<p class='verdict'>{r['verdict']}</p>",
            "<p>NS: share of neighbourhood prompts (other subjects of the edited relation) on which the true object "
            "is more probable than the edit's new object; NM: the mean probability gap. Dynamic: the edit statement "
            "<code>{edit prompt} {new object} .</code> is prepended. NKL: KL(P_edited ‖ P_unedited) of the next "
            "token, summed over the vocabulary (the true KL; CounterFact+'s code divides by the vocabulary size). "
            f"{r['n_edits_per_seed']} edits per seed, seeds {r['seeds']}.</p>",
            fig, ("h2", "Summary"), table(rows), ("h2", "Every edit"), table(edits)]


if __name__ == "__main__":
    from mechun.reproduce import script_main

    script_main(run, __doc__)
