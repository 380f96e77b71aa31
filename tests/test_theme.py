"""Every figure, the Lab's and the Teach tab's, follows the page's light or dark theme: transparent backgrounds,
colours that read on white and on a dark page, and page CSS that turns the text light under Gradio's ``.dark``.
(The browser check of the same, in chromium, is tests/test_browser_theme.py.)"""

import json
import re

import pytest
import torch

from imse.app import teach_map, teach_viz, theme, viz
from imse.runs.explain.collapse import CollapseView
from imse.runs.explain.domains import DomainMap, Retrieval
from imse.runs.explain.step import Moved, Pull, StepReport, StreamTally
from imse.runs.lab import LabState

WHITE, DARK = (255, 255, 255), (15, 15, 17)  # Gradio's light page and its dark one (body.dark's background)
NAMES = {"grey": (128, 128, 128), "gray": (128, 128, 128), "red": (255, 0, 0)}
COLOUR_KEYS = {"color", "fillcolor", "bgcolor", "bordercolor", "linecolor", "gridcolor", "zerolinecolor", "arrowcolor"}


def rgba(text: str) -> tuple[float, float, float, float]:
    if text in NAMES:
        return (*NAMES[text], 1.0)
    if text.startswith("#"):
        digits = text[1:] if len(text) == 7 else "".join(c * 2 for c in text[1:])
        return (*(int(digits[i : i + 2], 16) for i in (0, 2, 4)), 1.0)
    values = [float(v) for v in re.findall(r"[\d.]+", text)]
    assert text.startswith("rgb") and len(values) in (3, 4), text
    return (*values[:3], values[3] if len(values) == 4 else 1.0)


def contrast(a, b) -> float:
    """WCAG's contrast ratio of two sRGB colours."""

    def luminance(colour):
        linear = [(v / 255) / 12.92 if v / 255 <= 0.03928 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in colour]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def colours(spec) -> list[str]:
    """Every colour a figure spec names for lines, marks and areas (text colours are the page CSS's business;
    colour scales and embedded images aside)."""
    found = []
    if isinstance(spec, dict):
        for key, value in spec.items():
            if key in COLOUR_KEYS:
                found += [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)]
            elif key not in ("colorscale", "colorway", "source", "template", "font", "textfont", "tickfont"):
                found += colours(value)
    elif isinstance(spec, list):
        for item in spec:
            found += colours(item)
    return found


def lab_state() -> LabState:
    """Every Lab panel's inputs, by hand: two methods, three batches over two domains, a bank, thumbnails."""
    layers = ["model.blocks.0.attn.qkv", "model.blocks.1.attn.qkv"]
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    domains = [dict(name="fog-2", index=0, start=0, end=1), dict(name="snow-2", index=1, start=2, end=2)]
    thumbnails = dict(clean=images, corrupted=images, labels=[1, 2], before=[1, 3], after=[1, 2], domain="snow-2")
    return LabState(
        config={"tau": 0.05},
        methods=["IMSE", "Source"],
        class_names=[f"class {i}" for i in range(10)],
        layer_names=layers,
        batch=3,
        total_batches=3,
        images=96,
        correct={"IMSE": [20, 41, 60], "Source": [19, 38, 55]},
        seen=[32, 64, 96],
        domains=domains,
        alignment=[[0.3, 0.2], [0.25, 0.1]],
        alignment_source=[[0.3, 0.2], [0.2, 0.1]],
        shift_rel=[[0.01, -0.02], [0, 0]],
        shift_history=[[0.001, 0.0], [0.002, 0.0], [0.003, 0.0]],
        frozen_layers=layers[1:],
        expert_std={"IMSE": [0.06, 0.058, 0.05], "Source": [0.06, 0.059, 0.049]},
        top_share={"IMSE": [0.2, 0.25, 0.3], "Source": [0.2, 0.3, 0.4]},
        shift_scores=[None, 0.01, 0.2],
        detections=[2],
        stored=[(2, 1)],
        retrieved=[(2, 0)],
        bank_size=[1, 1, 2],
        thumbnails=thumbnails,
    )


def lab_figures() -> list:
    state = lab_state()
    built = [viz.accuracy_figure(state), viz.collapse_figure(state), viz.alignment_figure(state)]
    built += [viz.alignment_figure(state, True), viz.shift_figure(state), viz.bank_figure(state)]
    return built + [viz.batch_figure(state), viz.empty_figure("Domain bank")]


def teach_figures() -> list:
    names = [f"class {i}" for i in range(10)]
    conditions = ["clean", "corrupted", "IMSE", "IMSE, λ_dm = 0", "TENT"]
    view = CollapseView(
        layers=["b5.qkv", "b5.fc1"],
        conditions=conditions,
        expert_std={c: {"b5.qkv": [0.2, 0.1, 0.05], "b5.fc1": [0.3, 0.1, 0.02]} for c in conditions},
        layer_mean={c: [0.1, 0.09] for c in conditions},
        class_counts={c: [3, 1] + [0] * 8 for c in conditions},
        accuracy={c: 0.5 for c in conditions},
        history={c: [(64, 0.1), (128, 0.09)] for c in conditions[2:]},
    )
    report = StepReport(
        batch=2,
        batches=40,
        entropy=[0.1, 0.5, 0.9],
        margin=0.92,
        reliable=[True, True, False],
        loss=-0.2,
        loss_perturbed=-0.19,
        entropy_term=0.3,
        diversity=0.01,
        lambda_dm=50.0,
        weighted_sum=-0.2,
        pull=Pull(entropy=0.4, diversity=2.1, cosine=0.7),
        lr=7e-4,
        largest_step=7.1e-4,
        pulls=[Pull(entropy=0.5, diversity=2.5, cosine=0.1), Pull(entropy=0.4, diversity=2.1, cosine=0.7)],
        moved=[Moved("blocks.0.attn.qkv", 3, 0.5, 0.5014, 0.0007, 2.9, 2)],
        labels=[0, 1, 2],
        before=[0, 1, 1],
        after=[0, 1, 2],
        source=[0, 2, 1],
        stream=StreamTally(sizes=[3, 3], adapted=[2, 3], source=[1, 2]),
        updated=True,
        skip_reason=None,
    )
    kl = [[0, 0.1, 0.2], [0.1, 0, 0.05], [0.2, 0.05, 0]]
    domains = DomainMap(["clean", "fog", "snow"], {}, kl, [(0.0, 0.0), (0.3, 0.0), (0.0, 0.4)], tau=0.05, kept=0.9)
    retrieval = Retrieval("snow", ["clean", "fog", "snow"], [0.2, 0.05, 0.01], slot=2, shift_from_clean=True,
                          map_slot=2)  # fmt: skip
    return [
        teach_viz.spectrum_figure(
            [3.0, 2.0, 1.0, 0.5], [0.6, 0.85, 0.96, 1.0], "model.blocks.0.attn.qkv", kept={0, 1}, scaled=1, scale=2.0
        ),
        teach_viz.rank_figure([(1, 0.3), (2, 0.6), (4, 0.8)], 0.82, k=2, at_k=0.6, scope="this layer", images=256),
        teach_viz.top5_figure([0.1] * 10, names, "top-5"),
        teach_viz.collapse_experts_figure(view, "b5.qkv"),
        teach_viz.collapse_layers_figure(view),
        teach_viz.collapse_history_figure(view),
        teach_viz.predictions_figure(view, names),
        teach_viz.sample_entropy_figure(report),
        teach_viz.loss_figure(report),
        teach_viz.stream_figure(report),
        teach_map.kl_figure(domains),
        teach_map.domain_map_figure(domains, retrieval),
        teach_map.retrieval_figure(retrieval, 0.05),
    ]


def as_json(figure) -> dict:
    """What the browser gets: ``gr.Plot`` sends the figure's ``to_json``."""
    return json.loads(figure.to_json())


@pytest.mark.parametrize("build", [lab_figures, teach_figures])
def test_every_figure_has_transparent_backgrounds_and_no_colour_of_its_own_there(build):
    for figure in build():
        layout = as_json(figure)["layout"]
        look = layout["template"]["layout"]
        assert rgba(look["paper_bgcolor"])[3] == 0 and rgba(look["plot_bgcolor"])[3] == 0
        assert "paper_bgcolor" not in layout and "plot_bgcolor" not in layout  # nothing paints over the page


@pytest.mark.parametrize("build", [lab_figures, teach_figures])
def test_every_colour_reads_on_a_light_and_on_a_dark_page(build):
    """Opaque colours (lines, markers, bars) keep 2:1 against white and against the dark page; translucent ones
    (grid, shading, "not this one" bars) are neutral greys, which look the same on both."""
    for figure in build():
        spec = as_json(figure)
        for text in colours(spec["data"]) + colours(spec["layout"]) + colours(spec["layout"]["template"]):
            r, g, b, alpha = rgba(text)
            if alpha < 1:
                assert r == g == b, (spec["layout"].get("title"), text)
            else:
                assert min(contrast((r, g, b), WHITE), contrast((r, g, b), DARK)) >= 2.0, (
                    spec["layout"]["title"],
                    text,
                )


def test_text_is_dark_on_a_light_page_and_the_page_css_makes_it_light_on_a_dark_one():
    assert contrast(rgba(theme.TEMPLATE["layout"]["font"]["color"])[:3], WHITE) >= 7  # WCAG AAA on white
    rules = dict(
        (selector.strip(), body.strip()) for selector, body in re.findall(r"([^{}]+)\{([^{}]*)\}", theme.PAGE_CSS)
    )
    assert rules[theme.DARK_TEXT] == "fill: var(--body-text-color) !important;"  # !important beats Plotly's inline fill
    assert theme.DARK_TEXT.startswith(".dark .js-plotly-plot .main-svg text:not(")  # a light page keeps the template's
    for own_contrast in (".hoverlayer", ".heatmap-label", ".bartext-inside"):  # Plotly picks these against their box
        assert own_contrast in theme.DARK_TEXT


def test_heatmap_scales_have_no_end_or_middle_that_merges_with_either_page():
    """The alignment and KL heatmaps run through Viridis (dark purple to yellow); the shift heatmap diverges
    around a mid grey, the colour of every unchanged (and every frozen) expert."""
    lab = [as_json(figure)["data"][0] for figure in lab_figures()[2:5]]
    assert [trace["colorscale"] for trace in lab[:2]] == ["Viridis", "Viridis"]
    kl = as_json(teach_figures()[10])["data"][0]
    assert [kl["colorscale"][0][1], kl["colorscale"][-1][1]] == ["#440154", "#fde725"]  # plotly.py's Viridis
    scale = dict((stop, colour) for stop, colour in lab[2]["colorscale"])
    r, g, b, _ = rgba(scale[0.5])
    assert r == g == b and min(contrast((r, g, b), WHITE), contrast((r, g, b), DARK)) >= 1.5
    for end in (scale[0.0], scale[1.0]):
        assert max(rgba(end)[:3]) - min(rgba(end)[:3]) > 150  # saturated blue and red ends
