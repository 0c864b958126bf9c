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
