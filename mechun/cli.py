"""The ``mechun`` command: a thin layer that parses arguments and calls the library.

    mechun organism train --preset tiny|small --seed N --out DIR
    mechun eval --model DIR [--json]
    mechun cache --model DIR --prompts FILE [--layers 0,1,2] [--positions last|all] --out F.safetensors
    mechun depth --base DIR --unlearned DIR --forget DOMAIN --out OUT
    mechun reproduce rmu-shallow|depth|... --out DIR [--quick] [--seed N]

Progress goes to stderr; with ``--json`` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _cmd_organism_train(args) -> int:
    from mechun.organism.train import train_organism

    out = train_organism(args.out, preset=args.preset, seed=args.seed, progress=not args.no_progress)
    print(f"saved model organism to {out}", file=sys.stderr)
    return 0


def _cmd_eval(args) -> int:
    from mechun.evaluate import evaluate_world
    from mechun.models import load_model
    from mechun.organism.world import World

    world = World.load(args.world or args.model)
    model = load_model(args.model, device=args.device)
    acc = evaluate_world(model, world, domains=args.domains.split(",") if args.domains else None)
    if args.json:
        print(json.dumps({"model": args.model, "accuracy": acc}))
    else:
        print(f"{'domain':<10} {'kind':<7} {'train':>6} {'paraphrase':>11} {'mcq':>6}")
        from mechun.organism.world import DOMAINS

        for domain, a in acc.items():
            print(f"{domain:<10} {DOMAINS.get(domain, ''):<7} {a['train']:>6.3f} {a['paraphrase']:>11.3f} "
                  f"{a['mcq']:>6.3f}")
    return 0


def _cmd_cache(args) -> int:
    from mechun.cache import cache_residuals
    from mechun.models import load_model

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    model = load_model(args.model, device=args.device)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    cache = cache_residuals(model, prompts, layers=layers, positions=args.positions, batch_size=args.batch_size,
                            hook=args.hook, progress=not args.no_progress)
    cache.save(args.out)
    print(f"cached {tuple(cache.acts.shape)} ({cache.hook_names[0]}..) to {args.out}", file=sys.stderr)
    return 0


def _cmd_rmu(args) -> int:
    import dataclasses

    from mechun.models import load_model
    from mechun.organism.train import mcq_orders_trained
    from mechun.organism.world import World
    from mechun.rmu import RMUConfig, rmu_unlearn, save_unlearned

    world = World.load(args.world or args.model)
    forget = args.forget.split(",")
    cfg = RMUConfig(forget, layer=args.layer, steering_coeff=args.steering_coeff, alpha=args.alpha, lr=args.lr,
                    steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise FileExistsError(f"{args.out} exists and is not empty; choose a new --out")
    model, frozen = load_model(args.model, device=args.device), load_model(args.model, device=args.device)
    forget_texts, retain = world.corpora(forget, mcq_per_fact=mcq_orders_trained(args.model))
    res = rmu_unlearn(model, frozen, forget_texts, retain, cfg, progress=not args.no_progress)
    save_unlearned(model, res, args.out, extra={"base_model": str(args.model), "forget_domain": forget[0]},
                   files={"world.json": world.to_json()})
    print(json.dumps({"out": args.out, "config": dataclasses.asdict(res.config), "final_loss": res.losses[-1]}))
    return 0


def _cmd_junk(args) -> int:
    from analyses.junk_pair import run, run_prompts

    if args.forget_prompts or args.retain_prompts:
        if not (args.forget_prompts and args.retain_prompts):
            raise FileNotFoundError("pass both --forget-prompts and --retain-prompts (text files, one per line)")
        read = lambda f: [x.strip() for x in Path(f).read_text().splitlines() if x.strip()]  # noqa: E731
        kw = {"dtype": args.dtype}
        kw.update({"device_map": args.device_map} if args.device_map else {"device": args.device})
        r = run_prompts(args.base, args.unlearned, Path(args.out), read(args.forget_prompts),
                        read(args.retain_prompts), layer=args.layer, **kw)
        print(json.dumps({"out": args.out, "layer": r["layer"], "norm_ratio_forget": r["norm_ratio_forget"]}))
        return 0
    r = run(Path(args.base), Path(args.unlearned), Path(args.out), forget=args.forget, layer=args.layer)
    print(json.dumps({"out": args.out, "layer": r["layer"], "recovery_fraction_by_format": r["recovery_fraction_by_format"]}))
    return 0


def _cmd_localize(args) -> int:
    from mechun import localize
    from mechun.models import load_model

    model = load_model(args.model, device=args.device)
    need = {"activation-patching": ("clean", "corrupt", "answer", "wrong"),
            "attribution-patching": ("clean", "corrupt", "answer", "wrong"),
            "causal-tracing": ("prompt", "subject", "answer"), "probing": ("relation",)}[args.method]
    missing = [f"--{n}" for n in need if getattr(args, n) is None]
    if missing:
        raise FileNotFoundError(f"--method {args.method} needs {' '.join(missing)}")
    if args.method in ("activation-patching", "attribution-patching"):
        metric = localize.logit_diff_metric(model, args.answer, args.wrong)
        if args.method == "activation-patching":
            res = localize.activation_patching(model, args.clean, args.corrupt, metric, hook=args.hook)
        else:
            res = localize.attribution_patching(model, args.clean, args.corrupt, metric, hooks_=[args.hook])[args.hook]
        out = {"method": args.method, "hook": args.hook, "tokens": res.tokens, "scores": res.scores.tolist(),
               "clean_metric": res.clean_metric, "corrupt_metric": res.corrupt_metric,
               "metric": f"logit({args.answer}) - logit({args.wrong}) at the last position"}
    elif args.method == "causal-tracing":
        res = localize.causal_trace(model, args.prompt, args.answer, args.subject, kind=args.kind,
                                    samples=args.samples, seed=args.seed)
        out = {"method": args.method, "hook": res.hook, "tokens": res.tokens, "scores": res.scores.tolist(),
               "p_clean": res.clean_metric, "p_corrupt": res.corrupt_metric,
               "peak": dict(zip(("layer", "position", "indirect_effect"), res.peak(), strict=True))}
    else:
        from mechun.organism.world import World, relation

        world = World.load(args.world or args.model)
        rel = relation(args.relation)
        facts = world.facts_of(relation=args.relation)
        held = {f.subject for f in facts[: max(1, len(facts) // 3)]}
        rows = [(t.format(s=f.subject), f.subject, rel.values.index(f.answer), f.subject not in held)
                for f in facts for t in rel.train_templates]
        res = localize.probe_layers(model, *map(list, zip(*rows, strict=True)), seed=args.seed)
        out = {"method": args.method, "relation": args.relation, "train_accuracy": res.train_accuracy,
               "test_accuracy": res.test_accuracy, "lookup_layers": res.lookup_layers(), "n_test": res.n_test}
    text = json.dumps(out)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _cmd_edit(args) -> int:
    from mechun.edit import component_mask, full_mask, localized_finetune
    from mechun.evaluate import cloze_accuracy
    from mechun.models import load_model, save_model
    from mechun.organism.world import World

    world = World.load(args.world or args.model)
    subjects = [s.strip() for s in args.subjects.split(";") if s.strip()]
    facts = [f for f in world.facts_of(relation=args.relation) if f.subject in subjects]
    if len(facts) != len(subjects):
        raise FileNotFoundError(f"not every subject has a {args.relation!r} fact in the world: {subjects}")
    if args.mode == "edit" and not args.new_answer:
        raise FileNotFoundError("--mode edit needs --new-answer")
    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise FileExistsError(f"{args.out} exists and is not empty; choose a new --out")
    model = load_model(args.model, device=args.device)
    if args.components == "all":
        mask = full_mask(model)
    else:
        comps = [(c.split(":")[0], int(c.split(":")[1])) for c in args.components.split(",")]
        mask = component_mask(model, comps, label=args.components)
    prompts = world.prompts(facts=facts)
    answers = [p.answer for p in prompts] if args.mode == "unlearn" else [args.new_answer] * len(prompts)
    others = [f for f in world.facts if f not in facts]
    maintain = [(p.text, p.answer) for p in world.prompts(facts=others)]
    localized_finetune(model, mask, [p.text for p in prompts], answers, mode="unlearn" if args.mode == "unlearn"
                       else "learn", maintain=maintain, lm_texts=world.filler, steps=args.steps, lr=args.lr,
                       seed=args.seed, progress=not args.no_progress)
    info = {"mode": args.mode, "relation": args.relation, "subjects": subjects, "new_answer": args.new_answer,
            "mask": mask.to_json(), "steps": args.steps, "lr": args.lr, "seed": args.seed, "base_model": args.model,
            "edited_accuracy": cloze_accuracy(model, prompts), "other_accuracy": cloze_accuracy(
                model, world.prompts(facts=others))}
    save_model(model, args.out, extra_files={"edit.json": info, "world.json": world.to_json()})
    print(json.dumps({k: v for k, v in info.items() if k != "mask"} | {"n_params": mask.n_params}))
    return 0


def _cmd_sae_train(args) -> int:
    from mechun.models import load_model
    from mechun.organism.train import mcq_orders_trained
    from mechun.organism.world import World
    from mechun.sae import save_sae, train_sae

    if Path(args.out).exists() and any(Path(args.out).iterdir()):
        raise FileExistsError(f"{args.out} exists and is not empty; choose a new --out")
    world = World.load(args.world or args.model)
    model = load_model(args.model, device=args.device)
    sae = train_sae(model, world.training_texts(mcq_orders_trained(args.model)), layer=args.layer,
                    architecture=args.architecture, d_sae=args.d_sae, k=args.k, training_tokens=args.tokens,
                    seed=args.seed)
    save_sae(sae, args.out)
    print(json.dumps({"out": args.out, "layer": args.layer, "architecture": args.architecture, "d_sae": args.d_sae}))
    return 0


def _cmd_sae_unlearn(args) -> int:
    from mechun.evaluate import evaluate_world
    from mechun.models import load_model
    from mechun.organism.train import mcq_orders_trained
    from mechun.organism.world import World
    from mechun.sae import feature_stats, load_sae, sae_intervention, select_features

    world = World.load(args.world or args.model)
    model = load_model(args.model, device=args.device)
    sae = load_sae(args.sae)
    forget, retain = world.corpora([args.forget], mcq_per_fact=mcq_orders_trained(args.model))
    feats = select_features(feature_stats(model, sae, forget[args.forget]), feature_stats(model, sae, retain),
                            retain_threshold=args.threshold, n=args.n)
    before = evaluate_world(model, world)
    with sae_intervention(model, sae, feats, mode=args.mode, value=args.value):
        after = evaluate_world(model, world)
    print(json.dumps({"features": feats, "mode": args.mode, "value": args.value, "before": before, "after": after}))
    return 0


def _cmd_depth(args) -> int:
    from dataclasses import replace

    from mechun.depth import DepthConfig, depth_card, write_card
    from mechun.models import load_model
    from mechun.organism.world import World
    from mechun.rmu import load_steering

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
    files = [args.forget_mcq, args.retain_mcq, args.forget_prompts, args.retain_prompts]
    if any(files) and not all(files):
        raise FileNotFoundError("benchmark mode needs all of --forget-mcq, --retain-mcq, --forget-prompts and "
                                "--retain-prompts")
    if not any(files) and not args.forget:
        raise FileNotFoundError("pass --forget DOMAIN (an organism pair) or the four benchmark files (--forget-mcq "
                                "--retain-mcq --forget-prompts --retain-prompts)")
    log = (lambda m: print(m, file=sys.stderr)) if not args.no_progress else None
    kw = {"dtype": args.dtype}
    kw.update({"device_map": args.device_map} if args.device_map else {"device": args.device})
    if all(files):
        from mechun.data import load_mcq
        from mechun.depth import mcq_depth_card

        forget_mcq = load_mcq(args.forget_mcq, style=args.mcq_style)
        retain_mcq = load_mcq(args.retain_mcq, style=args.mcq_style)
        read = lambda f: [x.strip() for x in Path(f).read_text().splitlines() if x.strip()]  # noqa: E731
        base, unlearned = load_model(args.base, **kw), load_model(args.unlearned, **kw)
        card = mcq_depth_card(base, unlearned, forget_mcq, retain_mcq, read(args.forget_prompts),
                              read(args.retain_prompts), method=args.method or Path(args.unlearned).name,
                              config=DepthConfig(seed=args.seed, junk_layer=args.layer), log=log)
        card["models"] = {"base": str(args.base), "unlearned": str(args.unlearned)}
        write_card(card, out)
        print(json.dumps({"out": str(out), "verdict": card["verdict"]["line"]}))
        return 0
    world = World.load(args.world or args.base)
    base = load_model(args.base, **kw)
    unlearned = load_model(args.unlearned, **kw)
    steering = None
    if (Path(args.unlearned) / "rmu.json").is_file():
        steering = load_steering(args.unlearned).get(args.forget)
    cfg = DepthConfig(seed=args.seed, junk_layer=args.layer)
    if args.relearn_steps:
        try:
            steps = tuple(int(x) for x in args.relearn_steps.split(","))
        except ValueError:
            steps = (-1,)
        cfg = replace(cfg, relearn_steps=steps)
    card = depth_card(base, unlearned, world, args.forget, method=args.method or Path(args.unlearned).name,
                      relearn_copy=lambda: load_model(args.unlearned, **kw), steering=steering,
                      config=cfg, log=log)
    card["models"] = {"base": str(args.base), "unlearned": str(args.unlearned)}
    write_card(card, out)
    print(json.dumps({"out": str(out), "verdict": card["verdict"]["line"]}))
    return 0


def _cmd_reproduce(args) -> int:
    from mechun.reproduce import reproduce

    out = reproduce(args.analysis, Path(args.out), quick=args.quick, seed=args.seed)
    print(f"wrote {out / 'report.html'} and {out / 'results.json'}", file=sys.stderr)
    return 0


def _job_args(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """--seed, --world, --device, --out (and --no-progress): shared by the commands that run a job on a model."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", help="world.json (default: the one in --model)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    if progress:
        p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mechun", description="Mechanistic study of unlearning and editing in LLMs.")
    sub = p.add_subparsers(dest="command", required=True)

    org = sub.add_parser("organism", help="train a model organism on a synthetic knowledge world")
    org_sub = org.add_subparsers(dest="organism_command", required=True)
    tr = org_sub.add_parser("train", help="train and save an organism checkpoint dir (config, weights, world.json)")
    tr.add_argument("--preset", choices=["tiny", "small"], default="small",
                    help="tiny: seconds, for tests; small: about a minute, the main job")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--out", required=True, help="new checkpoint directory")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_cmd_organism_train)

    ev = sub.add_parser("eval", help="accuracy per domain and format (train templates, paraphrases, MCQ)")
    ev.add_argument("--model", required=True, help="organism checkpoint dir")
    ev.add_argument("--world", help="world.json (default: the one in --model)")
    ev.add_argument("--domains", help="comma-separated domains (default: all)")
    ev.add_argument("--device", default=None)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=_cmd_eval)

    ca = sub.add_parser("cache", help="cache residual streams of prompts (one per line) to a safetensors file")
    ca.add_argument("--model", required=True)
    ca.add_argument("--prompts", required=True, help="text file, one prompt per line")
    ca.add_argument("--layers", help="comma-separated layers (default: all)")
    ca.add_argument("--positions", default="last", choices=["last", "all"])
    ca.add_argument("--hook", default="resid_post", choices=["resid_pre", "resid_mid", "resid_post", "mlp_out",
                                                            "attn_out"])
    ca.add_argument("--batch-size", type=int, default=32)
    ca.add_argument("--device", default=None)
    ca.add_argument("--out", required=True)
    ca.add_argument("--no-progress", action="store_true")
    ca.set_defaults(func=_cmd_cache)

    rm = sub.add_parser("rmu", help="unlearn a forget domain with RMU; saves an HF checkpoint dir with rmu.json")
    rm.add_argument("--model", required=True, help="base organism checkpoint dir")
    rm.add_argument("--forget", required=True, help="forget domain(s), comma-separated (e.g. pathogen)")
    rm.add_argument("--layer", type=int, default=None, help="RMU layer l (default n_layers//2); updates l-2..l")
    rm.add_argument("--steering-coeff", type=float, default=None,
                    help="c; default 6x the base model's mean forget-token norm at the layer")
    rm.add_argument("--alpha", type=float, default=100.0)
    rm.add_argument("--lr", type=float, default=1e-3)
    rm.add_argument("--steps", type=int, default=200)
    rm.add_argument("--batch-size", type=int, default=16)
    _job_args(rm)
    rm.set_defaults(func=_cmd_rmu)

    jk = sub.add_parser("junk", help="junk-direction diagnosis and recovery for a (base, unlearned) pair")
    jk.add_argument("--base", required=True)
    jk.add_argument("--unlearned", required=True)
    jk.add_argument("--forget", default=None, help="forget domain (default: from rmu.json)")
    jk.add_argument("--layer", type=int, default=None, help="layer of the direction (default: rmu.json's)")
    jk.add_argument("--forget-prompts", help="any models: forget-domain prompts, one per line (diagnosis only)")
    jk.add_argument("--retain-prompts", help="any models: retain prompts, one per line")
    jk.add_argument("--device", default=None)
    jk.add_argument("--device-map", default=None, help='e.g. "auto" to spread a 7B model over several GPUs')
    jk.add_argument("--dtype", default=None, help="e.g. bfloat16")
    jk.add_argument("--out", required=True)
    jk.set_defaults(func=_cmd_junk)

    lo = sub.add_parser("localize", help="where is a fact recalled? patching, attribution, causal tracing, probes")
    lo.add_argument("--model", required=True)
    lo.add_argument("--method", required=True,
                    choices=["causal-tracing", "activation-patching", "attribution-patching", "probing"])
    lo.add_argument("--clean", help="patching: the clean prompt")
    lo.add_argument("--corrupt", help="patching: the corrupt prompt (same number of tokens)")
    lo.add_argument("--answer", help="the clean answer (one token)")
    lo.add_argument("--wrong", help="patching: the corrupt prompt's answer; metric = logit(answer) - logit(wrong)")
    lo.add_argument("--hook", default="resid_pre", choices=["resid_pre", "resid_post", "resid_mid", "mlp_out",
                                                            "attn_out"])
    lo.add_argument("--prompt", help="causal tracing: the prompt")
    lo.add_argument("--subject", help="causal tracing: the subject whose tokens are corrupted")
    lo.add_argument("--kind", default="resid", choices=["resid", "mlp", "attn"])
    lo.add_argument("--samples", type=int, default=10)
    lo.add_argument("--relation", help="probing: an organism relation (e.g. sport)")
    lo.add_argument("--world", help="probing: world.json (default: the one in --model)")
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--device", default=None)
    lo.add_argument("--out", help="write the JSON here too")
    lo.set_defaults(func=_cmd_localize)

    ed = sub.add_parser("edit", help="unlearn or edit organism facts by fine-tuning only chosen components")
    ed.add_argument("--model", required=True)
    ed.add_argument("--relation", required=True, help="e.g. sport")
    ed.add_argument("--subjects", required=True, help="subjects, separated by ';'")
    ed.add_argument("--mode", choices=["unlearn", "edit"], default="unlearn")
    ed.add_argument("--new-answer", help="edit: the new attribute")
    ed.add_argument("--components", default="mlp:1", help="e.g. mlp:1,attn:2, or 'all' (nonlocalized)")
    ed.add_argument("--steps", type=int, default=100)
    ed.add_argument("--lr", type=float, default=1e-3)
    _job_args(ed)
    ed.set_defaults(func=_cmd_edit)

    sae = sub.add_parser("sae", help="sparse autoencoders: train one with sae-lens, unlearn by feature clamping")
    sae_sub = sae.add_subparsers(dest="sae_command", required=True)
    st = sae_sub.add_parser("train", help="train an SAE on blocks.{layer}.hook_resid_post (offline) and save it")
    st.add_argument("--model", required=True)
    st.add_argument("--layer", type=int, required=True)
    st.add_argument("--architecture", choices=["standard", "topk"], default="standard")
    st.add_argument("--d-sae", type=int, default=512)
    st.add_argument("--k", type=int, default=16, help="topk: active features per token")
    st.add_argument("--tokens", type=int, default=80_000, help="training tokens")
    _job_args(st, progress=False)
    st.set_defaults(func=_cmd_sae_train)
    su = sae_sub.add_parser("unlearn", help="select forget features (SAEBench rule) and measure the intervention")
    su.add_argument("--model", required=True)
    su.add_argument("--sae", required=True, help="SAE dir written by `mechun sae train` (or any sae-lens dir)")
    su.add_argument("--forget", required=True, help="forget domain, e.g. pathogen")
    su.add_argument("--threshold", type=float, default=0.01, help="max activation frequency on retain text")
    su.add_argument("--n", type=int, default=10, help="number of features")
    su.add_argument("--mode", choices=["clamp", "scale", "zero"], default="clamp")
    su.add_argument("--value", type=float, default=50.0, help="clamp: -m; scale: -k")
    su.add_argument("--world", help="world.json (default: the one in --model)")
    su.add_argument("--device", default=None)
    su.set_defaults(func=_cmd_sae_unlearn)

    de = sub.add_parser("depth", help="unlearning depth card for a (base, unlearned) pair: removed or hidden?")
    de.add_argument("--base", required=True, help="base checkpoint dir (an organism: its world.json is used)")
    de.add_argument("--unlearned", required=True, help="unlearned checkpoint dir, made by any method")
    de.add_argument("--forget", help="organism pair: the forgotten domain, e.g. pathogen")
    de.add_argument("--forget-mcq", help="benchmark mode (any checkpoints): forget MCQ file, e.g. WMDP-Bio .jsonl")
    de.add_argument("--retain-mcq", help="benchmark mode: retain MCQ file, e.g. MMLU .parquet")
    de.add_argument("--forget-prompts", help="benchmark mode: forget-domain text, one prompt per line")
    de.add_argument("--retain-prompts", help="benchmark mode: retain text, one prompt per line")
    de.add_argument("--mcq-style", default="mmlu", choices=["mmlu", "organism"], help="how questions are rendered")
    de.add_argument("--device-map", default=None, help='e.g. "auto" to spread a 7B model over several GPUs')
    de.add_argument("--dtype", default=None, help="e.g. bfloat16")
    de.add_argument("--method", help="label for the report (default: the unlearned dir's name)")
    de.add_argument("--layer", type=int, default=None,
                    help="layer of the junk direction (default: where the forget norm ratio peaks)")
    de.add_argument("--relearn-steps", help="comma-separated relearning checkpoints (default 0,5,10,20,40)")
    _job_args(de)
    de.set_defaults(func=_cmd_depth)

    rp = sub.add_parser("reproduce", help="run a whole analysis; writes DIR/results.json and DIR/report.html")
    rp.add_argument("analysis", choices=["rmu-shallow", "depth", "edit-specificity", "restore", "localized-editing",
                                         "sae-unlearning", "organism"],
                    help="rmu-shallow: RMU junk-direction diagnosis and recovery (the main job); "
                         "localized-editing: localize fact recall and unlearn with masked fine-tuning; "
                         "sae-unlearning: SAE feature clamping vs zero-ablation vs RMU; "
                         "depth: depth cards for RMU and localized fine-tuning over 3 seeds; "
                         "edit-specificity: CounterFact+ static vs dynamic neighbourhood scores of localized edits; "
                         "restore: corrupt-then-unlearn (RESTOR), does unlearning restore the true facts? "
                         "organism: train the small organism and evaluate it")
    rp.add_argument("--out", required=True)
    rp.add_argument("--quick", action="store_true", help="tiny settings (seconds)")
    rp.add_argument("--seed", type=int, default=0)
    rp.set_defaults(func=_cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    from mechun.errors import MechunError

    try:
        return args.func(args)
    except (MechunError, FileNotFoundError, FileExistsError) as e:
        print(f"mechun: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
