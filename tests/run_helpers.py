"""What the one-run tests share (test_bad_input, test_reliability_run, test_tasks): the small run settings, the
paused opt_mi.py process for interrupts, the checks of a one-line failure and of a folder left unchanged, and the
local cloze task for the harness. Kept apart from any test module so that each test file stands on its own.
"""

import hashlib
import os
import random
from pathlib import Path

from miq import synthetic

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--nsamples", "4", "--seqlen", "32", "--eval", "short_eval.txt", "--mi-samples", "128"]
GROUPED = ["--sparsity", "0.5", "--wbits", "4", "--groups", "4"]

# every output (model, figure, JSON), at a small cost: MI grouping of the two fc1 layers
RUN = [*GROUPED, *FAST, "--prune_only", "fc1", "--bit-alloc", "uniform", "--save", "out/model", "--json", "out/r.json",
       "--analysis-dir", "out/analysis"]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under root, hidden ones included, with what would show a change (a file's
    content by its sha256)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            digest = hashlib.sha256(Path(p).read_bytes()).hexdigest() if os.path.isfile(p) else ""
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def check_one_line(err: str, code: int, expected_code: int, expect=()) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for piece in expect:
        assert piece in lines[0], (piece, lines[0])
    return lines[0]


def cloze_docs(n: int, seed: int = 0) -> list[dict]:
    """n cloze items: {"context": first words of a sentence, "choices": 4 words, "label": index of the true
    next word}. Distractors are other words of the toy's vocabulary, so a trained model beats chance."""
    rng = random.Random(seed)
    words = [w for w in synthetic.synthetic_vocabulary() if w.isalpha()]
    sentences = [s.split() for s in synthetic.synthetic_text("test").replace("\n", " ").split(".")]
    docs = []
    for s in (s for s in sentences if len(s) > 6):
        k = rng.randrange(4, len(s))
        gold = s[k].strip(",;?!")
        if not gold.isalpha():
            continue
        choices = [gold, *rng.sample([w for w in words if w != gold], 3)]
        rng.shuffle(choices)
        docs.append({"context": " ".join(s[:k]), "choices": choices, "label": choices.index(gold)})
        if len(docs) == n:
            return docs
    raise AssertionError("the synthetic text has too few sentences")


TASK_YAML = """task: miq_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""
