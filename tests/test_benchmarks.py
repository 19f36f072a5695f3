"""The benchmark scripts run: the GPU benchmark end to end on a tiny Mistral on the CPU (so it works the day a GPU is
lent), and wrap_model, which it builds its 7B model through."""

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import VOCAB, arch_configs

import mechun
from mechun.errors import MechunError

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_benchmark_runs_on_cpu_with_a_tiny_mistral(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu

    out = gpu.main(["--shape", "mistral-tiny", "--device", "cpu", "--prompts", "20", "--repeats", "1",
                    "--json", str(tmp_path / "gpu.json")])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["shape"] == "mistral-tiny" and saved["device"] == "cpu"
    for key in ("caching", "activation_patching", "attribution_patching", "cache_1k", "rmu_step"):
        assert key in saved
    a = out["activation_patching"]
    assert a["layers"] == 4 and a["positions"] == 16
    assert 0 < a["max_abs_difference"] < 1e-4 < a["score_range"]  # the partial path, agreeing with TL
    assert saved["cache_1k"]["prompts"] == 20 and saved["total_s"] > 0
    sys.modules.pop("gpu", None)
    sys.modules.pop("common", None)


def test_wrap_model_bridges_an_in_memory_model_and_refuses_what_it_cannot_hook():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                  eos_token="<eos>")
    cfg = arch_configs()["llama-gqa"]
    hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        expected = hf(ids).logits
    model = mechun.wrap_model(hf, tok)
    assert torch.allclose(model(ids), expected, atol=1e-5)
    assert "blocks.1.hook_resid_post" in model.hook_dict
    sdpa = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with pytest.raises(MechunError, match="attn_implementation='eager'"):
        mechun.wrap_model(sdpa, tok)


def test_speed_benchmark_runs_on_the_tiny_organism(tiny_organism_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import speed

    threads = torch.get_num_threads()
    try:
        out = speed.main(["--organism", str(tiny_organism_dir), "--only", "organism", "--repeats", "1",
                          "--threads", str(threads), "--json", str(tmp_path / "speed.json")])["organism"]
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "speed.json").read_text())["organism"] == out
    assert out["activation_patching"]["max_abs_difference"] < 1e-4
    assert out["activation_patching"]["positions"] == 16
    assert out["attribution_patching"]["positions"] == 64
    assert all(v > 0 for v in (out["caching"]["ratio"], out["activation_patching"]["speedup"],
                               out["attribution_patching"]["ratio"]))
    sys.modules.pop("speed", None)
    sys.modules.pop("common", None)


def test_benchmarks_never_replace_an_existing_json(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu
    import speed

    mine = tmp_path / "mine.json"
    mine.write_text("my numbers")
    for main in (gpu.main, speed.main):
        with pytest.raises(SystemExit, match="already exists; pass a new path"):
            main(["--json", str(mine)])
    assert mine.read_text() == "my numbers"
    for name in ("gpu", "speed", "common"):
        sys.modules.pop(name, None)
