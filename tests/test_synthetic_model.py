"""tools/make_synthetic_llama.py: a sharded random Llama that transformers loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slimc.tools import make_synthetic_llama as synth
from tests.models import tiny_tokenizer

TINY_ARGS = ["--layers", "2", "--hidden", "64", "--ffn", "128", "--heads", "4", "--kv-heads", "2"]


@pytest.fixture
def tokenizer_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small stand-in for the packaged SmolLM2 directory (its tokenizer and token ids)."""
    src = tmp_path / "source"
    tiny_tokenizer().save_pretrained(src)
    config = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    monkeypatch.setattr(synth, "tokenizer_source", lambda: (src, config))
    return src


def test_two_layer_model_loads_in_transformers_with_one_shard_per_layer(
    tmp_path, tokenizer_source
) -> None:
    out = tmp_path / "synthetic"
    assert synth.main([*TINY_ARGS, "--vocab", "128", "--out", str(out)]) == 0

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards: dict[str, set[str]] = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, set()).add(name)
    assert sorted(shards) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for i in (0, 1):
        names = shards[f"model-0000{i + 1}-of-00003.safetensors"]
        assert len(names) == 9 and all(n.startswith(f"model.layers.{i}.") for n in names)
    assert shards["model-00003-of-00003.safetensors"] == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }
    data_bytes = 0
    for shard in shards:
        with safe_open(out / shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = f.get_tensor(name)
                assert t.dtype == torch.bfloat16, name
                data_bytes += t.numel() * t.element_size()
                if "norm" in name:
                    assert torch.equal(t, torch.ones_like(t)), name
                else:
                    assert 0.015 < t.float().std().item() < 0.025, name
    assert index["metadata"]["total_size"] == data_bytes

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["vocab_size"] == 128
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.bfloat16 and len(model.model.layers) == 2
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = AutoTokenizer.from_pretrained(out)("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 128)
    assert torch.isfinite(logits).all() and logits.float().std() > 0


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path) -> None:
    args = [*TINY_ARGS, "--layers", "1", "--vocab", "128", "--no-tokenizer"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert synth.main([*args, "--seed", seed, "--out", str(tmp_path / name)]) == 0
    shard = "model-00001-of-00002.safetensors"
    a, b, c = ((tmp_path / n / shard).read_bytes() for n in "abc")
    assert a == b and a != c
    assert not (tmp_path / "a" / "tokenizer.json").exists()


def test_vocab_that_does_not_match_the_tokenizer_is_refused(
    tmp_path, tokenizer_source, capsys
) -> None:
    out = tmp_path / "synthetic"
    assert synth.main([*TINY_ARGS, "--vocab", "256", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--vocab 256 does not match" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_head_count_is_refused(tmp_path, capsys) -> None:
    argv = [*TINY_ARGS, "--heads", "5", "--no-tokenizer", "--out", str(tmp_path / "m")]
    assert synth.main(argv) == 1
    assert "--hidden 64 is not a multiple of --heads 5" in capsys.readouterr().err


def test_defaults_are_the_engine_benchmark_model_of_about_3_8_gb() -> None:
    args = synth.make_parser().parse_args(["--out", "x"])
    shape = (args.hidden, args.ffn, args.layers, args.heads, args.kv_heads, args.vocab)
    assert shape == (2560, 6912, 24, 20, 4, 49152) and args.dtype == "bfloat16"
    specs = [
        s
        for i in range(args.layers)
        for s in synth.layer_tensors(i, args.hidden, args.ffn, args.heads, args.kv_heads)
    ] + synth.outer_tensors(args.hidden, args.vocab)
    assert 3.7e9 < 2 * sum(s.numel for s in specs) < 3.9e9


def test_experts_make_a_qwen3_moe_that_transformers_loads_whole(tmp_path, tokenizer_source) -> None:
    out = tmp_path / "moe"
    args = [*TINY_ARGS, "--vocab", "128", "--experts", "4", "--experts-per-token", "2"]
    assert synth.main([*args, "--out", str(out)]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in index["weight_map"]
    assert "model.layers.0.self_attn.q_norm.weight" in index["weight_map"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    experts = model.model.layers[1].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (4, 256, 64)  # every expert's weights loaded
    assert 0.015 < experts.down_proj.float().std().item() < 0.025
    assert model.config.num_experts_per_tok == 2
    assert synth.main([*args, "--experts-per-token", "5", "--out", str(tmp_path / "x")]) == 1
