"""Shared fixtures: the built-in toy model, and the optional ../shared testbed; and the report-table check."""

import json
import math
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
TESTBED = SHARED / "testbed" / "tiny-opt-dev"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def toy_path() -> str:
    """The toy OPT folder (built and cached on first use, about half a minute)."""
    import toy

    return toy.toy_model_path()


@pytest.fixture(scope="session")
def testbed() -> Path:
    if not (TESTBED / "config.json").is_file():
        pytest.skip("../shared/testbed is not present")
    return TESTBED


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
        for col, key in [("avg bits", "avg_weight_bits"), ("metadata bpw", "metadata_bpw"), ("bpw", "bpw"),
                         ("mask bpw", "mask_bpw")]:
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
