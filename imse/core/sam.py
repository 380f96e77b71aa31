"""Sharpness-aware minimisation (Foret et al. 2021) around any torch optimizer, as SAR and IMSE use it.

One update = gradient at ``w`` → ``first_step`` moves to ``w + e`` with ``e = ρ g / (‖g‖₂ + 1e-12)`` (one
norm over all parameters) → gradient at ``w + e`` → ``second_step`` puts ``w`` back exactly and lets the base
optimizer step with that second gradient.
"""

from __future__ import annotations

import torch

__all__ = ["SAM", "momentum_step"]


class SAM:
    """Wraps a constructed optimizer: ``SAM(torch.optim.Adam(params, lr=7e-3), rho=0.05)``."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch optimizer, got {type(base_optimizer).__name__}")
        if rho < 0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        self.base_optimizer = base_optimizer
        self.rho = rho
        self._saved: dict[torch.Tensor, torch.Tensor] = {}

    @property
    def param_groups(self) -> list[dict]:
        return self.base_optimizer.param_groups

    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def perturbed(self) -> bool:
        """True between ``first_step`` and ``second_step``/``restore``."""
        return bool(self._saved)

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The global L2 norm of all current gradients."""
        params = self._params_with_grad()
        if not params:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    @torch.no_grad()
    def first_step(self, zero_grad: bool = True) -> torch.Tensor:
        """Climb to ``w + e``; returns the gradient norm used. Nothing moves if that norm is not finite."""
        if self._saved:
            raise RuntimeError("first_step called twice without second_step/restore")
        norm = self.grad_norm()
        if torch.isfinite(norm):
            scale = self.rho / (norm + 1e-12)
            for p in self._params_with_grad():
                self._saved[p] = p.detach().clone()
                p.add_(p.grad * scale.to(p.device, p.dtype))
        if zero_grad:
            self.zero_grad()
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Undo the perturbation exactly (copy back the saved weights) without any base step."""
        for p, saved in self._saved.items():
            p.copy_(saved)
        self._saved.clear()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = True) -> None:
        """Return to ``w`` and apply one base-optimizer step with the gradient taken at ``w + e``."""
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._saved.clear()
        self.base_optimizer.load_state_dict(state)


@torch.no_grad()
def momentum_step(optimizer: torch.optim.Optimizer) -> None:
    """One step of ``optimizer`` with every gradient zero, so that only its momentum moves the weights: what the
    official SAR and DPAL do when no sample is reliable (their loss, a mean over no sample, is NaN, and its
    gradients are zero; github mr-eggplant/SAR sar.py 83-97, yushuntang/DPAL dpal.py 113-130)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
