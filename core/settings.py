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

    # Web server (health, metrics, download links)
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

    # Where inputs are fetched from (core/net/fetcher.py). Attachments: only from these
    # origins, comma-separated scheme://host[:port] (Discord's CDN; a self-hosted
    # Discord-compatible server's own). Links: public addresses, and also any address inside
    # these networks the operator trusts (comma-separated CIDR, e.g. a NAS at 192.168.1.0/24).
    discord_cdn_url: str = "https://cdn.discordapp.com,https://media.discordapp.net"
    fetch_allowed_networks: str = ""

    @field_validator("model_dir", "public_url", "database_url", "discord_api_url", "discord_gateway_url",
                     "worker_name", "worker_devices", "s3_bucket", "s3_endpoint_url", "s3_public_endpoint_url",
                     mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # `STEMBOT_MODEL_DIR=` in a .env file means "not set", not the current folder.
        return value or None

    @model_validator(mode="after")
    def _retention_fits_the_storage(self) -> Settings:
        # S3 presigned URLs (workers' transfers, users' download links) last 7 days at most.
        if self.s3_bucket and self.retention_hours > MAX_S3_RETENTION_HOURS:
            raise ValueError(f"STEMBOT_RETENTION_HOURS is {self.retention_hours:g}, but with S3 storage "
                             f"(STEMBOT_S3_BUCKET) it is at most {MAX_S3_RETENTION_HOURS} (7 days): presigned "
                             "URLs last no longer")
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
