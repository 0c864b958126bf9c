"""docker-compose.yml and the Dockerfile read as Docker reads them, for tests that check the
deployment without a Docker engine: YAML with its anchors and merge keys, Compose's `${...}`
interpolation, the Dockerfile's stages and instructions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+x}, and $NAME;
# $$ is a literal dollar sign.
_INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
                            r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    """A `${NAME:?message}` (or `${NAME?message}`) whose variable is not set: Compose stops."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as parsed YAML (anchors and `<<` merge keys resolved), before interpolation."""
    return yaml.safe_load(path.read_text())


def interpolations(value: Any) -> list[tuple[str, str, str]]:
    """Every `${...}` and `$NAME` in the strings of `value`: (name, operator, argument); the
    operator is "" for none."""
    found = []
    if isinstance(value, dict):
        for item in value.values():
            found += interpolations(item)
    elif isinstance(value, list):
        for item in value:
            found += interpolations(item)
    elif isinstance(value, str):
        for match in _INTERPOLATION.finditer(value):
            if match["escaped"]:
                continue
            if match["bare"]:
                found.append((match["bare"], "", ""))
            else:
                found.append((match["name"], match["op"] or "", match["arg"]))
    return found


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`value` with Compose's interpolation done against `env`; raises `MissingVariable` where
    Compose would refuse to start."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        if match["bare"]:
            return env.get(match["bare"], "")
        name, op, arg = match["name"], match["op"] or "", match["arg"]
        current = env.get(name)
        unset_or_empty = not current
        missing = unset_or_empty if op.startswith(":") else current is None
        if op.endswith("-"):
            return arg if missing else current or ""
        if op.endswith("?"):
            if missing:
                raise MissingVariable(name, arg)
            return current or ""
        if op.endswith("+"):
            return "" if missing else arg
        return current or ""

    return _INTERPOLATION.sub(replace, value)


def service_networks(service: dict[str, Any]) -> set[str]:
    """The networks a service is on (Compose puts one without `networks` on `default`)."""
    networks = service.get("networks")
    if networks is None:
        return {"default"}
    return set(networks)


def published_ports(service: dict[str, Any]) -> set[int]:
    """The container ports a service publishes on the host (short or long syntax)."""
    ports = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            container = str(entry).split(":")[-1].split("/")[0]
            ports.add(int(container.split("-")[0]))
    return ports


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, (KEYWORD, arguments), continuation lines joined and comments
    dropped as Docker does."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for instruction in logical:
        keyword, _, arguments = instruction.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = arguments.split()
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else words[0]
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((keyword, arguments.strip()))
    return stages


def dockerfile_healthcheck(stage: str) -> list[str]:
    """The argv Docker runs for the stage's HEALTHCHECK (shell form: through /bin/sh -c)."""
    checks = [arguments for keyword, arguments in dockerfile_stages()[stage] if keyword == "HEALTHCHECK"]
    assert checks, f"no HEALTHCHECK in the {stage} stage"
    command = checks[-1].split(" CMD ", 1)[1].strip()
    if command.startswith("["):
        return yaml.safe_load(command)
    return ["/bin/sh", "-c", command]


def compose_healthcheck(service: str) -> list[str]:
    """The argv Docker runs for a compose service's healthcheck."""
    test = load_compose()["services"][service]["healthcheck"]["test"]
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", test[1]]
    assert test[0] == "CMD", test
    return list(test[1:])
