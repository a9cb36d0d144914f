"""Bad input: one line on stderr naming the flag, the value and what is allowed; exit code 2; no result file."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import opt_mi
from miq.model import loading

ROOT = Path(__file__).resolve().parents[1]


def _fails(capsys, tmp_path, argv: list[str], *expect: str) -> str:
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        code = opt_mi.main(argv + ["--json", str(out)])
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for piece in expect:
        assert piece in err, (piece, err)
    assert not out.exists()
    return err


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["toy", "nosuchset"], ["nosuchset", "wikitext2"]),
        (["toy", "missing_file.txt"], ["missing_file.txt", "not found"]),
        (["toy", "synthetic", "--eval", "synthetic,bogus"], ["--eval", "bogus"]),
        (["toy", "synthetic", "--sparsity", "1.0"], ["--sparsity", "1.0", "[0, 1)"]),
        (["toy", "synthetic", "--sparsity", "-0.1"], ["--sparsity", "-0.1"]),
        (["toy", "synthetic", "--prunen", "2"], ["--prunen", "2:0"]),
        (["toy", "synthetic", "--prunen", "4", "--prunem", "4"], ["4:4", "N < M"]),
        (["toy", "synthetic", "--wbits", "1"], ["--wbits", "1", "2..8"]),
        (["toy", "synthetic", "--wbits", "12"], ["--wbits", "12", "16"]),
        (["toy", "synthetic", "--wbits", "3.5"], ["--wbits", "3.5", "--groups"]),
        (["toy", "synthetic", "--groupsize", "0"], ["--groupsize", "0", "-1"]),
        (["toy", "synthetic", "--groupsize", "-5"], ["--groupsize", "-5"]),
        (["toy", "synthetic", "--nsamples", "0"], ["--nsamples", "0", "at least 1"]),
        (["toy", "synthetic", "--wbits", "4", "--groups", "-3"], ["--groups", "-3"]),
        (["toy", "synthetic", "--wbits", "4", "--groups", "x"], ["--groups", "x"]),
        (["toy", "synthetic", "--groups", "8"], ["--groups", "8", "--wbits"]),
        (["toy", "synthetic", "--wbits", "4", "--groups", "8", "--bits-choices", ""], ["--bits-choices"]),
        (["toy", "synthetic", "--wbits", "4", "--groups", "8", "--bits-choices", "4,2"], ["--bits-choices", "4,2"]),
        (["toy", "synthetic", "--wbits", "4", "--groups", "8", "--bits-choices", "2,x"], ["--bits-choices"]),
        (["toy", "synthetic", "--wbits", "2", "--groups", "8", "--bits-choices", "3,4"], ["--wbits", "2", "[3, 4]"]),
        (["toy", "synthetic", "--wbits", "6", "--groups", "8", "--bits-choices", "2,3,4"], ["--wbits", "6"]),
        (["toy", "synthetic", "--strategy", "both"], ["--strategy", "both"]),
    ],
)
def test_bad_flags(capsys, tmp_path, argv, expect):
    _fails(capsys, tmp_path, argv, *expect)


def test_missing_model_folder(capsys, tmp_path):
    _fails(capsys, tmp_path, [str(tmp_path / "no_model"), "synthetic"], "MODEL", "not found")


def test_not_an_opt_model(capsys, tmp_path):
    d = tmp_path / "gpt2ish"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    _fails(capsys, tmp_path, [str(d), "synthetic"], "gpt2", "not OPT")


def test_seqlen_beyond_model_positions(capsys, tmp_path, toy_path):
    _fails(capsys, tmp_path, [toy_path, "synthetic", "--seqlen", "100000"], "--seqlen", "100000", "positions")


def test_calibration_text_shorter_than_a_window(capsys, tmp_path, toy_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words here")
    _fails(capsys, tmp_path, [toy_path, str(short), "--seqlen", "64", "--eval", str(short)], "short.txt", "64")


@pytest.mark.slow
def test_user_error_has_no_traceback_as_a_process(tmp_path):
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "opt_mi.py", "toy", "synthetic", "--sparsity", "2", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["opt_mi.py: error: --sparsity 2.0: must be in [0, 1)"]
    assert not out.exists()


def test_hub_model_unreachable_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "hub_probe", lambda: "no connection to huggingface.co (test)")
    err = _fails(capsys, tmp_path, ["nonexistent-org/opt-nothing", "synthetic"], "MODEL", "nonexistent-org/opt-nothing",
                 "local model folder")
    assert "no connection" in err


def test_summary_names_the_kept_dtype_and_the_model_time():
    out = {"method": "sparsegpt", "ppl": {"synthetic": 10.0}, "sparsity": 0.5, "zero_fraction": 0.5,
           "config": {"save_format": "packed", "save": ""},
           "bits": {"code_bpw": 8.0, "metadata_bpw": 0.0, "mask_bpw": 1.0, "bpw": 9.0, "compressed_fraction": 1.0,
                    "bpw_compressed": 9.0, "bits_per_kept_weight": 16.0},
           "timing": {"model_s": 133.0, "calibration_s": 1.0, "compress_s": 2.0, "mi_s": 0.0, "cluster_s": 0.0,
                      "alloc_s": 0.0, "prune_s": 2.0, "eval_s": 3.0, "total_s": 139.0}}
    text = opt_mi.summary(out, "float32")
    assert "embeddings, lm_head float32" in text and "fp16" not in text
    assert "model 133.0s" in text and "total 139.0s" in text
