"""ViDA against its official update rule, restated here (github Yangsenqiao/vida, imagenet/vida.py)."""

import copy

import pytest
import torch
from conftest import tiny_vit
from torchvision.transforms import InterpolationMode

from imse.core.methods import create
from imse.core.methods.vida import DomainAdapters, cotta_augment


def test_one_step_is_the_official_rule_restated():
    """Teacher on 10 augmentations → u = 0.1·mean var; scales by the 0.2 threshold (only the low-rank one moves,
    as the official set_scale); symmetric CE to the teacher; SGD Nesterov 0.9 with one lr per group; EMA teacher
    (0.8 adapters, 0.999 the rest); the teacher's pre-update logits returned."""
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    method = create("vida", tiny_vit(head_scale=5.0), lr=1e-2, adapter_lr=5e-3, seed=3)
    with torch.no_grad():  # give the adapters something to do (the official ones start at zero output)
        for module in method.model.modules():
            if isinstance(module, DomainAdapters):
                module.up_low.weight.normal_(0, 0.05)
        method.teacher.load_state_dict(method.model.state_dict())
    student, teacher = copy.deepcopy(method.model), copy.deepcopy(method.teacher)

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        views = torch.stack([teacher(cotta_augment(x, generator)) for _ in range(10)])
    u = 0.1 * float(views.var(dim=0).mean())
    low = 1 - u if u >= 0.2 else 1 + u
    for model in (student, teacher):
        for module in model.modules():
            if isinstance(module, DomainAdapters):
                module.scale_low = low
    with torch.no_grad():
        t = teacher(x)
    s = student(x)
    loss = (-0.5 * (t.softmax(1) * s.log_softmax(1)).sum(1) - 0.5 * (s.softmax(1) * t.log_softmax(1)).sum(1)).mean()
    grads = dict(zip([n for n, _ in student.named_parameters()], torch.autograd.grad(loss, list(student.parameters()))))

    logits = method(x)
    assert torch.allclose(logits, t, atol=1e-6)
    assert method.last_record["uncertainty"] == pytest.approx(u, rel=1e-5) and method.last_record["scale_low"] == low
    adapter = ("down_low", "up_low", "down_high", "up_high")
    for name, before in student.named_parameters():
        lr = 5e-3 if any(part in name for part in adapter) else 1e-2
        expected = before.detach() - lr * (1 + 0.9) * grads[name]  # Nesterov's first step: g + 0.9·(buf = g)
        assert torch.allclose(dict(method.model.named_parameters())[name], expected, atol=1e-6), name
        alpha = 0.8 if any(part in name for part in adapter) else 0.999
        mixed = alpha * dict(teacher.named_parameters())[name].detach() + (1 - alpha) * expected
        assert torch.allclose(dict(method.teacher.named_parameters())[name], mixed, atol=1e-6), name
    assert all(m.scale_high == 1.0 for m in method.model.modules() if isinstance(m, DomainAdapters))


def test_reset_is_exact_including_the_teacher_and_the_augmentations():
    x = torch.rand(8, 3, 32, 32)
    method = create("vida", tiny_vit(), lr=1e-2, adapter_lr=5e-3)
    first = method(x)
    record = dict(method.last_record)
    method(x)
    method.reset()
    assert torch.equal(method(x), first) and method.last_record["uncertainty"] == record["uncertainty"]


def test_the_adapter_count_is_the_hand_count_from_the_shapes():
    """qkv (d→3d) and proj (d→d) of every block, each with a rank-1 and a rank-128 bottleneck, no bias."""
    method = create("vida", tiny_vit())  # d = 64, 6 blocks
    d, depth = 64, 6
    per_block = (d * 1 + 1 * 3 * d) + (d * 128 + 128 * 3 * d) + (d * 1 + 1 * d) + (d * 128 + 128 * d)
    assert method.num_adapter_values() == depth * per_block == 297_216
    vit_params = sum(p.numel() for n, p in method.model.named_parameters() if not method.is_adapter(n))
    assert method.num_trainable() == vit_params + 297_216  # every weight of the ViT trains too (official)


def test_the_adapters_are_made_beside_the_layer_they_adapt():
    """Adapters follow their layer's dtype and device (they were once left on the CPU under a CUDA model: the
    first GPU run failed); the draws stay the CPU generator's, so a float64 model gets the same adapters."""
    wide = create("vida", tiny_vit().double())
    plain = create("vida", tiny_vit())
    assert {p.dtype for p in wide.model.parameters()} == {torch.float64}
    logits = wide(torch.rand(4, 3, 32, 32, dtype=torch.float64))
    assert logits.dtype == torch.float64 and wide.last_record["updated"]
    wide = create("vida", tiny_vit().double())  # fresh: compare the draws before any update
    downs = [(a, b) for (name, a), (_, b) in zip(wide.model.named_parameters(), plain.model.named_parameters())
             if "down_" in name]  # fmt: skip
    assert len(downs) == 4 * 6 and all(torch.equal(a.float(), b) for a, b in downs)


CJ_RANGES = [(0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.06, 0.06), (0.7, 1.3)]  # brightness … gamma (vida.py 25-31)


def draws_in_our_order(generator, shape, padded_side):
    """The augmentation's random values, drawn as ``cotta_augment`` draws them from its generator (the draws' source
    and order are ours, a named deviation; the ranges are the official ones)."""

    def uniform(low, high):
        return float(low + (high - low) * torch.rand((), generator=generator))

    jitter = [(index, uniform(*CJ_RANGES[index])) for index in torch.randperm(5, generator=generator).tolist()]
    shift = padded_side / 16  # RandomAffine's translate=(1/16, 1/16) of the padded image's size
    angle = uniform(-15, 15)
    tx, ty = round(uniform(-shift, shift)), round(uniform(-shift, shift))
    scale = uniform(0.9, 1.1)
    sigma = uniform(0.001, 0.5)
    flip = float(torch.rand((), generator=generator)) < 0.5
    noise = 0.005 * torch.randn(shape, generator=generator)
    return jitter, (angle, [tx, ty], scale), sigma, flip, noise


def restated_official_augment(x, draws, kernels):
    """The official get_tta_transforms on a tensor batch, restated (github Yangsenqiao/vida imagenet/vida.py 15-47,
    cotta_transforms.py 85-112): clip; the jitters in the drawn order, gamma on the image clamped to [1e-8, 1];
    edge padding of 224 / 2 and a centre crop of 224 (fixed, whatever the input); blur 5×5; flip; noise; clip."""
    jitter, (angle, translate, scale), sigma, flip, noise = draws
    x = x.clip(0, 1)
    colour = [kernels.adjust_brightness, kernels.adjust_contrast, kernels.adjust_saturation, kernels.adjust_hue]
    for index, factor in jitter:
        x = kernels.adjust_gamma(x.clamp(1e-8, 1.0), factor) if index == 4 else colour[index](x, factor)
    x = kernels.pad(x, [112, 112, 112, 112], padding_mode="edge")
    x = kernels.affine(x, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                       interpolation=InterpolationMode.BILINEAR)  # fmt: skip
    x = kernels.gaussian_blur(x, [5, 5], [sigma, sigma])
    x = kernels.center_crop(x, [224, 224])
    if flip:
        x = kernels.hflip(x)
    return (x + noise).clip(0, 1)


def test_the_augmentation_is_the_official_rule_restated_on_224_px_images():
    """Same draws, same result: on black images (where the gamma clamp shows: 0**0.71 = 0, (1e-8)**0.71 = 2e-6;
    before the clamp followed the official 1e-8 this differed by 2.3e-6 at seed 8) bit-equal with torchvision's
    v1 kernels, the official code's; on a textured image equal to v1's rounding (v2's kernels: bit-equal)."""
    from torchvision.transforms import functional as v1
    from torchvision.transforms.v2 import functional as v2

    black = torch.zeros(1, 3, 224, 224)
    textured = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for seed in (0, 7, 8):
        draws = draws_in_our_order(torch.Generator().manual_seed(seed), black.shape, 448)
        ours = cotta_augment(black, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, restated_official_augment(black, draws, v1)), seed
    draws = draws_in_our_order(torch.Generator().manual_seed(1), textured.shape, 448)
    ours = cotta_augment(textured, torch.Generator().manual_seed(1))
    assert torch.equal(ours, restated_official_augment(textured, draws, v2))
    assert (ours - restated_official_augment(textured, draws, v1)).abs().max() <= 2e-6


def test_the_augmentation_follows_the_input_size_the_official_one_is_fixed_at_224():
    """A documented difference (docs/protocol.md): on a 32 px model the official transform would hand it 224 px."""
    x = torch.rand(2, 3, 32, 32)
    assert cotta_augment(x, torch.Generator().manual_seed(0)).shape == x.shape
    from torchvision.transforms import functional as v1

    draws = draws_in_our_order(torch.Generator().manual_seed(0), (2, 3, 224, 224), 256)
    assert restated_official_augment(x, draws, v1).shape == (2, 3, 224, 224)


# -- the source warm-up the official run starts from (issue 25 item 3) ----------------------------------------------


def _backbone(vit):
    from imse.data.models import Backbone

    labels = [str(i) for i in range(10)]
    return Backbone(vit, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), name="tiny", class_names=labels, input_size=32)


def official_name(name: str) -> str:
    """Our name of a ViDA weight -> the official one (inject_vida.py 11-26)."""
    theirs = {"linear": "linear_vida", "down_low": "vida_down", "up_low": "vida_up", "down_high": "vida_down2",
              "up_high": "vida_up2"}  # fmt: skip
    return ".".join(theirs.get(part, part) for part in name.split("."))


def _official_checkpoint(tmp_path, seed: int = 1):
    """A file as the official code writes one, restated from what it does: the whole model with ViDA injected
    (inject_vida.py 11-26: the layer as ``linear_vida``, rank r1 ``vida_down``/``vida_up``, rank r2
    ``vida_down2``/``vida_up2``) behind ``torch.nn.DataParallel`` (vida.py 199-202: every name under ``module.``),
    saved with ``torch.save``. Returns the path and the adapters' values by our names."""
    from imse.core.methods.vida import inject_adapters

    vit = tiny_vit()
    inject_adapters(vit)
    torch.manual_seed(seed)
    ours, official = {}, {}
    for name, value in vit.state_dict().items():
        if any(f".{part}." in name for part in ("down_low", "up_low", "down_high", "up_high")):
            value = torch.randn_like(value) * 0.02
            ours[name] = value
        official["module." + official_name(name)] = value.clone()
    path = tmp_path / "imagenet_vit_vida.pt"
    torch.save(official, path)
    return path, ours


def test_the_official_checkpoint_loads_under_our_names_and_viDA_then_answers_otherwise_than_source(tmp_path):
    path, adapters = _official_checkpoint(tmp_path)
    method = create("vida", _backbone(tiny_vit(head_scale=5.0)), checkpoint=str(path), preprocessing="unit")
    vit = method.model.model
    for name, value in adapters.items():
        assert torch.equal(vit.state_dict()[name], value), name
        assert torch.equal(method.teacher.model.state_dict()[name], value), name  # the teacher starts there too
    x = torch.rand(8, 3, 32, 32)
    assert not method.model.normalise_input  # the official run feeds [0, 1] images
    cold = create("vida", _backbone(tiny_vit(head_scale=5.0)), preprocessing="unit")
    with torch.no_grad():
        source = tiny_vit(head_scale=5.0)(x)
        assert torch.allclose(cold.model(x), source, atol=1e-5)  # cold: the adapters add nothing
        assert (method.model(x) - source).abs().max() > 1e-3  # warm: they do, and their scales matter
    method(x)
    method.reset()  # back to the warm start, not to zero
    assert torch.equal(vit.state_dict()[next(iter(adapters))], adapters[next(iter(adapters))])


def test_a_checkpoint_that_does_not_fit_is_refused_with_what_is_wrong(tmp_path):
    path, _ = _official_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="trained with preprocessing='unit'"):
        create("vida", _backbone(tiny_vit()), checkpoint=str(path))  # the official file, fed normalised images
    with pytest.raises(ValueError, match="other ranks or width"):
        create("vida", _backbone(tiny_vit()), checkpoint=str(path), preprocessing="unit", high_rank=64)
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if "vida_up2" not in k}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="no weights for 12 of the adapters"):  # 6 blocks × (qkv, proj)
        create("vida", _backbone(tiny_vit()), checkpoint=str(tmp_path / "partial.pt"), preprocessing="unit")
    with pytest.raises(FileNotFoundError, match="python -m imse vida-warmup"):
        create("vida", _backbone(tiny_vit()), checkpoint=str(tmp_path / "none.safetensors"))
    with pytest.raises(TypeError, match="needs a model with its own input normalisation"):
        create("vida", tiny_vit(), preprocessing="unit")


def test_the_warm_up_trains_only_the_adapters_and_its_file_is_what_vida_starts_from(tmp_path):
    from imse.data.fashion_mnist import DEFAULT_DATA_DIR
    from imse.data.models import create_backbone
    from imse.runs.vida_warmup import warm_up

    if not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST's train split (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "warm.safetensors"
    made = warm_up(out, steps=3, batch_size=16, progress=False, held_out=100)
    assert made["steps"] == "3" and made["data"] == "fashion-mnist-train" and made["images"] == "60000"
    assert 0.5 < float(made["held_out_accuracy_before"]) <= 1 and made["preprocessing"] == "backbone"
    method = create("vida", create_backbone("builtin"), checkpoint=str(out))
    from safetensors.torch import load_file

    saved = load_file(str(out))
    vit = method.model.model
    assert set(saved) == {name for name, _ in vit.named_parameters() if method.is_adapter(name)}
    assert all(torch.equal(vit.state_dict()[name], value) for name, value in saved.items())
    assert any(name.endswith("up_high.weight") and value.abs().max() > 0 for name, value in saved.items())
    wrapped = ("qkv.weight", "qkv.bias", "attn.proj.weight", "attn.proj.bias")  # now under DomainAdapters.linear

    def ours(name: str) -> str:
        if not name.endswith(wrapped):
            return name
        return name.replace(".qkv.", ".qkv.linear.").replace(".proj.", ".proj.linear.")

    plain = create_backbone("builtin").model.state_dict()  # the ViT itself did not move
    assert all(torch.equal(vit.state_dict()[ours(name)], value) for name, value in plain.items())


# -- checkpoints saved behind a RobustBench-style normaliser (issue 35 item 4) --------------------------------------


def _normaliser_checkpoint(tmp_path, mean, std, name="normalised.pt", data_parallel=True):
    """A file as the IMSE repository writes one, restated from what it does: the ViDA model behind RobustBench's
    normaliser (robustbench/model_zoo/architectures/utils_architectures.py 8-26: ``normalize`` holds ``mean`` and
    ``std`` buffers [1, 3, 1, 1], ``model`` the ViT) behind ``torch.nn.DataParallel`` (method/vida.py 217), its
    state dict saved (as the commented-out line 253 does): ``module.normalize.mean`` and ``.std`` beside
    ``module.model.<the official names>``; ``data_parallel=False``: the wrapper saved as it is (``normalize.mean``,
    ``model.…``)."""
    path, _ = _official_checkpoint(tmp_path)
    state = {key.replace("module.", "module.model.", 1): value for key, value in torch.load(path).items()}
    state["module.normalize.mean"] = torch.tensor(mean).view(1, 3, 1, 1)
    state["module.normalize.std"] = torch.tensor(std).view(1, 3, 1, 1)
    saved = state if data_parallel else {key.removeprefix("module."): value for key, value in state.items()}
    torch.save(saved, tmp_path / name)
    return tmp_path / name, state


def restated_imse_loading(state, x):
    """The IMSE repository's loader (method/vida.py 237-250), restated: each of the model's names, or the same name
    with ``module.model`` read as ``module``, takes the file's value, the normaliser's buffers included; the
    model then normalises with them (utils_architectures.py 16-17). Returns its logits on ``x``."""
    from imse.core.methods.vida import inject_adapters

    vit = tiny_vit(head_scale=5.0)
    inject_adapters(vit)
    vit.load_state_dict({key: state[f"module.model.{official_name(key)}"] for key in vit.state_dict()})
    with torch.no_grad():
        return vit((x - state["module.normalize.mean"]) / state["module.normalize.std"])


def test_a_checkpoint_behind_a_normaliser_loads_and_its_buffers_set_the_preprocessing(tmp_path):
    """Mean 0 and std 1: trained on [0, 1] images (``unit``); the backbone's own statistics: its normalisation
    (``backbone``); other statistics: refused. Each file (behind DataParallel or not) loads into the network the
    IMSE loader builds from it: 0.0 apart. Before: refused ("has weights this ViT lacks (e.g. normalize.mean)"),
    and every .pt file read as ``unit``."""
    from imse.core.methods.vida import read_warmup

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    files = (((0.0,) * 3, (1.0,) * 3, "unit", True), ((0.5,) * 3, (0.5,) * 3, "backbone", True),
             ((0.5,) * 3, (0.5,) * 3, "backbone", False))  # fmt: skip
    for index, (mean, std, preprocessing, data_parallel) in enumerate(files):
        path, state = _normaliser_checkpoint(tmp_path, mean, std, f"{index}.pt", data_parallel)
        assert read_warmup(path)[1]["preprocessing"] == preprocessing
        method = create("vida", _backbone(tiny_vit(head_scale=5.0)), checkpoint=str(path), preprocessing=preprocessing)
        with torch.no_grad():
            worst = float((method.model(x) - restated_imse_loading(state, x)).abs().max())
        assert worst <= 1e-6, (preprocessing, worst)
        other = "backbone" if preprocessing == "unit" else "unit"
        with pytest.raises(ValueError, match=f"trained with preprocessing='{preprocessing}'"):
            create("vida", _backbone(tiny_vit()), checkpoint=str(path), preprocessing=other)
    path, _ = _normaliser_checkpoint(tmp_path, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "imagenet.pt")
    with pytest.raises(ValueError, match="normalised with mean .*0.485.* the backbone's own: mean .*0.5"):
        create("vida", _backbone(tiny_vit()), checkpoint=str(path))
