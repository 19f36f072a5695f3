"""The ``mechun`` command: a thin layer that parses arguments and calls the library.

    mechun organism train --preset tiny|main --seed N --out DIR
    mechun eval --model DIR [--json]
    mechun cache --model DIR --prompts FILE [--layers 0,1,2] [--positions last|all] --out F.safetensors
    mechun unlearn --method grad_ascent|grad_diff|npo|simnpo|rmu|localized_ft --model DIR --forget DOMAIN --out DIR
    mechun depth --base DIR --unlearned DIR --forget DOMAIN --out OUT
    mechun reproduce rmu-shallow|depth|... --out DIR [--quick] [--seed N] [--no-sweep]

Progress goes to stderr; with ``--json`` stdout holds exactly one JSON object.

Each command is two neighbours: ``_add_<cmd>`` declares its options and ``_cmd_<cmd>`` runs it (with
``_check_<cmd>`` between them where options depend on each other). Defaults are read from the library
(``RMUConfig``, ``train_sae``, ``DepthConfig``, ...), so the command and the Python API cannot drift apart.

An argument mistake -- a value of the wrong kind or range, or an option given without the one it needs -- is a usage
error: argparse prints the command's usage line and exits with status 2, before any model is loaded and before
anything is written. What can only be known by reading files or models (a missing checkpoint, an unknown domain, an
out-of-range layer) is a runtime error, printed as ``mechun: error: ...``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mechun.depth import DepthCard, DepthConfig
from mechun.edit import KINDS as EDIT_KINDS
from mechun.edit import localized_finetune
from mechun.models import HOOK_KINDS
from mechun.organism.train import DEFAULT_PRESET, PRESETS
from mechun.organism.world import MCQ_STYLES
from mechun.reproduce import ANALYSES
from mechun.sae import MODES as SAE_MODES
from mechun.sae import sae_intervention, select_features, train_sae
from mechun.unlearn.rmu import RMUConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

Parser = argparse.ArgumentParser
Subparsers = argparse._SubParsersAction


# -- argument types: each raises ArgumentTypeError, which argparse turns into a usage error naming the option --------
def _int(text: str, minimum: int | None, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _int(text, 1, "a positive integer")


def _ints(text: str, minimum: int | None, what: str) -> list[int]:
    try:
        return [_int(x.strip(), minimum, what) for x in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _int_list(text: str) -> list[int]:
    return _ints(text, None, "comma-separated integers, e.g. 0,2")


def _non_negative_int_list(text: str) -> list[int]:
    return _ints(text, 0, "comma-separated non-negative integers, e.g. 0,5,10")


def _float(text: str, ok: Callable[[float], bool], what: str) -> float:
    """A finite float that passes ``ok``; NaN and infinities never do (``nan <= 0`` is False, so check finiteness)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _finite_float(text: str) -> float:
    return _float(text, lambda v: True, "a finite number")


def _finite_positive_float(text: str) -> float:
    return _float(text, lambda v: v > 0, "a finite number > 0")


def _fraction(text: str) -> float:
    return _float(text, lambda v: 0 <= v <= 1, "a frequency between 0 and 1")


def _non_negative_float(text: str) -> float:
    return _float(text, lambda v: v >= 0, "a finite number >= 0")


def _dtype(text: str) -> str:
    import torch

    if not isinstance(getattr(torch, text, None), torch.dtype):
        raise argparse.ArgumentTypeError(f"expected a torch dtype name such as float32 or bfloat16, got {text!r}")
    return text


def _components(text: str) -> str:
    """'all', or KIND:LAYER items separated by commas (``mlp:1,attn:2``); returned as given once it parses."""
    if text == "all":
        return text
    for item in text.split(","):
        kind, _, layer = item.partition(":")
        if kind not in EDIT_KINDS or not re.fullmatch(r"-?\d+", layer):
            raise argparse.ArgumentTypeError(f"expected 'all' or KIND:LAYER items with KIND in {list(EDIT_KINDS)}, "
                                             f"e.g. mlp:1,attn:2; got {text!r}")
    return text


def _default(fn: Callable[..., Any], name: str) -> Any:
    """The library's default for keyword ``name`` of ``fn``: the command line offers the same one."""
    return inspect.signature(fn).parameters[name].default


# -- option groups shared by several commands ------------------------------------------------------------------------
def _model_options(p: Parser, large: bool = False) -> None:
    """--device; with ``large`` also --device-map (exclusive with --device) and --dtype, for checkpoints of any size."""
    group = p.add_mutually_exclusive_group() if large else p
    group.add_argument("--device", default=None, help="e.g. cpu or cuda:0 (default: cuda if available, else cpu)")
    if large:
        group.add_argument("--device-map", default=None, help='e.g. "auto" to spread a 7B model over several GPUs')
        p.add_argument("--dtype", type=_dtype, default=None, help="e.g. bfloat16 (default: float32)")


def _load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``load_model`` keywords from the --device / --device-map / --dtype options the command has."""
    device_map, dtype = getattr(args, "device_map", None), getattr(args, "dtype", None)
    kw: dict[str, Any] = {"device_map": device_map} if device_map else {"device": args.device}
    return kw | ({"dtype": dtype} if dtype else {})


def _world(args: argparse.Namespace, model_dir: str) -> Any:
    """The organism world for ``model_dir``: ``--world`` if given (it must match the one the checkpoint carries),
    else the checkpoint's own ``world.json``."""
    from mechun.models import resolve_source
    from mechun.organism.world import World, check_world_for

    resolve_source(model_dir)  # a missing dir, a file or a dir without config.json: say so before reading world.json
    world = World.load(args.world or model_dir)
    if args.world:
        check_world_for(world, model_dir)
    return world


def _world_option(p: Parser, where: str = "--model", what: str = "world.json") -> None:
    p.add_argument("--world", help=f"{what} (default: the one in {where})")


def _out_option(p: Parser, help: str, required: bool = True) -> None:
    p.add_argument("--out", required=required, help=help)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier mechun output at --out (never a file mechun did not write)")


def _seed(text: str) -> int:
    value = _int(text, 0, "a seed between 0 and 2**32 - 1")
    if value > 2**32 - 1:
        raise argparse.ArgumentTypeError(f"expected a seed between 0 and 2**32 - 1, got {text!r}")
    return value


def _seed_option(p: Parser) -> None:
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default: %(default)s)")


def _progress_option(p: Parser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars or messages on stderr")


def _command(p: Parser, func: Callable[[argparse.Namespace], int],
             check: Callable[[Parser, argparse.Namespace], None] | None = None, out: str | None = "dir") -> None:
    """Register the handler, the cross-option check (``main`` runs it with this (sub)parser) and what ``--out`` is
    (``"dir"``, ``"file"`` or None), which ``main`` checks before the handler runs."""
    p.add_argument("--debug", action="store_true", help="on an error, show the traceback too")
    p.set_defaults(func=func, check=check, parser=p, out_kind=out)


def _all_or_none(parser: Parser, args: argparse.Namespace, options: Sequence[str], mode: str) -> bool:
    """Usage error unless all of ``options`` or none are given; True when all are."""
    given = [o for o in options if getattr(args, o.lstrip("-").replace("-", "_")) is not None]
    if given and len(given) < len(options):
        missing = [o for o in options if o not in given]
        parser.error(f"{mode} needs all of {', '.join(options)}; missing {', '.join(missing)}")
    return bool(given)


# -- organism --------------------------------------------------------------------------------------------------------
def _add_organism(sub: Subparsers) -> None:
    org = sub.add_parser("organism", help="train a model organism on a synthetic knowledge world")
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    p = org_sub.add_parser("train", help="train and save an organism checkpoint dir (config, weights, world.json)")
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help="tiny: half a minute, for tests; main: the organism every analysis uses, trained once per "
                        "machine (then cached) (default: %(default)s)")
    _seed_option(p)
    _out_option(p, "new checkpoint directory")
    p.add_argument("--no-cache", action="store_true",
                   help="train into --out directly instead of copying the per-machine cached organism "
                        "($MECHUN_CACHE, default ~/.cache/mechun), training it there first if needed")
    _progress_option(p)
    _command(p, _cmd_organism_train)


def _cmd_organism_train(args: argparse.Namespace) -> int:
    from mechun.organism.train import cached_organism, copy_organism, train_organism

    progress = not args.no_progress
    if args.no_cache:
        out = train_organism(args.out, preset=args.preset, seed=args.seed, progress=progress, overwrite=args.overwrite)
    else:
        out = copy_organism(cached_organism(args.preset, args.seed, progress=progress), args.out, args.overwrite)
    print(f"saved model organism to {out}", file=sys.stderr)
    return 0


# -- eval ------------------------------------------------------------------------------------------------------------
def _add_eval(sub: Subparsers) -> None:
    p = sub.add_parser("eval", help="accuracy per domain and format (train templates, paraphrases, MCQ in one order "
                                    "and right in all 24 orders, on facts never seen in MCQ form)")
    p.add_argument("--model", required=True, help="organism checkpoint dir")
    _world_option(p)
    p.add_argument("--domains", help="comma-separated domains (default: all)")
    _model_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _command(p, _cmd_eval, out=None)


def _cmd_eval(args: argparse.Namespace) -> int:
    from mechun.evaluate import evaluate_world
    from mechun.models import load_model
    from mechun.organism.world import DOMAINS

    world = _world(args, args.model)
    model = load_model(args.model, **_load_kwargs(args))
    world.check_model(model)
    acc = evaluate_world(model, world, domains=args.domains.split(",") if args.domains else None, all_orders=True,
                         progress=True)
    if args.json:
        print(json.dumps({"model": args.model, "accuracy": acc}))
        return 0
    print(f"{'domain':<10} {'kind':<7} {'train':>6} {'paraphrase':>11} {'mcq':>6} {'mcq_all_orders':>15}")
    for domain, a in acc.items():
        print(f"{domain:<10} {DOMAINS.get(domain, ''):<7} {a['train']:>6.3f} {a['paraphrase']:>11.3f} "
              f"{a['mcq']:>6.3f} {a['mcq_all_orders']:>15.3f}")
    return 0


# -- cache -----------------------------------------------------------------------------------------------------------
def _add_cache(sub: Subparsers) -> None:
    from mechun.cache import cache_residuals

    p = sub.add_parser("cache", help="cache residual streams of prompts (one per line) to a safetensors file")
    p.add_argument("--model", required=True, help="checkpoint dir or hub name")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--layers", type=_int_list, help="comma-separated layers (default: all)")
    p.add_argument("--positions", default="last", choices=["last", "all"], help="(default: %(default)s)")
    p.add_argument("--hook", default=_default(cache_residuals, "hook"), choices=HOOK_KINDS,
                   help="(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=_default(cache_residuals, "batch_size"),
                   help="prompts per forward pass (default: %(default)s)")
    _model_options(p)
    _out_option(p, "the .safetensors file to write")
    _progress_option(p)
    _command(p, _cmd_cache, out="file")


def _cmd_cache(args: argparse.Namespace) -> int:
    from mechun.cache import cache_residuals
    from mechun.data import read_prompts
    from mechun.models import load_model

    prompts = read_prompts(args.prompts)
    model = load_model(args.model, **_load_kwargs(args))
    cache = cache_residuals(model, prompts, layers=args.layers, positions=args.positions, batch_size=args.batch_size,
                            hook=args.hook, progress=not args.no_progress)
    cache.save(args.out, overwrite=args.overwrite)
    print(f"cached {tuple(cache.acts.shape)} ({cache.hook_names[0]}..) to {args.out}", file=sys.stderr)
    return 0


# -- rmu -------------------------------------------------------------------------------------------------------------
def _add_rmu(sub: Subparsers) -> None:
    cfg = RMUConfig(forget_domains=[])  # the library's defaults
    p = sub.add_parser("rmu", help="unlearn a forget domain with RMU; saves an HF checkpoint dir with rmu.json")
    p.add_argument("--model", required=True, help="base organism checkpoint dir")
    p.add_argument("--forget", required=True, help="forget domain(s), comma-separated (e.g. pathogen)")
    p.add_argument("--layer", type=int, default=cfg.layer, help="RMU layer l (default n_layers//2); updates l-2..l")
    p.add_argument("--steering-coeff", type=_finite_positive_float, default=cfg.steering_coeff,
                   help=f"c; default {cfg.auto_coeff_mult:g}x the base model's mean forget-token norm at the layer")
    p.add_argument("--alpha", type=_non_negative_float, default=cfg.alpha,
                   help="weight of the retain loss (default: %(default)s)")
    p.add_argument("--lr", type=_finite_positive_float, default=cfg.lr, help="learning rate (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=cfg.steps, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=cfg.batch_size, help="(default: %(default)s)")
    _seed_option(p)
    _world_option(p)
    _model_options(p)
    _out_option(p, "new checkpoint directory")
    _progress_option(p)
    _command(p, _cmd_rmu)


def _cmd_rmu(args: argparse.Namespace) -> int:
    import dataclasses

    from mechun.models import load_model
    from mechun.unlearn.rmu import rmu_unlearn, save_unlearned

    world = _world(args, args.model)
    forget = args.forget.split(",")
    cfg = RMUConfig(forget, layer=args.layer, steering_coeff=args.steering_coeff, alpha=args.alpha, lr=args.lr,
                    steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    model, frozen = load_model(args.model, **_load_kwargs(args)), load_model(args.model, **_load_kwargs(args))
    world.check_model(model)
    forget_texts, retain = world.corpora(forget)
    res = rmu_unlearn(model, frozen, forget_texts, retain, cfg, progress=not args.no_progress)
    save_unlearned(model, res, args.out, extra={"base_model": str(args.model), "forget_domain": forget[0]},
                   files={"world.json": world.to_json()}, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "config": dataclasses.asdict(res.config), "final_loss": res.losses[-1]}))
    return 0


# -- unlearn ---------------------------------------------------------------------------------------------------------
#: Options that only some methods take (the option's dest -> the methods).
_METHOD_OPTIONS = {"alpha": ("grad_diff", "npo", "simnpo", "rmu"), "beta": ("npo", "simnpo"), "gamma": ("simnpo",),
                   "layer": ("rmu",), "steering_coeff": ("rmu",), "n_mlps": ("localized_ft",)}


def _add_unlearn(sub: Subparsers) -> None:
    from mechun.unlearn import METHODS

    p = sub.add_parser("unlearn", help="unlearn a forget domain with any method (gradient ascent / difference, NPO, "
                                       "SimNPO, RMU, localized FT); saves an HF checkpoint dir with unlearn.json")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--model", required=True, help="base organism checkpoint dir")
    p.add_argument("--forget", required=True, help="forget domain (e.g. pathogen)")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps (default: the method's)")
    p.add_argument("--lr", type=_finite_positive_float, default=None, help="learning rate (default: the method's)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="(default: the method's)")
    p.add_argument("--alpha", type=_non_negative_float, default=None, help="weight of the retain term")
    p.add_argument("--beta", type=_finite_positive_float, default=None, help="npo / simnpo: inverse temperature")
    p.add_argument("--gamma", type=_finite_float, default=None, help="simnpo: margin")
    p.add_argument("--layer", type=int, default=None, help="rmu: layer (updates the MLPs of layer-2..layer)")
    p.add_argument("--steering-coeff", type=_finite_positive_float, default=None, help="rmu: c")
    p.add_argument("--n-mlps", type=_positive_int, default=None, help="localized_ft: how many MLPs to train")
    _seed_option(p)
    _world_option(p)
    _model_options(p)
    _out_option(p, "new checkpoint directory")
    _progress_option(p)
    _command(p, _cmd_unlearn, _check_unlearn)


def _check_unlearn(parser: Parser, args: argparse.Namespace) -> None:
    for dest, methods in _METHOD_OPTIONS.items():
        if getattr(args, dest) is not None and args.method not in methods:
            parser.error(f"--{dest.replace('_', '-')} applies to {', '.join(methods)}, not {args.method}")


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from mechun.evaluate import evaluate_world, retain_accuracy
    from mechun.models import load_model
    from mechun.unlearn import UnlearnData, default_config, save_unlearned_model, unlearn

    world = _world(args, args.model)
    world.facts_of(args.forget)  # an unknown domain fails here, naming the domains
    opts = {k: getattr(args, k) for k in ("steps", "lr", "batch_size", "seed")}
    opts |= {k: getattr(args, k) for k, methods in _METHOD_OPTIONS.items() if args.method in methods}
    if args.method == "rmu":
        opts["forget_domains"] = [args.forget]
    cfg = default_config(args.method, **opts)
    data = UnlearnData.from_world(world, args.forget)
    model = load_model(args.model, **_load_kwargs(args))
    world.check_model(model)
    reference = load_model(args.model, **_load_kwargs(args)) if args.method in ("rmu", "npo") else None
    result = unlearn(model, cfg, data, reference=reference, progress=not args.no_progress)
    acc = evaluate_world(model, world, formats=("train",))
    save_unlearned_model(model, result, args.out, extra={"base_model": str(args.model), "forget_domain": args.forget},
                         files={"world.json": world.to_json()}, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "method": result.method, "config": result.to_json()["config"],
                      "final_loss": result.losses[-1] if result.losses else None,
                      "forget_accuracy": acc[args.forget]["train"],
                      "retain_accuracy": retain_accuracy({d: a for d, a in acc.items() if d != args.forget}
                                                         | {args.forget: acc[args.forget]})["train"]}))
    return 0


# -- junk ------------------------------------------------------------------------------------------------------------
def _add_junk(sub: Subparsers) -> None:
    p = sub.add_parser("junk", help="junk-direction diagnosis and recovery for a (base, unlearned) pair")
    p.add_argument("--base", required=True, help="base checkpoint dir")
    p.add_argument("--unlearned", required=True, help="unlearned checkpoint dir")
    p.add_argument("--forget", default=None, help="forget domain (default: from rmu.json)")
    p.add_argument("--layer", type=int, default=None, help="layer of the direction (default: rmu.json's)")
    p.add_argument("--forget-prompts", help="any models: forget-domain prompts, one per line (diagnosis only)")
    p.add_argument("--retain-prompts", help="any models: retain prompts, one per line")
    _model_options(p, large=True)
    _out_option(p, "output directory (results.json, report.html, junk_direction.safetensors)")
    _command(p, _cmd_junk, _check_junk)


def _check_junk(parser: Parser, args: argparse.Namespace) -> None:
    _all_or_none(parser, args, ("--forget-prompts", "--retain-prompts"), "prompt-file mode")


def _cmd_junk(args: argparse.Namespace) -> int:
    from mechun.data import read_prompts
    from mechun.junk import junk_pair_job, junk_prompts_job

    if args.forget_prompts:
        forget, retain = read_prompts(args.forget_prompts), read_prompts(args.retain_prompts)
        r = junk_prompts_job(args.base, args.unlearned, Path(args.out), forget, retain, layer=args.layer,
                             overwrite=args.overwrite, **_load_kwargs(args))
        print(json.dumps({"out": args.out, "layer": r["layer"], "norm_ratio_forget": r["norm_ratio_forget"]}))
        return 0
    r = junk_pair_job(Path(args.base), Path(args.unlearned), Path(args.out), forget=args.forget, layer=args.layer,
                      overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "layer": r["layer"],
                      "recovery_fraction_by_format": r["recovery_fraction_by_format"]}))
    return 0


# -- localize --------------------------------------------------------------------------------------------------------
_LOCALIZE_NEEDS = {"causal-tracing": ("prompt", "subject", "answer"),
                   "activation-patching": ("clean", "corrupt", "answer", "wrong"),
                   "attribution-patching": ("clean", "corrupt", "answer", "wrong"), "probing": ("relation",)}
def _add_localize(sub: Subparsers) -> None:
    from mechun.localize import NOISE_RULES, TRACE_KINDS, causal_trace

    p = sub.add_parser("localize", help="where is a fact recalled? patching, attribution, causal tracing, probes")
    p.add_argument("--model", required=True, help="checkpoint dir or hub name")
    p.add_argument("--method", required=True, choices=list(_LOCALIZE_NEEDS))
    p.add_argument("--clean", help="patching: the clean prompt")
    p.add_argument("--corrupt", help="patching: the corrupt prompt (same number of tokens)")
    p.add_argument("--answer", help="the clean answer (one token)")
    p.add_argument("--wrong", help="patching: the corrupt prompt's answer; metric = logit(answer) - logit(wrong)")
    p.add_argument("--hook", default="resid_pre", choices=HOOK_KINDS, help="patching (default: %(default)s)")
    p.add_argument("--prompt", help="causal tracing: the prompt")
    p.add_argument("--subject", help="causal tracing: the subject whose tokens are corrupted")
    p.add_argument("--kind", default=_default(causal_trace, "kind"), choices=TRACE_KINDS,
                   help="causal tracing: what is restored (default: %(default)s)")
    p.add_argument("--samples", type=_positive_int, default=_default(causal_trace, "samples"),
                   help="causal tracing: noise samples (default: %(default)s)")
    p.add_argument("--noise-rule", default=_default(causal_trace, "noise_rule"), choices=NOISE_RULES,
                   help="causal tracing: noise scale; subjects = ROME's 3 x std of subject-token embeddings over "
                        "the world's subjects (organism) or the traced subject; embedding = 3 x std of the whole "
                        "embedding matrix (default: %(default)s)")
    p.add_argument("--relation", help="probing: an organism relation (e.g. sport)")
    _world_option(p, what="probing and causal tracing: world.json")
    _seed_option(p)
    _model_options(p)
    _out_option(p, "write the JSON here too", required=False)
    _command(p, _cmd_localize, _check_localize, out="file")


def _check_localize(parser: Parser, args: argparse.Namespace) -> None:
    missing = [f"--{n}" for n in _LOCALIZE_NEEDS[args.method] if getattr(args, n) is None]
    if missing:
        parser.error(f"--method {args.method} needs {' '.join(missing)}")


def _localize_patching(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mechun import localize

    metric = localize.logit_diff_metric(model, args.answer, args.wrong)
    if args.method == "activation-patching":
        res = localize.activation_patching(model, args.clean, args.corrupt, metric, hook=args.hook)
    else:
        res = localize.attribution_patching(model, args.clean, args.corrupt, metric, hooks_=[args.hook])[args.hook]
    return {"method": args.method, "hook": args.hook, "tokens": res.tokens, "scores": res.scores.tolist(),
            "clean_metric": res.clean_metric, "corrupt_metric": res.corrupt_metric,
            "metric": f"logit({args.answer}) - logit({args.wrong}) at the last position"}


def _localize_trace(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mechun.localize import causal_trace

    subjects = None
    if args.noise_rule == "subjects" and (args.world or (Path(args.model) / "world.json").is_file()):
        subjects = sorted(_world(args, args.model).subjects)  # ROME: every subject of the dataset
    res = causal_trace(model, args.prompt, args.answer, args.subject, kind=args.kind, samples=args.samples,
                       seed=args.seed, noise_rule=args.noise_rule, subjects=subjects)
    return {"method": args.method, "hook": res.hook, "tokens": res.tokens, "scores": res.scores.tolist(),
            "p_clean": res.clean_metric, "p_corrupt": res.corrupt_metric, "sigma": res.sigma,
            "noise_rule": args.noise_rule, "noise_subjects": "world" if subjects else "traced subject",
            "peak": dict(zip(("layer", "position", "indirect_effect"), res.peak(), strict=True))}


def _localize_probe(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from mechun.localize import probe_layers
    from mechun.organism.world import relation

    world = _world(args, args.model)
    rel = relation(args.relation)
    facts = world.facts_of(relation=args.relation)
    held = {f.subject for f in facts[: max(1, len(facts) // 3)]}
    rows = [(t.format(s=f.subject), f.subject, rel.values.index(f.answer), f.subject not in held)
            for f in facts for t in rel.train_templates]
    res = probe_layers(model, *map(list, zip(*rows, strict=True)), seed=args.seed)
    return {"method": args.method, "relation": args.relation, "train_accuracy": res.train_accuracy,
            "test_accuracy": res.test_accuracy, "lookup_layers": res.lookup_layers(), "n_test": res.n_test}


def _cmd_localize(args: argparse.Namespace) -> int:
    from mechun.models import load_model

    model = load_model(args.model, **_load_kwargs(args))
    run = {"causal-tracing": _localize_trace, "probing": _localize_probe}.get(args.method, _localize_patching)
    result = {**run(model, args), "mechun": {"command": "localize", "model": str(args.model)}}
    if args.out:
        from mechun.io import write_json

        write_json(args.out, result, indent=None)
    print(json.dumps(result))
    return 0


# -- edit ------------------------------------------------------------------------------------------------------------
_EDIT_MODES = {"unlearn": "unlearn", "edit": "learn"}  # command-line mode -> localized_finetune's mode


def _add_edit(sub: Subparsers) -> None:
    p = sub.add_parser("edit", help="unlearn or edit organism facts by fine-tuning only chosen components")
    p.add_argument("--model", required=True, help="organism checkpoint dir")
    p.add_argument("--relation", required=True, help="e.g. sport")
    p.add_argument("--subjects", required=True, help="subjects, separated by ';'")
    p.add_argument("--mode", choices=list(_EDIT_MODES), default="unlearn", help="(default: %(default)s)")
    p.add_argument("--new-answer", help="edit: the new attribute")
    p.add_argument("--components", type=_components, default="mlp:1",
                   help="e.g. mlp:1,attn:2, or 'all' (nonlocalized) (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=_default(localized_finetune, "steps"),
                   help="(default: %(default)s)")
    p.add_argument("--lr", type=_finite_positive_float, default=_default(localized_finetune, "lr"),
                   help="(default: %(default)s)")
    _seed_option(p)
    _world_option(p)
    _model_options(p)
    _out_option(p, "new checkpoint directory (with edit.json)")
    _progress_option(p)
    _command(p, _cmd_edit, _check_edit)


def _check_edit(parser: Parser, args: argparse.Namespace) -> None:
    if args.mode == "edit" and not args.new_answer:
        parser.error("--mode edit needs --new-answer")
    if not [s for s in args.subjects.split(";") if s.strip()]:
        parser.error("--subjects needs at least one subject (separate several with ';')")


def _cmd_edit(args: argparse.Namespace) -> int:
    from mechun.edit import component_mask, full_mask
    from mechun.errors import MechunError
    from mechun.evaluate import cloze_accuracy
    from mechun.models import load_model, save_model, word_ids

    world = _world(args, args.model)
    subjects = [s.strip() for s in args.subjects.split(";") if s.strip()]
    facts = [f for f in world.facts_of(relation=args.relation) if f.subject in subjects]
    if len(facts) != len(subjects):
        raise MechunError(f"not every subject has a {args.relation!r} fact in the world: {subjects}")
    model = load_model(args.model, **_load_kwargs(args))
    world.check_model(model)
    if args.new_answer:
        word_ids(model, args.new_answer, "--new-answer")
    if args.components == "all":
        mask = full_mask(model)
    else:
        comps = [(c.split(":")[0], int(c.split(":")[1])) for c in args.components.split(",")]
        mask = component_mask(model, comps, label=args.components)
    prompts = world.prompts(facts=facts)
    answers = [p.answer for p in prompts] if args.mode == "unlearn" else [args.new_answer] * len(prompts)
    others = world.prompts(facts=[f for f in world.facts if f not in facts])
    localized_finetune(model, mask, [p.text for p in prompts], answers, mode=_EDIT_MODES[args.mode],
                       maintain=[(p.text, p.answer) for p in others], lm_texts=world.filler, steps=args.steps,
                       lr=args.lr, seed=args.seed, progress=not args.no_progress)
    info = {"mode": args.mode, "relation": args.relation, "subjects": subjects, "new_answer": args.new_answer,
            "mask": mask.to_json(), "steps": args.steps, "lr": args.lr, "seed": args.seed, "base_model": args.model,
            "edited_accuracy": cloze_accuracy(model, prompts), "other_accuracy": cloze_accuracy(model, others)}
    save_model(model, args.out, extra_files={"edit.json": info, "world.json": world.to_json()},
               overwrite=args.overwrite)
    print(json.dumps({k: v for k, v in info.items() if k != "mask"} | {"n_params": mask.n_params}))
    return 0


# -- sae -------------------------------------------------------------------------------------------------------------
def _add_sae(sub: Subparsers) -> None:
    sae = sub.add_parser("sae", help="sparse autoencoders: train one with sae-lens, unlearn by feature clamping")
    sae_sub = sae.add_subparsers(dest="sae_command", required=True)
    _add_sae_train(sae_sub)
    _add_sae_unlearn(sae_sub)


def _add_sae_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train an SAE on blocks.{layer}.hook_resid_post (offline) and save it")
    p.add_argument("--model", required=True, help="organism checkpoint dir")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--architecture", choices=["standard", "topk"], default=_default(train_sae, "architecture"),
                   help="(default: %(default)s)")
    p.add_argument("--d-sae", type=_positive_int, default=_default(train_sae, "d_sae"),
                   help="number of features (default: %(default)s)")
    p.add_argument("--k", type=_positive_int, default=_default(train_sae, "k"),
                   help="topk: active features per token (default: %(default)s)")
    p.add_argument("--tokens", type=_positive_int, default=_default(train_sae, "training_tokens"),
                   help="training tokens (default: %(default)s)")
    _seed_option(p)
    _world_option(p)
    _model_options(p)
    _out_option(p, "new SAE directory")
    _command(p, _cmd_sae_train, _check_sae_train)


def _check_sae_train(parser: Parser, args: argparse.Namespace) -> None:
    if args.architecture == "topk" and args.k > args.d_sae:
        parser.error(f"--k {args.k} is more than --d-sae {args.d_sae}: a top-k SAE keeps k of its d_sae features")


def _cmd_sae_train(args: argparse.Namespace) -> int:
    from mechun.models import load_model
    from mechun.sae import save_sae

    world = _world(args, args.model)
    model = load_model(args.model, **_load_kwargs(args))
    world.check_model(model)
    sae = train_sae(model, world.training_texts(), layer=args.layer,
                    architecture=args.architecture, d_sae=args.d_sae, k=args.k, training_tokens=args.tokens,
                    seed=args.seed)
    save_sae(sae, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, "layer": args.layer, "architecture": args.architecture, "d_sae": args.d_sae}))
    return 0


def _add_sae_unlearn(sub: Subparsers) -> None:
    p = sub.add_parser("unlearn", help="select forget features (SAEBench rule) and measure the intervention")
    p.add_argument("--model", required=True, help="organism checkpoint dir")
    p.add_argument("--sae", required=True, help="SAE dir written by `mechun sae train` (or any sae-lens dir)")
    p.add_argument("--forget", required=True, help="forget domain, e.g. pathogen")
    p.add_argument("--threshold", type=_fraction, default=_default(select_features, "retain_threshold"),
                   help="max activation frequency on retain text (default: %(default)s)")
    p.add_argument("--n", type=_positive_int, default=_default(select_features, "n"),
                   help="number of features (default: %(default)s)")
    p.add_argument("--mode", choices=SAE_MODES, default=_default(sae_intervention, "mode"),
                   help="(default: %(default)s)")
    p.add_argument("--value", type=_finite_float, default=_default(sae_intervention, "value"),
                   help="clamp: -m; scale: -k (default: %(default)s)")
    _world_option(p)
    _model_options(p)
    _command(p, _cmd_sae_unlearn, out=None)


def _cmd_sae_unlearn(args: argparse.Namespace) -> int:
    from mechun.errors import MechunError
    from mechun.evaluate import evaluate_world
    from mechun.models import load_model
    from mechun.sae import feature_stats, load_sae

    world = _world(args, args.model)
    model = load_model(args.model, **_load_kwargs(args))
    world.check_model(model)
    sae = load_sae(args.sae)
    if args.n > int(sae.W_dec.shape[0]):
        raise MechunError(f"--n {args.n} is more than the SAE's {int(sae.W_dec.shape[0])} features; pass --n "
                          f"{int(sae.W_dec.shape[0])} or fewer")
    forget, retain = world.corpora([args.forget])
    feats = select_features(feature_stats(model, sae, forget[args.forget]), feature_stats(model, sae, retain),
                            retain_threshold=args.threshold, n=args.n)
    before = evaluate_world(model, world)
    with sae_intervention(model, sae, feats, mode=args.mode, value=args.value):
        after = evaluate_world(model, world)
    print(json.dumps({"features": feats, "mode": args.mode, "value": args.value, "before": before, "after": after}))
    return 0


# -- depth -----------------------------------------------------------------------------------------------------------
_BENCHMARK_FILES = ("--forget-mcq", "--retain-mcq", "--forget-prompts", "--retain-prompts")


def _add_depth(sub: Subparsers) -> None:
    cfg = DepthConfig()
    p = sub.add_parser("depth", help="unlearning depth card for a (base, unlearned) pair: removed or hidden?")
    p.add_argument("--base", required=True, help="base checkpoint dir (an organism: its world.json is used)")
    p.add_argument("--unlearned", required=True, help="unlearned checkpoint dir, made by any method")
    p.add_argument("--forget", help="organism pair: the forgotten domain, e.g. pathogen")
    p.add_argument("--forget-mcq", help="benchmark mode (any checkpoints): forget MCQ file, e.g. WMDP-Bio .jsonl")
    p.add_argument("--retain-mcq", help="benchmark mode: retain MCQ file, e.g. MMLU .parquet")
    p.add_argument("--forget-prompts", help="benchmark mode: forget-domain text, one prompt per line")
    p.add_argument("--retain-prompts", help="benchmark mode: retain text, one prompt per line")
    p.add_argument("--mcq-style", default="mmlu", choices=list(MCQ_STYLES),
                   help="how questions are rendered (default: %(default)s)")
    p.add_argument("--method", help="label for the report (default: the unlearned dir's name)")
    p.add_argument("--layer", type=int, default=cfg.junk_layer,
                   help="layer of the junk direction (default: where the forget norm ratio peaks)")
    p.add_argument("--relearn-steps", type=_non_negative_int_list, default=",".join(map(str, cfg.relearn_steps)),
                   help="organism pair: comma-separated relearning checkpoints (default: %(default)s)")
    _seed_option(p)
    _world_option(p, where="--base")
    _model_options(p, large=True)
    _out_option(p, "new directory for card.json and report.html")
    _progress_option(p)
    _command(p, _cmd_depth, _check_depth)


def _check_depth(parser: Parser, args: argparse.Namespace) -> None:
    if not _all_or_none(parser, args, _BENCHMARK_FILES, "benchmark mode") and not args.forget:
        parser.error("pass --forget DOMAIN (an organism pair) or the four benchmark files "
                     f"({' '.join(_BENCHMARK_FILES)})")


def _depth_benchmark_card(args: argparse.Namespace, cfg: DepthConfig,
                          log: Callable[[str], None] | None) -> DepthCard:
    from mechun.data import load_mcq, read_prompts
    from mechun.depth import mcq_depth_card
    from mechun.models import load_model

    forget_mcq = load_mcq(args.forget_mcq, style=args.mcq_style)
    retain_mcq = load_mcq(args.retain_mcq, style=args.mcq_style)
    forget, retain = read_prompts(args.forget_prompts), read_prompts(args.retain_prompts)
    base, unlearned = load_model(args.base, **_load_kwargs(args)), load_model(args.unlearned, **_load_kwargs(args))
    return mcq_depth_card(base, unlearned, forget_mcq, retain_mcq, forget, retain,
                          method=args.method or Path(args.unlearned).name, config=cfg, log=log)


def _depth_organism_card(args: argparse.Namespace, cfg: DepthConfig,
                         log: Callable[[str], None] | None) -> DepthCard:
    from dataclasses import replace

    from mechun.depth import depth_card
    from mechun.models import load_model
    from mechun.unlearn.rmu import load_steering

    world = _world(args, args.base)
    base = load_model(args.base, **_load_kwargs(args))
    unlearned = load_model(args.unlearned, **_load_kwargs(args))
    world.check_model(base)
    steering = None
    if (Path(args.unlearned) / "rmu.json").is_file():
        steering = load_steering(args.unlearned, int(base.cfg.d_model)).get(args.forget)
    return depth_card(base, unlearned, world, args.forget, method=args.method or Path(args.unlearned).name,
                      relearn_copy=lambda: load_model(args.unlearned, **_load_kwargs(args)), steering=steering,
                      config=replace(cfg, relearn_steps=tuple(args.relearn_steps)), log=log)


def _cmd_depth(args: argparse.Namespace) -> int:
    from mechun.depth import write_card

    log = None if args.no_progress else (lambda m: print(m, file=sys.stderr))
    cfg = DepthConfig(seed=args.seed, junk_layer=args.layer)
    make = _depth_benchmark_card if args.forget_mcq else _depth_organism_card
    card = make(args, cfg, log)
    card.models = {"base": str(args.base), "unlearned": str(args.unlearned)}
    write_card(card, Path(args.out), overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), "verdict": card.verdict.line if card.verdict else None}))
    return 0


def _add_depth_measures(sub: Subparsers) -> None:
    from mechun.data import QA_TEMPLATES

    p = sub.add_parser("depth-measures", help="the depth benchmark's measures (UDS, CKA, junk recovery, logit lens, "
                       "...) for any full / retain / unlearned checkpoints on TOFU-format question files")
    p.add_argument("--full", required=True, help="checkpoint dir trained on everything (e.g. TOFU full)")
    p.add_argument("--retain", required=True, help="checkpoint dir never trained on the forget set (e.g. retain90)")
    p.add_argument("--unlearned", required=True, help="the unlearned checkpoint dir, made by any method")
    p.add_argument("--forget-qa", required=True, help="forget questions, TOFU format (e.g. forget10.json)")
    p.add_argument("--retain-qa", required=True, help="retain questions, TOFU format (e.g. retain_perturbed.json)")
    p.add_argument("--template", default="plain",
                   help="prompt template: one of " + ", ".join(f"{k} ({v!r})" for k, v in QA_TEMPLATES.items())
                   + ", or a string with {question}; \\n in it is a newline (default: %(default)s)")
    p.add_argument("--max-questions", type=_positive_int, default=200,
                   help="use the first N questions of each file (default: %(default)s)")
    p.add_argument("--uds-questions", type=_positive_int, default=100,
                   help="UDS on the first N forget questions; it costs two forwards per layer (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="(default: %(default)s)")
    _model_options(p, large=True)
    _out_option(p, "new directory for measures.json and report.html")
    _progress_option(p)
    _command(p, _cmd_depth_measures)


def _cmd_depth_measures(args: argparse.Namespace) -> int:
    from mechun.data import load_qa, qa_template
    from mechun.depth.checkpoint import qa_checkpoint_card, write_checkpoint_card
    from mechun.errors import MechunError
    from mechun.models import load_model, resolve_source

    template = qa_template(args.template.replace("\\n", "\n"))  # a typed \n is a newline; checked before loading
    if Path(args.forget_qa).resolve() == Path(args.retain_qa).resolve():
        raise MechunError(f"--forget-qa and --retain-qa are the same file ({args.forget_qa}); the retain questions "
                          "must be other facts (e.g. TOFU's retain90.json beside forget10.json)")
    forget, retain = load_qa(args.forget_qa), load_qa(args.retain_qa)
    for option in ("full", "retain", "unlearned"):
        resolve_source(getattr(args, option))  # a local dir is validated; a hub name passes (for online users)
    models = {k: load_model(getattr(args, k), **_load_kwargs(args)) for k in ("full", "retain", "unlearned")}
    log = None if args.no_progress else (lambda m: print(m, file=sys.stderr))
    card = qa_checkpoint_card(models["full"], models["retain"], models["unlearned"], forget, retain, template,
                              args.max_questions, args.uds_questions, args.batch_size, log=log)
    card.models = {k: resolve_source(getattr(args, k)) for k in ("full", "retain", "unlearned")}
    write_checkpoint_card(card, Path(args.out), overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), "uds_score": card.uds["score"], "measures": card.measures}))
    return 0


# -- reproduce -------------------------------------------------------------------------------------------------------
_ANALYSIS_HELP = {
    "rmu-shallow": "RMU junk-direction diagnosis and recovery (the main job)",
    "localized-editing": "localize fact recall and unlearn with masked fine-tuning",
    "sae-unlearning": "SAE feature clamping vs zero-ablation vs RMU",
    "depth": "depth cards for RMU and localized fine-tuning over 3 seeds",
    "edit-specificity": "CounterFact+ static vs dynamic neighbourhood scores of localized edits",
    "restore": "corrupt-then-unlearn (RESTOR), does unlearning restore the true facts?",
    "organism": "train the main organism and evaluate it",
    "depth-benchmark": "every unlearning method x strengths x seeds; which depth measure predicts relearning beyond "
                       "the retain oracle (AUC, Spearman)",
}


def _add_reproduce(sub: Subparsers) -> None:
    p = sub.add_parser("reproduce", help="run a whole analysis; writes DIR/results.json and DIR/report.html")
    described = "; ".join(f"{name}: {_ANALYSIS_HELP.get(name, f'analyses/{script}.py')}"
                          for name, script in ANALYSES.items())
    p.add_argument("analysis", choices=list(ANALYSES), help=described)
    _out_option(p, "output directory")
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds)")
    p.add_argument("--no-sweep", action="store_true",
                   help="rmu-shallow: skip the RMU strength sweep, run the 5-seed headline only (make reproduce)")
    _seed_option(p)
    _command(p, _cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from mechun.reproduce import reproduce

    out = reproduce(args.analysis, Path(args.out), quick=args.quick, seed=args.seed, overwrite=args.overwrite,
                    sweep=not args.no_sweep)
    print(f"wrote {out / 'report.html'} and {out / 'results.json'}", file=sys.stderr)
    return 0


# -- entry point -----------------------------------------------------------------------------------------------------
def build_parser() -> Parser:
    p = argparse.ArgumentParser(prog="mechun", description="Mechanistic study of unlearning and editing in LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_organism, _add_eval, _add_cache, _add_rmu, _add_unlearn, _add_junk, _add_localize, _add_edit,
                _add_sae, _add_depth, _add_depth_measures, _add_reproduce):
        add(sub)
    return p


def _is_localize_json(path: Path) -> bool:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("mechun") or {}).get("command") == "localize"


def _expected_bytes(args: argparse.Namespace) -> int:
    """A lower bound of what the command writes, for the free-space check before the work: a checkpoint-writing
    command writes about the input checkpoint's weights again."""
    if args.command in ("rmu", "edit"):
        model = Path(args.model)
        return sum(f.stat().st_size for f in model.glob("*.safetensors")) + 1_000_000 if model.is_dir() else 0
    return {"organism": 5_000_000, "reproduce": 20_000_000}.get(args.command, 1_000_000)


def _preflight(args: argparse.Namespace) -> None:
    """What can be checked before any work: the output path (writable, and not something mechun would have to
    replace without being asked or allowed) and the device."""
    from mechun.cache import is_cache_file
    from mechun.io import check_out_dir, check_out_file
    from mechun.models import check_device

    out = getattr(args, "out", None)
    if out is not None and args.out_kind == "dir":
        check_out_dir(out, args.overwrite, need_bytes=_expected_bytes(args))
    elif out is not None and args.out_kind == "file":
        is_mine = is_cache_file if args.command == "cache" else _is_localize_json
        check_out_file(out, args.overwrite, is_mine=is_mine, need_bytes=_expected_bytes(args))
    if getattr(args, "device", None):
        check_device(args.device)


def _close_progress_bars() -> None:
    """End any progress bar the failed work left open, so the error is the last line on stderr."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _error_line(e: BaseException) -> str:
    """One line naming the problem (and, from mechun's own errors, the fix)."""
    from mechun.errors import MechunError
    from mechun.io import is_disk_full

    if is_disk_full(e):
        where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
        return (f"no space left on the disk{where}; nothing was written (outputs appear whole or not at all); "
                "free some space or choose another --out")
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    elif isinstance(e, MechunError | OSError):
        text = str(e)
    else:
        text = (f"unexpected {type(e).__name__}: {e} -- an input mechun does not check yet or a bug; rerun with "
                "--debug for the traceback and report it")
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Parse (usage errors exit 2 here, before any work), check the output and device, then run the command.

    Exit status: 0 success, 2 usage error (argparse prints the usage line), 1 any other error (one line
    ``mechun: error: ...``; ``--debug`` adds the traceback), 130 interrupted (Ctrl-C). Outputs are written whole or
    not at all, so a failed or interrupted command leaves no partial file."""
    args = build_parser().parse_args(argv)
    if args.check is not None:
        args.check(args.parser, args)
    from mechun.progress import quiet_dependencies

    try:
        with quiet_dependencies():  # scoped: a caller of main() in Python keeps its own transformers settings
            _preflight(args)
            return args.func(args)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("mechun: interrupted; nothing partial was written (outputs appear whole or not at all)",
              file=sys.stderr)
        return 130
    except Exception as e:
        _close_progress_bars()
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"mechun: error: {_error_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
