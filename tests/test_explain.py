"""The Teach tab's numbers (imse.runs.explain) against independent computations, on the built-in model."""

import copy
import math

import numpy as np
import pytest
import torch

from imse.app import teach_data
from imse.core.losses import entropy_margin, softmax_entropy
from imse.core.methods import create
from imse.core.spectral import code_layers, get_code, spectral_layers
from imse.data.corruptions import corrupt
from imse.runs.collapse import CollapseMeter
from imse.runs.explain import experts
from imse.runs.explain.collapse import ADAPTED, CollapseView, collapse_progress
from imse.runs.explain.domains import CLEAN, classical_mds, domain_map, retrieve
from imse.runs.explain.step import StepExplorer, StreamTally

LAYER = "model.blocks.2.mlp.fc1"


@pytest.fixture(scope="module")
def model():
    return teach_data.spectral_backbone("builtin")


@pytest.fixture(scope="module")
def data():
    images, labels = teach_data.fashion_test()
    return images[:96], labels[:96]


def _replace_layer(model, name: str, weight: torch.Tensor):
    """A copy of ``model`` whose layer ``name`` is a plain nn.Linear with ``weight`` (and the layer's bias)."""
    twin = copy.deepcopy(model)
    layer = twin.get_submodule(name)
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    parent, _, child = name.rpartition(".")
    setattr(twin.get_submodule(parent), child, linear)
    return twin


@pytest.mark.parametrize("k", [1, 7, 40])
def test_keeping_k_experts_equals_the_truncated_svd_product(model, data, k):
    """Rank-k through ``evaluated_with`` equals a layer whose weight is U_k diag(σ_k) V_kᵀ from an SVD of the
    layer's weight computed here in float64 (numpy), and the shared model is not written."""
    images, _ = data
    layer = spectral_layers(model)[LAYER]
    before = layer.S.detach().clone()
    U, S, Vt = np.linalg.svd(layer.weight().detach().double().numpy(), full_matrices=False)
    truncated = torch.from_numpy((U[:, :k] * S[:k]) @ Vt[:k]).float()
    expected = torch.softmax(_replace_layer(model, LAYER, truncated)(images[:16]), -1)
    got = experts.probabilities(model, images[:16], experts.keep_largest(model, k, LAYER))
    assert torch.allclose(got, expected, atol=2e-5)
    assert torch.equal(layer.S, before)


def test_keeping_every_expert_changes_nothing_and_every_layer_scope_edits_all(model, data):
    images, labels = data
    rank = max(layer.rank for layer in spectral_layers(model).values())
    unedited = experts.probabilities(model, images[:16])
    assert torch.allclose(
        experts.probabilities(model, images[:16], experts.keep_largest(model, rank)), unedited, atol=1e-5
    )
    sigmas = experts.keep_largest(model, 3)
    assert set(sigmas) == set(spectral_layers(model)) and all(int((s != 0).sum()) == 3 for s in sigmas.values())
    predicted = model(images).argmax(-1)
    assert experts.accuracy(model, images, labels) == pytest.approx(float((predicted == labels).float().mean()))


def test_scaling_one_expert_equals_a_copy_whose_sigma_was_scaled(model, data):
    images, _ = data
    twin = copy.deepcopy(model)
    with torch.no_grad():
        spectral_layers(twin)[LAYER].S[5] *= 2.5
    expected = torch.softmax(twin(images[:8]), -1)
    scaled = experts.probabilities(model, images[:8], experts.scale_expert(model, LAYER, 5, 2.5))
    assert torch.allclose(scaled, expected, atol=2e-5)


def test_energy_is_the_cumulative_share_of_the_squared_singular_values():
    S = torch.tensor([0.5, 3.0, 1.0, 2.0])
    squares = np.array([9.0, 4.0, 1.0, 0.25])
    assert experts.energy(S).tolist() == pytest.approx((np.cumsum(squares) / squares.sum()).tolist())


def test_expert_stds_equal_a_numpy_restatement_and_average_to_what_the_meter_reports(model, data):
    images, _ = data
    meter = CollapseMeter(model)
    captured = {}
    handle = model.get_submodule(LAYER.replace("2", "5")).register_forward_pre_hook(
        lambda module, args: captured.setdefault("x", args[0].detach())
    )
    stds, logits = meter.expert_stds(model, images[:32])
    assert torch.equal(logits, model(images[:32]))
    handle.remove()
    name = LAYER.replace("2", "5")
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).double().numpy()
    Vh = spectral_layers(model)[name].Vh.double().numpy()
    alignment = (x @ Vh.T) / np.linalg.norm(x, axis=1, keepdims=True)
    assert stds[name].numpy() == pytest.approx(alignment.std(axis=0, ddof=1), rel=1e-4)
    with meter.measure(model) as reported:
        model(images[:32])
    assert meter.layer_means(stds) == pytest.approx(reported, rel=1e-5)


def test_the_collapse_view_measures_each_method_as_an_independent_run_would(model, data):
    images, labels = data
    settings = {"imse": {"lr": 7e-4}, "sar": {"base_lr": 1e-3}, "tent": {"base_lr": 1e-3}}
    views = list(
        collapse_progress(
            model,
            images,
            labels,
            "contrast",
            3,
            rounds=2,
            steps_per_round=1,
            batch_size=32,
            measured=64,
            settings=settings,
        )  # fmt: skip
    )
    assert [v.images_adapted for v in views] == [0, 32, 64] and views[-1].finished and not views[0].finished
    assert views[0].conditions == ["clean", "corrupted"] and views[-1].conditions == ["clean", "corrupted", *ADAPTED]
    last = views[-1]
    corrupted = corrupt(images, "contrast", 3, generator=torch.Generator().manual_seed(0))
    meter = CollapseMeter(model)
    for label, (name, overrides) in ADAPTED.items():
        method = create(name, copy.deepcopy(model), **{**settings[name], **overrides})
        method(corrupted[:32])
        method(corrupted[32:64])
        stds, _ = meter.expert_stds(method.model, corrupted[:64])
        assert last.expert_std[label][LAYER.replace("2", "5")] == pytest.approx(stds[LAYER.replace("2", "5")].tolist())
        assert last.history[label][-1] == (64, pytest.approx(sum(meter.layer_means(stds)) / len(meter.layers)))
        predicted = method.model(corrupted[:64]).argmax(-1)
        assert last.class_counts[label] == torch.bincount(predicted, minlength=10).tolist()
        assert last.right[label] == (predicted == labels[:64]).tolist()  # per image: what the paired band reads
    clean_means, shifted_means = last.layer_mean["clean"], last.layer_mean["corrupted"]
    assert last.lower_when_corrupted == [n for n, a, b in zip(last.layers, clean_means, shifted_means) if b < a]
    assert sum(last.class_counts["clean"]) == 64


def test_one_step_dissected_is_the_methods_own_update(model, data):
    """Each step is the method's own (a second IMSE on the same corrupted batch moves the same σ); the table is
    the σ furthest from the source σ so far; the two terms' gradients add up to the method's own loss gradient; the
    stream tally counts IMSE's pre-update and the unadapted model's right answers."""
    images, labels = data
    explorer = StepExplorer(model, images, labels, "gaussian_noise", 5, batch_size=32, top=5, lr=7e-4)
    assert explorer.batches == 3
    x = corrupt(images[:32], "gaussian_noise", 5, generator=torch.Generator().manual_seed(0))  # batch 0, seed 0
    assert torch.equal(explorer.batch(0)[0], x) and torch.equal(explorer.batch(3)[0], x)  # a second pass: the same
    twin = copy.deepcopy(model)
    reference = create("imse", twin, lr=7e-4)
    params = list(reference.trainable.values())
    with reference.probe.capture(differentiable=reference.diversity_layers) as stats:
        logits = reference.run_model(x)
    entropy = softmax_entropy(logits)
    loss, _ = reference._loss(entropy, entropy.detach() < reference.entropy_margin(10), stats)
    whole = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
    report = explorer.step()
    with torch.no_grad():
        probabilities = torch.softmax(twin(x).double(), -1)
    by_hand = -(probabilities * probabilities.log()).sum(-1)
    assert report.entropy == pytest.approx(by_hand.tolist(), abs=1e-5)
    assert report.margin == pytest.approx(0.4 * math.log(10)) == pytest.approx(entropy_margin(10))
    assert report.reliable == (by_hand < report.margin).tolist()
    assert report.before == probabilities.argmax(-1).tolist() == report.source and report.labels == labels[:32].tolist()
    cosine = report.pull.cosine
    norm = math.sqrt(
        report.pull.entropy**2 + report.pull.diversity**2 + 2 * cosine * report.pull.entropy * report.pull.diversity
    )
    assert norm == pytest.approx(float(whole.norm()), rel=1e-4)  # ‖g_H + g_dm‖ from the two norms and their cosine
    start = get_code(twin)
    reference(x)
    after = get_code(twin)
    moved = sorted((abs(float(v)) for name, s in after.items() for v in s - start[name]), reverse=True)[:5]
    assert [abs(m.since_source) for m in report.moved] == pytest.approx(moved, abs=1e-7)
    for m in report.moved:
        assert m.now == pytest.approx(float(after[m.layer][m.expert]), abs=1e-7) and m.source == float(
            start[m.layer][m.expert]
        )
        assert m.last_step == pytest.approx(m.since_source, abs=1e-9)  # one step: the step is all the movement
    assert report.weighted_sum == pytest.approx(report.loss, abs=1e-5)
    assert report.weighted_sum == pytest.approx(report.entropy_term - report.lambda_dm * report.diversity, abs=1e-9)
    assert report.after == reference.model(x).argmax(-1).tolist()
    assert report.changed == sum(b != a for b, a in zip(report.before, report.after))
    second = explorer.step()
    assert second.batch == 2 and second.labels == labels[32:64].tolist()
    _the_table_is_ranked_as_printed_and_counts_each_sigmas_steps(second, reference, explorer, start, after)
    assert second.moved[0].last_step != pytest.approx(second.moved[0].since_source)  # two steps: Δσ accumulates
    right = [int((torch.tensor(r.before) == torch.tensor(r.labels)).sum()) for r in (report, second)]
    source = [int((model(explorer.batch(i)[0]).argmax(-1) == labels[32 * i : 32 * i + 32]).sum()) for i in (0, 1)]
    assert (second.stream.adapted, second.stream.source, second.stream.sizes) == (right, source, [32, 32])
    explorer.reset()
    assert explorer.done == 0 and explorer.tally.images == 0
    assert all(torch.equal(s, start[name]) for name, s in get_code(explorer.method.model).items())


def _the_table_is_ranked_as_printed_and_counts_each_sigmas_steps(report, reference, explorer, start, after):
    """After two steps, against a second IMSE stepped on the same batches: the rows are the σ with the largest
    |σ − σ_src| to 3 digits, ties in layer then expert order; each row counts the steps that moved it its overall
    way; the largest step is the largest |change| of the last step; every step's pull is kept."""
    reference(explorer.batch(1)[0])
    now = get_code(reference.model)
    trained = [name for name, layer in code_layers(reference.model).items() if layer.S.requires_grad]
    rows = []
    for order, name in enumerate(trained):
        for i in range(len(now[name])):
            moved = float(now[name][i]) - float(start[name][i])
            first, second = float(after[name][i] - start[name][i]), float(now[name][i] - after[name][i])
            this_way = sum((d > 0) if moved >= 0 else (d < 0) for d in (first, second))
            rows.append((-float(f"{abs(moved):.2e}"), order, i, name, this_way))
    expected = sorted(rows)[: len(report.moved)]
    assert [(m.layer, m.expert, m.steps_this_way) for m in report.moved] == [(r[3], r[2], r[4]) for r in expected]
    last = max(abs(float(now[n][i] - after[n][i])) for n in trained for i in range(len(now[n])))
    assert report.largest_step == pytest.approx(last, rel=1e-4) and len(report.pulls) == 2
    for m in report.moved:
        assert m.layer_largest == float(start[m.layer].max()) and m.tiny == (m.source < 0.01 * m.layer_largest)


def test_adams_first_step_moves_the_largest_sigma_by_lr_exactly(model, data):
    """Adam's bias correction makes its first step lr · g / |g|: no σ moves further than lr, the largest by lr."""
    images, labels = data
    report = StepExplorer(model, images, labels, "contrast", 3, batch_size=32, lr=7e-4).step()
    assert report.largest_step == pytest.approx(7e-4, rel=1e-3)


def test_the_paired_band_of_view_2_is_two_standard_errors_of_the_per_image_difference():
    rng = np.random.default_rng(0)
    right = {c: (rng.random(128) < p).tolist() for c, p in (("clean", 0.9), ("corrupted", 0.3), ("IMSE", 0.35))}
    view = CollapseView(layers=[], conditions=list(right), expert_std={}, layer_mean={}, class_counts={},
                        accuracy={}, right=right)  # fmt: skip
    d = np.array(right["IMSE"], dtype=float) - np.array(right["corrupted"], dtype=float)
    gain, band = view.paired("IMSE")
    assert gain == int(d.sum()) and band == pytest.approx(2 * math.sqrt(128) * d.std(ddof=1))
    assert view.beyond_noise("IMSE") == (abs(d.sum()) > 2 * math.sqrt(128) * d.std(ddof=1))
    assert view.paired("clean")[1] == pytest.approx(
        2 * math.sqrt(128) * (np.array(right["clean"], float) - np.array(right["corrupted"], float)).std(ddof=1)
    )


def test_the_streams_gain_and_its_noise_band_are_the_paired_per_batch_statistics():
    tally = StreamTally(sizes=[64, 64, 64, 64, 32], adapted=[20, 30, 25, 25, 12], source=[18, 31, 25, 22, 10])
    differences = np.array([2 / 64, -1 / 64, 0, 3 / 64, 2 / 32])
    gain, band = tally.gain()
    assert gain == pytest.approx(100 * 6 / 288)
    assert band == pytest.approx(200 * differences.std(ddof=1) / math.sqrt(5))
    assert tally.accuracy("adapted") == pytest.approx(112 / 288)
    # fewer than five batches: no band (two tied batches gave one of width 0, which read as certainty)
    assert StreamTally([64] * 4, [20, 30, 25, 25], [20, 30, 25, 25]).gain() == (0.0, None)
    # per-batch differences 1, -1, 0, 1, -1, then 3 six times: the band includes 0 after batches 5 to 8, not after
    differences = [1, -1, 0, 1, -1, 3, 3, 3, 3, 3, 3]
    late = StreamTally([64] * 11, [20 + d for d in differences], [20] * 11)
    inside = []
    for n in range(5, 12):
        d = np.array(differences[:n]) / 64
        inside.append(abs(100 * d.mean()) <= 200 * d.std(ddof=1) / math.sqrt(n))
    assert inside == [True] * 4 + [False] * 3 and late.last_within_noise() == 8
    assert StreamTally([64] * 4, [1] * 4, [0] * 4).last_within_noise() is None


def test_trainable_counts_are_each_methods_own_and_every_weight_of_the_plain_model(model):
    """IMSE: the σ of every layer in blocks 0..depth-4; TENT: every LayerNorm's scale and shift; SAR: those of
    blocks 0..depth-4; all weights: the backbone as built, before its layers were decomposed."""
    from imse.data.models import create_backbone

    counts = experts.trainable_counts(model, {"imse": {"lr": 7e-4}})
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    early = [m for name, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm) and ".blocks." in f".{name}"
             and int(name.split("blocks.")[1].split(".")[0]) < 3]  # fmt: skip
    assert counts["imse"] == 3 * 4 * 128  # depth 6: blocks 0–2, four layers of rank 128 each
    assert counts["tent"] == sum(2 * m.normalized_shape[0] for m in norms)
    assert counts["sar"] == sum(2 * m.normalized_shape[0] for m in early)
    assert counts["all weights"] == sum(p.numel() for p in create_backbone("builtin").parameters())
    assert all(layer.S.requires_grad is False for layer in spectral_layers(model).values())  # the model untouched


def test_collapse_is_a_rise_of_the_top_class_share_over_the_unadapted_models():
    counts = {
        "clean": [10] * 10,
        "corrupted": [60] + [40] + [0] * 8,
        "IMSE": [65] + [35] + [0] * 8,
        "TENT": [70] + [30] + [0] * 8,
    }
    view = CollapseView(layers=["l"], conditions=list(counts), expert_std={}, layer_mean={}, class_counts=counts,
                        accuracy=dict.fromkeys(counts, 0.5))  # fmt: skip
    assert view.measured == 100 and view.adapted == ["IMSE", "TENT"] and view.correct("TENT") == 50
    assert view.top_share("corrupted") == 0.6 and view.top_share("IMSE") == 0.65 and view.top_share("TENT") == 0.7
    assert view.collapsed() == ["TENT"]  # 70 % is 10 points over 60 %; 65 % is not


def test_classical_mds_recovers_a_planar_configuration_and_says_what_a_flat_map_loses():
    points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0], [-2.0, 0.5]])
    distances = torch.cdist(points, points)
    layout, kept = classical_mds(distances)
    assert torch.allclose(torch.cdist(layout, layout), distances, atol=1e-4) and kept == pytest.approx(1.0)
    solid = torch.tensor([[0.0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 0.5], [1, 1, 1]])  # 3-D: a 2-D map loses the rest
    centred = (solid - solid.mean(0)).double().numpy()
    spread = np.sort(np.linalg.eigvalsh(centred.T @ centred))[::-1]  # the configuration's variance per axis
    assert classical_mds(torch.cdist(solid, solid))[1] == pytest.approx(spread[:2].sum() / spread.sum(), rel=1e-5)


def test_domain_map_and_retrieval_follow_the_symmetric_kl_of_the_descriptors(model, data):
    images, _ = data
    corruptions = ["gaussian_noise", "fog", "contrast"]
    domains = domain_map(model, images[:48], corruptions, 3, tau=0.05)
    assert domains.names == [CLEAN, *corruptions]
    kl = np.array(domains.kl)
    assert np.allclose(kl, kl.T) and np.allclose(np.diag(kl), 0, atol=1e-6)
    a, b = domains.descriptors[CLEAN], domains.descriptors["fog"]
    ma, va, mb, vb = (t.double().numpy() for t in (a.mean, a.var, b.mean, b.var))
    by_hand = np.mean((va + (ma - mb) ** 2) / (2 * vb) + (vb + (ma - mb) ** 2) / (2 * va) - 1)
    assert kl[0, 2] == pytest.approx(by_hand, rel=1e-4)
    result = retrieve(model, domains, ["gaussian_noise", "contrast"], "contrast", images[48:96], severity=3)
    assert result.stored == [CLEAN, "gaussian_noise", "contrast"]
    assert result.slot == int(np.argmin(result.distances))
    incoming = _descriptor_of(model, corrupt(images[48:96], "contrast", 3, generator=torch.Generator().manual_seed(1)))
    slots = [domains.descriptors[name] for name in result.stored]
    assert result.distances == pytest.approx([incoming.distance(slot) for slot in slots])
    at = np.array(domains.xy[domains.names.index("contrast")])
    on_map = [np.linalg.norm(at - np.array(domains.xy[domains.names.index(name)])) for name in result.stored]
    assert result.map_slot == int(np.argmin(on_map)) and 0 < domains.kept <= 1


def _descriptor_of(model, images):
    from imse.core.bank import batch_descriptor, patch_tokens

    return batch_descriptor(patch_tokens(model, images.float() / 255))
