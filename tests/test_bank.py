"""Domain descriptors, shift detection, the bounded domain bank, and IMSE's retrieval built on them."""

import math

import pytest
import torch
from conftest import tiny_vit

from imse.core.bank import (
    BankMismatchError,
    Descriptor,
    DomainBank,
    ShiftDetector,
    batch_descriptor,
    patch_tokens,
    symmetric_kl,
)
from imse.core.methods import create
from imse.core.spectral import get_code
from imse.data.fashion_mnist import BuiltinSource, load_shipped, to_rgb32
from imse.data.models import create_backbone
from imse.data.streams import Stream


def loop_kl(mu_a, var_a, mu_b, var_b) -> float:
    terms = []
    for ma, va, mb, vb in zip(mu_a.tolist(), var_a.tolist(), mu_b.tolist(), var_b.tolist()):
        kl_ab = 0.5 * (math.log(vb / va) + (va + (ma - mb) ** 2) / vb - 1)
        kl_ba = 0.5 * (math.log(va / vb) + (vb + (ma - mb) ** 2) / va - 1)
        terms.append(kl_ab + kl_ba)  # the log terms cancel: symmetric KL of 1-D Gaussians
    return sum(terms) / len(terms)


def descriptor(seed: int, channels: int = 8, shift: float = 0.0) -> Descriptor:
    g = torch.Generator().manual_seed(seed)
    return Descriptor(torch.randn(channels, generator=g) + shift, torch.rand(channels, generator=g) + 0.5)


def test_symmetric_kl_equals_independent_computation_and_is_zero_for_identical():
    a, b = descriptor(0), descriptor(1)
    got = symmetric_kl(a.mean, a.var, b.mean, b.var).item()
    assert got == pytest.approx(loop_kl(a.mean, a.var, b.mean, b.var), rel=1e-6)
    assert symmetric_kl(b.mean, b.var, a.mean, a.var).item() == pytest.approx(got, rel=1e-6)
    assert symmetric_kl(a.mean, a.var, a.mean, a.var).item() == 0.0  # v/v = 1 exactly, the gap is exactly 0
    assert a.distance(b) == pytest.approx(got, rel=1e-6)


def test_batch_descriptor_pools_batch_and_tokens_with_unbiased_variance():
    tokens = torch.randn(3, 5, 4)
    d = batch_descriptor(tokens)
    flat = tokens.reshape(15, 4)
    torch.testing.assert_close(d.mean, flat.mean(0))
    torch.testing.assert_close(d.var, ((flat - flat.mean(0)) ** 2).sum(0) / 14)


def test_descriptor_ema_follows_the_rule_on_full_batches_only():
    detector = ShiftDetector(threshold=0.05, momentum=0.8, full_batch=64)
    first, second, short = descriptor(0), descriptor(1), descriptor(2)
    assert detector.score(first) is None  # no domain yet: no shift can be scored
    detector.update(first, 64)
    torch.testing.assert_close(detector.current.mean, first.mean)
    detector.update(short, 10)  # a short batch leaves the EMA alone
    torch.testing.assert_close(detector.current.mean, first.mean)
    detector.update(second, 64)
    torch.testing.assert_close(detector.current.mean, 0.8 * first.mean + 0.2 * second.mean)
    torch.testing.assert_close(detector.current.var, 0.8 * first.var + 0.2 * second.var)
    detector.reset()
    assert detector.current is None


@pytest.fixture(scope="module")
def builtin():
    return create_backbone("builtin"), BuiltinSource()


def scores_of(backbone, stream) -> tuple[list[int], list[int]]:
    detector, found, boundaries = ShiftDetector(0.05, 0.8, 64), [], []
    for batch in stream:
        if batch.first_of_domain and batch.domain_index > 0:
            boundaries.append(batch.batch_index)
        d = batch_descriptor(patch_tokens(backbone, batch.images.float() / 255))
        if detector.is_shift(detector.score(d)):
            found.append(batch.batch_index)
            detector.reset()
        detector.update(d, len(batch.labels))
    return found, boundaries


def test_one_boundary_is_detected_at_the_boundary_and_a_stationary_stream_never(builtin):
    backbone, source = builtin
    found, boundaries = scores_of(backbone, Stream(source, "continual", ["clean", "fog"], per_domain=640))
    assert boundaries == [10] and found == [10]
    stationary = Stream(source, "recurring", ["clean"], per_domain=9984, rounds=2)  # 312 batches of 64
    found, _ = scores_of(backbone, stationary)
    assert len(stationary) == 2 * 9984 // 64 and found == []


def test_top1_restores_a_stored_code_bit_exactly_and_mix_equals_the_formula():
    code = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([4.0, 5.0])}
    source = {"a": torch.tensor([1.0, 1.0, 1.0]), "b": torch.tensor([2.0, 2.0])}
    bank = DomainBank(capacity=4)
    bank.set_source(descriptor(0), source)
    slot = bank.store(descriptor(1, shift=3.0), code, None)
    bank.store(descriptor(2, shift=-3.0), {k: v * 7 for k, v in code.items()}, None)
    query = descriptor(1, shift=3.0)
    by_hand = [loop_kl(query.mean, query.var, e.descriptor.mean, e.descriptor.var) for e in bank.entries]
    got_slot, got_code, distances = bank.top1(query)
    assert distances.tolist() == pytest.approx(by_hand, rel=1e-6)  # float32 against the float64 loop
    assert by_hand[1] == 0.0 and got_slot == slot == 1 == min(range(3), key=by_hand.__getitem__)
    assert all(torch.equal(got_code[k], code[k]) for k in code)
    code["a"][0] = 99.0  # the bank keeps its own copy
    assert bank.entries[1].code["a"][0] == 1.0
    mixed, weights, distances = bank.mix(query, source, temperature=0.7)
    exps = [math.exp(-d / 0.7) for d in by_hand]
    expected_w = [e / sum(exps) for e in exps]
    assert weights.tolist() == pytest.approx(expected_w, rel=1e-6)  # float32 against the float64 loop
    stored = [{"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0]}, {"a": [1.0, 2.0, 3.0], "b": [4.0, 5.0]}]
    stored.append({"a": [7.0, 14.0, 21.0], "b": [28.0, 35.0]})  # slots 0, 1, 2 as written above
    for name in source:
        s0 = stored[0][name]
        expected = [s0[i] + sum(w * (c[name][i] - s0[i]) for w, c in zip(expected_w, stored)) for i in range(len(s0))]
        assert mixed[name].tolist() == pytest.approx(expected, rel=1e-6)  # float32 against the float64 loop


def test_capacity_is_never_exceeded_and_slot_0_survives_merges():
    """A sequence worked by hand (1-D descriptors, all variances 1 unless merged): each store past the capacity
    merges the two closest non-source entries, and the stored domain's slot is the merged one."""

    def one(mean: float, var: float = 1.0) -> Descriptor:
        return Descriptor(torch.tensor([mean]), torch.tensor([var]))

    bank = DomainBank(capacity=3)
    bank.set_source(one(0.0), {"s": torch.tensor([0.0])})
    slots, sizes = [], []
    for mean, code in [(10.0, 10.0), (50.0, 50.0), (11.0, 12.0), (49.0, 48.0), (0.2, 2.0)]:
        slots.append(bank.store(one(mean), {"s": torch.tensor([code])}, None))
        sizes.append(len(bank))
    # 10 → slot 1; 50 → slot 2; 11 merges with 10 (gap 1) into slot 1; 49 with 50 into slot 2; 0.2 is nearest
    # the source (gap 0.2), but the source never merges: it joins the nearest other, slot 1 (gap 10.3)
    assert slots == [1, 2, 1, 2, 1] and sizes == [2, 3, 3, 3, 3]
    assert bank.entries[0].label == "source" and bank.entries[0].count == 1
    assert bank.entries[0].descriptor.mean.item() == 0.0 and bank.entries[0].code["s"].item() == 0.0
    assert [e.count for e in bank.entries[1:]] == [3, 2]  # every visit is accounted for in the merged entries
    assert bank.entries[2].code["s"].item() == 49.0  # (50 + 48) / 2
    assert bank.entries[2].descriptor.mean.item() == 49.5  # (50 + 49) / 2
    assert bank.entries[2].descriptor.var.item() == 1.25  # 1 + the means' spread about 49.5, 0.5²
    # slot 1: (10 + 12) / 2 = 11 with count 2, then 2/3 · 11 + 1/3 · 2 = 8 (2/3 and 1/3 round in float32)
    assert bank.entries[1].code["s"].item() == pytest.approx(8.0, rel=1e-6)


def test_merge_averages_codes_by_count_and_moment_matches_descriptors():
    bank = DomainBank(capacity=2, has_source=False)
    a = Descriptor(torch.tensor([0.0]), torch.tensor([1.0]))
    b = Descriptor(torch.tensor([2.0]), torch.tensor([1.0]))
    bank.store(a, {"s": torch.tensor([0.0])}, None)
    bank.store(b, {"s": torch.tensor([3.0])}, None)
    bank.store(Descriptor(torch.tensor([100.0]), torch.tensor([1.0])), {"s": torch.tensor([9.0])}, None)
    merged = bank.entries[0]
    # 0, 1.5, 1 and 2 are exact in float32, and so is every step to them (halves of small integers)
    assert merged.count == 2 and merged.code["s"].item() == 1.5
    assert merged.descriptor.mean.item() == 1.0 and merged.descriptor.var.item() == 2.0


def imse_with_bank(images):
    return create("imse", create_backbone("builtin"), retrieval="top1", lr=7e-4, source_images=images, batch_size=64)


@pytest.fixture(scope="module")
def source_images():
    images, _ = load_shipped("train_sample")
    return to_rgb32(images[:512]).float() / 255


def test_imse_retrieval_records_events_and_resets(builtin, source_images):
    _, source = builtin
    method = imse_with_bank(source_images)
    assert len(method.bank) == 1
    stream = Stream(source, "continual", ["clean", "fog", "clean"], per_domain=256)
    records = []
    for batch in stream:
        method(batch.images.float() / 255)
        records.append(dict(method.last_record))
    detected = [i for i, r in enumerate(records) if r["shift_detected"]]
    assert detected == [4, 8]
    for index in detected:  # the retrieved slot is the nearest one
        distances = records[index]["slot_distances"]
        assert records[index]["retrieved_slot"] == min(range(len(distances)), key=distances.__getitem__)
    first = records[4]  # the ended domain is stored in slot 1: its distance is the shift score itself
    assert first["stored_slot"] == 1 and len(first["slot_distances"]) == 2
    assert first["slot_distances"][1] == first["shift_score"]
    back = records[8]  # back to clean: the source slot is the nearest
    assert back["stored_slot"] == 2 and back["retrieved_slot"] == 0 and back["bank_size"] == 3
    assert [r["shift_score"] is None for r in records] == [True] + [False] * 11  # only before the first domain
    method.reset()
    assert len(method.bank) == 1 and method.detector.current is None


def test_bank_save_load_round_trip_and_refusals(tmp_path, builtin, source_images):
    _, source = builtin
    method = imse_with_bank(source_images)
    for batch in Stream(source, "continual", ["clean", "fog"], per_domain=256):
        method(batch.images.float() / 255)
    path = tmp_path / "bank.safetensors"
    method.save_bank(path)
    other = imse_with_bank(source_images)
    other.load_bank(path)
    assert len(other.bank) == len(method.bank) == 2
    for a, b in zip(method.bank.entries, other.bank.entries):
        assert torch.equal(a.descriptor.mean, b.descriptor.mean) and a.count == b.count and a.label == b.label
        assert all(torch.equal(a.code[k], b.code[k]) for k in a.code)
    saved_state = method.bank.entries[1].optimizer_state
    loaded_state = other.bank.entries[1].optimizer_state
    assert loaded_state["param_groups"][0]["lr"] == saved_state["param_groups"][0]["lr"]
    assert torch.equal(loaded_state["state"][0]["exp_avg"], saved_state["state"][0]["exp_avg"])
    other.optimizer.load_state_dict(loaded_state)  # a stored optimizer state is usable as is

    before = [e.code for e in other.bank.entries]
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a bank at all")
    with pytest.raises(BankMismatchError, match="not a readable"):
        other.load_bank(garbage)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BankMismatchError):
        other.load_bank(truncated)
    with pytest.warns(UserWarning, match="no source images"):
        tiny = create("imse", tiny_vit(), retrieval="top1")
    tiny_path = tmp_path / "tiny.safetensors"
    tiny.save_bank(tiny_path)
    with pytest.raises(BankMismatchError, match="another model"):
        other.load_bank(tiny_path)
    assert [e.code for e in other.bank.entries] == before  # untouched by every refusal
    assert get_code(other.model)  # and the model still has its code


def test_retrieval_without_source_images_starts_empty_and_says_so(builtin):
    with pytest.warns(UserWarning, match="no source images"):
        method = create("imse", create_backbone("builtin"), retrieval="top1")
    assert len(method.bank) == 0 and "empty" in method.bank_note
    with pytest.raises(ValueError, match="retrieval"):
        create("imse", create_backbone("builtin"), retrieval="nearest")


def test_observe_scores_decides_reseeds_and_folds_in_as_the_official_order():
    """One call per batch, checked against the four steps written out: KL to the current EMA descriptor, a shift
    above τ, a new domain started from the batch, the batch folded in (full batches only)."""
    from imse.core.bank import Descriptor, ShiftDetector

    generator = torch.Generator().manual_seed(0)
    batches = []
    for domain, size in [(0, 64), (0, 64), (0, 32), (3, 64), (3, 64), (0, 64), (0, 64)]:
        mean = torch.randn(8, generator=generator) * 0.05 + domain
        batches.append((Descriptor(mean, 1 + 0.01 * torch.rand(8, generator=generator)), size))
    detector = ShiftDetector(threshold=0.05, momentum=0.8, full_batch=64)
    current, shifts = None, []
    for index, (descriptor, size) in enumerate(batches):
        expected_score = None if current is None else descriptor.distance(current)
        expected_shift = expected_score is not None and expected_score > 0.05
        ended = current if expected_shift else None
        if expected_shift:
            current = None
        if size >= 64:
            current = (
                Descriptor(descriptor.mean.clone(), descriptor.var.clone())
                if current is None
                else Descriptor(0.8 * current.mean + 0.2 * descriptor.mean, 0.8 * current.var + 0.2 * descriptor.var)
            )
        score, shift, got_ended = detector.observe(descriptor, size)
        assert score == expected_score and shift == expected_shift
        assert (got_ended is None) == (ended is None)
        if ended is not None:
            assert torch.equal(got_ended.mean, ended.mean) and torch.equal(got_ended.var, ended.var)
            shifts.append(index)
        assert torch.equal(detector.current.mean, current.mean) and torch.equal(detector.current.var, current.var)
    assert shifts == [3, 5]  # into domain 3 and back


def test_the_official_source_descriptor_is_the_detectors_ema_over_full_batches():
    """source_descriptor='ema' (paper protocol): 0.8·old + 0.2·new over batches of 64 in order, the short last
    batch skipped — restated here from the batches' own statistics."""
    from imse.core.bank import batch_descriptor, patch_tokens

    torch.manual_seed(0)
    images = torch.rand(64 * 3 + 10, 3, 32, 32)
    method = create("imse", tiny_vit(), retrieval="top1", source_images=images, source_descriptor="ema")
    expected = None
    for start in (0, 64, 128):
        d = batch_descriptor(patch_tokens(method.model, images[start : start + 64]))
        expected = (d.mean, d.var) if expected is None else (
            0.8 * expected[0] + 0.2 * d.mean, 0.8 * expected[1] + 0.2 * d.var)  # fmt: skip
    slot0 = method.bank.entries[0].descriptor
    assert torch.allclose(slot0.mean, expected[0], atol=1e-6) and torch.allclose(slot0.var, expected[1], atol=1e-6)
    pooled = create("imse", tiny_vit(), retrieval="top1", source_images=images).bank.entries[0].descriptor
    assert not torch.allclose(pooled.mean, slot0.mean, atol=1e-6)
    with pytest.raises(ValueError, match="source_descriptor must be"):
        create("imse", tiny_vit(), source_descriptor="mean")


def test_mix_retrieval_stores_mixes_and_predicts_with_the_papers_softmax_weights(builtin, source_images):
    """``retrieval="mix"`` end to end on the built-in model (it raised KeyError on the first shift): at each
    detected shift the bank stores the ended domain, the new ``S`` is ``S0 + Σ_k w_k (S_k − S0)`` and ``w`` is
    softmax(−D/T) over the descriptor distances, here computed by hand from the slots' means and variances."""
    _, source = builtin
    temperature = 0.5
    method = create(
        "imse", create_backbone("builtin"), retrieval="mix", lr=7e-4, source_images=source_images, batch_size=64,
        mix_temperature=temperature,
    )  # fmt: skip
    stream = Stream(source, "continual", ["clean", "fog", "clean"], per_domain=128)
    shifts = 0
    for batch in stream:
        x = batch.images.float() / 255
        incoming = batch_descriptor(patch_tokens(method.model, x))
        method(x)
        record = method.last_record
        if not record["shift_detected"]:
            assert record["mix_weights"] is None
            continue
        shifts += 1
        assert record["stored_slot"] == shifts and record["retrieved_slot"] == "mix"
        by_hand = [
            loop_kl(incoming.mean, incoming.var, e.descriptor.mean, e.descriptor.var) for e in method.bank.entries
        ]
        exps = [math.exp(-d / temperature) for d in by_hand]
        weights = [e / sum(exps) for e in exps]
        # float32 sums over the channels of (v_a + gap)/v_b − 1 terms that nearly cancel near 0: 1e-4 relative
        assert record["slot_distances"] == pytest.approx(by_hand, rel=1e-4, abs=1e-6)
        assert record["mix_weights"] == pytest.approx(weights, rel=1e-4, abs=1e-6)
        s0 = method.source_code  # the code set before the step: the bank is as it was then
        code, _, _ = method.bank.mix(incoming, s0, temperature)
        for k in s0:
            mixed = s0[k].double() + sum(
                w * (e.code[k].double() - s0[k].double()) for w, e in zip(weights, method.bank.entries)
            )
            torch.testing.assert_close(code[k].double(), mixed, rtol=1e-5, atol=1e-6)
    assert shifts == 2
    assert set(method.source_code) == set(get_code(method.model))  # one key form for every code
    logits = method(x)
    assert logits.shape == (len(x), 10) and torch.isfinite(logits).all()


def test_a_detection_within_one_batch_of_a_boundary_is_a_hit_and_each_boundary_is_matched_once():
    from imse.runs.shifts import match_boundaries

    assert match_boundaries([9, 10, 11, 30], [10, 20]) == (1, {20})  # 9, 10 and 11 all near 10: one hit
    assert match_boundaries([11, 19], [10, 20]) == (2, set())
    assert match_boundaries([], [10]) == (0, {10})
