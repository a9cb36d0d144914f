"""bitstats.layer_bits / summarize against bit counts worked out by hand from the README's conventions."""

import math

import pytest

from miq import bitstats


def _bits(*args, **kw) -> bitstats.LayerBits:
    return bitstats.layer_bits(bitstats.Stored(*args, **kw))


def test_grouped_layer_counts_every_kind_of_bit():
    # 4 rows x 10 columns, rows at 2, 3, 4, 4 bits, 4 scale/zero pairs, 2 groups out of 6 choices, 1-bit mask
    b = _bits(4, 10, [2, 3, 4, 4], n_param_sets=4, n_groups=2, n_choices=6, mask="unstructured")
    assert b.weights == 40
    assert b.weight_bits == (2 + 3 + 4 + 4) * 10
    # 32 bits per pair, 3 bits (6 choices) per group's width, 1 bit (2 groups) per row's group index
    assert b.metadata_bits == 4 * 32 + 2 * 3 + 4 * 1
    assert b.mask_bits == 40


def test_every_row_its_own_group_needs_no_group_index():
    b = _bits(8, 16, [3] * 8, n_param_sets=8, n_groups=8, n_choices=4, mask=None)
    assert b.metadata_bits == 8 * 32 + 8 * 2  # the width table only: no index when groups == rows
    assert b.mask_bits == 0


def test_unquantized_and_uniform_layers():
    dense = _bits(3, 5, None, n_param_sets=0, n_groups=None, n_choices=6, mask=None)
    assert (dense.weight_bits, dense.metadata_bits) == (16 * 15, 0)
    g = _bits(3, 256, [4, 4, 4], n_param_sets=3 * 2, n_groups=None, n_choices=6, mask=None)
    assert g.metadata_bits == 6 * 32  # two --groupsize 128 blocks per row, no table, no index


def test_n_m_mask_bits():
    b = _bits(2, 8, [4, 4], 2, None, 6, (2, 4))
    assert b.mask_bits == 16 / 4 * math.ceil(math.log2(math.comb(4, 2)))  # C(4,2) = 6 patterns: 3 bits per 4


def test_summarize_is_weighted_by_weights():
    a = _bits(4, 10, [2, 2, 2, 2], 4, None, 6, "unstructured")  # 40 weights at 2 bits
    b = _bits(2, 10, [8, 8], 2, None, 6, None)  # 20 weights at 8 bits
    s = bitstats.summarize([a, b])
    assert s["avg_weight_bits"] == pytest.approx((80 + 160) / 60)
    assert s["metadata_bpw"] == pytest.approx(6 * 32 / 60)
    assert s["bpw"] == pytest.approx(s["avg_weight_bits"] + s["metadata_bpw"])
    assert s["mask_bpw"] == pytest.approx(40 / 60)
    assert s["bpw_compressed"] == pytest.approx(s["bpw"]) and s["compressed_fraction"] == 1.0
    assert bitstats.summarize([])["bpw"] == 16.0


def test_whole_decoder_counts_uncompressed_weights_at_16():
    # --prune_only fc1 --wbits 3: a third of the decoder at 3 bits (+ metadata), two thirds fp16
    fc1 = _bits(4, 12, [3] * 4, 4, None, 6, None)
    s = bitstats.summarize([fc1], total_weights=3 * 48)
    assert s["compressed_fraction"] == pytest.approx(1 / 3)
    assert s["bpw_compressed"] == pytest.approx((3 * 48 + 4 * 32) / 48)
    assert s["bpw"] == pytest.approx((3 * 48 + 4 * 32 + 16 * 96) / 144)
    assert s["avg_weight_bits"] == pytest.approx((3 * 48 + 16 * 96) / 144)


def test_symmetric_grids_store_no_zero_point_and_runs_no_group_index():
    asym = _bits(8, 16, [3] * 8, 8, None, 6, None)
    sym = _bits(8, 16, [3] * 8, 8, None, 6, None, sym=True)
    assert asym.metadata_bits - sym.metadata_bits == 8 * 16  # one fp16 zero-point per parameter set
    runs = _bits(8, 16, [3] * 8, 8, 2, 6, None, indexed=0)
    assert runs.metadata_bits == 8 * 32 + 2 * 3  # scale/zero pairs and the width table, no per-row index


def test_column_groups_index_every_input_column():
    # 4 rows x 12 columns in K = 3 column groups at 2, 3, 4 bits over 4 columns each: a grid per row and group
    b = _bits(4, 12, [3.0] * 4, 4 * 3, 3, 6, None, indexed=12)
    assert b.weight_bits == (2 + 3 + 4) * 4 * 4
    assert b.metadata_bits == 12 * 32 + 3 * 3 + 12 * 2  # pairs, width table, g_idx of every column
    perm = _bits(4, 12, [3] * 4, 4, None, 6, None, extra_bits=12 * bitstats.index_bits(12))
    assert perm.metadata_bits == 4 * 32 + 12 * 4  # act-order's permutation: 4 bits per column
