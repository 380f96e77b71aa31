"""DPAL against its official code (github yushuntang/DPAL: dpal.py, models/dpal_transformer.py), restated here."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import VIT_LAYOUTS, layout_vit, tiny_vit

from imse.core.methods import create
from imse.core.methods.dpal import PromptedViT


def restated_forward(prompted, x):
    """models/dpal_transformer.py forward_features + forward_head, written out: [prompt, CLS, patches]; before block
    i > 0 the deep prompt replaces the prompt; after each block the predictor's output leaves the CLS token."""
    vit, P = prompted.vit, prompted.num_prompts
    h = vit._pos_embed(vit.patch_embed(prompted.normalize(x)))
    h = torch.cat((prompted.prompt.expand(len(x), -1, -1), h), 1)
    noises = []
    for i, block in enumerate(vit.blocks):
        if i:
            h = torch.cat((prompted.deep_prompts[i - 1].expand(len(x), -1, -1), h[:, P:]), 1)
        h = block(h)
        noise = prompted.predictors[i](h[:, :P].reshape(len(x), -1).clone())
        noises.append(noise)
        h[:, P] -= noise
    return vit.head(vit.norm(h)[:, P]), noises


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
