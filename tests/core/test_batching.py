"""Several tracks in shared forward passes give the same stems as one at a time."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import JobCancelled
from core.separation import SeparationEngine, SeparationOptions
from core.stems import parse_stems

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
    for mix, batched in zip(mixes, together):
        alone = engine.separate(mix, request, EXACT)
        assert list(batched) == list(alone)
        for name in alone:
            assert batched[name].shape == mix.shape
            np.testing.assert_allclose(batched[name], alone[name], atol=2e-5, rtol=0)


def test_batched_specialists_run_only_what_is_needed(model_dir, mixes):
    bag = SeparationEngine.load("tinybag", model_dir, "cpu")
    request = parse_stems("karaoke", bag.sources)
    together = bag.separate_many(mixes[:2], request, EXACT)
    for mix, batched in zip(mixes, together):
        alone = bag.separate(mix, request, EXACT)
        np.testing.assert_allclose(batched["vocals"], alone["vocals"], atol=2e-5, rtol=0)
        np.testing.assert_allclose(batched["no_vocals"], mix - batched["vocals"], atol=1e-6)


def test_shifts_keep_shapes_and_stay_close(engine, mixes):
    request = parse_stems("vocals", engine.sources)
    shifted = engine.separate_many(mixes, request, SeparationOptions(shifts=2))
    for mix, result in zip(mixes, shifted):
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
