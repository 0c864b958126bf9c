"""Several tracks in shared forward passes give the same stems as one at a time."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import JobCancelled
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import parse_stems

EXACT = SeparationOptions(shifts=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    return SeparationEngine.load("tiny", model_dir, "cpu")


@pytest.fixture(scope="module")
def mixes():
    rng = np.random.default_rng(1)
    # One shorter than a segment, one of a few segments, one not a multiple of the stride.
    return [(0.1 * rng.standard_normal((2, int(44100 * seconds)))).astype(np.float32) for seconds in (3.0, 17.0, 9.3)]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_equals_one_at_a_time(engine, mixes, batch_size):
    request = parse_stems("all", engine.sources)
    together = engine.separate_many(mixes, request, EXACT, batch_size=batch_size)
    for mix, batched in zip(mixes, together, strict=True):
        alone = engine.separate(mix, request, EXACT)
        assert list(batched) == list(alone)
        for name in alone:
            assert batched[name].shape == mix.shape
            np.testing.assert_allclose(batched[name], alone[name], atol=2e-5, rtol=0)


def test_batched_specialists_run_only_what_is_needed(model_dir, mixes):
    bag = SeparationEngine.load("tinybag", model_dir, "cpu")
    request = parse_stems("karaoke", bag.sources)
    together = bag.separate_many(mixes[:2], request, EXACT)
    for mix, batched in zip(mixes[:2], together, strict=True):
        alone = bag.separate(mix, request, EXACT)
        np.testing.assert_allclose(batched["vocals"], alone["vocals"], atol=2e-5, rtol=0)
        np.testing.assert_allclose(batched["no_vocals"], mix - batched["vocals"], atol=1e-6)


def test_shifts_keep_shapes_and_stay_close(engine, mixes):
    request = parse_stems("vocals", engine.sources)
    shifted = engine.separate_many(mixes, request, SeparationOptions(shifts=2))
    for mix, result in zip(mixes, shifted, strict=True):
        assert result["vocals"].shape == mix.shape and np.isfinite(result["vocals"]).all()


def test_progress_and_cancel(engine, mixes):
    seen: list[float] = []
    engine.separate_many(mixes, parse_stems("all", engine.sources), EXACT, batch_size=2, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 3
    calls = [0]

    def cancel_after_two():
        calls[0] += 1
        return calls[0] > 2

    with pytest.raises(JobCancelled):
        engine.separate_many(mixes, parse_stems("all", engine.sources), EXACT, batch_size=1,
                             should_cancel=cancel_after_two)
    assert calls[0] == 3


def test_a_failed_pass_gives_its_segments_back(model_dir, mixes):
    import torch

    from core.separation.batching import PassFailed, SegmentBatcher, TrackWork
    from tests.support.faulty_models import OutOfMemoryAbove2
    from tests.support.models import tiny_htdemucs

    model = tiny_htdemucs(seed=0, klass=OutOfMemoryAbove2).eval()
    works = [TrackWork(model, torch.from_numpy(mix)) for mix in mixes[1:]]
    firsts = [work.peek() for work in works]
    batcher = SegmentBatcher("cpu", batch_size=4)
    with pytest.raises(PassFailed) as failed:
        batcher.step(works)
    assert failed.value.segments == 4 and failed.value.works == works
    assert isinstance(failed.value.cause, torch.OutOfMemoryError)
    assert [work.peek() for work in works] == firsts and all(work.done == 0 for work in works)

    batcher.batch_size = 2
    while not all(work.finished for work in works):
        batcher.step(works)
    # The same weights in plain HTDemucs, one segment a pass: the same stems.
    reference, one = tiny_htdemucs(seed=0).eval(), SegmentBatcher("cpu", batch_size=1)
    for mix, work in zip(mixes[1:], works, strict=True):
        alone = TrackWork(reference, torch.from_numpy(mix))
        while not alone.finished:
            one.step([alone])
        torch.testing.assert_close(work.result(), alone.result(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("error, expected", [
    ("torch", True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("out of range"), False),
])
def test_out_of_memory_is_told_apart(error, expected):
    import torch

    from core.separation.batching import out_of_memory

    if error == "torch":
        error = torch.OutOfMemoryError("boom")
    assert out_of_memory(error) is expected


def _snr_db(reference: np.ndarray, estimate: np.ndarray) -> float:
    noise = np.sum((reference - estimate) ** 2)
    return float(10 * np.log10(np.sum(reference**2) / max(noise, 1e-30)))


# The bag is `tinyshortbag` (2-second segments): four models, two shifts each, on these short
# tracks cost about half what 7.8-second segments padded to full length do.
@pytest.mark.parametrize("name", ["tiny", "tinyshortbag"])
def test_batched_shifts_equal_demucs_apply_model_with_the_same_shifts(model_dir, mixes, name, monkeypatch):
    """The batching code re-implements demucs's random shifts (pad, shift, separate, trim,
    average, per model of a bag). Tracks sharing forward passes, each with the shift
    offsets demucs's own `apply_model` drew for it, give what `apply_model` gives alone.

    The offsets are recorded and replayed rather than seeded: HTDemucs's forward pass
    itself draws from `random` (its transformer's `sin_random_shift`), so the same seed
    gives other offsets once forward passes come in another order."""
    import random

    import torch
    from demucs.apply import apply_model

    from core.separation import catalogue
    from core.separation.batching import SegmentBatcher, TrackWork

    model = catalogue.load(name, model_dir)
    model.eval()
    draw = random.randint
    # Short tracks (one segment of `tiny`, and a few segments not a multiple of the stride)
    # keep the reference runs quick.
    tensors = [torch.from_numpy(mixes[0]), torch.from_numpy(mixes[2][:, :44100 * 6 + 123]).contiguous()]
    expected, offsets = [], []
    for index, mix in enumerate(tensors):
        random.seed(1000 + index)
        drawn: list[int] = []
        monkeypatch.setattr(random, "randint", lambda a, b, drawn=drawn: drawn.append(draw(a, b)) or drawn[-1])
        with torch.inference_mode():
            expected.append(apply_model(model, mix[None], shifts=2, split=True, overlap=0.25, device="cpu")[0].numpy())
        offsets.append(drawn)
    assert all(len(drawn) == 2 * len(getattr(model, "models", [model])) for drawn in offsets)
    works = []
    for mix, drawn in zip(tensors, offsets, strict=True):
        replay = iter(drawn)
        monkeypatch.setattr(random, "randint", lambda a, b, replay=replay: next(replay))
        works.append(TrackWork(model, mix, shifts=2, overlap=0.25))
    monkeypatch.setattr(random, "randint", draw)
    batcher = SegmentBatcher("cpu", batch_size=5)
    while not all(work.finished for work in works):
        batcher.step(works)
    for reference, work, drawn in zip(expected, works, offsets, strict=True):
        got = work.result().numpy()
        assert got.shape == reference.shape
        assert _snr_db(reference, got) >= 40.0, drawn
    # The check can fail: other offsets (a wrong un-shift, say) give something far off.
    if name == "tiny":
        assert _snr_db(expected[1], shifted_result(model, tensors[1], [o + 1000 for o in offsets[1]],
                                                     monkeypatch)) < 40.0


def shifted_result(model, mix, offsets, monkeypatch):
    import random

    from core.separation.batching import SegmentBatcher, TrackWork

    replay = iter(offsets)
    monkeypatch.setattr(random, "randint", lambda a, b: next(replay))
    work = TrackWork(model, mix, shifts=2, overlap=0.25)
    monkeypatch.undo()
    batcher = SegmentBatcher("cpu", batch_size=5)
    while not work.finished:
        batcher.step([work])
    return work.result().numpy()
