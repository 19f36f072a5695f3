"""RMU: faithful mechanics (what moves, the steering vector), the junk signature, and recovery by ablation."""

import json

import pytest
import torch
from conftest import run_cli, weights_hash

import mechun
from mechun.errors import MechunError
from mechun.evaluate import cloze_accuracy
from mechun.junk import diagnose_junk, junk_recovery, random_direction_like, recovery_fraction
from mechun.models import hf_state_dict
from mechun.unlearn.rmu import (
    RMUConfig,
    layer_activations,
    load_steering,
    rmu_loss,
    rmu_unlearn,
    save_unlearned,
    steering_vectors,
)


def test_steering_vectors_follow_wmdp():
    s = steering_vectors(64, ["a", "b"], coeff=20.0, seed=3)
    for v in s.values():
        assert torch.isclose(v.norm(), torch.tensor(20.0)) and (v >= 0).all()  # uniform [0,1)^d, normalised, * c
    assert not torch.allclose(s["a"], s["b"])
    assert torch.equal(steering_vectors(64, ["a"], 20.0, 3)["a"], s["a"])


@pytest.fixture(scope="module")
def rmu_run(tiny_organism_dir, tiny_world):
    base = mechun.load_model(tiny_organism_dir, device="cpu")
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    before = {k: v.clone() for k, v in hf_state_dict(model).items()}
    base_hash = weights_hash(base)
    forget, retain = tiny_world.corpora(["pathogen"])
    cfg = RMUConfig(["pathogen"], layer=1, steps=120, seed=0)
    res = rmu_unlearn(model, base, forget, retain, cfg, progress=False)
    return base, model, before, base_hash, res


def test_only_mlp_output_weights_of_update_layers_move(rmu_run):
    base, model, before, base_hash, res = rmu_run
    assert res.config.update_layers == [0, 1]
    after = hf_state_dict(model)
    moved = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert moved == ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"]
    assert weights_hash(base) == base_hash  # the frozen copy never changes


def test_rmu_forgets_and_leaves_the_junk_signature(rmu_run, tiny_world):
    base, model, _, _, res = rmu_run
    assert cloze_accuracy(base, tiny_world.prompts("pathogen")) > 0.95
    forget_after = cloze_accuracy(model, tiny_world.prompts("pathogen"))
    assert forget_after < 0.5
    assert cloze_accuracy(model, tiny_world.prompts("sports")) > 0.9
    fp = [p.text for p in tiny_world.prompts("pathogen")]
    rp = [p.text for p in tiny_world.prompts("sports")]
    diag = diagnose_junk(base, model, fp, rp, steering=res.steering["pathogen"])
    assert diag.norm_ratio_forget[1] > 2.0 and diag.norm_ratio_retain[1] < 1.2
    assert diag.norm_ratio_forget[0] < diag.norm_ratio_forget[1]
    assert diag.cos_with_steering["mean_diff"][1] > 0.9
    assert diag.explained["mean_diff"][1] > 0.5
    # recovery: ablate the direction from layer 1 on; a random direction of the same norm does nothing
    d = diag.direction(1)
    with mechun.project_out(model, d, layers=[1, 2]):
        ablated = cloze_accuracy(model, tiny_world.prompts("pathogen"))
    with mechun.project_out(model, random_direction_like(d.vector), layers=[1, 2]):
        control = cloze_accuracy(model, tiny_world.prompts("pathogen"))
    assert recovery_fraction(1.0, forget_after, ablated) > 0.5
    assert abs(recovery_fraction(1.0, forget_after, control)) < 0.2
    # the library recipe gives exactly these numbers, and picks the peak layer by itself
    assert diag.peak_layer() == 1
    n_hooks = mechun.count_hooks(model)  # the bridge's own hooks, registered by the forwards above
    rec = junk_recovery(base, model, diag, lambda m: {"forget": {"train": cloze_accuracy(
        m, tiny_world.prompts("pathogen"))}}, controls=("random", "base"))
    assert rec.layer == 1
    assert rec.scores["ablated"]["forget"]["train"] == ablated
    assert rec.recovery_by_format["train"] == recovery_fraction(rec.scores["base"]["forget"]["train"], forget_after,
                                                                ablated)
    assert abs(rec.control_recovery["train"]) < 0.2
    assert rec.scores["base_ablated"]["forget"]["train"] > 0.95  # the junk direction carries nothing in the base
    assert mechun.count_hooks(model) == n_hooks  # none of the recipe's hooks outlive it
    # rich display: the norm-ratio profile (a chart and its peak numbers) and the recovery table
    page = diag._repr_html_()
    assert "<svg" in page and "<polyline" in page and f"{diag.norm_ratio_forget[1]:.3f}" in page
    assert f"{diag.cos_with_steering['mean_diff'][1]:.3f}" in page
    for obj in (diag, rec, rec.direction):
        assert "tensor(" not in repr(obj) and len(repr(obj)) < 400
    assert "peak_layer=1" in repr(diag)
    page = rec._repr_html_()
    assert f"{rec.recovery_by_format['train']:.3f}" in page and f"{rec.control_recovery['train']:.3f}" in page


def test_rmu_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    h_f, h_r, h_fr = torch.randn(2, 3, 4), torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    f_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    r_mask = torch.tensor([[1, 0], [1, 1]])
    steer = torch.tensor([1.0, 2.0, 0.0, -1.0])
    loss = rmu_loss(h_f, f_mask, steer, h_r, h_fr, r_mask, alpha=10.0)
    forget_tokens = [h_f[0, 0], h_f[0, 1], h_f[1, 0], h_f[1, 1], h_f[1, 2]]  # the padded token h_f[0, 2] is left out
    forget = sum(((t - steer) ** 2).sum() for t in forget_tokens) / (5 * 4)
    retain_pairs = [(h_r[0, 0], h_fr[0, 0]), (h_r[1, 0], h_fr[1, 0]), (h_r[1, 1], h_fr[1, 1])]
    retain = 10.0 * sum(((a - b) ** 2).sum() for a, b in retain_pairs) / (3 * 4)
    assert torch.allclose(loss.forget, forget) and torch.allclose(loss.retain, retain)
    assert torch.allclose(loss.total, forget + retain)
    h_f2 = h_f.clone()
    h_f2[0, 2] += 100.0  # padding never moves the loss
    assert torch.equal(rmu_loss(h_f2, f_mask, steer, h_r, h_fr, r_mask, alpha=10.0).total, loss.total)


def test_rmu_refuses_to_train_under_active_bridge_hooks(tiny_organism_dir, tiny_world):
    """RMU trains through the bare HF view, which bypasses hook points: an active project_out must not be ignored."""
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    frozen = mechun.load_model(tiny_organism_dir, device="cpu")
    ids, mask = mechun.tokenize(model, [tiny_world.prompts("pathogen")[0].text])
    direction = torch.ones(model.cfg.d_model)
    with mechun.project_out(model, direction, layers=[0]):
        with pytest.raises(MechunError, match="hooks now active"):
            layer_activations(model, ids, mask, 1)
        forget, retain = tiny_world.corpora(["pathogen"])
        with pytest.raises(MechunError, match="hooks now active"):
            rmu_unlearn(model, frozen, forget, retain, RMUConfig(["pathogen"], layer=1, steps=2), progress=False)
    assert layer_activations(model, ids, mask, 1).shape[-1] == model.cfg.d_model  # fine once the context is left
    handle = model.blocks[0].mlp.register_forward_hook(lambda mod, args, out: out * 0)  # a plain torch hook too
    try:
        with pytest.raises(MechunError, match="hooks now active"):
            layer_activations(model, ids, mask, 1)
    finally:
        handle.remove()


def test_save_unlearned_roundtrip(rmu_run, tmp_path):
    _, model, _, _, res = rmu_run
    out = save_unlearned(model, res, tmp_path / "unl")
    steer = load_steering(out)
    assert torch.allclose(steer["pathogen"], res.steering["pathogen"])
    meta = json.loads((out / "rmu.json").read_text())
    assert meta["config"]["layer"] == 1 and meta["steering_coeff"] == res.config.steering_coeff
    again = mechun.load_model(out, device="cpu")
    assert mechun.model_fingerprint(again) == mechun.model_fingerprint(model)


def test_rmu_is_deterministic(tiny_organism_dir, tiny_world):
    forget, retain = tiny_world.corpora(["pathogen"])
    fps = []
    for _ in range(2):
        base = mechun.load_model(tiny_organism_dir, device="cpu")
        model = mechun.load_model(tiny_organism_dir, device="cpu")
        rmu_unlearn(model, base, forget, retain, RMUConfig(["pathogen"], layer=1, steps=5, seed=7), progress=False)
        fps.append(mechun.model_fingerprint(model))
    assert fps[0] == fps[1]


def test_rmu_bad_inputs(tiny_organism_dir, tiny_world, tiny_model):
    forget, retain = tiny_world.corpora(["pathogen"])
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    with pytest.raises(MechunError, match="forget domain"):
        rmu_unlearn(model, tiny_model, forget, retain, RMUConfig([]), progress=False)
    with pytest.raises(MechunError, match="empty corpus"):
        rmu_unlearn(model, tiny_model, {"cyber": []}, retain, RMUConfig(["cyber"]), progress=False)
    with pytest.raises(MechunError, match="out of range"):
        rmu_unlearn(model, tiny_model, forget, retain, RMUConfig(["pathogen"], layer=9), progress=False)
    for bad in ({"lr": float("nan")}, {"alpha": float("nan")}, {"steering_coeff": float("nan")},
                {"steering_coeff": -1.0}, {"steps": 0}):
        with pytest.raises(MechunError):
            rmu_unlearn(model, tiny_model, forget, retain, RMUConfig(["pathogen"], layer=1, **bad), progress=False)
    with torch.no_grad():
        next(iter(hf_state_dict(model).values())).add_(1.0)
    with pytest.raises(MechunError, match="same weights"):
        rmu_unlearn(model, tiny_model, forget, retain, RMUConfig(["pathogen"], layer=1), progress=False)


def test_cli_rmu_then_junk(tiny_organism_dir, tmp_path):
    unl = tmp_path / "unl"
    run_cli("rmu", "--model", str(tiny_organism_dir), "--forget", "pathogen", "--layer", "1", "--steps", "80",
            "--out", str(unl), "--no-progress")
    assert (unl / "rmu.json").is_file() and (unl / "config.json").is_file()
    out = json.loads(run_cli("junk", "--base", str(tiny_organism_dir), "--unlearned", str(unl),
                             "--out", str(tmp_path / "junk")).stdout)
    assert out["layer"] == 1
    results = json.loads((tmp_path / "junk" / "results.json").read_text())
    assert results["norm_ratio_forget"][1] > results["norm_ratio_retain"][1]
    assert (tmp_path / "junk" / "report.html").is_file() and (tmp_path / "junk" / "junk_direction.safetensors").is_file()
    d = mechun.Direction.load(tmp_path / "junk" / "junk_direction.safetensors")
    with pytest.raises(mechun.ModelMismatchError):  # computed on the unlearned model, refused on the base
        with mechun.project_out(mechun.load_model(tiny_organism_dir, device="cpu"), d):
            pass


def test_cli_junk_on_prompt_files_for_any_pair(tiny_organism_dir, tiny_world, tmp_path):
    fp, rp = tmp_path / "f.txt", tmp_path / "r.txt"
    fp.write_text("\n".join(p.text for p in tiny_world.prompts("pathogen")[:8]))
    rp.write_text("\n".join(p.text for p in tiny_world.prompts("sports")[:8]))
    out = json.loads(run_cli("junk", "--base", str(tiny_organism_dir), "--unlearned", str(tiny_organism_dir),
                             "--forget-prompts", str(fp), "--retain-prompts", str(rp), "--device", "cpu",
                             "--out", str(tmp_path / "j")).stdout)
    assert all(abs(x - 1.0) < 1e-5 for x in out["norm_ratio_forget"])  # a model against itself: no junk
