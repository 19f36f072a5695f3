"""Localization: batched activation patching equals TransformerLens' own; attribution patching and causal
tracing behave as their definitions say."""

import inspect

import pytest
import torch
from conftest import warm, weights_hash
from jaxtyping import TypeCheckError
from transformer_lens import patching

import mechun
import mechun.models
from mechun.errors import MechunError
from mechun.localize import (
    activation_patching,
    attribution_patching,
    causal_trace,
    logit_diff_metric,
    mlp_trace_scores,
    subject_embedding_std,
    subject_positions,
    trace_noise_sigma,
    train_linear_probe,
    train_linear_probes,
)


@pytest.fixture(scope="module")
def pair(tiny_world):
    """Two facts of one relation whose answers differ: clean and corrupt prompts of equal length."""
    facts = tiny_world.facts_of(relation="transmission")
    a = facts[0]
    b = next(f for f in facts[1:] if f.answer != a.answer)
    tpl = "{s} is transmitted by"
    return tpl.format(s=a.subject), tpl.format(s=b.subject), a.answer, b.answer


@pytest.fixture(scope="module")
def traced(tiny_world):
    """A pathogen fact the tiny organism recalls, as (prompt, answer, subject)."""
    fact = tiny_world.facts_of("pathogen")[0]
    prompt = f"{fact.subject} is transmitted by" if fact.relation == "transmission" else f"{fact.subject} mainly infects"
    return prompt, fact.answer, fact.subject


def embedding_matrix(model) -> torch.Tensor:
    """The input embedding weights, read through Hugging Face's own API (not mechun's)."""
    return mechun.models.hf_model(model).get_input_embeddings().weight.detach().float()


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
    # rich display: a heatmap with one cell per (layer, position) and the headline numbers
    assert "tensor(" not in repr(post) and "resid_post" in repr(post)
    page = post._repr_html_()
    assert page.count("<rect") == post.scores.numel() and f"{post.clean_metric:.3f}" in page
    assert f"{post.corrupt_metric:.3f}" in page and f"{post.peak()[2]:.3f}" in page


def test_attribution_patching_first_order(tiny_model, pair):
    clean, corrupt, ans, wrong = pair
    metric = logit_diff_metric(tiny_model, ans, wrong)
    w = weights_hash(tiny_model)
    attr = attribution_patching(tiny_model, clean, corrupt, metric)
    exact = activation_patching(tiny_model, clean, corrupt, metric, hook="resid_pre")
    est, true = attr["resid_pre"].scores.flatten(), (exact.scores - exact.corrupt_metric).flatten()
    assert torch.corrcoef(torch.stack([est, true]))[0, 1] > 0.5  # a first-order estimate, not exact
    for h in ("resid_pre", "attn_out", "mlp_out"):  # one clean forward measured every kind and the clean metric
        assert attr[h].clean_metric == pytest.approx(exact.clean_metric, abs=1e-4)
        assert attr[h].corrupt_metric == pytest.approx(exact.corrupt_metric, abs=1e-4)
    # resid_pre at layer 0 is the embedding: clean - corrupt is zero wherever the tokens agree
    ids_c, ids_x = (mechun.tokenize(tiny_model, [t])[0][0] for t in (clean, corrupt))
    assert (attr["resid_pre"].scores[0, ids_c == ids_x] == 0).all()
    assert weights_hash(tiny_model) == w
    assert all(p.grad is None for p in tiny_model.parameters())


def test_causal_trace_finds_the_subject(tiny_model, tiny_world, traced):
    prompt, answer, subject = traced
    warm(tiny_model)
    before = mechun.count_hooks(tiny_model)
    # ROME's noise: 3 x the subject-token embedding std pooled over every subject of the world
    res = causal_trace(tiny_model, prompt, answer, subject, kind="resid", samples=4, subjects=list(tiny_world.subjects))
    assert res.clean_metric > res.corrupt_metric + 0.2  # the noise destroys recall
    subj = subject_positions(tiny_model, prompt, subject)
    # restoring one subject token's state at layer 0 (the other stays noisy) brings part of it back; restoring the token before the
    # subject does nothing (it was never corrupted and cannot see the subject)
    assert res.scores[0, subj].max() > 0.1 * (res.clean_metric - res.corrupt_metric)
    assert abs(float(res.scores[0, subj[0] - 1])) < 1e-3
    # the last position at the last layer carries everything
    assert res.scores[-1, -1] == pytest.approx(res.clean_metric - res.corrupt_metric, abs=1e-4)
    for kind in ("mlp", "attn"):
        assert causal_trace(tiny_model, prompt, answer, subject, kind=kind, samples=2).scores.shape == res.scores.shape
    assert mechun.count_hooks(tiny_model) == before


def test_bad_inputs(tiny_model, pair):
    clean, corrupt, ans, wrong = pair
    metric = logit_diff_metric(tiny_model, ans, wrong)
    subject = clean.split(" is")[0]
    with pytest.raises(MechunError, match="equal length"):
        activation_patching(tiny_model, clean, corrupt + " the", metric)
    with pytest.raises(MechunError, match="not found"):
        subject_positions(tiny_model, clean, corrupt.split(" is")[0])  # a real subject, of the other prompt
    with pytest.raises(MechunError, match="'nobody' is not in the model's vocabulary"):
        subject_positions(tiny_model, clean, "nobody here")
    # A misspelt hook or trace kind is outside its Literal: under pytest the runtime type checker rejects it first;
    # users (no checker) get the function's own error naming the choices -- the unwrapped function is what they run.
    for fn, kwargs, msg in [(activation_patching, {"hook": "resid_pots"}, "hook must be one of"),
                            (attribution_patching, {"hooks_": ["resid_pots"]}, "hook must be one of")]:
        with pytest.raises((TypeCheckError, MechunError)):
            fn(tiny_model, clean, corrupt, metric, **kwargs)
        with pytest.raises(MechunError, match=msg):
            inspect.unwrap(fn)(tiny_model, clean, corrupt, metric, **kwargs)
    with pytest.raises((TypeCheckError, MechunError)):
        causal_trace(tiny_model, clean, ans, subject, kind="heads")
    with pytest.raises(MechunError, match="kind must be one of"):
        inspect.unwrap(causal_trace)(tiny_model, clean, ans, subject, kind="heads")
    # noise settings that contradict each other, or pool nothing
    with pytest.raises(MechunError, match="not both"):
        causal_trace(tiny_model, clean, ans, subject, sigma=1.0, subjects=[subject])
    with pytest.raises(MechunError, match="only under noise_rule='subjects'"):
        causal_trace(tiny_model, clean, ans, subject, noise_rule="embedding", subjects=[subject])
    with pytest.raises(MechunError, match="at least one subject"):
        subject_embedding_std(tiny_model, [])
    with pytest.raises(MechunError, match="not one string"):
        causal_trace(tiny_model, clean, ans, subject, subjects=subject)
    with pytest.raises(MechunError, match="sigma must be"):
        causal_trace(tiny_model, clean, ans, subject, sigma=-1.0)


def test_patching_recomputes_only_what_a_patch_can_change(tiny_model, pair):
    """The speed-up's mechanism (timings live in benchmarks/speed.py), counted, not timed: the decoder layers see
    each layer's share of the sweep once -- a patch at layer l and position p costs layers l.. at positions p.. --
    far fewer token-layers than one whole forward per patch."""
    from mechun.models import bare_forward_view

    clean, corrupt, ans, wrong = pair
    _, layers = bare_forward_view(tiny_model)
    seen = [[] for _ in layers]
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: seen[i].append((args[0] if args else kwargs["hidden_states"]).shape[:2]),
        with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        res = activation_patching(tiny_model, clean, corrupt, logit_diff_metric(tiny_model, ans, wrong))
    finally:
        for h in handles:
            h.remove()
    L, P = res.scores.shape
    assert all(len(calls) == 3 for calls in seen)  # corrupt forward, clean forward, one packed call for the sweep
    sweep_tokens = sum(calls[2][0] * calls[2][1] for calls in seen)  # sequences x packed length, padding included
    needed = sum((L - layer) * (P - p) for layer in range(L) for p in range(P))
    assert needed <= sweep_tokens <= 1.25 * needed
    assert sweep_tokens < 0.5 * L * P * L * P  # whole forwards: every patch runs every layer at every position


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


# ---------------------------------------------------------------------------------------------------------------
# Causal tracing noise: ROME's rule (3 x the subject tokens' embedding std over a set of subjects)
# ---------------------------------------------------------------------------------------------------------------
def test_subject_embedding_std_by_hand(tiny_model, tiny_world):
    """The std pools the embedding rows of every subject's tokens as they sit inside real prompts, without BOS."""
    subjects = list(tiny_world.subjects)
    bos = tiny_model.tokenizer.bos_token_id
    emb = embedding_matrix(tiny_model)
    rows = []
    for s in subjects:
        prompt = next(p.text for p in tiny_world.prompts() if p.fact.subject == s)
        ids = mechun.tokenize(tiny_model, [prompt])[0][0]
        pos = subject_positions(tiny_model, prompt, s)
        assert int(ids[0]) == bos and bos not in ids[pos].tolist()  # the organism prepends BOS; it is not pooled
        rows.append(emb[ids[pos]])
    expected = float(torch.cat(rows).std())
    assert subject_embedding_std(tiny_model, subjects) == pytest.approx(expected, rel=1e-6)
    assert subject_embedding_std(tiny_model, subjects + subjects[:5]) == pytest.approx(expected, rel=1e-6)  # a set
    with_bos = float(torch.cat([*rows, emb[[bos]]]).std())
    assert with_bos != pytest.approx(expected, rel=1e-6)  # so excluding BOS is a visible choice
    assert trace_noise_sigma(tiny_model, subjects=subjects) == pytest.approx(3 * expected, rel=1e-6)


def test_embedding_rule_reproduces_the_previous_noise(tiny_model, traced):
    """``noise_rule="embedding"`` is the former default: sigma = 3 x the std of the whole embedding matrix, and the
    traced numbers equal those of a trace run with that sigma passed explicitly (same noise draws)."""
    prompt, answer, subject = traced
    old_sigma = 3.0 * float(embedding_matrix(tiny_model).std())
    for kind in ("resid", "mlp"):
        by_rule = causal_trace(tiny_model, prompt, answer, subject, kind=kind, samples=3, noise_rule="embedding")
        by_sigma = causal_trace(tiny_model, prompt, answer, subject, kind=kind, samples=3, sigma=old_sigma)
        assert by_rule.sigma == pytest.approx(old_sigma, rel=1e-6) and by_sigma.sigma == old_sigma
        assert torch.allclose(by_rule.scores, by_sigma.scores, atol=1e-6)
        assert by_rule.corrupt_metric == pytest.approx(by_sigma.corrupt_metric, abs=1e-6)


def test_default_noise_is_the_subject_rule(tiny_model, tiny_world, traced):
    prompt, answer, subject = traced
    subjects = list(tiny_world.subjects)
    default = causal_trace(tiny_model, prompt, answer, subject, samples=2)
    world = causal_trace(tiny_model, prompt, answer, subject, samples=2, subjects=subjects)
    embedding = causal_trace(tiny_model, prompt, answer, subject, samples=2, noise_rule="embedding")
    # without subjects the rule pools the traced subject alone; with them, the whole set
    assert default.sigma == pytest.approx(3 * subject_embedding_std(tiny_model, [subject]), rel=1e-6)
    assert world.sigma == pytest.approx(3 * subject_embedding_std(tiny_model, subjects), rel=1e-6)
    assert len({round(r.sigma, 6) for r in (default, world, embedding)}) == 3
    assert world.to_json()["sigma"] == world.sigma
    assert "sigma" not in activation_patching(tiny_model, prompt, prompt, lambda x: x[:, -1, 0]).to_json()
    # sigma is the noise actually added: none at all leaves the prompt clean and nothing to restore
    silent = causal_trace(tiny_model, prompt, answer, subject, samples=2, sigma=0.0)
    assert silent.corrupt_metric == pytest.approx(silent.clean_metric, abs=1e-5)
    assert silent.scores.abs().max() < 1e-5


def test_mlp_trace_scores_pools_its_items_subjects(tiny_model, tiny_world):
    facts = tiny_world.facts_of("pathogen", relation="transmission")[:2]
    items = [(f"{f.subject} is transmitted by", f.answer, f.subject) for f in facts]
    sigma = trace_noise_sigma(tiny_model, subjects=[s for _, _, s in items])
    expected = torch.zeros(tiny_model.cfg.n_layers)
    for prompt, answer, subject in items:
        res = causal_trace(tiny_model, prompt, answer, subject, kind="mlp", samples=2, sigma=sigma)
        expected += res.scores[:, subject_positions(tiny_model, prompt, subject)[-1]] / len(items)
    assert mlp_trace_scores(tiny_model, items, samples=2) == pytest.approx(expected.tolist(), abs=1e-6)
    world = mlp_trace_scores(tiny_model, items, samples=2, subjects=list(tiny_world.subjects))
    assert world != pytest.approx(expected.tolist(), abs=1e-6)  # the subject set reaches the noise


def test_batched_probes_equal_probes_trained_one_at_a_time():
    """Layers x folds are fitted in one loop; each probe must come out as if it had been trained alone."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    train = torch.rand(3, 40, generator=g) < 0.7
    together = train_linear_probes(x, y, train, 4, steps=50, seed=2)(x)
    for i in range(3):
        alone = train_linear_probe(x[i][train[i]], y[train[i]], 4, steps=50, seed=2)(x[i])
        assert torch.equal(together[i], alone)
    with pytest.raises(MechunError, match="training row"):
        train_linear_probes(x, y, torch.zeros_like(train), 4)
