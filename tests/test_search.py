"""Per-linear levels by search (issue 28): the level database against compressing a linear directly, its bits
against a packed save, the knapsack against brute force and the budget, the one-line errors, and the toy end
to end (saved, reloaded, the JSON's levels against the saved layers)."""

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import compress_toy
from safetensors.torch import load_file

import datautils
import opt_mi
from miq.model import loading
from miq.options import Level, Recipe
from miq.run import config
from miq.search import budget, build, evo, fitness, levels
from miq.search import run as search_run
from miq.search.budget import Budget, knapsack
from miq.search.run import Searched, finish

CALIB = ["--nsamples", "8", "--seqlen", "32"]  # compress_toy's calibration
GRID = ["--search-sparsities", "0,0.5,2:4", "--search-wbits", "3,4,16", "--search-groupsize=-1,16"]
GRID_ACT = ["--search-sparsities", "0,0.5", "--search-wbits", "2,16", "--search-groupsize=-1,16", "--act-order",
            "--sym"]


def _cfg(toy_path, *flags):
    return config.parse([toy_path, "synthetic", *CALIB, "--target-bpw", "4", "--search", "knapsack", *flags])


def _db(toy_path, folder, *flags):
    """The toy's level database on compress_toy's calibration windows (layer 0 only: quick)."""
    cfg = _cfg(toy_path, "--maxlayer", "1", *flags).with_seqlen(2048)
    src, tok = loading.open_source(toy_path)
    calib = datautils.get_calibration("synthetic", cfg.nsamples, cfg.seed, cfg.seqlen, tok)
    model = loading.load_model(src, "auto", torch.device("cpu"))
    db = build.build(model, torch.cat([x for x, _ in calib]), cfg, torch.device("cpu"), str(folder))
    return db, cfg


@pytest.fixture(scope="session")
def toy_db(toy_path, tmp_path_factory):
    return _db(toy_path, tmp_path_factory.mktemp("db") / "db", *GRID)


@pytest.fixture(scope="session")
def toy_db_act(toy_path, tmp_path_factory):
    return _db(toy_path, tmp_path_factory.mktemp("db") / "db", *GRID_ACT)


def _uniform_flags(lv: Level) -> list[str]:
    mask = ["--prunen", str(lv.prunen), "--prunem", str(lv.prunem)] if lv.prunen else \
        ["--sparsity", str(lv.sparsity)] if lv.sparsity else []
    return [*mask, "--wbits", str(lv.wbits), "--groupsize", str(lv.groupsize)]


@pytest.mark.parametrize("which", ["toy_db", "toy_db_act"])
def test_a_level_from_the_database_is_the_linear_compressed_directly(request, toy_path, which):
    """Every level of layer 0's linears, bit for bit, against a uniform run at that level (same inputs: layer 0
    sees the embeddings; its linears accumulate from the uncompressed layer)."""
    db, cfg = request.getfixturevalue(which)
    for j, lv in enumerate(db.levels):
        if lv == Level(wbits=16):  # dense and unquantized: a uniform run at it compresses nothing
            continue
        extra = (["--act-order"] if cfg.act_order else []) + (["--sym"] if cfg.sym and lv.wbits != 16 else [])
        _, _, res, _ = compress_toy(toy_path, *_uniform_flags(lv), *extra, "--maxlayer", "1", save="x")
        by_name = {q.name: q for q in res.saved}
        for i, name in enumerate(db.names):
            assert torch.equal(db.weight(i, j), by_name[name].weight), (name, lv.label())
            b = res.bits[[r.name for r in res.layers].index(name)]
            assert db.bits[i][j] == b.code_bits + b.metadata_bits + b.mask_bits


def test_stored_bits_per_level_are_what_the_packed_format_holds(toy_db):
    """The database's files are the packed format's own streams: a level's bytes are its charged bits (each
    stream padded to a byte; an unquantized level's kept values kept in float32, charged as fp16)."""
    db, _ = toy_db
    for i in range(len(db.names)):
        tensors = load_file(f"{db.folder}/{levels.file_of(i)}")
        entries = json.loads(open(f"{db.folder}/{levels.file_of(i)}.json").read())
        for j, lv in enumerate(db.levels):
            mine = [k for k in tensors if k.startswith(f"{j}.")]
            on_disk = sum(tensors[k].numel() * tensors[k].element_size() for k in mine)
            kept = tensors[f"{j}.values"].numel() if lv.wbits == 16 else 0  # float32 here, fp16 in a save
            assert len(mine) == len(entries[j]["tensors"])
            assert 0 <= on_disk - (db.bits[i][j] + 16 * kept) / 8 < len(mine), (db.names[i], lv.label())


def test_bits_follow_from_settings_and_shape(toy_db):
    db, cfg = toy_db
    for i in range(len(db.names)):
        rows, cols = db.weight(i, 0).shape
        assert db.bits[i] == [budget.level_bits(rows, cols, lv, cfg) for lv in db.levels]


def test_the_cache_is_found_by_its_key_and_the_key_moves_with_the_levels(toy_path, toy_db):
    db, cfg = toy_db
    assert levels.load(db.folder).bits == db.bits
    dev = torch.device("cpu")
    other = _cfg(toy_path, "--maxlayer", "1", *GRID[:-1], "--search-groupsize=-1,32").with_seqlen(2048)
    assert build.key(cfg, toy_path, dev) == build.key(cfg, toy_path, dev) != build.key(other, toy_path, dev)
    assert build.key(cfg, toy_path, dev) != build.key(cfg.__class__(**{**cfg.__dict__, "seed": 1}), toy_path, dev)


# ----------------------------------------------------------------------------------------------------------
# the knapsack


def _brute(loss, bits, cap):
    best = None
    for pick in itertools.product(*[range(len(r)) for r in loss]):
        if sum(b[p] for b, p in zip(bits, pick, strict=True)) <= cap:
            c = sum(x[p] for x, p in zip(loss, pick, strict=True))
            best = c if best is None or c < best else best
    return best


def test_knapsack_is_exact_against_brute_force_and_never_over_budget():
    rng = np.random.default_rng(3)
    for _ in range(300):
        k, n = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        loss, bits = rng.random((k, n)).tolist(), rng.integers(0, 60, (k, n)).tolist()
        cap = int(rng.integers(sum(min(b) for b in bits), sum(max(b) for b in bits) + 10))
        pick = knapsack(loss, bits, cap)
        assert sum(b[p] for b, p in zip(bits, pick, strict=True)) <= cap
        assert sum(x[p] for x, p in zip(loss, pick, strict=True)) == pytest.approx(_brute(loss, bits, cap), abs=1e-12)
    with pytest.raises(ValueError, match="cheapest"):
        knapsack([[1.0, 0.0]], [[10, 20]], 9)


def test_at_a_uniform_configurations_budget_the_knapsack_loses_no_more_than_it(toy_db):
    db, _ = toy_db
    for j in range(len(db.levels)):
        cap = sum(b[j] for b in db.bits)
        pick = knapsack(db.loss, db.bits, cap)
        assert sum(db.bits[i][p] for i, p in enumerate(pick)) <= cap
        assert sum(db.loss[i][p] for i, p in enumerate(pick)) <= sum(x[j] for x in db.loss) + 1e-9


@pytest.mark.slow
def test_evo_at_a_uniform_levels_budget_is_within_it_and_its_kl_no_worse(toy_path, toy_db):
    """The evolution starts from the knapsack's answer or a uniform configuration, whichever has the lower KL
    (``run._start``), so at a budget a uniform level fills exactly, it ends within the budget and no worse
    than that uniform configuration on the same windows (needs miq/search/evo.py and fitness.py)."""
    db, cfg = toy_db
    src, tok = loading.open_source(toy_path)
    draws = datautils.get_calibration("synthetic", cfg.nsamples + 2, cfg.seed, cfg.seqlen, tok)[cfg.nsamples:]
    heldout = torch.cat([x for x, _ in draws])
    model = loading.load_model(src, "auto", torch.device("cpu"))
    stitched = fitness.StitchedKL(model, heldout, db, torch.device("cpu"))
    for j in (db.levels.index(Level(0.5, 0, 0, 3, -1)), db.levels.index(Level(0, 0, 0, 4, 16))):
        cap, uniform = sum(b[j] for b in db.bits), [j] * len(db.names)
        start, _ = search_run._start(db, cap, knapsack(db.loss, db.bits, cap), stitched, 2)
        result = evo.evolve(db.bits, cap, stitched, start, evo.EvoOptions(generations=3, seed=0), 2,
                             progress=False, on_parent=stitched.anchor)
        assert sum(db.bits[i][p] for i, p in enumerate(result.best)) <= cap
        assert stitched(list(result.best), 2) <= stitched(uniform, 2) + 1e-12


def test_the_budget_counts_uncompressed_linears_at_16_bits():
    b = Budget.of(3.0, 1000, 600)
    assert (b.uncompressed, b.bits) == (400, 3000 - 6400) and b.bpw(b.bits) == pytest.approx(3.0)


# ----------------------------------------------------------------------------------------------------------
# the final run, the recipe


def test_a_uniform_runs_recipe_is_its_own_config():
    cfg = config.parse(["toy", "synthetic", "--sparsity", "0.5", "--wbits", "3"])
    assert cfg.recipe.of("anything") == cfg.level and cfg.at(cfg.level) is cfg
    lv = Level(0.25, 0, 0, 4, 128)
    r = Recipe.per_linear(Level(), {"a": lv})
    assert r.of("a") == lv and r.of("b") == Level() and lv.label() == "s0.25 w4 g128"
    assert Level(0, 2, 4, 3).label() == "2:4 w3" and Level().label() == "dense w16"


def test_finish_refuses_a_final_run_that_stored_other_bits(toy_path, toy_db):
    db, cfg = toy_db
    choice = [1] * len(db.names)
    found = Searched(db, Budget.of(16, sum(db.numel), sum(db.numel)), choice)
    model, _, res, _ = compress_toy(toy_path, *_uniform_flags(db.levels[1]), "--maxlayer", "1")
    assert finish(res, found)["levels"] == {n: db.levels[1].label() for n in db.names}
    _, _, other, _ = compress_toy(toy_path, *_uniform_flags(db.levels[2]), "--maxlayer", "1")
    with pytest.raises(AssertionError, match="database charged"):
        finish(other, found)


# ----------------------------------------------------------------------------------------------------------
# bad input: one line, exit 2, before any work


@pytest.mark.parametrize("flags,expect", [
    (["--search", "knapsack"], "--search knapsack: needs --target-bpw"),
    (["--target-bpw", "3", "--search", "knapsack", "--search-wbits", "1,3"], "--search-wbits 1: each a width"),
    (["--target-bpw", "3", "--search", "knapsack", "--search-sparsities", "0,1"], "--search-sparsities 1:"),
    (["--target-bpw", "3", "--search", "knapsack", "--search-sparsities", "4:2"], "--search-sparsities 4:2:"),
    (["--target-bpw", "3", "--search", "knapsack", "--search-groupsize", "0"], "--search-groupsize 0:"),
    (["--target-bpw", "3", "--search", "knapsack", "--sparsity", "0.5"], "drop --sparsity"),
    (["--target-bpw", "3", "--search", "knapsack", "--groups", "4"], "drop --groups"),
    (["--target-bpw", "3", "--search", "knapsack", "--gmp"], "--gmp"),
    (["--target-bpw", "3", "--search", "knapsack", "--act-order", "--search-sparsities", "2:4"], "N:M with"),
    (["--target-bpw", "3", "--search", "knapsack", "--search-generations", "5"], "--search evo"),
    (["--search-wbits", "3"], "give --search"),
    (["--target-bpw", "3", "--search", "evo", "--save", "x", "--save-format", "compressed-tensors"],
     "compressed-tensors: --search"),
    (["--target-bpw", "0.5", "--search", "knapsack", "--search-wbits", "2,3"], "give at least"),
])
def test_bad_search_flags_are_one_line_and_exit_2(toy_path, tmp_path, capsys, flags, expect):
    out = tmp_path / "r.json"
    assert opt_mi.main([toy_path, "synthetic", *CALIB, "--json", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not out.exists()


def test_the_feasible_range_is_said_from_shapes(toy_path, capsys):
    cfg = _cfg(toy_path, "--search-sparsities", "0", "--search-wbits", "2,3")
    src, _ = loading.open_source(toy_path)
    skel = loading.skeleton(src)
    chosen = {n: m for n, m in skel.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    cheapest = sum(budget.level_bits(m.out_features, m.in_features, Level(wbits=2), cfg) for m in chosen.values())
    total = sum(m.weight.numel() for m in chosen.values())
    low = cheapest / total
    budget.check(config.parse([toy_path, "synthetic", "--target-bpw", f"{low + 0.001:.3f}", "--search", "knapsack",
                               "--search-sparsities", "0", "--search-wbits", "2,3"]), chosen, total)
    with pytest.raises(config.ConfigError, match=f"stores {np.ceil(low * 1000) / 1000:.3f} to"):
        budget.check(config.parse([toy_path, "synthetic", "--target-bpw", f"{low - 0.01:.3f}", "--search",
                                   "knapsack", "--search-sparsities", "0", "--search-wbits", "2,3"]), chosen, total)


# ----------------------------------------------------------------------------------------------------------
# end to end


def _saved_levels(folder) -> dict:
    """Each saved linear's width(s), grid, mask kind and pruned count, read from the packed manifest."""
    manifest = json.loads((folder / "quantization.json").read_text())
    out = {}
    for name, e in manifest["layers"].items():
        R, C = e["shape"]
        kept = sum(int(c) for c in e["codes"].values()) if e["quantized"] else \
            sum(t["shape"][0] for k, t in e["tensors"].items() if k.endswith(".values"))
        out[name] = (sorted(int(w) for w in e["codes"]) if e["quantized"] else [16],
                     e["columns"].get("groupsize") if e["quantized"] else None,
                     None if e["mask"] is None else e["mask"]["kind"], R * C - kept)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", ["knapsack", "evo"])
def test_a_searched_toy_saves_reloads_and_its_levels_are_the_saved_layers(toy_path, tmp_path, small_eval, method):
    save, out, cache = tmp_path / "m", tmp_path / "r.json", tmp_path / "cache"
    argv = [toy_path, "synthetic", "--nsamples", "4", "--seqlen", "32", "--eval", small_eval, "--target-bpw", "3.5",
            "--search", method, *GRID, "--search-cache", str(cache), "--save", str(save), "--json", str(out),
            "--analysis-dir", str(tmp_path / "an")]
    if method == "evo":
        argv += ["--search-generations", "2", "--search-windows", "2"]
    assert opt_mi.main(argv) == 0
    r = json.loads(out.read_text())
    s = r["search"]
    assert r["method"] == f"search-{method}" and s["method"] == method
    assert r["bits"]["bpw"] <= 3.5 and r["bits"]["bpw"] == pytest.approx(s["bpw"], abs=1e-12)
    assert (tmp_path / "an" / "search_levels.png").is_file() and s["db_size_bytes"] > 0
    saved = _saved_levels(save)
    for rec in r["layers"]:
        lv = rec["level"]
        assert s["levels"][rec["name"]] == lv["label"]
        widths, groupsize, mask, pruned = saved[rec["name"]]
        assert widths == [lv["wbits"]] and pruned == rec["pruned"]
        grid = lv["groupsize"] if lv["groupsize"] > 0 else rec["in_features"]  # per row: one group of all columns
        assert groupsize == (None if lv["wbits"] == 16 else grid)
        assert mask == (None if not (lv["sparsity"] or lv["prunen"]) else "n:m" if lv["prunen"] else "bitmask")
    assert opt_mi.main([str(save), "synthetic", "--nsamples", "4", "--seqlen", "32", "--eval", small_eval,
                        "--json", str(tmp_path / "re.json")]) == 0
    again = json.loads((tmp_path / "re.json").read_text())
    assert again["ppl"][small_eval] == pytest.approx(r["ppl"][small_eval], rel=1e-6)
    # a second search finds the database in the cache, and chooses the same levels
    again = [a for a in argv if a not in (str(save), "--save")]
    again[again.index(str(out))] = str(tmp_path / "r2.json")
    assert opt_mi.main(again) == 0
    r2 = json.loads((tmp_path / "r2.json").read_text())["search"]
    assert r2["db_reused"] is True and r2["levels"] == s["levels"]
