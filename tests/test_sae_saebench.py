"""SAE unlearning defaults follow SAEBench's unlearning eval, point by point (see the mechun.sae docstring).

Each case is built by hand so that SAEBench's rule and mechun's old rule give different answers: the test fails if
the old behaviour comes back. The model is a random 2-layer GPT-2 (d_model=16) with the organism's tokenizer
(BOS prepended, EOS and pad ids of its own), built in seconds; the SAE is a random sae-lens standard SAE.
"""

import io

import numpy as np
import pytest
import torch

import mechun
from mechun.errors import MechunError
from mechun.hooks import hooks
from mechun.sae import (
    MODES,
    FeatureStats,
    counted_positions,
    edit_features,
    edit_residual,
    feature_stats,
    round_frequency,
    sae_intervention,
    select_features,
    special_token_ids,
    stats_from_activations,
)

HOOK = "blocks.1.hook_resid_post"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from mechun.organism.tokenizer import build_tokenizer

    tok = build_tokenizer(WORDS)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2, n_head=2, n_inner=32,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    out = tmp_path_factory.mktemp("random_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return mechun.load_model(out, device="cpu")


@pytest.fixture
def sae():
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(1)
    return StandardSAE(StandardSAEConfig(d_in=16, d_sae=32))


def _stats(freqs: list[float]) -> FeatureStats:
    f = torch.tensor(freqs, dtype=torch.float32)
    return FeatureStats(f, torch.ones_like(f), 1000)


def _hand_edit(sae, x: torch.Tensor, feats: list[int], value: float) -> torch.Tensor:
    with torch.no_grad():
        f = sae.encode(x)
        g = f.clone()
        g[..., feats] = torch.where(f[..., feats] > 0, -value, f[..., feats])
        return sae.decode(g) + (x - sae.decode(f))


# 1. position 0 (BOS) is not edited ---------------------------------------------------------------------------------
def test_clamp_leaves_position_0_untouched_and_clamps_the_rest_exactly(sae):
    x = torch.randn(3, 6, 16)
    with torch.no_grad():
        on0 = (sae.encode(x)[:, 0] > 0).any(0)
    feats = on0.nonzero().flatten()[:4].tolist()  # active at position 0, so clamping there would change it
    expected = _hand_edit(sae, x, feats, 20.0)
    with torch.no_grad():
        out = edit_residual(x, sae, feats, "clamp", 20.0)
        old = edit_residual(x, sae, feats, "clamp", 20.0, skip_bos=False)
    assert torch.equal(out[:, 0], x[:, 0])
    assert (out[:, 1:] - expected[:, 1:]).abs().max() < 1e-5
    assert (old - expected).abs().max() < 1e-5  # skip_bos=False: the old behaviour, position 0 clamped too
    assert (old[:, 0] - x[:, 0]).abs().max() > 1.0


def test_intervention_on_a_model_skips_bos(model, sae):
    prompts = ["alpha beta gamma delta", "epsilon zeta eta theta alpha"]
    with hooks(model, [(HOOK, lambda x: None)]):  # a no-op hook: the clean pass runs the same bridge forward
        clean = mechun.cache_residuals(model, prompts, layers=[1], positions="all", progress=False)
    x = clean[1]
    with torch.no_grad():
        feats = (sae.encode(x[:, 0]) > 0).any(0).nonzero().flatten()[:4].tolist()
    with sae_intervention(model, sae, feats, mode="clamp", value=20.0, hook=HOOK):
        new = mechun.cache_residuals(model, prompts, layers=[1], positions="all", progress=False)[1]
    with sae_intervention(model, sae, feats, mode="clamp", value=20.0, hook=HOOK, skip_bos=False):
        old = mechun.cache_residuals(model, prompts, layers=[1], positions="all", progress=False)[1]
    m = clean.mask.clone()
    m[:, 0] = False
    assert torch.equal(new[:, 0], x[:, 0])
    assert (new[m] - _hand_edit(sae, x, feats, 20.0)[m]).abs().max() < 1e-5
    assert (old[:, 0] - x[:, 0]).abs().max() > 1.0


# 2. strict threshold -----------------------------------------------------------------------------------------------
def test_retain_frequency_equal_to_the_threshold_is_excluded():
    forget = _stats([0.5, 0.3, 0.9, 0.1])
    retain = FeatureStats(torch.tensor([10, 5, 20, 0]) / torch.tensor(1000.0), torch.ones(4), 1000)  # 0.01 exactly
    assert select_features(forget, retain, retain_threshold=0.01, n=10) == [1, 3]
    assert select_features(forget, retain, retain_threshold=0.01, n=10, decimals=None) == [1, 3]
    assert select_features(forget, retain, retain_threshold=0.01, n=10, strict=False) == [0, 1, 3]  # old: <=


# 3. ties at the cutoff ---------------------------------------------------------------------------------------------
def test_ties_at_the_cutoff_go_to_the_lower_feature_index():
    forget, retain = _stats([0.2, 0.5, 0.5, 0.5, 0.1]), _stats([0.0] * 5)
    assert select_features(forget, retain, n=2) == [1, 2]
    # the case is a real tie: SAEBench's code read with a stable sort (argsort()[::-1]) would pick the other way
    assert np.argsort(forget.frequency.numpy(), kind="stable")[::-1][:2].tolist() == [3, 2]


def test_tie_rule_holds_on_a_wide_sae_with_many_ties():
    g = torch.Generator().manual_seed(0)
    f = torch.randint(0, 20, (4096,), generator=g) / torch.tensor(1000.0)
    r = torch.randint(0, 30, (4096,), generator=g) / torch.tensor(1000.0)
    chosen = select_features(FeatureStats(f, torch.ones_like(f), 1000), FeatureStats(r, torch.ones_like(r), 1000),
                             retain_threshold=0.01, n=300)
    fr, rr = round_frequency(f).tolist(), round_frequency(r).tolist()
    ref = sorted((i for i in range(4096) if rr[i] < 0.01 and fr[i] > 0), key=lambda i: (-fr[i], i))
    assert chosen == ref[:300]


# 4. six decimals ---------------------------------------------------------------------------------------------------
def test_frequencies_are_rounded_to_6_decimals_before_selection():
    forget, retain = _stats([0.5, 0.4]), _stats([0.0099996, 0.0])  # 0.0099996 rounds to 0.01: not below 0.01
    assert select_features(forget, retain, retain_threshold=0.01) == [1]
    assert select_features(forget, retain, retain_threshold=0.01, decimals=None) == [0, 1]
    # rounding also makes ranking ties: 0.0200001 and 0.0200004 are both 0.02, so the lower index comes first
    forget, retain = _stats([0.0200001, 0.0200004]), _stats([0.0, 0.0])
    assert select_features(forget, retain) == [0, 1]
    assert select_features(forget, retain, decimals=None) == [1, 0]
    # a forget frequency that rounds to zero never fired
    assert select_features(_stats([4e-7, 0.3]), _stats([0.0, 0.0])) == [1]


def test_rounding_equals_saebench_savetxt_loadtxt_round_trip():
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 5000, (2000,), generator=g)
    freq = counts.to(torch.float32) / 123457  # as SAEBench computes it: float32 count / tokens
    buf = io.StringIO()
    np.savetxt(buf, freq.numpy(), fmt="%f")
    buf.seek(0)
    assert np.array_equal(round_frequency(freq).numpy(), np.loadtxt(buf, dtype=float))


# 5. BOS, EOS and pad tokens are not counted, wherever they occur ---------------------------------------------------
def test_special_tokens_in_the_middle_of_a_sequence_are_not_counted():
    pad, bos, eos = 0, 2, 3
    ids = torch.tensor([[bos, 7, eos, 8, pad, 9], [bos, 8, bos, 7, pad, pad]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    keep = counted_positions(ids, attn, [pad, bos, eos])
    assert keep.tolist() == [[False, True, False, True, False, True], [False, True, False, True, False, False]]
    old = counted_positions(ids, attn, skip_first=True)
    assert old.sum() == 8 and keep.sum() == 5
    acts = torch.zeros(2, 6, 2)
    acts[..., 1] = 1.0  # fires everywhere
    acts[ids == eos, 0] = 2.0  # fires only on the mid-sequence EOS
    assert stats_from_activations(acts[keep]).frequency.tolist() == [0.0, 1.0]
    assert stats_from_activations(acts[old]).frequency[0] == 1 / 8


def test_feature_stats_skips_special_tokens_in_text(model, sae):
    tok = model.tokenizer
    assert special_token_ids(tok) == sorted({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id})
    prompts = ["alpha beta <eos> gamma", "delta <pad> epsilon zeta eta"]
    ids, attn = mechun.tokenize(model, prompts)
    assert (ids == tok.eos_token_id).sum() == 1 and (ids[attn.bool()] == tok.pad_token_id).sum() == 1
    new = feature_stats(model, sae, prompts, hook=HOOK)
    old = feature_stats(model, sae, prompts, hook=HOOK, skip_special=False, skip_first=True)
    assert new.n_tokens == 7 and old.n_tokens == 9
    keep = counted_positions(ids, attn, special_token_ids(tok))
    x = mechun.cache_residuals(model, prompts, layers=[1], positions="all", progress=False)[1][keep]
    with torch.no_grad():
        expected = (sae.encode(x) > 0).float().mean(0)
    assert torch.allclose(new.frequency, expected)


# types -------------------------------------------------------------------------------------------------------------
def test_modes_literal_and_bad_mode(sae):
    assert MODES == ("clamp", "scale", "zero")
    with pytest.raises((MechunError, TypeError), match="mode"):  # TypeError: the runtime type check, under pytest
        edit_features(torch.ones(2, 3), [0], "negate", 1.0)
    with pytest.raises(MechunError, match="hook"):
        feature_stats(None, sae, ["alpha"], hook="blocks.1.attn.hook_z")
