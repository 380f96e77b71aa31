"""The Teach tab's σ knob on the shared, cached model: exact, and invisible to other visitors."""

import copy
import re
import threading

import pytest
import torch

from imse.app import teach_data
from imse.core.spectral import spectral_layers
from imse.runs.explain import experts


def predict(backbone, image, layer=None, expert=0, scale=1.0) -> list[float]:
    """The Teach tab's σ knob: probabilities with one expert scaled, through the shared model."""
    sigmas = experts.scale_expert(backbone, layer, expert, scale) if layer else None
    return experts.probabilities(backbone, image[None], sigmas)[0].tolist()


@pytest.fixture(scope="module")
def shared():
    backbone = teach_data.spectral_backbone("builtin")
    image, _ = teach_data.sample_images("builtin", 2)[1]
    return backbone, image, "model.blocks.1.mlp.fc1"


def test_scaling_an_expert_equals_a_copy_whose_sigma_was_scaled(shared):
    backbone, image, layer = shared
    before = spectral_layers(backbone)[layer].S.clone()
    reference = copy.deepcopy(backbone)
    with torch.no_grad():
        spectral_layers(reference)[layer].S[3] *= 2.5
        expected = torch.softmax(reference(image[None].float() / 255)[0], -1)
    assert predict(backbone, image, layer, 3, 2.5) == pytest.approx(expected.tolist(), abs=1e-6)
    assert torch.equal(spectral_layers(backbone)[layer].S, before)  # the shared model was never written


def test_two_visitors_at_once_each_see_only_their_own_scaling(shared):
    backbone, image, layer = shared
    base = predict(backbone, image)
    scaled = predict(backbone, image, layer, 0, 3.0)
    assert scaled != pytest.approx(base)
    seen = {"plain": [], "scaled": []}
    start = threading.Barrier(2)

    def visitor(kind: str) -> None:
        start.wait()
        for _ in range(150):
            if kind == "plain":
                seen[kind].append(predict(backbone, image))
            else:
                seen[kind].append(predict(backbone, image, layer, 0, 3.0))

    threads = [threading.Thread(target=visitor, args=(kind,)) for kind in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(p == pytest.approx(base, abs=1e-6) for p in seen["plain"])
    assert all(p == pytest.approx(scaled, abs=1e-6) for p in seen["scaled"])


# -- the views, by name ------------------------------------------------------------------------------------------


def test_the_layouts_layers_read_from_the_config_are_the_decomposed_models():
    """The layout's choices come from config.json (no timm, no SVD): the same layers, in the same order, with the
    same ranks as the decomposed built-in backbone, and the same layers view 2 measures."""
    from imse.app import teach
    from imse.app.teach_tab import builtin_layers

    ranks, collapse_layers = builtin_layers()
    assert list(ranks.items()) == list(teach.layer_ranks().items())
    assert collapse_layers == teach.diversity_layers()
    targets = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert list(ranks) == [f"model.blocks.{b}.{t}" for b in range(6) for t in targets]  # depth 6, dim 128
    assert set(ranks.values()) == {128}
    assert collapse_layers == [f"model.blocks.{b}.{t}" for b in (3, 4, 5) for t in targets]


@pytest.fixture(scope="module")
def tab():
    import gradio as gr

    from imse.app.teach_tab import teach_tab

    with gr.Blocks() as demo:
        widgets = teach_tab(demo)
    return demo, widgets


def test_every_view_reads_and_writes_the_widgets_it_names(tab):
    """Each event's inputs are the widgets named by its view's keyword-only parameters (none positional), passed
    by keyword, and its outputs the widgets its ``@answers`` declares: nothing is matched by position."""
    import inspect

    from imse.app import teach

    demo, widgets = tab
    wired = {}
    for fn in demo.fns.values():
        view = fn.fn.__wrapped__
        parameters = inspect.signature(view).parameters
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values()), view.__name__
        assert fn.inputs == [widgets[name] for name in parameters] and fn.input_keyword_names == list(parameters)
        assert fn.outputs == [widgets[name] for name in view.outputs]
        wired[view.__name__] = wired.get(view.__name__, 0) + 1
    assert wired == {  # experts: 7 controls, the backbone and the page load; domains: 2, severity, backbone, load
        "on_backbone": 1,
        "experts_view": 9,
        "collapse_view": 1,
        "collapse_layer": 1,
        "step_view": 1,
        "step_many": 1,
        "step_reset": 1,
        "domains_view": 5,
    }
    assert teach.experts_view.outputs == ("experts_text", "why_sigma", "spectrum_plot", "rank_plot", "top5_base",
                                          "top5_edited", "preview")  # fmt: skip


def test_an_answer_goes_to_the_widgets_it_names_and_other_names_are_refused():
    import gradio as gr

    from imse.app.teach import answers
    from imse.app.teach_tab import wire

    @answers("doubled", "note")
    def view(*, number):
        return {"note": "twice", "doubled": 2 * number}

    @answers("doubled")
    def wrong(*, number):
        return {"tripled": 3 * number}

    @answers("doubled")
    def stream(*, number):
        yield {"doubled": number}
        yield {"doubled": 2 * number}

    with gr.Blocks() as demo:
        widgets = dict(number=gr.Number(), doubled=gr.Number(), note=gr.Markdown(), button=gr.Button())
        for each in (view, wrong, stream):
            wire(widgets["button"].click, each, widgets)
    view_fn, wrong_fn, stream_fn = (fn.fn for fn in demo.fns.values())
    assert view_fn(number=4) == {widgets["doubled"]: 8, widgets["note"]: "twice"}
    assert list(stream_fn(number=4)) == [{widgets["doubled"]: 4}, {widgets["doubled"]: 8}]
    with pytest.raises(RuntimeError, match="wrong answered \\['tripled'\\], not its declared \\['doubled'\\]"):
        wrong_fn(number=4)


def test_the_experts_view_answers_and_refuses_bad_input_readably(tmp_path):
    """View 1 on the built-in model answers with exactly the widgets it declares, and anything a caller can send
    wrong (uploads, layers, ranges, names, 3.7 for a whole number) is a readable gr.Error."""
    import gradio as gr
    from PIL import Image

    from imse.app import teach

    layer = next(iter(teach.layer_ranks()))
    experts = dict(backbone="builtin", layer=layer, scope="every layer", k=8, expert=0, scale=1.0)
    answer = teach.experts_view(**experts)
    assert tuple(answer) == teach.experts_view.outputs
    text = answer["experts_text"]
    assert "only the 8 largest experts kept in every one of the 24 layers" in text
    assert "expert 0's σ in `model.blocks.0.attn.qkv` × 1 (that layer only, in either scope)" in text
    assert "unedited **93.8 %** · the k cut alone **14.8 %** (the curve) · both edits **14.8 %**" in text
    scaled = teach.experts_view(**{**experts, "scale": 0.0})["experts_text"]
    assert "the k cut alone **14.8 %** (the curve) · both edits" in scaled and "both edits **14.8 %**" not in scaled
    sigma = float(spectral_layers(teach_data.spectral_backbone("builtin"))[layer].S[2])
    for k, edited in ((8, 2.5 * sigma), (2, 0.0)):  # expert 2 kept, then cut: the red bar is drawn where it is
        spectrum = teach.experts_view(**{**experts, "k": k, "expert": 2, "scale": 2.5})["spectrum_plot"]
        bars = {trace.name: list(trace.y) for trace in spectrum.data if trace.type == "bar"}
        assert bars[f"expert 2: σ × 2.5{'' if k > 2 else ' (cut by k: 0)'}"] == pytest.approx([edited])
        dash = next(t for t in spectrum.data if t.name == "expert 2 before the edit (dash)")
        assert list(dash.y) == pytest.approx([sigma]) and dash.type == "scatter"  # drawn over the bars, not under
    assert "IMSE adapts **1,536** values (the σ of blocks 0–2)" in answer["why_sigma"]
    assert "TENT **3,328**" in answer["why_sigma"] and "every weight would adapt **1,008,522**" in answer["why_sigma"]
    image, _ = teach_data.sample_images("builtin")[0]
    preview = answer["preview"]
    assert preview.shape == (224, 224, 3)  # 32 px, each pixel a 7 × 7 square
    assert (preview[::7, ::7] == image.permute(1, 2, 0).numpy()).all() and (
        preview[6::7, 6::7] == preview[::7, ::7]
    ).all()
    assert "8 of 128 experts kept" in answer["spectrum_plot"].layout.title.text
    assert [round(x) for x in answer["rank_plot"].data[0].x] == [1, 4, 8, 16, 64, 128]  # the grid and this k

    experts["scope"], experts["k"] = "this layer", 4
    notes, bomb, big = tmp_path / "notes.png", tmp_path / "bomb.png", tmp_path / "big.bmp"
    notes.write_text("this is not an image")
    Image.new("1", (6000, 6000)).save(bomb)  # tiny file, 36 million pixels
    big.write_bytes(b"BM" + b"\0" * (teach_data.MAX_UPLOAD_BYTES + 1))
    for path, message in ((notes, "not an image"), (bomb, "pixels"), (big, "MB")):
        with pytest.raises(gr.Error, match=message):
            teach.experts_view(**experts, upload=str(path))
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 40), (200, 10, 10)).save(good)
    assert teach.experts_view(**experts, upload=str(good))["experts_text"].startswith("**your image**")
    for change, message in (
        ({"layer": "model.blocks.99.x"}, "unknown layer"),
        ({"k": 0}, "k must be 1 to 128"),
        ({"k": 3.7}, "k must be a whole number"),
        ({"expert": 128}, "expert must be 0 to 127"),
        ({"scale": True}, "scale must be a number"),
        ({"scale": float("nan")}, "scale must be 0 to 3"),
        ({"scope": "sideways"}, "scope must be"),
        ({"backbone": "/etc/passwd"}, "unknown backbone"),
    ):
        with pytest.raises(gr.Error, match=message):
            teach.experts_view(**{**experts, **change})


def test_views_2_to_4_answer_and_refuse_bad_input_readably(monkeypatch):
    import gradio as gr

    from imse.app import teach

    domains = dict(backbone="builtin", severity=3, stored=["fog"], incoming="snow")
    step = dict(explorer=None, backbone="builtin", corruption="snow", severity=2)
    bad_calls = [
        (teach.domains_view, {**domains, "incoming": "lava"}, "unknown corruption"),
        (teach.domains_view, {**domains, "severity": 9}, "severity must be 1 to 5"),
        (teach.domains_view, {**domains, "severity": 3.7}, "severity must be a whole number"),
        (teach.domains_view, {**domains, "stored": ["../fog"]}, "only corruptions"),
        (teach.step_view, {**step, "severity": 0}, "severity must be 1 to 5"),
        (teach.collapse_layer, dict(collapse_state=None, backbone="builtin", collapse_layer="x"), "press Measure"),
    ]
    for view, arguments, message in bad_calls:
        with pytest.raises(gr.Error, match=message):
            view(**arguments)
    with pytest.raises(gr.Error, match="unknown corruption"):
        next(teach.collapse_view(backbone="builtin", corruption="lava", severity=3, collapse_layer=None))

    first = teach.step_view(**step)
    assert tuple(first) == teach.step_view.outputs
    assert first["step_text"].startswith("**Batch 1** of the stream's 40 (snow 2;")
    assert "samples reliable (H < E0 = 0.921)" in first["step_text"]
    assert first["moved_table"]["headers"] == teach.MOVED_HEADERS
    assert {row[3] for row in first["moved_table"]["value"]} <= {"+7.00e-04", "-7.00e-04"}  # Adam's first step: ±lr
    monkeypatch.setattr(teach, "STEPS_AT_ONCE", 2)  # "Step × 10", two steps long: the default suite stays short
    many = list(teach.step_many(**{**step, "explorer": first["explorer"]}))
    assert all(tuple(answer) == teach.step_view.outputs for answer in many)
    assert [re.match(r"\*\*Batch (\d+)\*\* of the stream's 40", a["step_text"]).group(1) for a in many] == ["2", "3"]
    last = many[-1]["step_text"]
    assert "The stream so far** (192 images;" in last and "over the 3 batches so far" in last
    imse, source, gain = re.search(
        r"IMSE \*\*([\d.]+) %\*\*.*Source \(unadapted\) \*\*([\d.]+) %\*\*.*: ([+-][\d.]+) points", last
    ).groups()
    assert f"{float(imse) - float(source):+.2f}" == gain  # the printed numbers add up
    reset = teach.step_reset(**{**step, "explorer": many[-1]["explorer"]})
    assert reset["step_text"].startswith("Back to the source") and reset["moved_table"] == []
    assert reset["entropy_plot"] is reset["loss_plot"] is reset["stream_plot"] is None
    again = teach.step_view(**{**step, "explorer": reset["explorer"]})
    assert again["step_text"] == first["step_text"]  # the same first step again, exactly
    answer = teach.domains_view(**{**domains, "stored": ["gaussian_noise", "snow"]})
    assert tuple(answer) == teach.domains_view.outputs
    expected = "**Retrieval,** when detection fires: slot 2, **snow** (D = "
    assert expected in answer["domains_text"] and "the code stored for the same corruption." in answer["domains_text"]


# -- the words and the marks -------------------------------------------------------------------------------------


def collapse_view_of(correct: dict[str, int], top: dict[str, int]):
    """A finished view 2 measured on 100 images: each condition's right answers and its top class's count."""
    from imse.runs.explain.collapse import CollapseView

    conditions = list(correct)  # clean, corrupted, then the adapted methods in ADAPTED's order
    counts = {c: [top[c]] + [(100 - top[c]) // 9 + (i < (100 - top[c]) % 9) for i in range(9)] for c in conditions}
    accuracy = {c: correct[c] / 100 for c in conditions}
    right = {c: [i < correct[c] for i in range(100)] for c in conditions}  # nested: the first correct[c] images
    return CollapseView(layers=["l"], conditions=conditions, expert_std={}, layer_mean={c: [0.05] for c in conditions},
                        class_counts=counts, accuracy=accuracy, right=right, finished=True)  # fmt: skip


def test_view_2_reads_its_own_result_and_says_why_when_imse_does_not_win():
    from imse.app.teach_text import collapse_verdict

    top = {"clean": 16, "corrupted": 66, "IMSE": 64, "IMSE, λ_dm = 0": 72, "TENT": 88}
    contrast = collapse_verdict(collapse_view_of({"clean": 93, "corrupted": 27, "IMSE": 33, "IMSE, λ_dm = 0": 27,
                                                  "TENT": 18}, top))  # fmt: skip
    # nested right answers: a gain of g images of 100 has the band 2·√(g(100 − g)/99) (4.8 for 6, 2.0 for 1)
    assert contrast.startswith(
        "Best: **IMSE**, 33.0 % against the unadapted model's 27.0 %: +6 images of 100 (±4.8 images: beyond noise)."
    )
    assert "**Collapsed:** TENT's top-class share rose from 66 % to 88 % (accuracy 18.0 %)." in contrast
    assert (  # IMSE held its share, but so did its lambda_dm = 0 twin: the term is not credited with it
        "Where TENT collapsed, the others did not (top-class share: IMSE 64 %; IMSE, $\\lambda_{dm} = 0$ 72 %; "
        "unadapted 66 %). Without its diversity term IMSE did not collapse either (top-class share 72 %, unadapted "
        "66 %): in this one run, the 10-point rule cannot credit the term with IMSE not collapsing." in contrast
    )
    right = {"clean": 93, "corrupted": 27, "IMSE": 33, "IMSE, λ_dm = 0": 27, "TENT": 18}
    twin_collapsed = collapse_verdict(collapse_view_of(right, {**top, "IMSE, λ_dm = 0": 90}))
    assert "Without its diversity term IMSE collapsed too: here the term is what held it." in twin_collapsed

    flat = dict.fromkeys(top, 16)
    noise = collapse_verdict(collapse_view_of({"clean": 93, "corrupted": 80, "IMSE": 83, "IMSE, λ_dm = 0": 84,
                                               "TENT": 89}, flat))  # fmt: skip
    assert noise.startswith("Best: **TENT**, 89.0 % against the unadapted model's 80.0 %: +9 images of 100 (±5.8")
    assert "Nothing collapsed: no method's top-class share rose 10 points above the unadapted model's 16 %." in noise
    assert (
        "**IMSE did not win here** (6 images behind TENT, ±4.8 images: beyond noise). Nothing collapsed, so the "
        "diversity term, which exists to stop collapse, was not put to the test here." in noise
    )
    assert "Without it (IMSE, $\\lambda_{dm} = 0$) IMSE scored 84.0 %: 1 image ahead of IMSE, within noise." in noise

    tie = collapse_verdict(collapse_view_of({"clean": 93, "corrupted": 27, "IMSE": 28, "IMSE, λ_dm = 0": 27,
                                             "TENT": 26}, flat))  # fmt: skip
    assert tie.startswith("Highest, though not beyond noise: **IMSE**, 28.0 % against the unadapted model's 27.0 %")

    tie = collapse_verdict(collapse_view_of({"clean": 93, "corrupted": 80, "IMSE": 81, "IMSE, λ_dm = 0": 79,
                                             "TENT": 82}, flat))  # fmt: skip
    assert "+2 images of 100 (±2.8 images: within noise); IMSE 1 image behind (±2.0 images: within noise), IMSE" in tie
    assert "$\\lambda_{dm} = 0$ 3 images behind (±3.4 images: within noise), about a tie." in tie
    assert "**IMSE did not win here** (1 image behind TENT, ±2.0 images: within noise)" in tie
    assert "IMSE scored 79.0 %: 2 images behind IMSE, within noise." in tie

    with_sar = collapse_verdict(collapse_view_of({"clean": 93, "corrupted": 27, "IMSE": 33, "IMSE, λ_dm = 0": 27,
                                                  "SAR": 26, "TENT": 18}, {**top, "SAR": 75}))  # fmt: skip
    assert with_sar.endswith(
        " **σ or LayerNorm,** under the same filter and SAM: IMSE, $\\lambda_{dm} = 0$ 27.0 % (top-class share 72 %), "
        "SAR 26.0 % (75 %): 1 image ahead of SAR (±2.0 images: within noise)."
    )
    assert "σ or LayerNorm" not in contrast  # no SAR measured, no such sentence
    same = collapse_verdict(collapse_view_of({"clean": 93, "corrupted": 27, "IMSE": 33, "IMSE, λ_dm = 0": 27,
                                              "SAR": 27, "TENT": 18}, {**top, "SAR": 72}))  # fmt: skip
    assert same.endswith("SAR 27.0 % (72 %): the same score (the same answer on every image).")

    worse = collapse_verdict(collapse_view_of({"clean": 93, "corrupted": 50, "IMSE": 49, "IMSE, λ_dm = 0": 40,
                                               "TENT": 30}, {**top, "IMSE, λ_dm = 0": 80}))  # fmt: skip
    assert worse.startswith("No method beat the unadapted model (50.0 %) on these 100 images.")
    assert "IMSE, $\\lambda_{dm} = 0$'s top-class share rose from 66 % to 80 %" in worse


def test_view_4_tells_detection_from_retrieval_and_the_map_from_the_kl():
    from imse.app.teach_text import domains_text
    from imse.runs.explain.domains import Retrieval

    stored = ["clean", "gaussian_noise", "snow", "contrast"]
    quiet = Retrieval("snow", stored, [0.013, 0.003, 0.002, 0.9], slot=2, shift_from_clean=False, map_slot=1)
    text = domains_text(quiet, 3, 0.05)
    assert "this batch would be D = 0.013 away, under τ = 0.05: no new domain (τ cannot tell it from clean" in text
    assert "retrieve nothing. Coming from contrast instead (D > τ from their slots), detection would fire." in text
    assert "**Retrieval,** when detection fires: slot 2, **snow** (D = 0.002), the code stored for the same" in text
    assert "On the map, slot 1 (gaussian noise) looks nearer: the map is a 2-D approximation" in text
    loud = Retrieval("fog", stored, [0.37, 0.4, 0.3, 0.12], slot=3, shift_from_clean=True, map_slot=3)
    text = domains_text(loud, 3, 0.05, ["gaussian_noise", "snow"])
    assert "over τ = 0.05: detection fires, a new domain starts, and retrieval runs." in text
    assert (
        "Even this nearest slot is over τ: no stored domain is this one, yet retrieval brings back the nearest" in text
    )
    assert "gaussian noise and snow (within τ of clean) would not have been detected" in text
    assert "gaussian noise, snow or contrast instead" in text and "this corruption is not in the bank" in text
    assert "On the map" not in text


def test_every_mark_of_a_teach_figure_is_named_and_no_text_shows_a_raw_subscript():
    """Each trace is in its legend with a name, unless it names itself: bars whose categories are their labels, a
    heatmap with its colour bar; every shape drawn has a legend entry too; no title, axis, legend or category text
    shows a raw ``_`` subscript, nor any label (a map's names) an underscore."""
    from test_theme import as_json, teach_figures

    for figure in teach_figures():
        spec = as_json(figure)
        title = spec["layout"]["title"]["text"]
        traces = spec["data"]
        for trace in traces:
            categories = trace.get("x") if trace.get("orientation") != "h" else trace.get("y")
            if trace["type"] == "heatmap" or trace["type"] == "bar" and all(isinstance(c, str) for c in categories):
                continue
            assert trace.get("showlegend") is not False and trace.get("name"), (title, trace.get("name"))
        for shape in spec["layout"].get("shapes", []):
            assert shape.get("showlegend") and shape.get("name"), title
        texts = [title] + [t.get("name", "") for t in traces] + [str(t.get("x", "")) for t in traces]
        texts += [note.get("text", "") for note in spec["layout"].get("annotations", [])]
        for key, axis in spec["layout"].items():
            if key.startswith(("xaxis", "yaxis")):
                texts.append(str(axis.get("title", {}).get("text", "")))
        assert not any(sub in text for text in texts for sub in ("λ_", "σ_", "L_dm", "E_0")), title
        assert not any("_" in note.get("text", "") for note in spec["layout"].get("annotations", [])), title


def test_the_maps_labels_do_not_collide_and_log_axes_tick_only_round_numbers():
    from imse.app.teach_map import POINT_PX, _box, _overlaps, place_labels
    from imse.app.teach_viz import log_ticks

    points = [(0.0, 0.0), (0.05, 0.0), (0.1, 0.0), (0.0, 0.05), (0.05, -0.04), (1.0, 1.0)]  # five crowded, one alone
    labels = ["gaussian noise", "shot noise", "impulse noise", "clean", "snow", "contrast"]
    offsets = place_labels(points, labels, 300)
    boxes = [_box(300 * x, 300 * y, 7.0 * len(label), o) for (x, y), label, o in zip(points, labels, offsets)]
    dots = [(300 * x - POINT_PX, 300 * y - POINT_PX, 300 * x + POINT_PX, 300 * y + POINT_PX) for x, y in points]
    assert not any(_overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] + dots)
    assert offsets[-1] == (0, POINT_PX + 7.0)  # nothing near: right above its point
    assert place_labels([(0, 0)], [""], 300) == [None]
    sizes = [1.0, 0.75, 0.75, 1.0, 0.75, 1.0]  # smaller labels take smaller boxes, and still meet nothing
    offsets = place_labels(points, labels, 300, sizes)
    boxes = [_box(300 * x, 300 * y, 7.0 * f * len(label), o, 14.0 * f)
             for (x, y), label, o, f in zip(points, labels, offsets, sizes)]  # fmt: skip
    assert not any(_overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1 :] + dots)
    grid = [(0.03 * i, 0.03 * j) for i in range(-6, 7) for j in range(-6, 7)]  # points 9 px apart: no free place
    names = ["" if point != (0.0, 0.0) else "shot noise" for point in grid]
    assert place_labels(grid, names, 300, optional=[True] * len(grid)) == [None] * len(grid)  # left out
    assert place_labels(grid, names, 300).count(None) == len(grid) - 1  # not optional: the least crowded place
    assert log_ticks(0.0011, 0.9) == dict(tickvals=[0.001, 0.01, 0.1, 1], ticktext=["0.001", "0.01", "0.1", "1"])
    assert log_ticks(1, 128, base=2)["ticktext"] == ["1", "2", "4", "8", "16", "32", "64", "128"]
    assert log_ticks(0.02, 0.4)["ticktext"] == ["0.02", "0.05", "0.1", "0.2"]  # one power inside: 1, 2 and 5 times
