"""Localization: batched activation patching equals TransformerLens' own; attribution patching and causal
tracing behave as their definitions say."""

import pytest
import torch
from conftest import warm, weights_hash
from transformer_lens import patching

import mechun
import mechun.models
from mechun.errors import MechunError
from mechun.localize import (
    activation_patching,
    attribution_patching,
    causal_trace,
    logit_diff_metric,
    subject_positions,
)


@pytest.fixture(scope="module")
def pair(tiny_world):
    """Two facts of one relation whose answers differ: clean and corrupt prompts of equal length."""
    facts = tiny_world.facts_of(relation="transmission")
    a = facts[0]
    b = next(f for f in facts[1:] if f.answer != a.answer)
    tpl = "{s} is transmitted by"
    return tpl.format(s=a.subject), tpl.format(s=b.subject), a.answer, b.answer


@pytest.mark.parametrize("hook, tl_fn", [
    ("resid_pre", patching.get_act_patch_resid_pre),
    ("attn_out", patching.get_act_patch_attn_out),
    ("mlp_out", patching.get_act_patch_mlp_out),
])
def test_batched_patching_equals_transformer_lens(tiny_model, pair, hook, tl_fn):
    clean, corrupt, ans, wrong = pair
    metric = logit_diff_metric(tiny_model, ans, wrong)
    ours = activation_patching(tiny_model, clean, corrupt, metric, hook=hook, batch_size=7)
    ids_c, _ = mechun.tokenize(tiny_model, [clean])
    ids_x, _ = mechun.tokenize(tiny_model, [corrupt])
    _, clean_cache = tiny_model.run_with_cache(ids_c)
    theirs = tl_fn(tiny_model, ids_x, clean_cache, lambda logits: metric(logits)[0])
    assert ours.scores.shape == theirs.shape
    assert (ours.scores - theirs.cpu()).abs().max() < 1e-4
    assert ours.clean_metric > ours.corrupt_metric  # the clean prompt prefers its own answer


def test_patching_endpoints(tiny_model, pair):
    clean, corrupt, ans, wrong = pair
    res = activation_patching(tiny_model, clean, corrupt, logit_diff_metric(tiny_model, ans, wrong))
    # positions where the two prompts agree carry nothing to patch at layer 0
    ids_c = mechun.tokenize(tiny_model, [clean])[0][0]
    ids_x = mechun.tokenize(tiny_model, [corrupt])[0][0]
    same = (ids_c == ids_x).nonzero().squeeze(1)
    assert torch.allclose(res.scores[0, same], torch.tensor(res.corrupt_metric), atol=1e-4)
    # the final residual stream at the last position determines the metric: patching it gives the clean value
    post = activation_patching(tiny_model, clean, corrupt, logit_diff_metric(tiny_model, ans, wrong), hook="resid_post")
    assert post.scores[-1, -1] == pytest.approx(res.clean_metric, abs=1e-4)
    assert post.peak()[:2] == (tiny_model.cfg.n_layers - 1, len(ids_c) - 1)


def test_attribution_patching_first_order(tiny_model, pair):
    clean, corrupt, ans, wrong = pair
    metric = logit_diff_metric(tiny_model, ans, wrong)
    w = weights_hash(tiny_model)
    attr = attribution_patching(tiny_model, clean, corrupt, metric)
    exact = activation_patching(tiny_model, clean, corrupt, metric, hook="resid_pre")
    est, true = attr["resid_pre"].scores.flatten(), (exact.scores - exact.corrupt_metric).flatten()
    assert torch.corrcoef(torch.stack([est, true]))[0, 1] > 0.5  # a first-order estimate, not exact
    assert weights_hash(tiny_model) == w
    assert all(p.grad is None for p in tiny_model.parameters())


def test_causal_trace_finds_the_subject(tiny_model, tiny_world):
    fact = tiny_world.facts_of("pathogen")[0]
    prompt = f"{fact.subject} is transmitted by" if fact.relation == "transmission" else f"{fact.subject} mainly infects"
    warm(tiny_model)
    before = mechun.count_hooks(tiny_model)
    res = causal_trace(tiny_model, prompt, fact.answer, fact.subject, kind="resid", samples=4)
    assert res.clean_metric > res.corrupt_metric + 0.2  # the noise destroys recall
    subj = subject_positions(tiny_model, prompt, fact.subject)
    # restoring one subject token's state at layer 0 (the other stays noisy) brings part of it back; restoring the token before the
    # subject does nothing (it was never corrupted and cannot see the subject)
    assert res.scores[0, subj].max() > 0.1 * (res.clean_metric - res.corrupt_metric)
    assert abs(float(res.scores[0, subj[0] - 1])) < 1e-3
    # the last position at the last layer carries everything
    assert res.scores[-1, -1] == pytest.approx(res.clean_metric - res.corrupt_metric, abs=1e-4)
    for kind in ("mlp", "attn"):
        assert causal_trace(tiny_model, prompt, fact.answer, fact.subject, kind=kind, samples=2).scores.shape == \
            res.scores.shape
    assert mechun.count_hooks(tiny_model) == before


def test_bad_inputs(tiny_model, pair):
    clean, corrupt, ans, wrong = pair
    metric = logit_diff_metric(tiny_model, ans, wrong)
    with pytest.raises(MechunError, match="equal length"):
        activation_patching(tiny_model, clean, corrupt + " the", metric)
    with pytest.raises(MechunError, match="hook must be"):
        activation_patching(tiny_model, clean, corrupt, metric, hook="resid_pots")
    with pytest.raises(MechunError, match="not found"):
        subject_positions(tiny_model, clean, "nobody here")
    with pytest.raises(MechunError, match="kind"):
        causal_trace(tiny_model, clean, ans, clean.split(" is")[0], kind="heads")


def test_batched_patching_uses_a_handful_of_forwards(tiny_model, pair):
    """The speed-up's mechanism (timings live in benchmarks/patching_speed.py): forwards counted, not timed."""
    clean, corrupt, ans, wrong = pair
    calls = []
    h = mechun.models.hook_point(tiny_model, "embed.hook_out").register_forward_hook(lambda *a: calls.append(1))
    try:
        res = activation_patching(tiny_model, clean, corrupt, logit_diff_metric(tiny_model, ans, wrong), batch_size=64)
    finally:
        h.remove()
    n_patches = res.scores.numel()
    assert n_patches >= 12 and len(calls) <= 4  # clean cache + 1 batched sweep + 2 baseline metrics


def test_cli_localize_patching_json(tiny_organism_dir, pair, tmp_path):
    import json

    from conftest import run_cli

    clean, corrupt, ans, wrong = pair
    run_cli("localize", "--model", str(tiny_organism_dir), "--method", "activation-patching", "--clean", clean,
            "--corrupt", corrupt, "--answer", ans, "--wrong", wrong, "--hook", "resid_pre",
            "--out", str(tmp_path / "f.json"))
    out = json.loads((tmp_path / "f.json").read_text())
    assert {"method", "hook", "tokens", "scores"} <= set(out) and out["method"] == "activation-patching"
    assert len(out["scores"][0]) == len(out["tokens"])
    proc = run_cli("localize", "--model", str(tiny_organism_dir), "--method", "causal-tracing", check=False)
    assert proc.returncode == 2 and "--prompt" in proc.stderr


def test_per_head_patching_equals_transformer_lens(tiny_model, pair):
    from mechun.localize import activation_patching_heads

    clean, corrupt, ans, wrong = pair
    metric = logit_diff_metric(tiny_model, ans, wrong)
    ours = activation_patching_heads(tiny_model, clean, corrupt, metric, batch_size=50)
    ids_c, _ = mechun.tokenize(tiny_model, [clean])
    ids_x, _ = mechun.tokenize(tiny_model, [corrupt])
    _, clean_cache = tiny_model.run_with_cache(ids_c)
    theirs = patching.get_act_patch_attn_head_out_by_pos(tiny_model, ids_x, clean_cache,
                                                         lambda logits: metric(logits)[0])
    assert ours.scores.shape == theirs.shape == (tiny_model.cfg.n_layers, ids_c.shape[1], tiny_model.cfg.n_heads)
    assert (ours.scores - theirs.cpu()).abs().max() < 1e-4
    assert ours.by_head().shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads)
