"""Bad input to `slimc quant` / `slimc eval` / `slimc-opt`: one-line errors before the long work,
no data loss from --save / --overwrite, no leftovers, saved files with the umask's modes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimc.tools.cli import main
from tests.models import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the CLI gets as far as loading the model's weights."""
    import slimc.data

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(slimc.data, "load_causal_lm", refuse)


def one_error(capsys: pytest.CaptureFixture[str], prog: str = "slimc") -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{prog}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0].removeprefix(f"{prog}: error: ")


def quant(model_dir: Path, *extra: str) -> list[str]:
    return ["quant", "--model", str(model_dir), "--quant-type", "w8a16", *extra]


# -- data loss: --save / --overwrite -----------------------------------------------------------
@pytest.fixture
def user_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory (tmp/home/work/sub) holding the user's files, HOME = tmp/home."""
    home = tmp_path / "home"
    cwd = home / "work" / "sub"
    cwd.mkdir(parents=True)
    for d in (home, home / "work", cwd):
        (d / "notes.txt").write_text("user data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize(
    ("save", "message"),
    [
        (".", "it is the working directory"),
        ("", "cannot save to an empty path"),
        ("..", "it is a parent of the working directory"),
        ("~", "it is the home directory"),
        ("HOME", "it is the home directory"),
    ],
)
def test_overwrite_never_replaces_the_working_or_home_directory(
    model_dir, user_cwd, no_model_load, capsys, save, message
) -> None:
    target = str(user_cwd.parent.parent) if save == "HOME" else save
    assert main(quant(model_dir, "--save", target, "--overwrite")) == 1
    assert message in one_error(capsys)
    home = user_cwd.parent.parent
    for d in (home, home / "work", user_cwd):
        assert (d / "notes.txt").read_text() == "user data"


def test_overwrite_never_replaces_a_directory_that_is_not_a_model(
    model_dir, tmp_path, no_model_load, capsys
) -> None:
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"\xff\xd8")
    (target / "config.json").write_text("{}")  # a config alone is not a model
    assert main(quant(model_dir, "--save", str(target), "--overwrite")) == 1
    assert "does not look like a model directory" in one_error(capsys)
    assert (target / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_overwrite_never_replaces_the_input_model(model_dir, tmp_path, no_model_load, capsys):
    source = tmp_path / "float-model"
    shutil.copytree(model_dir, source)
    assert main(quant(source, "--save", str(source), "--overwrite")) == 1
    assert "it holds the input model" in one_error(capsys)
    assert main(quant(source, "--save", str(tmp_path), "--overwrite")) == 1  # its parent
    assert "it holds the input model" in one_error(capsys)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in model_dir.iterdir())


def test_overwrite_replaces_a_model_directory(model_dir, tmp_path, capsys) -> None:
    target = tmp_path / "previous"
    shutil.copytree(model_dir, target)
    (target / "stale.txt").write_text("from the previous run")
    assert main(quant(model_dir, "--save", str(target), "--overwrite")) == 0, capsys.readouterr()
    assert not (target / "stale.txt").exists()
    config = json.loads((target / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize("target", ["/proc/self/slimc-out", "/sys/slimc-out"])
def test_special_save_paths_are_refused_before_loading(
    model_dir, no_model_load, capsys, target
) -> None:
    assert main(quant(model_dir, "--save", target)) == 1
    assert "cannot create files in" in one_error(capsys)


def test_failed_quant_leaves_no_empty_parent(model_dir, tmp_path, monkeypatch, capsys) -> None:
    from slimc.errors import UserError
    from slimc.export import compressed_tensors

    def disk_full(*args, **kwargs):
        raise UserError("disk full")

    monkeypatch.setattr(compressed_tensors, "save_compressed_tensors", disk_full)
    assert main(quant(model_dir, "--save", str(tmp_path / "out" / "deeper" / "x"))) == 1
    assert one_error(capsys) == "disk full"
    assert not (tmp_path / "out").exists()
    assert main(quant(model_dir, "--ignore", "typo", "--save", str(tmp_path / "out" / "x"))) == 1
    assert not (tmp_path / "out").exists()


# -- save leftovers and modes ------------------------------------------------------------------
def test_leftover_of_a_killed_save_is_cleaned_at_the_next_save(tmp_path: Path) -> None:
    from slimc.export.atomic import atomic_directory

    target = tmp_path / "model"
    code = (
        "import sys, time\n"
        "from slimc.export.atomic import atomic_directory\n"
        f"with atomic_directory({str(target)!r}) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert proc.stdout.readline().strip() == "writing"
        leftovers = list(tmp_path.glob(".model.slimc-tmp-*"))
        assert len(leftovers) == 1
        live = tmp_path / ".model.slimc-tmp-1-abcd"  # pid 1 runs: another save in progress
        live.mkdir()
        with atomic_directory(target) as tmp:  # the killed writer still runs: kept
            (tmp / "a").write_text("1")
        assert leftovers[0].exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    old = tmp_path / ".model.slimc-tmp-nopid"  # an old name without a pid, two days old
    old.mkdir()
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    shutil.rmtree(target)
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
    assert not leftovers[0].exists() and not old.exists()
    assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.slimc-tmp-1-abcd", "model"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(model_dir, tmp_path, capsys, umask) -> None:
    old = os.umask(umask)
    try:
        assert main(quant(model_dir, "--save", str(tmp_path / "out" / "m"))) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    out = tmp_path / "out" / "m"
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (out / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


# -- arguments checked before the model loads --------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--calib-samples", "0", "--eval", "1"], "argument --calib-samples: expected a positive"),
        (["--eval", "-3"], "argument --eval: expected a number of windows >= 0, got -3"),
        (["--group-size", "0", "--eval", "1"], "argument --group-size: expected -1 (per output"),
        (["--group-size", "-5", "--eval", "1"], "argument --group-size: expected -1 (per output"),
        (["--ignore", "--eval", "1"], "argument --ignore: expected at least one argument"),
        (["--calib-seq-len", "0", "--eval", "1"], "argument --calib-seq-len: expected a positive"),
    ],
)
def test_bad_numbers_are_refused_at_parse_time(model_dir, capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quant", "--model", str(model_dir), "--quant-type", "w4a16", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_windows_zero_is_refused_at_parse_time(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--windows", "0"])
    assert "argument --windows: expected a positive number of windows" in capsys.readouterr().err


def test_more_eval_windows_than_the_text_has_is_refused_before_loading(
    model_dir, no_model_load, capsys
) -> None:
    assert main(quant(model_dir, "--eval", "100000")) == 1
    assert "asked for 100000 windows of 512 tokens" in one_error(capsys)
    text = model_dir.parent / "short.txt"
    text.write_text("the quick brown fox " * 10)
    assert main(["eval", "--model", str(model_dir), "--text", str(text), "--windows", "1"]) == 1
    assert "fewer than one 512-token window" in one_error(capsys)


def test_group_size_option_in_a_pipeline_is_checked() -> None:
    from slimc.errors import PipelineError
    from slimc.pass_manager import PassManager

    for pipeline in ("w4a16{group-size=0}", "linear-quant{scheme=w4a16 group-size=-5}"):
        with pytest.raises(PipelineError, match="expected -1 .per output channel. or a positive"):
            PassManager.parse(pipeline)
    with pytest.raises(PipelineError, match="'group-size' of pass 'awq'"):
        PassManager.parse("w4a16-awq{group-size=0}")
    assert PassManager.parse("w4a16{group-size=-1}").steps[0].group_size == -1


def test_missing_tokenizer_files_are_named(model_dir, tmp_path, capsys) -> None:
    bare = tmp_path / "no-tokenizer"
    tiny_llama().save_pretrained(bare)
    assert main(quant(bare, "--eval", "1")) == 1
    message = one_error(capsys)
    assert message.startswith(f"model directory {bare} has no tokenizer files")
    assert message.endswith(f"tokenizer.save_pretrained('{bare}')")


def test_already_quantized_checkpoint_is_named(model_dir, tmp_path, no_model_load, capsys):
    quantized = tmp_path / "quantized"
    shutil.copytree(model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (quantized / "config.json").write_text(json.dumps(config))
    assert main(quant(quantized, "--save", str(tmp_path / "again"))) == 1
    assert "is already quantized (quantization_config: quant_method=compressed-tensors)" in (
        one_error(capsys)
    )


def test_cache_directory_that_is_a_file_or_unwritable(model_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "cache-file"
    blocker.write_text("")
    for cache, reason in ((blocker, "it is a file"), ("/proc/self/slimc-cache", "No such file")):
        monkeypatch.setenv("SLIMC_CACHE", str(cache))
        assert main(quant(model_dir, "--eval", "1")) == 1
        message = one_error(capsys)
        assert message.startswith(f"cannot use the cache directory {cache} (SLIMC_CACHE): ")
        assert reason in message


# -- --ignore ----------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["lmhead", "["])
def test_ignore_glob_matching_no_linear_is_an_error(model_dir, tmp_path, capsys, pattern) -> None:
    assert main(quant(model_dir, "--ignore", pattern, "--save", str(tmp_path / "q"))) == 1
    assert one_error(capsys).startswith(f"--ignore {pattern!r} matches no linear of the model")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("flags", "ignored"),
    [
        ([], ("lm_head",)),
        (["--no-ignore"], ()),
        (["--ignore", ""], ()),
        (["--ignore", "*o_proj"], ("*o_proj",)),
    ],
)
def test_ignore_nothing_is_expressible(flags, ignored) -> None:
    import slimc
    from slimc.nn import QuantizedLinear
    from slimc.pass_manager import PassManager
    from slimc.tools.cli import build_pipeline, make_parser

    args = make_parser().parse_args(["quant", "--quant-type", "w8a16", "--eval", "1", *flags])
    steps = PassManager.parse(build_pipeline(args)).steps
    assert steps[0].ignore == ignored
    q = slimc.compile(tiny_llama(layers=1), steps)
    quantized = {n for n, m in q.named_modules() if isinstance(m, QuantizedLinear)}
    assert ("lm_head" in quantized) == (ignored != ("lm_head",))
    assert len(quantized) == 8 - len(ignored)  # 7 per layer + lm_head, minus what is ignored


# -- slimc-opt ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("output", "message"), [("/proc/self/x.pt2", "cannot create files in")])
def test_opt_output_path_checked_before_the_pipeline(
    slimc_opt, model_dir, tmp_path, output, message
) -> None:
    for out, expected in ((output, message), (str(tmp_path), "is a directory")):
        res = slimc_opt(str(model_dir), "-p", "w8a16", "-o", out)
        assert res.rc == 1 and res.out == ""  # the IR is not printed: the pipeline did not run
        lines = [ln for ln in res.err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in res.err, res.err
        assert lines[0].startswith("slimc-opt: error: -o: ") and expected in lines[0]


def test_opt_refuses_an_already_quantized_checkpoint(slimc_opt, model_dir, tmp_path) -> None:
    shutil.copytree(model_dir, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq"}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    res = slimc_opt(str(tmp_path / "q"), "-p", "w8a16")
    assert res.rc == 1 and "is already quantized (quantization_config: quant_method=awq)" in res.err


# -- evaluation progress and the summary ---------------------------------------------------------
def test_evaluation_logs_progress_lines_without_a_terminal(monkeypatch, caplog) -> None:
    import torch

    from slimc import evaluate

    monkeypatch.setattr(evaluate, "PROGRESS_LOG_SECONDS", 0.0)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    model = lambda ids: torch.zeros(1, ids.shape[1], 16)  # noqa: E731
    with caplog.at_level("INFO", logger="slimc.evaluate"):
        evaluate.perplexity(model, torch.arange(400) % 16, windows=3, seqlen=100)
    lines = [r.getMessage() for r in caplog.records if "windows, running PPL" in r.getMessage()]
    assert lines == [
        f"perplexity: {i}/3 windows, running PPL 16.000, {s}" for i, s in ((1, "0 s"), (2, "0 s"))
    ]


def test_summary_peak_rss_is_taken_after_the_save(model_dir, tmp_path, monkeypatch, capsys):
    import slimc.export
    from slimc.tools import cli

    saved: list[bool] = []
    real_save = slimc.export.save

    def save(*args, **kwargs):
        saved.append(True)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(slimc.export, "save", save)
    monkeypatch.setattr(cli, "peak_rss_mb", lambda: 2000.0 if saved else 1000.0)
    assert main(quant(model_dir, "--save", str(tmp_path / "q"))) == 0
    row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("w8a16"))
    assert row.split()[-1] == "2000"


def test_console_script_errors_are_one_line(tmp_path: Path) -> None:
    exe = shutil.which("slimc")
    cmd = [exe] if exe else [sys.executable, "-m", "slimc.tools.cli"]
    proc = subprocess.run(
        [*cmd, "quant", "--quant-type", "w8a16", "--save", ".", "--overwrite"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"slimc: error: cannot save to {tmp_path}: it is the working directory; "
        "give a new directory"
    )


# -- slimc.compile arguments -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "passes", "message"),
    [
        ("tiny", 123, 'pipeline as a string ("w8a8-dynamic") or a list of passes, got int 123'),
        ("tiny", ["w8a16", 3], "pipeline items must be pass objects or strings, got 3"),
        ("org/name", "w8a16", "not the path 'org/name'; a local model directory is needed"),
        (42, "w8a16", "needs an nn.Module as the model, got int"),
    ],
)
def test_compile_arguments_are_checked(model, passes, message) -> None:
    import slimc
    from slimc.errors import UserError

    with pytest.raises(UserError) as exc:
        slimc.compile(tiny_llama(layers=1) if model == "tiny" else model, passes)
    assert message in str(exc.value)


def test_compile_on_a_local_directory_path_says_how_to_load_it(model_dir) -> None:
    import slimc
    from slimc.errors import UserError

    with pytest.raises(UserError, match=r"load it first: model, tokenizer = slimc\.data\.load_"):
        slimc.compile(str(model_dir), "w8a16")


def test_compile_refuses_compiled_and_quantized_models() -> None:
    import slimc
    from slimc.errors import UserError

    model = tiny_llama(layers=1)
    compiled = slimc.compile(model, "w8a16")
    with pytest.raises(UserError, match="already compiled by slimc .model.layers.0.self_attn.q"):
        slimc.compile(compiled, "lower-cpu")
    model.config.quantization_config = {"quant_method": "gptq"}
    with pytest.raises(UserError, match=r"already quantized \(quantization_config: quant_meth"):
        slimc.compile(model, "w8a16")


def test_save_api_never_replaces_the_directory_the_model_came_from(model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    import slimc
    from slimc.errors import UserError

    source = tmp_path / "float-model"
    shutil.copytree(model_dir, source)
    q = slimc.compile(AutoModelForCausalLM.from_pretrained(source), "w8a16")
    with pytest.raises(UserError, match="it holds the input model"):
        slimc.save(q, source, overwrite=True)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in model_dir.iterdir())
