"""Benchmark: this toolkit against llm-compressor (vllm-project) on the same model and calibration windows.

    pip install -r bench/requirements.txt     # in a separate venv (see the README): it pins older transformers
    python bench/bench_peer.py                                  # both models, 4 rows, 128 windows, best of 3
    python bench/bench_peer.py --models testbed --nsamples 16 --repeat 1     # a quick look
    python bench/bench_peer.py --device cuda                    # the same on a GPU (both toolkits)

Models: the dev testbed (``../shared/testbed/tiny-opt-dev``) and a random OPT-125m-shaped OPT (12 layers,
hidden 768, ffn 3072, 2048 positions, seeded). Calibration: ``--nsamples`` windows of min(``--seqlen``, the
model's positions) tokens drawn once from ``../shared/data/c4_train.jsonl`` by this toolkit's own sampler
and handed to both (to llm-compressor as a tokenized ``datasets.Dataset``, in order, batch size 1).

Rows (settings matched: dampening 0.01 x mean diag H, block 128, one decoder layer at a time, every linear of
every decoder layer, asymmetric int4 min-max, float32 model):
- ``sparsegpt``: 50% unstructured SparseGPT;
- ``gptq``: 4-bit per-row GPTQ (no act-order);
- ``gptq-g128-ao``: 4-bit groups of 128 with act-order, static groups (parameters fixed before the pass);
- ``sparse+gptq``: 50% + 4-bit; ours is joint (one pass prunes and quantizes), llm-compressor's recipe is
  SparseGPTModifier then GPTQModifier, both calibrated in one sequential pipeline.

Every measurement runs in a fresh subprocess (so its peak RSS is its own), the two toolkits alternating and
the order flipping every repeat; the best wall time of ``--repeat`` is kept. Wall time is the compression call
alone (ours: ``miq.run.compress.compress``; theirs: ``oneshot``), from a loaded model to a compressed one; RSS
is the process's peak at the end of that call (model, data and libraries included, evaluation excluded).
Perplexity (first repeat only) comes from the same code for both: the compressed linears' weights are copied
into a freshly loaded model and evaluated with this toolkit's layer walker on ``--eval-windows`` C4 held-out
windows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import peak_rss  # bench/rss.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TESTBED = SHARED / "testbed" / "tiny-opt-dev"
CALIB = SHARED / "data" / "c4_train.jsonl"
HELDOUT = SHARED / "data" / "c4_heldout.jsonl"
ROWS = ("sparsegpt", "gptq", "gptq-g128-ao", "sparse+gptq")
OURS = {  # opt_mi.py flags of each row
    "sparsegpt": ["--sparsity", "0.5"],
    "gptq": ["--wbits", "4"],
    "gptq-g128-ao": ["--wbits", "4", "--groupsize", "128", "--act-order"],
    "sparse+gptq": ["--sparsity", "0.5", "--wbits", "4"],
}
NOTES = {  # what differs in what the two compute, row by row (both: float32 Hessians and weights)
    "sparsegpt": "mask per block of 128 columns from w^2/[H^-1]_ii^2: ours prunes exactly k, theirs "
                 "`<= sorted[k]` (k + 1 per block, as IST-DASLab's); Hessians both rescaled per window",
    "gptq": "grids: ours min-max per row on the weights as loaded, scales rounded to fp16; theirs the same "
            "observer, scales float32; Hessian: ours rescaled per window (reference), theirs summed then divided",
    "gptq-g128-ao": "both: columns by descending diag H, group grids fixed before the pass on the weights as "
                    "loaded; ours fp16 scales and a stable sort, theirs float32 scales and argsort",
    "sparse+gptq": "ours joint: one OBS pass per layer prunes and quantizes with one Hessian; theirs two "
                   "passes (SparseGPT, then GPTQ on the pruned weights, two Hessians from the same inputs), "
                   "and GPTQ's updates may refill pruned weights (see zeros)",
}


def random_opt125m(folder: Path, seed: int = 0) -> None:
    """A seeded random OPT with OPT-125m's shapes, saved with the testbed's tokenizer (both toolkits load it)."""
    import torch
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    cfg = OPTConfig(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                    max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=768,
                    do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    OPTForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(TESTBED).save_pretrained(folder)


def prepare_data(model_dir: Path, nsamples: int, seqlen: int, eval_windows: int, out: Path) -> tuple[int, int]:
    """Calibration windows [n, seqlen] and eval tokens [1, T] saved to ``out``; returns the window length and
    the column group size: 128, or the largest power of two dividing every linear's width (llm-compressor's
    group strategy needs whole groups: 64 on the testbed's 192 columns)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    import datautils

    mc = AutoConfig.from_pretrained(model_dir)
    seqlen = min(seqlen, mc.max_position_embeddings)
    groupsize = 128
    while mc.hidden_size % groupsize or mc.ffn_dim % groupsize:
        groupsize //= 2
    tok = AutoTokenizer.from_pretrained(model_dir)
    calib = torch.cat([w for w, _ in datautils.get_calibration(str(CALIB), nsamples, 0, seqlen, tok)])
    ev = datautils.get_eval_tokens(str(HELDOUT), seqlen, tok)[:, : eval_windows * seqlen]
    torch.save({"calib": calib, "eval": ev}, out)
    return seqlen, groupsize


# ---- the child: one toolkit, one row, in its own process

def _load(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model


def _compress_ours(model, calib, job: dict):
    import torch

    from miq.run import config
    from miq.run.compress import compress

    cfg = config.parse([job["model"], str(CALIB), "--eval", str(HELDOUT), "--seqlen", str(calib.shape[1]),
                        "--nsamples", str(calib.shape[0]), "--analysis-dir", "",
                        *[str(job["groupsize"]) if a == "128" else a for a in OURS[job["row"]]]])
    compress(model, calib, cfg, torch.device(job["device"]))


def _recipe(row: str, layer_regex: str, groupsize: int):
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    sgpt = SparseGPTModifier(sparsity=0.5, mask_structure="0:0", block_size=128, dampening_frac=0.01,
                             targets=[layer_regex])
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "observer": "memoryless_minmax"}
    if row == "gptq-g128-ao":
        weights.update(strategy="group", group_size=groupsize)
    else:
        weights.update(strategy="channel")
    gptq = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"],
                        block_size=128, dampening_frac=0.01, actorder="static" if row == "gptq-g128-ao" else None)
    return {"sparsegpt": [sgpt], "gptq": [gptq], "gptq-g128-ao": [gptq], "sparse+gptq": [sgpt, gptq]}[row]


def _compress_theirs(model, calib, job: dict):
    from datasets import Dataset
    from llmcompressor import oneshot

    ds = Dataset.from_dict({"input_ids": calib.tolist()})
    oneshot(model=model, dataset=ds, recipe=_recipe(job["row"], r"re:.*decoder\.layers\.\d+$", job["groupsize"]),
            pipeline="sequential", num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False, batch_size=1)


def _linear_weights(model) -> dict:
    """Every decoder linear's weight as a plain float32 tensor (whatever wrappers the toolkit left)."""
    import torch

    return {n: m.weight.detach().float().cpu().clone() for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _evaluate(job: dict, weights: dict, ev) -> float:
    import torch

    from miq.model import layerwalk

    model = _load(job["model"])
    mods = dict(model.named_modules())
    with torch.no_grad():
        for n, w in weights.items():
            mods[n].weight.copy_(w)
    return layerwalk.perplexity(model, ev, job["seqlen"], torch.device(job["device"]), batch=4)


def child(job: dict) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    data = torch.load(job["data"])
    model = _load(job["model"])
    dev = torch.device(job["device"])
    fn = _compress_ours if job["toolkit"] == "ours" else _compress_theirs
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    fn(model, data["calib"], job)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out = {"wall_s": time.perf_counter() - t, "rss_mb": peak_rss() / 2**20}
    if dev.type == "cuda":
        out["gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    weights = _linear_weights(model)
    out["zeros"] = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    if job["eval"]:
        del model
        out["ppl"] = _evaluate(job, weights, data["eval"])
    return out


# ---- the parent: alternate, repeat, tabulate

def run_child(job: dict, tmp: Path) -> dict:
    jf, of = tmp / "job.json", tmp / "out.json"
    jf.write_text(json.dumps(job))
    of.unlink(missing_ok=True)
    env = {**os.environ, "TQDM_DISABLE": "1", "LLMCOMPRESSOR_LOG_LEVEL": "WARNING"}
    p = subprocess.run([sys.executable, __file__, "--child", str(jf), str(of)], capture_output=True, text=True,
                       env=env)
    if p.returncode != 0 or not of.exists():
        sys.exit(f"{job['toolkit']} {job['row']} on {job['model']} failed (exit {p.returncode}):\n"
                 f"{p.stderr[-3000:]}")
    return json.loads(of.read_text())


def bench_model(name: str, model_dir: Path, args, tmp: Path) -> dict:
    data = tmp / f"{name}.pt"
    seqlen, groupsize = prepare_data(model_dir, args.nsamples, args.seqlen, args.eval_windows, data)
    print(f"\n{name}: {args.nsamples} calibration windows of {seqlen} tokens, {args.eval_windows} eval windows, "
          f"groups of {groupsize} in the g128 row", flush=True)
    runs: dict = {}
    for rep in range(args.repeat):
        for row in args.rows:
            order = ("ours", "theirs") if (rep + ROWS.index(row)) % 2 == 0 else ("theirs", "ours")
            for tk in order:
                job = {"toolkit": tk, "row": row, "model": str(model_dir), "data": str(data), "seqlen": seqlen,
                       "groupsize": groupsize, "device": args.device, "threads": args.threads, "eval": rep == 0}
                r = run_child(job, tmp)
                print(f"  rep {rep + 1} {row:>13} {tk:>6}: {r['wall_s']:8.2f} s, peak RSS {r['rss_mb']:6.0f} MB",
                      flush=True)
                runs.setdefault((row, tk), []).append(r)
    # best wall time; the largest peak of any repeat; perplexity and zeros from the first (the one evaluated)
    results = {}
    for key, rs in runs.items():
        results[key] = {**rs[0], "wall_s": min(r["wall_s"] for r in rs), "rss_mb": max(r["rss_mb"] for r in rs)}
        if "gpu_mb" in rs[0]:
            results[key]["gpu_mb"] = max(r["gpu_mb"] for r in rs)
    return results


def table(name: str, results: dict, rows: list[str], cuda: bool) -> str:
    head = (f"| {name} | ours s | theirs s | ours/theirs | ours RSS MB | theirs RSS MB | ours/theirs |"
            f"{' ours GPU MB | theirs GPU MB |' if cuda else ''} ours PPL | theirs PPL | ours zeros | theirs zeros |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        o, t = results[(row, "ours")], results[(row, "theirs")]
        gpu = f" {o['gpu_mb']:.0f} | {t['gpu_mb']:.0f} |" if cuda else ""
        lines.append(f"| {row} | {o['wall_s']:.2f} | {t['wall_s']:.2f} | {o['wall_s'] / t['wall_s']:.2f} | "
                     f"{o['rss_mb']:.0f} | {t['rss_mb']:.0f} | {o['rss_mb'] / t['rss_mb']:.2f} |{gpu} "
                     f"{o['ppl']:.3f} | {t['ppl']:.3f} | {o['zeros']:.3f} | {t['zeros']:.3f} |")
    return "\n".join(lines)


def describe(args) -> str:
    import llmcompressor
    import torch
    import transformers

    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} threads"
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, llmcompressor "
            f"{llmcompressor.__version__}; {dev}; load average {os.getloadavg()[0]:.1f} at start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="testbed,opt125m", help="comma-separated: testbed, opt125m (random)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (capped by the model's positions)")
    p.add_argument("--eval-windows", type=int, default=16, help="C4 held-out windows for perplexity")
    p.add_argument("--repeat", type=int, default=3, help="measurements per toolkit and row; the best is kept")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in every child (0: torch's default)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        Path(args.child[1]).write_text(json.dumps(child(json.loads(Path(args.child[0]).read_text()))))
        return
    args.rows = [r for r in args.rows.split(",") if r]
    models = [m for m in args.models.split(",") if m]
    bad = [r for r in args.rows if r not in ROWS] + [m for m in models if m not in ("testbed", "opt125m")]
    if bad:
        sys.exit(f"unknown row or model: {bad[0]}")
    if not (TESTBED.is_dir() and CALIB.is_file() and HELDOUT.is_file()):
        sys.exit(f"needs {TESTBED} and {CALIB.parent} (the testbed's tokenizer and C4 text)")
    print(describe(args))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in models:
            model_dir = TESTBED
            if name == "opt125m":
                model_dir = tmp / "opt125m-random"
                random_opt125m(model_dir)
            results = bench_model(name, model_dir, args, tmp)
            print("\n" + table(name, results, args.rows, args.device.startswith("cuda")))
            if name == "opt125m":
                shutil.rmtree(model_dir)
    print("\nWhat differs, per row:")
    for row in args.rows:
        print(f"- {row}: {NOTES[row]}")


if __name__ == "__main__":
    main()
