"""Figures: one house style, ``save_figure`` and the plot helpers every notebook shares.

Every notebook calls :func:`setup_style` once, draws with the helpers below (each draws on an
``Axes`` it is given and returns it, so notebooks compose figures freely) and saves with
``save_figure(fig, "<notebook stem>_<what>")``, which writes ``figures/<name>.png`` (200 dpi) and
``figures/<name>.pdf`` next to each other.

Nothing here runs at import time except importing matplotlib (no style change, no backend change).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "setup_style",
    "figures_dir",
    "save_figure",
    "plot_channel_profile",
    "plot_magnitude_heatmap",
    "plot_mask_heatmap",
    "plot_lines",
    "plot_bytes_vs_sparsity",
    "plot_speed_bars",
    "plot_pareto",
    "pareto_front",
    "annotate_provenance",
]

PNG_DPI = 200
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")

#: colours per pruning strategy / layout, the same in every figure.
COLORS = {
    "dense": "#4d4d4d",
    "per_token_magnitude": "#1f77b4",
    "per_channel_magnitude": "#ff7f0e",
    "output_aware": "#2ca02c",
    "think": "#d62728",
    "semi_structured_2_4": "#9467bd",
    "mustafar": "#1f77b4",
    "ours": "#1f77b4",
    "paper": "#ff7f0e",
    "floor": "#2ca02c",
}


def setup_style(font_size: float = 11.0) -> None:
    """Set the house matplotlib style (readable fonts, light grid, tight PNG/PDF output).

    Parameters
    ----------
    font_size : float, base font size in points (titles +1, tick labels -1).
    """
    import matplotlib as mpl

    if not font_size > 0:
        raise ValueError(f"font_size must be positive, got {font_size!r}")
    mpl.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": PNG_DPI,
            "savefig.bbox": "tight",
            "font.size": font_size,
            "axes.titlesize": font_size + 1,
            "axes.labelsize": font_size,
            "xtick.labelsize": font_size - 1,
            "ytick.labelsize": font_size - 1,
            "legend.fontsize": font_size - 1,
            "legend.frameon": False,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
            "image.cmap": "viridis",
        }
    )


def figures_dir() -> Path:
    """Where figures go: ``$MUSTAFAR_FIGURES`` if set, else ``mustafar.provenance.figures_dir()``
    (``<repo>/figures``)."""
    env = os.environ.get("MUSTAFAR_FIGURES")
    if env:
        return Path(env)
    from mustafar.provenance import figures_dir as repo_figures

    return repo_figures()


def save_figure(fig, name: str, directory: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write ``fig`` as ``<directory>/<name>.png`` (200 dpi) and ``<name>.pdf``.

    Parameters
    ----------
    fig : matplotlib Figure.
    name : str, file stem such as ``"01_kv_distribution_channels"`` (letters, digits, ``_``, ``-``;
        no extension, no directory). Notebooks prefix it with their own stem.
    directory : optional output folder; default :func:`figures_dir`.

    Returns
    -------
    (png_path, pdf_path)
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"figure name {name!r} must be a plain file stem (letters, digits, '_', '-')")
    if not hasattr(fig, "savefig"):
        raise ValueError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    out = Path(directory) if directory is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    png, pdf = out / f"{name}.png", out / f"{name}.pdf"
    fig.savefig(png, dpi=PNG_DPI, bbox_inches="tight")
    # no creation date in the PDF: re-running a notebook gives the same bytes for the same figure
    fig.savefig(pdf, bbox_inches="tight", metadata={"CreationDate": None})
    return png, pdf


def _color(label: str, i: int):
    import matplotlib.pyplot as plt

    if label in COLORS:
        return COLORS[label]
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    if i < len(cycle):
        return cycle[i]
    light = plt.get_cmap("tab20").colors[1::2]  # past the cycle: the light tones, so no two series share a color
    return light[(i - len(cycle)) % len(light)]


def plot_channel_profile(ax, magnitudes, title: str = "", ylabel: str = "max |x| over tokens", labels=None):
    """Per-channel magnitude profile: one line per head.

    Parameters
    ----------
    ax : matplotlib Axes.
    magnitudes : array ``[H, D]`` (or ``[D]``), e.g. max |K| over tokens per channel per head.
    title, ylabel : str.
    labels : optional list of ``H`` legend labels (default ``head 0``, ``head 1``, ...).
    """
    m = np.asarray(magnitudes, dtype=float)
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2:
        raise ValueError(f"magnitudes must be [H, D] or [D], got shape {m.shape}")
    labels = labels if labels is not None else [f"head {h}" for h in range(m.shape[0])]
    for h in range(m.shape[0]):
        ax.plot(np.arange(m.shape[1]), m[h], lw=1.0, label=labels[h])
    ax.set_xlabel("channel")
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, m.shape[1] - 1)
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title)
    return ax


def plot_magnitude_heatmap(ax, x, title: str = "", vmax: float | None = None, colorbar: bool = True):
    """|x| of one head as an image: tokens down, channels across.

    Parameters
    ----------
    x : array ``[T, D]``.
    vmax : shared colour-scale maximum (default: max of this |x|).
    """
    a = np.abs(np.asarray(x, dtype=float))
    if a.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {a.shape}")
    im = ax.imshow(a, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=vmax)
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.grid(False)
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="|x|")
    return ax


def plot_mask_heatmap(ax, mask, title: str = ""):
    """Keep-mask of one head: kept entries dark, pruned light; tokens down, channels across.

    Parameters
    ----------
    mask : bool array ``[T, D]``.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be [T, D], got shape {m.shape}")
    ax.imshow(m, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.grid(False)
    kept = m.mean() if m.size else float("nan")
    ax.set_title(f"{title}\nkept {kept:.0%}" if title else f"kept {kept:.0%}")
    return ax


def plot_lines(ax, df, x: str, y: str, hue: str, title: str = "", xlabel=None, ylabel=None,
               logy: bool = False, marker: str = "o", order: Sequence[str] | None = None):
    """One line per value of ``hue`` of a long-form DataFrame (mean of ``y`` per ``x``).

    Parameters
    ----------
    df : pandas DataFrame with columns ``x``, ``y``, ``hue``.
    order : optional order of the hue values.
    """
    for col in (x, y, hue):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in DataFrame columns {list(df.columns)}")
    keys = list(order) if order is not None else list(dict.fromkeys(df[hue]))
    for i, key in enumerate(keys):
        sub = df[df[hue] == key].groupby(x, sort=True)[y].mean()
        if sub.empty:
            continue
        ax.plot(sub.index, sub.values, marker=marker, ms=4, lw=1.5, label=str(key), color=_color(str(key), i))
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if keys:
        ax.legend()
    return ax


def plot_bytes_vs_sparsity(ax, df, x: str = "sparsity", y: str = "bytes_ratio", hue: str = "layout",
                           title: str = "KV bytes vs dense fp16"):
    """Bytes (fraction of dense) against sparsity, one line per layout; dense at 1.0 for reference."""
    plot_lines(ax, df, x, y, hue, title=title, xlabel="sparsity (fraction pruned per token)",
               ylabel="bytes / dense bytes")
    ax.axhline(1.0, color=COLORS["dense"], lw=1, ls="--", label="dense")
    # layouts that sit exactly on another one (ours == floor) would hide it: restyle later lines
    # that coincide with an earlier one as dashed, wider, and say so in the legend
    lines = [ln for ln in ax.get_lines() if ln.get_label() in set(df[hue].astype(str))]
    for i, ln in enumerate(lines):
        for other in lines[:i]:
            if (len(ln.get_ydata()) == len(other.get_ydata())
                    and all(abs(a - b) < 1e-9 for a, b in zip(ln.get_ydata(), other.get_ydata()))):
                ln.set_linestyle((0, (4, 3)))
                ln.set_linewidth(3)
                ln.set_zorder(other.get_zorder() + 1)
                ln.set_label(f"{ln.get_label()} (= {other.get_label()})")
                break
    ax.set_ylim(0, max(1.1, float(df[y].max()) * 1.05))
    ax.legend()
    return ax


def plot_speed_bars(ax, df, x: str, y: str, hue: str, title: str = "", ylabel: str | None = None,
                    logy: bool = False):
    """Grouped bars: one group per value of ``x`` (e.g. a shape), one bar per ``hue`` (e.g. kernel).

    Parameters
    ----------
    df : long-form DataFrame with columns ``x``, ``y``, ``hue``; ``y`` e.g. time in ms.
    """
    for col in (x, y, hue):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in DataFrame columns {list(df.columns)}")
    groups = list(dict.fromkeys(df[x].astype(str)))
    hues = list(dict.fromkeys(df[hue].astype(str)))
    width = 0.8 / max(1, len(hues))
    xs = np.arange(len(groups))
    for i, h in enumerate(hues):
        sub = df[df[hue].astype(str) == h]
        vals = [sub[sub[x].astype(str) == g][y].mean() for g in groups]
        ax.bar(xs + (i - (len(hues) - 1) / 2) * width, vals, width, label=h, color=_color(h, i))
    ax.set_xticks(xs)
    crowded = len(groups) > 4 or sum(len(g) for g in groups) > 45  # labels would overlap side by side
    rotation = (45 if len(groups) > 8 else 20) if crowded else 0
    ax.set_xticklabels(groups, rotation=rotation, ha="right" if crowded else "center")
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    if len(hues) > 3:  # many bars per group: keep the legend off the bars
        ax.legend(bbox_to_anchor=(1.01, 1.0), loc="upper left")
    else:
        ax.legend()
    return ax


def pareto_front(xs: Iterable[float], ys: Iterable[float]) -> np.ndarray:
    """Indices of the Pareto-optimal points when *smaller* x and *larger* y are better.

    Returns
    -------
    int array of indices, sorted by x ascending.
    """
    xa, ya = np.asarray(list(xs), dtype=float), np.asarray(list(ys), dtype=float)
    if xa.shape != ya.shape:
        raise ValueError(f"xs and ys differ in length: {xa.shape} vs {ya.shape}")
    order = np.lexsort((-ya, xa))  # x ascending, then y descending
    front, best = [], -np.inf
    for i in order:
        if ya[i] > best:
            front.append(i)
            best = ya[i]
    return np.asarray(front, dtype=int)


def plot_pareto(ax, df, x: str, y: str, label: str, title: str = "", xlabel=None, ylabel=None):
    """Scatter of every configuration (x = cost, e.g. KV bytes; y = quality) with the Pareto front.

    Parameters
    ----------
    df : DataFrame with columns ``x``, ``y``, ``label`` (the point's group, e.g. strategy).
    """
    for col in (x, y, label):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in DataFrame columns {list(df.columns)}")
    for i, key in enumerate(dict.fromkeys(df[label].astype(str))):
        sub = df[df[label].astype(str) == key]
        ax.scatter(sub[x], sub[y], s=30, label=key, color=_color(key, i), alpha=0.85)
    idx = pareto_front(df[x], df[y])
    if len(idx):
        ax.plot(df[x].to_numpy()[idx], df[y].to_numpy()[idx], color="k", lw=1, ls="--", label="Pareto front")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend()
    return ax


def annotate_provenance(fig, meta: dict | None, keys: Sequence[str] = ("device", "commit", "date")) -> None:
    """Write ``key: value`` provenance (e.g. device, commit, date of a recorded result) above a figure."""
    if not meta:
        return
    parts = [f"{k}: {meta[k]}" for k in keys if meta.get(k) not in (None, "")]
    if parts:
        # at the top edge: below the axes the tick labels would collide with it
        fig.text(0.01, 1.0, " | ".join(str(p) for p in parts), fontsize=8, color="0.35", ha="left", va="bottom")
