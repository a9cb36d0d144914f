"""What keeps host memory a few layers deep, checked on the mechanism rather than timed or measured as RSS
(bench/bench_memory.py measures that): evaluation's head never makes more than ``LOGITS_BUDGET`` logits at
once, whatever the text, the window or the vocabulary; the walker feeds activations through one buffer; a
layer's error never copies its whole Hessian to float64; the final pass's Cholesky factor is gone before
that error is computed; checks for NaN and inf, the bits account and the packed format's encoding go a chunk
at a time; a finished linear keeps no pass result, and the heap is trimmed after every linear and before the
embeddings are read. Each of these failed before the change that made it hold.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer

import datautils
import sparsegpt_mi
from miq import finite
from miq.checkpoint import packbits, packed_layer
from miq.model import layerwalk, layouts, loading, onload
from miq.options import PassOptions
from miq.run import compress, config
from quant import QuantizedLayer, Quantizer, rtn_grid

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def toy(toy_path):
    model = AutoModelForCausalLM.from_pretrained(toy_path).eval()
    tokens = datautils.get_eval_tokens("synthetic", 32, AutoTokenizer.from_pretrained(toy_path))[:, : 32 * 12]
    return model, layerwalk.eval_windows(tokens, 32)


def _head_sizes(model) -> list[int]:
    """Records the number of logits of every call of the model's head."""
    sizes: list[int] = []
    layouts.of(model).head_modules(model)[-1].register_forward_hook(lambda m, a, out: sizes.append(out.numel()))
    return sizes


@pytest.mark.parametrize("windows_of_logits", [0.3, 1, 2.5, 100])
def test_head_makes_at_most_the_budget_of_logits_and_the_same_losses(toy, windows_of_logits):
    """Slices smaller than a window, of a few windows, crossing window boundaries, or all windows at once:
    every window's loss equals the textbook one (logits of the whole window, cross-entropy, mean)."""
    model, windows = toy
    n, seqlen = windows.shape
    vocab = model.config.vocab_size
    inps, kwargs = layerwalk.capture_inputs(model, windows, CPU)
    hidden = layerwalk.walk(model, inps, kwargs, CPU, batch=4)
    budget = int(windows_of_logits * seqlen * vocab)
    sizes = _head_sizes(model)
    losses = layerwalk.window_losses(model, hidden, windows, CPU, logits_budget=budget)
    assert sizes and max(sizes) <= budget and sum(sizes) == n * (seqlen - 1) * vocab

    expected = []
    for j in range(n):  # the textbook: one window's logits whole
        h = hidden[j]
        for m in layouts.of(model).head_modules(model):
            h = m(h)
        expected.append(nn.functional.cross_entropy(h[:-1].float(), windows[j, 1:]).double())
    torch.testing.assert_close(losses, torch.stack(expected), rtol=1e-5, atol=0)


def test_perplexity_head_calls_stay_within_the_default_budget(toy, monkeypatch):
    """perplexity (what opt_mi.py runs) slices by the module's budget, read at call time."""
    model, windows = toy
    vocab = model.config.vocab_size
    tokens = windows.reshape(1, -1)
    whole = layerwalk.perplexity(model, tokens, windows.shape[1], CPU)
    monkeypatch.setattr(layerwalk, "LOGITS_BUDGET", 5 * vocab)
    sizes = _head_sizes(model)
    sliced = layerwalk.perplexity(model, tokens, windows.shape[1], CPU)
    assert max(sizes) <= 5 * vocab and len(sizes) > windows.shape[0]
    assert abs(sliced - whole) / whole < 1e-5


def test_walk_feeds_activations_through_one_buffer(toy):
    """The outputs overwrite the inputs batch by batch: the walk returns the buffer it was given, holding
    what a walk with a second buffer computes."""
    model, windows = toy
    inps, kwargs = layerwalk.capture_inputs(model, windows, CPU)
    expected = inps.clone()
    for i, layer in enumerate(layerwalk.decoder_layers(model)):  # reference: each layer into a fresh buffer
        expected = torch.cat([layer(expected[j : j + 3], **kwargs[i]) for j in range(0, expected.shape[0], 3)])
    out = layerwalk.walk(model, inps, kwargs, CPU, batch=3)
    assert out.data_ptr() == inps.data_ptr()
    assert torch.equal(out, expected)


def _largest_allocation(fn) -> int:
    """The largest single allocation (bytes) any operator makes while ``fn`` runs (torch's profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as p:
        fn()
    return max(e.cpu_memory_usage for e in p.events())


def test_layer_error_never_copies_the_whole_hessian_to_float64():
    """The same per-row error as 1/2 (w0 - w) H (w0 - w)^T in float64 whole, bit for bit, without an
    [in, in] float64 copy of H (128 MB for 4096 inputs; it was a layer's largest tensor)."""
    torch.manual_seed(0)
    C = 1024
    X = torch.randn(C, 2 * C)
    H = X @ X.t()
    W0 = torch.randn(48, C)
    W = W0 + 0.1 * torch.randn(48, C)
    d = (W0 - W).double()
    assert torch.equal(sparsegpt_mi.layer_error(W0, W, H), 0.5 * ((d @ H.double()) * d).sum(1))
    assert _largest_allocation(lambda: sparsegpt_mi.layer_error(W0, W, H)) < 8 * C * C // 2


def test_final_pass_drops_its_cholesky_factor():
    """After the final pass only W0 and the damped Hessian remain: the factor U ([in, in]) is not kept while
    compression computes the layer's error and encodes it."""
    torch.manual_seed(0)
    g = sparsegpt_mi.SparseGPT(nn.Linear(64, 16))
    for _ in range(3):
        g.add_batch(torch.randn(1, 32, 64), None)
    q = Quantizer()
    q.configure(4, perchannel=True, sym=False)
    g.prune(PassOptions(0.5, 0, 0, 128, 0.01, -1, False), q)
    assert g._factors == {} and g._prepared is not None


def _spy_isfinite(monkeypatch) -> list[int]:
    """The number of values every torch.isfinite call is given, from here on."""
    seen: list[int] = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or real(t))
    return seen


def test_nonfinite_counts_what_isfinite_counts_a_chunk_at_a_time(monkeypatch):
    """The count equals numpy's over the whole tensor for contiguous, column-major (a Cholesky factor's
    layout), strided, 3-d and 0-d tensors, while no isfinite call is given more than the chunk."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 48, generator=g)
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:37]] = float("nan")
    x[3, 5], x[60, 1] = float("inf"), -float("inf")
    seen = _spy_isfinite(monkeypatch)
    for t in (x, x.t(), x.t().contiguous().t(), x[:, ::2], x.reshape(4, 16, 48), x[3, 5], x[0, 0]):
        seen.clear()
        assert finite.nonfinite(t, chunk=100) == int((~np.isfinite(t.numpy())).sum())
        assert seen and max(seen) <= 100


def test_the_factor_is_checked_in_chunks_and_is_the_textbook_one(monkeypatch):
    """_upper_factor's check for NaN and inf never takes more than CHECK_CHUNK values at once (whole, isfinite
    made about 1.75 [in, in] of temporaries, 112 MB at 4096 inputs: the largest term of fc2's peak), and U is
    the upper Cholesky factor of H^-1 computed step by step into fresh tensors."""
    torch.manual_seed(0)
    C = 256
    X = torch.randn(C, 2 * C)
    H = X @ X.t()
    monkeypatch.setattr(finite, "CHECK_CHUNK", 1024)
    seen = _spy_isfinite(monkeypatch)
    U = sparsegpt_mi._upper_factor(H)
    assert seen and max(seen) <= 1024
    assert torch.equal(U, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True))


def test_stored_bits_counts_a_few_rows_at_a_time(monkeypatch):
    """The code bits equal a plain loop over every kept weight at its row set's and column group's width
    (shared row grids, widths per group), without an [R, C] int64 of widths (64 MB for a 1024 x 4096 layer)."""
    g = torch.Generator().manual_seed(1)
    R, C, G = 96, 200, 4
    labels = torch.randint(0, 3, (R,), generator=g)  # three shared row grids
    maxq = (2.0 ** torch.randint(2, 5, (3, G), generator=g).float() - 1)[labels]  # [R, G], one row per set
    g_idx = torch.randint(0, G, (C,), generator=g)
    mask = torch.rand(R, C, generator=g) < 0.4
    q = QuantizedLayer("layer", torch.zeros(R, C), mask, torch.ones(R, G), torch.zeros(R, G), maxq, g_idx,
                       row_groups=labels)
    expected = sum(int(math.log2(maxq[r, g_idx[c]] + 1)) for r in range(R) for c in range(C) if not mask[r, c])
    monkeypatch.setattr(packed_layer, "CODE_ROWS", 8 * C)
    assert packed_layer.stored_bits(q, None)[0] == expected
    assert _largest_allocation(lambda: packed_layer.stored_bits(q, None)) < 8 * R * C // 4


def _compress_layer_loaded(toy_path: str, monkeypatch) -> list[str]:
    """Compress the toy loaded layer by layer (as conftest.compress_toy, with --load layers), recording in
    order each SparseGPT pass (with how many other linears still held a pass result), each trim of the heap
    and each read of the tensors outside the decoder layers."""
    events: list[str] = []
    made: list = []
    init, run_pass, load = sparsegpt_mi.SparseGPT.__init__, sparsegpt_mi.SparseGPT.run_pass, onload.Onloader.load
    real_trim = onload.trim

    def tracked(self, *a, **k):
        init(self, *a, **k)
        made.append(self)

    def watched(self, *a, **k):
        events.append(f"pass {sum(g.result is not None for g in made if g is not self)}")
        return run_pass(self, *a, **k)

    def reading(self, names, layer=None):
        if layer is None and any(self.tensors[n].device.type == "meta" for n in names):
            events.append("ends")
        return load(self, names, layer)

    monkeypatch.setattr(sparsegpt_mi.SparseGPT, "__init__", tracked)
    monkeypatch.setattr(sparsegpt_mi.SparseGPT, "run_pass", watched)
    monkeypatch.setattr(onload.Onloader, "load", reading)
    monkeypatch.setattr(onload, "trim", lambda: events.append("trim") or real_trim())
    cfg = config.parse([toy_path, "synthetic", "--nsamples", "4", "--seqlen", "32", "--sparsity", "0.5",
                        "--wbits", "4", "--analysis-dir", ""])
    src, tokenizer = loading.open_source(toy_path)
    calib = datautils.get_calibration("synthetic", cfg.nsamples, cfg.seed, cfg.seqlen, tokenizer)
    model = loading.load_model(src, "auto", CPU, "layers")
    try:
        compress.compress(model, torch.cat([inp for inp, _ in calib]), cfg, CPU)
    finally:
        loading.release(model)
    return events


def test_each_linear_gives_its_memory_back_before_the_next(toy_path, monkeypatch):
    """No linear holds its pass result (its weights, mask, losses: they were written into the layer and its
    record) once it is done, and the heap is trimmed between two linears' passes, not only between layers:
    each linear's work was left resident until the layer's end, piling up to fc2's peak. The embeddings are
    read after a trim, so that what loading the data freed is not resident beside them."""
    events = _compress_layer_loaded(toy_path, monkeypatch)
    passes = [i for i, e in enumerate(events) if e.startswith("pass")]
    assert len(passes) > 6 and all(events[i] == "pass 0" for i in passes)
    assert all("trim" in events[a:b] for a, b in zip(passes, passes[1:], strict=False))
    reads = [i for i, e in enumerate(events) if e == "ends"]
    assert reads and all(i > 0 and events[i - 1] == "trim" for i in reads)


def test_packing_goes_a_few_rows_at_a_time_and_writes_the_same_bytes(monkeypatch):
    """A layer larger than the chunks (mixed widths per row, column groups, a mask) encodes to the tensors it
    encodes to in one piece, bit for bit, and decodes to its weights, without a [R, C] float32 or int64
    temporary (the grid, codes and checks at once were 130 MB for a 1024 x 4096 layer, the mask's bit
    packing 100 MB)."""
    g = torch.Generator().manual_seed(2)
    R, C = 64, 512
    W = torch.randn(R, C, generator=g)
    mask = torch.rand(R, C, generator=g) < 0.5
    W[mask] = 0
    Q, scale, zero, maxq = rtn_grid(W, torch.tensor([3, 4, 8, 2])[torch.arange(R) % 4], groupsize=128)
    q = QuantizedLayer("layer", Q, mask, scale, zero, maxq, sparsegpt_mi.column_groups(C, 128))
    monkeypatch.setattr(packed_layer, "CODE_ROWS", R * C)
    monkeypatch.setattr(packbits, "PACK_CHUNK", 8 * R * C)
    whole = packed_layer.encode(q, torch.float32, None)
    monkeypatch.setattr(packed_layer, "CODE_ROWS", 4 * C)
    monkeypatch.setattr(packbits, "PACK_CHUNK", 1024)
    entry, tensors = packed_layer.encode(q, torch.float32, None)
    assert entry == whole[0] and tensors.keys() == whole[1].keys()
    assert all(torch.equal(tensors[k], whole[1][k]) for k in tensors)
    assert torch.equal(packed_layer.decode("layer", entry, lambda part: tensors[f"layer.{part}"], torch.float32), Q)
    assert _largest_allocation(lambda: packed_layer.encode(q, torch.float32, None)) < 2 * R * C
