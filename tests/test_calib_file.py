"""--calib-data: the user's calibration file (.jsonl / .txt), its errors, and the CLIs using it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimc.calib_file import calibration_file_samples, read_calibration_texts
from slimc.errors import UserError
from slimc.tools.cli import main
from tests.models import tiny_llama, tiny_tokenizer

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny word-level tokenizer, adding BOS (<s>, id 1) as its own special token."""
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in texts))
    return path


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_jsonl_samples_are_tokenized_with_special_tokens_and_truncated(tokenizer, tmp_path):
    texts = ["the quick brown fox", "jumps over the lazy dog again and again", "dog"]
    path = write_jsonl(tmp_path / "c.jsonl", texts)
    samples = calibration_file_samples(tokenizer, path, seqlen=5)
    assert [s.shape[0] for s in samples] == [1, 1, 1]
    assert all(s.dtype == torch.long for s in samples)
    assert samples[0][0].tolist() == [1, *ids(tokenizer, texts[0])]  # BOS from the tokenizer
    assert samples[1][0].tolist() == [1, *ids(tokenizer, texts[1])][:5]  # cut to --calib-seq-len
    assert samples[2][0].tolist() == [1, *ids(tokenizer, "dog")]
    first_two = calibration_file_samples(tokenizer, path, n=2, seqlen=5)
    assert [s.tolist() for s in first_two] == [s.tolist() for s in samples[:2]]


def test_txt_samples_are_split_at_blank_lines(tokenizer, tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\nthe quick fox\njumps over\n\n  \t\n\nthe lazy dog\r\n\r\nfox\n")
    texts = read_calibration_texts(path)
    assert [t.text for t in texts] == ["the quick fox\njumps over", "the lazy dog", "fox"]
    lines = ((1, 2), (2, 7), (3, 9))
    assert [t.where for t in texts] == [f"{path} sample {i} (line {n})" for i, n in lines]
    samples = calibration_file_samples(tokenizer, path)
    assert samples[0][0].tolist() == [1, *ids(tokenizer, "the quick fox jumps over")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("c.jsonl", '{"text": "fox"}\n\n{"text": "dog"\n', "c.jsonl line 3: not valid JSON"),
        ("c.jsonl", '{"text": "fox"}\n["dog"]\n', 'c.jsonl line 2: no "text" string'),
        ("c.jsonl", '{"body": "fox"}\n', 'c.jsonl line 1: no "text" string'),
        ("c.jsonl", '{"text": 3}\n', 'c.jsonl line 1: no "text" string'),
        ("c.jsonl", '{"text": "fox"}\n{"text": " \\n "}\n', 'c.jsonl line 2: the "text" is empty'),
        ("c.jsonl", "\n\n", "c.jsonl holds no sample"),
        ("c.txt", " \n\n \n", "c.txt holds no sample"),
        ("c.csv", "text\nfox\n", "c.csv has extension '.csv'; expected .jsonl"),
        ("calib", "fox", "calib has no extension; expected .jsonl"),
    ],
)
def test_bad_files_name_the_problem(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match="^calibration data ") as exc:
        calibration_file_samples(tokenizer, path)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_missing_unreadable_and_short_files(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"calibration data .*missing\.jsonl does not exist"):
        calibration_file_samples(tokenizer, tmp_path / "missing.jsonl")
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        calibration_file_samples(tokenizer, tmp_path / "dir.txt")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="not UTF-8 text"):
        calibration_file_samples(tokenizer, tmp_path / "latin1.txt")
    path = write_jsonl(tmp_path / "two.jsonl", ["fox", "dog"])
    with pytest.raises(UserError, match="holds 2 samples, fewer than the 3 asked for"):
        calibration_file_samples(tokenizer, path, n=3)
    with pytest.raises(UserError, match="at least 1, got 0"):
        calibration_file_samples(tokenizer, path, n=0)


def test_sample_without_tokens_is_named(tmp_path):
    from tokenizers import normalizers

    tok = tiny_tokenizer()  # no BOS, and a normalizer that drops zero-width spaces
    tok.backend_tokenizer.normalizer = normalizers.Replace("\u200b", "")
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fox"}\n{"text": "\\u200b"}\n')
    with pytest.raises(UserError, match=r"c\.jsonl line 2: the sample gives no token"):
        calibration_file_samples(tok, path)


# -- the CLIs ----------------------------------------------------------------------------------
def spy_compile(monkeypatch) -> list[list]:
    import slimc
    from slimc.compiler import compile_model

    seen: list[list] = []

    def spy(model, passes, calib=None, **kwargs):
        seen.append(calib)
        return compile_model(model, passes, calib=calib, **kwargs)

    monkeypatch.setattr(slimc, "compile", spy, raising=False)
    return seen


def test_quant_calibrates_on_the_file(model_dir, tokenizer, tmp_path, monkeypatch, capsys):
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(6)]
    path = write_jsonl(tmp_path / "mine.jsonl", texts)
    seen = spy_compile(monkeypatch)
    argv = ["quant", "--model", str(model_dir), "--quant-type", "w8a8", "--calib-data", str(path)]
    out = tmp_path / "q"
    assert main([*argv, "--calib-samples", "4", "--calib-seq-len", "6", "--save", str(out)]) == 0
    assert "saved compressed-tensors model" in capsys.readouterr().err
    assert [s[0].tolist() for s in seen[0]] == [[1, *ids(tokenizer, t)][:6] for t in texts[:4]]
    assert main([*argv, "--save", str(tmp_path / "all")]) == 0  # default: every sample
    assert len(seen[1]) == 6 and seen[1][0].shape == (1, 9)


def test_quant_refuses_a_bad_file_before_loading(model_dir, tmp_path, monkeypatch, capsys):
    import slimc.data

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(slimc.data, "load_causal_lm", refuse)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fox"}\n{"txt": "dog"}\n')
    argv = ["quant", "--model", str(model_dir), "--quant-type", "w8a8", "--calib-data", str(path)]
    assert main([*argv, "--save", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f'slimc: error: calibration data {path} line 2: no "text" string in {{"txt": "dog"}}'
    ]
    assert not (tmp_path / "q").exists()


def test_out_of_vocabulary_calibration_is_named(tmp_path, capsys):
    """Token ids the model's embedding cannot look up, or no token at all, are named."""
    import slimc

    model = tiny_llama(layers=1)
    with pytest.raises(UserError, match="calibration sample 1 holds token id 300, outside the"):
        slimc.compile(model, "w8a8", calib=[torch.tensor([[1, 2]]), torch.tensor([[3, 300]])])
    with pytest.raises(UserError, match=r"calibration sample 0 is empty \(shape \[1, 0\]\)"):
        slimc.compile(model, "w8a8", calib=[torch.zeros(1, 0, dtype=torch.long)])


def test_opt_reads_the_file(slimc_opt, model_dir, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("the quick brown fox\n\njumps over the lazy dog\n")
    res = slimc_opt(str(model_dir), "-p", "w8a8", "--calib-data", str(path), "--no-loc")
    assert res.rc == 0, res.err
    assert res.out.count("slimc.linear_w8a8(") == 14
    res = slimc_opt(str(model_dir), "-p", "w8a8", "--calib-data", str(path), "--calib-samples", "3")
    assert res.rc == 1 and "holds 2 samples, fewer than the 3 asked for" in res.err
    case = tmp_path / "case.py"
    case.write_text("from tests.models import tiny_mlp\n\ndef build():\n    return tiny_mlp()\n")
    res = slimc_opt(str(case), "-p", "w8a8", "--calib-data", str(path))
    assert res.rc == 1 and "--calib-data needs an HF model directory as INPUT" in res.err
