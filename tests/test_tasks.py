"""--tasks: lm-evaluation-harness on the toys, offline, through a local multiple-choice task the tests write.

The task is a cloze over the synthetic test text (held out from the toys' training): the first words of a
sentence, the word that follows as the answer, three other words of the vocabulary as distractors. The
harness's accuracy on the compressed toys must equal an independent computation of the same log-likelihood
comparisons with the model (``direct``); the run's JSON, summary and report carry it; a saved folder
(packed, dense, compressed-tensors) evaluated again gives the run's numbers; what cannot run is one line
and exit 2 before any work.
"""

import json
import math
import socket
import statistics
import sys
from pathlib import Path

import pytest
import torch
from conftest import compress_toy, md_table
from run_helpers import TASK_YAML, cloze_docs
from transformers import AutoModelForCausalLM, AutoTokenizer

import opt_mi
from miq import methods
from miq.errors import ConfigError, DataError, NoEffectError
from miq.model import loading, onload, toy
from miq.report import markdown as report
from miq.report import tasks_table
from miq.report.results import Run, units
from miq.report.verdict import judge
from miq.run import config, task_plan, tasks
from miq.sweep import args as sweep_args

DOCS = 24  # cloze documents in the task file
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "report"


@pytest.fixture(scope="session")
def cloze(tmp_path_factory) -> tuple[str, list[dict]]:
    """(path of the task YAML, its documents): a JSONL of cloze items and a harness task over it."""
    d = tmp_path_factory.mktemp("cloze")
    docs = cloze_docs(DOCS)
    (d / "cloze.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs), encoding="utf-8")
    (d / "cloze.yaml").write_text(TASK_YAML.format(data=d / "cloze.jsonl"), encoding="utf-8")
    return str(d / "cloze.yaml"), docs


@torch.no_grad()
def direct(model, tokenizer, docs: list[dict]) -> tuple[float, float]:
    """(acc, acc_norm) by hand, in float64: a choice's score is the sum of the log-probabilities of its tokens
    given the context (the tokens the context + " " + choice has beyond the context alone); the prediction is
    the argmax of the scores (acc) or of the scores per character of the choice (acc_norm)."""
    acc = norm = 0
    for d in docs:
        ctx = tokenizer(d["context"]).input_ids
        scores = []
        for choice in d["choices"]:
            ids = tokenizer(d["context"] + " " + choice).input_ids
            assert ids[: len(ctx)] == ctx and len(ids) > len(ctx)
            logp = torch.log_softmax(model(torch.tensor([ids]), use_cache=False).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids))))
        acc += max(range(len(scores)), key=scores.__getitem__) == d["label"]
        per_char = [s / len(c) for s, c in zip(scores, d["choices"], strict=True)]
        norm += max(range(len(per_char)), key=per_char.__getitem__) == d["label"]
    return acc / len(docs), norm / len(docs)


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every connection attempt is recorded and refused: local tasks must not try the network."""
    tries = []

    def refuse(*args, **kwargs):
        tries.append(args)
        raise OSError("the tests run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return tries


@pytest.mark.parametrize("name", ["toy", "toy-llama"])
def test_harness_accuracy_equals_the_direct_computation(name, cloze, no_network):
    path, docs = cloze
    model, tokenizer, _, _ = compress_toy(toy.toy_model_path(name=name), "--sparsity", "0.5", "--wbits", "4")
    cfg = config.parse([name, "synthetic", "--tasks", path, "--tasks-batch", "5"])
    block = tasks.evaluate(model, tokenizer, task_plan.prepare(cfg), cfg, torch.device("cpu"))
    r = block["results"]["miq_cloze"]
    acc, acc_norm = direct(model, tokenizer, docs)
    assert (r["acc"], r["acc_norm"]) == (acc, acc_norm)
    assert 0.25 < acc < 1  # the trained toy beats chance (4 choices) and errs: the equality can fail
    assert r["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (DOCS - 1)))  # the harness's sample stderr
    assert (r["samples"], r["n_shot"], r["version"], r["source"]) == (DOCS, 0, 2.0, path)
    assert (block["harness"], block["limit"], block["batch"]) == ("lm-eval", None, 5)
    assert not no_network


def test_a_task_the_harness_cannot_run_is_one_line(toy_path, cloze, monkeypatch):
    """A dataset that cannot be read (here: the harness raising as datasets does offline) names the tasks."""
    import lm_eval

    def unreadable(**kwargs):
        raise FileNotFoundError("Couldn't find a dataset script\nat ...")

    monkeypatch.setattr(lm_eval, "simple_evaluate", unreadable)
    src, tokenizer = loading.open_source(toy_path)
    model = loading.load_model(src, "float32", torch.device("cpu"))
    cfg = config.parse([toy_path, "synthetic", "--tasks", cloze[0]])
    with pytest.raises(DataError, match=r"^--tasks .*cloze.yaml: the harness could not run them \(Couldn't find a "
                                        r"dataset script\)$"):
        tasks.evaluate(model, tokenizer, task_plan.prepare(cfg), cfg, torch.device("cpu"))


FAST = ["--nsamples", "8", "--seqlen", "32", "--analysis-dir", ""]


def run_json(argv: list[str], out: Path) -> dict:
    assert opt_mi.main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["packed", "dense", "compressed-tensors"])
def test_run_json_summary_and_the_saved_folder(fmt, toy_path, cloze, small_eval, tmp_path, capsys, no_network):
    """The run's JSON and summary carry the task; its saved folder gives the same numbers (evaluated again by
    opt_mi.py DIR, or for compressed-tensors, which opt_mi.py does not read, loaded by transformers), and so
    does a direct computation on the folder's model."""
    path, docs = cloze
    limit = 16
    tflags = ["--eval", small_eval, "--tasks", path, "--tasks-limit", str(limit)]
    saved = str(tmp_path / "saved")
    a = run_json([toy_path, "synthetic", *FAST, "--sparsity", "0.5", "--wbits", "4", *tflags, "--save", saved,
                  "--save-format", fmt], tmp_path / "a.json")
    r = a["tasks"]["results"]["miq_cloze"]
    assert (r["samples"], a["tasks"]["limit"]) == (limit, limit)
    assert a["tasks"]["harness_version"] == task_plan.plan([path]).version
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tasks "))
    assert f"miq_cloze acc {r['acc']:.4f} +- {r['acc_stderr']:.4f}" in line and f"first {limit} documents" in line
    assert a["timing"]["tasks_s"] > 0
    if fmt == "packed":  # the report's table carries it
        (tmp_path / "sweep").mkdir()
        (tmp_path / "sweep" / "run.json").write_text(json.dumps(a))
        md = report.build(tmp_path / "sweep", tmp_path / "sweep" / "performance_report.md")
        assert md_table(md, "Zero-shot tasks")[0]["miq_cloze"] == f"{r['acc']:.4f}"

    if fmt == "compressed-tensors":
        model, tokenizer = AutoModelForCausalLM.from_pretrained(saved).eval(), AutoTokenizer.from_pretrained(saved)
        cfg = config.parse([saved, "synthetic", *tflags])
        assert tasks.evaluate(model, tokenizer, task_plan.prepare(cfg), cfg, torch.device("cpu")) == a["tasks"]
    else:
        b = run_json([saved, "synthetic", *FAST, *tflags], tmp_path / "b.json")
        assert b["tasks"] == a["tasks"] and b["ppl"] == a["ppl"]
        src, tokenizer = loading.open_source(saved)
        model = loading.load_model(src, "float32", torch.device("cpu"))
    assert direct(model, tokenizer, docs[:limit]) == (r["acc"], r["acc_norm"])
    assert not no_network


def test_without_the_harness_one_line_and_exit_2_before_any_work(toy_path, cloze, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets where it is not installed

    def work(*args, **kwargs):
        raise AssertionError("work started")

    for where, what in [(opt_mi, "compress"), (opt_mi, "load_model"), (opt_mi.datautils, "get_calibration")]:
        monkeypatch.setattr(where, what, work)
    out = tmp_path / "r.json"
    assert opt_mi.main([toy_path, "synthetic", "--tasks", cloze[0], "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tasks" in err[0] and "pip install 'lm-eval" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(("argv", "expect"), [
    (["--tasks", "missing/task.yaml"], "--tasks missing/task.yaml: no such task file"),
    (["--tasks", "piqa,piqa"], "--tasks piqa: is named twice"),
    (["--tasks", " , "], "names no task"),
    (["--tasks-limit", "5"], "--tasks-limit 5: acts on the harness's tasks; give --tasks"),
    (["--tasks", "piqa", "--tasks-limit", "0"], "--tasks-limit 0: must be at least 1"),
    (["--tasks", "piqa", "--tasks-batch", "0"], "--tasks-batch 0: must be at least 1"),
])
def test_flags_checked_as_the_command_line_is_read(argv, expect):
    with pytest.raises(ConfigError) as e:
        config.parse(["toy", "synthetic", *argv])
    assert expect in str(e.value)
    assert isinstance(e.value, NoEffectError) == ("acts on" in expect)


# the tests that index the harness's own tasks (seconds, once per process) run in one worker, which indexes once
HARNESS_INDEX = pytest.mark.xdist_group("lm-eval-index")


@pytest.mark.slow
@HARNESS_INDEX
def test_the_harness_checks_names_and_files_offline(cloze, tmp_path, no_network):
    """Names against the harness's own task index (local files, no network), a task file by the task it defines."""
    p = task_plan.plan([cloze[0]])
    assert (p.names, p.sources, p.local) == (("miq_cloze",), (cloze[0],), True)
    with pytest.raises(ConfigError, match=r"--tasks pika: not a task, group or tag of lm-eval .*did you mean .*piqa"):
        task_plan.plan(["pika"])
    assert task_plan.plan(["arc_easy", "lambada_openai"]).names == ("arc_easy", "lambada_openai")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")  # no task name
    with pytest.raises(ConfigError, match="not a task file the harness can read"):
        task_plan.plan([str(bad)])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "moved.yaml").write_text(TASK_YAML.format(data=tmp_path / "gone.jsonl"))
    with pytest.raises(ConfigError, match=r"moved.yaml: its data file .*gone.jsonl does not exist"):
        task_plan.plan([str(elsewhere / "moved.yaml")])
    twin = tmp_path / "twin.yaml"
    twin.write_text(Path(cloze[0]).read_text())
    with pytest.raises(ConfigError, match="defines task miq_cloze, as .* does; give each task once"):
        task_plan.plan([cloze[0], str(twin)])
    assert not no_network


@pytest.mark.slow
@HARNESS_INDEX
def test_names_and_files_together(cloze, no_network):
    """A harness task beside a task file: one index of both (the file's folder included), names in order."""
    p = task_plan.plan(["piqa", cloze[0]])
    assert (p.names, p.sources, p.local) == (("piqa", "miq_cloze"), ("piqa", cloze[0]), False)
    assert "piqa" in p.manager.all_tasks and "miq_cloze" in p.manager.all_tasks
    assert not no_network


# ----------------------------------------------------------------------------------------------------------
# sweeps, the report and the verdict


@pytest.mark.slow
@HARNESS_INDEX
def test_a_sweep_passes_tasks_to_every_configuration(cloze, tmp_path):
    s = sweep_args.parse_args(["--tasks", cloze[0], "--extra", "--tasks-limit 4", "--out", str(tmp_path / "o")])
    configs = [c for c in methods.matrix(s.matrix) if c.skip is None]
    for c in configs:
        args = sweep_args.config_args(s, c)
        cfg = config.parse(args)
        assert (cfg.task_names(), cfg.tasks_limit) == ([cloze[0]], 4)
    with pytest.raises(sweep_args.UsageError, match="--tasks pika"):
        sweep_args.parse_args(["--tasks", "pika", "--out", str(tmp_path / "o")])
    with pytest.raises(sweep_args.UsageError, match="--extra: --tasks-limit acts on the harness's tasks"):
        sweep_args.parse_args(["--extra", "--tasks-limit 4", "--out", str(tmp_path / "o")])


ACC = {  # configuration -> per seed (acc on task a, acc on task b)
    "miB_s0.5_w4_k8": [(0.60, 0.50), (0.62, 0.52), (0.61, 0.47)],
    "perchannel_s0.5_w4": [(0.55, 0.50), (0.58, 0.49), (0.57, 0.47)],
    "random_s0.5_w4_k8": [(0.61, 0.50), (0.60, 0.55), (0.58, 0.49)],
}


def seeded_sweep(d: Path) -> None:
    """Three configurations over three seeds, each run with two tasks (the report's fixtures otherwise)."""
    d.mkdir()
    for rid, per_seed in ACC.items():
        j = json.loads((FIXTURES / f"{rid}.json").read_text())
        for seed, (a, b) in enumerate(per_seed):
            j["config"]["seed"] = seed
            j["tasks"] = {"harness": "lm-eval", "harness_version": "0.4.13", "fewshot": None, "limit": 100,
                          "batch": 8, "results": {
                              "task_a": {"acc": a, "acc_stderr": 0.05, "n_shot": 0, "version": 1.0},
                              "task_b": {"acc": b, "acc_stderr": 0.05, "n_shot": 0, "version": 1.0}}}
            (d / f"{rid}_seed{seed}.json").write_text(json.dumps(j))


def test_the_report_tabulates_accuracy_over_seeds(tmp_path):
    seeded_sweep(tmp_path / "s")
    md = report.build(tmp_path / "s", tmp_path / "s" / "performance_report.md")
    rows = {r["configuration"]: r for r in md_table(md, "Zero-shot tasks")}
    assert set(rows) == set(ACC)
    for rid, per_seed in ACC.items():
        for i, col in enumerate(("task_a", "task_b")):
            v = [s[i] for s in per_seed]
            assert rows[rid][col] == f"{statistics.mean(v):.4f} +- {statistics.stdev(v):.4f}"
        means = [(a + b) / 2 for a, b in per_seed]
        assert rows[rid]["mean"] == f"{statistics.mean(means):.4f} +- {statistics.stdev(means):.4f}"
        assert rows[rid]["seeds"] == "3"
    assert "0-shot; document limit 100" in md


def paired_rule(mi: str, ref: str) -> tuple[str, float, float]:
    """The decision on mean task accuracy by hand: the per-seed differences, their mean and its standard error."""
    d = [sum(x) / 2 - sum(y) / 2 for x, y in zip(ACC[mi], ACC[ref], strict=True)]
    mean, se = statistics.mean(d), statistics.stdev(d) / math.sqrt(len(d))
    return ("better" if mean > 2 * se else "worse" if mean < -2 * se else "no significant difference"), mean, se


def test_the_verdict_compares_mean_task_accuracy_paired_by_seed(tmp_path):
    seeded_sweep(tmp_path / "s")
    runs = [Run(p.stem, json.loads(p.read_text())) for p in sorted((tmp_path / "s").glob("*.json"))]
    cell = judge(runs, ["synthetic"]).cells[0]
    for comparison, ref in [(cell.baseline, "perchannel_s0.5_w4"), (cell.control("random"), "random_s0.5_w4_k8")]:
        assert comparison.reference_id == ref
        decision, mean, se = paired_rule("miB_s0.5_w4_k8", ref)
        t = comparison.on_tasks
        assert (t.decision, t.paired.n) == (decision, 3)
        assert (t.paired.mean, t.paired.se) == (pytest.approx(mean), pytest.approx(se))
    # by hand: vs per-channel +0.0267 +- 0.0044 SE (better); vs random -0.0017 +- 0.0033 SE (not significant)
    assert (cell.baseline.on_tasks.decision, cell.control("random").on_tasks.decision) == (
        "better", "no significant difference")
    md = "\n".join(tasks_table.section(units(runs), judge(runs, ["synthetic"])))
    assert "against the baseline: MI has the higher mean task accuracy in 1 of 1 comparisons" in md
    assert "better by 0.0267 +- 0.0044 SE over 3 seeds" in md
    assert "no significant difference (-0.0017 +- 0.0033 SE over 3 seeds)" in md


def test_runs_without_tasks_change_nothing_and_other_tasks_are_not_compared(tmp_path):
    seeded_sweep(tmp_path / "s")
    for p in (tmp_path / "s").glob("perchannel*.json"):
        j = json.loads(p.read_text())
        j["tasks"]["results"].pop("task_b")  # another task set: not comparable
        p.write_text(json.dumps(j))
    runs = [Run(p.stem, json.loads(p.read_text())) for p in sorted((tmp_path / "s").glob("*.json"))]
    assert judge(runs, ["synthetic"]).cells[0].baseline.on_tasks.decision == "no comparison"
    plain = [Run(r.id, {k: v for k, v in r.data.items() if k != "tasks"}) for r in runs]
    cell = judge(plain, ["synthetic"]).cells[0]
    assert cell.baseline.on_tasks is None and tasks_table.section(units(plain), judge(plain, ["synthetic"])) == []


def test_tasks_on_a_model_loaded_layer_by_layer_hold_one_layer(toy_path, cloze, small_eval, tmp_path, monkeypatch,
                                                               no_network):
    """--tasks with --load layers: the harness gets the model whose decoder layers are read as its forward
    reaches them, never the model read back whole; at most one decoder layer is resident during the tasks,
    and every number equals --load whole's."""
    path, _ = cloze
    resident: list[int] = []  # decoder layers holding weights, after each read during the tasks
    real_load, real_evaluate = onload.Onloader.load, tasks.evaluate
    during = []

    def load(o, names, layer=None):
        real_load(o, names, layer)
        if during:
            resident.append(sum(any(o.tensors[n].device.type != "meta" for n in ns) for ns in o.layer_names))

    def evaluate(*args, **kwargs):
        during.append(True)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(onload.Onloader, "load", load)
    monkeypatch.setattr(opt_mi.tasks, "evaluate", evaluate)
    monkeypatch.setattr(onload.Onloader, "materialize", lambda o: pytest.fail("the model was read back whole"))
    flags = [toy_path, "synthetic", *FAST, "--sparsity", "0.5", "--wbits", "4", "--eval", small_eval, "--tasks", path,
             "--tasks-limit", "16"]
    lazy = run_json([*flags, "--load", "layers"], tmp_path / "lazy.json")
    assert resident and max(resident) == 1
    monkeypatch.undo()
    whole = run_json([*flags, "--load", "whole"], tmp_path / "whole.json")
    assert lazy["tasks"]["results"] == whole["tasks"]["results"] and lazy["ppl"] == whole["ppl"]
