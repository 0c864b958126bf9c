"""Fixtures shared by all tests: a folder of tiny models and an empty model cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import checkpoints
from tests.support import models as tiny

# Seconds each test file took in a whole run (scripts/file_durations.py writes it).
FILE_DURATIONS = Path(__file__).with_name("file_durations.json")


def pytest_collection_modifyitems(config, items):
    """Longest files first, by their measured time. Run on several processes (scripts/test:
    one file per process at a time), the suite then ends on short files instead of waiting
    for a long one that happened to come last. A file not measured yet counts as long when
    it has a `slow` test, as middling when it is end-to-end."""
    measured = json.loads(FILE_DURATIONS.read_text()) if FILE_DURATIONS.exists() else {}
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def seconds(item) -> float:
        path = item.path.relative_to(config.rootpath).as_posix()
        if path in measured:
            return measured[path]
        if item.path in slow_files:
            return 600.0
        return 30.0 if path.endswith("_e2e.py") else 1.0

    items.sort(key=seconds, reverse=True)  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A demucs-layout model folder: `tiny` (plain), `tinysum` (checksummed), `tinybag`, a
    bag of four per-stem specialists like htdemucs_ft, and `mixstems`, whose every stem is
    a quarter of the mix (a track's tempo and key survive it); `tinyshort` and
    `tinyshortbag` are `tiny` and `tinybag` with 2-second segments; `tinyroformer` is a
    community checkpoint (`.ckpt` + `.yaml`, a BS-RoFormer vocals model) beside them."""
    folder = tmp_path_factory.mktemp("models")
    tiny.save_th(tiny.tiny_htdemucs(seed=0), folder, "tiny")
    tiny.save_checksummed(tiny.tiny_htdemucs(seed=1), folder, "tinysum")
    members = []
    for k in range(4):
        sig = f"spec{k}"
        tiny.save_th(tiny.tiny_htdemucs(seed=10 + k), folder, sig)
        members.append(sig)
    identity = [[1.0 if i == k else 0.0 for i in range(4)] for k in range(4)]
    tiny.save_bag(folder, "tinybag", members, identity)
    tiny.save_th(tiny.tiny_htdemucs(seed=0, klass=tiny.MixAsEveryStem), folder, "mixstems")
    # The same two kinds with 2-second segments, for tests of long tracks in short blocks.
    tiny.save_th(tiny.tiny_htdemucs(seed=0, segment=tiny.SHORT_SEGMENT), folder, "tinyshort")
    for k in range(4):
        tiny.save_th(tiny.tiny_htdemucs(seed=10 + k, segment=tiny.SHORT_SEGMENT), folder, f"short{k}")
    tiny.save_bag(folder, "tinyshortbag", [f"short{k}" for k in range(4)], identity)
    checkpoints.save_checkpoint(folder, "tinyroformer", checkpoints.bs_roformer_config())
    return folder


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """No HuggingFace or torch cache, and no network, as on a fresh offline host."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    return tmp_path


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on loopback: `STEMBOT_TEST_POSTGRES_URL`, or a throwaway
    cluster from the machine's server binaries. Missing in CI is a failure, not a skip."""
    import os

    from tests.support.postgres import server_binaries, temporary_server

    if os.environ.get("STEMBOT_TEST_POSTGRES_URL"):
        yield os.environ["STEMBOT_TEST_POSTGRES_URL"]
        return
    if server_binaries() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; scripts/test installs it (apt-get install postgresql)")
        pytest.skip("PostgreSQL server binaries not installed")
    with temporary_server() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path):
    """A migrated SQLite database file (upgrade runs its own event loop, so: a sync fixture)."""
    from core.db import upgrade

    url = f"sqlite+aiosqlite:///{tmp_path / 'db' / 'stembot.sqlite'}"
    upgrade(url)
    return url


@pytest.fixture
def migrated(postgres_server):
    """The PostgreSQL test database, emptied and migrated to the newest revision."""
    from core.db import upgrade
    from tests.support.postgres import reset_database

    reset_database(postgres_server)
    upgrade(postgres_server)
    return postgres_server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    """An empty, migrated database of each kind."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    from core.db import upgrade
    from tests.support.postgres import reset_database

    url = request.getfixturevalue("postgres_server")
    reset_database(url)
    upgrade(url)
    return url


@pytest.fixture(scope="session")
def s3_server():
    """An `S3Config` for a fresh, not yet created bucket on a real S3 server on loopback:
    `STEMBOT_TEST_S3_ENDPOINT`, or a throwaway moto server. Missing in CI is a failure,
    not a skip. Call `S3Client.ensure_bucket()` before use."""
    import os
    import uuid

    from core.storage.s3_client import S3Config
    from tests.support.s3 import moto_available, temporary_s3

    def config(endpoint: str, key: str, secret: str) -> S3Config:
        return S3Config(bucket=f"stembot-test-{uuid.uuid4().hex[:12]}", endpoint_url=endpoint,
                        access_key_id=key, secret_access_key=secret)

    if os.environ.get("STEMBOT_TEST_S3_ENDPOINT"):
        yield config(os.environ["STEMBOT_TEST_S3_ENDPOINT"],
                     os.environ.get("STEMBOT_TEST_S3_ACCESS_KEY", "testing"),
                     os.environ.get("STEMBOT_TEST_S3_SECRET_KEY", "testing"))
        return
    if not moto_available():
        if os.environ.get("CI"):
            pytest.fail("moto is not installed; install the test extra (pip install -e '.[test]')")
        pytest.skip("moto[server] not installed")
    with temporary_s3() as endpoint:
        yield config(endpoint, "testing", "testing")
