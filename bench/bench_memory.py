"""Benchmark: peak host memory and wall time of a run with --load layers against --load whole.

    python bench/bench_memory.py                     # 24 layers, hidden 1024 (about 1.4 GB in float32)
    python bench/bench_memory.py --layers 12 --keep DIR   # smaller; keep the built checkpoint in DIR

It builds a random OPT (24 layers, hidden 1024, ffn 4096, OPT's 50272-token vocabulary; the weights need not
be trained) and saves it as sharded safetensors (``--shard`` per file) with the toys' tokenizer in a
temporary folder, then runs opt_mi.py on it (SparseGPT 50% + 4-bit, --nsamples 8 --seqlen 256 on the
synthetic corpus, perplexity on about two windows of synthetic text, on the CPU) once per --load, each in a
fresh process. Each process reports its own peak resident set (VmHWM from /proc/self/status, which counts
file pages mapped by safetensors as well as allocations) and its wall time; a third process that only
imports what opt_mi.py imports gives the fixed cost of the interpreter, torch and transformers. Printed
side by side, with the ratios: peak RSS over the checkpoint's size for each, the peak above that fixed cost
over the checkpoint's size, and wall time layers / whole. The goal: --load layers under 25% of the
checkpoint, and no more than 10% slower than --load whole.

Timings on a loaded machine are not figures to publish: run it on an idle one (``--threads`` sets the
threads of both runs alike). Evaluation's logits (vocabulary x window x windows per chunk, up to 512 MB)
are the same in both modes; a small eval set keeps them small beside the weights.
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
sys.path.insert(0, str(ROOT))


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
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def child(args: list[str], out: str) -> None:
    """In a fresh process: opt_mi.py with ``args`` (none: the imports only); its peak RSS and wall time to ``out``."""
    t = time.perf_counter()
    import opt_mi

    code = opt_mi.main(args) if args else 0
    Path(out).write_text(json.dumps({"code": code, "peak_rss": peak_rss(), "wall_s": time.perf_counter() - t}))


def measure(args: list[str], threads: int | None) -> dict:
    """Run ``child`` in a fresh interpreter and return what it reported."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run([sys.executable, __file__, "--child", f.name, "--", *args], env=env, check=True, cwd=ROOT)
        r = json.loads(Path(f.name).read_text())
    if r["code"] != 0:
        raise SystemExit(f"opt_mi.py {' '.join(args)} exited with {r['code']}")
    return r


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--shard", default="200MB", help="max_shard_size of the saved checkpoint")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of both runs (default: torch's)")
    p.add_argument("--keep", default="", help="build the checkpoint here and keep it (reused when present)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.rest, a.child)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        folder = Path(a.keep) if a.keep else work / "opt-random"
        if (folder / "config.json").is_file():
            size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        else:
            size = build(folder, a.layers, a.hidden, a.shard)
        from miq import synthetic

        # about 2 windows of 256 tokens (the toys' tokenizer is word-level): logits stay small beside the weights
        words = synthetic.synthetic_text("test").split(" ")[:600]
        (work / "eval.txt").write_text(" ".join(words), encoding="utf-8")
        flags = [str(folder), "synthetic", "--sparsity", "0.5", "--wbits", "4", "--nsamples", "8", "--seqlen", "256",
                 "--eval", str(work / "eval.txt"), "--analysis-dir", "", "--device", "cpu"]
        base = measure([], a.threads)
        runs = {load: measure([*flags, "--load", load, "--json", str(work / f"{load}.json")], a.threads)
                for load in ("layers", "whole")}
        ppl = {load: json.loads((work / f"{load}.json").read_text())["ppl"] for load in runs}
        report(size, base, runs, ppl, a)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(size: int, base: dict, runs: dict, ppl: dict, a: argparse.Namespace) -> None:
    lay, whole = runs["layers"], runs["whole"]
    print(f"machine     {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads "
          f"{a.threads or 'default'}; random OPT, {a.layers} layers, hidden {a.hidden}: checkpoint {gb(size)} "
          "(float32, sharded safetensors)")
    print(f"imports     peak RSS {gb(base['peak_rss'])} (interpreter, torch, transformers: in both runs)")
    for load, r in runs.items():
        print(f"--load {load:<6} peak RSS {gb(r['peak_rss'])} = {r['peak_rss'] / size:.1%} of the checkpoint "
              f"({(r['peak_rss'] - base['peak_rss']) / size:.1%} above the imports), wall {r['wall_s']:.1f} s")
    print(f"ratios      peak RSS layers / whole {lay['peak_rss'] / whole['peak_rss']:.3f}; wall layers / whole "
          f"{lay['wall_s'] / whole['wall_s']:.3f}")
    print(f"goal        peak RSS under 25% of the checkpoint: {'met' if lay['peak_rss'] < 0.25 * size else 'not met'}"
          f"; at most 10% slower: {'met' if lay['wall_s'] <= 1.1 * whole['wall_s'] else 'not met'}")
    print(f"same ppl    {ppl['layers'] == ppl['whole']} ({ppl['layers']})")


if __name__ == "__main__":
    main()
