"""What `stembot run` and `stembot worker` build from the settings, in one place: the
database, the job store and quotas, the storage, the limits on inputs, and the model
hosts' configurations."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from core.db import make_engine, make_sessions
from core.host.handle import Deadline
from core.host.protocol import HostConfig
from core.jobs.dispatcher import DispatcherConfig
from core.jobs.quotas import Ceilings, Policy, QuotaBook
from core.jobs.runner import RunConfig
from core.jobs.store import JobStore
from core.jobs.uploads import TransferWindow
from core.net.input_rules import fetch_rules_of, limits_of
from core.settings import Settings
from core.storage.local import LocalStorage
from core.storage.s3_client import S3Client, S3Config
from core.storage.s3_storage import S3Storage


def default_policy(settings: Settings) -> Policy:
    """The quotas and policy of a server whose admins changed nothing (before the
    operator's ceilings, which QuotaBook applies)."""
    return Policy(
        user_minutes_per_day=settings.quota_user_minutes_per_day,
        guild_minutes_per_day=settings.quota_guild_minutes_per_day,
        user_concurrent_jobs=settings.quota_user_concurrent_jobs,
        guild_queued_jobs=settings.quota_guild_queued_jobs,
        max_track_minutes=settings.max_duration_s / 60,
        links_allowed=settings.links_allowed,
        streaming_links_allowed=settings.streaming_links_allowed,
    )


def ceilings_of(settings: Settings) -> Ceilings:
    """The operator's ceilings over every server's policy (STEMBOT_CEILING_*, STEMBOT_FORBID_*);
    the longest track is STEMBOT_MAX_DURATION_S, which the probe enforces anyway."""
    return Ceilings(
        user_minutes_per_day=settings.ceiling_user_minutes_per_day,
        guild_minutes_per_day=settings.ceiling_guild_minutes_per_day,
        user_concurrent_jobs=settings.ceiling_user_concurrent_jobs,
        guild_queued_jobs=settings.ceiling_guild_queued_jobs,
        max_track_minutes=settings.max_duration_s / 60,
        total_queued_jobs=settings.ceiling_total_queued_jobs,
        links_allowed=not settings.forbid_links,
        streaming_links_allowed=not settings.forbid_streaming_links,
    )


def host_config(settings: Settings, device: str | None = None, threads: int | None = None) -> HostConfig:
    """What a model host needs, for core.host.child: the settings, on `device` (default
    STEMBOT_DEVICE) with `threads` CPU threads (None: PyTorch's default)."""
    return HostConfig(
        model=settings.model, model_dir=str(settings.model_dir) if settings.model_dir else None,
        device=device or settings.device, shifts=settings.shifts, overlap=settings.overlap,
        segment=settings.segment, precision=settings.precision, batch_jobs=settings.batch_jobs,
        batch_segments=settings.batch_segments, min_duration_s=settings.min_duration_s,
        max_duration_s=settings.max_duration_s, max_input_bytes=settings.max_input_bytes, threads=threads,
        nice=settings.model_host_nice, backend=settings.backend,
        export_dir=str(settings.export_dir) if settings.export_dir else None,
    )


def make_storage(settings: Settings) -> LocalStorage:
    """Local disk, or an S3-compatible store when STEMBOT_S3_BUCKET is set."""
    root = Path(settings.data_dir) / "jobs"
    if not settings.s3_bucket:
        return LocalStorage(root)
    client = S3Client(S3Config(
        bucket=settings.s3_bucket, endpoint_url=settings.s3_endpoint_url,
        public_endpoint_url=settings.s3_public_endpoint_url, region=settings.s3_region,
        prefix=settings.s3_prefix, access_key_id=settings.aws_access_key_id,
        secret_access_key=settings.aws_secret_access_key.get_secret_value()
        if settings.aws_secret_access_key else None, transient_retry_s=settings.transient_retry_s))
    # A job's presigned transfer URLs end with its run (`core.jobs.uploads.TransferWindow`),
    # and never outlive the files they reach.
    return S3Storage(root, client, max_transfer_ttl_s=settings.retention_hours * 3600)


class Runtime:
    """The services the bot and the workers share, built from the settings. Close it."""

    def __init__(self, settings: Settings, engine: AsyncEngine):
        self.settings = settings
        self.engine = engine
        self.sessions: async_sessionmaker = make_sessions(engine)
        self.quotas = QuotaBook(self.sessions, default_policy(settings), ceilings_of(settings))
        self.store = JobStore(self.sessions, self.quotas)
        self.limits = limits_of(settings)
        self.fetch_rules = fetch_rules_of(settings)
        self._storage: LocalStorage | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        return cls(settings, make_engine(settings.resolved_database_url))

    @property
    def storage(self) -> LocalStorage:
        """Where inputs and stems are kept. Built on first use: workers never use it (they
        hold no storage credentials and reach files through presigned URLs)."""
        if self._storage is None:
            self._storage = make_storage(self.settings)
        return self._storage

    def host_config(self, device: str | None = None, threads: int | None = None) -> HostConfig:
        return host_config(self.settings, device, threads)

    def slot_host_configs(self, devices: list[str]) -> list[HostConfig]:
        """One model host per worker slot, in the order of `devices` (a device may appear
        more than once). CPU slots share the cores: each gets its share unless
        STEMBOT_THREADS says how many."""
        cpu_slots = sum(1 for device in devices if device == "cpu")
        threads = self.settings.threads or (
            max(1, (os.cpu_count() or 1) // cpu_slots) if cpu_slots > 1 else None)
        return [self.host_config(device, threads if device == "cpu" else None) for device in devices]

    def dispatcher_config(self, worker_name: str) -> DispatcherConfig:
        settings = self.settings
        return DispatcherConfig(
            worker_name=worker_name, max_attempts=settings.max_attempts, limits=self.limits,
            mp3_bitrate_kbps=settings.mp3_bitrate, links_available=settings.download_links_available,
            link_valid_hours=settings.retention_hours, fetch_rules=self.fetch_rules,
            min_free_bytes=settings.min_free_disk_mb * 1024 * 1024, stale_s=settings.job_stale_s,
            # Embedded mode splits on this machine; a worker stages on its own disk.
            stages_here=settings.queue == "local",
            transient_retry_s=settings.transient_retry_s,
        )

    def transfer_window(self) -> TransferWindow:
        """How long a job's presigned URLs live once handed to a worker."""
        return TransferWindow(seconds_per_audio_s=self.settings.transfer_window_factor,
                              margin_s=self.settings.transfer_window_margin_s)

    def run_config(self, progress_write_interval_s: float = 2.0) -> RunConfig:
        """How a worker runs its jobs (the bot's dispatcher derives it from its config)."""
        settings = self.settings
        return RunConfig(max_attempts=settings.max_attempts, mp3_bitrate_kbps=settings.mp3_bitrate,
                         links_available=settings.download_links_available,
                         link_valid_hours=settings.retention_hours,
                         progress_write_interval_s=progress_write_interval_s, stale_s=settings.job_stale_s)

    def deadline(self) -> Deadline:
        """How long a job may run on a model host before the host is killed."""
        settings = self.settings
        return Deadline(margin_s=settings.job_deadline_margin_s, factor=settings.job_deadline_factor,
                        default_speed=settings.job_deadline_default_speed)

    async def close(self) -> None:
        """Close the object store's connections (if used), then the database's."""
        try:
            if isinstance(self._storage, S3Storage):
                await self._storage.close()
        finally:
            await self.engine.dispose()
