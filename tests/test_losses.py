import math
import statistics

import pytest
import torch
from conftest import tiny_vit

from imse.core.losses import (
    AlignmentProbe,
    alignment_std,
    diversity_loss,
    entropy_margin,
    layer_diversity,
    masked_mean,
    projected_alignment_std,
    reliable_mask,
    softmax_entropy,
)
from imse.core.spectral import inject, spectral_layers


def loop_alignment_std(x: torch.Tensor, Vh: torch.Tensor) -> list[float]:
    """Independent reference: plain Python loops over rows and experts, float64 arithmetic."""
    rows = x.reshape(-1, x.shape[-1]).tolist()
    experts = Vh.tolist()
    stds = []
    for v in experts:
        values = []
        for row in rows:
            norm = math.sqrt(sum(value * value for value in row))
            values.append(sum(a * b for a, b in zip(v, row)) / norm)
        stds.append(statistics.stdev(values))  # unbiased (n - 1)
    return stds


def loop_layer_diversity(stds: list[float], ratio: float = 1.0) -> float:
    k = max(1, min(int(len(stds) * ratio), len(stds) - 1))
    return sum(sorted(stds)[:k]) / k


def test_softmax_entropy_and_margin():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    p = torch.softmax(logits.double(), -1)
    expected = -(p * p.log()).sum(-1)
    torch.testing.assert_close(softmax_entropy(logits).double(), expected, rtol=1e-6, atol=1e-7)
    assert softmax_entropy(logits)[0].item() == pytest.approx(math.log(4))
    assert entropy_margin(1000) == pytest.approx(0.4 * math.log(1000))
    assert reliable_mask(softmax_entropy(logits), 4).tolist() == [False, True, False]
    with pytest.raises(ValueError):
        entropy_margin(1)


def test_masked_mean_never_nan():
    values = torch.tensor([1.0, 2.0, 3.0])
    assert masked_mean(values, torch.tensor([True, False, True])).item() == 2.0
    assert masked_mean(values, torch.zeros(3, dtype=torch.bool)) is None


@pytest.mark.parametrize("leading", [(2, 5), (11,), (1, 3, 4)])
def test_alignment_std_equals_loop_computation(leading):
    torch.manual_seed(0)
    x = torch.randn(*leading, 6, dtype=torch.float64)
    Vh = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))[0].T  # 4 orthonormal rows
    got = alignment_std(x, Vh)
    assert got.shape == (4,)
    torch.testing.assert_close(got, torch.tensor(loop_alignment_std(x, Vh), dtype=torch.float64))


def test_alignment_std_gradient_equals_autograd_through_the_plain_formula():
    """The hand-written backward: same gradients (x and projection) as autograd through
    ``(projection / ‖x‖).std(0)``, float64, including a zero row (clamped: no gradient through its norm) and an
    expert every row aligns with alike (std 0: no gradient, as torch's std)."""
    torch.manual_seed(0)
    x = torch.randn(9, 7, dtype=torch.float64)
    x[4] = 0.0
    projection = x @ torch.randn(5, 7, dtype=torch.float64).T + 0.1 * torch.randn(9, 5, dtype=torch.float64)
    projection[:, 2] = 0.0  # every row aligns alike with expert 2: std 0, no gradient through it
    weights = torch.randn(5, dtype=torch.float64)

    def gradients(statistic):
        a, p = x.clone().requires_grad_(), projection.clone().requires_grad_()
        (statistic(a, p) * weights).sum().backward()
        return a.grad, p.grad

    def plain(a, p):
        return (p / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)).std(dim=0)

    got, expected = gradients(projected_alignment_std), gradients(plain)
    assert projected_alignment_std(x, projection)[2] == 0
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    a, p = x[:4].clone().requires_grad_(), projection[:4].clone().requires_grad_()
    assert torch.autograd.gradcheck(projected_alignment_std, (a, p))


def test_alignment_std_single_row_is_zero_not_nan():
    assert torch.equal(alignment_std(torch.randn(1, 1, 6), torch.eye(6)[:3]), torch.zeros(3))


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.05])
def test_layer_diversity_matches_definition(ratio):
    stds = torch.tensor([0.3, 0.9, 0.1, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05])
    assert layer_diversity(stds, ratio).item() == pytest.approx(loop_layer_diversity(stds.tolist(), ratio))
    if ratio == 1.0:  # the official setting: every expert but the single largest
        assert layer_diversity(stds).item() == pytest.approx((stds.sum() - 0.9).item() / 9)
    with pytest.raises(ValueError):
        layer_diversity(stds, 0.0)


def test_diversity_loss_on_a_vit_equals_loop_computation():
    """L_dm through the probe (the path IMSE uses) equals loops over the inputs of the last 3 blocks' layers."""
    model = tiny_vit(depth=5)
    inject(model)
    layers = spectral_layers(model)
    last = [name for name in layers if int(name.split(".")[1]) >= 2]
    assert len(last) == 12
    inputs = {}
    hooks = [layers[n].register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach())) for n in last]
    probe = AlignmentProbe(layers)
    x = torch.randn(2, 3, 32, 32)
    with probe.capture(differentiable=last) as stats:
        model(x)
    for hook in hooks:
        hook.remove()
    got = diversity_loss([stats[n] for n in last], num_blocks=3)
    assert got.requires_grad
    expected = sum(loop_layer_diversity(loop_alignment_std(inputs[n], layers[n].Vh)) for n in last) / 3
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # hooks are gone after capture, and detached capture keeps no graph
    assert all(layer.projection_hook is None for layer in layers.values())
    with probe.capture(detached=list(layers)) as stats:
        model(x)
    assert len(stats) == 20 and not any(s.requires_grad for s in stats.values())
