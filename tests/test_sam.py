import pytest
import torch

from imse.core.sam import SAM


def quadratic_loss(params):
    a, b = params
    return (a**2).sum() * 3 + (b**3).sum() + (a.sum() * b.sum())


def make_params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_second_step_removes_perturbation_and_applies_one_base_step(base):
    params = make_params()
    original = [p.detach().clone() for p in params]
    build = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    }[base]
    sam = SAM(build(params), rho=0.05)

    quadratic_loss(params).backward()
    grads = [p.grad.clone() for p in params]
    norm = sam.first_step()
    expected_norm = torch.cat([g.flatten() for g in grads]).norm()
    assert norm.item() == pytest.approx(expected_norm.item())
    for p, o, g in zip(params, original, grads):  # w + rho g / (||g|| + 1e-12), one norm over all params
        torch.testing.assert_close(p.detach(), o + 0.05 * g / (expected_norm + 1e-12))
    assert all(p.grad is None for p in params)

    quadratic_loss(params).backward()  # gradient at the perturbed point
    second_grads = [p.grad.clone() for p in params]
    sam.second_step()

    # reference: the same base optimizer, one step from the original weights with the second gradient
    reference = [torch.nn.Parameter(o.clone()) for o in original]
    ref_opt = build(reference)
    for r, g in zip(reference, second_grads):
        r.grad = g
    ref_opt.step()
    for p, r in zip(params, reference):
        assert torch.equal(p.detach(), r.detach())
    state = sam.state_dict()["state"]
    if base == "adam":
        assert all(float(s["step"]) == 1 for s in state.values())
    assert not sam.perturbed


def test_restore_is_exact_and_nonfinite_gradient_does_not_move():
    params = make_params()
    original = [p.detach().clone() for p in params]
    sam = SAM(torch.optim.SGD(params, lr=0.1), rho=0.5)
    quadratic_loss(params).backward()
    sam.first_step()
    sam.restore()
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, original))
    params[0].grad = torch.full((5,), float("nan"))
    assert not torch.isfinite(sam.first_step())
    assert not sam.perturbed
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, original))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        SAM(torch.optim.SGD(make_params(), lr=0.1), rho=-1)
    with pytest.raises(TypeError):
        SAM(make_params(), rho=0.05)
