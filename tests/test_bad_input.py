"""Bad input as a careless user gives it: every case prints one line on stderr, exits 2 (130 for an
interrupt), shows no traceback, and leaves no new or changed file or folder in the working folder.

The cases are data (``CASES``: flags, output paths, data files, model folders), run in-process through
``opt_mi.main`` in a working folder holding every prepared file (``workdir``); the interrupts run
``opt_mi.py`` in a process of its own. Valid edge inputs, which must still run, are at the end.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from forked import ONE_SERVER, paused
from run_helpers import FAST, GROUPED, ROOT, RUN, check_one_line, snapshot
from safetensors.torch import load_file, save_file

import opt_mi
from miq.run import preflight
from miq.synthetic import synthetic_text


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # MODEL DATASET [flags]; FAST is appended, so later flags given here win
    expect: tuple[str, ...] = ()  # pieces of the error line
    memory: int | None = None  # bytes preflight sees as available (None: the machine's)


def case(id: str, *argv: str, expect: tuple[str, ...] = (), memory: int | None = None) -> Case:
    return Case(id, argv, expect, memory)


T = ("toy", "synthetic")
CASES = [
    # --- numbers: NaN, inf, ranges, sizes beyond memory
    case("wbits-nan", *T, "--wbits", "nan", expect=("--wbits nan", "finite")),
    case("wbits-inf", *T, "--wbits", "inf", expect=("--wbits inf", "finite")),
    case("wbits-neg-inf", *T, "--wbits=-inf", expect=("--wbits -inf",)),
    case("wbits-1", *T, "--wbits", "1", expect=("--wbits 1", "2..8")),
    case("wbits-fraction-no-groups", *T, "--wbits", "3.5", expect=("--wbits 3.5", "--groups")),
    case("percdamp-nan", *T, "--sparsity", "0.5", "--percdamp", "nan", expect=("--percdamp nan", "finite")),
    case("percdamp-inf", *T, "--percdamp", "inf", expect=("--percdamp inf",)),
    case("percdamp-zero", *T, "--percdamp", "0", expect=("--percdamp 0.0", "[1e-12, 100]")),
    case("percdamp-huge", *T, "--percdamp", "1e9", expect=("--percdamp 1000000000.0", "[1e-12, 100]")),
    case("percdamp-underflows", *T, "--sparsity", "0.5", "--percdamp", "1e-300", expect=("--percdamp 1e-300",)),
    case("bits-choices-beyond-8", *T, *GROUPED, "--bits-choices", "2,4,16", expect=("--bits-choices", "1..8")),
    case("dataset-records-all-empty", "toy", "empty.jsonl", expect=("empty.jsonl", "empty")),
    case("mi-alpha-nan", *T, *GROUPED, "--mi-alpha", "nan", expect=("--mi-alpha nan", "finite")),
    case("mi-alpha-negative", *T, *GROUPED, "--mi-alpha", "-1", expect=("--mi-alpha -1.0", ">= 0")),
    case("sparsity-nan", *T, "--sparsity", "nan", expect=("--sparsity nan",)),
    case("sparsity-negative", *T, "--sparsity", "-0.5", expect=("--sparsity -0.5", "[0, 1)")),
    case("seed-negative-groups", *T, *GROUPED, "--seed", "-1", expect=("--seed -1", "0..4294967295")),
    case("seed-2-32", *T, "--seed", str(2**32), expect=("--seed 4294967296",)),
    case("seed-not-int", *T, "--seed", "1.5", expect=("--seed", "1.5")),
    case("nsamples-zero", *T, "--nsamples", "0", expect=("--nsamples 0", "at least 1")),
    case("nsamples-beyond-memory", *T, "--nsamples", "1000000000", expect=("--nsamples 1000000000", "memory")),
    case("nsamples-beyond-int32", *T, "--nsamples", str(2**31), expect=("--nsamples 2147483648", "at most")),
    case("seqlen-1", *T, "--seqlen", "1", expect=("--seqlen 1", "at least 2")),
    case("seqlen-beyond-positions", *T, "--seqlen", "100000", expect=("--seqlen 100000", "positions")),
    case("blocksize-zero", *T, "--blocksize", "0", expect=("--blocksize 0",)),
    case("groupsize-zero", *T, "--wbits", "4", "--groupsize", "0", expect=("--groupsize 0",)),
    case("groupsize-huge", *T, "--wbits", "4", "--groupsize", str(2**40), expect=("--groupsize", "at most")),
    case("eval-batch-zero", *T, "--eval-batch", "0", expect=("--eval-batch 0",)),
    case("mi-samples-1", *T, *GROUPED, "--mi-samples", "1", expect=("--mi-samples 1", "at least 2")),
    case("mi-bins-1", *T, *GROUPED, "--mi-bins", "1", expect=("--mi-bins 1", "at least 2")),
    case("mi-bins-beyond-memory", *T, *GROUPED, "--mi-bins", "1000000", expect=("--mi-bins 1000000", "memory")),
    case("mi-samples-beyond-memory", *T, *GROUPED, "--nsamples", "64", "--seqlen", "128", "--mi-samples", "8192",
         memory=60 << 20, expect=("--mi-samples 8192", "memory")),
    # --- n:m against the model's widths and the block
    case("nm-width-not-multiple", *T, "--prunen", "2", "--prunem", "3", expect=("2:3", "64 input columns")),
    case("nm-m-beyond-width", *T, "--prunen", "1", "--prunem", "1000", expect=("1:1000", "not a multiple")),
    case("nm-block-not-multiple", *T, "--prunen", "2", "--prunem", "4", "--blocksize", "6",
         expect=("--blocksize 6", "--prunem 4")),
    case("nm-n-only", *T, "--prunen", "2", expect=("--prunen/--prunem 2:0",)),
    case("nm-n-above-m", *T, "--prunen", "3", "--prunem", "2", expect=("3:2", "N < M")),
    case("nm-and-sparsity", *T, "--prunen", "2", "--prunem", "4", "--sparsity", "0.5", expect=("--sparsity",)),
    # --- inconsistent flags, choices, devices
    case("groups-without-wbits", *T, "--groups", "8", expect=("--groups 8", "--wbits")),
    case("groups-negative", *T, "--wbits", "4", "--groups", "-3", expect=("--groups -3",)),
    case("bits-choices-decreasing", *T, *GROUPED, "--bits-choices", "4,2", expect=("--bits-choices",)),
    case("gmp-alone", *T, "--gmp", expect=("--gmp", "nothing to prune")),
    case("gmp-with-groups", *T, *GROUPED, "--gmp", expect=("--groups 4", "--gmp")),
    case("device-nonsense", *T, "--device", "nonsense", expect=("--device 'nonsense'", "cpu, cuda")),
    case("device-mps", *T, "--device", "mps", expect=("--device 'mps'",)),
    case("device-empty", *T, "--device", "", expect=("--device ''",)),
    case("device-absent-gpu", *T, "--device", "cuda:99", expect=("--device cuda:99",)),
    case("unknown-flag", *T, "--bogus", expect=("--bogus",)),
    case("bad-choice", *T, "--strategy", "both", expect=("--strategy", "both")),
    case("dtype-float64", *T, "--dtype", "float64", expect=("--dtype", "float64")),
    case("no-dataset", "toy", expect=("dataset",)),
    # --- no silent no-ops
    case("eval-commas", *T, "--eval", ",,", expect=("--eval ',,'", "no eval set")),
    case("eval-empty", *T, "--eval", "", expect=("--eval ''",)),
    case("eval-unknown", *T, "--eval", "synthetic,bogus", expect=("--eval", "bogus")),
    case("prune-only-nothing", *T, "--sparsity", "0.5", "--prune_only", "nosuchname",
         expect=("--prune_only 'nosuchname'", "nothing would be compressed")),
    case("min-above-max", *T, "--sparsity", "0.5", "--minlayer", "5", "--maxlayer", "2",
         expect=("--minlayer 5 --maxlayer 2", "selects none")),
    case("invert-all", *T, "--wbits", "4", "--invert", expect=("--invert", "selects none")),
    case("gmp-selects-nothing", *T, "--sparsity", "0.5", "--gmp", "--maxlayer", "0", expect=("--maxlayer 0",)),
    case("plot-layer-unknown", *T, *GROUPED, "--plot-layer", "nosuch.layer", expect=("--plot-layer nosuch.layer",)),
    case("plot-layer-not-compressed", *T, *GROUPED, "--prune_only", "fc1", "--plot-layer",
         "model.decoder.layers.0.fc2", expect=("--plot-layer model.decoder.layers.0.fc2", "not among")),
    # --- output paths, checked before any work
    case("json-in-proc", *T, "--json", "/proc/r.json", expect=("--json /proc/r.json", "cannot write")),
    case("json-onto-folder", *T, "--json", "adir", expect=("--json adir", "is a folder")),
    case("json-under-file", *T, "--json", "afile/r.json", expect=("--json afile/r.json", "is a file")),
    case("json-onto-device", *T, "--json", "/dev/null", expect=("--json /dev/null", "not a regular file")),
    case("json-onto-dataset", "toy", "good.txt", "--json", "good.txt", expect=("--json good.txt", "DATASET")),
    case("json-onto-eval", *T, "--json", "short_eval.txt", expect=("--json short_eval.txt", "--eval")),
    case("json-inside-save", *T, "--save", "m", "--json", "m/r.json", expect=("--json m/r.json", "--save")),
    case("save-onto-file", *T, "--save", "afile", expect=("--save afile", "is a file")),
    case("save-onto-other-folder", *T, "--save", "adir", expect=("--save adir", "did not save")),
    # --- never destroy what is not the toolkit's own: other models, model files, files it did not write
    case("save-onto-another-model", *T, "--save", "gpt2ish", expect=("--save gpt2ish", "did not save")),
    case("save-onto-another-full-model", *T, "--save", "notokenizer", expect=("--save notokenizer", "did not save")),
    case("json-onto-another-models-config", *T, "--json", "gpt2ish/config.json",
         expect=("--json gpt2ish/config.json", "did not write")),
    case("json-onto-a-text-file", *T, "--json", "afile", expect=("--json afile", "did not write")),
    case("json-onto-model-config", "toycopy", "synthetic", "--json", "toycopy/config.json",
         expect=("--json toycopy/config.json", "MODEL")),
    case("json-onto-model-weights", "toycopy", "synthetic", "--json", "toycopy/model.safetensors",
         expect=("--json toycopy/model.safetensors", "MODEL")),
    case("save-inside-model", "toycopy", "synthetic", "--save", "toycopy/out",
         expect=("--save toycopy/out", "inside the MODEL")),
    case("analysis-inside-model", "toycopy", "synthetic", *GROUPED, "--analysis-dir", "toycopy/an",
         expect=("--analysis-dir toycopy/an", "inside the MODEL")),
    case("save-onto-dataset-folder", "toy", "adir/keep.txt", "--save", "adir", expect=("--save adir", "DATASET")),
    case("save-in-proc", *T, "--save", "/proc/m", expect=("--save /proc/m", "cannot write")),
    case("save-onto-model", "toycopy", "synthetic", "--save", "toycopy", expect=("--save toycopy", "MODEL")),
    case("save-under-file", *T, "--save", "afile/m", expect=("--save afile/m", "is a file")),
    case("analysis-onto-file", *T, *GROUPED, "--analysis-dir", "afile", expect=("--analysis-dir afile", "is a file")),
    case("analysis-in-proc", *T, *GROUPED, "--analysis-dir", "/proc/an", expect=("--analysis-dir /proc/an",)),
    case("analysis-is-json", *T, *GROUPED, "--json", "r.json", "--analysis-dir", "r.json",
         expect=("--analysis-dir r.json",)),
    # --- data that is missing, too short, or not text
    case("dataset-unknown", "toy", "nosuchset", expect=("nosuchset", "wikitext2")),
    case("dataset-missing-file", "toy", "missing.txt", expect=("missing.txt", "not found")),
    case("dataset-folder", "toy", "adir/", expect=("adir", "folder")),
    case("dataset-nul-bytes", "toy", "nul.txt", expect=("nul.txt", "NUL")),
    case("eval-nul-bytes", *T, "--eval", "nul.txt", expect=("nul.txt", "NUL")),
    case("dataset-control-chars", "toy", "ctl.txt", expect=("ctl.txt", "control character U+0001")),
    case("dataset-escape-bytes", "toy", "esc.txt", expect=("esc.txt", "U+001B")),
    case("dataset-latin1", "toy", "latin1.txt", expect=("latin1.txt", "UTF-8")),
    case("dataset-empty", "toy", "empty.txt", expect=("empty.txt", "tokens")),
    case("dataset-too-short", "toy", "good.txt", "--seqlen", "128", expect=("good.txt", "seqlen=128")),
    case("dataset-bad-jsonl", "toy", "bad.jsonl", expect=("bad.jsonl:2", "JSON")),
    case("dataset-json-no-text", "toy", "notext.json", expect=("notext.json", "record 0")),
    # --- model folders
    case("model-missing", "./nope", "synthetic", expect=("MODEL ./nope", "not found")),
    case("model-is-file", "afile", "synthetic", expect=("MODEL afile", "a file")),
    case("model-no-config", "adir", "synthetic", expect=("MODEL adir", "config.json")),
    case("model-bad-json", "badjson", "synthetic", expect=("MODEL badjson",)),
    case("model-not-opt", "gpt2ish", "synthetic", expect=("gpt2", "not OPT")),
    case("model-no-weights", "noweights", "synthetic", expect=("MODEL noweights", "no weights")),
    case("model-no-tokenizer", "notokenizer", "synthetic", expect=("MODEL notokenizer", "tokenizer")),
    case("model-vocab-too-small", "smallvocab", "synthetic", expect=("MODEL smallvocab", "vocab_size")),
    case("model-heads-not-dividing", "badheads", "synthetic", expect=("MODEL badheads", "config.json")),
    case("model-zero-layers", "nolayers", "synthetic", expect=("MODEL nolayers", "no decoder layers")),
    case("model-hidden-mismatch", "badhidden", "synthetic",
         expect=("MODEL badhidden", "tensor model.decoder.", "config.json implies")),
    case("model-ffn-mismatch", "badffn", "synthetic",
         expect=("tensor model.decoder.layers.0.fc1.", "is [256", "implies [128")),
    case("model-missing-tensor", "notensor", "synthetic",
         expect=("tensor model.decoder.layers.1.fc2.weight is missing",)),
    case("model-truncated", "truncated", "synthetic", expect=("MODEL truncated", "truncated")),
    case("model-garbage-weights", "garbage", "synthetic", expect=("MODEL garbage", "safetensors")),
    # --- a model that does not load whole never runs (transformers would only warn, and invent what is missing)
    case("model-missing-bias", "nobias", "synthetic", expect=("tensor model.decoder.layers.0.fc1.bias", "missing")),
    case("model-missing-norm", "nonorm", "synthetic",
         expect=("tensor model.decoder.final_layer_norm.weight", "missing", "(1 of")),
    case("model-extra-layer-dropped", "fewerlayers", "synthetic",
         expect=("tensor model.decoder.layers.1.", "belongs to no part", "16 such tensors")),
    case("model-layer-invented", "morelayers", "synthetic", expect=("tensor model.decoder.layers.2.", "missing")),
    case("model-family-relabelled", "relabelled", "synthetic", expect=("MODEL relabelled", "missing")),
    case("model-pickled-missing-tensor", "pickled", "synthetic", expect=("MODEL pickled", "is missing")),
    # --- a saved folder that changed after it was written (every format: the sha256s of miq_save.json)
    case("saved-dense-flipped-byte", "savedflip", "synthetic", expect=("MODEL savedflip", "model.safetensors changed")),
    case("saved-dense-file-missing", "savedgone", "synthetic", expect=("MODEL savedgone", "tokenizer.json is missing")),
    case("flag-no-effect-groupsize", *T, "--sparsity", "0.5", "--groupsize", "32", expect=("--groupsize 32",)),
    case("flag-no-effect-percdamp-gmp", *T, "--sparsity", "0.5", "--gmp", "--percdamp", "0.1",
         expect=("--percdamp 0.1", "--gmp")),
    case("flag-no-effect-cluster-no-groups", *T, "--wbits", "4", "--cluster", "range", expect=("--cluster range",)),
    case("model-nan-dense", "nanmodel", "synthetic", expect=("tensor model.decoder.layers.1.fc2.weight", "NaN")),
    case("model-nan-magnitude", "nanmodel", "synthetic", "--sparsity", "0.5", "--gmp", expect=("NaN",)),
    case("model-nan-sparsegpt", "nanmodel", "synthetic", "--sparsity", "0.5", expect=("NaN",)),
]


# ----------------------------------------------------------------------------------------------------------
# the working folder: every file the cases name


def _model_copy(toy: Path, dst: Path, config: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(toy, dst)
    for f in drop:
        (dst / f).unlink()
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


def _weights(dst: Path, edit) -> None:
    w = load_file(str(dst / "model.safetensors"))
    edit(w)
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})


def _write_files(d: Path) -> None:
    (d / "adir").mkdir()
    (d / "adir" / "keep.txt").write_text("not a model")
    (d / "afile").write_text("a file")
    (d / "good.txt").write_text(synthetic_text("train")[:400])
    (d / "short_eval.txt").write_text(synthetic_text("test")[:3000])
    (d / "nul.txt").write_bytes(b"\0" * 200_000)
    (d / "ctl.txt").write_text("the cat sat \x01 on the mat " * 200)
    (d / "esc.txt").write_text("colour \x1b[31mred\x1b[0m " * 200)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 200)
    (d / "empty.txt").write_text("")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (d / "notext.json").write_text('[{"body": "no text field"}]')
    (d / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')


def _write_models(d: Path, toy: Path) -> None:
    _model_copy(toy, d / "toycopy")
    (d / "badjson").mkdir()
    (d / "badjson" / "config.json").write_text("{not json")
    (d / "gpt2ish").mkdir()
    (d / "gpt2ish" / "config.json").write_text('{"model_type": "gpt2"}')
    _model_copy(toy, d / "noweights", drop=("model.safetensors",))
    _model_copy(toy, d / "notokenizer", drop=("tokenizer.json", "tokenizer_config.json"))
    _model_copy(toy, d / "smallvocab", {"vocab_size": 100})
    _model_copy(toy, d / "badheads", {"num_attention_heads": 5})
    _model_copy(toy, d / "nolayers", {"num_hidden_layers": 0})
    _model_copy(toy, d / "badhidden", {"hidden_size": 32, "word_embed_proj_dim": 32})
    _model_copy(toy, d / "badffn", {"ffn_dim": 128})
    _weights(_model_copy(toy, d / "notensor"), lambda w: w.pop("model.decoder.layers.1.fc2.weight"))
    _weights(_model_copy(toy, d / "nobias"), lambda w: w.pop("model.decoder.layers.0.fc1.bias"))
    _weights(_model_copy(toy, d / "nonorm"), lambda w: w.pop("model.decoder.final_layer_norm.weight"))
    _model_copy(toy, d / "fewerlayers", {"num_hidden_layers": 1})
    _model_copy(toy, d / "morelayers", {"num_hidden_layers": 3})
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "intermediate_size": 256,
             "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 256}
    _model_copy(toy, d / "relabelled", llama)
    saved = d / "savedflip"
    assert opt_mi.main(["toy", "synthetic", "--nsamples", "4", "--seqlen", "32", "--eval", "synthetic",
                        "--sparsity", "0.5", "--save", str(saved), "--save-format", "dense"]) == 0
    shutil.copytree(saved, d / "savedgone")
    (d / "savedgone" / "tokenizer.json").unlink()
    data = bytearray((saved / "model.safetensors").read_bytes())
    data[-5] ^= 1
    (saved / "model.safetensors").write_bytes(bytes(data))
    pickled = _model_copy(toy, d / "pickled", drop=("model.safetensors",))
    w = load_file(str(toy / "model.safetensors"))
    w.pop("model.decoder.layers.1.fc2.weight")
    torch.save(w, pickled / "pytorch_model.bin")
    _weights(_model_copy(toy, d / "nanmodel"), lambda w: w["model.decoder.layers.1.fc2.weight"].view(-1)[7:8].fill_(
        float("nan")))
    data = (_model_copy(toy, d / "truncated") / "model.safetensors").read_bytes()
    (d / "truncated" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (_model_copy(toy, d / "garbage") / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory, toy_path) -> Path:
    d = tmp_path_factory.mktemp("bad_input")
    _write_files(d)
    _write_models(d, Path(toy_path))
    return d


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(c: Case, workdir, capsys, monkeypatch):
    monkeypatch.chdir(workdir)
    if c.memory is not None:
        monkeypatch.setattr(preflight, "available_memory", lambda dev=None: c.memory)
    before = snapshot(workdir)
    capsys.readouterr()
    code = opt_mi.main([*c.argv[:2], *FAST, *c.argv[2:]] if len(c.argv) >= 2 else list(c.argv))
    out, err = capsys.readouterr()
    line = check_one_line(err, code, 2, c.expect)
    assert line.startswith("opt_mi.py: error: "), line
    assert out == ""
    assert snapshot(workdir) == before


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--json", "out/r.json"], ["--save", "out/m", "--json", "out/r.json"]])
def test_disk_full_at_publishing_is_one_line_exit_1_and_leaves_nothing(flags, tmp_path, capsys, monkeypatch):
    """The work is done, its outputs cannot be written: exit 1 (not 2: nothing was wrong with the input)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short_eval.txt").write_text(synthetic_text("test")[:3000])
    real = os.replace

    def full(src, dst, *a, **kw):
        if os.path.basename(str(dst)) == "r.json":  # the JSON's rename onto its target: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full)
    code = opt_mi.main(["toy", "synthetic", *FAST, "--sparsity", "0.5", *flags])
    line = check_one_line(capsys.readouterr().err, code, 1, ("could not write the outputs", "No space left"))
    assert line.startswith("opt_mi.py: error: ") and sorted(snapshot(tmp_path)) == ["short_eval.txt"]


def test_the_toy_cache_is_never_an_output(toy_path, tmp_path, capsys, monkeypatch):
    """--save, --json or --analysis-dir into a cached toy is refused before any work; the toy is untouched."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short_eval.txt").write_text(synthetic_text("test")[:3000])
    before = snapshot(Path(toy_path))
    for flag, target in [("--save", toy_path), ("--json", f"{toy_path}/config.json"),
                         ("--analysis-dir", f"{toy_path}/an")]:
        code = opt_mi.main(["toy", "synthetic", *FAST, *GROUPED, flag, target])
        line = check_one_line(capsys.readouterr().err, code, 2, (flag, "toy cache"))
        assert "inside the toy cache" in line or "overwrite the toy cache" in line
    assert snapshot(Path(toy_path)) == before


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------------------------------------
# interrupts: opt_mi.main in a process of its own (forked.Paused), paused at a chosen step until the signal comes


@pytest.mark.slow
@ONE_SERVER
@pytest.mark.parametrize("step, sig", [("load_model", signal.SIGINT), ("write", signal.SIGTERM),
                                       ("write_json", signal.SIGINT)])
def test_interrupt_is_one_line_exit_130_and_leaves_nothing(tmp_path, step, sig):
    """Interrupted at work (the model loaded), with the model staged, and with every output staged (JSON last)."""
    p, work = paused(tmp_path, step)
    if step != "load_model":
        assert any(".tmp" in n for n in snapshot(work)), "nothing was staged when the signal came"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert check_one_line(err, p.returncode, 130) == "opt_mi.py: interrupted"
    assert sorted(snapshot(work)) == ["short_eval.txt"]


@pytest.mark.slow
def test_interrupt_while_importing_is_one_line_exit_130(tmp_path):
    p = subprocess.Popen([sys.executable, str(ROOT / "opt_mi.py"), "toy", "synthetic", *RUN], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # the imports (torch) take seconds
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert check_one_line(err, p.returncode, 130) == "opt_mi.py: interrupted"
    assert list(tmp_path.iterdir()) == []


def _result(path: Path) -> dict:
    r = json.loads(path.read_text())
    r.pop("timing")
    for layer in r["layers"]:
        layer.pop("timing")
    return r


@pytest.mark.slow
@ONE_SERVER
def test_killed_run_is_cleaned_up_and_repeated_runs_are_bit_identical(tmp_path, capsys, monkeypatch):
    """A run killed with SIGKILL while saving leaves its staged folder (nothing can remove it then); the next
    run removes it, publishes, and a second run gives the same JSON (timings aside) and the same weights."""
    p, work = paused(tmp_path, "write")
    p.kill()
    p.communicate(timeout=60)
    assert [n for n in snapshot(work) if n.startswith("out/.model.")], "the killed run left nothing to clean"
    monkeypatch.chdir(work)
    results, weights, files = [], [], []
    for _ in range(2):
        assert opt_mi.main(["toy", "synthetic", *RUN]) == 0
        results.append(_result(work / "out" / "r.json"))
        # every saved file, byte for byte (and every tensor, to name the first difference)
        model_dir = work / "out" / "model"
        weights.append({(f.name, k): v for f in sorted(model_dir.glob("*.safetensors"))
                        for k, v in load_file(str(f)).items()})
        files.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(model_dir.iterdir())})
        names = sorted(snapshot(work / "out"))
        assert not [n for n in names if ".tmp" in n], names
    assert results[0] == results[1] and weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert files[0] == files[1] and "miq_save.json" in files[0]
    assert {"analysis", "model", "r.json"} <= set(names)
    assert "warning" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# valid edge inputs: they run


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--sparsity", "0.5", "--wbits", "4", "--groups", "100000", "--prune_only", "fc1",
                                    "--bit-alloc", "uniform", "--analysis-dir", "an"],
                                   ["--sparsity", "0.5", "--eval-batch", "100000"],
                                   ["--sparsity", "0.5", "--blocksize", "100000"],
                                   ["--sparsity", "0.5", "--wbits", "4", "--dtype", "float16"],
                                   ["--sparsity", "0.5", "--wbits", "4", "--groups", "4", "--dtype", "bfloat16"],
                                   ["--sparsity", "0.99999"],
                                   ["--prunen", "2", "--prunem", "4", "--blocksize", "100"],
                                   ["--wbits", "4", "--groups", "4", "--prune_only", "q_proj", "--bit-alloc", "uniform",
                                    "--analysis-dir", "an"],
                                   ["--sparsity", "0.5", "--plot-layer", "model.decoder.layers.0.fc1"]],
                         ids=["groups-100000", "eval-batch-100000", "blocksize-beyond-width", "float16-on-cpu",
                              "bfloat16-on-cpu", "sparsity-0.99999", "nm-block-at-least-width",
                              "default-plot-layer-not-compressed", "plot-layer-without-figures"])
def test_valid_edge_inputs_run(flags, tmp_path, monkeypatch, capsys):
    """They run, compress something, evaluate to a finite perplexity, and draw what an --analysis-dir asks for;
    --plot-layer in a run without figures is a warning (a sweep's --extra reaches every configuration)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "short_eval.txt").write_text(synthetic_text("test")[:3000])
    assert opt_mi.main(["toy", "synthetic", *FAST, *flags, "--json", "r.json"]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["ppl"]["short_eval.txt"] is not None
    assert r["layers"], "nothing was compressed"
    assert bool(r["figures"]) == ("--groups" in flags)  # MI-grouped runs draw (--analysis-dir default: analysis)
    assert all((tmp_path / f).is_file() for f in r["figures"])
    assert ("warning: --plot-layer" in capsys.readouterr().err) == ("--plot-layer" in flags)


CASE_MARK = "<<next case>>"
# opt_mi.main on each argv of a JSON list in turn, its output after a mark on stderr, its exit code on stdout
ONE_PROCESS = f"""
import contextlib, json, sys
import opt_mi
for argv in json.loads(sys.argv[1]):
    print({CASE_MARK!r}, file=sys.stderr, flush=True)
    with contextlib.redirect_stdout(sys.stderr):
        code = opt_mi.main(argv)
    sys.stderr.flush()
    print(code, flush=True)
"""


@pytest.mark.slow
def test_a_tenth_of_the_matrix_again_under_another_thread_count(workdir, tmp_path, capsys):
    """A seeded tenth of the cases, run again in a process of its own with OMP_NUM_THREADS=1 (the first as
    the command line, the others one after another in one fresh interpreter, which spares ten starts): the
    same exit code, the same line, the victims untouched; and a valid run gives the same results and the same
    bytes under 1 thread (that interpreter's last case) and under 2 (a process of its own)."""
    picked = random.Random(19).sample([c for c in CASES if c.memory is None], len(CASES) // 10)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argvs = [[*c.argv[:2], *FAST, *c.argv[2:]] if len(c.argv) >= 2 else list(c.argv) for c in picked]
    expected = []
    for argv in argvs:
        os.chdir(workdir)
        expected.append((opt_mi.main(argv), capsys.readouterr().err.strip()))
    before = snapshot(workdir)
    p = subprocess.run([sys.executable, str(ROOT / "opt_mi.py"), *argvs[0]], cwd=workdir, env=env,
                       capture_output=True, text=True)
    assert (p.returncode, p.stderr.strip()) == expected[0], picked[0].id

    def valid(out: Path) -> list[str]:  # outside workdir, whose snapshot must not change
        return ["toy", "synthetic", *FAST, *GROUPED, "--save", str(out / "m"), "--json", str(out / "r.json"),
                "--analysis-dir", ""]

    p = subprocess.run([sys.executable, "-c", ONE_PROCESS, json.dumps([*argvs[1:], valid(tmp_path / "threads1")])],
                       cwd=workdir, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, check=True)
    lines = [part.strip() for part in p.stderr.split(CASE_MARK)[1:]]
    assert list(zip(map(int, p.stdout.split()), lines, strict=True))[:-1] == expected[1:], [c.id for c in picked]
    assert int(p.stdout.split()[-1]) == 0, lines[-1]
    assert snapshot(workdir) == before
    subprocess.run([sys.executable, str(ROOT / "opt_mi.py"), *valid(tmp_path / "threads2")], cwd=workdir,
                   env={**env, "OMP_NUM_THREADS": "2"}, check=True, capture_output=True)
    results, files, losses = [], [], []
    for out in (tmp_path / "threads1", tmp_path / "threads2"):
        results.append({k: v for k, v in _result(out / "r.json").items() if k not in ("env", "config")})
        losses.append([layer.pop("loss") for layer in results[-1]["layers"]])
        files.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in (out / "m").iterdir()
                      if f.name not in ("quantization.json", "miq_save.json")})  # they name the run's paths
    assert results[0] == results[1] and files[0] == files[1]  # weights, plans, perplexities, bits, bytes
    for a, b in zip(losses[0], losses[1], strict=True):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-3) for k in a)
