"""Shared fixtures and helpers: the built-in toy models, the optional ../shared testbed, and the independent
textbook OBS loop that every SparseGPT implementation detail is checked against."""

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
TESTBED = SHARED / "testbed" / "tiny-opt-dev"
SHARED_DATA = SHARED / "data"


@pytest.fixture(scope="session")
def toy_path() -> str:
    """The toy OPT folder (built and cached on first use, about half a minute)."""
    import toy

    return toy.toy_model_path()


@pytest.fixture(scope="session")
def toy_llama_path() -> str:
    """The toy Llama folder (built and cached on first use, about half a minute)."""
    import toy

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


def obs_loop(W, H, sparsity=0.0, prunen=0, prunem=0, blocksize=128, percdamp=0.01, bits=None, groupsize=-1):
    """Column-by-column OBS pruning (+ quantization), float64, explicit inverse, no blocks."""
    W = W.double().clone()
    H = H.double().clone()
    cols = W.shape[1]
    params = None
    if bits is not None and groupsize == -1:
        params = _minmax_params(W, bits)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    # elimination order is fixed, so [H^-1]_jj as seen at column j does not depend on the weights
    dseq = _schur_diag(Hinv, 0, cols)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(cols):
        if prunen == 0 and sparsity > 0 and i % blocksize == 0:
            i2 = min(i + blocksize, cols)
            sal = W[:, i:i2] ** 2 / dseq[i:i2]
            thresh = torch.sort(sal.flatten())[0][int(sal.numel() * sparsity)]
            mask[:, i:i2] = sal <= thresh
        if prunen and i % prunem == 0:
            sal = W[:, i : i + prunem] ** 2 / dseq[i : i + prunem]
            idx = torch.topk(sal, prunen, dim=1, largest=False)[1]
            mask[:, i : i + prunem].scatter_(1, idx, True)
        if bits is not None and groupsize > 0 and i % groupsize == 0:
            params = _minmax_params(W[:, i : i + groupsize], bits)
        w = W[:, i].clone()
        q = w.clone()
        q[mask[:, i]] = 0
        if params is not None:
            scale, zero, maxq = params
            q = (scale * (torch.clamp(torch.round(q[:, None] / scale) + zero, 0, maxq) - zero)).flatten()
        # processed columns are final; only the remaining ones absorb the error
        W[:, i:] -= torch.outer((w - q) / Hinv[i, i], Hinv[i, i:])
        W[:, i] = q
        Hinv -= torch.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
    return W


def _minmax_params(W, bits):
    """Asymmetric per-row min-max grid, written out from the definition."""
    maxq = 2**bits - 1
    xmin = torch.clamp(W.min(1).values, max=0)
    xmax = torch.clamp(W.max(1).values, min=0)
    both0 = (xmin == 0) & (xmax == 0)
    xmin[both0], xmax[both0] = -1, 1
    scale = ((xmax - xmin) / maxq)[:, None]
    zero = torch.round(-xmin[:, None] / scale)
    return scale, zero, maxq
