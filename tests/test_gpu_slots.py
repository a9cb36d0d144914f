"""The local executor on a machine with GPUs, faked: ``gpu_slots.visible`` says which GPUs there are, and each
configuration (sweep_helpers' fake opt_mi.py behind a recorder) logs the CUDA_VISIBLE_DEVICES it was started with
when it starts and ends. Replaying those events checks that no GPU ever held more than --jobs-per-gpu
configurations at once."""

import os
from pathlib import Path

import pytest
from sweep_helpers import FakeRunner, Recording, results

from miq.sweep import cli as sweep
from miq.sweep import gpu_slots

# the sweep machinery is under test here, and the report's tables; its figures are rendered in test_report
pytestmark = pytest.mark.usefixtures("unrendered_figures")

METHODS = ("--methods", "dense magnitude sparsegpt uniform g128 perchannel")  # 6 configurations
ORDER = ["dense", "magnitude_s0.5", "sparsegpt_s0.5", "uniform_s0.5_w4", "g128_s0.5_w4", "perchannel_s0.5_w4"]

@pytest.fixture
def recording(tmp_path) -> Recording:
    return Recording(FakeRunner(str(tmp_path / "fake"), sleep=0.2))


def sweep_with_gpus(monkeypatch, capsys, out: Path, runner, gpus: list[str], *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(gpu_slots, "visible", lambda: list(gpus))
    capsys.readouterr()
    rc = sweep.main(["--out", str(out), *METHODS, *args], runner=runner)
    return rc, *capsys.readouterr()


def test_one_gpu_per_job(tmp_path, monkeypatch, capsys, recording):
    rc, stdout, stderr = sweep_with_gpus(monkeypatch, capsys, tmp_path / "out", recording, ["0", "1"], "--jobs", "2")
    assert rc == 0, stderr
    assert "2 at a time on GPU(s) 0,1" in stdout
    got, most = recording.replay()
    assert set(got) == set(ORDER) == set(results(tmp_path / "out"))
    assert most == 1, "two configurations shared a GPU"
    assert (got["dense"], got["magnitude_s0.5"]) == ("0", "1")  # the first two, in turn
    assert set(got.values()) == {"0", "1"}  # 6 configurations on 2 GPUs: their slots were given back and reused


def test_jobs_per_gpu(tmp_path, monkeypatch, capsys, recording):
    rc, _, stderr = sweep_with_gpus(monkeypatch, capsys, tmp_path / "out", recording, ["2", "5"], "--jobs", "4",
                                    "--jobs-per-gpu", "2")
    assert rc == 0, stderr
    got, most = recording.replay()
    assert most <= 2 and set(got.values()) <= {"2", "5"}
    assert [got[i] for i in ORDER[:4]] == ["2", "5", "2", "5"]  # spread over the GPUs before doubling up


def test_more_jobs_than_gpu_slots_is_refused(tmp_path, monkeypatch, capsys, recording):
    rc, stdout, stderr = sweep_with_gpus(monkeypatch, capsys, tmp_path / "out", recording, ["0", "1"], "--jobs", "3")
    assert rc == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert "--jobs 3: this machine has 2 GPU(s) (0,1) and --jobs-per-gpu 1 lets 2" in stderr
    assert not (tmp_path / "out").exists() and not recording.events.exists()


def test_on_cpu_no_gpu_is_set_and_threads_are_split(tmp_path, monkeypatch, capsys, recording):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rc, _, stderr = sweep_with_gpus(monkeypatch, capsys, tmp_path / "out", recording, [], "--jobs", "2")
    assert rc == 0, stderr
    got, _ = recording.replay()
    assert set(got.values()) == {"-"}
    threads = {line.split()[3] for line in recording.events.read_text().splitlines()}
    assert threads == {str(max(1, (os.cpu_count() or 1) // 2))}


@pytest.mark.parametrize("mask, expected", [("2,3", ["2", "3"]), ("", []), ("-1", []), ("0,-1,2", ["0"]),
                                            ("GPU-8a1b,MIG-77", ["GPU-8a1b", "MIG-77"]), (" 1 , 0", ["1", "0"])])
def test_visible_follows_cuda_visible_devices(monkeypatch, mask, expected):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
    monkeypatch.setattr(gpu_slots, "device_count", lambda: 8)  # CUDA here: the mask decides
    assert gpu_slots.visible() == expected


def test_visible_counts_the_devices_without_a_mask(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_slots, "device_count", lambda: 3)
    assert gpu_slots.visible() == ["0", "1", "2"]


def test_slots_are_handed_out_in_turn():
    slots = gpu_slots.GpuSlots(["a", "b"], 2)
    taken = [slots.take() for _ in range(4)]
    assert taken == ["a", "b", "a", "b"] and slots.free == []
    slots.give_back("b")
    assert slots.take() == "b"


def test_help_names_the_new_flags(capsys):
    assert sweep.main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--executor", "--jobs-per-gpu", "--slurm-partition", "--slurm-gpus-per-job", "--slurm-time",
                 "--slurm-mem", "--slurm-array-parallelism", "--slurm-extra", "--no-wait"):
        assert flag in text
