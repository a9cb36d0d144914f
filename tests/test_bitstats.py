"""Bits accounting: ``packed_layer.stored_bits`` against bits counted by hand from the format's specification
(``packed.py``), and ``bitstats.summarize`` over layers. (That the counts are the bytes on disk: test_packed.)"""

import math

import pytest
import torch

from miq import bitstats
from miq.checkpoint import packed_layer
from quant import QuantizedLayer, rtn_grid
from sparsegpt_mi import column_groups


def _layer(R, C, bits, *, mask=None, sym=False, groupsize=-1, row_groups=None, g_idx=None, perm=None):
    W = torch.randn(R, C, generator=torch.Generator().manual_seed(R * C))
    if mask is not None:
        W[mask] = 0
    Q, scale, zero, maxq = rtn_grid(W, bits, sym=sym, groupsize=groupsize, row_groups=row_groups)
    g = column_groups(C, groupsize) if g_idx is None else g_idx
    return QuantizedLayer("l", Q, mask, scale, zero, maxq, g, sym=sym, perm=perm, row_groups=row_groups)


def test_rows_at_several_widths_store_codes_for_kept_weights_only():
    # 4 rows x 10 columns at 2, 3, 4, 4 bits; row r prunes its first r + 1 weights
    mask = torch.arange(10)[None, :] <= torch.arange(4)[:, None]
    codes, meta, mask_bits = packed_layer.stored_bits(_layer(4, 10, torch.tensor([2, 3, 4, 4]), mask=mask), None)
    assert codes == 2 * 9 + 3 * 8 + 4 * 7 + 4 * 6
    # a scale and a zero-point per row (fp16 each); widths vary: an index per row into the table {2, 3, 4}
    assert meta == 4 * 32 + 4 * 2
    assert mask_bits == 40


def test_one_width_stores_no_width_index_and_symmetric_grids_no_zero_point():
    codes, meta, _ = packed_layer.stored_bits(_layer(8, 16, 3), None)
    assert (codes, meta) == (8 * 16 * 3, 8 * 32)
    _, meta_sym, _ = packed_layer.stored_bits(_layer(8, 16, 3, sym=True), None)
    assert meta - meta_sym == 8 * 16  # one fp16 zero-point per parameter set
    _, meta_g, _ = packed_layer.stored_bits(_layer(3, 256, 4, groupsize=128), None)
    assert meta_g == 3 * 2 * 32  # two --groupsize 128 groups per row: contiguous, so no g_idx


def test_shared_grids_store_each_set_once_and_every_row_its_set():
    groups = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1])
    _, meta, _ = packed_layer.stored_bits(_layer(8, 16, 3, row_groups=groups), None)
    assert meta == 3 * 32 + 8 * 2  # 3 sets; ceil(log2 3) = 2 bits per row


def test_scattered_column_groups_store_g_idx_and_act_order_its_permutation():
    g_idx = torch.arange(12) % 3  # 3 groups of 4 columns, not contiguous
    q = _layer(4, 12, 4)
    grid = [torch.cat([t] * 3, dim=1) for t in (q.scale, q.zero, q.maxq)]
    scattered = QuantizedLayer("l", q.weight, None, *grid, g_idx)
    _, meta, _ = packed_layer.stored_bits(scattered, None)
    assert meta == 4 * 3 * 32 + 12 * 2  # a grid per (row, group); ceil(log2 3) = 2 bits per column
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    _, meta, _ = packed_layer.stored_bits(_layer(4, 12, 4, perm=perm), None)
    assert meta == 4 * 32 + 12 * 4  # one column group: the order is stored, 4 bits per column


def test_n_m_masks_and_pruned_only_layers():
    mask = torch.tensor([[True, True, False, False, False, True, True, False]] * 2)
    _, _, mask_bits = packed_layer.stored_bits(_layer(2, 8, 4, mask=mask), (2, 4))
    assert mask_bits == 16 / 4 * math.ceil(math.log2(math.comb(4, 2)))  # C(4,2) = 6 patterns: 3 bits per 4
    ragged = mask.clone()
    ragged[0, 2] = True  # three in a group of four: not 2:4, so stored as a bitmask
    _, _, mask_bits = packed_layer.stored_bits(_layer(2, 8, 4, mask=ragged), (2, 4))
    assert mask_bits == 16
    W = torch.randn(2, 8)
    W[mask] = 0
    assert packed_layer.stored_bits(QuantizedLayer("l", W, mask, None, None, None, None), None) == (16 * 8, 0, 16)


def test_summarize_is_weighted_by_weights():
    a = bitstats.LayerBits(40, 20, 20 * 2, 4 * 32, 40)  # 40 weights, 20 kept at 2 bits, 1-bit mask
    b = bitstats.LayerBits(20, 20, 20 * 8, 2 * 32, 0)  # 20 weights at 8 bits
    s = bitstats.summarize([a, b])
    assert s["code_bpw"] == pytest.approx((40 + 160) / 60)
    assert s["metadata_bpw"] == pytest.approx(6 * 32 / 60)
    assert s["mask_bpw"] == pytest.approx(40 / 60)
    assert s["bpw"] == pytest.approx(s["code_bpw"] + s["metadata_bpw"] + s["mask_bpw"])
    assert s["bpw_compressed"] == pytest.approx(s["bpw"]) and s["compressed_fraction"] == 1.0
    assert s["bits_per_kept_weight"] == pytest.approx(200 / 40)
    assert bitstats.summarize([])["bpw"] == 16.0


def test_whole_decoder_counts_uncompressed_weights_at_16():
    # --prune_only fc1 --wbits 3: a third of the decoder at 3 bits (+ metadata), two thirds fp16
    fc1 = bitstats.LayerBits(48, 48, 3 * 48, 4 * 32, 0)
    s = bitstats.summarize([fc1], total_weights=3 * 48)
    assert s["compressed_fraction"] == pytest.approx(1 / 3)
    assert s["bpw_compressed"] == pytest.approx((3 * 48 + 4 * 32) / 48)
    assert s["bpw"] == pytest.approx((3 * 48 + 4 * 32 + 16 * 96) / 144)
    assert s["code_bpw"] == pytest.approx((3 * 48 + 16 * 96) / 144)
