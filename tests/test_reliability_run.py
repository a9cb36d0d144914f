"""One run under bad input and faults, the classes of issue 30: nothing the user owns is lost (files added to
a saved folder, a file or folder behind a symlink), every failure is one line with the documented exit code
and leaves nothing (the disk full in each save format, a full $TMPDIR, the layers' temporary folder removed,
a wrong shard index, a task's missing ``!function`` module, SIGTERM repeated), a model read from a
compressed-tensors folder saves a folder that reopens, and valid input is accepted (a JSON line holding
U+2028, the ``--target-bpw`` values the refusals suggest)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from forked import ONE_SERVER, paused
from run_helpers import FAST, TASK_YAML, check_one_line, cloze_docs, snapshot
from safetensors.torch import load_file, save_file

import datautils
import opt_mi
from miq.errors import ConfigError
from miq.model import loading
from miq.run import config, outputs, saving, target, task_plan
from miq.synthetic import synthetic_text


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working folder with the eval text, and $TMPDIR inside the test's folder (a run's miq-layers-*)."""
    (tmp_path / "work").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    (tmp_path / "work" / "short_eval.txt").write_text(synthetic_text("test")[:3000])
    return tmp_path / "work"


def run(*flags: str, model: str = "toy") -> int:
    return opt_mi.main([model, "synthetic", *FAST, *flags])


def nothing_left(work: Path, *kept: str) -> None:
    assert sorted(snapshot(work)) == sorted(["short_eval.txt", *kept])
    assert not list((work.parent / "tmp").glob("miq-layers-*"))


# ----------------------------------------------------------------------------------------------------------
# 1. what the user put in a saved folder is never replaced with it


def test_a_second_save_keeps_the_files_the_user_added(work, capsys):
    assert run("--sparsity", "0.5", "--save", "m") == 0
    (work / "m" / "notes.txt").write_text("my notes")
    (work / "m" / "evals").mkdir()
    (work / "m" / "evals" / "hellaswag.json").write_text("{}")
    before = snapshot(work)
    capsys.readouterr()
    code = run("--sparsity", "0.5", "--save", "m")
    line = check_one_line(capsys.readouterr().err, code, 2, ("--save m", "evals", "notes.txt"))
    assert "did not write" in line and snapshot(work) == before


def test_files_added_while_the_run_works_are_kept(work, capsys, monkeypatch):
    """Checked again at publishing: the user's file put there meanwhile stays, with the old folder; exit 1."""
    assert run("--sparsity", "0.5", "--save", "m", "--json", "r.json") == 0
    real = saving.write

    def meanwhile(*args, **kwargs):
        (work / "m" / "notes.txt").write_text("added during the run")
        return real(*args, **kwargs)

    monkeypatch.setattr(saving, "write", meanwhile)
    before = {k: v for k, v in snapshot(work).items() if k != "m"}  # the folder's mtime: notes.txt comes
    capsys.readouterr()
    code = run("--sparsity", "0.5", "--save", "m", "--json", "r.json")
    check_one_line(capsys.readouterr().err, code, 1, ("--save m", "notes.txt", "nothing was written"))
    after = {k: v for k, v in snapshot(work).items() if k != "m"}
    assert after.pop("m/notes.txt") and after == before
    (work / "m" / "notes.txt").unlink()
    monkeypatch.setattr(saving, "write", real)
    monkeypatch.setattr(outputs, "write_json", lambda path, obj: (work / "r.json").write_text("user's") or
                        Path(path).write_text("{}"))
    code = run("--sparsity", "0.5", "--json", "r.json")
    check_one_line(capsys.readouterr().err, code, 1, ("--json r.json", "did not write"))
    assert (work / "r.json").read_text() == "user's" and not [n for n in os.listdir(work) if ".tmp" in n]


# ----------------------------------------------------------------------------------------------------------
# 3. symlinked outputs are written through, never replaced


def test_outputs_through_symlinks_write_the_targets_and_keep_the_links(work, capsys):
    real = work / "real"
    real.mkdir()
    os.symlink(real / "model", work / "m")
    os.symlink(real / "r.json", work / "r.json")
    os.symlink(real / "analysis", work / "an")
    (real / "model").mkdir()
    (real / "analysis").mkdir()
    flags = ["--wbits", "4", "--groups", "4", "--prune_only", "fc1", "--bit-alloc", "uniform"]
    for _ in range(2):  # a new target, then one the toolkit wrote
        assert run(*flags, "--save", "m", "--json", "r.json", "--analysis-dir", "an") == 0
        for link in ("m", "r.json", "an"):
            assert (work / link).is_symlink()
        assert (real / "model" / "miq_save.json").is_file() and (real / "analysis" / "mi_matrix.png").is_file()
        assert json.loads((real / "r.json").read_text())["ppl"]
        assert not [n for n in snapshot(work) if ".tmp" in n]
    os.symlink(work / "nowhere" / "x", work / "dangling")
    os.symlink(work / "loop", work / "loop")
    capsys.readouterr()
    for flag in ("--save", "--json"):
        for link in ("dangling", "loop"):
            code = run("--sparsity", "0.5", flag, link)
            check_one_line(capsys.readouterr().err, code, 2, (f"{flag} {link}", "symlink", "cannot be written"))
    assert (work / "dangling").is_symlink() and not (work / "nowhere").exists() and (work / "loop").is_symlink()


# ----------------------------------------------------------------------------------------------------------
# 4. every failure one line, its exit code, nothing left


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail (EFBIG), as on a full disk: in every writer, the libraries' own
    (safetensors' Rust writer raises SafetensorError, not OSError)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("fmt", ["packed", "compressed-tensors", "dense"])
def test_a_full_disk_while_saving_is_one_line_exit_1_and_leaves_nothing(fmt, work, capsys):
    capsys.readouterr()
    with file_size_limit(300_000):  # above a layer's temporary file, below the saved weights
        code = run("--wbits", "4", "--save", "out/m", "--save-format", fmt, "--json", "out/r.json")
    check_one_line(capsys.readouterr().err, code, 1, ("could not write the outputs", "File too large",
                                                      "nothing was written"))
    nothing_left(work)


def test_a_full_tmpdir_under_load_layers_is_one_line_exit_2(work, capsys):
    capsys.readouterr()
    with file_size_limit(50_000):
        code = run("--wbits", "4", "--load", "layers", "--json", "r.json")
    check_one_line(capsys.readouterr().err, code, 2, ("--load layers", "could not keep", "File too large"))
    nothing_left(work)


def test_the_layers_temporary_folder_removed_during_evaluation_is_one_line(work, capsys, monkeypatch):
    real = opt_mi.evaluate

    def cleaned(*args, **kwargs):  # a tmp cleaner passes between compression and evaluation
        for d in (work.parent / "tmp").glob("miq-layers-*"):
            shutil.rmtree(d)
        return real(*args, **kwargs)

    monkeypatch.setattr(opt_mi, "evaluate", cleaned)
    capsys.readouterr()
    code = run("--sparsity", "0.5", "--load", "layers", "--json", "r.json")
    check_one_line(capsys.readouterr().err, code, 2, ("--load layers", "could not be read back"))
    nothing_left(work)


def _sharded_toy(toy: str, dst: Path) -> Path:
    """The toy's weights in two shards with their index."""
    shutil.copytree(toy, dst)
    w = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: w[n] for n in part}, str(dst / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_a_shard_index_naming_the_wrong_shard_is_refused_before_work(toy_path, work, capsys, monkeypatch):
    good = _sharded_toy(toy_path, work.parent / "sharded")
    src, _ = loading.open_source(str(good))
    loading.check_weights(src, loading.skeleton(src))  # the right index passes
    index = json.loads((good / "model.safetensors.index.json").read_text())
    name = "model.decoder.layers.1.fc2.weight"
    index["weight_map"][name] = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    (good / "model.safetensors.index.json").write_text(json.dumps(index))
    monkeypatch.setattr(opt_mi, "load_model", lambda *a, **k: pytest.fail("work began"))
    capsys.readouterr()
    code = run("--sparsity", "0.5", model=str(good))
    check_one_line(capsys.readouterr().err, code, 2, (f"tensor {name} is not where",))


def test_a_task_function_module_missing_is_refused_before_work(work, capsys, monkeypatch):
    pytest.importorskip("lm_eval")
    docs = cloze_docs(8)
    (work.parent / "cloze.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    body = TASK_YAML.format(data=work.parent / "cloze.jsonl")
    (work.parent / "fn.yaml").write_text(body + "process_docs: !function gone_utils.process_docs\n")
    monkeypatch.setattr(opt_mi, "load_model", lambda *a, **k: pytest.fail("work began"))
    capsys.readouterr()
    code = run("--sparsity", "0.5", "--tasks", str(work.parent / "fn.yaml"))
    check_one_line(capsys.readouterr().err, code, 2, ("!function gone_utils.process_docs", "gone_utils.py"))
    (work.parent / "gone_utils.py").write_text("def other(docs):\n    return docs\n")
    with pytest.raises(ConfigError, match="has no function process_docs"):
        task_plan.plan([str(work.parent / "fn.yaml")])
    (work.parent / "gone_utils.py").write_text("def process_docs(docs):\n    return docs\n")
    assert task_plan.plan([str(work.parent / "fn.yaml")]).names == ("miq_cloze",)


@pytest.mark.slow
@ONE_SERVER
@pytest.mark.parametrize("step, pauses", [("load_model", (0.0, 0.001, 0.01)), ("write", (0.0, 0.0, 0.002, 0.05)),
                                          ("write_json", (0.0005, 0.0005, 0.0005, 0.0005, 0.0005))])
def test_repeated_sigterm_is_one_line_exit_130_and_leaves_nothing(tmp_path, step, pauses):
    """SIGTERM again and again, while the run unwinds from the first (removing what it staged): 130, one
    line, no staging folder and no miq-layers-* left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p, work = paused(tmp_path, step, "--load", "layers", env={**os.environ, "TMPDIR": str(tmp)})
    for pause in (0.0, *pauses):
        time.sleep(pause)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert check_one_line(err, p.returncode, 130) == "opt_mi.py: interrupted"
    assert sorted(snapshot(work)) == ["short_eval.txt"] and not list(tmp.glob("miq-layers-*"))


# ----------------------------------------------------------------------------------------------------------
# 5. a model read from a compressed-tensors folder saves a folder that reopens with the run's perplexity


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["packed", "dense", "compressed-tensors"])
def test_a_compressed_tensors_model_compressed_again_saves_a_folder_that_reopens(fmt, work, capsys):
    ct = ["--wbits", "4", "--groupsize", "16", "--sym", "--act-order"]
    assert run(*ct, "--save", "ct", "--save-format", "compressed-tensors") == 0
    assert run(*ct, "--save", "again", "--save-format", fmt, "--json", "r.json", model="ct") == 0
    ppl = json.loads((work / "r.json").read_text())["ppl"]
    saved = json.loads((work / "again" / "config.json").read_text())
    assert ("quantization_config" in saved) == (fmt == "compressed-tensors")  # no stale scheme kept
    assert run("--json", "reopened.json", model="again") == 0, capsys.readouterr().err
    assert json.loads((work / "reopened.json").read_text())["ppl"] == ppl
    # the plain model computes what the library's own (decompressing on its first forward) computes
    from transformers import AutoModelForCausalLM

    plain = loading.load_model(loading.open_source(str(work / "ct"))[0], "auto", torch.device("cpu"))
    library = AutoModelForCausalLM.from_pretrained(str(work / "ct"), dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    assert not [n for n, _ in plain.named_parameters() if "weight_scale" in n or "weight_packed" in n]
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, library(ids).logits)


# ----------------------------------------------------------------------------------------------------------
# 6. valid input accepted; flags that would be ignored refused; 7. the threads recorded


def test_a_json_line_holding_u2028_is_read(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n" +
                    json.dumps({"text": "three\u2029four\x85five"}, ensure_ascii=False) + "\r\n", encoding="utf-8")
    text = datautils.read_text_file(str(path))
    assert "one\u2028two" in text and "three\u2029four\x85five" in text


def _linears(*shapes: tuple[int, int]) -> dict[str, torch.nn.Linear]:
    return {f"l{i}": torch.nn.Linear(c, r, bias=False, device="meta") for i, (r, c) in enumerate(shapes)}


def _suggested(argv: list[str], chosen, total: int) -> str:
    with pytest.raises(ConfigError) as e:
        target.resolve(config.parse(argv), chosen, total)
    return str(e.value)


@pytest.mark.parametrize("choices", ["4", "2,3,4"])
def test_target_bpw_suggestions_are_accepted(choices, toy_path):
    """What a --target-bpw refusal suggests is accepted in turn: the range's ends, or --wbits for one width."""
    chosen, total = _linears((64, 64), (256, 64), (64, 256)), 64 * 64 + 2 * 256 * 64 + 1000
    base = [toy_path, "synthetic", "--sparsity", "0.5", "--groups", "4", "--bits-choices", choices]
    for asked in ("0.5", "15.5"):
        line = _suggested([*base, "--target-bpw", asked], chosen, total)
        if "," not in choices:
            assert "give --wbits 4 instead of --target-bpw" in line
            assert config.parse([*base, "--wbits", "4"]).wbits == 4
            continue
        low, high = (float(x) for x in line.split("stores ")[1].split(" bpw")[0].split(" to "))
        assert low <= high, line
        for value in (low, high, float(line.rsplit(" ", 1)[1])):
            cfg = target.resolve(config.parse([*base, "--target-bpw", str(value)]), chosen, total)
            assert 2 <= cfg.wbits <= 4


def test_the_compressed_tensors_refusal_of_target_bpw_suggests_what_is_accepted(toy_path):
    argv = [toy_path, "synthetic", "--groups", "4", "--target-bpw", "3", "--save", "x"]
    with pytest.raises(ConfigError) as e:
        config.parse([*argv, "--save-format", "compressed-tensors"])
    assert "use --save-format packed" in str(e.value) and "--bit-alloc uniform" not in str(e.value)
    assert config.parse([*argv, "--save-format", "packed"]).save_format == "packed"


def test_save_format_without_save_is_refused(toy_path):
    with pytest.raises(ConfigError, match="^--save-format dense: .*give --save DIR"):
        config.parse([toy_path, "synthetic", "--sparsity", "0.5", "--save-format", "dense"])


def test_the_result_records_threads_and_device():
    env = outputs.env_info(torch.device("cpu"))
    assert env["threads"] == torch.get_num_threads() and env["device"] == "cpu"

