"""DPAL against its official code (github yushuntang/DPAL: dpal.py, models/dpal_transformer.py), restated here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VIT_LAYOUTS, layout_vit, run_side_by_side, tiny_vit

from imse.core.methods import DPAL, create
from imse.core.methods.dpal import PromptedViT


def restated_forward(prompted, x, normalise=True):
    """models/dpal_transformer.py forward_features + forward_head (74-91), written out: [prompt, CLS, patches] (no
    norm_pre: the official never calls it); before block i > 0 the deep prompt replaces the prompt; after each
    block the predictor's output leaves the CLS token; ``norm`` on every token; then the pool: with
    ``global_pool='avg'`` the mean of every token from ``num_prefix_tokens`` (1, the CLS token's count) on, in the
    prompted layout, so the CLS token too; else the CLS token; ``fc_norm``, the head. ``normalise=False``: the
    images go in as they are (the official ViDA/DPAL runs on a bare timm ViT)."""
    vit, P = prompted.vit, prompted.num_prompts
    if normalise and hasattr(prompted.model, "normalize"):  # a Backbone: the official loader's normalisation
        x = prompted.model.normalize(x)
    h = vit._pos_embed(vit.patch_embed(x))
    h = torch.cat((prompted.prompt.expand(len(x), -1, -1), h), 1)
    noises = []
    for i, block in enumerate(vit.blocks):
        if i:
            h = torch.cat((prompted.deep_prompts[i - 1].expand(len(x), -1, -1), h[:, P:]), 1)
        h = block(h)
        noise = prompted.predictors[i](h[:, :P].reshape(len(x), -1).clone())
        noises.append(noise)
        h[:, P] -= noise
    h = vit.norm(h)
    pooled = h[:, vit.num_prefix_tokens :].mean(1) if vit.global_pool == "avg" else h[:, P]
    return vit.head(vit.fc_norm(pooled)), noises


def test_one_step_is_the_official_update_restated():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    method = create("dpal", tiny_vit(head_scale=20.0), reset_threshold=0.0)
    with torch.no_grad():  # predictors that do something (the official ones start at zero)
        for p in method.prompted.predictors.parameters():
            p.normal_(0, 0.02)
    twin = copy.deepcopy(method.prompted)
    names = dict(method.trainable)  # prompt, deep_prompts, blocks.<i>.norm*.*, predictors.*

    def twin_parameter(name):
        return twin.get_parameter(name) if name.split(".")[0] in ("prompt", "deep_prompts", "predictors") else (
            twin.vit.get_parameter(name))  # fmt: skip

    params = {n: twin_parameter(n) for n in names}
    logits, noises = restated_forward(twin, x)
    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    keep = entropy.detach() < 0.4 * torch.log(torch.tensor(10.0))
    similarity = torch.stack([-F.cosine_similarity(n[:, None], n[None], dim=2).mean() for n in noises]).mean()
    loss = entropy[keep].mean() + keep.sum() / len(x) * similarity
    sam_names = [n for n in names if not n.startswith("predictors.")]
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    grads = dict(zip(names, grads))
    norm = torch.stack([grads[n].norm() for n in sam_names]).norm()
    with torch.no_grad():
        for n in names:
            if n.startswith("predictors."):
                params[n].sub_(0.01 * grads[n])  # SGD, first step: momentum buffer = gradient
        start = {n: params[n].detach().clone() for n in sam_names}
        for n in sam_names:
            params[n].add_(0.05 * grads[n] / (norm + 1e-12))
    second, _ = restated_forward(twin, x)
    entropy2 = -(second.softmax(1) * second.log_softmax(1)).sum(1)[keep]
    loss2 = entropy2[entropy2.detach() < 0.4 * torch.log(torch.tensor(10.0))].mean()
    grads2 = dict(zip(sam_names, torch.autograd.grad(loss2, [params[n] for n in sam_names])))

    returned = method(x)
    assert torch.allclose(returned, logits.detach(), atol=1e-5)  # the first pass (pre-update)
    assert method.last_record["loss"] == float(loss.detach()) and method.last_record["updated"]
    for n in names:
        expected = start[n] - 0.01 * grads2[n] if n in sam_names else params[n].detach()
        assert torch.allclose(names[n], expected, atol=1e-6), n


def test_the_trainable_count_is_the_hand_count_from_the_shapes():
    """d = 64, 6 blocks, 1 prompt: prompts 64 + 5·64; LayerNorms of blocks 0–2: 3·2·2·64; 6 predictors
    (64→64→64 with biases)."""
    method = create("dpal", tiny_vit())
    assert method.num_trainable() == (64 + 5 * 64) + 3 * 2 * 2 * 64 + 6 * 2 * (64 * 64 + 64) == 51_072


def test_the_official_prediction_is_the_second_pass_and_the_ema_survives_a_reset():
    x = torch.rand(8, 3, 32, 32)
    official = create("dpal", tiny_vit(head_scale=20.0), predict_from="second")
    ours = create("dpal", tiny_vit(head_scale=20.0))
    assert not torch.equal(official(x), ours(x)) and official.last_record["updated"]
    assert official.last_record["recovered"] and official.ema == official.last_record["loss_second"]


def test_prompts_and_predictors_are_made_beside_the_vit():
    """Prompts and predictors follow the ViT's dtype and device (a CUDA model once got them on the CPU)."""
    dpal = create("dpal", tiny_vit().double(), margin=1.0)
    assert {p.dtype for p in dpal.prompted.parameters()} == {torch.float64}
    logits = dpal(torch.rand(4, 3, 32, 32, dtype=torch.float64))
    assert logits.dtype == torch.float64 and dpal.last_record["updated"]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # the 0-prompt predictors' empty weights
@pytest.mark.parametrize("options", VIT_LAYOUTS.values(), ids=VIT_LAYOUTS.keys())
def test_without_prompts_dpals_forward_is_the_bare_models_on_every_vit_layout(options):
    """With no prompt tokens and zero predictors, DPAL's own forward must compute what the model computes:
    a pre-norm ViT's norm_pre and an average-pool ViT's pooling and fc_norm reach it (they did not)."""
    vit = layout_vit(options)
    x = torch.rand(4, 3, 32, 32)
    prompted = PromptedViT(vit, num_prompts=0)
    with torch.no_grad():
        torch.testing.assert_close(prompted(x), vit(x), rtol=1e-5, atol=1e-6)


def twin_parameter(twin, name):
    """A trainable's counterpart in a deep copy of ``method.prompted`` (the LayerNorms are named from the ViT)."""
    own = name.split(".")[0] in ("prompt", "deep_prompts", "predictors")
    return twin.get_parameter(name) if own else twin.vit.get_parameter(name)


class RestatedOfficialDPAL:
    """github yushuntang/DPAL's loop, restated on a twin of the prompted model, written from what the official code
    does (dpal.py 47-66 forward and reset, 99-140 the step, 223-235 the state copies; sam.py 15-37 SAM, 60-62 its
    load_state_dict; main.py 416-417 SGD with momentum 0.9 under SAM and for the predictors):

    - first pass; loss = mean entropy of the samples under E0 + (reliable / the configured batch size) · the
      similarity loss: NaN when nothing is reliable, and then its gradients are zero;
    - the predictors' SGD steps; SAM climbs every other trainable by ρ·g / (‖g‖ + 1e-12);
    - second pass; loss = mean entropy of the first pass's reliable samples still under E0 (NaN if none: the EMA
      is not updated, the gradients are zero); SAM puts the weights back and its SGD steps;
    - when the EMA (0.9) is below the threshold: the weights and the predictors' optimizer go back to their
      copies, SAM's state dict is loaded (its own state: the SGD under it keeps its momentum), the EMA stays;
    - the prediction is the second pass's logits."""

    def __init__(self, prompted, names, margin, threshold, batch_size, lr=0.01, rho=0.05):
        self.twin = copy.deepcopy(prompted)
        self.params = {n: twin_parameter(self.twin, n).requires_grad_(True) for n in names}  # dpal.py 196, 203
        self.sam = [p for n, p in self.params.items() if not n.startswith("predictors.")]
        predictors = [p for n, p in self.params.items() if n.startswith("predictors.")]
        self.predictor_sgd = torch.optim.SGD(predictors, lr=lr, momentum=0.9)
        self.sam_sgd = torch.optim.SGD(self.sam, lr=lr, momentum=0.9)
        self.weights = copy.deepcopy(self.twin.state_dict())
        self.predictor_state = copy.deepcopy(self.predictor_sgd.state_dict())
        self.margin, self.threshold, self.batch_size, self.rho = margin, threshold, batch_size, rho
        self.ema = None

    def __call__(self, x):
        for p in self.params.values():
            p.grad = None
        logits, noises = restated_forward(self.twin, x)
        entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
        keep = entropy.detach() < self.margin
        similarity = torch.stack([-F.cosine_similarity(n[:, None], n[None], dim=2).mean() for n in noises]).mean()
        (entropy[keep].mean() + int(keep.sum()) / self.batch_size * similarity).backward()
        self.predictor_sgd.step()
        with torch.no_grad():  # sam.py 17-24, 48-58: a parameter without a gradient is passed over
            moved = [p for p in self.sam if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in moved]))
            saved = [p.detach().clone() for p in self.sam]
            for p in moved:
                p.add_(p.grad * (self.rho / (norm + 1e-12)))
                p.grad = None
        second, _ = restated_forward(self.twin, x)
        entropy2 = -(second.softmax(1) * second.log_softmax(1)).sum(1)[keep]
        loss2 = entropy2[entropy2.detach() < self.margin].mean()
        if not torch.isnan(loss2):
            value = float(loss2.detach())
            self.ema = value if self.ema is None else 0.9 * self.ema + 0.1 * value
        loss2.backward()
        with torch.no_grad():
            for p, value in zip(self.sam, saved):
                p.copy_(value)
        self.sam_sgd.step()
        if self.ema is not None and self.ema < self.threshold:
            self.twin.load_state_dict(self.weights)
            self.predictor_sgd.load_state_dict(copy.deepcopy(self.predictor_state))
        return second.detach()


E0 = 0.4 * math.log(10)
PAPER = {"predict_from": "second", "official_recovery": True, "similarity_divisor": "configured", "batch_size": 8}


def test_the_paper_settings_are_the_official_run_across_recoveries_empty_sets_and_a_short_batch():
    """Side by side with the restated official loop: recoveries (threshold 100) followed by plain steps (0), where
    the momentum kept under SAM moves the restored weights; an empty reliable set (E0 ≈ 0) before and right after a
    recovery; a short batch (5 of 8), whose similarity weight is reliable / 8; then, at a large ρ where SAM's ascent
    lifts a lone sample's entropy over E0, a set that empties at the second pass. Measured: bit-equal (0.0) on
    CPU. Before the fixes: the momentum cleared at a recovery, 2.6e-5 in the logits (4.4e-6 in the weights); no
    step on an empty set, 3.9 in the logits (1.7e-2 when it empties at the second pass); the short batch's weight
    reliable / 5, 3.8e-6 in the logits."""
    method = create("dpal", tiny_vit(head_scale=20.0), **PAPER)
    reference = RestatedOfficialDPAL(method.prompted, list(method.trainable), E0, 0.0, batch_size=8)
    schedule = [(8, 100.0, E0), (8, 0.0, E0), (8, 0.0, 1e-9), (5, 0.0, E0), (8, 100.0, E0), (8, 100.0, 1e-9),
                (8, 0.0, E0)]  # fmt: skip
    records, worst = run_side_by_side(method, reference, schedule)
    assert [r["recovered"] for r in records] == [True, False, False, False, True, True, False]
    assert [r.get("momentum_only", False) for r in records] == [False, False, True, False, False, True, False]
    assert records[3]["num_reliable"] == 5 and worst <= 1e-7, worst

    method = create("dpal", tiny_vit(head_scale=20.0), rho=5.0, reset_threshold=0.0, **PAPER)
    reference = RestatedOfficialDPAL(method.prompted, list(method.trainable), E0, 0.0, batch_size=8, rho=5.0)
    records, worst = run_side_by_side(method, reference, [(8, 0.0, E0), (1, 0.0, 0.01), (8, 0.0, E0)], seed=2)
    assert records[1]["skip_reason"] == "no reliable samples (step 2)" and records[1]["momentum_only"]
    assert worst <= 1e-7, worst


def test_the_lab_settings_clear_the_momentum_at_a_recovery_and_move_nothing_on_an_empty_set():
    """Ours, as docs/protocol.md says: a recovery clears both optimizers' state (the paper settings keep SAM's
    SGD momentum and reset the predictors'); an empty reliable set leaves every weight where it was."""
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for official in (False, True):
        method = create("dpal", tiny_vit(head_scale=20.0), reset_threshold=100.0, official_recovery=official)
        method(x)
        assert method.last_record["recovered"] and not method.predictor_optimizer.state
        assert bool(method.optimizer.base_optimizer.state) is official
        before = {n: p.detach().clone() for n, p in method.trainable.items()}
        method.hparams.update(margin=1e-9, reset_threshold=0.0)
        method(x)
        moved = any(not torch.equal(p, before[n]) for n, p in method.trainable.items())
        assert method.last_record["skip_reason"] == "no reliable samples" and moved is official


def test_a_lab_run_with_dpal_starts_from_the_same_prompts_for_the_same_seed():
    """DPAL draws its prompts at random: the Lab seeds those draws with the run's seed, as bench does (they came
    from whatever the global generator held, and a Lab run's DPAL was not reproducible)."""
    from imse.runs.lab import LabConfig, build_run

    config = LabConfig(methods=("DPAL",), corruptions=("fog",), per_domain=16, batch_size=16, seed=5)
    first = build_run(config).methods["DPAL"].prompted.prompt.detach().clone()
    torch.rand(7)  # whatever ran before
    assert torch.equal(build_run(config).methods["DPAL"].prompted.prompt, first)
    other = build_run(LabConfig(methods=("DPAL",), corruptions=("fog",), per_domain=16, batch_size=16, seed=6))
    assert not torch.equal(other.methods["DPAL"].prompted.prompt, first)


# -- the published DPAL network on CLIP's and MAE's layouts, and its inputs (issue 35 items 2 and 3) --------------


def official_dpal_names(prompted) -> list[str]:
    """The official DPAL's trainables, restated (dpal.py 158-207 and 209-220): the prompts, the norm layers of
    the official selection (tests/test_methods.py's restatement: CLIP's norm_pre and MAE's fc_norm too), then the
    predictors (their own optimizer)."""
    from test_methods import restated_official_norm_names

    predictors = [f"predictors.{name}" for name, _ in prompted.predictors.named_parameters()]
    return ["prompt", "deep_prompts", *restated_official_norm_names(prompted.vit), *predictors]


@pytest.mark.parametrize("layout", ["pre-norm (CLIP)", "average pool (MAE)"])
def test_dpal_under_the_paper_protocol_is_the_official_network_on_clip_and_mae_layouts(layout):
    """Side by side with the restated official loop on the published network (``restated_forward``: no norm_pre,
    the CLS token in the average) adapting the official selection (norm_pre, which that network never reads,
    stays put; fc_norm moves), four steps on a 12-block ViT. Measured: bit-equal (0.0) on CPU. Before (timm's
    network, the blocks' LayerNorms alone): 6.1 in the logits on the pre-norm layout, 0.075 on the average-pool
    one."""
    e0 = 0.4 * math.log(1000)  # every sample reliable
    settings = {**PAPER, **DPAL.paper_settings("continual"), "margin_classes": None}
    method = create("dpal", layout_vit(VIT_LAYOUTS[layout], depth=12, head_scale=10.0), **settings)
    reference = RestatedOfficialDPAL(method.prompted, official_dpal_names(method.prompted), e0, 0.0, batch_size=8)
    records, worst = run_side_by_side(method, reference, [(8, 0.0, e0)] * 4)
    assert all(r["updated"] for r in records) and worst <= 1e-7, worst


def test_dpal_with_unit_preprocessing_feeds_the_vit_the_images_as_they_are():
    """``preprocessing="unit"``: the prompted ViT gets the [0, 1] images, as the backbone's own forward then does.
    Measured against the restated forward on those images: 0.0. Before, PromptedViT normalised anyway: 1.7 in the
    logits (the prompted logits were the normalised run's)."""
    from imse.data.models import Backbone

    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = [str(i) for i in range(10)]
    backbone = Backbone(tiny_vit(), mean=(0.5,) * 3, std=(0.25,) * 3, name="tiny", class_names=labels, input_size=32)
    method = create("dpal", backbone, preprocessing="unit", reset_threshold=0.0)
    expected, _ = restated_forward(copy.deepcopy(method.prompted), x, normalise=False)
    worst = float((method(x) - expected.detach()).abs().max())
    assert worst <= 1e-6, worst


@pytest.mark.slow  # fine-tunes the built-in model made pre-norm: ~2 CPU-minutes
def test_on_the_built_in_model_made_pre_norm_the_official_forward_costs_source_accuracy():
    """What ``official_forward`` (the paper protocol) does to the source accuracy of a ViT trained with
    ``norm_pre``: the built-in architecture with ``pre_norm=True`` (CLIP's layout: a new norm_pre, and no
    patch-embedding bias, so the shipped one is left out), its shipped weights, then all of it fine-tuned for 200
    Adam steps (lr 3e-4, batches of 64, seed 0) on Fashion-MNIST's train split; the prompted network before any
    adaptation, on the first 2,000 test images. Measured (OMP_NUM_THREADS=1): the model 90.85 %; DPAL's network
    90.95 % (lab), 76.95 % (official_forward: norm_pre skipped)."""
    import torch.nn.functional as F

    from imse.core.resources import asset_path
    from imse.data.fashion_mnist import DEFAULT_DATA_DIR, BuiltinSource
    from imse.data.models import Backbone, build_builtin_vit, builtin_config, load_state_dict_file

    if not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST's train split (apt-get install dataset-fashion-mnist)")
    config = builtin_config()
    vit = build_builtin_vit({"architecture": {**config["architecture"], "pre_norm": True}})
    vit.load_state_dict(load_state_dict_file(asset_path("builtin", "model.safetensors")), strict=False)  # norm_pre new
    model = Backbone(vit, mean=config["mean"], std=config["std"], name="pre-norm", class_names=config["class_names"],
                     input_size=32)  # fmt: skip
    train, generator = BuiltinSource("train"), torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(vit.parameters(), lr=3e-4)
    for _ in range(200):
        images, labels = train.load(torch.randint(len(train), (64,), generator=generator).tolist())
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    images, labels = BuiltinSource("test").load(range(2000))

    def accuracy(network) -> float:
        with torch.no_grad():
            return sum(int((network(images[i : i + 500]).argmax(-1) == labels[i : i + 500]).sum()) for i in
                       range(0, 2000, 500)) / 2000  # fmt: skip

    source = accuracy(model)
    lab, official = (accuracy(create("dpal", copy.deepcopy(model), official_forward=flag).prompted)
                     for flag in (False, True))  # fmt: skip
    print(f"source {source:.4f}, DPAL's network: lab {lab:.4f}, official_forward {official:.4f}")
    assert source > 0.85 and abs(lab - source) < 0.01 and official < source - 0.05
