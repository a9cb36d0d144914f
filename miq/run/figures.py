"""The run's figures of the plotted layer (``--analysis-dir``): its NMI matrix ordered by group and its groups'
sizes, widths and MI; written straight to PNG files (matplotlib, headless "Agg" backend), atomically.
"""

from __future__ import annotations

import numpy as np

from miq import atomic


def _figure(**kwargs):
    """A matplotlib ``Figure``. matplotlib is imported here, on a run's first figure: its import takes a second,
    and every opt_mi.py start (a --help, a refused flag, a run without figures) would pay it."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.use("Agg")  # figures only ever go to files; no display needed
    return Figure(**kwargs)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, possibly on a GPU
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def plot_nmi_heatmap(nmi, labels, path, title: str | None = None):
    """Heatmap of an NMI matrix with the channels ordered by group.

    nmi: [C, C] tensor or array; labels: [C] integer group of each channel. Channels are stably sorted by
    label, white lines mark the group boundaries. The colour scale runs from 0 to the 99th percentile of the
    off-diagonal NMI: the diagonal (1 by definition) and a few duplicate channels would otherwise wash out
    the structure. Writes a 900 x 750 pixel PNG to `path` (atomically) and returns `path`.
    """
    nmi = _to_numpy(nmi).astype(np.float64)
    labels = _to_numpy(labels)
    if nmi.ndim != 2 or nmi.shape[0] != nmi.shape[1]:
        raise ValueError(f"nmi must be a square [C, C] matrix, got shape {nmi.shape}")
    if labels.shape != (nmi.shape[0],):
        raise ValueError(f"labels must have shape ({nmi.shape[0]},), got {labels.shape}")

    order = np.argsort(labels, kind="stable")
    m = nmi[np.ix_(order, order)]
    sorted_labels = labels[order]
    off = m[~np.eye(len(m), dtype=bool)]
    vmax = float(np.quantile(off, 0.99)) if off.size else 1.0
    vmax = vmax if vmax > 0 else 1.0

    fig = _figure(figsize=(9, 7.5), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    for b in np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 0.5:  # between the last and first
        ax.axhline(b, color="white", linewidth=0.8)
        ax.axvline(b, color="white", linewidth=0.8)
    ax.set_xlabel("channel (sorted by group)")
    ax.set_ylabel("channel (sorted by group)")
    n_groups = len(np.unique(labels))
    ax.set_title(title if title is not None else f"NMI, {len(m)} channels in {n_groups} groups")
    fig.colorbar(im, ax=ax, label="NMI", extend="max" if vmax < nmi.max() else "neither")
    fig.tight_layout()
    atomic.write_png(fig, path)
    return path


def plot_grouping_result(group_sizes, group_bits, nmi_intra, nmi_inter, path, title: str | None = None,
                         h_mass=None):
    """Panels per group: size (channels), allocated bits, intra- vs inter-group mean NMI, and, for groups of
    input columns (``h_mass`` [K] given), each group's share of diag H: how much input energy it carries.

    group_sizes, group_bits: [K]; nmi_intra, nmi_inter: [K] floats or None (a singleton group has no intra
    NMI, and layers grouped without MI have none at all). Groups are shown in order of allocated bits, then
    size, so the allocation's shape reads left to right. Writes a 1200 x 900 (1200 x 1150 with h_mass) PNG
    atomically; returns path.
    """
    sizes = np.asarray(group_sizes, dtype=float)
    bits = np.asarray(group_bits, dtype=float)
    k = len(sizes)

    def floats(v):
        v = [np.nan if x is None else x for x in (v or [])]
        return np.asarray(v if len(v) == k else [np.nan] * k, dtype=float)

    intra, inter = floats(nmi_intra), floats(nmi_inter)
    order = np.lexsort((-sizes, bits))
    x = np.arange(k)
    fig = _figure(figsize=(12, 9 if h_mass is None else 11.5), dpi=100)
    axes = fig.subplots(3 if h_mass is None else 4, 1, sharex=True)
    ax1, ax2, ax3 = axes[:3]
    ax1.bar(x, sizes[order], color="tab:blue")
    ax1.set_ylabel("channels")
    ax1.set_title(title or f"{k} groups")
    ax2.bar(x, bits[order], color="tab:orange")
    ax2.set_ylabel("bits")
    ax2.set_ylim(0, max(bits.max(), 1) + 1)
    mean_bits = float((sizes * bits).sum() / sizes.sum())
    ax2.axhline(mean_bits, color="black", linestyle="--", linewidth=1, label=f"mean {mean_bits:.3f} bits")
    ax2.legend(loc="upper left")
    w = 0.4
    ax3.bar(x - w / 2, intra[order], w, label="intra-group NMI", color="tab:green")
    ax3.bar(x + w / 2, inter[order], w, label="inter-group NMI", color="tab:gray")
    ax3.set_ylabel("mean NMI")
    axes[-1].set_xlabel("group (sorted by bits, then size)")
    if h_mass is not None:
        axes[3].bar(x, floats(h_mass)[order], color="tab:red")
        axes[3].set_ylabel("share of diag H")
    ax3.legend(loc="upper left")
    if np.all(np.isnan(intra)) and np.all(np.isnan(inter)):
        ax3.text(0.5, 0.5, "no MI computed for this grouping", transform=ax3.transAxes, ha="center")
    axes[-1].set_xticks(x if k <= 64 else x[:: max(1, k // 32)])
    fig.tight_layout()
    atomic.write_png(fig, path)
    return path


def plot_search_levels(names: list[str], levels: list[dict], path, title: str | None = None):
    """What a search gave each linear (``levels``: the layer records' "level" dicts, walk order): its sparsity
    (an n:m mask as n/m) and its width, one bar per linear, decoder layers apart by dotted lines, the width's
    bar hatched where the grid has column groups. Writes a 1200 x 700 PNG atomically; returns path."""
    x = np.arange(len(levels))
    sparsity = [lv["prunen"] / lv["prunem"] if lv["prunen"] else lv["sparsity"] for lv in levels]
    fig = _figure(figsize=(12, 7), dpi=100)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.bar(x, sparsity, color=["tab:purple" if lv["prunen"] else "tab:blue" for lv in levels])
    ax1.set_ylabel("sparsity (n:m purple)")
    ax1.set_ylim(0, 1)
    ax1.set_title(title or f"levels of {len(levels)} linears")
    bars = ax2.bar(x, [lv["wbits"] for lv in levels], color="tab:orange")
    for bar, lv in zip(bars, levels, strict=True):
        if lv["groupsize"] > 0:
            bar.set_hatch("//")
    ax2.set_ylabel("width (bits; hatched: column groups)")
    layer_of = [n.split(".layers.")[1].split(".")[0] if ".layers." in n else n for n in names]
    for i in range(1, len(names)):
        if layer_of[i] != layer_of[i - 1]:
            for ax in (ax1, ax2):
                ax.axvline(i - 0.5, color="gray", linestyle=":", linewidth=0.8)
    ax2.set_xticks(x if len(x) <= 48 else x[:: max(1, len(x) // 24)])
    ax2.set_xticklabels([names[i].split(".")[-1] for i in ax2.get_xticks().astype(int)], rotation=90, fontsize=7)
    ax2.set_xlabel("linear (walk order; dotted lines between decoder layers)")
    fig.tight_layout()
    atomic.write_png(fig, path)
    return path
