"""Drawing and writing a depth card: report blocks (tables and :mod:`mechun.plots` figures) and ``card.json``."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from mechun.depth.card import DepthCard, ProbeSection, RelearningSection, SeedMeanCard, summary_row
from mechun.io import atomic_dir
from mechun.plots import layer_lines, step_lines
from mechun.report import table, write_report


def _behaviour_blocks(card: DepthCard) -> list:
    j = card.junk
    rows = [{"format": f, "base": a.base, "unlearned": a.unlearned, "chance": a.chance,
             "removed share": a.removed_share, "after junk ablation": j.ablated_accuracy[f],
             "recovery": j.recovery_by_format[f], "random-dir. control": j.control_recovery[f]}
            for f, a in card.behaviour.forget.items()]
    m = card.behaviour.mcq_all_orders
    nan = float("nan")
    mcq = (f"<p>MCQ over all 24 option orders: the base model answers {m.n_robust_in_base} of {m.n_questions} "
           f"forget questions right in every order; on those, the unlearned model is right in "
           f"{m.unlearned_accuracy_all_orders if m.unlearned_accuracy_all_orders is not None else nan:.2f} of "
           f"(question, order) pairs and in every order on "
           f"{m.unlearned_robust if m.unlearned_robust is not None else nan:.2f} of the questions.</p>")
    return [("h3", "Forget-domain behaviour and junk-direction recovery"), table(rows), mcq,
            layer_lines({"forget": j.norm_ratio_forget, "retain": j.norm_ratio_retain},
                        "Norm ratio unlearned / base by layer", "norm ratio", hline=1.0, hline_label="")]


def _recovery_blocks(card: DepthCard) -> list:
    blocks: list = [("h3", "Probe recoverability (held-out subjects, last token)")]
    pr, rl = card.probes, card.relearning
    if isinstance(pr, ProbeSection):
        blocks.append(layer_lines({"base": pr.base["accuracy"], "unlearned": pr.unlearned["accuracy"]},
                                  "Linear-probe accuracy on held-out subjects, by layer", "accuracy",
                                  hline=pr.base["chance"]))
    else:
        blocks.append(f"<p>Probes: {pr.skipped}.</p>")
    if isinstance(rl, RelearningSection):
        blocks += [("h3", "Relearning"),
                   step_lines(rl.steps, {"held-out facts": rl.held_out_accuracy,
                                         "relearned facts": rl.relearned_accuracy},
                              "Relearning attack: accuracy vs fine-tuning steps on half the forget facts", "accuracy",
                              x_title="steps", hline=rl.chance)]
    else:
        blocks.append(f"<p>Relearning: {rl.skipped}.</p>")
    return blocks


def _specificity_blocks(card: DepthCard) -> list:
    s = card.specificity
    nkl = {"static": s.nkl_static, "dynamic": s.nkl_dynamic}
    rows: list[dict[str, Any]] = [{"prompts": k, "retain acc. base": v["base"], "retain acc. unlearned": v["unlearned"],
                                   "NKL (nats)": nkl[k]} for k, v in s.retain_accuracy.items()]
    if s.nkl_filler is not None:
        rows.append({"prompts": "filler", "NKL (nats)": s.nkl_filler})
    return [("h3", "Representation similarity"),
            layer_lines({"forget": card.cka.forget, "retain": card.cka.retain}, "Linear CKA(base, unlearned) by layer",
                        "CKA"),
            ("h3", "Specificity: the neighbourhood (retain domains), static and dynamic"), table(rows),
            "<p>NKL is the true KL(P_unlearned ‖ P_base) of the next-token distribution, summed over the "
            "vocabulary (CounterFact+'s code divides it by the vocabulary size). <i>dynamic</i>: a forget-domain "
            "sentence is prepended to each retain prompt.</p>"]


def card_blocks(card: DepthCard | SeedMeanCard, heading: str = "") -> list:
    """Report blocks (for :func:`mechun.report.write_report`) showing one card (a seed-mean card: its mean)."""
    if isinstance(card, SeedMeanCard):
        card = card.mean
    blocks: list = [("h2", heading)] if heading else []
    blocks.append(f"<p class='verdict'>{card.verdict.line if card.verdict else ''}</p>")
    return blocks + _behaviour_blocks(card) + _recovery_blocks(card) + _specificity_blocks(card)


def card_html(card: DepthCard | SeedMeanCard) -> str:
    """The card's notebook display: verdict, headline numbers (mean +- std over seeds for a seed-mean card) and the
    forget / retain norm-ratio profile."""
    from mechun.display import frame, svg_lines
    from mechun.display import table as small_table

    one = card.mean if isinstance(card, SeedMeanCard) else card
    if isinstance(card, SeedMeanCard):
        rows = [{"measure": k, "mean": s.get("mean"), "std": s.get("std"), "seeds": len(card.per_seed)}
                for k, s in card.summary.items()]
    else:
        rows = [{"measure": k, "value": "skipped" if isinstance(v, float) and math.isnan(v) else v}
                for k, v in summary_row(card).items()]
    verdict = one.verdict.line if one.verdict else "(no verdict)"
    verdict_html = (f"<div style='background:#eef6ee;border-left:4px solid #4a4;padding:4px 8px;margin:4px 0'>"
                    f"{html.escape(verdict)}</div>")
    chart = svg_lines({"forget": one.junk.norm_ratio_forget, "retain": one.junk.norm_ratio_retain},
                      y_label="norm ratio", hline=1.0)
    title = f"Depth card: {one.method or 'unlearned model'} on '{one.forget_domain}'"
    return frame(title, verdict_html, small_table(rows), "<div>norm ratio unlearned / base by layer</div>", chart,
                 hint="write_card(card, dir) for the full report (probes, relearning, CKA, specificity)")


def write_card(card: DepthCard, out_dir: str | Path, title: str | None = None, overwrite: bool = False) -> Path:
    """Write ``card.json`` and ``report.html`` into the new dir ``out_dir``, all or nothing (``overwrite``: replace
    an earlier mechun output there)."""
    with atomic_dir(out_dir, "depth card", overwrite) as tmp:
        data = card.to_json()
        (tmp / "card.json").write_text(json.dumps(data, indent=1))
        title = title or f"Unlearning depth card: {card.method or 'unlearned model'} on '{card.forget_domain}'"
        write_report(tmp / "report.html", title, card_blocks(card), results=data)
    return Path(out_dir)
