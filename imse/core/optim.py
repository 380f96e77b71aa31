"""Optimizers as the methods use them, where torch's own need a word of care.

``torch.optim.Adam.step`` first asks the accelerator whether a CUDA graph is being captured
(``Optimizer._accelerator_graph_capture_health_check``). With all parameters on the CPU that question has one
answer, but asking it initialises CUDA wherever ``torch.cuda.is_available()`` says True — and in a ZeroGPU
Space's server process it says True without a GPU (the `spaces` package's emulation), so the first CPU step
raises. ``Adam`` here asks only when a parameter lives on an accelerator; the update itself is torch's, unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["Adam"]


class Adam(torch.optim.Adam):
    """``torch.optim.Adam``, minus the accelerator query when every parameter is on the CPU."""

    def _accelerator_graph_capture_health_check(self) -> None:
        if any(p.device.type != "cpu" for group in self.param_groups for p in group["params"]):
            super()._accelerator_graph_capture_health_check()
