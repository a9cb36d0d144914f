"""Shared fixtures and helpers: the built-in toy model (and compressing it in memory), the optional ../shared
testbed, the independent textbook OBS loop that every SparseGPT implementation detail is checked against, and
the check that a report's tables equal the result JSONs they were built from (used by the report and the
sweep tests)."""

import io
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from miq import atomic

SHARED = Path(__file__).resolve().parents[2] / "shared"
TESTBED = SHARED / "testbed" / "tiny-opt-dev"
SHARED_DATA = SHARED / "data"
SLURM_SCRIPTS = Path(__file__).resolve().parent / "slurm"


def pytest_configure(config):
    """Under pytest-xdist (pytest.ini runs ``-n auto``) the cores are shared out among the workers: torch's
    threads in each, and OMP_NUM_THREADS for the processes its tests start (unless set already). Each worker
    spinning a thread per core would run the suite several times slower than one worker alone.

    Some code keeps its own thread count (the toys train on two threads) while the other worker computes:
    OpenMP threads that spin while they wait for a descheduled peer made a 30-step toy build 3-4x slower
    here (17-21 s against 5 s with OMP_WAIT_POLICY=PASSIVE, under the same load). It is set here, in the
    process that starts the workers, because OpenMP reads it when torch loads."""
    if getattr(config.option, "numprocesses", None):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the cores (pytest.ini caps it at 4) for the whole suite, a worker per
    core for the fast tier. A fifth of the slow tests' time is waiting rather than computing (a real Slurm
    scheduling, signals sent after pauses, sweeps polling their jobs), and a third worker fills it: on the idle
    2-core machine the suite took 323 s with 2 workers, 296 s with 3 and 311 s with 4; the fast tier, which
    hardly waits, 81 s with 2 and 86 s with 3 (each worker collects the whole suite first)."""
    cores = os.cpu_count() or 1
    fast_tier = "not slow" in (config.option.markexpr or "")
    return cores if fast_tier else cores + 1


def pytest_collection_modifyitems(config, items):
    """The end-to-end tests (marked slow) first: pytest-xdist hands tests out in this order as workers free
    up, so the long ones start early and the short ones fill the gaps, instead of one worker finishing a long
    test alone at the end (the order is stable within each kind)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def unrendered_figures(monkeypatch):
    """The report's figures built but not rasterized: each is written, atomically and under its own name, as a
    1x1 placeholder PNG. Rendering is most of a report's time (about 1 s for a small sweep here, half the CPU of
    the sweep machinery's tests), and those tests read the report's text only; test_report renders the figures
    in the test that reads them, test_frontier renders every figure, and the sweeps that run as processes (the
    real sweep, Slurm, the report's command line) render theirs."""
    buf = io.BytesIO()
    Image.new("L", (1, 1), 128).save(buf, format="PNG")
    monkeypatch.setattr(atomic, "write_png", lambda fig, path, dpi=None: atomic.write_bytes(path, buf.getvalue()))


@pytest.fixture(scope="session")
def toy_path() -> str:
    """The toy OPT folder (built and cached on first use, about half a minute)."""
    from miq.model import toy

    return toy.toy_model_path()


def compress_toy(toy_path: str, *flags: str, save: str = "unused"):
    """(model, tokenizer, CompressionResult, RunConfig): the toy compressed in memory with opt_mi.py's flags,
    on 8 windows of 32 tokens (a few seconds); ``res.saved`` holds its layers as a checkpoint stores them."""
    import datautils
    from miq.model import loading
    from miq.run import compress, config

    cfg = config.parse([toy_path, "synthetic", "--nsamples", "8", "--seqlen", "32", "--save", save, *flags])
    src, tokenizer = loading.open_source(toy_path)
    calib = datautils.get_calibration("synthetic", cfg.nsamples, cfg.seed, cfg.seqlen, tokenizer)
    model = loading.load_model(src, "auto", torch.device("cpu"))
    res = compress.compress(model, torch.cat([inp for inp, _ in calib]), cfg, torch.device("cpu"))
    return model, tokenizer, res, cfg


@pytest.fixture(scope="session")
def small_eval(tmp_path_factory) -> str:
    """A tenth of the synthetic test text as a local file: an --eval set for runs that only compare PPLs."""
    from miq import synthetic

    path = tmp_path_factory.mktemp("eval") / "small_eval.txt"
    path.write_text(synthetic.synthetic_text("test", 30), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def toy_llama_path() -> str:
    """The toy Llama folder (built and cached on first use, about half a minute)."""
    from miq.model import toy

    return toy.toy_model_path(name="toy-llama")


@pytest.fixture(scope="session")
def testbed() -> Path:
    if not (TESTBED / "config.json").is_file():
        pytest.skip("../shared/testbed is not present")
    return TESTBED


# ----------------------------------------------------------------------------------------------------------
# the independent reference: column-by-column OBS, explicit inverse, float64, no blocks, no Cholesky


def _schur_diag(Hinv: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Diagonal entries [H^-1]_jj seen at column j, after eliminating all columns before j (j in [start, stop))."""
    Ht = Hinv.clone()
    d = []
    for j in range(start, stop):
        d.append(Ht[j, j].clone())
        Ht -= torch.outer(Ht[:, j], Ht[j, :]) / Ht[j, j]
    return torch.stack(d)


def obs_loop(W, H, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01, bits=None, groupsize=-1,
             mask=None, full=False, order=None, g_idx=None, static=False, group_bits=None):
    """Column-by-column OBS pruning (+ quantization), float64, explicit inverse, no blocks.

    bits: an int or a per-row tensor of widths. mask: a fixed [R, C] prune mask to use instead of choosing
    one. order: process the columns in this order (act-order); masks are chosen per ``blocksize`` columns of
    that order. g_idx [C]: each column's quantization group (default: ``groupsize`` runs); a group's grid is
    found on the weights as they stand when its first column comes up, or, with ``static``, on the weights
    before the pass; ``group_bits`` [G]: the groups' widths. full: return (W, each row's summed loss
    (w - q)^2 / [H^-1]_ii / 2, the prune mask) instead of W. Everything returned is in the natural order.
    """
    W = W.double().clone()
    if bits is not None and not isinstance(bits, int):
        bits = torch.as_tensor(bits).double().reshape(-1, 1)
    H = H.double().clone()
    cols = W.shape[1]
    if g_idx is None and groupsize > 0:
        g_idx = torch.arange(cols) // groupsize
    params = None
    if bits is not None and g_idx is None:
        params = _minmax_params(W, bits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)

    def width(g):
        return bits if group_bits is None else int(group_bits[g])

    grids = {}
    if g_idx is not None and static:
        grids = {g: _minmax_params(W[:, g_idx == g], width(g)) for g in range(int(g_idx.max()) + 1)}
    order = torch.arange(cols) if order is None else torch.as_tensor(order)
    W, H = W[:, order], H[order][:, order]
    gids = None if g_idx is None else g_idx[order]
    fixed = None if mask is None else mask[:, order]
    Hinv = torch.linalg.inv(H)
    # elimination order is fixed, so [H^-1]_jj as seen at column j does not depend on the weights
    dseq = _schur_diag(Hinv, 0, cols)
    mask = torch.zeros_like(W, dtype=torch.bool) if fixed is None else fixed.clone()
    loss = torch.zeros(len(W), dtype=torch.float64)
    for i in range(cols):
        if fixed is None and prunen == 0 and sparsity > 0 and i % blocksize == 0:
            i2 = min(i + blocksize, cols)
            sal = (W[:, i:i2] ** 2 / dseq[i:i2]).flatten()
            k = int(sal.numel() * sparsity)  # exactly k pruned: the k smallest saliencies of the block
            block = torch.zeros_like(sal, dtype=torch.bool)
            block[sal.argsort(stable=True)[:k]] = True
            mask[:, i:i2] = block.reshape(len(W), i2 - i)
        if fixed is None and prunen and i % prunem == 0:
            sal = W[:, i : i + prunem] ** 2 / dseq[i : i + prunem]
            idx = torch.topk(sal, prunen, dim=1, largest=False)[1]
            mask[:, i : i + prunem].scatter_(1, idx, True)
        if bits is not None and gids is not None and (i == 0 or gids[i] != gids[i - 1]):
            g = int(gids[i])
            if static:
                params = grids[g]
            else:  # the group's run of columns, as they stand now
                run = i + int((gids[i:] == g).int().cumprod(0).sum())
                params = _minmax_params(W[:, i:run], width(g))
        w = W[:, i].clone()
        q = w.clone()
        q[mask[:, i]] = 0
        if params is not None:
            scale, zero, maxq = params
            codes = torch.round(q[:, None] / scale) + zero
            codes = torch.minimum(torch.clamp(codes, min=0), torch.as_tensor(maxq, dtype=codes.dtype))
            q = (scale * (codes - zero)).flatten()
        loss += (w - q) ** 2 / Hinv[i, i] / 2
        # processed columns are final; only the remaining ones absorb the error
        W[:, i:] -= torch.outer((w - q) / Hinv[i, i], Hinv[i, i:])
        W[:, i] = q
        Hinv -= torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    inv = torch.argsort(order)
    W, mask = W[:, inv], mask[:, inv]
    return (W, loss, mask) if full else W


def _minmax_params(W, bits):
    """Asymmetric per-row min-max grid, written out from the definition; the scale is stored in float16
    (found in float32, as a checkpoint would hold it), the zero-point derived from the stored scale."""
    maxq = 2**bits - 1  # an int, or per-row [R, 1]
    xmin = torch.clamp(W.min(1).values, max=0)
    xmax = torch.clamp(W.max(1).values, min=0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1, 1
    span = (xmax - xmin).float()[:, None]
    scale = (span / (maxq.float() if torch.is_tensor(maxq) else maxq)).half().double()
    zero = torch.round(-xmin[:, None] / scale)
    return scale, zero, maxq


def md_table(md: str, heading: str) -> list[dict[str, str]]:
    """Rows of the first markdown table under '## heading', as {column: cell}."""
    section = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def check_table_matches(md: str, src: Path) -> dict[str, dict[str, str]]:
    """Assert every number of the Results and Overhead tables equals its JSON at the printed rounding, and
    that the bold marks sit exactly on the lowest PPL per (sparsity, wbits budget, eval set); returns rows."""
    runs = {p.stem: j for p in src.glob("*.json") if isinstance(j := json.loads(p.read_text()), dict)
            and "ppl" in j and "bits" in j}
    rows = {r["run"]: r for r in md_table(md, "Results")}
    assert set(rows) == set(runs)
    sets = [c[len("PPL "):] for c in next(iter(rows.values())) if c.startswith("PPL ")]
    best: dict[tuple, float] = {}
    for rid, j in runs.items():
        row, cfg, bits = rows[rid], j["config"], j["bits"]
        assert row["method"] == j["method"]
        assert float(row["target sparsity"]) == cfg["sparsity"]
        assert row["measured sparsity"] == f"{j['sparsity']:.4f}"
        assert float(row["wbits budget"]) == cfg["wbits"]
        assert row["K"] == ("-" if cfg["groups"] == 0 else str(cfg["groups"]))
        for col, key in [("code bpw", "code_bpw"), ("metadata bpw", "metadata_bpw"), ("mask bpw", "mask_bpw"),
                         ("bpw", "bpw")]:
            assert row[col] == f"{bits[key]:.4f}", (rid, col)
        for s in sets:
            v = j["ppl"].get(s, "missing")
            cell = row[f"PPL {s}"].strip("*")
            assert cell == ("-" if v == "missing" else "n/a" if v is None else f"{v:.3f}"), (rid, s)
            if isinstance(v, float) and math.isfinite(v):
                key = (cfg["sparsity"], cfg["wbits"], s)
                best[key] = min(best.get(key, math.inf), round(v, 3))
    for rid, j in runs.items():
        for s in sets:
            v = j["ppl"].get(s)
            key = (j["config"]["sparsity"], j["config"]["wbits"], s)
            is_best = v is not None and round(v, 3) == best[key]
            assert rows[rid][f"PPL {s}"].startswith("**") == is_best, (rid, s)
    for row in md_table(md, "Overhead"):
        t = runs[row["run"]]["timing"]
        for col, key in [("MI s", "mi_s"), ("clustering s", "cluster_s"), ("allocation s", "alloc_s"),
                         ("pruning s", "prune_s"), ("evaluation s", "eval_s"), ("total s", "total_s")]:
            assert row[col] == f"{t[key]:.2f}", (row["run"], col)
        share = 100 * (t["mi_s"] + t["cluster_s"] + t["alloc_s"]) / t["total_s"]
        assert row["MI+clustering+allocation share"] == f"{share:.1f}%"
        assert row["pruning share"] == f"{100 * t['prune_s'] / t['total_s']:.1f}%"
    return rows


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """A single-node Slurm cluster on this machine (tests/slurm/start.sh; installed from the distribution's
    packages when missing): its SLURM_CONF. Started once per session and stopped at its end, unless it was
    already running (CI starts it before pytest). Skips, with start.sh's line, only where it cannot run here:
    not root, the packages not installable (with MIQ_REQUIRE_SLURM set, as in CI, that fails them too); a
    cluster that should start and does not fails the tests."""
    folder = os.environ.get("MIQ_SLURM_DIR", "/tmp/miq-slurm")
    r = subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh"), folder], capture_output=True, text=True)
    if r.returncode == 3 and not os.environ.get("MIQ_REQUIRE_SLURM"):  # CI sets it: there, it must start
        pytest.skip(r.stderr.strip())
    if r.returncode:
        pytest.fail(f"tests/slurm/start.sh failed: {r.stderr.strip()}")
    conf = r.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    yield conf
    if "slurm: started" in r.stdout:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh"), folder], capture_output=True)
