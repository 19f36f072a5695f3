"""SAE unlearning: sae-lens training offline, the intervention equals a hand computation, selection rule.

The SAEBench-specific defaults (BOS skipped, strict threshold, ties, rounding, counted tokens) are pinned by hand-built
cases in test_sae_saebench.py.
"""

import pytest
import torch
from conftest import warm, weights_hash

import mechun
from mechun.errors import MechunError
from mechun.sae import (
    edit_features,
    feature_stats,
    load_sae,
    round_frequency,
    sae_intervention,
    save_sae,
    select_features,
    top_activating,
    train_sae,
)


@pytest.fixture(scope="module")
def sae(tiny_model, tiny_world):
    return train_sae(tiny_model, tiny_world.training_texts(), layer=1, d_sae=128, training_tokens=20_000, seed=0)


def test_sae_trains_offline_and_reconstructs(sae, tiny_model, tiny_world):
    prompts = [p.text for p in tiny_world.prompts("pathogen")]
    cache = mechun.cache_residuals(tiny_model, prompts, layers=[1], positions="all", progress=False)
    x = cache[1][cache.mask]
    with torch.no_grad():
        f = sae.encode(x)
        fvu = ((sae.decode(f) - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert fvu < 0.5 and 0 < (f > 0).float().sum(-1).mean() < 128


@pytest.mark.parametrize("mode, value", [("clamp", 20.0), ("scale", 3.0), ("zero", 0.0)])
def test_intervention_equals_hand_computation(sae, tiny_model, tiny_world, mode, value):
    prompts = [p.text for p in tiny_world.prompts("pathogen")][:8]
    feats = [0, 5, 17]
    clean = mechun.cache_residuals(tiny_model, prompts, layers=[1], positions="all", progress=False)
    with sae_intervention(tiny_model, sae, feats, mode=mode, value=value):
        edited = mechun.cache_residuals(tiny_model, prompts, layers=[1], positions="all", progress=False)
    x = clean[1][clean.mask]
    with torch.no_grad():
        f = sae.encode(x)
        g = f.clone()
        for i in feats:
            on = f[:, i] > 0
            g[on, i] = {"clamp": -value, "scale": -value * f[on, i], "zero": 0.0}[mode]
        g[:, feats] = torch.where(f[:, feats] > 0, g[:, feats], 0.0 if mode == "zero" else f[:, feats])
        expected = sae.decode(g) + (x - sae.decode(f))
    not_bos = clean.mask.clone()
    not_bos[:, 0] = False
    assert (edited[1][not_bos] - expected[not_bos[clean.mask]]).abs().max() < 1e-5
    assert (edited[1][:, 0] - clean[1][:, 0]).abs().max() < 1e-5  # position 0 (BOS) is left alone, as in SAEBench
    # features that are never active leave the stream untouched, up to float error
    with sae_intervention(tiny_model, sae, [int((f > 0).float().sum(0).argmin())], mode="clamp", value=50.0):
        same = mechun.cache_residuals(tiny_model, prompts, layers=[1], positions="all", progress=False)
    if int((f > 0).float().sum(0).min()) == 0:
        assert (same[1][clean.mask] - x).abs().max() < 1e-4


def test_edit_features_only_touches_named_active_features():
    acts = torch.tensor([[0.0, 2.0, 3.0], [1.0, 0.0, 4.0]])
    out = edit_features(acts, [0, 1], "clamp", 7.0)
    assert torch.equal(out, torch.tensor([[0.0, -7.0, 3.0], [-7.0, 0.0, 4.0]]))
    assert torch.equal(edit_features(acts, [1], "scale", 2.0)[:, 1], torch.tensor([-4.0, 0.0]))


def test_selection_rule(sae, tiny_model, tiny_world):
    forget = feature_stats(tiny_model, sae, [p.text for p in tiny_world.prompts("pathogen")])
    retain = feature_stats(tiny_model, sae, [p.text for p in tiny_world.prompts("sports")])
    chosen = select_features(forget, retain, retain_threshold=0.01, n=5)
    assert len(chosen) <= 5
    for i in chosen:
        assert round_frequency(retain.frequency[i]) < 0.01 and forget.frequency[i] > 0
    freqs = [float(round_frequency(forget.frequency[i])) for i in chosen]
    assert freqs == sorted(freqs, reverse=True)
    if chosen:
        card = top_activating(tiny_model, sae, [p.text for p in tiny_world.prompts("pathogen")], chosen[0], k=3)
        assert len(card) == 3 and card[0][0] >= card[-1][0]


def test_save_load_and_no_leaks(sae, tiny_model, tmp_path):
    path = save_sae(sae, tmp_path / "sae")
    back = load_sae(path)
    x = torch.randn(4, tiny_model.cfg.d_model)
    with torch.no_grad():
        assert torch.allclose(back.encode(x), sae.encode(x), atol=1e-5)
    warm(tiny_model)
    before, w = mechun.count_hooks(tiny_model), weights_hash(tiny_model)
    with pytest.raises(RuntimeError, match="injected"):
        with sae_intervention(tiny_model, back, [1, 2]):
            raise RuntimeError("injected")
    assert mechun.count_hooks(tiny_model) == before and weights_hash(tiny_model) == w
    with pytest.raises(MechunError, match="feature ids"):
        with sae_intervention(tiny_model, back, [10_000]):
            pass
    with pytest.raises((MechunError, TypeError), match="mode"):  # TypeError: the runtime type check under pytest
        with sae_intervention(tiny_model, back, [1], mode="negate"):
            pass


def test_cli_sae_train_and_unlearn(tiny_organism_dir, tmp_path):
    import json

    from conftest import run_cli

    run_cli("sae", "train", "--model", str(tiny_organism_dir), "--layer", "1", "--d-sae", "128", "--tokens", "20000",
            "--out", str(tmp_path / "sae"))
    out = json.loads(run_cli("sae", "unlearn", "--model", str(tiny_organism_dir), "--sae", str(tmp_path / "sae"),
                             "--forget", "pathogen", "--threshold", "0.2", "--n", "5", "--value", "50").stdout)  # a tiny SAE needs a loose rule
    assert 0 < len(out["features"]) <= 5
    assert set(out["before"]) == set(out["after"]) == {"pathogen", "cyber", "sports", "people", "geography", "music"}


def test_topk_sae_trains(tiny_model, tiny_world):
    sae = train_sae(tiny_model, tiny_world.training_texts(), layer=0, architecture="topk", d_sae=64, k=4,
                    training_tokens=8_000, seed=1)
    with torch.no_grad():
        f = sae.encode(torch.randn(5, tiny_model.cfg.d_model))
    assert ((f != 0).sum(-1) <= 4).all()
    with pytest.raises(MechunError, match="architecture"):
        train_sae(tiny_model, tiny_world.training_texts(), layer=0, architecture="gated")
