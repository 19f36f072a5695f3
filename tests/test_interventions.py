"""Interventions: project_out / add_direction do exactly what they say, validate input, and never leak hooks."""

import pytest
import torch
from conftest import warm, weights_hash

import mechun
from mechun import Direction, add_direction, cache_residuals, hooks, project_out
from mechun.errors import MechunError, ModelMismatchError


@pytest.fixture(scope="module")
def prompts(tiny_world):
    return [p.text for p in tiny_world.prompts("cyber")][:10]


def _unit(d):
    torch.manual_seed(1)
    v = torch.randn(d)
    return v / v.norm()


def test_project_out_removes_component_only_where_asked(tiny_model, prompts):
    d = _unit(tiny_model.cfg.d_model)
    clean = cache_residuals(tiny_model, prompts, positions="all", progress=False)
    with project_out(tiny_model, d, layers=[1]):
        abl = cache_residuals(tiny_model, prompts, positions="all", progress=False)
    real = clean.mask
    assert (abl[1][real] @ d).abs().max() < 1e-5
    assert (clean[1][real] @ d).abs().max() > 1e-2  # there was something to remove
    assert torch.allclose(abl[0], clean[0], atol=1e-5)  # upstream untouched
    expected = clean[1][real] - (clean[1][real] @ d)[:, None] * d
    assert torch.allclose(abl[1][real], expected, atol=1e-5)


def test_project_out_span_of_several_directions(tiny_model, prompts):
    torch.manual_seed(2)
    dirs = torch.randn(3, tiny_model.cfg.d_model)
    with project_out(tiny_model, dirs, layers=[2]):
        abl = cache_residuals(tiny_model, prompts, layers=[2], progress=False)
    assert (abl[2] @ dirs.T).abs().max() < 1e-4


def test_project_out_positions(tiny_model, prompts):
    d = _unit(tiny_model.cfg.d_model)
    clean = cache_residuals(tiny_model, prompts, layers=[0], positions="all", progress=False)
    with project_out(tiny_model, d, layers=[0], positions=[1]):
        abl = cache_residuals(tiny_model, prompts, layers=[0], positions="all", progress=False)
    assert (abl[0][:, 1] @ d).abs().max() < 1e-5
    assert torch.allclose(abl[0][:, 0], clean[0][:, 0], atol=1e-5)


def test_project_out_everywhere_equals_weight_orthogonalisation(tiny_organism_dir, prompts):
    """Removing d after every write to the residual stream == orthogonalising every writer's weights to d."""
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    d = _unit(model.cfg.d_model)
    ids, mask = mechun.tokenize(model, prompts)
    n = model.cfg.n_layers
    with project_out(model, d, hook="resid_pre", layers=[0]), project_out(model, d, hook="resid_mid"), \
            project_out(model, d, hook="resid_post"):
        ablated = cache_residuals(model, prompts, positions="all", progress=False).acts
    from mechun.models import hf_state_dict

    state = hf_state_dict(model)
    P = torch.eye(len(d)) - torch.outer(d, d)
    with torch.no_grad():
        for name, w in state.items():
            if name in ("transformer.wte.weight", "transformer.wpe.weight"):
                w.copy_(w @ P)
            elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):  # Conv1D: x @ W, W is (in, d_model)
                w.copy_(w @ P)
            elif name.endswith(("attn.c_proj.bias", "mlp.c_proj.bias")):
                w.copy_(w @ P)
    assert n > 0
    # Compare residual streams (the unembedding is tied to wte, so logits would differ through ln_final)
    orth = cache_residuals(model, prompts, positions="all", progress=False).acts
    real = mask.bool()
    assert (ablated[:, real] - orth[:, real]).abs().max() < 1e-4


def test_add_direction_adds_exactly(tiny_model, prompts):
    v = torch.randn(tiny_model.cfg.d_model)
    clean = cache_residuals(tiny_model, prompts, layers=[0, 1], progress=False)
    with add_direction(tiny_model, v, coeff=2.5, layers=[0]):
        steered = cache_residuals(tiny_model, prompts, layers=[0, 1], progress=False)
    assert torch.allclose(steered[0], clean[0] + 2.5 * v, atol=1e-5)
    assert not torch.allclose(steered[1], clean[1], atol=1e-3)  # and it propagates downstream


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(64), "zero vector"),
    (torch.full((64,), float("nan")), "NaN"),
    (torch.ones(32), "d_model=64"),
    (torch.ones(2, 3, 64), "d_model"),
])
def test_bad_directions(tiny_model, bad, match):
    with pytest.raises(MechunError, match=match):
        with project_out(tiny_model, bad):
            pass
    with pytest.raises(MechunError, match=match):
        with add_direction(tiny_model, bad):
            pass


def test_direction_from_another_model_is_refused(tiny_model, tmp_path):
    foreign = Direction(torch.ones(64), fingerprint="f" * 24)
    with pytest.raises(ModelMismatchError):
        with project_out(tiny_model, foreign):
            pass
    mine = Direction(torch.ones(64), fingerprint=mechun.model_fingerprint(tiny_model), layer=1, meta={"k": "v"})
    back = Direction.load(mine.save(tmp_path / "d.safetensors"))
    assert torch.equal(back.vector, mine.vector) and back.meta == {"k": "v"}
    with project_out(tiny_model, back, layers=[1]):
        pass


def test_bad_layers_and_hooks(tiny_model):
    with pytest.raises(MechunError, match="out of range"):
        with project_out(tiny_model, torch.ones(64), layers=[5]):
            pass
    with pytest.raises(MechunError, match="did you mean 'blocks.0.hook_resid_post'"):
        with hooks(tiny_model, [("blocks.0.hook_resid_pots", lambda a: a)]):
            pass
    with pytest.raises(MechunError, match="coeff"):
        with add_direction(tiny_model, torch.ones(64), coeff=float("inf")):
            pass


def test_exception_inside_every_context_manager_leaves_no_hooks(tiny_model, prompts):
    warm(tiny_model)
    before = mechun.count_hooks(tiny_model)
    w = weights_hash(tiny_model)
    managers = [
        lambda: project_out(tiny_model, torch.ones(64)),
        lambda: add_direction(tiny_model, torch.ones(64), layers=[1]),
        lambda: hooks(tiny_model, [("blocks.1.hook_resid_post", lambda a: None)]),
    ]
    for make in managers:
        with pytest.raises(RuntimeError, match="injected"):
            with make():
                assert mechun.count_hooks(tiny_model) > before
                cache_residuals(tiny_model, prompts, progress=False)
                raise RuntimeError("injected")
        assert mechun.count_hooks(tiny_model) == before
    # a failure while registering (second hook name is bad) removes the first
    with pytest.raises(MechunError):
        with hooks(tiny_model, [("blocks.0.hook_resid_post", lambda a: None), ("blocks.9.hook_resid_post", lambda a: None)]):
            pass
    assert mechun.count_hooks(tiny_model) == before
    assert weights_hash(tiny_model) == w


def test_nested_contexts_remove_only_their_own(tiny_model):
    warm(tiny_model)
    before = mechun.count_hooks(tiny_model)
    with project_out(tiny_model, torch.ones(64), layers=[0]):
        with add_direction(tiny_model, torch.ones(64), layers=[0]):
            assert mechun.count_hooks(tiny_model) == before + 2
        assert mechun.count_hooks(tiny_model) == before + 1
    assert mechun.count_hooks(tiny_model) == before


@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_ablate_takes_any_leading_axes(lead):
    """``ablate(act, basis)``: act ``*batch d_model``, basis ``k d_model`` with orthonormal rows (one direction is
    ``1 d_model``); the span of the rows is removed from every vector, and nothing else is changed."""
    from mechun.interventions import _basis, ablate

    torch.manual_seed(3)
    act = torch.randn(*lead, 16, dtype=torch.float64)
    for k in (1, 3):
        basis = _basis(torch.randn(k, 16))
        out = ablate(act, basis)
        assert out.shape == act.shape and out.dtype == act.dtype
        assert (out @ basis.double().T).abs().max() < 1e-6
        removed = act - out  # lies in the span: what is orthogonal to it is kept exactly
        assert torch.allclose(removed, (removed @ basis.double().T) @ basis.double(), atol=1e-6)
