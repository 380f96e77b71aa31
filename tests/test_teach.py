"""The Teach tab's σ knob on the shared, cached model: exact, and invisible to other visitors."""

import copy
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
        "step_reset": 1,
        "domains_view": 5,
    }
    assert teach.experts_view.outputs == ("experts_text", "spectrum_plot", "rank_plot", "top5_base", "top5_edited",
                                          "preview")  # fmt: skip


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
    assert "keeping the 8 largest (every layer)" in answer["experts_text"]
    assert "accuracy on 128 images with k = 8: 14.8 % (all experts: 93.8 %)" in answer["experts_text"]
    assert answer["preview"].shape == (32, 32, 3)
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


def test_views_2_to_4_answer_and_refuse_bad_input_readably():
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
    second = teach.step_view(**{**step, "explorer": first["explorer"]})
    assert tuple(first) == tuple(second) == teach.step_view.outputs
    assert first["step_text"].startswith("Batch 1 of snow 2: 28 of 64 samples under E0 = 0.921;")
    assert second["step_text"].startswith("Batch 2 of snow 2")
    reset = teach.step_reset(**{**step, "explorer": second["explorer"]})
    assert reset["step_text"].startswith("Back to the source") and reset["moved_table"] == []
    assert reset["entropy_plot"] is reset["loss_plot"] is reset["step_predictions_plot"] is None
    again = teach.step_view(**{**step, "explorer": reset["explorer"]})
    assert again["step_text"] == first["step_text"]  # the same first step again, exactly
    answer = teach.domains_view(**{**domains, "stored": ["gaussian_noise", "snow"]})
    assert tuple(answer) == teach.domains_view.outputs
    expected = "top-1 retrieval brings back slot 2, **snow** — the code stored for the same corruption."
    assert expected in answer["domains_text"]
