import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import CUDA, relative_error, tiny_vit
from torch import nn

from imse.core.codes import load_code, save_code
from imse.core.spectral import (
    CodeMismatchError,
    SpectralLinear,
    get_code,
    inject,
    merge,
    reset_code,
    set_code,
    set_path,
    spectral_layers,
)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_reproduces_the_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    layer = SpectralLinear.from_linear(linear)
    r = min(shape)
    assert layer.U.shape == (shape[0], r) and layer.Vh.shape == (r, shape[1]) and layer.S.shape == (r,)
    assert [name for name, _ in layer.named_parameters() if name != "bias"] == ["S"]
    assert {name for name, _ in layer.named_buffers()} == {"U", "Vh", "S0"}
    assert torch.equal(layer.S.detach(), layer.S0)
    assert (layer.bias is None) == (not bias)
    # singular values come sorted and non-negative, factors are orthonormal
    assert torch.all(layer.S[:-1] >= layer.S[1:]) and torch.all(layer.S >= 0)
    torch.testing.assert_close(layer.U.T @ layer.U, torch.eye(r), atol=1e-5, rtol=0)
    x = torch.randn(3, 7, shape[1])
    for path in ("dense", "factored"):
        layer.path = path
        assert relative_error(layer(x), linear(x)) <= 1e-5


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError):
        SpectralLinear.from_linear(nn.Conv2d(3, 3, 1))


def test_inject_vit_tiny_all_blocks_reconstructs():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
    names = inject(model)
    expected = [f"blocks.{b}.{p}" for b in range(12) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert names == expected
    assert list(spectral_layers(model)) == expected
    with torch.no_grad():
        after = model(x)
    assert relative_error(after, before) <= 1e-5
    # patch embedding, head, norms untouched
    assert isinstance(model.head, nn.Linear) and isinstance(model.patch_embed.proj, nn.Conv2d)


@pytest.mark.slow  # ViT-B/16's SVDs
def test_inject_one_vit_base_block_reconstructs():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
        block_in = model._pos_embed(model.patch_embed(x))
        block_before = model.blocks[0](block_in)
    names = inject(model, blocks=[0])
    assert names == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    with torch.no_grad():
        assert relative_error(model.blocks[0](block_in), block_before) <= 1e-5
        assert relative_error(model(x), before) <= 1e-5


def test_inject_targets_blocks_and_wrappers():
    vit = tiny_vit()
    wrapped = nn.Sequential(nn.Identity(), vit)  # e.g. a normalisation module in front
    names = inject(wrapped, blocks=[-1], targets=("fc1", "attn.proj"))
    assert names == ["1.blocks.5.mlp.fc1", "1.blocks.5.attn.proj"]
    assert inject(wrapped, blocks=[5], targets=("fc1",)) == []  # already spectral: left alone
    with pytest.raises(IndexError):
        inject(vit, blocks=[6])
    with pytest.raises(ValueError, match="unknown target"):
        inject(vit, targets=("query",))
    with pytest.raises(ValueError, match="VisionTransformer"):
        inject(nn.Linear(3, 3))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("leading", [(1, 1), (1, 65), (3, 13), (2, 7, 5)])
def test_dense_and_factored_paths_agree_with_gradients(device, leading):
    """Every computation path gives the same output and the same S gradient (batch 1, odd token counts)."""
    torch.manual_seed(0)
    layer = SpectralLinear.from_linear(nn.Linear(24, 40)).to(device)
    with torch.no_grad():
        layer.S.mul_(1 + 0.1 * torch.randn_like(layer.S))
    x = torch.randn(*leading, 24, device=device, requires_grad=True)
    results = {}
    for path in ("dense", "factored", "auto"):
        layer.path = path
        layer.S.grad = None
        x.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        results[path] = (y.detach(), layer.S.grad.clone(), x.grad.clone())
    for path in ("factored", "auto"):
        for got, want in zip(results[path], results["dense"]):
            assert relative_error(got, want) <= 1e-5
    # frozen S (IMSE's diversity layers): the factored path scales U instead of the rows when rows outnumber it
    layer.S.requires_grad_(False)
    frozen = {}
    for path in ("dense", "factored"):
        layer.path = path
        x.grad = None
        y = layer(x)
        (y * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        frozen[path] = (y.detach(), x.grad.clone())
    for got, want in zip(frozen["factored"], frozen["dense"]):
        assert relative_error(got, want) <= 1e-5
    assert relative_error(frozen["dense"][0], results["dense"][0]) == 0


def test_bf16_autocast_keeps_the_factored_rows_in_bf16_and_matches_float32():
    """Under bf16 autocast the factored path scales its rows in bf16 (a float32 S would promote every row to
    float32, and the next GEMM cast it back) and still gives the float32 output and S gradient to bf16 precision."""
    from torch.overrides import TorchFunctionMode

    class RecordDtypes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append((out.dtype, tuple(out.shape)))
            return out

    torch.manual_seed(0)
    layer = SpectralLinear.from_linear(nn.Linear(24, 40))  # rank 24: the rows are [3, 13, 24]
    layer.path = "factored"
    x = torch.randn(3, 13, 24)
    weights = torch.linspace(-1, 1, 40)
    want = layer(x)
    (want * weights).sum().backward()
    want_grad, layer.S.grad = layer.S.grad.clone(), None
    seen: list = []
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordDtypes():
        got = layer(x)
    (got.float() * weights).sum().backward()
    rows = [dtype for dtype, shape in seen if shape == (3, 13, 24)]
    assert len(rows) == 2 and set(rows) == {torch.bfloat16}  # the projection and its scaled copy
    assert got.dtype == torch.bfloat16 and layer.S.grad.dtype == torch.float32
    assert relative_error(got.float(), want) < 2e-2
    assert relative_error(layer.S.grad, want_grad) < 3e-2


def test_auto_path_picks_the_cheaper_computation():
    layer = SpectralLinear.from_linear(nn.Linear(768, 768))
    with torch.no_grad():
        assert layer.use_factored(rows=197, input_grad=False)  # batch 1: 2·197·768² < 197·768² + 768³
        assert not layer.use_factored(rows=64 * 197, input_grad=False)
    wide = SpectralLinear.from_linear(nn.Linear(768, 3072))
    with torch.enable_grad():  # training S: the factored form needs no weight-gradient GEMM
        assert wide.use_factored(rows=64 * 197, input_grad=True)
    wide.path = "dense"
    assert not wide.use_factored(rows=1, input_grad=False)
    with pytest.raises(ValueError):
        set_path(nn.Sequential(wide), "fast")


@pytest.mark.parametrize("leading", [(1, 1), (1, 65), (3, 13)])
def test_inference_reuses_the_merged_weight_only_while_s_is_unchanged(leading):
    """No-grad calls build ``U diag(S) Vh`` on the second call at the same weights and reuse it; any change of S
    (set_code, an optimiser step) or a dtype change is seen, so the output always equals the dense path's."""
    torch.manual_seed(0)
    layer = SpectralLinear.from_linear(nn.Linear(24, 40))
    x = torch.randn(*leading, 24)

    def dense_reference():
        return F.linear(x.to(layer.S.dtype), (layer.U * layer.S) @ layer.Vh, layer.bias).detach()

    built, weight = [], layer.weight  # every U diag(S) Vh the layer builds, through its public weight()
    layer.weight = lambda: built.append(1) or weight()
    with torch.no_grad():
        dense = 0 if layer.use_factored(x.numel() // 24, input_grad=False) else 1  # the per-call route's builds

        def builds(call) -> int:
            before = len(built)
            call()
            return len(built) - before

        outputs = []
        # first sight of these weights: the per-call route, nothing kept; the second builds it; the third reuses it
        assert [builds(lambda: outputs.append(layer(x))) for _ in range(3)] == [dense, 1, 0]
    for y in outputs:
        assert relative_error(y, dense_reference()) <= 1e-5

    set_code(nn.Sequential(layer), {"0": layer.S.detach() * 1.1})
    with torch.no_grad():
        assert builds(lambda: outputs.append(layer(x))) == dense  # the stale weight was dropped, not used
        assert relative_error(outputs[-1], dense_reference()) <= 1e-5
        assert [builds(lambda: layer(x)) for _ in range(2)] == [1, 0]  # built again for the new S, then kept

    optimizer = torch.optim.SGD([layer.S], lr=0.1)
    layer(x).square().sum().backward()  # with autograd: never the cached weight
    optimizer.step()
    with torch.no_grad():
        layer(x)
        assert relative_error(layer(x), dense_reference()) <= 1e-5

    layer.double()
    with torch.no_grad():
        y = layer(x.double())
        assert y.dtype == torch.float64 and relative_error(y, dense_reference()) <= 1e-12


def test_reset_to_linear_and_merge():
    model = tiny_vit()
    inject(model)
    x = torch.randn(2, 3, 32, 32)
    code = {name: s * 1.05 for name, s in get_code(model).items()}
    set_code(model, code)
    with torch.no_grad():
        adapted = model(x)
    merged_model = copy.deepcopy(model)
    names = merge(merged_model)
    assert len(names) == 24 and not spectral_layers(merged_model)
    assert all(type(merged_model.get_submodule(n)) is nn.Linear for n in names)
    with torch.no_grad():
        assert relative_error(merged_model(x), adapted) <= 1e-5
    reset_code(model)
    assert all(torch.equal(layer.S.detach(), layer.S0) for layer in spectral_layers(model).values())


def test_code_roundtrip_and_mismatch(tmp_path):
    model = tiny_vit()
    inject(model)
    original = get_code(model)
    with pytest.raises(CodeMismatchError, match="missing"):
        set_code(model, {k: v for k, v in list(original.items())[1:]})
    with pytest.raises(CodeMismatchError, match="shape"):
        set_code(model, {**original, "blocks.0.attn.qkv": torch.ones(3)})
    assert all(torch.equal(get_code(model)[k], v) for k, v in original.items())  # untouched on failure

    torch.manual_seed(1)
    adapted = {name: s * (1 + 0.01 * torch.randn_like(s)) for name, s in original.items()}
    set_code(model, adapted)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    path = save_code(tmp_path / "code.safetensors", model, extra={"note": "test"})
    reset_code(model)
    loaded = load_code(path, model)
    assert list(loaded) == list(original)
    for name, value in get_code(model).items():
        assert torch.equal(value, adapted[name])  # bit-exact
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_code_for_another_model_is_refused(tmp_path):
    model = tiny_vit(seed=0)
    inject(model)
    path = save_code(tmp_path / "code.safetensors", model)

    deeper = tiny_vit(depth=7)
    inject(deeper)
    with pytest.raises(CodeMismatchError, match="missing for 4 layer"):
        load_code(path, deeper)
    shallower = tiny_vit(depth=5)
    inject(shallower)
    with pytest.raises(CodeMismatchError, match="4 unknown layer"):
        load_code(path, shallower)

    other_weights = tiny_vit(seed=1)  # same architecture, other source weights
    inject(other_weights)
    before = get_code(other_weights)
    with pytest.raises(CodeMismatchError, match="other source weights"):
        load_code(path, other_weights)
    assert all(torch.equal(get_code(other_weights)[k], v) for k, v in before.items())

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CodeMismatchError, match="not a readable"):
        load_code(garbage, model)
    with pytest.raises(CodeMismatchError, match="no spectral layers"):
        load_code(path, tiny_vit())


def test_svd_cache_hits_are_exact_and_corrupted_entries_are_rebuilt(tmp_path):
    from imse.core.svd_cache import SVDCache, decompose

    cache = SVDCache(tmp_path)
    first, second = tiny_vit(), tiny_vit()
    names = inject(first, cache=cache)
    assert cache.misses == len(names) and cache.hits == 0
    inject(second, cache=cache)
    assert cache.hits == len(names)
    for a, b in zip(spectral_layers(first).values(), spectral_layers(second).values()):
        assert torch.equal(a.U, b.U) and torch.equal(a.S0, b.S0) and torch.equal(a.Vh, b.Vh)
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave nothing behind
    weight = torch.randn(12, 8)
    assert cache.key(weight) != cache.key(weight.double()) and cache.key(weight) == cache.key(weight.clone())
    expected = decompose(weight)
    cache.decompose(weight)
    path = cache.path(cache.key(weight))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the factors
    path.write_bytes(bytes(data))
    got = cache.decompose(weight)
    assert cache.rejected == 1
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    path.write_bytes(b"truncated")
    assert all(torch.equal(g, e) for g, e in zip(cache.decompose(weight), expected)) and cache.rejected == 2


def test_a_code_saved_from_a_bare_vit_loads_into_the_wrapped_one_and_back(tmp_path):
    """Code keys are relative to the ViT, so the built-in wrapper (which holds its ViT as ``model``) and the bare
    timm ViT exchange codes; a code written with the wrapper's prefix (before codes were portable) still loads."""
    import copy

    from imse.data.models import BUILTIN, create_backbone

    wrapped = create_backbone(BUILTIN)
    bare = copy.deepcopy(wrapped.model)
    inject(wrapped)
    inject(bare)
    with torch.no_grad():
        for layer in spectral_layers(bare).values():
            layer.S.mul_(1.0 + 0.01 * torch.arange(layer.rank, dtype=layer.S.dtype) / layer.rank)
    path = save_code(tmp_path / "bare.safetensors", bare)
    code = load_code(path, wrapped)
    assert all(name.startswith("blocks.") for name in code)
    for name, layer in spectral_layers(bare).items():
        assert torch.equal(wrapped.get_submodule("model." + name).S, layer.S)
    reset_code(bare)
    load_code(save_code(tmp_path / "wrapped.safetensors", wrapped), bare)
    assert all(torch.equal(bare.get_submodule(n).S, get_code(wrapped)[n]) for n in get_code(bare))
    reset_code(wrapped)
    set_code(wrapped, {"model." + name: value for name, value in get_code(bare).items()})  # the old keys
    assert all(torch.equal(a, b) for a, b in zip(get_code(wrapped).values(), get_code(bare).values()))
