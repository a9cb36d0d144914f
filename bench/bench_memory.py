"""Benchmark: peak host memory of a run with --load layers at two depths and with --load whole, beside the
law that bounds it.

    python bench/bench_memory.py                       # 12 and 24 layers of hidden 1024 (0.8 and 1.4 GB)
    python bench/bench_memory.py --depths 12 --no-whole --keep DIR   # one depth; keep the checkpoints in DIR

It builds random OPTs from one config (hidden 1024, ffn 4096, OPT's 50272-token vocabulary, tied head; the
weights need not be trained) at each depth and saves them as sharded float32 safetensors (``--shard`` per
file) with the toys' tokenizer in a temporary folder (or ``--keep``), writes a 40 KB evaluation file from the
synthetic corpus, and runs opt_mi.py on each (``--sparsity 0.5 --wbits 4 --nsamples 4 --seqlen 64`` on the
synthetic corpus, perplexity on the file, on the CPU) in a fresh process: ``--load layers`` at every depth and
``--load whole`` at the deepest. A process that only imports torch, transformers and opt_mi gives the fixed
cost; a second that also imports transformers' OPT modeling code (which building the model imports, and
torch._dynamo with it) says how much of each figure that import is (it is not subtracted). Each process
reports its peak resident set (VmHWM, which counts the file pages safetensors maps as well as allocations)
and, sampled every 10 ms in a thread, the peak of each stage (load, calibration capture, compression,
evaluation's layers and head, outputs).

The law: a run with --load layers holds at most the embeddings and head (the tensors outside the decoder
layers, a tied head once), three decoder layers (the one being compressed, its Hessians and their
factorization's temporaries fit in the other two for OPT-shaped layers), the larger of the calibration and
evaluation activations (windows x seqlen x hidden, one buffer), and one slice of the head's logits (at most
``layerwalk.LOGITS_BUDGET`` float32 values, twice: cross-entropy's log-softmax beside them); nothing in it
grows with the number of layers. Printed beside each measurement as a ratio to the checkpoint's bytes.
Memory figures hold on a loaded machine (other processes take CPU, not this process's memory); the wall
times printed are not figures to publish there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rss import peak_rss  # bench/rss.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLAGS = ["--sparsity", "0.5", "--wbits", "4", "--nsamples", "4", "--seqlen", "64", "--analysis-dir", "",
         "--device", "cpu"]
MiB = 2**20
MODEL_MODULE = "transformers.models.opt.modeling_opt"  # what building an OPT imports (torch._dynamo among it)


def build(folder: Path, layers: int, hidden: int, shard: str) -> int:
    """A random OPT with ``layers`` decoder layers of width ``hidden`` saved as sharded float32 safetensors
    into ``folder``, with the toys' tokenizer; returns the checkpoint's bytes (its .safetensors files)."""
    import torch
    import transformers

    from miq.model import toy

    tokenizer = toy.build_tokenizer()
    config = transformers.OPTConfig(vocab_size=50272, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=hidden // 64, ffn_dim=4 * hidden, max_position_embeddings=2048,
                                    word_embed_proj_dim=hidden, do_layer_norm_before=True, pad_token_id=1,
                                    bos_token_id=2, eos_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).eval()
    model.save_pretrained(folder, max_shard_size=shard)
    tokenizer.save_pretrained(folder)
    return checkpoint_bytes(folder)


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def law(folder: Path, eval_file: Path) -> dict[str, int]:
    """The bound's terms in bytes, from the checkpoint's headers, config and the flags (see the docstring)."""
    from transformers import AutoConfig, AutoTokenizer

    from miq.checkpoint.packed import tensor_bytes
    from miq.model import layerwalk

    sizes: dict[str, int] = {}
    for f in folder.glob("*.safetensors"):
        sizes.update(tensor_bytes(str(f)))
    layers: dict[int, int] = {}
    outside = 0
    for name, n in sizes.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m:
            layers[int(m.group(1))] = layers.get(int(m.group(1)), 0) + n
        else:
            outside += n
    config = AutoConfig.from_pretrained(folder)
    nsamples, seqlen = int(FLAGS[FLAGS.index("--nsamples") + 1]), int(FLAGS[FLAGS.index("--seqlen") + 1])
    tokens = len(AutoTokenizer.from_pretrained(folder)(eval_file.read_text(encoding="utf-8")).input_ids)
    windows = tokens // seqlen
    act = 4 * seqlen * config.hidden_size  # float32 per window
    positions = windows * (seqlen - 1)
    return {"embeddings and head": outside, "3 decoder layers": 3 * max(layers.values()),
            "activations": act * max(nsamples, windows),
            "head slice": 2 * 4 * min(layerwalk.LOGITS_BUDGET, positions * config.vocab_size)}


STAGES = {  # (module, function) -> stage name, nested stages joined by '/'
    ("opt_mi", "load_model"): "load", ("opt_mi", "compress"): "compress", ("opt_mi", "evaluate"): "evaluate",
    ("miq.model.layerwalk", "capture_inputs"): "capture", ("miq.model.layerwalk", "window_losses"): "head",
    ("miq.run.saving", "write"): "save", ("miq.run.outputs", "write_json"): "outputs",
}


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                if k in ("VmRSS", "VmHWM", "RssAnon")}


def child(args: list[str], out: str) -> None:
    """In a fresh process: opt_mi.py with ``args`` (none: the imports only); its peak RSS, the peak of each
    stage (sampled every 10 ms) and its wall time to ``out``."""
    import importlib

    t = time.perf_counter()
    import opt_mi  # noqa: F401  (with torch and transformers: the fixed cost)

    stack, peaks, done = ["run"], {}, threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            rss, where = _status()["VmRSS"], "/".join(stack)
            peaks[where] = max(peaks.get(where, 0), rss)

    def tagged(f, name):
        def g(*a, **k):
            stack.append(name)
            try:
                return f(*a, **k)
            finally:
                stack.pop()
        return g

    for (module, fn), name in STAGES.items():
        m = importlib.import_module(module)
        setattr(m, fn, tagged(getattr(m, fn), name))
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    if args == [MODEL_MODULE]:  # the imports and the model's modeling code, as building the model imports it
        importlib.import_module(MODEL_MODULE)
        args = []
    code = opt_mi.main(args) if args else 0
    done.set()
    thread.join()
    Path(out).write_text(json.dumps({"code": code, "peak_rss": peak_rss(), "stages": peaks,
                                     "wall_s": time.perf_counter() - t}))


def measure(args: list[str]) -> dict:
    """Run ``child`` in a fresh interpreter (one thread) and return what it reported."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, "--child", f.name, "--", *args], env=env, check=True, cwd=ROOT)
        r = json.loads(Path(f.name).read_text())
    if r["code"] != 0:
        raise SystemExit(f"opt_mi.py {' '.join(args)} exited with {r['code']}")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[12, 24])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--shard", default="200MB", help="max_shard_size of the saved checkpoints")
    p.add_argument("--eval-kb", type=int, default=40, help="size of the evaluation file")
    p.add_argument("--no-whole", action="store_true", help="skip --load whole (at the deepest depth)")
    p.add_argument("--keep", default="", help="build the checkpoints under this folder and keep them (reused)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.rest, a.child)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        from miq import synthetic

        text = synthetic.synthetic_text("test", 100)
        eval_file = work / "eval.txt"
        eval_file.write_text(text[: text.rindex(" ", 0, a.eval_kb * 1000)], encoding="utf-8")
        base = measure([])
        print(f"machine     {platform.machine()}, {os.cpu_count()} cores, {_total_memory()}; one thread per run")
        print(f"imports     peak RSS {base['peak_rss'] / MiB:.0f} MiB (interpreter, torch, transformers, opt_mi): "
              "subtracted below")
        module = measure([MODEL_MODULE])
        print(f"model code  {(module['peak_rss'] - base['peak_rss']) / MiB:.0f} MiB more to import {MODEL_MODULE}, "
              "which every run imports to build the model: part of every figure below, not subtracted")
        rows = []
        for depth in sorted(a.depths):
            folder = (Path(a.keep) if a.keep else work) / f"opt-random-{depth}x{a.hidden}"
            size = checkpoint_bytes(folder) if (folder / "config.json").is_file() else build(folder, depth, a.hidden,
                                                                                               a.shard)
            terms = law(folder, eval_file)
            loads = ["layers"] + (["whole"] if depth == max(a.depths) and not a.no_whole else [])
            for load in loads:
                out = work / f"{depth}-{load}.json"
                r = measure([str(folder), "synthetic", *FLAGS, "--eval", str(eval_file), "--load", load,
                             "--json", str(out)])
                r["ppl"] = json.loads(out.read_text())["ppl"]
                rows.append((depth, load, size, terms, r))
                report(depth, load, size, terms, r, base)
        summarize(rows, base)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _total_memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            return f"{int(f.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        return "memory unknown"


def report(depth: int, load: str, size: int, terms: dict, r: dict, base: dict) -> None:
    above = r["peak_rss"] - base["peak_rss"]
    bound = sum(terms.values())
    print(f"\n{depth} layers, checkpoint {size / MiB:.0f} MiB, --load {load}: peak {above / MiB:.0f} MiB above the "
          f"imports = {above / size:.3f}x the checkpoint; wall {r['wall_s']:.0f} s")
    if load == "layers":
        print(f"  law {bound / MiB:.0f} MiB = {bound / size:.3f}x ("
              + ", ".join(f"{k} {v / MiB:.0f}" for k, v in terms.items()) + " MiB): "
              + ("within" if above <= bound else "EXCEEDED"))
    stages = sorted(r["stages"].items(), key=lambda kv: -kv[1])[:6]
    print("  stage peaks above the imports: " + ", ".join(f"{k} {(v - base['peak_rss']) / MiB:.0f}" for k, v in stages)
          + " MiB")


def summarize(rows: list, base: dict) -> None:
    lay = {d: r for d, load, _, _, r in rows if load == "layers"}
    whole = [r for _, load, _, _, r in rows if load == "whole"]
    if len(lay) > 1:
        lo, hi = min(lay), max(lay)
        ratio = (lay[lo]["peak_rss"] - base["peak_rss"]) / (lay[hi]["peak_rss"] - base["peak_rss"])
        print(f"\ndepth       overhead {lo} layers / {hi} layers = {ratio:.3f} (1 = memory does not grow with depth)")
    if whole:
        same = whole[0]["ppl"] == lay[max(lay)]["ppl"]
        print(f"same ppl    --load layers and --load whole at {max(lay)} layers: {same} ({whole[0]['ppl']})")


if __name__ == "__main__":
    main()
