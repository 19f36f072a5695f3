"""Loading: local HF checkpoint dirs of every supported architecture load offline through one path, and the
bridge's residual-stream hooks equal Hugging Face's own hidden states."""

import pytest
import torch
from helpers import arch_configs, random_checkpoint
from transformers import AutoModelForCausalLM

import mechun
from mechun.errors import MechunError, ModelMismatchError, OutputError
from mechun.hooks import FAST_KINDS
from mechun.models import _SHORT_HOOKS, HOOK_KINDS, hf_state_dict, hook_name, hook_point


@pytest.fixture(scope="module", params=list(arch_configs()))
def arch_dir(request, tmp_path_factory):
    return random_checkpoint(arch_configs()[request.param], tmp_path_factory.mktemp(request.param))


def _decoder_layers(hf):
    return hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers


def test_resid_post_equals_hf_hidden_states(arch_dir):
    model = mechun.load_model(arch_dir, device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(arch_dir, attn_implementation="eager").eval()
    prompts = ["w1 w2 w3 w4 w5", "w7 w8 w9"]
    ids, mask = mechun.tokenize(model, prompts)
    n = model.cfg.n_layers
    cache = mechun.cache_residuals(model, prompts, positions="all", progress=False)
    block_out = {}
    handles = [layer.register_forward_hook(lambda m, i, o, k=k: block_out.__setitem__(k, o[0] if isinstance(o, tuple) else o))
               for k, layer in enumerate(_decoder_layers(ref))]
    with torch.no_grad():
        hf_out = ref(ids, attention_mask=mask, output_hidden_states=True)
    for h in handles:
        h.remove()
    real = mask.bool()
    for layer in range(n):
        ours = cache[layer][real]
        if layer < n - 1:
            theirs = hf_out.hidden_states[layer + 1][real]
        else:  # HF's last hidden state has the final norm applied; the block's own output does not
            theirs = block_out[layer][real]
            assert (hf_out.hidden_states[layer + 1][real] - ours).abs().max() > 1e-3
        assert (ours - theirs).abs().max() < 1e-4, f"layer {layer}"
    logits = model(ids, attention_mask=mask)
    assert (logits[real] - hf_out.logits[real]).abs().max() < 1e-4


def test_save_load_roundtrip(arch_dir, tmp_path):
    model = mechun.load_model(arch_dir, device="cpu")
    out = mechun.save_model(model, tmp_path / "copy")
    again = mechun.load_model(out, device="cpu")
    assert mechun.model_fingerprint(again) == mechun.model_fingerprint(model)
    ids, mask = mechun.tokenize(model, ["w1 w2 w3"])
    assert torch.allclose(model(ids, attention_mask=mask), again(ids, attention_mask=mask), atol=1e-5)


def test_fingerprint_tracks_weights(tiny_organism_dir):
    model = mechun.load_model(tiny_organism_dir, device="cpu")
    fp = mechun.model_fingerprint(model)
    assert fp == mechun.model_fingerprint(mechun.load_model(tiny_organism_dir, device="cpu"))
    w = next(v for k, v in hf_state_dict(model).items() if k.endswith("mlp.c_proj.weight"))
    with torch.no_grad():
        w[0, 0] += 1.0
    assert mechun.model_fingerprint(model) != fp
    with torch.no_grad():
        w[0, 0] -= 1.0


def test_bad_paths_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        mechun.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechunError, match="config.json"):
        mechun.load_model(tmp_path / "empty")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(MechunError, match="directory"):
        mechun.load_model(tmp_path / "f.txt")


def test_hub_name_offline_gives_clear_error():
    with pytest.raises(MechunError, match="hub name"):
        mechun.load_model("someone/definitely-not-cached-model")


def test_save_refuses_nonempty_dir_and_leaves_nothing(tiny_model, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(OutputError, match="not empty"):
        mechun.save_model(tiny_model, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_model_mismatch_error_is_a_mechun_error():
    assert issubclass(ModelMismatchError, MechunError)


def test_hook_kinds_have_one_source_and_bad_kinds_name_them(tmp_path):
    assert set(HOOK_KINDS) == set(_SHORT_HOOKS) and len(HOOK_KINDS) == len(_SHORT_HOOKS)
    assert set(FAST_KINDS) <= set(HOOK_KINDS)
    model = mechun.load_model(random_checkpoint(arch_configs()["gpt2"], tmp_path / "gpt2"), device="cpu")
    for kind in HOOK_KINDS:  # every short kind names a real hook point of the bridge
        assert isinstance(hook_point(model, hook_name(model, kind, 1)), torch.nn.Module)
    with pytest.raises(MechunError, match="hook kind 'resid_pots'") as err:
        hook_name(model, "resid_pots", 0)
    assert all(repr(kind) in str(err.value) for kind in HOOK_KINDS)
