"""Precision@k of an evaluate-index result as an inline SVG bar chart, with the chance level (for the pages)."""
from __future__ import annotations

import html


def precision_at_k_svg(result: dict, *, width: int = 360, height: int = 200) -> str:
    """An inline SVG bar chart of precision@k from an evaluate_* result, with the chance level as a dashed line."""
    points = result["retrieval"]["precision_at_k"]
    chance = result["chance"]["retrieval_precision"]
    left, right, top, bottom = 36, 76, 12, 28     # the chance label ("chance 0.25", ~58 px) sits in the right margin
    plot_w, plot_h = width - left - right, height - top - bottom
    y = lambda v: top + plot_h * (1.0 - v)  # noqa: E731 - value 0..1 -> pixel row
    slot = plot_w / max(1, len(points))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="precision at k">',
             f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - right}" y2="{y(0):.1f}" stroke="#333"/>']
    for tick in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left - 4}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:.1f}</text>')
    for i, (k, v) in enumerate(points.items()):
        x = left + i * slot + slot * 0.2
        parts.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{slot * 0.6:.1f}" height="{plot_h * v:.1f}" '
                     f'fill="#4a7bd0"><title>precision@{html.escape(k)}: {v:.3f}</title></rect>')
        parts.append(f'<text x="{x + slot * 0.3:.1f}" y="{y(v) - 3:.1f}" font-size="11" text-anchor="middle">{v:.2f}</text>')
        parts.append(f'<text x="{x + slot * 0.3:.1f}" y="{height - bottom + 14}" font-size="11" '
                     f'text-anchor="middle">P@{html.escape(k)}</text>')
    parts.append(f'<line x1="{left}" y1="{y(chance):.1f}" x2="{width - right}" y2="{y(chance):.1f}" stroke="#c33" '
                 f'stroke-dasharray="4 3"><title>chance: {chance:.3f}</title></line>')
    parts.append(f'<text x="{width - right + 4}" y="{y(chance) + 4:.1f}" font-size="10" fill="#c33" '
                 f'text-anchor="start">chance {chance:.2f}</text>')
    parts.append("</svg>")
    return "".join(parts)
