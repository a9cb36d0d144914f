"""What keeps host memory a few layers deep, checked on the mechanism rather than timed or measured as RSS
(bench/bench_memory.py measures that): evaluation's head never makes more than ``LOGITS_BUDGET`` logits at
once, whatever the text, the window or the vocabulary; the walker feeds activations through one buffer; a
layer's error never copies its whole Hessian to float64; the final pass's Cholesky factor is gone before
that error is computed. Each of these failed before the change that made it hold.
"""

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer

import datautils
import sparsegpt_mi
from miq.model import layerwalk, layouts
from miq.options import PassOptions
from quant import Quantizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
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
