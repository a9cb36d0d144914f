"""The packed format: bit streams, exact round trips of every layer layout, bytes on disk against the bits
accounting, whole models reloaded bit for bit, and damaged folders refused in one line (exit 2)."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import compress_toy
from safetensors.torch import save_file

import opt_mi
from miq import bitstats
from miq.checkpoint import packbits, packed, packed_layer
from miq.run import saving
from quant import QuantizedLayer, rtn_grid
from sparsegpt_mi import column_groups

FAST = ["--nsamples", "4", "--seqlen", "32", "--analysis-dir", ""]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (float32): no -0.0 for 0.0, no NaN games."""
    return a.dtype == b.dtype == torch.float32 and torch.equal(a.view(torch.int32), b.view(torch.int32))


def grid_layer(W, bits, *, sym=False, groupsize=-1, mask=None, row_groups=None, name="layer") -> QuantizedLayer:
    """W on the project's own RTN grid (exact grid values); pruned weights 0. bits: int or per-row tensor."""
    W = W.clone()
    if mask is not None:
        W[mask] = 0
    Q, scale, zero, maxq = rtn_grid(W, bits, sym=sym, row_groups=row_groups, groupsize=groupsize)
    return QuantizedLayer(name, Q, mask, scale, zero, maxq, column_groups(W.shape[1], groupsize), sym=sym,
                          row_groups=row_groups)


def round_trip(q: QuantizedLayer, nm=None, dtype=torch.float32) -> tuple[dict, dict]:
    """Encode, decode from the tensors alone, and check every weight comes back bit for bit."""
    entry, tensors = packed_layer.encode(q, dtype, nm)
    w = packed_layer.decode(q.name, entry, lambda part: tensors[f"{q.name}.{part}"], dtype)
    if dtype == torch.float32:
        assert same_bits(w, q.weight)
    else:
        assert w.dtype == dtype and torch.equal(w, q.weight.to(dtype))
    return entry, tensors


def random_mask(R, C, fraction=0.5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(R * C, dtype=torch.bool)
    mask[torch.randperm(R * C, generator=g)[: int(R * C * fraction)]] = True
    return mask.reshape(R, C)


def nm_mask(R, C, n=2, m=4, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(R, C // m, m, generator=g).argsort(-1)[..., :n]
    return torch.zeros(R, C // m, m, dtype=torch.bool).scatter_(-1, idx, True).reshape(R, C)


# ----------------------------------------------------------------------------------------------------------
# bit streams


@pytest.mark.parametrize("width", [*range(1, 10), 12, 15, 16, 17, 31, 32])
def test_bit_streams_follow_the_spec(width):
    """value k at stream bits k*w .. k*w + w - 1, LSB first; stream bit i is bit i % 8 of byte i // 8."""
    g = torch.Generator().manual_seed(width)
    for n in (0, 1, 7, 8, 9, 771):
        v = torch.randint(0, 1 << width, (n,), generator=g)
        bits = [(x >> j) & 1 for x in v.tolist() for j in range(width)]
        expected = np.packbits(np.array(bits, dtype=np.uint8), bitorder="little")
        s = packbits.pack_bits(v, width)
        assert s.numel() == (n * width + 7) // 8 and np.array_equal(s.numpy(), expected)
        assert torch.equal(packbits.unpack_bits(s, width, n), v)


def test_streams_reject_out_of_range_values_and_wrong_lengths():
    with pytest.raises(ValueError, match="outside"):
        packbits.pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="expected 2 bytes"):
        packbits.unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="outside 1..32"):
        packbits.pack_bits(torch.tensor([1]), 33)


# ----------------------------------------------------------------------------------------------------------
# one layer, every layout: 37 x 771 (odd, not a multiple of anything)


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_round_trip_every_width_with_unstructured_mask(bits, sym):
    mask = random_mask(37, 771)
    q = grid_layer(torch.randn(37, 771), bits, sym=sym, mask=mask)
    entry, tensors = round_trip(q)
    kept = int((~mask).sum())  # a pruned weight stores no code
    assert entry["widths"] == {"table": [bits], "index_bits": 1, "layout": "uniform"}
    assert entry["codes"] == {str(bits): kept} and entry["mask"] == {"kind": "bitmask"}
    assert entry["codes_of"] == "kept" and tensors[f"layer.codes.w{bits}"].numel() == (kept * bits + 7) // 8
    assert ("layer.zero" in tensors) == (not sym)  # a symmetric grid's zero-point is implied


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["bitmask", "2of4"])
def test_a_version_2_layer_with_a_code_for_every_weight_still_decodes(nm):
    """Version 2 stored every weight's code (a pruned one as the zero-point): rebuilt here by hand from the
    grid, its streams decode to the same weights as version 3's kept-only codes."""
    R, C = 37, 772
    mask = nm_mask(R, C) if nm else random_mask(R, C)
    row_bits = torch.tensor([3, 5])[torch.arange(R) % 2]
    q = grid_layer(torch.randn(R, C), row_bits, mask=mask)
    entry, tensors = round_trip(q, nm=nm)
    codes = torch.round(q.weight / q.scale) + q.zero  # [R, 1] grids: one column group
    v2_entry = {k: v for k, v in entry.items() if k != "codes_of"}
    v2 = dict(tensors)
    for w in (3, 5):
        sel = row_bits[:, None].expand(R, C) == w
        v2[f"layer.codes.w{w}"] = packbits.pack_bits(codes[sel].long(), w)
        v2_entry["codes"] = {**v2_entry["codes"], str(w): int(sel.sum())}
    w = packed_layer.decode("layer", v2_entry, lambda part: v2[f"layer.{part}"], torch.float32)
    assert same_bits(w, q.weight)
    assert sum(t.numel() for k, t in v2.items() if ".codes." in k) > sum(
        t.numel() for k, t in tensors.items() if ".codes." in k)  # version 3 is smaller


def test_round_trip_2of4_mask_as_indices_and_fallback_to_bitmask():
    q = grid_layer(torch.randn(37, 772), 3, mask=nm_mask(37, 772))
    entry, tensors = round_trip(q, nm=(2, 4))
    assert entry["mask"] == {"kind": "n:m", "n": 2, "m": 4, "index_bits": 3}
    assert tensors["layer.nm_index"].numel() == (37 * 193 * 3 + 7) // 8
    # 771 columns cannot hold aligned groups of 4: the same pattern is stored as a bitmask
    mask = torch.cat([nm_mask(37, 768), torch.zeros(37, 3, dtype=torch.bool)], dim=1)
    entry, _ = round_trip(grid_layer(torch.randn(37, 771), 3, mask=mask), nm=(2, 4))
    assert entry["mask"] == {"kind": "bitmask"}


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_round_trip_mixed_widths_per_row_with_partial_column_group(sym):
    g = torch.Generator().manual_seed(1)
    row_bits = torch.tensor([2, 3, 4, 5, 6, 8])[torch.randint(0, 6, (37,), generator=g)]
    mask = random_mask(37, 771)
    q = grid_layer(torch.randn(37, 771), row_bits, sym=sym, groupsize=128, mask=mask)
    entry, tensors = round_trip(q)
    assert entry["widths"]["layout"] == "per_set" and entry["widths"]["table"] == [2, 3, 4, 5, 6, 8]
    assert entry["columns"] == {"groups": 7, "groupsize": 128} and tensors["layer.scale"].shape == (37, 7)
    for w, count in entry["codes"].items():
        assert count == int(((row_bits[:, None] == int(w)) & ~mask).sum())  # kept weights of that width


def test_round_trip_mixed_widths_per_row_and_column_group():
    """Widths that change along a row too (any [R, G] table), here with groups of 100 over 771 columns."""
    W, gs = torch.randn(37, 771), 100
    widths = torch.randint(2, 9, (37, 8), generator=torch.Generator().manual_seed(2))
    blocks = [rtn_grid(W[:, c : c + gs], widths[:, i]) for i, c in enumerate(range(0, 771, gs))]
    Q, scale, zero, maxq = (torch.cat([b[k] for b in blocks], dim=1) for k in range(4))
    q = QuantizedLayer("layer", Q, None, scale, zero, maxq, column_groups(771, gs))
    entry, _ = round_trip(q)
    assert entry["widths"]["layout"] == "per_set_group" and entry["mask"] is None


def test_round_trip_widths_per_column_group_shared_by_all_rows():
    """Input-axis groups: one width per column group for every row, stored once per group (G indices)."""
    W, gs, mask = torch.randn(37, 771), 100, random_mask(37, 771)
    W[mask] = 0
    widths = torch.randint(2, 9, (8,), generator=torch.Generator().manual_seed(4))
    blocks = [rtn_grid(W[:, c : c + gs], int(widths[i])) for i, c in enumerate(range(0, 771, gs))]
    Q, scale, zero, maxq = (torch.cat([b[k] for b in blocks], dim=1) for k in range(4))
    q = QuantizedLayer("layer", Q, mask, scale, zero, maxq, column_groups(771, gs))
    entry, tensors = round_trip(q)
    n = len(entry["widths"]["table"])
    assert entry["widths"]["layout"] == "per_group" and n == len(set(widths.tolist()))
    assert tensors["layer.widths"].numel() == (8 * bitstats.index_bits(n) + 7) // 8


def test_round_trip_act_order_g_idx_and_perm():
    """Columns processed in a permuted order: groups are contiguous in that order, scattered in the layer's."""
    W, perm = torch.randn(37, 771), torch.randperm(771, generator=torch.Generator().manual_seed(3))
    inv = torch.argsort(perm)
    p = grid_layer(W[:, perm], 4, groupsize=64)
    q = QuantizedLayer("layer", p.weight[:, inv], None, p.scale, p.zero, p.maxq, p.g_idx[inv], perm=perm)
    entry, tensors = round_trip(q)
    # g_idx at ceil(log2 13) = 4 bits per column, what accounting charges; the groups need no permutation
    assert entry["columns"] == {"groups": 13, "g_idx": True} and not entry["perm"] and "layer.perm" not in tensors
    assert tensors["layer.g_idx"].numel() == (771 * 4 + 7) // 8
    assert torch.equal(packbits.unpack_bits(tensors["layer.g_idx"], 4, 771), q.g_idx)
    # version 1 stored g_idx as int32 [C]: such a layer still decodes to the same weights
    v1 = {**tensors, "layer.g_idx": q.g_idx.to(torch.int32)}
    w = packed_layer.decode("layer", entry, lambda part: v1[f"layer.{part}"], torch.float32)
    assert same_bits(w, q.weight)
    # without column groups the permutation is kept, at ceil(log2 771) = 10 bits per column
    p = grid_layer(W, 4)
    q = QuantizedLayer("layer", p.weight, None, p.scale, p.zero, p.maxq, p.g_idx, perm=perm)
    entry, tensors = round_trip(q)
    assert entry["perm"] and tensors["layer.perm"].numel() == (771 * 10 + 7) // 8
    assert torch.equal(packbits.unpack_bits(tensors["layer.perm"], 10, 771), perm)


def test_round_trip_shared_row_grids_stores_each_group_once():
    """Strategy A: rows of a group share one grid; the parameters are stored per group, not per row."""
    labels = torch.randint(0, 5, (37,), generator=torch.Generator().manual_seed(4))
    bits = torch.tensor([2, 3, 3, 4, 6])[labels]
    q = grid_layer(torch.randn(37, 771), bits, groupsize=256, row_groups=labels, mask=random_mask(37, 771))
    entry, tensors = round_trip(q)
    assert entry["sets"] == 5 and entry["row_groups"] and tensors["layer.scale"].shape == (5, 4)
    assert tensors["layer.row_groups"].numel() == (37 * 3 + 7) // 8


def test_round_trip_pruned_only_and_fp16_models():
    W, mask = torch.randn(37, 771), random_mask(37, 771)
    W[mask] = 0
    q = QuantizedLayer("layer", W, mask, None, None, None, column_groups(771, -1))
    entry, tensors = round_trip(q)
    assert not entry["quantized"] and tensors["layer.values"].numel() == int((~mask).sum())
    # an fp16 run evaluated fp16(scale * (q - zero)): decoding in float32 then casting gives the same
    round_trip(grid_layer(torch.randn(37, 771), 3, groupsize=128), dtype=torch.float16)


def test_encode_refuses_weights_off_their_grid():
    q = grid_layer(torch.randn(37, 771), 4)
    q.weight[3, 5] = torch.nextafter(q.weight[3, 5], torch.tensor(1e9))
    with pytest.raises(ValueError, match="not exactly on their stored grid"):
        packed_layer.encode(q, torch.float32, None)


# ----------------------------------------------------------------------------------------------------------
# bytes on disk = what bits accounting charges (OPT-125m fc2: 768 x 3072)


def _opt125m_cases():
    R, g = 768, torch.Generator().manual_seed(5)
    labels = torch.randint(0, 16, (R,), generator=g)
    group_bits = torch.tensor([3, 4])[torch.randint(0, 2, (16,), generator=g)]
    return {  # name: (layer kwargs, bits, row bits, metadata bits by hand)
        "per-channel 4-bit": (dict(), 4, torch.full((R,), 4), R * 32),
        "g128 4-bit": (dict(groupsize=128), 4, torch.full((R,), 4), R * 24 * 32),
        "mixed per row (MI-B, K=16)": (dict(), group_bits[labels], group_bits[labels], R * 32 + R * 1),
    }


def _kept_code_bits(widths: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(code bits, kept weights): every kept weight at its width, counted by a plain loop over rows."""
    total = 0
    for r in range(mask.shape[0]):
        total += int((~mask[r]).sum()) * int(widths[r])
    return float(total), int((~mask).sum())


@pytest.mark.parametrize("case", list(_opt125m_cases()))
def test_bytes_on_disk_match_bits_accounting(tmp_path, case):
    kw, bits, row_bits, meta = _opt125m_cases()[case]
    mask = random_mask(768, 3072)
    q = grid_layer(torch.randn(768, 3072), bits, mask=mask, **kw)
    _, tensors = packed_layer.encode(q, torch.float32, None)
    save_file(tensors, tmp_path / "packed.safetensors")
    on_disk = sum(packed.tensor_bytes(str(tmp_path / "packed.safetensors")).values())
    codes, metadata, mask_bits = packed_layer.stored_bits(q, None)
    assert (codes, metadata, mask_bits) == (_kept_code_bits(row_bits, mask)[0], meta, 768 * 3072)
    accounted = (codes + metadata + mask_bits) / 8
    assert 0 <= on_disk - accounted < len(tensors), (on_disk, accounted)  # each bit stream pads to a byte


def _on_disk(q: QuantizedLayer, tmp_path) -> int:
    _, tensors = packed_layer.encode(q, torch.float32, None)
    save_file(tensors, tmp_path / "packed.safetensors")
    return sum(packed.tensor_bytes(str(tmp_path / "packed.safetensors")).values())


def test_bytes_on_disk_match_bits_accounting_for_column_orders(tmp_path):
    """Scattered column groups store g_idx at ceil(log2 K) bits per column, act-order without groups its
    permutation at ceil(log2 C): both as bits accounting charges them (768 x 3072, 4 bits, 50% mask)."""
    R, C, g = 768, 3072, torch.Generator().manual_seed(6)
    W, mask, perm = torch.randn(R, C, generator=g), random_mask(R, C), torch.randperm(C, generator=g)
    inv = torch.argsort(perm)
    p = grid_layer(W[:, perm], 4, groupsize=192, mask=mask[:, perm])  # 16 groups, scattered in layer order
    q = QuantizedLayer("layer", p.weight[:, inv], mask, p.scale, p.zero, p.maxq, p.g_idx[inv])
    code_bits = _kept_code_bits(torch.full((R,), 4), mask)[0]
    assert packed_layer.stored_bits(q, None) == (code_bits, R * 16 * 32 + C * 4, R * C)  # g_idx: 4 bits a column
    assert 0 <= _on_disk(q, tmp_path) - (code_bits + R * 16 * 32 + C * 4 + R * C) / 8 < 8
    p = grid_layer(W, 4, mask=mask)
    q = QuantizedLayer("layer", p.weight, mask, p.scale, p.zero, p.maxq, p.g_idx, perm=perm)
    perm_bits = C * bitstats.index_bits(C)
    assert packed_layer.stored_bits(q, None) == (code_bits, R * 32 + perm_bits, R * C)
    assert 0 <= _on_disk(q, tmp_path) - (code_bits + R * 32 + perm_bits + R * C) / 8 < 8


# ----------------------------------------------------------------------------------------------------------
# whole models


@pytest.mark.parametrize("flags", [
    ["--sparsity", "0.5", "--wbits", "4"],
    ["--prunen", "2", "--prunem", "4", "--wbits", "3", "--sym"],
    ["--sparsity", "0.5", "--wbits", "3.5", "--groups", "4", "--strategy", "shared", "--groupsize", "32"],
    ["--sparsity", "0.5"],
    ["--sparsity", "0.5", "--wbits", "4", "--gmp"],
], ids=["4bit-50%", "2of4-3bit-sym", "mi-A-g32", "pruned-only", "magnitude-4bit"])
def test_reloaded_model_equals_the_compressed_one(toy_path, tmp_path, flags):
    model, tok, res, cfg = compress_toy(toy_path, *flags)
    stats = saving.save(model, tok, res, cfg, str(tmp_path / "m"))
    again = packed.load_compressed(str(tmp_path / "m"))
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.lm_head.weight is again.model.decoder.embed_tokens.weight
    manifest = json.loads((tmp_path / "m" / "quantization.json").read_text())
    assert manifest["bytes_on_disk"] == stats["bytes_on_disk"] == sum(
        packed.tensor_bytes(str(tmp_path / "m" / "packed.safetensors")).values())
    if cfg.prunen:
        assert {e["mask"]["kind"] for e in manifest["layers"].values()} == {"n:m"}


@pytest.mark.parametrize("flags", [
    ["--sparsity", "0.5", "--wbits", "4"],
    ["--prunen", "2", "--prunem", "4", "--wbits", "3"],
    ["--sparsity", "0.5", "--wbits", "3.5", "--groups", "4"],
    ["--sparsity", "0.5", "--wbits", "3.5", "--groups", "4", "--strategy", "shared"],
    ["--sparsity", "0.5", "--wbits", "3.5", "--groups", "4", "--mi-axis", "input"],
    ["--sparsity", "0.5", "--wbits", "4", "--act-order"],
    ["--sparsity", "0.5", "--wbits", "4", "--act-order", "--groupsize", "128"],  # 64-wide layers: one group
    ["--sparsity", "0.5", "--wbits", "3.5", "--groups", "4", "--mi-axis", "input", "--act-order"],
], ids=["unstructured", "2of4", "row-groups", "shared-row-grids", "column-groups", "act-order", "act-order-g128",
        "mi-in-act-order"])
def test_each_layer_on_disk_is_what_the_account_charges(toy_path, tmp_path, flags):
    """Kept-only codes, masks, grids, permutations, g_idx and per-group widths take on disk the bits the
    account charges them, per layer; the folder reloads bit for bit."""
    model, tok, res, cfg = compress_toy(toy_path, *flags)
    saving.save(model, tok, res, cfg, str(tmp_path / "m"))
    again = packed.load_compressed(str(tmp_path / "m")).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    manifest = json.loads((tmp_path / "m" / "quantization.json").read_text())
    on_disk = packed.tensor_bytes(str(tmp_path / "m" / "packed.safetensors"))
    for q, acc in zip(res.saved, res.bits, strict=True):
        stored = sum(on_disk[k] for k in manifest["layers"][q.name]["tensors"])
        accounted = (acc.code_bits + acc.metadata_bits + acc.mask_bits) / 8
        streams = len(manifest["layers"][q.name]["tensors"])
        assert abs(stored - accounted) <= streams, (q.name, stored, accounted)  # each bit stream pads to a byte


def test_dense_format_is_plain_save_pretrained(toy_path, tmp_path):
    """--save-format dense: today's fake-quantized save_pretrained, not mistaken for a packed folder."""
    from transformers import AutoModelForCausalLM

    model, tok, res, cfg = compress_toy(toy_path, "--sparsity", "0.5", "--wbits", "4", "--save-format", "dense")
    assert saving.save(model, tok, res, cfg, str(tmp_path / "d")) is None
    a, b = model.state_dict(), AutoModelForCausalLM.from_pretrained(str(tmp_path / "d")).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "d" / "quantization.json").read_text())["format"] == "dense"
    assert not packed.is_packed(str(tmp_path / "d"))


@pytest.mark.slow
def test_save_then_reload_through_opt_mi_gives_the_same_ppl(toy_path, tmp_path, small_eval):
    save, out = tmp_path / "m", tmp_path / "r.json"
    argv = [toy_path, "synthetic", *FAST, "--eval", small_eval, "--sparsity", "0.5", "--wbits", "4",
            "--save", str(save), "--json", str(out)]
    assert opt_mi.main(argv) == 0
    r = json.loads(out.read_text())
    bits = r["bits"]
    assert bits["bytes_on_disk"] == json.loads((save / "quantization.json").read_text())["bytes_on_disk"]
    assert bits["bpw_on_disk"] == pytest.approx(bits["bpw_compressed"], rel=1e-3)  # the account is the format
    assert opt_mi.main([str(save), "synthetic", *FAST, "--eval", small_eval, "--json", str(tmp_path / "re.json")]) == 0
    again = json.loads((tmp_path / "re.json").read_text())
    assert again["ppl"][small_eval] == pytest.approx(r["ppl"][small_eval], rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# damaged folders: one line, exit 2, no result


@pytest.fixture(scope="session")
def saved_toy(toy_path, tmp_path_factory) -> str:
    model, tok, res, cfg = compress_toy(toy_path, "--sparsity", "0.5", "--wbits", "4")
    out = str(tmp_path_factory.mktemp("saved") / "m")
    saving.save(model, tok, res, cfg, out)
    return out


def _damaged(saved_toy, tmp_path, damage) -> str:
    """A copy of the saved toy, damaged, without miq_save.json (whose checksums would catch every damage
    first, tests/test_bad_input.py): the packed format's own checks, as for a folder saved before them."""
    d = tmp_path / "m"
    shutil.copytree(saved_toy, d)
    (d / "miq_save.json").unlink()
    damage(d)
    return str(d)


def _edit_manifest(d, edit) -> None:
    m = json.loads((d / "quantization.json").read_text())
    edit(m)
    (d / "quantization.json").write_text(json.dumps(m))


def _flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


LAYER = "model.decoder.layers.1.fc1"


def _shorter_code_stream(d) -> None:
    """A stream one byte short, consistently so in file and manifest: only decoding can tell."""
    from safetensors.torch import load_file

    t = load_file(str(d / "packed.safetensors"))
    t[f"{LAYER}.codes.w4"] = t[f"{LAYER}.codes.w4"][:-1].clone()
    save_file(t, str(d / "packed.safetensors"))
    _edit_manifest(d, lambda m: m["layers"][LAYER]["tensors"][f"{LAYER}.codes.w4"].update(
        shape=[t[f"{LAYER}.codes.w4"].numel()]))


@pytest.mark.parametrize("damage,expect", [
    (lambda d: _truncate(d / "packed.safetensors", 5000), ["packed.safetensors", "truncated"]),
    (lambda d: _truncate(d / "dense.safetensors", 100), ["dense.safetensors", "truncated"]),
    (lambda d: (d / "dense.safetensors").unlink(), ["dense.safetensors", "missing"]),
    (lambda d: _edit_manifest(d, lambda m: m["layers"][LAYER].update(shape=[256, 65])), [LAYER, "[256, 65]"]),
    (lambda d: _edit_manifest(d, lambda m: m["layers"][LAYER]["tensors"][f"{LAYER}.scale"].update(shape=[9, 1])),
     [f"{LAYER}.scale", "[9, 1]"]),
    (_shorter_code_stream, ["packed.safetensors", "sha256"]),
    (lambda d: _flip_byte(d / "packed.safetensors", -3), ["packed.safetensors", "sha256"]),  # a scale
    (lambda d: _flip_byte(d / "dense.safetensors", -7), ["dense.safetensors", "sha256"]),
    (lambda d: _edit_manifest(d, lambda m: m["layers"][LAYER].pop("codes")), [f"layers.{LAYER}.codes", "missing"]),
    (lambda d: _edit_manifest(d, lambda m: m.pop("tied")), ["quantization.json", "tied is missing"]),
    (lambda d: _edit_manifest(d, lambda m: m.pop("sha256")), ["sha256 is missing"]),
    (lambda d: _edit_manifest(d, lambda m: m["layers"][LAYER]["tensors"][f"{LAYER}.scale"].update(shape=5)),
     [f"tensors.{LAYER}.scale.shape is missing or not a list"]),
    (lambda d: _edit_manifest(d, lambda m: m.update(version=2, sha256="abc")), ["sha256 is missing or not a dict"]),
    (lambda d: (d / "quantization.json").write_text('{"format": "miq-packed", "version": 1, "layers": '),
     ["quantization.json"]),
], ids=["truncated-packed", "truncated-dense", "missing-dense", "layer-shape", "tensor-shape", "short-stream",
        "flipped-scale", "flipped-dense", "no-codes-key", "no-tied-key", "no-checksums", "tensor-spec-type",
        "v2-bad-checksums", "broken-json"])
def test_damaged_folder_is_one_line_and_exit_2(saved_toy, tmp_path, capsys, small_eval, damage, expect):
    d = _damaged(saved_toy, tmp_path, damage)
    out = tmp_path / "r.json"
    code = opt_mi.main([d, "synthetic", *FAST, "--eval", small_eval, "--json", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(piece in err for piece in expect), err
    assert not out.exists()


def test_opening_a_saved_folder_hashes_each_file_once(saved_toy, tmp_path, small_eval, monkeypatch):
    """The marker's and the manifest's checksums, and the reload, share their work: no file is read twice."""
    from miq.checkpoint import formats

    calls = []
    real = formats.sha256
    monkeypatch.setattr(formats, "sha256", lambda path: calls.append(str(path).rsplit("/", 1)[-1]) or real(path))
    assert opt_mi.main([saved_toy, "synthetic", *FAST, "--eval", small_eval]) == 0
    assert sorted(calls) == sorted(set(calls)) and {"packed.safetensors", "dense.safetensors"} <= set(calls)
