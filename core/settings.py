"""All of stembot's settings, read from the environment and `.env` (prefix `STEMBOT_`).

A leaf: it imports nothing from core, so every module may depend on it. What is built
from the settings (limits, host configurations, the default policy) is in core.runtime.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]
# local: the bot runs jobs on its own model host (one machine). postgres: the bot queues
# them in PostgreSQL and `stembot worker` processes, on any number of hosts, run them.
QueueKind = Literal["local", "postgres"]
# What runs the model's network on a CPU (core.separation.onnx_backend).
Backend = Literal["auto", "torch", "onnx", "openvino"]
MAX_S3_RETENTION_HOURS = 7 * 24


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STEMBOT_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    # Discord
    discord_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("STEMBOT_DISCORD_TOKEN", "DISCORD_TOKEN", "discord_token"),
    )
    discord_api_url: str | None = None
    discord_gateway_url: str | None = None

    # Storage and database
    data_dir: Path = Path("data")
    database_url: str | None = None

    # Separation
    model: str = "htdemucs"
    model_dir: Path | None = None
    device: Device = "auto"
    shifts: int = Field(default=1, ge=0, le=20)
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    segment: float | None = Field(default=None, gt=0)
    # Arithmetic of the forward passes. bf16 is faster where the hardware has it (recent
    # GPUs, CPUs with AVX512-BF16/AMX) at a small cost in quality (docs/performance.md).
    precision: Precision = "fp32"
    # Jobs a model host runs at once, their segments sharing forward passes (default: 4 on
    # a GPU, 1 on a CPU, where it was measured slower), and segments per forward pass.
    batch_jobs: int | None = Field(default=None, ge=1, le=32)
    batch_segments: int = Field(default=16, ge=1, le=256)
    mp3_bitrate: int = Field(default=320, ge=32, le=320)
    # CPU threads per model host (default: every core, shared by a worker's CPU slots).
    threads: int | None = Field(default=None, ge=1)
    # How much the separation process yields the CPU to the bot (0-19; see docs/performance.md).
    model_host_nice: int = Field(default=10, ge=0, le=19)

    # Limits on what users may send
    min_duration_s: float = Field(default=1.0, ge=0)
    max_duration_s: float = Field(default=20 * 60, gt=0)
    max_input_bytes: int = Field(default=250 * 1024 * 1024, gt=0)
    # Free disk space the bot keeps in its data folder: below it, new jobs are refused (0: no
    # check). A track is also refused when splitting it here would not fit (about 2.5 MB per
    # second of audio while it is split: a 20-minute track stages about 3 GB).
    min_free_disk_mb: int = Field(default=512, ge=0)

    # Web server for users (download links); health and metrics are on the ops listener below
    public_url: str | None = None
    web_host: str = "127.0.0.1"
    web_port: int = 8080
    link_secret: SecretStr | None = None
    retention_hours: float = Field(default=24.0, gt=0)

    # Jobs
    max_attempts: int = Field(default=3, ge=1)
    queue: QueueKind = "local"

    # Distributed mode: the workers (`stembot worker`)
    worker_name: str | None = None  # default: <hostname>-<pid>
    worker_devices: str | None = None  # e.g. "cuda:0,cuda:1"; default: every GPU, else the CPU
    worker_stale_s: float = Field(default=30.0, ge=2.0)  # a silent worker's job goes to another after this

    # Distributed mode: S3-compatible object storage for inputs and stems (unset: local disk).
    # Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the bot's only).
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_public_endpoint_url: str | None = None  # the address in presigned URLs, when users see another
    s3_region: str = "us-east-1"
    s3_prefix: str = "stembot/"
    # The usual AWS names, also read from .env (botocore itself reads only the environment).
    aws_access_key_id: str | None = Field(
        default=None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "aws_access_key_id"))
    aws_secret_access_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key"))

    # Default quotas and policy of every server (admins change them with /stembot).
    quota_user_minutes_per_day: float = Field(default=60.0, ge=0)
    quota_guild_minutes_per_day: float = Field(default=600.0, ge=0)
    quota_user_concurrent_jobs: int = Field(default=2, ge=1)
    quota_guild_queued_jobs: int = Field(default=20, ge=1)
    links_allowed: bool = True
    # YouTube and SoundCloud links (needs the `links` extra, yt-dlp); servers opt in.
    streaming_links_allowed: bool = False

    # Operators' listener: /livez, /readyz, /metrics, on an address of its own so that they
    # are never on the public one (STEMBOT_WEB_*). Loopback by default: Docker healthchecks
    # run inside the container; a Prometheus elsewhere needs an internal address here.
    ops_host: str = "127.0.0.1"
    ops_port: int = Field(default=8081, ge=0, le=65535)

    # Distributed mode: the workers' own database role (`stembot db worker-role NAME`).
    # The password it is created with (or changed to); unset: a new role gets a generated
    # one, printed once. Only that command reads it.
    worker_database_password: SecretStr | None = None

    # Distributed mode: how long a job's presigned URLs (its input, the uploads of its stems)
    # live once handed to a worker: margin + factor x (longest track + attempts x its length),
    # and never past the retention (see core.jobs.uploads.TransferWindow).
    transfer_window_factor: float = Field(default=2.0, gt=0)  # a worker's seconds per second of audio, at worst
    transfer_window_margin_s: float = Field(default=1800.0, ge=60)

    # Operator ceilings: no server setting (`/stembot limit`, `/stembot links`) and no role
    # tier goes above these; a server's limit in force is the smaller of the two. A member's
    # minutes and jobs at once count everything they do in every server and in DMs; the
    # longest track is capped by STEMBOT_MAX_DURATION_S.
    ceiling_user_minutes_per_day: float = Field(default=240.0, ge=0)
    ceiling_guild_minutes_per_day: float = Field(default=6000.0, ge=0)
    ceiling_user_concurrent_jobs: int = Field(default=4, ge=1)
    ceiling_guild_queued_jobs: int = Field(default=100, ge=1)
    ceiling_total_queued_jobs: int = Field(default=1000, ge=1)  # every server and DM together
    forbid_links: bool = False  # no links at all, whatever a server says
    forbid_streaming_links: bool = False  # no YouTube or SoundCloud links, whatever a server says
    # Servers where the bot works (comma-separated ids; unset: every server it is in).
    # Elsewhere it answers every command with a short refusal. DMs follow dms_allowed.
    allowed_guilds: str | None = None
    dms_allowed: bool = True
    # /challenge submit: submissions per member per challenge (the first entry and its
    # replacements), and entries checked (downloaded and probed) at once, bot-wide.
    challenge_submissions_per_member: int = Field(default=5, ge=1)
    challenge_checks_at_once: int = Field(default=4, ge=1)

    # Where inputs are fetched from (core/net/fetcher.py). Attachments: only from these
    # origins, comma-separated scheme://host[:port] (Discord's CDN; a self-hosted
    # Discord-compatible server's own). Links: public addresses, and also any address inside
    # these networks the operator trusts (comma-separated CIDR, e.g. a NAS at 192.168.1.0/24).
    discord_cdn_url: str = "https://cdn.discordapp.com,https://media.discordapp.net"
    fetch_allowed_networks: str = ""

    # Job history (core/jobs/sweeper.py): the rows of jobs that ended more than this many
    # days ago (and whose files are gone) are deleted, in batches. Stats (/stembot stats) and
    # `stembot jobs` see this far back; quota usage lives in its own table and is kept. At
    # least a day: the fair order and the restart's untold endings read the last day's rows.
    job_history_days: float = Field(default=30.0, ge=1.0)

    # Outages (issue #15): a call to the object store or a delivery to Discord that fails with a
    # transient error (5xx, a timeout, a connection refused or reset) is tried again, with
    # exponential backoff and jitter, for up to this long before its job fails (uncharged).
    # Meanwhile the job keeps its place and no new job is started into the outage.
    transient_retry_s: float = Field(default=300.0, ge=1.0, le=3600.0)

    # Stuck jobs (issue #15): every running job reaches an end or goes back to the queue in
    # bounded time. A run's heartbeat (jobs.heartbeat_at) is written every stale/4 seconds;
    # the bot's sweeper requeues (or, out of attempts, fails) a running job whose heartbeat
    # is older than job_stale_s, and a run retries the writes of its job's state for that
    # long before it gives the job up to the sweeper. A model host still separating a job
    # after margin + factor x its length x the host's measured seconds per second of audio
    # (job_deadline_default_speed before a measure) is killed, and the job retried.
    job_stale_s: float = Field(default=300.0, ge=4.0)
    job_deadline_factor: float = Field(default=4.0, gt=0)
    job_deadline_margin_s: float = Field(default=300.0, ge=1.0)
    job_deadline_default_speed: float = Field(default=2.0, gt=0)  # separation seconds per audio second, unmeasured
    # CPU inference backend (issue #18): what runs the model's network on a CPU. auto: the
    # fastest of torch, onnx (ONNX Runtime) and openvino measured once per model and machine
    # (docs/performance.md). The ONNX exports are kept in export_dir (default: a
    # .stembot-exports folder in the model folder when writable, else ~/.cache/stembot/exports).
    backend: Backend = "auto"
    export_dir: Path | None = None

    # Models beyond Demucs (issue #16): `stembot models pull NAME` fetches a listed checkpoint's
    # files from this mirror (`<url>/<file name>`) instead of where each is published, and
    # refuses any one file larger than this.
    model_mirror_url: str | None = None
    model_max_download_mb: int = Field(default=4096, ge=1)

    # Models chosen in plain words (issue #16): `/split quality: fast` runs fast_model (unset:
    # STEMBOT_MODEL); `quality: best`, `/karaoke backing_vocals: keep`, `/split clean:` and
    # `stems: dialogue` run the model set here, or when unset the best installed model for that
    # use that the server allows (core.separation.model_choice).
    fast_model: str | None = None
    best_vocals_model: str | None = None
    best_stems_model: str | None = None
    lead_backing_model: str | None = None
    dereverb_model: str | None = None
    denoise_model: str | None = None
    dialogue_model: str | None = None

    @field_validator("model_dir", "public_url", "database_url", "discord_api_url", "discord_gateway_url",
                     "worker_name", "worker_devices", "s3_bucket", "s3_endpoint_url", "s3_public_endpoint_url",
                     "model_mirror_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # `STEMBOT_MODEL_DIR=` in a .env file means "not set", not the current folder.
        return value or None

    @field_validator("allowed_guilds", mode="before")
    @classmethod
    def _guild_ids(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        parts = [part.strip() for part in str(value).split(",") if part.strip()]
        if not parts or not all(part.isdigit() for part in parts):
            raise ValueError("give server ids as digits separated by commas, e.g. 123456789012345678,2345678901")
        return ",".join(parts)

    @model_validator(mode="after")
    def _retention_fits_the_storage(self) -> Settings:
        # S3 presigned URLs (workers' transfers, users' download links) last 7 days at most.
        if self.s3_bucket and self.retention_hours > MAX_S3_RETENTION_HOURS:
            raise ValueError(f"STEMBOT_RETENTION_HOURS is {self.retention_hours:g}, but with S3 storage "
                             f"(STEMBOT_S3_BUCKET) it is at most {MAX_S3_RETENTION_HOURS} (7 days): presigned "
                             "URLs last no longer")
        return self

    @model_validator(mode="after")
    def _ops_port_is_not_the_public_one(self) -> Settings:
        # One port for both would put /metrics where users can reach it, or fail to bind.
        if self.ops_port and self.ops_port == self.web_port:
            raise ValueError("STEMBOT_OPS_PORT must differ from STEMBOT_WEB_PORT: health and metrics "
                             "get a listener of their own, away from the public one")
        return self

    @field_validator("discord_cdn_url")
    @classmethod
    def _origins_only(cls, value: str) -> str:
        # The full check (host form) is core.net.fetcher.parse_origin's, when the bot builds its rules.
        entries = _comma_list(value)
        if not entries:
            raise ValueError("name at least one origin, such as https://cdn.discordapp.com")
        for entry in entries:
            try:
                parts = urlsplit(entry)
                parts.port  # noqa: B018 - raises ValueError for a bad port
            except ValueError:
                raise ValueError(f"{entry!r} is not an origin such as https://cdn.discordapp.com") from None
            if (parts.scheme.lower() not in ("http", "https") or not parts.hostname or "@" in parts.netloc
                    or parts.path not in ("", "/") or parts.query or parts.fragment):
                raise ValueError(f"{entry!r} is not an origin (scheme://host[:port], nothing after it)")
        return value

    @field_validator("fetch_allowed_networks")
    @classmethod
    def _networks_only(cls, value: str) -> str:
        for entry in _comma_list(value):
            try:
                ipaddress.ip_network(entry, strict=True)
            except ValueError:
                raise ValueError(f"{entry!r} is not a network in CIDR form, such as 192.168.1.0/24") from None
        return value

    @property
    def discord_cdn_origins(self) -> tuple[str, ...]:
        """The origins attachments are fetched from."""
        return tuple(_comma_list(self.discord_cdn_url))

    @property
    def fetch_allowed_network_list(self) -> tuple[str, ...]:
        """The networks links may reach besides public addresses (none by default)."""
        return tuple(_comma_list(self.fetch_allowed_networks))

    @property
    def download_links_available(self) -> bool:
        """Whether stems too large for Discord can be sent as links: presigned by the object
        store, or served by the bot's web server at its public address."""
        return bool(self.s3_bucket or self.public_url)

    @property
    def allowed_guild_ids(self) -> frozenset[int] | None:
        """The servers the bot works in, or None for every server."""
        if self.allowed_guilds is None:
            return None
        return frozenset(int(part) for part in self.allowed_guilds.split(","))

    @property
    def device_list(self) -> list[str] | None:
        if not self.worker_devices:
            return None
        return [d.strip() for d in self.worker_devices.split(",") if d.strip()]

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'stembot.sqlite3').resolve()}"


def _comma_list(value: str) -> list[str]:
    return [entry.strip() for entry in value.split(",") if entry.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
