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
