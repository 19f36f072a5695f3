"""Measuring a depth card: one function per section, and the two entry points.

:func:`depth_card` measures an organism pair on its world (every section); :func:`mcq_depth_card` measures any pair
of checkpoints on benchmark files (MCQ behaviour, all orders, junk, CKA, specificity; probes and relearning need
labelled facts and are skipped). Both share every block that applies to both: the all-orders MCQ filter, the junk
recovery (:func:`mechun.junk.junk_recovery`), CKA on the pair caches, and NKL static / dynamic.

Nothing here changes either model's weights (checked by fingerprint at the end): relearning runs on a fresh copy
the caller provides.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

from jaxtyping import Float
from torch import Tensor

from mechun.depth.card import (
    Behaviour,
    CKASection,
    DepthCard,
    FormatAccuracy,
    JunkSection,
    McqAllOrders,
    ProbeSection,
    RelearningSection,
    Skipped,
    Specificity,
)
from mechun.depth.verdict import MIN_ABOVE_CHANCE, verdict
from mechun.edit import relearn
from mechun.errors import MechunError
from mechun.evaluate import (
    FORMATS,
    answer_correct,
    chance_accuracy,
    evaluate_world,
    kl_divergence,
    mcq_accuracy,
    mcq_permutation_scores,
    next_token_logprobs,
    retain_accuracy,
    robustly_known,
)
from mechun.interventions import Intervention, applied
from mechun.junk import (
    JunkDiagnosis,
    PairCaches,
    Scores,
    diagnose_junk,
    junk_recovery,
    pair_caches,
    recovery_fraction,
)
from mechun.models import Model, check_layer, model_fingerprint, n_layers
from mechun.organism.world import DOMAINS, LETTERS, MCQ, Prompt, World, retain_domains
from mechun.representation import cka_between, probe_recoverability, subject_folds

Log = Callable[[str], None]


@dataclass(frozen=True)
class DepthConfig:
    relearn_steps: tuple[int, ...] = (0, 5, 10, 20, 40)
    relearn_lr: float = 1e-3
    relearn_batch: int = 16
    junk_layer: int | None = None  # None: where the forget-prompt norm ratio (unlearned / base) peaks
    probe_steps: int = 300
    seed: int = 0

    def checked(self, model: Model) -> DepthConfig:
        """Validated against the model (relearning steps non-negative integers, junk layer in range)."""
        if not self.relearn_steps or any(not isinstance(k, int) or k < 0 for k in self.relearn_steps):
            raise MechunError(f"relearn_steps must be non-negative integers, e.g. 0,5,10,20 (got {self.relearn_steps})")
        return self if self.junk_layer is None else replace(self, junk_layer=check_layer(model, self.junk_layer))


def _drop_share(base: float, unlearned: float, chance: float) -> float:
    """Share of the base model's above-chance accuracy that unlearning removed (1 = down to chance); NaN (not
    testable) when the base beats chance by less than :data:`~mechun.depth.verdict.MIN_ABOVE_CHANCE`."""
    above = base - chance
    return float("nan") if above < MIN_ABOVE_CHANCE - 1e-9 else (base - unlearned) / above


def _mcq_all_orders(base: Model, unlearned: Model, questions: Sequence[MCQ], intervention: Intervention | None
                    ) -> McqAllOrders:
    """The questions the base model answers right in all 24 option orders, and how the unlearned model does there."""
    known = robustly_known(base, questions)
    out = McqAllOrders(len(known), len(questions))
    if known:
        with applied(intervention):
            perm = mcq_permutation_scores(unlearned, known)
        out.unlearned_accuracy_all_orders, out.unlearned_robust = perm.accuracy, perm.robust_accuracy
    return out


def _behaviour(base: Model, unlearned: Model, world: World, forget: str, intervention: Intervention | None
               ) -> Behaviour:
    acc_base = evaluate_world(base, world)
    with applied(intervention):
        acc_unl = evaluate_world(unlearned, world)
    forget_acc = {f: FormatAccuracy(acc_base[forget][f], acc_unl[forget][f], chance_accuracy(f),
                                    _drop_share(acc_base[forget][f], acc_unl[forget][f], chance_accuracy(f)))
                  for f in FORMATS}
    all_orders = _mcq_all_orders(base, unlearned, world.mcq(forget, seed=1), intervention)
    return Behaviour({"base": acc_base, "unlearned": acc_unl}, forget_acc, all_orders)


def _junk_section(base: Model, unlearned: Model, diag: JunkDiagnosis, score: Callable[[Model], Scores],
                  before: Mapping[str, Scores], intervention: Intervention | None, cfg: DepthConfig,
                  steering_known: bool) -> JunkSection:
    rec = junk_recovery(base, unlearned, diag, score, layer=cfg.junk_layer, before=before,
                        intervention=intervention, seed=cfg.seed)
    ablated = rec.scores["ablated"]
    return JunkSection(rec.layer, diag.norm_ratio_forget, diag.norm_ratio_retain,
                       diag.cos_with_steering["mean_diff"] if steering_known else None,
                       dict(ablated["forget"]), dict(ablated["retain"]), rec.recovery_by_format, rec.control_recovery)


def _cloze_texts(world: World, forget: str) -> tuple[list[str], list[str]]:
    """The trained-template prompts of the forget domain and of the retain domains."""
    return ([p.text for p in world.prompts(forget)], [p.text for d in retain_domains() for p in world.prompts(d)])


def _probes(base: Model, unlearned: Model, world: World, forget: str, intervention: Intervention | None,
            cfg: DepthConfig) -> ProbeSection:
    ps = world.prompts(forget, "train") + world.prompts(forget, "paraphrase")
    prompts, subjects, labels = [p.text for p in ps], [p.fact.subject for p in ps], [p.answer for p in ps]
    kw = {"seed": cfg.seed, "steps": cfg.probe_steps}
    pb = probe_recoverability(base, prompts, subjects, labels, **kw)
    pu = probe_recoverability(unlearned, prompts, subjects, labels, context=intervention, **kw)
    best_b, best_u = max(pb.accuracy), max(pu.accuracy)
    above = best_b - pb.chance
    return ProbeSection(pb.to_json(), pu.to_json(), best_b, best_u,
                        (best_u - pb.chance) / above if above > 1e-9 else float("nan"))


def relearn_split(world: World, forget: str, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """The forget domain's trained-template prompts in two halves by subject (by ``seed``): relearned on, and held
    out (the relearning attack of the card and of the depth benchmark)."""
    prompts = world.prompts(forget)
    in_train = subject_folds([p.fact.subject for p in prompts], seed=seed)
    return ([p for p, t in zip(prompts, in_train, strict=True) if t],
            [p for p, t in zip(prompts, in_train, strict=True) if not t])


def _relearning(relearn_copy: Callable[[], Model] | None, world: World, forget: str, cfg: DepthConfig,
                base_acc: float) -> RelearningSection | Skipped:
    """Fine-tune a fresh copy on half the forget subjects' facts; accuracy on the other half along the way."""
    if relearn_copy is None:
        return Skipped("no trainable copy of the unlearned model (an inference-time intervention, or none given): "
                       "relearning not measured")
    train, held = relearn_split(world, forget, cfg.seed)
    curve = relearn(relearn_copy(), train, held, sorted(set(cfg.relearn_steps) | {0}), lr=cfg.relearn_lr,
                    batch_size=cfg.relearn_batch, seed=cfg.seed)
    steps, curve_held, curve_train = curve.steps, curve.held_out_accuracy, curve.relearned_accuracy
    regained = [recovery_fraction(base_acc, curve_held[0], a) for a in curve_held]
    return RelearningSection(steps, curve_held, curve_train, regained, max(regained[1:], default=float("nan")),
                             base_acc, chance_accuracy("train"), len(train), len(held))


def _nkl(base: Model, unlearned: Model, sets: Mapping[str, Sequence[str]], intervention: Intervention | None
         ) -> dict[str, float]:
    """Per named prompt set: mean KL(P_unlearned || P_base) of the next token."""
    out: dict[str, float] = {}
    for name, texts in sets.items():
        lp_base = next_token_logprobs(base, texts)
        with applied(intervention):
            lp_unl = next_token_logprobs(unlearned, texts)
        out[name] = float(kl_divergence(lp_unl, lp_base).mean())
    return out


def _with_forget_prefix(texts: Sequence[str], prefixes: Sequence[str], seed: int) -> tuple[list[str], random.Random]:
    """CounterFact+'s dynamic form: each text with a random forget-domain sentence before it."""
    rng = random.Random(f"depth-dynamic-{seed}")
    chosen = [rng.choice(list(prefixes)) for _ in texts]
    return [f"{pre} {t}" for pre, t in zip(chosen, texts, strict=True)], rng


def _specificity(base: Model, unlearned: Model, world: World, forget: str, intervention: Intervention | None,
                 cfg: DepthConfig, behaviour: Behaviour) -> Specificity:
    """NKL and retain accuracy, static (from the behaviour section's trained-template numbers) and dynamic."""
    retain = [p for d in retain_domains() for p in world.prompts(d)]
    static = [p.text for p in retain]
    dynamic, _ = _with_forget_prefix(static, [world.statement(f) for f in world.facts_of(forget)], cfg.seed)
    nkl = _nkl(base, unlearned, {"static": static, "dynamic": dynamic, "filler": world.filler[:64]}, intervention)
    answers = [p.answer for p in retain]
    with applied(intervention):
        dyn_unl = float(answer_correct(unlearned, dynamic, answers).float().mean())
    acc = behaviour.accuracy
    retain_acc = {
        "static": {k: retain_accuracy(acc[k])["train"] for k in ("base", "unlearned")},
        "dynamic": {"base": float(answer_correct(base, dynamic, answers).float().mean()), "unlearned": dyn_unl}}
    return Specificity(nkl["static"], nkl["dynamic"], retain_acc, nkl_filler=nkl["filler"])


def _check_pair(base: Model, unlearned: Model, config: DepthConfig | None) -> tuple[DepthConfig, dict[str, str], float]:
    """The validated config, both fingerprints (checked again at the end) and the start time."""
    cfg = (config or DepthConfig()).checked(base)
    if n_layers(base) != n_layers(unlearned):
        raise MechunError("base and unlearned models differ in depth; a depth card compares one architecture")
    return cfg, {"base": model_fingerprint(base), "unlearned": model_fingerprint(unlearned)}, time.time()


def _finish(card: DepthCard, base: Model, unlearned: Model, t0: float) -> DepthCard:
    """Check that no weight moved, add the verdict and the time taken."""
    if {"base": model_fingerprint(base), "unlearned": model_fingerprint(unlearned)} != card.fingerprints:
        raise MechunError("a model's weights changed while measuring the depth card (a bug: analysis must not "
                          "train the models it measures)")
    card.verdict = verdict(card)
    card.seconds = round(time.time() - t0, 1)
    return card


def depth_card(base: Model, unlearned: Model, world: World, forget: str, method: str = "",
               intervention: Intervention | None = None, relearn_copy: Callable[[], Model] | None = None,
               steering: Float[Tensor, " d_model"] | None = None, config: DepthConfig | None = None, log: Log | None = None) -> DepthCard:
    """Measure every section of the depth card of an organism pair (see :mod:`mechun.depth`).

    ``unlearned`` may be ``base`` itself with an ``intervention`` (SAE clamping). ``relearn_copy()`` returns a fresh
    trainable copy of the unlearned model for the relearning test (e.g. ``lambda: load_model(dir)``); without it that
    section is marked skipped. ``steering`` (RMU's vector, if known) adds the junk direction's cosine with it."""
    if forget not in DOMAINS:
        raise MechunError(f"unknown forget domain {forget!r}; the world has {list(DOMAINS)}")
    cfg, fingerprints, t0 = _check_pair(base, unlearned, config)
    say = log or (lambda _m: None)
    say("depth card: behaviour")
    behaviour = _behaviour(base, unlearned, world, forget, intervention)
    say("depth card: junk direction")
    fp, rp = _cloze_texts(world, forget)
    caches = pair_caches(base, unlearned, fp, rp, unlearned_intervention=intervention)
    diag = diagnose_junk(base, unlearned, fp, rp, steering=steering, caches=caches)

    def score(model: Model) -> Scores:
        a = evaluate_world(model, world, domains=[forget, *retain_domains()])
        return {"forget": a[forget], "retain": retain_accuracy(a)}

    before = {k: {"forget": behaviour.accuracy[k][forget]} for k in ("base", "unlearned")}
    junk = _junk_section(base, unlearned, diag, score, before, intervention, cfg, steering is not None)
    say("depth card: probes")
    probes = _probes(base, unlearned, world, forget, intervention, cfg)
    say("depth card: relearning")
    relearning = _relearning(relearn_copy, world, forget, cfg, behaviour.forget["train"].base)
    say("depth card: specificity")
    card = DepthCard(method, asdict(cfg), intervention is not None, fingerprints, forget, "train", behaviour, junk,
                     probes, relearning, _cka(caches), _specificity(base, unlearned, world, forget, intervention, cfg,
                                                                    behaviour))
    return _finish(card, base, unlearned, t0)


def _cka(caches: PairCaches) -> CKASection:
    return CKASection(cka_between(caches.forget_base, caches.forget_unlearned),
                      cka_between(caches.retain_base, caches.retain_unlearned))


def _mcq_specificity(base: Model, unlearned: Model, retain_mcq: Sequence[MCQ], forget_prompts: Sequence[str],
                     retain_prompts: Sequence[str], before: Mapping[str, Scores], intervention: Intervention | None,
                     cfg: DepthConfig) -> Specificity:
    dynamic, rng = _with_forget_prefix(retain_prompts, forget_prompts, cfg.seed)
    nkl = _nkl(base, unlearned, {"static": list(retain_prompts), "dynamic": dynamic}, intervention)
    in_context = [MCQ(f"{rng.choice(list(forget_prompts))} {q.text}", q.choices, q.answer_index, q.fact, q.question,
                      q.style, q.source) for q in retain_mcq]
    with applied(intervention):
        dyn_unl = mcq_accuracy(unlearned, in_context)
    retain_acc = {"static": {k: before[k]["retain"]["mcq"] for k in ("base", "unlearned")},
                  "dynamic": {"base": mcq_accuracy(base, in_context), "unlearned": dyn_unl}}
    return Specificity(nkl["static"], nkl["dynamic"], retain_acc)


def mcq_depth_card(base: Model, unlearned: Model, forget_mcq: Sequence[MCQ], retain_mcq: Sequence[MCQ],
                   forget_prompts: Sequence[str], retain_prompts: Sequence[str], method: str = "",
                   intervention: Intervention | None = None, steering: Float[Tensor, " d_model"] | None = None,
                   config: DepthConfig | None = None, all_orders_max: int = 100, log: Log | None = None) -> DepthCard:
    """The depth card for real checkpoints and benchmark files (e.g. zephyr-7b-beta vs Zephyr_RMU on WMDP-Bio and
    MMLU, loaded with :func:`mechun.data.load_mcq`), where no synthetic world gives attribute labels.

    Same layout as :func:`depth_card`, with MCQ as the one behavioural format: forget / retain MCQ accuracy, the
    all-orders filter on the first ``all_orders_max`` forget questions (24 forwards each), junk-direction recovery
    of forget MCQ accuracy (the direction from ``forget_prompts`` vs ``retain_prompts``), CKA on both prompt sets,
    and specificity: retain MCQ accuracy and NKL on ``retain_prompts``, static and with a forget prompt prepended.
    Probes and relearning need labelled facts and a training copy; they are marked skipped."""
    if not forget_mcq or not retain_mcq or not forget_prompts or not retain_prompts:
        raise MechunError("pass forget and retain MCQ questions and forget and retain prompts (none may be empty)")
    cfg, fingerprints, t0 = _check_pair(base, unlearned, config)
    say = log or (lambda _m: None)
    chance = 1 / len(LETTERS)

    def score(model: Model) -> Scores:
        return {"forget": {"mcq": mcq_accuracy(model, forget_mcq)}, "retain": {"mcq": mcq_accuracy(model, retain_mcq)}}

    say("depth card: behaviour")
    before = {"base": score(base)}
    with applied(intervention):
        before["unlearned"] = score(unlearned)
    fb, fu = before["base"]["forget"]["mcq"], before["unlearned"]["forget"]["mcq"]
    behaviour = Behaviour({k: {g: dict(v) for g, v in s.items()} for k, s in before.items()},
                          {"mcq": FormatAccuracy(fb, fu, chance, _drop_share(fb, fu, chance))},
                          _mcq_all_orders(base, unlearned, list(forget_mcq)[:all_orders_max], intervention))
    say("depth card: junk direction")
    caches = pair_caches(base, unlearned, forget_prompts, retain_prompts, unlearned_intervention=intervention)
    diag = diagnose_junk(base, unlearned, forget_prompts, retain_prompts, steering=steering, caches=caches)
    junk = _junk_section(base, unlearned, diag, score, before, intervention, cfg, steering is not None)
    say("depth card: specificity")
    spec = _mcq_specificity(base, unlearned, retain_mcq, forget_prompts, retain_prompts, before, intervention, cfg)
    card = DepthCard(method, asdict(cfg), intervention is not None, fingerprints, "loaded MCQ", "mcq", behaviour,
                     junk, Skipped("loaded MCQ data has no per-subject attribute labels to probe for"),
                     Skipped("relearning on benchmark files is not implemented; use depth_card on an organism"),
                     _cka(caches), spec)
    return _finish(card, base, unlearned, t0)
