"""Exact solvers for the multiple-choice knapsack that bit allocation is.

Problem (all three solvers): costs [K, n] float >= 0, weights [K, n] ints >= 0, non-decreasing along n with
column 0 zero (a group's extra bits over the smallest width), and a capacity; pick one column per group to
minimise the summed cost with the summed weight <= capacity. Each returns the picks [K].

- ``dp``: dynamic programming over the capacity, O(K * cap * n). Exact and fast while the table is small
  (dense and n:m layers, whose weights share a large factor).
- ``core``: a sparse layer charges each row its kept weights, so the capacity is millions of bits and the
  DP's table too large. The Lagrangian relaxation (one multiplier on the capacity) gives in O(K n log)
  a lower bound L and a feasible solution of cost UB; any solution cheaper than UB uses only columns whose
  reduced cost c + lam w - min_j(c + lam w) is <= UB - L (Pisinger's reduction for this problem, see
  Kellerer, Pferschy & Pisinger, "Knapsack Problems", 2004, ch. 11). Most groups keep one column; the
  few left are searched exactly over their Pareto-optimal (weight, cost) partial sums. Milliseconds where
  the integer program took a second; None if the search grows past ``max_work`` (then ``milp``).
- ``milp``: the same problem as a 0/1 program for HiGHS (``scipy.optimize.milp``, relative gap 0): the
  fallback, and an independent check in the tests.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, sparse


def dp(costs: np.ndarray, weights: np.ndarray, cap: int) -> np.ndarray:
    """Picks by DP. Ties: among optimal picks the one with the least weight; then each group, from the last
    backwards, takes the smaller column on exactly equal cost."""
    k, n = costs.shape
    table = np.zeros(cap + 1)
    arg = np.zeros((k, cap + 1), dtype=np.uint8)
    for gi in range(k):
        best = table + costs[gi, 0]
        for j in range(1, n):
            w = int(weights[gi, j])
            if w > cap:  # weights grow with j
                break
            cand = table[: cap + 1 - w] + costs[gi, j]
            better = cand < best[w:]  # strict: equal cost keeps the smaller width
            np.copyto(best[w:], cand, where=better)
            np.copyto(arg[gi, w:], j, where=better)
        table = best

    # the table is non-increasing in capacity; start from the smallest capacity that reaches the optimum
    c = int(np.flatnonzero(table == table[cap])[0])
    picks = np.zeros(k, dtype=np.int64)
    for gi in range(k - 1, -1, -1):
        j = int(arg[gi, c])
        picks[gi] = j
        c -= int(weights[gi, j])
    return picks


def _best_at(costs: np.ndarray, weights: np.ndarray, lam: float) -> np.ndarray:
    """Per group the column minimising cost + lam * weight, the lightest on ties."""
    return np.argmin(costs + lam * weights, axis=1)  # argmin keeps the first (lightest) of equal values


def multiplier(costs: np.ndarray, weights: np.ndarray, cap: int) -> float:
    """The Lagrange multiplier lam >= 0 of the capacity: the smallest at which the groups' lightest
    cost + lam * weight minimisers fit. Where the minimiser changes is where two columns' lines cross, so
    lam is found among those crossings by bisection."""
    rows = np.arange(len(costs))
    if weights[rows, _best_at(costs, weights, 0.0)].sum() <= cap:
        return 0.0
    i, j = np.triu_indices(costs.shape[1], 1)
    dw, dc = weights[:, j] - weights[:, i], costs[:, i] - costs[:, j]
    cand = np.unique(dc[dw > 0] / dw[dw > 0])
    # past every crossing each group takes its lightest column, weight 0: a sentinel well past the largest
    cand = np.append(cand[cand > 0], 2 * cand.max(initial=0.0) + 1)
    lo, hi = 0, len(cand) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if weights[rows, _best_at(costs, weights, cand[mid])].sum() <= cap:
            hi = mid
        else:
            lo = mid + 1
    return float(cand[lo])


def core(costs: np.ndarray, weights: np.ndarray, cap: int, max_work: int = 1 << 22) -> np.ndarray | None:
    """Picks by Lagrangian reduction and an exact search over the groups it leaves open (module docstring).
    Ties: the least total weight among optimal picks. None once the search has weighed ``max_work`` partial
    sums (groups whose costs tie exactly at the multiplier make it a subset-sum search; HiGHS is faster there)."""
    k = len(costs)
    rows = np.arange(k)
    lam = multiplier(costs, weights, cap)
    reduced = costs + lam * weights
    base = _best_at(costs, weights, lam)
    # a feasible start, close to the optimum so that the search below stays small: the minimisers, then
    # the upgrades that save the most cost, one at a time, while one fits in the room left
    room = cap - int(weights[rows, base].sum())
    while lam > 0:
        dw = weights - weights[rows, base][:, None]
        save = np.where((dw > 0) & (dw <= room), costs[rows, base][:, None] - costs, 0.0)
        g, j = np.unravel_index(np.argmax(save), save.shape)
        if save[g, j] <= 0:
            break
        base[g], room = j, room - int(dw[g, j])
    start, upper = base.copy(), float(costs[rows, base].sum())
    reduced -= reduced.min(1, keepdims=True)
    # cost(x) = L + sum of x's reduced costs + lam * (cap - weight(x)) for the Lagrangian bound L, so the
    # start's gap to L is a sum of terms >= 0 (not upper - L, which cancels when lam * cap >> upper)
    gap = float(reduced[rows, base].sum()) + lam * room
    if gap == 0:  # the start meets the bound: optimal (and with lam > 0 it fills cap)
        return base
    # reduced costs carry rounding of order 1e-16 * (c + lam w) each: the margin keeps columns, never drops them
    margin = 1e-12 * k * (float(np.abs(costs).max()) + lam * float(weights.max()))
    allowed = reduced <= gap + margin
    allowed[rows, base] = True
    open_ = np.flatnonzero(allowed.sum(1) > 1)
    # the groups with the closest alternative first: completing their states with the start's columns
    # soon finds better solutions, which narrow the search
    open_ = open_[np.argsort(np.where(allowed[open_] & (reduced[open_] > 0), reduced[open_], np.inf).min(1))]
    fixed = np.setdiff1d(rows, open_)
    picks = base.copy()
    picks[fixed] = np.argmax(allowed[fixed], axis=1)
    room = cap - int(weights[fixed, picks[fixed]].sum())
    fixed_cost = float(costs[fixed, picks[fixed]].sum())

    def after(v):  # sums over the open groups still to come
        return np.concatenate([np.cumsum(v[::-1])[::-1][1:], [0]])

    light_after = after(np.where(allowed[open_], weights[open_], np.iinfo(np.int64).max).min(1))
    rest_w, rest_c = after(weights[open_, base[open_]]), after(costs[open_, base[open_]])

    # Pareto-optimal partial sums over the open groups: weight up, cost strictly down
    sw, sc, srd = np.zeros(1, dtype=np.int64), np.zeros(1), np.zeros(1)
    trail, work = [], 0
    for t, g in enumerate(open_):
        cols = np.flatnonzero(allowed[g] & (reduced[g] <= gap + margin))
        w = (sw[:, None] + weights[g, cols][None, :]).ravel()
        c = (sc[:, None] + costs[g, cols][None, :]).ravel()
        rd = (srd[:, None] + reduced[g, cols][None, :]).ravel()
        parent = np.repeat(np.arange(len(sw)), len(cols))
        item = np.tile(cols, len(sw))
        work += len(w)
        if work > max_work:
            return None
        fits = w + rest_w[t] <= room
        if fits.any():  # a cheaper complete solution narrows the gap by what it saves
            found = fixed_cost + float((c[fits] + rest_c[t]).min())
            if found < upper:
                gap, upper = gap - (upper - found), found
        ok = (w + light_after[t] <= room) & (rd <= gap + margin)
        w, c, rd, parent, item = w[ok], c[ok], rd[ok], parent[ok], item[ok]
        order = np.lexsort((c, w))
        w, c, rd, parent, item = w[order], c[order], rd[order], parent[order], item[order]
        keep = np.ones(len(c), dtype=bool)
        keep[1:] = c[1:] < np.minimum.accumulate(c)[:-1]
        sw, sc, srd = w[keep], c[keep], rd[keep]
        trail.append((parent[keep], item[keep]))
    s = len(sw) - 1  # the heaviest state left is the cheapest, and every state left fits
    for t in range(len(open_) - 1, -1, -1):
        parent, item = trail[t]
        picks[open_[t]] = item[s]
        s = parent[s]
    # the start is among the states unless something cheaper is; a guard against rounding all the same
    return picks if costs[rows, picks].sum() <= costs[rows, start].sum() else start


def milp(costs: np.ndarray, weights: np.ndarray, cap: int) -> np.ndarray:
    """Picks by HiGHS, x[g, j] = 1 when group g takes column j, one per group. Ties: as the solver breaks
    them, deterministically. The capacity row keeps the integer weights and its bound is cap + 1/2: HiGHS
    meets rows to an absolute tolerance (1e-7), and between cap and cap + 1 no integer weight lies, so no
    solution is cut off and none over cap gets in. (Scaling the row to order one made the tolerance relative:
    a 5e7-bit capacity let picks run 5 bits over.) Picks over cap all the same (x off integers by the
    solver's 1e-6) are re-solved with the bound lowered by the excess."""
    k, n = costs.shape
    one_each = sparse.kron(sparse.eye(k), np.ones((1, n)), format="csr")
    limit = cap + 0.5
    while True:
        rows = [optimize.LinearConstraint(one_each, 1, 1),
                optimize.LinearConstraint(weights.reshape(1, -1).astype(np.float64), -np.inf, limit)]
        res = optimize.milp(costs.reshape(-1), constraints=rows, integrality=np.ones(k * n),
                            bounds=optimize.Bounds(0, 1), options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise RuntimeError(f"bit allocation: HiGHS found no solution ({res.message})")
        picks = res.x.reshape(k, n).argmax(1)
        used = int(weights[np.arange(k), picks].sum())
        if used <= cap:
            return picks
        limit -= used - cap
