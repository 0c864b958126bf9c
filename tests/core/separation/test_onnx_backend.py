"""core.separation.onnx_backend: the tiny htdemucs (2-s segments) exported and run by ONNX
Runtime and OpenVINO, against demucs's own apply_model on the untouched model. Mixes are
4 s (three segments) to keep the file fast."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.apply import apply_model

from core.errors import BadRequestError, JobCancelled, ModelUnavailableError
from core.host.handle import HostHandle
from core.host.protocol import HostConfig
from core.media.audio import Limits, decode
from core.separation import blockwise, catalogue, onnx_backend
from core.separation.engine import SeparationEngine, SeparationOptions
from core.separation.onnx_backend import ExportedHTDemucs
from core.separation.stems import parse_stems
from tests.support import models as tiny
from tests.support.media import music, snr_db

EXACT = SeparationOptions(shifts=0)
RATE = 44100
RUNTIMES = ["onnx", "openvino"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="module")
def mix() -> np.ndarray:
    rng = np.random.default_rng(3)
    t = np.arange(RATE * 4) / RATE
    tone = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([tone, 0.7 * tone]).astype(np.float32)


@pytest.fixture(scope="module")
def reference(model_dir, mix) -> dict[str, np.ndarray]:
    return demucs_reference(model_dir, "tinyshort", mix)


@pytest.fixture(scope="module", params=RUNTIMES)
def engine(request, model_dir, exports) -> SeparationEngine:
    return SeparationEngine.load("tinyshort", model_dir, "cpu", request.param, exports)


def demucs_reference(model_dir: Path, name: str, mix: np.ndarray) -> dict[str, np.ndarray]:
    """demucs's own apply_model on the untouched model, normalised as demucs's Separator does."""
    model = catalogue.load(name, model_dir)
    wav = torch.from_numpy(mix)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    with torch.no_grad():
        out = apply_model(model, ((wav - mean) / std)[None], shifts=0, split=True, overlap=0.25)[0] * std + mean
    return {source: out[k].numpy() for k, source in enumerate(model.sources)}


def forward_counter(engine: SeparationEngine) -> list[int]:
    """How many segments each exported network of `engine` ran (forward hooks)."""
    nets = onnx_backend.members(engine.model)
    counts = [0] * len(nets)
    for index, net in enumerate(nets):
        assert isinstance(net, ExportedHTDemucs)

        def count(*_: object, index: int = index) -> None:
            counts[index] += 1

        net.register_forward_hook(count)
    return counts


def test_each_runtime_matches_demucs_within_60_db(engine, reference, mix):
    assert engine.backend in RUNTIMES and isinstance(engine.model, ExportedHTDemucs)
    stems = engine.separate(mix, parse_stems("all", engine.sources), EXACT)
    assert list(stems) == ["drums", "bass", "other", "vocals"]
    for name, estimate in stems.items():
        assert estimate.shape == mix.shape and estimate.dtype == np.float32
        assert snr_db(reference[name], estimate) > 60, name


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_bag_and_a_vocals_only_request_run_and_compile_only_the_specialist(model_dir, exports, mix, runtime):
    engine = SeparationEngine.load("tinyshortbag", model_dir, "cpu", runtime, exports)
    assert engine.backend == runtime
    nets = onnx_backend.members(engine.model)
    assert len(nets) == 4 and not any(net.compiled for net in nets)  # compiled when first used
    reference = demucs_reference(model_dir, "tinyshortbag", mix)
    counts = forward_counter(engine)
    vocals = engine.separate(mix, parse_stems("vocals,no_vocals", engine.sources), EXACT)
    segments = counts[3]
    assert segments > 1 and counts == [0, 0, 0, segments]  # only the vocals specialist ran,
    assert [net.compiled for net in nets] == [False, False, False, True]  # and only it was compiled
    assert snr_db(reference["vocals"], vocals["vocals"]) > 60
    assert snr_db(mix - reference["vocals"], vocals["no_vocals"]) > 60
    stems = engine.separate(mix, parse_stems("all", engine.sources), EXACT)
    for name, estimate in stems.items():
        assert snr_db(reference[name], estimate) > 60, name
    assert counts == [segments] * 3 + [2 * segments]  # every member, every segment
    assert all(net.compiled for net in nets)


def test_progress_rises_per_segment_and_cancel_stops_at_the_next_segment(engine, mix):
    fractions: list[float] = []
    engine.separate(mix, parse_stems("all", engine.sources), EXACT, progress=fractions.append)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert len([f for f in fractions if 0 < f < 1]) >= 3  # 4 s in 2-s segments, 1.5 s apart: three steps

    counts = forward_counter(engine)
    with pytest.raises(JobCancelled):
        engine.separate(mix, parse_stems("all", engine.sources), EXACT, should_cancel=lambda: counts[0] >= 1)
    # The segments already in flight finish (one per stream: OpenVINO runs two at once).
    assert counts[0] <= getattr(engine.model, "streams", 1) < 3


def test_blockwise_long_track_through_onnx(model_dir, exports, tmp_path):
    engine = SeparationEngine.load("tinyshort", model_dir, "cpu", "onnx", exports)
    track = music(tmp_path / "long.wav", seconds=16.0, tone=330.0)
    request = parse_stems("all", engine.sources)
    whole = engine.separate(decode(track, RATE, 2, Limits()), request, EXACT)
    (tmp_path / "work").mkdir()
    staged = blockwise.stage_input(track, engine, Limits(), tmp_path / "work")
    stems = blockwise.separate_staged(staged, engine, request, EXACT, tmp_path / "work", block_s=8.0)
    for name, path in stems.paths.items():
        blocks = np.fromfile(path, dtype="<f4").reshape(-1, 2).T
        assert blocks.shape == whole[name].shape
        assert snr_db(whole[name], blocks) > 40, name  # as the PyTorch engine's blocks (test_blockwise)


async def test_a_model_host_runs_the_configured_backend(model_dir, exports):
    host = HostHandle(HostConfig(model="tinyshort", model_dir=str(model_dir), device="cpu", backend="openvino",
                                 export_dir=str(exports)))
    try:
        info = await host.start()
    finally:
        await host.stop()
    assert info["backend"] == "openvino"


# -- the export cache ---------------------------------------------------------------


def exported_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.onnx"))


def test_an_export_is_made_once_and_remade_when_the_weights_change(tmp_path, mix):
    models, exports = tmp_path / "models", tmp_path / "exports"
    models.mkdir()
    tiny.save_th(tiny.tiny_htdemucs(seed=0, segment=tiny.SHORT_SEGMENT), models, "m")
    SeparationEngine.load("m", models, "cpu", "onnx", exports)
    [export] = exported_files(exports)
    made = export.stat().st_mtime_ns
    SeparationEngine.load("m", models, "cpu", "onnx", exports)
    assert exported_files(exports) == [export] and export.stat().st_mtime_ns == made  # reused

    tiny.save_th(tiny.tiny_htdemucs(seed=5, segment=tiny.SHORT_SEGMENT), models, "m")  # new weights, same name
    changed = SeparationEngine.load("m", models, "cpu", "onnx", exports)
    assert len(exported_files(exports)) == 2  # a new export, keyed by the new weights
    after = changed.separate(mix, parse_stems("all", changed.sources), EXACT)
    reference = demucs_reference(models, "m", mix)
    for name in after:
        assert snr_db(reference[name], after[name]) > 60, name


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_export_is_remade_not_used(tmp_path, model_dir, mix, reference, exports, damage):
    # A copy of the good export (as the engines above use), damaged.
    mine = tmp_path / "exports"
    mine.mkdir()
    good = onnx_backend.cached_export(catalogue.load("tinyshort", model_dir), exports)
    for source in (good, good.with_name(good.name + ".sha256")):
        (mine / source.name).write_bytes(source.read_bytes())
    export = mine / good.name
    data = bytearray(export.read_bytes())
    if damage == "flip":
        # A weight's bytes in the middle of the file: the graph still loads, the numbers are wrong.
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    else:
        data = data[: len(data) // 3]
    export.write_bytes(bytes(data))
    again = SeparationEngine.load("tinyshort", model_dir, "cpu", "onnx", mine)
    assert export.read_bytes() != bytes(data)  # exported again
    stems = again.separate(mix, parse_stems("all", again.sources), EXACT)
    for name in stems:
        assert snr_db(reference[name], stems[name]) > 60, name


def test_a_checked_export_is_not_hashed_again_until_it_changes(tmp_path, model_dir, exports, monkeypatch):
    mine = tmp_path / "exports"
    mine.mkdir()
    net = catalogue.load("tinyshort", model_dir)
    good = onnx_backend.cached_export(net, exports)
    for source in (good, good.with_name(good.name + ".sha256")):
        (mine / source.name).write_bytes(source.read_bytes())
    export = mine / good.name
    hashed: list[Path] = []
    real_sha256 = onnx_backend.file_sha256
    monkeypatch.setattr(onnx_backend, "file_sha256", lambda path: hashed.append(Path(path)) or real_sha256(path))

    assert onnx_backend.cached_export(net, mine) == export and hashed == [export]  # just written: hashed
    time.sleep(getattr(onnx_backend, "CHECK_SETTLE_S", 2.0) + 0.1)
    assert onnx_backend.cached_export(net, mine) == export and hashed == [export] * 2  # settled: hashed, recorded
    assert onnx_backend.cached_export(net, mine) == export and hashed == [export] * 2  # recorded: not hashed

    # Damaged in place, same size, its mtime set back: its ctime moved, so it is hashed and remade.
    before = export.stat()
    data = bytearray(export.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    with open(export, "r+b") as file:
        file.write(bytes(data))
    os.utime(export, ns=(before.st_atime_ns, before.st_mtime_ns))
    onnx_backend.cached_export(net, mine)
    assert hashed[2] == export and export.read_bytes() != bytes(data)  # exported again


def test_openvino_keeps_its_compile_next_to_the_export(model_dir, exports):
    engine = SeparationEngine.load("tinyshort", model_dir, "cpu", "openvino", exports)
    assert engine.backend == "openvino" and any((exports / "openvino-cache").glob("*.blob"))


def test_openvino_streams_compute_segments_at_once_with_the_same_result(model_dir, exports, mix, reference):
    model, used = onnx_backend.prepare(catalogue.load("tinyshort", model_dir), "openvino", exports, threads=2,
                                       streams=2)
    engine = SeparationEngine(model, "tinyshort", torch.device("cpu"))
    assert used == "openvino" and isinstance(model, ExportedHTDemucs) and model.streams == 2
    # The first two passes wait for each other: they pass only if they run at the same time.
    both_running = threading.Barrier(2, timeout=30)
    calls = iter(range(1000))

    def meet_the_other_pass(*_: object) -> None:
        if next(calls) < 2:
            both_running.wait()

    model.register_forward_pre_hook(meet_the_other_pass)
    started = time.monotonic()
    stems = engine.separate(mix, parse_stems("all", engine.sources), EXACT)
    assert 0 < engine.forward_seconds <= time.monotonic() - started  # overlapping passes counted once
    for name in stems:
        assert snr_db(reference[name], stems[name]) > 60, name
    # A batch of segments (core.separation.batching, as a batching host) is spread over the streams too.
    [batched] = engine.separate_many([mix], parse_stems("all", engine.sources), EXACT, batch_size=4)
    for name in batched:
        assert snr_db(reference[name], batched[name]) > 60, name


def test_a_read_only_model_folder_exports_to_the_users_cache(tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert onnx_backend.default_export_dir(models) == models / ".stembot-exports"
    models.chmod(0o555)
    try:
        if onnx_backend.os.access(models, onnx_backend.os.W_OK):
            pytest.skip("running as a user who may write anywhere")
        assert onnx_backend.default_export_dir(models) == tmp_path / "cache" / "stembot" / "exports"
    finally:
        models.chmod(0o755)
    assert onnx_backend.default_export_dir(None) == tmp_path / "cache" / "stembot" / "exports"


# -- choosing -----------------------------------------------------------------------


def test_auto_measures_once_per_model_and_machine_and_remembers(model_dir, tmp_path, mix, reference):
    exports = tmp_path / "exports"
    engine = SeparationEngine.load("tinyshort", model_dir, "cpu", "auto", exports)
    assert engine.backend in ("torch", *RUNTIMES)
    choices = json.loads((exports / "backend-choices.json").read_text())
    [(key, chosen)] = choices.items()
    assert chosen == engine.backend and onnx_backend.machine_id(torch.get_num_threads()) in key
    # Remembered: a second load takes the recorded choice (here: one that a probe would not pick).
    other = "openvino" if chosen != "openvino" else "onnx"
    (exports / "backend-choices.json").write_text(json.dumps({key: other}))
    again = SeparationEngine.load("tinyshort", model_dir, "cpu", "auto", exports)
    assert again.backend == other
    stems = again.separate(mix, parse_stems("all", again.sources), EXACT)
    assert all(snr_db(reference[name], stems[name]) > 60 for name in stems)


def test_models_the_runtimes_cannot_run_stay_on_torch_or_fail_clearly(tmp_path):
    wiener = tiny.tiny_htdemucs(seed=0, segment=tiny.SHORT_SEGMENT, cac=False)
    model, used = onnx_backend.prepare(wiener, "auto", tmp_path)
    assert used == "torch" and model is wiener
    with pytest.raises(ModelUnavailableError, match="--backend torch"):
        onnx_backend.prepare(wiener, "onnx", tmp_path)
    assert not exported_files(tmp_path)


def test_a_lower_precision_runs_on_torch_and_is_refused_on_the_fp32_exports(model_dir, exports):
    # The exports are fp32: `auto` must not trade an operator's bf16 for them silently.
    assert SeparationEngine.load("tinyshort", model_dir, "cpu", "auto", exports, precision="bf16").backend == "torch"
    with pytest.raises(BadRequestError, match="torch backend only"):
        SeparationEngine.load("tinyshort", model_dir, "cpu", "openvino", exports, precision="bf16")
