"""Residual caching: equals TransformerLens' own cache, keeps only what was asked, stops early, and is safe."""

import contextlib

import pytest
import torch
from conftest import warm, weights_hash

import mechun
from mechun import ResidualCache, cache_residuals, hooks
from mechun.errors import MechunError, ModelMismatchError


@pytest.fixture(scope="module")
def prompts(tiny_world):
    return [p.text for p in tiny_world.prompts("pathogen")][:12] + tiny_world.filler[:5]


def _tl_cache(model, prompts):
    ids, mask = mechun.tokenize(model, prompts)
    _, cache = model.run_with_cache(ids, attention_mask=mask)
    return ids, mask, cache


def test_last_position_matches_run_with_cache(tiny_model, prompts):
    ids, mask, tl = _tl_cache(tiny_model, prompts)
    ours = cache_residuals(tiny_model, prompts, batch_size=5, progress=False)
    last = mask.sum(1) - 1
    assert ours.acts.shape == (tiny_model.cfg.n_layers, len(prompts), tiny_model.cfg.d_model)
    for layer in ours.layers:
        theirs = tl[f"blocks.{layer}.hook_resid_post"][torch.arange(len(prompts)), last]
        assert torch.allclose(ours[layer], theirs, atol=1e-5)


@pytest.mark.parametrize("hook", ["resid_pre", "mlp_out", "attn_out", "resid_mid"])
def test_other_hooks_match(tiny_model, prompts, hook):
    ids, mask, tl = _tl_cache(tiny_model, prompts)
    ours = cache_residuals(tiny_model, prompts, layers=[1], hook=hook, positions="all", progress=False)
    theirs = tl[f"blocks.1.hook_{hook}"] * mask[..., None]
    assert torch.allclose(ours[1][:, : ids.shape[1]], theirs, atol=1e-5)


def test_all_int_and_mask_positions(tiny_model, prompts):
    ids, mask, tl = _tl_cache(tiny_model, prompts)
    full = tl["blocks.2.hook_resid_post"]
    every = cache_residuals(tiny_model, prompts, layers=2, positions="all", batch_size=4, progress=False)
    assert torch.allclose(every[2], full * mask[..., None], atol=1e-5)
    assert torch.equal(every.mask, mask.bool())
    first_two = cache_residuals(tiny_model, prompts, layers=[2], positions=[0, 1], progress=False)
    assert torch.allclose(first_two[2], full[:, :2], atol=1e-5)
    second_last = cache_residuals(tiny_model, prompts, layers=[2], positions=-2, progress=False)
    idx = mask.sum(1) - 2
    assert torch.allclose(second_last[2], full[torch.arange(len(prompts)), idx], atol=1e-5)
    sel = torch.zeros_like(mask, dtype=torch.bool)
    sel[:, 1] = True
    sel[3, 2] = True
    picked = cache_residuals(tiny_model, prompts, layers=[2], positions=sel, batch_size=4, progress=False)
    assert picked[2].shape == (len(prompts) + 1, tiny_model.cfg.d_model)
    assert torch.allclose(picked[2], full[sel], atol=1e-5)
    assert torch.equal(picked.index, sel.nonzero())


@pytest.mark.parametrize("path", ["bare", "bridge"])
def test_forward_stops_after_last_requested_layer(tiny_model, prompts, path):
    """Both paths: the fast one (no hook active: the unwrapped HF model) and the bridge (a hook is active)."""
    from mechun.models import bare_forward_view

    if path == "bare":
        bare, layers = bare_forward_view(tiny_model)
        last_block, final_norm_module, scope = layers[-1], bare.transformer.ln_f, contextlib.nullcontext()
    else:
        last_block, final_norm_module = tiny_model.blocks[-1], tiny_model.ln_final
        scope = hooks(tiny_model, [("blocks.0.hook_resid_pre", lambda a: None)])  # forces the bridge path
    entered, final_norm = [], []
    handles = [last_block.register_forward_pre_hook(lambda *a: entered.append(1))]
    if path == "bare":  # the final norm is shared with the bridge: a hook on it would itself force the bridge path
        forward = final_norm_module.forward
        final_norm_module.forward = lambda *a, **k: (final_norm.append(1), forward(*a, **k))[1]
    else:
        handles.append(final_norm_module.register_forward_hook(lambda *a: final_norm.append(1)))
    try:
        with scope:
            cache_residuals(tiny_model, prompts, layers=[0, 1], progress=False)
            assert entered == []
            cache_residuals(tiny_model, prompts, layers=[tiny_model.cfg.n_layers - 1], progress=False)
        assert entered and final_norm == []
    finally:
        for h in handles:
            h.remove()
        if path == "bare":
            del final_norm_module.forward


def test_bridge_path_sees_user_hooks_and_matches_fast_path(tiny_model, prompts):
    fast = cache_residuals(tiny_model, prompts, layers=[0, 2], progress=False)
    with hooks(tiny_model, [("blocks.0.hook_resid_pre", lambda a: None)]):  # a no-op hook: bridge path
        slow = cache_residuals(tiny_model, prompts, layers=[0, 2], progress=False)
    assert torch.allclose(fast.acts, slow.acts, atol=1e-5)
    with tiny_model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: a * 0)]):  # TL's own API
        zeroed = cache_residuals(tiny_model, prompts, layers=[1], progress=False)
    assert zeroed.acts.abs().max() == 0


def test_memory_is_what_is_kept(tiny_model, prompts):
    one = cache_residuals(tiny_model, prompts * 4, layers=[1], progress=False)
    assert one.acts.numel() == len(prompts) * 4 * tiny_model.cfg.d_model
    assert one.acts.device.type == "cpu"


def test_save_load_roundtrip_and_fingerprint(tiny_model, prompts, tmp_path):
    cache = cache_residuals(tiny_model, prompts, layers=[0, 2], progress=False)
    path = cache.save(tmp_path / "c.safetensors")
    back = ResidualCache.load(path)
    assert torch.equal(back.acts, cache.acts)
    assert back.layers == [0, 2] and back.hook_names == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    assert back.prompts == prompts and back.fingerprint == mechun.model_fingerprint(tiny_model)
    back.check_model(tiny_model)
    back.fingerprint = "0" * 24
    with pytest.raises(ModelMismatchError, match="another model|recompute"):
        back.check_model(tiny_model)


def test_tokens_input(tiny_model, prompts):
    ids, mask = mechun.tokenize(tiny_model, prompts)
    a = cache_residuals(tiny_model, ids, attention_mask=mask, layers=[1], progress=False)
    b = cache_residuals(tiny_model, prompts, layers=[1], progress=False)
    assert torch.equal(a.acts, b.acts)


def test_bad_inputs(tiny_model, prompts):
    with pytest.raises(MechunError, match="empty prompt list"):
        cache_residuals(tiny_model, [], progress=False)
    with pytest.raises(MechunError, match="out of range"):
        cache_residuals(tiny_model, prompts, layers=[7], progress=False)
    with pytest.raises(MechunError, match="layers is empty"):
        cache_residuals(tiny_model, prompts, layers=[], progress=False)
    with pytest.raises(MechunError, match="hook kind"):
        cache_residuals(tiny_model, prompts, hook="resid_pots", progress=False)
    with pytest.raises(MechunError, match="positions"):
        cache_residuals(tiny_model, prompts, positions="first", progress=False)
    with pytest.raises(MechunError, match="outside a prompt"):
        cache_residuals(tiny_model, prompts, positions=[40], progress=False)
    with pytest.raises(MechunError, match="empty"):
        cache_residuals(tiny_model, ["ok prompt", "  "], progress=False)


def test_no_hooks_left_and_weights_unchanged(tiny_model, prompts):
    warm(tiny_model)
    before_hooks, before_w = mechun.count_hooks(tiny_model), weights_hash(tiny_model)
    cache_residuals(tiny_model, prompts, progress=False)
    with pytest.raises(MechunError):
        cache_residuals(tiny_model, prompts, positions=[40], progress=False)

    class Boom(Exception):
        pass

    def explode(*a):
        raise Boom

    from mechun.models import bare_forward_view

    # an exception mid-forward, on the fast path (unwrapped HF layer) and on the bridge path (a hook point)
    for module in (bare_forward_view(tiny_model)[1][0], tiny_model.blocks[0].hook_out):
        h = module.register_forward_hook(explode)
        try:
            with pytest.raises(Boom):
                cache_residuals(tiny_model, prompts, layers=[1, 2], progress=False)
        finally:
            h.remove()
    assert mechun.count_hooks(tiny_model) == before_hooks
    assert weights_hash(tiny_model) == before_w


def test_cache_displays_its_summary(tiny_model, prompts):
    cache = cache_residuals(tiny_model, prompts, positions="all")
    page = cache._repr_html_()
    assert "ResidualCache" in page and "x".join(map(str, cache.acts.shape)) in page and "all" in page
    assert page.count("<circle") == len(cache.layers)  # the mean norm of every cached layer is drawn
    assert cache.fingerprint[:12] in page
    assert "tensor(" not in repr(cache) and len(repr(cache)) < 300  # a terminal / plain-text fallback: no dump


def test_deterministic(tiny_model, prompts):
    a = cache_residuals(tiny_model, prompts, progress=False)
    b = cache_residuals(tiny_model, prompts, batch_size=3, progress=False)
    assert torch.allclose(a.acts, b.acts, atol=1e-5)
