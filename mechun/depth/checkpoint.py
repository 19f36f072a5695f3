"""The depth benchmark's per-checkpoint measures, for the organism and for any (full, retain, unlearned) checkpoints.

:func:`state_measures` is the part that needs only texts: UDS, CKA with the full model, junk-direction recovery,
logit lens and the norm ratio. :func:`mechun.depth.benchmark.checkpoint_measures` adds the organism's labelled
measures (cloze and paraphrase accuracy, held-out-subject probes); :func:`qa_checkpoint_card` adds graded behaviour
on TOFU-format question files (:func:`mechun.data.load_qa`), so the benchmark's card runs on real checkpoints, e.g.
open-unlearning's TOFU full / retain90 / unlearned models, as ``mechun depth-measures``.

Every measure points one way: **higher = more knowledge left** (``1 - UDS``, CKA with the full model, ...). Nothing
here changes a weight (checked by fingerprint) and every hook lives inside one call.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechun.data import QA, qa_prompts, qa_template
from mechun.depth.uds import UDSResult, unlearning_depth_score
from mechun.errors import MechunError, VocabularyError
from mechun.evaluate import answer_token_scores
from mechun.io import atomic_dir
from mechun.junk import JunkDiagnosis, diagnose_junk, junk_recovery, pair_caches
from mechun.models import Model, model_device, model_fingerprint, n_layers, tokenize
from mechun.representation import cka_between, last_token_features

#: The measures of :func:`qa_checkpoint_card` (higher = more knowledge left).
QA_MEASURES: dict[str, str] = {
    "forget_logprob": "mean per-token log-probability of the forget answers (behaviour, graded)",
    "forget_token_accuracy": "share of forget-answer tokens that are the top prediction, teacher-forced",
    "paraphrase_logprob": "forget_logprob on the paraphrased questions (records that have one)",
    "logprob_vs_oracle": "(unlearned - retain) / (full - retain) forget log-prob: 1 = as the full model, 0 = as the "
                         "retain oracle",
    "uds": "1 - UDS (patching the unlearned model's states into the full model; UDS paper)",
    "cka": "linear CKA of forget-prompt residuals with the full model, mean over layers",
    "junk_recovery": "share of the forget log-prob gap to the full model regained by projecting out the mean "
                     "unlearned-minus-full direction (NaN when less than 0.05 nats per token was lost)",
    "logit_lens": "best-layer logit-lens accuracy of the first answer token (the model's own unembedding)",
    "norm_ratio": "-(peak forget-prompt residual norm ratio, unlearned / full)",
}


def logit_lens_accuracy(model: Model, prompts: Sequence[str], targets: Sequence[int]) -> float:
    """Best layer's share of prompts whose ``targets[i]`` is the top prediction when that layer's last-position
    residual goes through the final layer norm and the unembedding."""
    feats = last_token_features(model, list(prompts))  # [layer, n, d]
    target = torch.tensor(list(targets))
    best = 0.0
    with torch.no_grad():
        for layer in range(feats.shape[0]):
            logits = model.unembed(model.ln_final(feats[layer][:, None].to(model_device(model))))[:, 0]
            best = max(best, float((logits.argmax(-1).cpu() == target).float().mean()))
    return best


def first_answer_tokens(model: Model, prompts: Sequence[str], answers: Sequence[str]) -> list[int]:
    """The token that follows each prompt when its answer is appended (as every scorer here feeds them)."""
    ids, mask = tokenize(model, [f"{p} {a}" for p, a in zip(prompts, answers, strict=True)])
    n_prompt = tokenize(model, list(prompts))[1].sum(1)
    if bool((mask.sum(1) <= n_prompt).any()):
        raise MechunError("an answer tokenised to zero tokens; pass non-empty answers")
    return ids[torch.arange(len(prompts)), n_prompt].tolist()


def state_measures(full: Model, retain: Model, unlearned: Model, forget_texts: Sequence[str],
                   retain_texts: Sequence[str], uds_pairs: tuple[Sequence[str], Sequence[str]],
                   lens_targets: tuple[Sequence[str], Sequence[int]], score: Callable[[Model], float],
                   unlearned_score: float) -> tuple[dict[str, float], UDSResult, JunkDiagnosis]:
    """The measures that need only texts (see the module docstring): ``uds``, ``cka``, ``junk_recovery`` (how much
    ``score`` -- forget-set behaviour, ``unlearned_score`` without ablation -- regains), ``logit_lens`` (on
    ``lens_targets``: prompts and their first answer tokens) and ``norm_ratio``."""
    out: dict[str, float] = {}
    uds = unlearning_depth_score(full, retain, unlearned, *uds_pairs)
    out["uds"] = 1 - uds.score if not math.isnan(uds.score) else math.nan
    caches = pair_caches(full, unlearned, forget_texts, retain_texts)
    diag = diagnose_junk(full, unlearned, forget_texts, retain_texts, caches=caches)
    out["cka"] = sum(cka_between(caches.forget_base, caches.forget_unlearned)) / n_layers(full)
    if bool(diag.directions["mean_diff"][diag.peak_layer()].any()):
        rec = junk_recovery(full, unlearned, diag, lambda m: {"forget": {"score": score(m)}}, forget="forget",
                            controls=(), before={"unlearned": {"forget": {"score": unlearned_score}}})
        out["junk_recovery"] = rec.scores["ablated"]["forget"]["score"] - unlearned_score
    else:  # the unlearned model's states equal the full model's (e.g. the full model passed as a sanity check)
        out["junk_recovery"] = 0.0
    out["logit_lens"] = logit_lens_accuracy(unlearned, *lens_targets)
    out["norm_ratio"] = -max(diag.norm_ratio_forget)
    return out, uds, diag


# -- real checkpoints, TOFU-format questions ---------------------------------------------------------------------------
@dataclass
class CheckpointCard:
    """The benchmark's measures for one (full, retain, unlearned) triple on question files.

    ``measures``: :data:`QA_MEASURES` (higher = more knowledge left; NaN where undefined, e.g. ``logprob_vs_oracle``
    when the full model is no better than the retain model on the forget answers); ``behaviour``: per model
    (``full``, ``retain``, ``unlearned``), forget and retain answer log-prob and token accuracy -- the unlearned
    model's retain numbers are its utility; ``uds``: the score, examples scored and per-layer mean drops;
    ``skipped``: measures of the organism benchmark that cannot run here, with the reason."""

    measures: dict[str, float]
    behaviour: dict[str, dict[str, float]]
    uds: dict[str, Any]
    skipped: dict[str, str]
    template: str
    n_forget: int
    n_retain: int
    models: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"measure_descriptions": {k: QA_MEASURES[k] for k in self.measures}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointCard:
        return cls(**{k: v for k, v in data.items() if k != "measure_descriptions"})

    def __repr__(self) -> str:
        from mechun.display import short_repr

        return short_repr("CheckpointCard", measures=self.measures, uds_score=self.uds["score"],
                          n_forget=self.n_forget, n_retain=self.n_retain)

    def _repr_html_(self) -> str:
        from mechun.display import frame, svg_lines, table

        u = self.uds
        return frame(f"Depth measures: {self.models.get('unlearned', 'unlearned model')}",
                     table([{"measure": k, "value": v} for k, v in self.measures.items()]),
                     table(self.behaviour_rows()),
                     f"<div>UDS score {u['score']:.3f} (the table's uds is 1 - UDS; {u['n_scored']} of "
                     f"{u['n_examples']} questions scored); answer "
                     "log-prob drop when a layer is patched into the full model:</div>",
                     svg_lines({"retain (S1)": u["mean_delta_retain_by_layer"],
                                "unlearned (S2)": u["mean_delta_unlearned_by_layer"]}, y_label="drop"),
                     hint="higher = more knowledge left; write_checkpoint_card(card, dir) for the report")

    def behaviour_rows(self) -> list[dict[str, Any]]:
        return [{"model": k} | v for k, v in self.behaviour.items()]

    def rows(self) -> list[dict[str, Any]]:
        return [{"measure": k, "value": v, "what (higher = more knowledge left)": QA_MEASURES[k]}
                for k, v in self.measures.items()]


def _behaviour(model: Model, forget: tuple[list[str], list[str]], retain: tuple[list[str], list[str]],
               batch_size: int) -> dict[str, float]:
    flp, facc = answer_token_scores(model, *forget, batch_size=batch_size)
    rlp, racc = answer_token_scores(model, *retain, batch_size=batch_size)
    return {"forget_logprob": float(flp.mean()), "forget_token_accuracy": float(facc.mean()),
            "retain_logprob": float(rlp.mean()), "retain_token_accuracy": float(racc.mean())}


def qa_checkpoint_card(full: Model, retain: Model, unlearned: Model, forget_qa: Sequence[QA],
                       retain_qa: Sequence[QA], template: str = "plain", max_questions: int = 200,
                       uds_questions: int = 100, batch_size: int = 16,
                       log: Callable[[str], None] | None = None) -> CheckpointCard:
    """The depth benchmark's per-checkpoint measures on any three checkpoints of one base model: ``full`` (trained
    on everything), ``retain`` (never trained on the forget set: the oracle) and ``unlearned``.

    ``forget_qa`` / ``retain_qa``: TOFU-format questions (:func:`mechun.data.load_qa`), the first ``max_questions``
    of each used (UDS on the first ``uds_questions`` forget ones: it costs two forwards per layer), rendered with
    ``template`` (:data:`mechun.data.QA_TEMPLATES` name or a string with ``{question}``). Probes and relearning
    need per-fact labels and fine-tuning; they are listed in ``skipped``."""
    if not forget_qa or not retain_qa:
        raise MechunError("pass forget and retain questions (neither may be empty)")
    for name, v in (("max_questions", max_questions), ("uds_questions", uds_questions), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise MechunError(f"{name} must be a positive integer, got {v!r}")
    template = qa_template(template)
    say = log or (lambda _m: None)
    t0 = time.perf_counter()
    models = {"full": full, "retain": retain, "unlearned": unlearned}
    fingerprints = {k: model_fingerprint(m) for k, m in models.items()}
    fq, rq = list(forget_qa)[:max_questions], list(retain_qa)[:max_questions]
    forget, retain_pairs = qa_prompts(fq, template), qa_prompts(rq, template)
    say("depth measures: behaviour of the three models")
    try:
        behaviour = {k: _behaviour(m, forget, retain_pairs, batch_size) for k, m in models.items()}
    except VocabularyError as e:
        raise VocabularyError(f"{e}. The question template is {template!r}: pass one whose words the model knows "
                              "(--template raw uses the question alone)") from e
    u, f, r = (behaviour[k]["forget_logprob"] for k in ("unlearned", "full", "retain"))
    measures = {"forget_logprob": u, "forget_token_accuracy": behaviour["unlearned"]["forget_token_accuracy"]}
    para = qa_prompts(fq, template, paraphrased=True)
    if para[0]:
        measures["paraphrase_logprob"] = float(answer_token_scores(unlearned, *para, batch_size=batch_size)[0].mean())
    measures["logprob_vs_oracle"] = (u - r) / (f - r) if f > r else math.nan
    say("depth measures: UDS, junk direction, CKA, logit lens")
    n_uds = min(uds_questions, len(fq))
    state, uds, _ = state_measures(
        full, retain, unlearned, forget[0], retain_pairs[0], (forget[0][:n_uds], forget[1][:n_uds]),
        (forget[0], first_answer_tokens(unlearned, *forget)),
        lambda m: float(answer_token_scores(m, *forget, batch_size=batch_size)[0].mean()), u)
    regained = state.pop("junk_recovery")
    measures |= state
    measures["junk_recovery"] = regained / (f - u) if f - u >= 0.05 else math.nan  # a share, as on the depth card
    if {k: model_fingerprint(m) for k, m in models.items()} != fingerprints:
        raise AssertionError("a measure changed a model's weights")
    d1, d2 = torch.tensor(uds.delta_s1), torch.tensor(uds.delta_s2)
    return CheckpointCard(
        measures, behaviour,
        {"score": uds.score, "n_scored": uds.n_scored, "n_examples": len(uds.per_example), "tau": uds.tau,
         "mean_delta_retain_by_layer": d1.mean(0).tolist(), "mean_delta_unlearned_by_layer": d2.mean(0).tolist()},
        {"probe": "question files carry no per-fact attribute labels to probe for",
         "relearning": "fine-tuning the unlearned and retain checkpoints is not run on loaded checkpoints; use the "
                       "organism benchmark (mechun reproduce depth-benchmark)"},
        template, len(fq), len(rq), fingerprints=fingerprints, seconds=time.perf_counter() - t0)


def checkpoint_card_blocks(card: CheckpointCard) -> list:
    """Report blocks for :func:`mechun.report.write_report`."""
    from mechun.plots import layer_lines
    from mechun.report import table

    u = card.uds
    return [("h3", "Depth measures (higher = more knowledge left)"), table(card.rows()),
            ("h3", "Behaviour of the three models (mean per answer token)"), table(card.behaviour_rows()),
            f"<p>UDS score {u['score']:.3f} (the table's <i>uds</i> is 1 - UDS, so that higher = more left) over "
            f"{u['n_scored']} of {u['n_examples']} forget questions with a knowledge-gap layer (tau {u['tau']}).</p>",
            layer_lines({"retain into full (S1)": u["mean_delta_retain_by_layer"],
                         "unlearned into full (S2)": u["mean_delta_unlearned_by_layer"]},
                        "Answer log-prob drop when a layer's states are patched into the full model",
                        "mean log-prob drop"),
            "<p>Not measured here: " + "; ".join(f"{k}: {v}" for k, v in card.skipped.items()) + ".</p>"]


def write_checkpoint_card(card: CheckpointCard, out_dir: str | Path, overwrite: bool = False) -> Path:
    """``measures.json`` and ``report.html`` in the new dir ``out_dir``, all or nothing."""
    from mechun.report import write_report

    with atomic_dir(out_dir, "depth measures", overwrite) as tmp:
        data = card.to_json()
        (tmp / "measures.json").write_text(json.dumps(data, indent=1))
        write_report(tmp / "report.html", f"Depth measures: {card.models.get('unlearned', 'unlearned model')}",
                     checkpoint_card_blocks(card), results=data, results_name="measures.json")
    return Path(out_dir)
