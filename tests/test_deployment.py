"""docker-compose.yml's hardening, checked on the file as Docker Compose reads it (there is no
Docker engine here): no capabilities, no privilege gain, read-only root filesystems, non-root
users, no default passwords, storage internals and the database on networks with no way out
and out of the workers' reach, and nothing published but the download and S3 ports.

The healthcheck commands themselves are run against a real bot in
tests/bot/exts/split/test_split_e2e.py."""

from __future__ import annotations

import re

import pytest

from tests.support.deployment import (
    ROOT,
    MissingVariable,
    compose_healthcheck,
    dockerfile_healthcheck,
    dockerfile_stages,
    interpolate,
    interpolations,
    load_compose,
    published_ports,
    service_networks,
)

# What each service may publish: the bot's download links and the S3 gateway, nothing else.
PUBLISHED = {"bot": {8080}, "s3": {8333}}
# Capabilities a service may add back, with the reason; none needs one (see docker-compose.yml).
CAP_ADD_ALLOWED: dict[str, set[str]] = {}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY", re.IGNORECASE)
OPS_PORT = 8081


@pytest.fixture(scope="module")
def compose():
    return load_compose()


@pytest.fixture(scope="module")
def services(compose):
    return compose["services"]


def test_the_services_are_the_ones_checked_here(services):
    # A service added later gets the same checks; one renamed must not slip through them.
    assert {"postgres", "s3", "migrate", "bot", "worker"} <= set(services)


def test_every_service_drops_every_capability_and_cannot_gain_privileges(services):
    for name, service in services.items():
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert not service.get("privileged"), name
        assert set(service.get("cap_add", [])) <= CAP_ADD_ALLOWED.get(name, set()), name


def test_every_root_filesystem_is_read_only_and_the_writable_folders_are_volumes_or_tmpfs(services):
    for name, service in services.items():
        assert service.get("read_only") is True, name
        assert "/tmp" in service.get("tmpfs", []), name
    mounts = {name: {str(v).split(":")[-1] for v in service.get("volumes", [])} | set(service.get("tmpfs", []))
              for name, service in services.items()}
    assert {"/var/lib/postgresql/data", "/var/run/postgresql"} <= mounts["postgres"]
    assert "/data" in mounts["s3"]
    assert "/data" in mounts["bot"]  # its link secret
    assert "/data" in mounts["worker"]  # the running job's inputs and stems


def _stage_user(stage: str) -> str | None:
    users = [arguments for keyword, arguments in dockerfile_stages()[stage] if keyword == "USER"]
    return users[-1] if users else None


def test_every_service_runs_as_a_non_root_user(services):
    for name, service in services.items():
        if "build" in service:
            # stembot's images: the Dockerfile stage's USER, unless the service sets another.
            user = service.get("user") or _stage_user(service["build"]["target"])
        else:
            # Images whose entrypoint starts as root and switches user (which needs capabilities).
            user = service.get("user")
        assert user and user.split(":")[0] not in ("root", "0"), name


def test_no_password_or_secret_has_a_default(compose):
    for name, op, _ in interpolations(compose):
        if SECRET_NAME.search(name):
            assert op == ":?", f"${{{name}{op}...}} must stop Compose when unset or empty, with a message"


@pytest.mark.parametrize("value", [None, ""])
def test_compose_stops_without_a_postgres_password(compose, value):
    env = {"AWS_ACCESS_KEY_ID": "stembot", "AWS_SECRET_ACCESS_KEY": "a" * 40,
           "STEMBOT_WORKER_DATABASE_PASSWORD": "W0rker"}
    if value is not None:
        env["POSTGRES_PASSWORD"] = value
    with pytest.raises(MissingVariable) as caught:
        interpolate(compose, env)
    assert caught.value.name == "POSTGRES_PASSWORD" and "POSTGRES_PASSWORD" in caught.value.message


def test_the_postgres_password_reaches_the_server_and_every_database_url(services):
    env = {"AWS_ACCESS_KEY_ID": "stembot", "AWS_SECRET_ACCESS_KEY": "a" * 40, "POSTGRES_PASSWORD": "Pw0rd",
           "STEMBOT_WORKER_DATABASE_PASSWORD": "W0rker"}
    resolved = interpolate(services, env)
    assert resolved["postgres"]["environment"]["POSTGRES_PASSWORD"] == "Pw0rd"
    urls = [s["environment"]["STEMBOT_DATABASE_URL"] for s in resolved.values()
            if "STEMBOT_DATABASE_URL" in s.get("environment", {})]
    assert len(urls) >= 3  # migrate, bot, worker
    # Each service's own role (the worker may get another one); never a built-in password.
    assert all(re.match(r"postgresql\+asyncpg://[^:]+:[^@]+@postgres:5432/", url) for url in urls), urls
    assert "stembot@" not in " ".join(urls)
    # The worker logs in as its own role (`stembot db worker-role`, run by `migrate`).
    worker_url = resolved["worker"]["environment"]["STEMBOT_DATABASE_URL"]
    assert worker_url.startswith("postgresql+asyncpg://stembot_worker:W0rker@")


def test_the_env_example_leaves_the_postgres_password_to_the_operator():
    lines = (ROOT / ".env.example").read_text().splitlines()
    assert "POSTGRES_PASSWORD=" in lines  # set, and empty: Compose stops until it is filled in
    assert not [line for line in lines if re.match(r"#?\s*POSTGRES_PASSWORD=\S", line)]


def test_storage_internals_listen_on_the_stores_loopback_only(services):
    command = services["s3"]["command"]
    # -ip: master, volume and filer listen on (and advertise) the container's loopback.
    assert "-ip=127.0.0.1" in command
    assert not [arg for arg in command if arg.startswith("-ip.bind=") and arg != "-ip.bind=127.0.0.1"]
    # Only the S3 gateway listens on the container's networks.
    assert "-s3.ip.bind=0.0.0.0" in command


def test_the_worker_reaches_postgres_but_shares_no_network_with_the_store_or_the_bot(services):
    worker = service_networks(services["worker"])
    assert worker & service_networks(services["postgres"])
    assert not worker & service_networks(services["s3"])
    assert not worker & service_networks(services["bot"])


def test_a_network_shared_by_two_containers_has_no_way_out(compose, services):
    declared = compose.get("networks") or {}
    members: dict[str, set[str]] = {}
    for name, service in services.items():
        for network in service_networks(service):
            members.setdefault(network, set()).add(name)
    for network, names in members.items():
        if len(names) > 1:
            assert (declared.get(network) or {}).get("internal") is True, (network, names)
    # The database and the store's internals: on internal networks only.
    for name in ("postgres", "migrate"):
        assert all((declared.get(n) or {}).get("internal") for n in service_networks(services[name])), name
    # The store is on one network with a way out, for its published port, and alone there.
    outward = [n for n in service_networks(services["s3"]) if not (declared.get(n) or {}).get("internal")]
    assert len(outward) == 1 and members[outward[0]] == {"s3"}


def test_only_the_download_and_s3_ports_are_published(services):
    for name, service in services.items():
        assert published_ports(service) == PUBLISHED.get(name, set()), name
        assert OPS_PORT not in published_ports(service), name
        assert "network_mode" not in service, name  # host networking would publish everything


def test_the_bot_keeps_its_operators_listener_on_loopback(services):
    env = services["bot"].get("environment", {})
    assert env.get("STEMBOT_OPS_HOST", "127.0.0.1") == "127.0.0.1"
    image_env = " ".join(arguments for keyword, arguments in dockerfile_stages()["bot"] if keyword == "ENV")
    assert "STEMBOT_OPS_HOST=127.0.0.1" in image_env and f"STEMBOT_OPS_PORT={OPS_PORT}" in image_env
    assert "STEMBOT_WEB_PORT=8080" in image_env


def test_the_healthchecks_ask_the_operators_listener():
    for argv in (compose_healthcheck("bot"), dockerfile_healthcheck("bot")):
        command = " ".join(argv)
        assert "STEMBOT_OPS_PORT" in command and "/livez" in command, argv
        assert "8080" not in command, argv


def test_the_migration_does_not_inherit_the_bots_healthcheck(services):
    assert services["migrate"]["healthcheck"] == {"disable": True}


def test_the_bot_is_given_the_time_to_finish_its_deliveries_when_stopped(services):
    """The bot waits up to 30 s for deliveries under way (Dispatcher.stop); Docker kills
    after 10 s unless told otherwise."""
    import inspect
    import re

    from core.jobs.dispatcher import Dispatcher

    grace = inspect.signature(Dispatcher.stop).parameters["delivery_grace_s"].default
    given = services["bot"].get("stop_grace_period", "10s")
    seconds = sum(int(n) * {"s": 1, "m": 60}[unit] for n, unit in re.findall(r"(\d+)([sm])", given))
    assert seconds > grace
