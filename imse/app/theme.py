"""One look for every figure, on a light page and on a dark one.

A Space follows its visitor's light or dark theme (Gradio puts ``.dark`` on the page), but a Plotly figure
knows nothing of the page: its default template paints white paper and a blue-grey plot area, which stay white
boxes on a dark page. So every figure (the Lab's and the Teach tab's) uses ``TEMPLATE``: transparent paper and
plot area, grid, axis and zero lines in a translucent grey that reads on white and on black, and text in
Plotly's dark blue-grey. On a dark page ``PAGE_CSS`` (passed to ``demo.launch(css=...)``) turns that text to
the page's own text colour: Plotly writes colours as inline styles, which a stylesheet's ``!important`` beats,
so it applies to every figure, however and whenever it is drawn.
"""

from __future__ import annotations

import functools

__all__ = ["DARK_TEXT", "DIVERGING", "GRID", "MUTED", "NEUTRAL", "PAGE_CSS", "TEMPLATE", "themed"]

TRANSPARENT = "rgba(0,0,0,0)"
GRID = "rgba(128,128,128,0.25)"  # grid lines: faint on white and on black alike
AXIS = "rgba(128,128,128,0.6)"  # zero lines and axis lines, a step stronger
MUTED = "rgba(128,128,128,0.4)"  # "not this one" bars: light grey on white, dark grey on black
NEUTRAL = "#888888"  # a line or mark without a method's colour (mid grey: ~3.5:1 on white and on black)
TEXT = "#2a3f5f"  # Plotly's own text colour, on a light page; a dark page's CSS replaces it
# plotly.js's own "RdBu", spelled out (plotly.py's has a white middle): blue below zero, red above, and zero a
# mid grey, which is neither page's colour, so unchanged experts never read as holes in the heatmap
DIVERGING = [[0.0, "rgb(5,10,172)"], [0.35, "rgb(106,137,247)"], [0.5, "rgb(190,190,190)"],
             [0.6, "rgb(220,170,132)"], [0.7, "rgb(230,145,90)"], [1.0, "rgb(178,10,28)"]]  # fmt: skip


def _axis() -> dict:
    return dict(gridcolor=GRID, linecolor=AXIS, zerolinecolor=AXIS, zerolinewidth=1, automargin=True,
                ticks="", title=dict(standoff=10))  # fmt: skip


TEMPLATE: dict = {
    "layout": {
        "colorway": ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880"],
        "font": {"color": TEXT},
        "paper_bgcolor": TRANSPARENT,
        "plot_bgcolor": TRANSPARENT,
        "hovermode": "closest",
        "hoverlabel": {"align": "left"},
        "legend": {"bgcolor": TRANSPARENT},
        "modebar": {"bgcolor": TRANSPARENT, "color": AXIS, "activecolor": NEUTRAL},
        "xaxis": _axis(),
        "yaxis": _axis(),
        "coloraxis": {"colorbar": {"outlinewidth": 0, "ticks": ""}},
        "shapedefaults": {"line": {"color": NEUTRAL}},  # add_hline and friends: visible on both pages
        "annotationdefaults": {"arrowcolor": NEUTRAL, "arrowhead": 0, "arrowwidth": 1},
        "title": {"x": 0.05},
    }
}

# Scoped under Gradio's .dark: a light page keeps the template's colours. Every text a figure draws turns to the
# page's text colour (titles, ticks of every axis, overlaid ones too, legends, colour bars, notes, bar labels)
# except what Plotly colours to contrast with a box of its own: hover labels, numbers on heatmap cells, text
# inside bars.
DARK_TEXT = ".dark .js-plotly-plot .main-svg text:not(.hoverlayer text, .heatmap-label text, .bartext-inside)"
# On a phone's width Plotly cannot wrap a title or shrink its fonts, and long titles ran off the panel: each of its
# sizes (17 px titles; 14 px axis and subplot titles; 12 px ticks, legends, subtitles) steps down. Plotly placed
# the text for the larger size, so the smaller one only gains room (tests/test_browser_theme.py measures it).
_SMALLER = {17: 14, 14: 11, 12: 10}
_PHONE = (
    "@media (max-width: 480px) {\n"
    + "".join(
        f'  .js-plotly-plot .main-svg text[style*="font-size: {size}px"] {{ font-size: {to}px !important; }}\n'
        for size, to in _SMALLER.items()
    )
    + "}"
)
PAGE_CSS = f"""
{DARK_TEXT} {{ fill: var(--body-text-color) !important; }}
{_PHONE}
"""


@functools.cache
def _template_object():
    import plotly.graph_objects as go

    return go.layout.Template(TEMPLATE)  # validated once, shared by every figure built with graph_objects


def themed(fig):
    """A ``plotly.graph_objects.Figure`` with the page-following template (returns the same figure)."""
    fig.update_layout(template=_template_object())
    return fig
