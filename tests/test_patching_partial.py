"""Activation patching by partial forwards (mechun.partial): the same numbers as TransformerLens' patching on every
tested architecture, for every hook kind and per head, with a last-position metric and with one that reads every
position; the whole-forward path where the partial one cannot apply; no weight changed and no hook left."""

import pytest
import torch
from conftest import warm, weights_hash
from helpers import arch_configs, random_checkpoint
from transformer_lens import patching

import mechun
from mechun.hooks import count_hooks, hooks
from mechun.localize import activation_patching, activation_patching_heads, last_position
from mechun.partial import _pack, partial_forward

CLEAN = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11"
CORRUPT = "w1 w2 w13 w4 w5 w16 w7 w8 w9 w10 w11"
TL = {"resid_pre": patching.get_act_patch_resid_pre, "attn_out": patching.get_act_patch_attn_out,
      "mlp_out": patching.get_act_patch_mlp_out}


@pytest.fixture(scope="module", params=list(arch_configs()))
def arch_model(request, tmp_path_factory):
    # Gemma-2 with a sliding window shorter than the prompt, so its local layers' masks matter
    cfg = arch_configs(gemma_window=4)[request.param]
    return mechun.load_model(random_checkpoint(cfg, tmp_path_factory.mktemp(request.param)), device="cpu")


def _metrics():
    last = last_position(lambda logits: logits[:, -1, 20] - logits[:, -1, 21])
    every = lambda logits: logits[:, :, 20].mean(1) - logits[:, 3, 22]  # noqa: E731 -- reads every position
    return {"last": last, "every": every}


@pytest.mark.parametrize("hook", list(TL))
def test_partial_patching_equals_transformer_lens(arch_model, hook):
    model = arch_model
    ids_c, _ = mechun.tokenize(model, [CLEAN])
    ids_x, _ = mechun.tokenize(model, [CORRUPT])
    assert partial_forward(model, ids_x) is not None  # the fast path is the one under test
    warm(model)
    before, n_hooks = weights_hash(model), count_hooks(model)
    _, clean_cache = model.run_with_cache(ids_c)
    # a metric reading every position takes the whole-logits branch; once per architecture is enough
    metrics = _metrics() if hook == "resid_pre" else {"last": _metrics()["last"]}
    for name, metric in metrics.items():
        ours = activation_patching(model, CLEAN, CORRUPT, metric, hook=hook, batch_size=13)
        theirs = TL[hook](model, ids_x, clean_cache, lambda logits, m=metric: m(logits)[0]).cpu()
        assert ours.scores.shape == theirs.shape
        assert (ours.scores - theirs).abs().max() < 1e-4, (name, float((ours.scores - theirs).abs().max()))
        assert theirs.std() > 1e-3  # the sweep has structure to get wrong
    assert weights_hash(model) == before and count_hooks(model) == n_hooks


def test_partial_head_patching_equals_transformer_lens(arch_model):
    model = arch_model
    ids_c, _ = mechun.tokenize(model, [CLEAN])
    ids_x, _ = mechun.tokenize(model, [CORRUPT])
    _, clean_cache = model.run_with_cache(ids_c)
    metric = _metrics()["last"]
    ours = activation_patching_heads(model, CLEAN, CORRUPT, metric, batch_size=50)
    theirs = patching.get_act_patch_attn_head_out_by_pos(model, ids_x, clean_cache, lambda lg: metric(lg)[0]).cpu()
    assert ours.scores.shape == theirs.shape == (model.cfg.n_layers, ids_c.shape[1], model.cfg.n_heads)
    assert (ours.scores - theirs).abs().max() < 1e-4


def test_whole_forward_path_when_a_hook_point_has_a_hook(arch_model):
    """A user's hook on a hook point would not fire in the partial path: patching then takes whole forwards through
    the bridge, under the user's hook, and a hook that changes nothing gives the partial path's numbers."""
    model = arch_model
    metric = _metrics()["last"]
    fast = activation_patching(model, CLEAN, CORRUPT, metric, hook="mlp_out")
    seen = []
    with hooks(model, [("blocks.0.hook_resid_post", lambda act: seen.append(1))]):
        ids_x, _ = mechun.tokenize(model, [CORRUPT])
        assert partial_forward(model, ids_x) is None
        slow = activation_patching(model, CLEAN, CORRUPT, metric, hook="mlp_out")
        slow_heads = activation_patching_heads(model, CLEAN, CORRUPT, metric, batch_size=50)
    fast_heads = activation_patching_heads(model, CLEAN, CORRUPT, metric, batch_size=50)
    assert seen
    for f, s in ((fast, slow), (fast_heads, slow_heads)):
        assert (f.scores - s.scores).abs().max() < 1e-4
        assert f.clean_metric == pytest.approx(s.clean_metric, abs=1e-4)
        assert f.corrupt_metric == pytest.approx(s.corrupt_metric, abs=1e-4)


def test_pack_keeps_rows_whole_and_every_token_once():
    # rows 0..4 with windows of 5, 1, 4, 2, 3 tokens (each row's tokens contiguous, as the engine keeps them)
    tok_row = torch.tensor([0] * 5 + [1] + [2] * 4 + [3] * 2 + [4] * 3)
    packed = _pack(tok_row)
    assert packed.shape[1] == 5  # no sequence longer than the longest window
    real = packed[packed >= 0]
    assert sorted(real.tolist()) == list(range(len(tok_row)))
    for seq in packed:
        rows = tok_row[seq[seq >= 0]]
        for r in rows.unique():
            assert int((rows == r).sum()) == int((tok_row == r).sum())  # a row never split across sequences
    assert packed.shape[0] == 3  # first fit by decreasing length: [5], [4, 1], [3, 2]


def test_attribution_bare_path_equals_bridge_path(arch_model):
    """Attribution patching runs through the bare HF modules (LM head at the last position for a last-position
    metric) unless a hook point has a hook; both paths give the same estimates, clean and corrupt metrics."""
    from mechun.localize import attribution_patching

    model = arch_model
    for metric in _metrics().values():
        fast = attribution_patching(model, CLEAN, CORRUPT, metric)
        with hooks(model, [("blocks.0.hook_resid_post", lambda act: None)]):
            slow = attribution_patching(model, CLEAN, CORRUPT, metric)
        for kind in fast:
            assert (fast[kind].scores - slow[kind].scores).abs().max() < 1e-4
            assert slow[kind].scores.abs().max() > 1e-3
        assert fast["resid_pre"].clean_metric == pytest.approx(slow["resid_pre"].clean_metric, abs=1e-4)
        assert fast["resid_pre"].corrupt_metric == pytest.approx(slow["resid_pre"].corrupt_metric, abs=1e-4)


def test_layer_subset_matches_the_full_sweep_and_repeated_layers_are_refused(arch_model):
    from mechun.errors import MechunError

    model = arch_model
    metric = _metrics()["last"]
    full = activation_patching(model, CLEAN, CORRUPT, metric, hook="attn_out")
    part = activation_patching(model, CLEAN, CORRUPT, metric, hook="attn_out", layers=[2, 0])
    assert part.layers == [2, 0]
    assert (part.scores - full.scores[[2, 0]]).abs().max() < 1e-5
    with pytest.raises(MechunError, match="more than once"):
        activation_patching(model, CLEAN, CORRUPT, metric, layers=[0, -3])


@torch.no_grad()
def test_resid_mid_is_patched_as_the_residual_stream(arch_model):
    """The bridge's hook_resid_mid is the MLP norm's input: writing there reaches the MLP only. mechun patches the
    stream itself (through the attention output); the reference writes attn_out := clean_mid - corrupt_pre through
    TransformerLens' own run_with_hooks, and patching every position of a layer gives back the clean logits."""
    model = arch_model
    metric = _metrics()["last"]
    ids_c, _ = mechun.tokenize(model, [CLEAN])
    ids_x, _ = mechun.tokenize(model, [CORRUPT])
    _, cc = model.run_with_cache(ids_c)
    _, cx = model.run_with_cache(ids_x)
    ours = activation_patching(model, CLEAN, CORRUPT, metric, hook="resid_mid")
    L, P = ours.scores.shape
    ref = torch.empty(L, P)
    for layer in range(L):
        delta = cc[f"blocks.{layer}.hook_resid_mid"] - cx[f"blocks.{layer}.hook_resid_pre"]
        for p in range(P):
            def write(act, hook, layer=layer, p=p, delta=delta):
                act = act.clone()
                act[:, p] = delta[:, p]
                return act
            ref[layer, p] = metric(model.run_with_hooks(
                ids_x, fwd_hooks=[(f"blocks.{layer}.hook_attn_out", write)]))[0]
    assert (ours.scores - ref).abs().max() < 1e-4 and ref.std() > 1e-3
    with hooks(model, [("blocks.0.hook_resid_post", lambda act: None)]):  # the whole-forward path does the same
        slow = activation_patching(model, CLEAN, CORRUPT, metric, hook="resid_mid")
    assert (slow.scores - ref).abs().max() < 1e-4
    # a residual-stream patch at every position of a layer is the clean run from there on
    every = model.run_with_hooks(ids_x, fwd_hooks=[(
        "blocks.1.hook_attn_out", lambda act, hook: (cc["blocks.1.hook_resid_mid"] - cx["blocks.1.hook_resid_pre"]))])
    assert float(metric(every)[0]) == pytest.approx(ours.clean_metric, abs=1e-4)


def test_a_plain_torch_hook_on_a_module_is_honoured(arch_model):
    """A user's hook on any module (not a hook point) sends patching and attribution through the bridge, where it
    fires; the bare paths would silently skip it."""
    from mechun.localize import attribution_patching

    model = arch_model
    metric = _metrics()["last"]
    plain = activation_patching(model, CLEAN, CORRUPT, metric)
    handle = model.blocks[1].mlp.register_forward_hook(lambda mod, args, out: out * 0)
    try:
        ids_x, _ = mechun.tokenize(model, [CORRUPT])
        assert partial_forward(model, ids_x) is None
        ablated = activation_patching(model, CLEAN, CORRUPT, metric)
        with torch.no_grad():
            expected = float(metric(model(mechun.tokenize(model, [CLEAN])[0]))[0])
        attr = attribution_patching(model, CLEAN, CORRUPT, metric)
    finally:
        handle.remove()
    assert ablated.clean_metric == pytest.approx(expected, abs=1e-5)
    assert attr["resid_pre"].clean_metric == pytest.approx(expected, abs=1e-5)
    assert abs(plain.clean_metric - expected) > 1e-3  # the ablation mattered


def test_the_bare_view_follows_module_swaps_and_train_eval(arch_model):
    model = arch_model
    metric = _metrics()["last"]
    before = activation_patching(model, CLEAN, CORRUPT, metric, hook="mlp_out")
    mlp = model.blocks[0].mlp
    while "_original_component" in mlp._modules:  # the HF MLP inside the bridge's wrapper
        mlp = mlp._modules["_original_component"]
    name = next(n for n in mlp._modules if n.startswith("act"))  # GPT-2 act, Llama/Mistral/Gemma-2 act_fn
    old = getattr(mlp, name)
    setattr(mlp, name, torch.nn.Identity())
    try:
        swapped = activation_patching(model, CLEAN, CORRUPT, metric, hook="mlp_out")
        with hooks(model, [("blocks.0.hook_resid_post", lambda act: None)]):
            reference = activation_patching(model, CLEAN, CORRUPT, metric, hook="mlp_out")
    finally:
        setattr(mlp, name, old)
    assert (swapped.scores - reference.scores).abs().max() < 1e-4
    assert (swapped.scores - before.scores).abs().max() > 1e-4
    model.train()
    mechun.models.bare_forward_view(model)
    model.eval()
    again = activation_patching(model, CLEAN, CORRUPT, metric, hook="mlp_out")
    assert (again.scores - before.scores).abs().max() < 1e-6  # eval mode again: no dropout left on


def test_bad_metrics_batch_sizes_and_layers_are_refused(arch_model):
    from mechun.errors import MechunError

    model = arch_model
    reads_bos = last_position(lambda logits: logits[:, 0, 20] - logits[:, 0, 21])
    with pytest.raises(MechunError, match="marked last_position but reads other positions"):
        activation_patching(model, CLEAN, CORRUPT, reads_bos)
    reads_third = last_position(lambda logits: logits[:, 3, 20])
    with pytest.raises(MechunError, match="marked last_position"):
        activation_patching(model, CLEAN, CORRUPT, reads_third)
    from mechun.localize import attribution_patching

    with pytest.raises(MechunError, match="marked last_position"):
        attribution_patching(model, CLEAN, CORRUPT, reads_bos)
    with pytest.raises(MechunError, match="one number per batch row"):
        activation_patching(model, CLEAN, CORRUPT, lambda logits: logits[:, -1, 20].mean())
    for bad in (0, -1):
        with pytest.raises(MechunError, match="batch_size must be an integer >= 1"):
            activation_patching(model, CLEAN, CORRUPT, _metrics()["last"], batch_size=bad)
        with pytest.raises(MechunError, match="batch_size must be an integer >= 1"):
            activation_patching_heads(model, CLEAN, CORRUPT, _metrics()["last"], batch_size=bad)
    with pytest.raises(MechunError, match="layers is empty"):
        activation_patching(model, CLEAN, CORRUPT, _metrics()["last"], layers=[])
