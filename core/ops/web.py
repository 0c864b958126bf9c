"""The bot's small web servers: signed downloads for users, health and metrics for operators.

Two listeners, so that what is only for operators is never on the address users reach:

    public (STEMBOT_WEB_HOST:STEMBOT_WEB_PORT), `build_public_app`:
    GET /dl/<job_id>/<file>    a stem file, for a link signed by `LinkSigner`
    GET /player/<job_id>       a job's stem player (core.ops.player), for a link signed by `LinkSigner`
    GET /player/assets/<name>  the player's scripts and styles (not secret: no signature)

    operators only (STEMBOT_OPS_HOST:STEMBOT_OPS_PORT, loopback by default), `build_ops_app`:
    GET /livez                 200 "ok" while the process serves requests
    GET /readyz                200 when every registered check passes, else 503 (JSON either way)
    GET /metrics               Prometheus text exposition

Anything else is a 404 on either. Signed URLs are bearer tokens, so the access log written
here leaves out query strings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import quote

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from core.ops import player as player_page
from core.ops.looplag import LAG_BUCKETS_S
from core.storage.signed_links import LinkError, LinkSigner, is_safe_path

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 1.0
FINAL_STATES = ("done", "failed", "cancelled")
# Separation of a song takes seconds on a GPU and minutes on a CPU.
SEPARATION_BUCKETS_S = (5, 10, 20, 30, 60, 90, 120, 180, 300, 600, 900, 1800)

HealthCheck = Callable[[], Awaitable[bool]]


class HealthChecks:
    """Named async checks (e.g. "gateway", "database", "worker"); a check that returns
    anything but True, raises, or takes over `CHECK_TIMEOUT_S` fails."""

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S):
        self.timeout_s = timeout_s
        self._checks: dict[str, HealthCheck] = {}

    def register(self, name: str, check: HealthCheck) -> None:
        self._checks[name] = check

    def unregister(self, name: str) -> None:
        self._checks.pop(name, None)

    async def run(self) -> dict[str, bool]:
        """Every check's result, run concurrently."""
        names = list(self._checks)
        results = await asyncio.gather(*(self._run_one(name) for name in names))
        return dict(zip(names, results, strict=True))

    async def _run_one(self, name: str) -> bool:
        try:
            return (await asyncio.wait_for(self._checks[name](), self.timeout_s)) is True
        except TimeoutError:
            log.warning("health check %s timed out", name)
        except Exception:
            log.warning("health check %s raised", name, exc_info=True)
        return False


class Metrics:
    """stembot's Prometheus metrics, in a registry of their own (not the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs_total = Counter("stembot_jobs", "Jobs finished, by final state.", ["state"], registry=self.registry)
        self.failures_total = Counter("stembot_failures", "Failed jobs, by error kind.", ["kind"],
                                      registry=self.registry)
        self.jobs_in_state = Gauge("stembot_jobs_in_state", "Jobs currently in each state.", ["state"],
                                   registry=self.registry)
        self.queue_length = Gauge("stembot_queue_length", "Jobs waiting for the worker.", registry=self.registry)
        self.separation_seconds = Histogram("stembot_separation_seconds", "Time spent separating one track.",
                                            buckets=SEPARATION_BUCKETS_S, registry=self.registry)
        self.audio_minutes_total = Counter("stembot_audio_minutes", "Minutes of audio separated.",
                                           registry=self.registry)
        self.loop_lag_seconds = Histogram("stembot_event_loop_lag_seconds",
                                          "How late the bot's event loop ran a task due now.",
                                          buckets=LAG_BUCKETS_S, registry=self.registry)
        # Present from the first scrape, so rate() works before the first job ends.
        for state in FINAL_STATES:
            self.jobs_total.labels(state=state)
        self._known_states: set[str] = set()

    def job_finished(self, state: str, kind: str | None = None, separation_s: float | None = None,
                     audio_s: float | None = None) -> None:
        """Count a job that reached a final state; `kind` (an error kind) counts a failure."""
        self.jobs_total.labels(state=state).inc()
        if kind is not None:
            self.failures_total.labels(kind=kind).inc()
        if separation_s is not None:
            self.separation_seconds.observe(separation_s)
        if audio_s is not None:
            self.audio_minutes_total.inc(max(0.0, audio_s) / 60)

    def set_states(self, counts: dict[str, int]) -> None:
        """Set the number of jobs in each state; states seen before and now absent drop to 0."""
        for state in self._known_states - counts.keys():
            self.jobs_in_state.labels(state=state).set(0)
        for state, count in counts.items():
            self.jobs_in_state.labels(state=state).set(count)
        self._known_states |= counts.keys()

    def set_queue_length(self, length: int) -> None:
        self.queue_length.set(length)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    @property
    def content_type(self) -> str:
        return CONTENT_TYPE_LATEST


def content_disposition(file_name: str) -> str:
    """`attachment` with an ASCII fallback name and the exact name in RFC 5987 form."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in file_name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(file_name, safe='')}"


async def _no_sniffing(request: web.Request, response: web.StreamResponse) -> None:
    # A stem is served as the type its name says; a browser must not guess another
    # (HTML in a "file.mp3" would run as a page of this site). On every response,
    # errors included, as they may echo a name.
    response.headers["X-Content-Type-Options"] = "nosniff"


def _new_app() -> web.Application:
    app = web.Application()
    app.on_response_prepare.append(_no_sniffing)
    return app


def _refused(exc: LinkError) -> web.Response:
    if exc.reason == "expired":
        return web.Response(status=410, text="link expired")
    return web.Response(status=403, text="invalid link")


def build_public_app(*, storage_root: Path, signer: LinkSigner,
                     player: player_page.PlayerManifest | None = None) -> web.Application:
    """What users reach: signed downloads, and the stem player when `player` gives the
    manifest of a job's page. Start it with `start_web`."""
    root = Path(storage_root).resolve()
    manifest_for = player

    async def download(request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        file_name = request.match_info["file"]
        path = f"{job_id}/{file_name}"
        # The route matches single segments, but an encoded %2F decodes into one.
        if not is_safe_path(path) or path.count("/") != 1:
            return web.Response(status=403, text="invalid link")
        try:
            signer.verify(path, request.query.get("exp"), request.query.get("sig"))
        except LinkError as exc:
            return _refused(exc)
        try:
            target = (root / job_id / "stems" / file_name).resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            return web.Response(status=404, text="file not found (it may have been deleted)")
        except (OSError, RuntimeError):  # a symlink loop, or an unreadable folder
            return web.Response(status=404, text="file not found")
        if not target.is_relative_to(root):
            # A symlink that leads out of storage: the link was signed for storage only.
            log.warning("refused a download that resolves outside storage: job %s", job_id)
            return web.Response(status=403, text="invalid link")
        if not target.is_file():
            return web.Response(status=404, text="file not found")
        return web.FileResponse(target, headers={
            "Content-Disposition": content_disposition(file_name),
            "Cache-Control": "private, no-store",
            "Referrer-Policy": "no-referrer",
        })

    async def player_handler(request: web.Request) -> web.StreamResponse:
        assert manifest_for is not None
        job_id = request.match_info["job_id"]
        if not (job_id.isascii() and job_id.isdigit() and len(job_id) <= 18):
            return web.Response(status=403, text="invalid link")
        exp = request.query.get("exp")
        try:
            signer.verify(player_page.player_path(job_id), exp, request.query.get("sig"))
        except LinkError as exc:
            return _refused(exc)
        data = await manifest_for(int(job_id), int(str(exp)))
        if data is None:
            return web.Response(status=404, text="nothing to play (the files may have been deleted)")
        return web.Response(text=player_page.render_page(data), content_type="text/html", charset="utf-8",
                            headers={
                                "Content-Security-Policy": player_page.content_security_policy(
                                    player_page.connect_origins(data)),
                                "Cache-Control": "private, no-store",
                                # The page's address holds its signature: never sent on.
                                "Referrer-Policy": "no-referrer",
                                "X-Frame-Options": "DENY",
                            })

    async def player_asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        content_type = player_page.ASSETS.get(name)
        if content_type is None:
            return web.Response(status=404, text="not found")
        return web.FileResponse(player_page.ASSETS_DIR / name, headers={
            "Content-Type": f"{content_type}; charset=utf-8",
            "Content-Security-Policy": player_page.content_security_policy(),
            "Cache-Control": "public, max-age=300",
        })

    app = _new_app()
    app.router.add_get("/dl/{job_id}/{file}", download)
    if manifest_for is not None:
        app.router.add_get("/player/assets/{name}", player_asset)
        app.router.add_get("/player/{job_id}", player_handler)
    return app


def build_ops_app(*, health: HealthChecks, metrics: Metrics) -> web.Application:
    """What only operators reach: liveness, readiness and metrics. Start it with `start_web`
    on an address users cannot reach (STEMBOT_OPS_HOST, loopback by default)."""

    async def livez(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        checks = await health.run()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def metrics_page(request: web.Request) -> web.Response:
        body = metrics.render()
        # CONTENT_TYPE_LATEST carries a charset, which aiohttp wants in its own argument.
        return web.Response(body=body, headers={"Content-Type": metrics.content_type})

    app = _new_app()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    return app


class RedactedAccessLogger(AbstractAccessLogger):
    """An access log line without the query string, which holds link signatures."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %.3fs", request.method, request.path, response.status, time)


async def start_web(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve `app` on host:port (port 0 picks a free port; see `runner.addresses`)."""
    runner = web.AppRunner(app, access_log_class=RedactedAccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


async def stop_web(runner: web.AppRunner) -> None:
    await runner.cleanup()
