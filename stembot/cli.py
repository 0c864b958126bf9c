"""The `stembot` command line: `run`, `worker`, `sync`, `db`, `jobs`, `models`, `separate`.

Each command imports what only it needs (the database and queue, discord.py, torch) in
its own function: `stembot separate` starts without the bot's database, queue and storage
(about 0.8 s of imports on 2 cores, docs/performance.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from pydantic import ValidationError
from tqdm import tqdm

from core.errors import StembotError
from core.media.audio import OUTPUT_FORMATS, OutputFormat
from core.net.input_rules import fetch_rules_of, limits_of
from core.separation import catalogue, published
from core.separation.stems import parse_stems
from core.settings import Backend, Precision, get_settings
from stembot import jobs_cli

if TYPE_CHECKING:
    from core.separation.file_separator import TrackResult


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _overlap(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError("must be in [0, 1)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stembot", description="Split music into stems with Demucs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sep = commands.add_parser("separate", help="separate files or links into stems (no Discord)")
    sep.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="audio or video files, or http(s) links to them (public addresses only)")
    sep.add_argument("--out", "-o", type=Path, required=True, help="output folder")
    sep.add_argument("--model", "-n", default=None, help="model name (default: STEMBOT_MODEL or htdemucs)")
    sep.add_argument("--model-dir", type=Path, default=None,
                     help="local model folder in demucs's repo layout (default: STEMBOT_MODEL_DIR)")
    sep.add_argument("--stems", default="all", help="all, karaoke, or a comma-separated list (vocals,no_bass,...)")
    sep.add_argument("--format", default="mp3", choices=OUTPUT_FORMATS, dest="fmt")
    sep.add_argument("--mp3-bitrate", type=int, default=None, metavar="KBPS", help="mp3 bitrate (default 320)")
    sep.add_argument("--wav-depth", default="16", choices=("16", "24", "float"), help="wav/flac sample format")
    sep.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"))
    sep.add_argument("--shifts", type=_positive_int, default=None, help="random shifts (0 = deterministic)")
    sep.add_argument("--overlap", type=_overlap, default=None, help="overlap between segments")
    sep.add_argument("--segment", type=float, default=None, help="segment length in seconds")
    sep.add_argument("--precision", default=None, choices=get_args(Precision),
                     help="arithmetic of the model (default: STEMBOT_PRECISION or fp32)")
    sep.add_argument("--backend", default=None, choices=get_args(Backend),
                     help="what runs the model on a CPU (default: STEMBOT_BACKEND or auto, the fastest measured)")
    sep.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sep.add_argument("--stats", type=Path, default=None, metavar="FILE",
                     help="write timings as JSON (tracks, audio seconds, wall and model seconds)")
    sep.set_defaults(handler=cmd_separate)

    run = commands.add_parser("run", help="run the Discord bot (with its own worker unless STEMBOT_QUEUE=postgres)")
    run.set_defaults(handler=cmd_run)

    worker = commands.add_parser("worker", help="run separation jobs from the PostgreSQL queue (distributed mode)")
    worker.add_argument("--name", default=None, help="this worker's name (default: STEMBOT_WORKER_NAME or host-pid)")
    worker.add_argument("--devices", default=None,
                        help="comma-separated devices, one job at a time each (default: every GPU, else the CPU)")
    worker.set_defaults(handler=cmd_worker)

    sync = commands.add_parser("sync", help="register the slash commands with Discord (once, or after updates)")
    sync.add_argument("--guild", type=int, default=None, help="only in this server (instant, for testing)")
    sync.set_defaults(handler=cmd_sync)

    db = commands.add_parser("db", help="database maintenance")
    db_cmds = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_cmds.add_parser("upgrade", help="create or migrate the schema to the latest version").set_defaults(
        handler=cmd_db_upgrade)
    role = db_cmds.add_parser(
        "worker-role", help="create or update the PostgreSQL login of `stembot worker`s: only what a worker needs",
        description="Creates the LOGIN role NAME if missing (password: STEMBOT_WORKER_DATABASE_PASSWORD, or a "
                    "generated one, printed once) and grants it exactly what a worker needs; run again at will. "
                    "Give the workers its URL as STEMBOT_DATABASE_URL.")
    role.add_argument("name", metavar="NAME", help="the role's name (lower-case letters, digits, _)")
    role.set_defaults(handler=cmd_db_worker_role)

    jobs_cli.add_parser(commands)

    models = commands.add_parser("models", help="list or download models")
    models_cmds = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = models_cmds.add_parser("list", help="models this host knows and where they are")
    listing.add_argument("--model-dir", type=Path, default=None)
    listing.set_defaults(handler=cmd_models_list)
    pull = models_cmds.add_parser("pull", help="download a model for offline use")
    pull.add_argument("name")
    pull.add_argument("--model-dir", type=Path, default=None,
                      help="where a checkpoint model's files go (default: STEMBOT_MODEL_DIR)")
    pull.set_defaults(handler=cmd_models_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A long-running service logs what it does; one-shot commands only what went wrong.
    service = args.command in ("run", "worker")
    logging.basicConfig(
        level=logging.INFO if args.verbose or service else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Alembic logs each of its plugins as it loads them (imported late now, after the set-up
    # above): noise in a service's log, and in front of a start-up error's one line.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        code = args.handler(args, parser)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except ValidationError as exc:  # a setting from the environment or .env is wrong
        for error in exc.errors():
            where = "STEMBOT_" + "_".join(map(str, error["loc"])).upper() if error["loc"] else "settings"
            print(f"error: {where}: {error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        code = 2
    return code


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def cmd_separate(args, parser: argparse.ArgumentParser) -> int:
    from core.separation.engine import SeparationEngine, SeparationOptions  # noqa: PLC0415 - loads torch; only here
    from core.separation.file_separator import FileSeparator  # noqa: PLC0415 - torch, as above

    settings = get_settings()
    model_name = args.model or settings.model
    model_dir = args.model_dir or settings.model_dir
    options = SeparationOptions(
        shifts=settings.shifts if args.shifts is None else args.shifts,
        overlap=settings.overlap if args.overlap is None else args.overlap,
        segment=settings.segment if args.segment is None else args.segment,
        precision=args.precision or settings.precision,
    )
    bitrate = args.mp3_bitrate or settings.mp3_bitrate
    if not 32 <= bitrate <= 320:
        parser.error("--mp3-bitrate must be between 32 and 320")
    fmt = OutputFormat(name=args.fmt, mp3_bitrate_kbps=bitrate, wav_depth=args.wav_depth)
    limits = limits_of(settings)
    try:
        link_rules = fetch_rules_of(settings).links  # the bot's rules for links: public, and allowed networks
    except ValueError as exc:
        return _fail(str(exc))

    started = time.monotonic()
    try:
        engine = SeparationEngine.load(model_name, model_dir, args.device or settings.device,
                                       args.backend or settings.backend, settings.export_dir, options.precision)
    except StembotError as exc:
        return _fail(exc.reason)
    try:
        request = parse_stems(args.stems, engine.sources)
    except StembotError as exc:
        parser.error(f"--stems: {exc.reason}")
    if options.segment is not None and options.segment > engine.max_segment:
        parser.error(f"--segment: at most {engine.max_segment:g} s for model {model_name}")

    display = _ProgressDisplay(len(args.inputs), quiet=args.quiet)
    batch = FileSeparator(engine, request, fmt, options, limits, link_rules=link_rules)
    results = batch.run(args.inputs, args.out, display)
    display.close()

    wall = time.monotonic() - started
    failed = [r for r in results if not r.ok]
    for result in failed:
        print(f"error: {result.input}: {result.error}", file=sys.stderr)
    audio_s = sum(r.audio_s for r in results if r.ok)
    ok = len(results) - len(failed)
    speed = f", {audio_s / wall:.2f}x real time" if wall > 0 and audio_s > 0 else ""
    print(
        f"{ok} of {len(results)} tracks separated, {audio_s / 60:.2f} min of audio in {wall:.1f} s{speed}"
        f" -> {args.out}",
        file=sys.stderr,
    )
    if args.stats is not None:
        args.stats.write_text(json.dumps({
            "tracks": len(results), "failed": len(failed), "audio_s": audio_s,
            "wall_s": wall, "forward_s": engine.forward_seconds,
        }))
    return 1 if failed else 0


class _ProgressDisplay:
    """One tqdm bar per track, on stderr."""
    def __init__(self, total: int, quiet: bool):
        self.total = total
        self.quiet = quiet
        self._bars: dict[int, tqdm] = {}

    def track_started(self, index: int, result: TrackResult) -> None:
        if self.quiet:
            return

        self._bars[index] = tqdm(
            total=100, desc=f"[{index + 1}/{self.total}] {result.name}"[:40], unit="%",
            file=sys.stderr, leave=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
        )

    def track_progress(self, index: int, fraction: float) -> None:
        bar = self._bars.get(index)
        if bar is not None:
            bar.update(int(fraction * 100) - bar.n)

    def track_finished(self, index: int, result: TrackResult) -> None:
        bar = self._bars.pop(index, None)
        if bar is not None:
            if result.ok:
                bar.update(100 - bar.n)
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


NO_TOKEN = (
    "error: no Discord bot token. Create an application at https://discord.com/developers/applications, "
    "add a bot to it, copy the bot's token, and put it in a file named .env in this folder as "
    "STEMBOT_DISCORD_TOKEN=<token> (or set that environment variable)."
)


def _token(settings) -> str | None:
    return settings.discord_token.get_secret_value() if settings.discord_token else None


def cmd_run(args, parser) -> int:
    settings = get_settings()
    token = _token(settings)
    if not token:
        print(NO_TOKEN, file=sys.stderr)
        return 1
    try:
        catalogue.locate(settings.model, settings.model_dir)
    except StembotError as exc:
        return _fail(exc.reason)
    try:
        _upgrade_database(settings)
    except StembotError as exc:  # a database migrated by a newer stembot
        return _fail(exc.reason)
    except ValueError as exc:
        return _fail(str(exc))
    return asyncio.run(_run_bot(settings, token))


def _upgrade_database(settings) -> None:
    """Migrate the schema; on PostgreSQL also install or migrate the job queue's tables."""
    from core import db  # noqa: PLC0415 - the database loads only for the commands that use it
    from core.distributed.queue_schema import INSTALLED, upgrade_queue_schema  # noqa: PLC0415 - as db
    from core.distributed.worker_role import reapply_worker_grants  # noqa: PLC0415 - as db

    url = settings.resolved_database_url
    if settings.queue == "postgres" and not url.startswith("postgresql"):
        raise ValueError("STEMBOT_QUEUE=postgres needs a PostgreSQL database "
                         "(STEMBOT_DATABASE_URL=postgresql+asyncpg://user:password@host/db)")
    db.upgrade(url)
    if url.startswith("postgresql"):
        done = asyncio.run(upgrade_queue_schema(url))
        if done == [INSTALLED]:
            print("installed the job queue's tables", file=sys.stderr)
        elif done:
            print(f"upgraded the job queue's tables: {', '.join(done)}", file=sys.stderr)
        # A migration may have added a column that a worker reads or writes.
        roles = asyncio.run(reapply_worker_grants(url))
        if roles:
            print(f"granted the workers' role(s) what they need: {', '.join(roles)}", file=sys.stderr)


def cmd_worker(args, parser) -> int:
    settings = get_settings()
    if settings.queue != "postgres" or not settings.resolved_database_url.startswith("postgresql"):
        return _fail("`stembot worker` takes jobs from the PostgreSQL queue: set STEMBOT_QUEUE=postgres and "
                     "STEMBOT_DATABASE_URL=postgresql+asyncpg://... (the bot's database)")
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else settings.device_list
    try:
        return asyncio.run(_run_worker(settings, args.name, devices))
    except StembotError as exc:
        return _fail(exc.reason)


async def _run_worker(settings, name: str | None, devices: list[str] | None) -> int:
    from core.distributed.queue_worker import QueueWorker  # noqa: PLC0415 - the queue loads only for a worker

    worker = QueueWorker(settings, name=name, devices=devices)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None  # called from asyncio.run
    signals = [0]

    def on_signal() -> None:
        signals[0] += 1
        if signals[0] == 1:
            logging.getLogger("stembot").info("draining: finishing the running job(s), taking no new one")
            worker.stop()
        else:
            main.cancel()  # a second signal: stop now (the job goes to another worker)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        await worker.run()
    except asyncio.CancelledError:
        return 1
    return 0


async def _run_bot(settings, token: str) -> int:
    import discord  # noqa: PLC0415 - discord.py and the bot load only for the commands that talk to Discord

    from bot.bot import StemBot, point_at_discord  # noqa: PLC0415 - as discord above
    from bot.services import Services  # noqa: PLC0415 - as discord above
    from core.ops.bot_lock import AnotherBotRunning, BotLock  # noqa: PLC0415 - as discord above

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None  # called from asyncio.run
    stopping = asyncio.Event()
    lost_lock: list[str] = []

    def lock_lost(why: str) -> None:
        lost_lock.append(why)
        asyncio.ensure_future(shutdown())

    lock = BotLock(settings.resolved_database_url, on_lost=lock_lost)
    try:
        await lock.acquire()
    except AnotherBotRunning as exc:
        return _fail(exc.reason)
    point_at_discord(settings.discord_api_url, settings.discord_gateway_url)
    bot = StemBot(settings, Services(settings))

    async def shutdown() -> None:
        stopping.set()
        await bot.close()
        # discord.py's reconnect back-off (up to minutes) does not wake up on close().
        main.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(shutdown()))
    try:
        async with bot:
            await bot.start(token)
    except discord.LoginFailure:
        print("error: Discord refused the bot token; check STEMBOT_DISCORD_TOKEN.", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
    finally:
        await lock.release()
    return 1 if lost_lock else 0


def cmd_sync(args, parser) -> int:
    settings = get_settings()
    token = _token(settings)
    if not token:
        print(NO_TOKEN, file=sys.stderr)
        return 1
    return asyncio.run(_sync(settings, token, args.guild))


async def _sync(settings, token: str, guild_id: int | None) -> int:
    import discord  # noqa: PLC0415 - discord.py and the bot load only for the commands that talk to Discord

    from bot.bot import StemBot, point_at_discord  # noqa: PLC0415 - as discord above

    point_at_discord(settings.discord_api_url, settings.discord_gateway_url)
    bot = StemBot(settings, services=None)
    async with bot:
        await bot.login(token)  # runs setup_hook, which loads the commands
        guild = discord.Object(guild_id) if guild_id else None
        if guild is not None:
            bot.tree.copy_global_to(guild=guild)
        synced = await bot.tree.sync(guild=guild)
    where = f"server {guild_id}" if guild_id else "all servers (may take up to an hour to appear)"
    print(f"synced {len(synced)} commands to {where}: {', '.join(c.name for c in synced)}")
    return 0


def cmd_db_upgrade(args, parser) -> int:
    try:
        _upgrade_database(get_settings())
    except StembotError as exc:  # a database migrated by a newer stembot
        return _fail(exc.reason)
    except ValueError as exc:
        return _fail(str(exc))
    print("database is up to date")
    return 0


def cmd_db_worker_role(args, parser) -> int:
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - the database loads only for the commands that use it

    from core.distributed.worker_role import check_name, ensure_worker_role  # noqa: PLC0415 - as make_url

    settings = get_settings()
    url = settings.resolved_database_url
    if not url.startswith("postgresql"):
        return _fail("`stembot db worker-role` is for PostgreSQL (distributed mode): STEMBOT_DATABASE_URL is not a "
                     "PostgreSQL database, and SQLite has no roles")
    given = settings.worker_database_password
    try:
        name = check_name(args.name)
        _upgrade_database(settings)
        role = asyncio.run(ensure_worker_role(url, name, given.get_secret_value() if given else None))
    except StembotError as exc:
        return _fail(exc.reason)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"role {name} {'created' if role.created else 'updated'}: it has only what a worker needs")
    # Printed, never logged: the one place the operator sees a generated password.
    password = role.generated_password
    worker_url = make_url(url).set(username=name, password=password or "PASSWORD")
    print("give the workers, and only them, this database URL"
          + ("" if password else " (PASSWORD: the role's password)") + ":")
    print(f"STEMBOT_DATABASE_URL={worker_url.render_as_string(hide_password=False)}")
    return 0


def cmd_models_list(args, parser) -> int:
    """Every model this host has or can pull: name, stems, speed class, license, where it is."""
    from core.separation import checkpoint_models  # noqa: PLC0415 - reads the model folder's configs only here

    model_dir = args.model_dir or get_settings().model_dir
    entries = catalogue.list_models(model_dir)
    width = max([len(entry.name) for entry in entries] + [24])
    print(f"{'MODEL':{width}} {'STEMS':34} {'SPEED':6} {'LICENSE':11} WHERE")
    for entry in entries:
        listed = published.BY_NAME.get(entry.name)
        if listed is not None:
            stems, speed, license_ = ",".join(listed.stems), listed.speed, listed.license
        else:
            stems, speed, license_ = "", "", "not listed"
            if model_dir is not None and entry.name in checkpoint_models.checkpoint_names(model_dir):
                try:
                    checkpoint = checkpoint_models.describe(entry.name, model_dir)
                    stems = ",".join(checkpoint.sources)
                    speed = published.speed_class(published.cost_factor_of(entry.name, checkpoint.family))
                except StembotError as exc:
                    stems = f"(unreadable: {exc.reason})"
        where = entry.available or "not downloaded (stembot models pull " + entry.name + ")"
        print(f"{entry.name:{width}} {stems:34} {speed:6} {license_:11} {where}")
    return 0


def cmd_models_pull(args, parser) -> int:
    from core.separation.model_download import Source  # noqa: PLC0415 - only for a pull

    settings = get_settings()
    source = Source(settings.model_mirror_url, settings.model_max_download_mb << 20)
    try:
        location = catalogue.pull(args.name, args.model_dir or settings.model_dir, source)
    except StembotError as exc:
        return _fail(exc.reason)
    print(f"{args.name}: available offline in {location.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
