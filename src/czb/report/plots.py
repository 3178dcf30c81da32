"""Plots for reports as inline SVG: no plotting library, no network, no JavaScript.

Every figure is an ``<svg class="plot" data-plot=...>`` element sized by its
``viewBox``, so a report opens anywhere and a browser test can check that each one
was laid out.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np

from czb.core.terminal import printable

#: Colour-blind-safe qualitative palette (Okabe & Ito), then Tableau's for more groups.
PALETTE = (
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
    "#4E79A7", "#F28E2B", "#E15759", "#76B7B2", "#59A14F", "#EDC948", "#B07AA1", "#FF9DA7",
    "#9C755F", "#BAB0AC",
)
BASELINE_COLOUR = "#888888"


def escape(text: object) -> str:
    """Text from a record for HTML: special characters as entities, and control and
    bidirectional-text characters shown escaped (:func:`~czb.core.terminal.printable`), so a
    name cannot reorder what a report shows, nor reach a terminal the HTML is printed on."""
    return html.escape(printable(text))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def bar_chart(
    title: str,
    bars: Sequence[tuple[str, float | None, float | None]],
    *,
    baseline: str | None = None,
    higher_is_better: bool | None = True,
    plot_id: str = "",
) -> str:
    """Horizontal bars with error bars.

    Parameters
    ----------
    title
        Shown above the bars.
    bars
        ``(label, value, error)`` per bar; ``error`` is drawn as ±error (``None``: none);
        a ``None`` value is drawn as "no value".
    baseline
        Label of the baseline bar (drawn grey, with a reference line at its value).
    """
    row, label_w, plot_w, pad = 22, 170, 320, 8
    height = 34 + row * len(bars) + 22
    arrow = "" if higher_is_better is None else (" (higher is better)" if higher_is_better else " (lower is better)")
    # Wide enough for the title (at most about 7.2 px per character of 12 px bold text).
    width = max(label_w + plot_w + 80, int(2 * pad + 7.2 * len(title + arrow)))
    finite = [(v, e or 0.0) for _, v, e in bars if v is not None and math.isfinite(v)]
    lo = min([0.0, *(v - e for v, e in finite)])
    hi = max([0.0, *(v + e for v, e in finite)])
    if hi == lo:
        hi = lo + 1.0

    def x(v: float) -> float:
        return label_w + plot_w * (v - lo) / (hi - lo)

    parts = [
        f'<svg class="plot" data-plot="{escape(plot_id)}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
        f'<text x="{pad}" y="16" class="plot-title">{escape(title)}{escape(arrow)}</text>',
        f'<line x1="{x(0):.1f}" y1="26" x2="{x(0):.1f}" y2="{height - 20}" class="axis"/>',
    ]
    base_value = next((v for label, v, _ in bars if label == baseline and v is not None), None)
    for i, (label, value, error) in enumerate(bars):
        y = 30 + i * row
        colour = BASELINE_COLOUR if label == baseline else PALETTE[i % len(PALETTE)]
        parts.append(f'<text x="{label_w - pad}" y="{y + 14}" text-anchor="end" class="bar-label">'
                     f'{escape(label)}</text>')
        if value is None or not math.isfinite(value):
            parts.append(f'<text x="{label_w + pad}" y="{y + 14}" class="missing">no value</text>')
            continue
        x0, x1 = sorted((x(0), x(value)))
        parts.append(f'<rect x="{x0:.1f}" y="{y + 3}" width="{max(x1 - x0, 1):.1f}" height="{row - 8}" '
                     f'fill="{colour}"><title>{escape(label)}: {_fmt(value)}'
                     f'{"" if not error else f" ± {_fmt(error)}"}</title></rect>')
        if error:
            parts.append(f'<line x1="{x(value - error):.1f}" y1="{y + row / 2:.1f}" x2="{x(value + error):.1f}" '
                         f'y2="{y + row / 2:.1f}" class="error-bar"/>')
        parts.append(f'<text x="{label_w + plot_w + 6}" y="{y + 14}" class="bar-value">{_fmt(value)}</text>')
    if base_value is not None:
        parts.append(f'<line x1="{x(base_value):.1f}" y1="26" x2="{x(base_value):.1f}" y2="{height - 20}" '
                     f'class="baseline-line"/>')
    parts.append(f'<text x="{label_w}" y="{height - 6}" class="tick">{_fmt(lo)}</text>')
    parts.append(f'<text x="{label_w + plot_w}" y="{height - 6}" text-anchor="end" class="tick">{_fmt(hi)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def scatter_map(
    title: str, coordinates: np.ndarray, groups: np.ndarray, *, plot_id: str = "", max_legend: int = 20,
) -> str:
    """A 2-D map of cells coloured by group, with a legend.

    Parameters
    ----------
    coordinates
        ``(n_cells, 2)``.
    groups
        ``(n_cells,)`` group of each cell (labels, batches); groups beyond the
        palette share colours, the legend lists the largest ``max_legend``.
    """
    size, legend_w, pad = 300, 170, 6
    coordinates = np.asarray(coordinates, dtype=np.float64)
    groups = np.asarray(groups).astype(str)
    names, codes, counts = np.unique(groups, return_inverse=True, return_counts=True)
    lo, hi = coordinates.min(axis=0), coordinates.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    xy = pad + (size - 2 * pad) * (coordinates - lo) / span
    xy[:, 1] = size - xy[:, 1]  # y up
    parts = [
        f'<svg class="plot" data-plot="{escape(plot_id)}" viewBox="0 0 {size + legend_w} {size + 20}" '
        f'width="{size + legend_w}" height="{size + 20}" role="img" aria-label="{escape(title)}">',
        f'<text x="{pad}" y="14" class="plot-title">{escape(title)}</text>',
        '<g transform="translate(0,18)">',
    ]
    order = np.random.default_rng(0).permutation(len(xy))  # no group painted over all others
    for code in range(len(names)):
        member = order[codes[order] == code]
        points = "".join(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="1.6"/>' for a, b in xy[member])
        parts.append(f'<g fill="{PALETTE[code % len(PALETTE)]}" fill-opacity="0.75">'
                     f'<title>{escape(names[code])}</title>{points}</g>')
    parts.append("</g>")
    for i, code in enumerate(np.argsort(-counts, kind="stable")[:max_legend]):
        y = 30 + 14 * i
        parts.append(f'<rect x="{size + 4}" y="{y - 8}" width="9" height="9" '
                     f'fill="{PALETTE[code % len(PALETTE)]}"/><text x="{size + 17}" y="{y}" class="legend">'
                     f'{escape(names[code][:24])}</text>')
    if len(names) > max_legend:
        parts.append(f'<text x="{size + 4}" y="{30 + 14 * max_legend}" class="legend">'
                     f'… {len(names) - max_legend} more</text>')
    parts.append("</svg>")
    return "".join(parts)
