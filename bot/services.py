"""Everything the bot runs beside the gateway connection: database, worker, dispatcher,
web servers (downloads for users; health and metrics for operators, on a listener of their
own). Started from `StemBot.setup_hook`, stopped from `StemBot.close`."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web
from sqlalchemy import text

from bot.exts.split._delivery import DiscordNotifier
from core.challenges import ChallengeStore
from core.db import utcnow
from core.distributed.fleet import Fleet
from core.distributed.queue import JobQueue
from core.distributed.queue_execution import QueueExecution
from core.host.handle import HostHandle
from core.jobs.dispatcher import Dispatcher, ExecutionBackend
from core.jobs.embedded_execution import EmbeddedExecution
from core.jobs.job import JobState
from core.jobs.results import ResultsRefused, check_artifacts, job_render
from core.jobs.sweeper import Sweeper
from core.ops import player as player_page
from core.ops.looplag import LoopLagMonitor, freeze_start_up_heap
from core.ops.web import HealthChecks, Metrics, build_ops_app, build_public_app, start_web, stop_web
from core.runtime import Runtime
from core.separation import catalogue
from core.separation.installed import installed_models
from core.separation.model_choice import InstalledModel, ModelDefaults
from core.settings import Settings
from core.storage.s3_storage import S3Storage
from core.storage.signed_links import LinkSigner, load_or_create_secret

if TYPE_CHECKING:
    from bot.bot import StemBot

log = logging.getLogger(__name__)


def origin_of(url: str) -> str:
    """scheme://host[:port] of `url`: what a browser sends as the Origin of its pages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


async def _retry(what: str, start, max_delay_s: float = 30.0) -> None:
    delay = 1.0
    while True:
        try:
            await start()
            return
        except Exception as exc:  # noqa: BLE001 - reported, then tried again
            log.warning("%s is not reachable yet (%s); trying again in %.0f s", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)


class Services:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.runtime = Runtime.from_settings(settings)
        self.engine = self.runtime.engine
        self.quotas = self.runtime.quotas
        self.store = self.runtime.store
        self.challenges = ChallengeStore(self.runtime.sessions)
        self.storage = self.runtime.storage
        self.fetch_rules = self.runtime.fetch_rules  # attachments from the CDN origins, links from public sites
        self.metrics = Metrics()
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag_seconds.observe)
        self.health = HealthChecks()
        secret = load_or_create_secret(Path(settings.data_dir),
                                       settings.link_secret.get_secret_value() if settings.link_secret else None)
        self.links_available = settings.download_links_available
        self.signer = LinkSigner(secret, settings.public_url or f"http://127.0.0.1:{settings.web_port}")
        self.link_ttl_s = settings.retention_hours * 3600
        self.distributed = settings.queue == "postgres"
        # Embedded mode: the bot's own model host. Distributed: `stembot worker`s run jobs.
        self.worker = None if self.distributed else HostHandle(self.runtime.host_config(threads=settings.threads),
                                                               deadline=self.runtime.deadline())
        self.fleet = Fleet(self.runtime.sessions, settings.worker_stale_s)
        self.queue: JobQueue | None = None
        self.notifier: DiscordNotifier | None = None
        self.dispatcher: Dispatcher | None = None
        self._web: web.AppRunner | None = None
        self._ops_web: web.AppRunner | None = None
        self._boot: asyncio.Task | None = None
        self._metrics_task: asyncio.Task | None = None
        self._models_task: asyncio.Task | None = None
        self._sweeper_task: asyncio.Task | None = None
        self.sweeper = Sweeper(self.store, self.storage, settings.retention_hours * 3600,
                               history_s=settings.job_history_days * 86400, stale_s=settings.job_stale_s,
                               max_attempts=settings.max_attempts)
        self._models: list[str] | None = None
        self._installed: list[InstalledModel] | None = None
        self._installed_lock = asyncio.Lock()
        self._extras: list = []  # what extensions started beside these (see `add_background`)

    def available_models(self) -> list[str]:
        """Models this bot can run without downloading: the default first."""
        if self._models is None:
            names = [e.name for e in catalogue.list_models(self.settings.model_dir) if e.available]
            self._models = [self.settings.model] + [n for n in names if n != self.settings.model]
        return self._models

    async def installed_models(self) -> list[InstalledModel]:
        """The available models with their family and stems, for the model choice and /help
        (read once, off the event loop: an unlisted model is loaded to read its stems)."""
        async with self._installed_lock:
            if self._installed is None:
                names = self.available_models()
                self._installed = await asyncio.to_thread(installed_models, names, self.settings.model_dir)
            return self._installed

    async def _read_installed_models(self) -> None:
        try:
            await self.installed_models()
        except Exception:
            log.exception("reading the installed models failed; the first command that needs them tries again")

    def model_defaults(self) -> ModelDefaults:
        """The operator's models for the plain-word choices (an empty setting is unset)."""
        s = self.settings
        return ModelDefaults(model=s.model, fast=s.fast_model or None, best_vocals=s.best_vocals_model or None,
                             best_stems=s.best_stems_model or None, lead_backing=s.lead_backing_model or None,
                             dereverb=s.dereverb_model or None, denoise=s.denoise_model or None,
                             dialogue=s.dialogue_model or None)

    async def start(self, bot: StemBot) -> None:
        self.notifier = notifier = DiscordNotifier(bot, self)
        execution: ExecutionBackend
        if self.worker is None:
            self.queue = JobQueue(self.settings.resolved_database_url)
            execution = QueueExecution(self.queue, self.fleet, stale_s=self.settings.worker_stale_s,
                                       window=self.runtime.transfer_window())
        else:
            execution = EmbeddedExecution(self.worker)
        config = self.runtime.dispatcher_config("bot" if self.distributed else "local")
        self.dispatcher = dispatcher = Dispatcher(self.store, self.storage, notifier, execution, config,
                                                  metrics=self.metrics, transient=notifier.transient)
        self.sweeper.on_recovered = dispatcher.recovered
        self.sweeper.resume_deliveries = dispatcher.resume_deliveries
        self.health.register("gateway", self._gateway_ok(bot))
        self.health.register("database", self._database_ok)
        self.health.register("worker", self._worker_ok)
        self.health.register("dispatcher", self._dispatcher_ok)
        # False while calls wait on an outage (core.outages); no new job starts meanwhile.
        if self.storage.outages:
            self.health.register("storage", self._storage_ok)
        self.health.register("deliveries", self._deliveries_ok)
        # Operators' endpoints first, on their own address: never on the public listener.
        ops_app = build_ops_app(health=self.health, metrics=self.metrics)
        self._ops_web = await start_web(ops_app, self.settings.ops_host, self.settings.ops_port)
        log.info("health and metrics on %s:%s", self.settings.ops_host, self.settings.ops_port)
        public_app = build_public_app(storage_root=self.storage.root, signer=self.signer,
                                      player=self.player_manifest)
        self._web = await start_web(public_app, self.settings.web_host, self.settings.web_port)
        log.info("download links on %s:%s", self.settings.web_host, self.settings.web_port)
        # The model loads in the background: the bot answers (and queues) meanwhile.
        self._boot = asyncio.create_task(self._start_worker(dispatcher), name="worker-boot")
        self._metrics_task = asyncio.create_task(self._metrics_loop(), name="metrics")
        # Read before the first /help or plain-word /split asks, which must answer within 3 s.
        self._models_task = asyncio.create_task(self._read_installed_models(), name="installed-models")
        self.loop_lag.start()
        # Everything imported and built so far lives as long as the bot: out of the
        # garbage collector's full collections, which would otherwise walk it each time.
        freeze_start_up_heap()
        self._sweeper_task = asyncio.create_task(self.sweeper.run(), name="sweeper")

    async def _start_worker(self, dispatcher: Dispatcher) -> None:
        if self.queue is not None:
            # Storage and database may still be starting (docker compose): wait for them.
            if isinstance(self.storage, S3Storage):
                await _retry("the object store", self.storage.start)
                if self.settings.public_url:
                    # The stem player's page fetches presigned stems from the bucket.
                    await self.storage.store.allow_browser_reads(origin_of(self.settings.public_url))
            await _retry("the job queue", self.queue.open)
        elif self.worker is not None:
            try:
                await self.worker.start()
            except Exception:
                log.exception("the separation worker could not start; jobs stay queued")
                raise
        # The database may be away at start too: /readyz says "dispatcher" false meanwhile.
        await _retry("the database", dispatcher.start)

    @property
    def worker_ready(self) -> bool:
        """Whether a model is loaded somewhere to run jobs (shown in queue messages)."""
        return self.dispatcher is not None and self.dispatcher.ready

    @staticmethod
    def _gateway_ok(bot):
        async def check() -> bool:
            return bot.gateway_ready.is_set() and not bot.is_closed()
        return check

    async def _database_ok(self) -> bool:
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return True

    async def _dispatcher_ok(self) -> bool:
        return self.dispatcher is not None and self.dispatcher.dispatching

    async def _storage_ok(self) -> bool:
        return not any(outage.down for outage in self.storage.outages)

    async def _deliveries_ok(self) -> bool:
        return self.dispatcher is not None and not self.dispatcher.discord_outage.down

    async def _worker_ok(self) -> bool:
        if self.worker is None:
            return await self.fleet.ready_slots() > 0
        return self.worker.ready and self.worker.alive()

    async def forget_user(self, user_id: int) -> int:
        """Delete the stored files of a user's finished jobs now (/forget)."""
        return len(await self.sweeper.expire(utcnow(), user_id=user_id))

    async def stem_links(self, job_id: int, names: list[str]) -> dict[str, str]:
        """Expiring download links for a job's stems: presigned by the object store, or
        signed for this bot's web server."""
        links = await self.storage.stem_links(job_id, names, self.link_ttl_s)
        if links is None:
            links = {name: self.signer.sign_file(job_id, name, ttl_s=self.link_ttl_s) for name in names}
        return links

    def player_link(self, job_id: int) -> str | None:
        """A signed link to the job's stem player, when users can reach this bot's web server
        (STEMBOT_PUBLIC_URL); it lasts as long as the download links."""
        if not self.settings.public_url:
            return None
        return self.signer.sign_player(job_id, time.time() + self.link_ttl_s)

    async def player_manifest(self, job_id: int, expires_at: int) -> dict | None:
        """What the player page of a delivered job plays: its checked stems (the names the bot
        made, `check_artifacts`), by links that expire with the page's own."""
        job = await self.store.get(job_id)
        if job is None or job.job_state not in (JobState.delivering, JobState.done) or job.artifacts_deleted_at:
            return None
        try:
            results = check_artifacts(job, job.artifacts)
        except ResultsRefused:
            return None
        names = list(results.files.values())
        if not await self.storage.has_stems(job_id, names):
            return None
        ttl_s = max(1.0, expires_at - time.time())
        links = await self.storage.stem_links(job_id, names, ttl_s)
        if links is None:
            links = {name: self.signer.sign(f"{job_id}/{name}", expires_at) for name in names}
        # The tempo and key the member hears: the song's, moved by `/split tempo: transpose:`.
        render = job_render(job)
        heard = results.analysis.rendered(render.tempo, render.transpose) if results.analysis else None
        return player_page.manifest(title=job.source_name, links=links, expires_at=expires_at,
                                    bpm=heard.bpm if heard else None, key=heard.key if heard else None)

    async def _metrics_loop(self, interval_s: float = 10.0) -> None:
        while True:
            try:
                counts = await self.store.counts_by_state()
                self.metrics.set_states(counts)
                self.metrics.set_queue_length(counts.get("queued", 0))
            except Exception:
                log.warning("metrics refresh failed", exc_info=True)
            await asyncio.sleep(interval_s)

    def add_background(self, service) -> None:
        """Have `await service.stop()` run first when the bot stops, while the database is
        still open (an extension's scheduler, say)."""
        self._extras.append(service)

    async def stop(self) -> None:
        for service in reversed(self._extras):
            try:
                await service.stop()
            except Exception:
                log.exception("stopping %r failed", service)
        await self.loop_lag.stop()
        for task in (self._boot, self._metrics_task, self._sweeper_task, self._models_task):
            if task is not None:
                task.cancel()
        # Each step on its own: one that fails must not keep the database connections
        # (threads that would keep the process alive) or the model host open.
        # The runtime last: it closes the object store and the database.
        steps = [self.runtime.close]
        if self.worker is not None:
            steps.insert(0, self.worker.stop)
        if self.queue is not None:
            steps.insert(0, self.queue.close)
        for runner in (self._ops_web, self._web):
            if runner is not None:
                steps.insert(0, functools.partial(stop_web, runner))
        if self.dispatcher is not None:
            steps.insert(0, self.dispatcher.stop)
        for step in steps:
            try:
                await step()
            except Exception:
                log.exception("shutdown step %r failed", step)
