"""core.separation.engine with tiny real Demucs models loaded through demucs's loaders."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import BadRequestError, JobCancelled
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.stems import parse_stems

DETERMINISTIC = SeparationOptions(shifts=0)


@pytest.fixture(scope="module")
def engine(model_dir):
    return SeparationEngine.load("tiny", model_dir, "cpu")


@pytest.fixture(scope="module")
def bag_engine(model_dir):
    return SeparationEngine.load("tinybag", model_dir, "cpu")


@pytest.fixture(scope="module")
def mix():
    rng = np.random.default_rng(0)
    t = np.arange(44100 * 10) / 44100
    tone = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([tone, 0.8 * tone]).astype(np.float32)


def test_all_stems_have_the_mix_shape_and_are_deterministic_without_shifts(engine, mix):
    request = parse_stems("all", engine.sources)
    first = engine.separate(mix, request, DETERMINISTIC)
    second = engine.separate(mix, request, DETERMINISTIC)
    assert list(first) == ["drums", "bass", "other", "vocals"]
    for name in first:
        assert first[name].shape == mix.shape and first[name].dtype == np.float32
        np.testing.assert_array_equal(first[name], second[name])


def test_karaoke_instrumental_is_the_sum_of_the_other_stems(engine, mix):
    full = engine.separate(mix, parse_stems("all", engine.sources), DETERMINISTIC)
    karaoke = engine.separate(mix, parse_stems("karaoke", engine.sources), DETERMINISTIC)
    assert list(karaoke) == ["vocals", "no_vocals"]
    np.testing.assert_allclose(karaoke["vocals"], full["vocals"], atol=1e-6)
    np.testing.assert_allclose(karaoke["no_vocals"], full["drums"] + full["bass"] + full["other"], atol=1e-5)


def test_stem_list_matches_the_same_stems_of_a_full_run(engine, mix):
    full = engine.separate(mix, parse_stems("all", engine.sources), DETERMINISTIC)
    some = engine.separate(mix, parse_stems("bass,no_drums", engine.sources), DETERMINISTIC)
    assert list(some) == ["bass", "no_drums"]
    np.testing.assert_allclose(some["bass"], full["bass"], atol=1e-6)
    np.testing.assert_allclose(some["no_drums"], full["bass"] + full["other"] + full["vocals"], atol=1e-5)


def _count_forwards(bag_engine):
    counts = [0] * len(bag_engine.model.models)
    handles = [m.register_forward_hook(lambda *_, k=k: counts.__setitem__(k, counts[k] + 1))
               for k, m in enumerate(bag_engine.model.models)]
    return counts, handles


def test_specialist_bag_runs_only_the_vocals_specialist_for_karaoke(bag_engine, mix):
    counts, handles = _count_forwards(bag_engine)
    try:
        karaoke = bag_engine.separate(mix, parse_stems("karaoke", bag_engine.sources), DETERMINISTIC)
        vocals_only = list(counts)
        full = bag_engine.separate(mix, parse_stems("all", bag_engine.sources), DETERMINISTIC)
    finally:
        for handle in handles:
            handle.remove()
    vocals_index = bag_engine.sources.index("vocals")
    assert vocals_only[vocals_index] > 0
    assert sum(vocals_only) == vocals_only[vocals_index], "only the vocals specialist may run"
    assert all(c > 0 for c in counts), "a full request runs every specialist"
    np.testing.assert_allclose(karaoke["vocals"], full["vocals"], atol=1e-6)
    # Without the other specialists, the instrumental is the mix minus the vocals.
    np.testing.assert_allclose(karaoke["no_vocals"], mix - karaoke["vocals"], atol=1e-6)


def test_progress_rises_to_one(engine, mix):
    seen: list[float] = []
    engine.separate(mix, parse_stems("all", engine.sources), DETERMINISTIC, progress=seen.append)
    assert len(seen) >= 2
    assert seen == sorted(seen) and seen[-1] == 1.0 and 0 < seen[0] < 1


def test_progress_counts_shifts(engine, mix):
    seen: list[float] = []
    engine.separate(mix, parse_stems("vocals", engine.sources), SeparationOptions(shifts=2), progress=seen.append)
    assert seen == sorted(seen) and max(seen[:-1]) < 1.0 and seen[-1] == 1.0


def _forward_counter(module):
    count = [0]
    handle = module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count, handle


def test_cancel_stops_at_the_next_segment(engine, mix):
    forwards, handle = _forward_counter(engine.model)
    try:
        with pytest.raises(JobCancelled):
            engine.separate(mix, parse_stems("all", engine.sources), DETERMINISTIC,
                            should_cancel=lambda: forwards[0] >= 1)
    finally:
        handle.remove()
    assert forwards[0] == 1, "a 10 s mix has several segments; cancelling must stop after the first"


def test_segment_longer_than_the_transformer_allows_is_refused(engine, mix):
    with pytest.raises(BadRequestError, match="segment"):
        engine.separate(mix, parse_stems("all", engine.sources), SeparationOptions(segment=20))


def test_warm_up_runs(engine):
    engine.warm_up()
    assert engine.forward_seconds > 0


def test_progress_moves_inside_a_segment(engine, mix):
    engine.warm_up()  # a first pass teaches the engine how long each block takes
    forwards, handle = _forward_counter(engine.model)
    seen: list[tuple[int, float]] = []
    try:
        engine.separate(mix, parse_stems("all", engine.sources), DETERMINISTIC,
                        progress=lambda f: seen.append((forwards[0], f)))
    finally:
        handle.remove()
    during_first = [f for done, f in seen if done == 0]
    assert len(during_first) >= 5, "progress must move while the first segment's forward pass runs"
    assert during_first == sorted(during_first) and 0 < during_first[0]
    # The first of the 10-s mix's two segments covers up to the second's offset (75% of 7.8 s).
    assert during_first[-1] <= 0.75 * 7.8 / 10 + 1e-6
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_cancel_stops_inside_a_forward_pass(engine, mix):
    engine.warm_up()
    forwards, handle = _forward_counter(engine.model)
    blocks, block_handle = _forward_counter(engine.model.encoder[0])
    try:
        with pytest.raises(JobCancelled):
            engine.separate(mix, parse_stems("all", engine.sources), DETERMINISTIC,
                            should_cancel=lambda: blocks[0] >= 1)
    finally:
        handle.remove()
        block_handle.remove()
    assert blocks[0] == 1 and forwards[0] == 0, "the first pass must stop right after its first block"
