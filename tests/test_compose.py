"""docker-compose.yml, docker-compose.cluster.yml and the Dockerfile, checked without a Docker engine.

No engine runs here, so `docker compose up` cannot.  Instead the files are read
and their wiring checked against the app itself, and the bridge is started the
way the container would start it: the Dockerfile's CMD, run in a directory that
holds only what the Dockerfile COPYs, with the Dockerfile's ENV and the compose
``environment`` (service host names mapped to loopback, container ports to the
test's ports), against the session's real nats-server; the cluster file's two
replicas likewise against a real three-node cluster, and its nginx config is read
for what a WebSocket needs.
"""

from __future__ import annotations

import ast
import asyncio
import fnmatch
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from conftest import ROOT, BridgeProcess, NatsServer, free_port, wait_for_port

import main
from bridge.config import TEST_SUBJECT, Config, load_config

COMPOSE_FILE = ROOT / "docker-compose.yml"
CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
NATS_CLIENT_PORT = 4222
NATS_MONITOR_PORT = 8222
LIVE_MESSAGE_TIMEOUT = 5.0  # the default TEST_PUBLISH_INTERVAL is 1 s
PIP_INSTALL_REQUIREMENTS = r"pip install -r (\S*/)?requirements\.txt"


# ---------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form of the arguments, or None for shell form."""
        try:
            value = json.loads(self.args)
        except ValueError:
            return None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        return None


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def final_stage() -> list[Instruction]:
    """The instructions of the image itself: from the last FROM on."""
    instructions = dockerfile()
    start = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[start:]


def only(keyword: str) -> list[Instruction]:
    """``keyword`` instructions of the final stage."""
    return [i for i in final_stage() if i.keyword == keyword]


def last(keyword: str) -> Instruction:
    found = only(keyword)
    assert found, f"the Dockerfile has no {keyword}"
    return found[-1]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in only("ENV"):
        words = shlex.split(instruction.args)
        if words and "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def copy_instructions(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context."""
    copies = []
    for instruction in instructions:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = instruction.exec_form() or shlex.split(instruction.args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def context_glob(source: str) -> list[str]:
    """What a COPY source names in the build context (the repository root)."""
    return glob.glob(source, root_dir=ROOT)


def image_sources() -> list[str]:
    """Every path of the build context the final image COPYs."""
    return [m for sources, _ in copy_instructions(final_stage()) for s in sources for m in context_glob(s)]


def healthcheck_command() -> list[str]:
    args = last("HEALTHCHECK").args
    _, found, command = args.partition("CMD ")
    assert found, f"HEALTHCHECK without CMD: {args!r}"
    parsed = Instruction("CMD", command.strip()).exec_form()
    assert parsed is not None, f"HEALTHCHECK CMD is not in exec form: {command!r}"
    return parsed


def compose(file: Path = COMPOSE_FILE) -> dict[str, Any]:
    return yaml.safe_load(file.read_text())


def service(name: str, file: Path = COMPOSE_FILE) -> dict[str, Any]:
    services = compose(file)["services"]
    assert name in services, f"{file.name} has no {name!r} service"
    return services[name]


# ${VAR}, ${VAR:-default}, ${VAR-default} and $$, as compose interpolates them.
INTERPOLATION = re.compile(r"\$\$|\$\{(\w+)(?:(:?-)([^}]*))?\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """``value`` as compose passes it on, with ``variables`` as the shell's (and .env's)."""
    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, how, default = match.groups()
        if how == ":-" and not variables.get(name):
            return default
        if how == "-" and name not in variables:
            return default
        return variables.get(name, "")
    return INTERPOLATION.sub(one, value)


def compose_environment(
    name: str, file: Path = COMPOSE_FILE, variables: dict[str, str] | None = None
) -> dict[str, str]:
    """A service's environment as its container gets it: by default, nothing set in the shell."""
    env = service(name, file).get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value), variables or {}) for key, value in env.items()}


def compose_healthcheck(name: str, file: Path = COMPOSE_FILE) -> list[str]:
    test = service(name, file).get("healthcheck", {}).get("test")
    assert test, f"the {name} service has no healthcheck"
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return list(test)


def container_env(
    name: str = "bridge", file: Path = COMPOSE_FILE, variables: dict[str, str] | None = None
) -> dict[str, str]:
    """A bridge container's environment: the image's ENV, then compose's."""
    return {**dockerfile_env(), **compose_environment(name, file, variables)}


def host_ip(entry: Any) -> str | None:
    """The host address a `ports` entry binds: None when it names none (every interface)."""
    if isinstance(entry, dict):
        return entry.get("host_ip")
    parts = str(entry).split("/")[0].rsplit(":", 2)
    return parts[0] if len(parts) == 3 else None


def mem_limit_bytes(svc: dict[str, Any]) -> int:
    """A service's `mem_limit` in bytes (0: none): what `docker compose up` enforces without swarm."""
    limit = str(svc.get("mem_limit", "0")).lower()
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)b?", limit).groups()  # type: ignore[union-attr]
    return int(number) * 1024 ** "bkmg".index(unit or "b")


def app_port(name: str = "bridge", file: Path = COMPOSE_FILE) -> int:
    """The port the app listens on inside the container (what load_config resolves)."""
    return load_config([], container_env(name, file)).http_port


def published_ports(name: str, file: Path = COMPOSE_FILE) -> list[tuple[int, int]]:
    """(host port, container port) pairs of a service's `ports`."""
    pairs = []
    for entry in service(name, file).get("ports") or []:
        if isinstance(entry, dict):
            pairs.append((int(entry["published"]), int(entry["target"])))
            continue
        parts = str(entry).split("/")[0].split(":")
        pairs.append((int(parts[-2]), int(parts[-1])))
    return pairs


def url_paths(command: list[str]) -> list[str]:
    """The HTTP paths a healthcheck command asks for ('…/healthz' or ':8222/healthz')."""
    return re.findall(r"(?:'|\"|:\d+)(/[\w./-]*)", " ".join(command))


def app_routes() -> set[tuple[str, str]]:
    app = main.create_app(Config(test_publish_interval=0))
    return {
        (route.method, route.resource.canonical)
        for route in app.http_server.web_app.router.routes()
        if route.resource is not None
    }


def nats_service_names(file: Path = COMPOSE_FILE) -> list[str]:
    return [
        name
        for name, svc in compose(file)["services"].items()
        if str(svc.get("image", "")).split(":")[0] in ("nats", "library/nats", "docker.io/library/nats")
    ]


def dockerignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    path = path.rstrip("/")
    return any(fnmatch.fnmatch(path, p.rstrip("/")) for p in patterns if not p.startswith("!"))


# ---------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------


def test_dockerfile_every_stage_is_official_python_3_11_to_3_13_slim() -> None:
    pattern = r"(docker\.io/library/)?python:3\.1[1-3](\.\d+)?-slim(-\w+)?(@sha256:\w+)?"
    for instruction in (i for i in dockerfile() if i.keyword == "FROM"):
        image = instruction.args.split()[0]
        assert re.fullmatch(pattern, image), image


def test_dockerfile_runs_as_a_non_root_user() -> None:
    instructions = final_stage()
    cmd_at = max(i for i, ins in enumerate(instructions) if ins.keyword == "CMD")
    users = [ins.args for ins in instructions[:cmd_at] if ins.keyword == "USER"]
    assert users, "no USER before CMD: the process would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users[-1]


def test_dockerfile_cmd_runs_main_py_in_exec_form() -> None:
    command = last("CMD").exec_form()
    assert command is not None, "CMD is in shell form: /bin/sh would be PID 1 and swallow SIGTERM"
    assert not only("ENTRYPOINT"), "an ENTRYPOINT would change what CMD means"
    assert Path(command[0]).name.startswith("python"), command
    assert command[1:] == ["main.py"], command


def test_dockerfile_sets_pythonunbuffered() -> None:
    assert dockerfile_env().get("PYTHONUNBUFFERED") == "1"


def test_dockerfile_installs_requirements_in_a_layer_before_the_code() -> None:
    instructions = dockerfile()

    def index(predicate: Callable[[Instruction], bool], what: str) -> int:
        found = [i for i, ins in enumerate(instructions) if predicate(ins)]
        assert found, f"the Dockerfile has no {what}"
        return found[0]

    copy_requirements = index(
        lambda i: i.keyword == "COPY" and "requirements.txt" in i.args and ".py" not in i.args,
        "COPY of requirements.txt alone",
    )
    install = index(
        lambda i: i.keyword == "RUN" and bool(re.search(PIP_INSTALL_REQUIREMENTS, i.args)),
        "RUN pip install -r requirements.txt",
    )
    copy_code = index(
        lambda i: i.keyword == "COPY" and ("main.py" in i.args or "*.py" in i.args),
        "COPY of main.py",
    )
    assert copy_requirements < install < copy_code


def test_dockerfile_installs_runtime_requirements_only() -> None:
    commands = [i.args for i in dockerfile() if i.keyword in ("RUN", "COPY")]
    assert not [c for c in commands if "requirements-dev" in c]
    installs = [part for c in commands for part in re.findall(r"pip install[^&;|]*", c)]
    assert installs
    for install in installs:
        assert re.fullmatch(PIP_INSTALL_REQUIREMENTS + r"\s*", install), install


def test_dockerfile_image_runs_the_python_that_has_the_requirements() -> None:
    # pip installs into a virtualenv in the build stage; the image must copy
    # that virtualenv to the same path and put its bin/ first on PATH.
    install = next(i.args for i in dockerfile() if i.keyword == "RUN" and "pip install" in i.args)
    pip = re.search(r"(\S*)/bin/pip install", install)
    if pip is None:  # a single stage installing into the system python
        assert len([i for i in dockerfile() if i.keyword == "FROM"]) == 1
        return
    venv = pip.group(1)
    copies = [i.args.split() for i in only("COPY") if i.args.startswith("--from")]
    assert any(words[-2:] == [venv, venv] for words in copies), copies
    assert dockerfile_env()["PATH"].startswith(f"{venv}/bin:"), dockerfile_env()["PATH"]


def test_dockerfile_image_has_no_build_tools() -> None:
    assert not [i for i in only("RUN") if "apt-get install" in i.args or "apk add" in i.args]


def test_every_dockerfile_copy_source_exists_and_is_in_the_build_context() -> None:
    for sources, _ in copy_instructions(dockerfile()):
        for source in sources:
            matches = context_glob(source)
            assert matches, f"COPY {source}: nothing in the repository matches"
            for match in matches:
                assert not dockerignored(match), f"COPY {source}: {match} is excluded by .dockerignore"


def test_dockerfile_copies_every_local_module_the_app_imports() -> None:
    copied = {Path(match).name for match in image_sources()}
    needed, todo = set(), ["main"]
    while todo:
        module = todo.pop()
        if module in needed:
            continue
        needed.add(module)
        tree = ast.parse((ROOT / f"{module}.py").read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            todo.extend(n.split(".")[0] for n in names if (ROOT / f"{n.split('.')[0]}.py").exists())
    assert {f"{m}.py" for m in needed} <= copied, sorted(needed)
    assert "static" in copied, "the page (static/) is not copied"


def test_dockerfile_exposes_the_port_the_app_listens_on() -> None:
    exposed = {int(p.split("/")[0]) for ins in only("EXPOSE") for p in ins.args.split()}
    assert load_config([], dockerfile_env()).http_port in exposed


def test_dockerfile_healthcheck_asks_healthz_with_python_not_curl() -> None:
    command = healthcheck_command()
    assert Path(command[0]).name.startswith("python"), command
    assert url_paths(command) == ["/healthz"], command


def test_dockerignore_keeps_dev_files_out_of_the_build_context() -> None:
    for path in (".venv", ".git", "tests", "bench", "docs", "__pycache__", ".pytest_cache", ".ruff_cache"):
        assert dockerignored(path), path


# ---------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------


def test_compose_nats_service_uses_a_pinned_official_2x_image_with_a_shell() -> None:
    image = service("nats")["image"]
    assert re.fullmatch(r"nats:2(\.\d+){0,2}-alpine[\d.]*", image), image


def test_compose_nats_runs_jetstream_and_monitoring_on_8222() -> None:
    command = service("nats")["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    assert {"-js", "--js", "--jetstream"} & set(words), words
    flag = next(w for w in words if w in ("-m", "--http_port"))
    assert words[words.index(flag) + 1] == str(NATS_MONITOR_PORT), words
    assert not {"-p", "--port"} & set(words), "the client port must stay 4222"


def test_compose_nats_healthcheck_asks_its_monitoring_endpoint() -> None:
    command = compose_healthcheck("nats")
    assert command[0] == "CMD" and command[1] == "wget", command  # the alpine image has busybox wget
    assert f"127.0.0.1:{NATS_MONITOR_PORT}/healthz" in " ".join(command), command


def test_compose_nats_url_names_the_nats_service_and_its_client_port() -> None:
    urls = compose_environment("bridge")["NATS_URL"].split(",")
    for url in urls:
        parts = urlsplit(url)
        assert parts.scheme == "nats", url
        assert parts.hostname in nats_service_names(), url
        assert parts.port == NATS_CLIENT_PORT, url


def test_compose_bridge_is_built_from_the_repository_dockerfile() -> None:
    build = service("bridge")["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (COMPOSE_FILE.parent / context / name).resolve() == DOCKERFILE.resolve()


def test_compose_bridge_publishes_the_port_the_app_listens_on() -> None:
    port = app_port()
    assert (5001, port) in published_ports("bridge"), published_ports("bridge")


def test_compose_bridge_listens_on_all_interfaces_in_the_container() -> None:
    # 127.0.0.1 inside a container is unreachable through the published port.
    assert load_config([], container_env()).http_host == "0.0.0.0"


def test_compose_bridge_waits_for_a_healthy_nats() -> None:
    depends = service("bridge")["depends_on"]
    assert isinstance(depends, dict), "depends_on needs the long form to wait for health"
    assert depends["nats"]["condition"] == "service_healthy"


def test_compose_bridge_healthcheck_asks_healthz_on_the_app_port() -> None:
    command = compose_healthcheck("bridge")
    assert command[0] == "CMD", command
    assert url_paths(command) == ["/healthz"], command
    ports = re.findall(r":(\d+)/", " ".join(command))
    assert all(int(p) == app_port() for p in ports), command


async def test_healthcheck_paths_are_get_routes_of_the_app() -> None:
    # async: Panini's App wants an event loop to exist, as it does when the app serves.
    routes = app_routes()
    paths = url_paths(healthcheck_command()) + url_paths(compose_healthcheck("bridge"))
    assert paths
    for path in paths:
        assert ("GET", path) in routes, f"{path} is not a route of the app: {sorted(routes)}"


def test_compose_services_restart_unless_stopped() -> None:
    for name in ("nats", "bridge"):
        assert service(name).get("restart") == "unless-stopped", name


# What a demo must not do to the machine it runs on: open NATS (no users, the control
# plane included) and an unauthenticated page to the network, leave the control API open,
# or let one service take all the memory.

DEMO_FILES = [COMPOSE_FILE, CLUSTER_FILE]


def demo_bridges(file: Path) -> list[str]:
    """Services running the image's own command (the bridge), not another program of it."""
    services = compose(file)["services"]
    return [name for name, svc in services.items() if "build" in svc and "command" not in svc]


def demo_services(file: Path) -> list[str]:
    """Services running services/demo_service.py from the image."""
    return [name for name, svc in compose(file)["services"].items()
            if "build" in svc and "services/demo_service.py" in " ".join(svc.get("command") or [])]


@pytest.mark.parametrize("file", DEMO_FILES, ids=lambda f: f.name)
def test_demo_publishes_every_port_on_loopback_only(file: Path) -> None:
    for name, svc in compose(file)["services"].items():
        for entry in svc.get("ports") or []:
            assert host_ip(entry) == "127.0.0.1", f"{file.name}: {name} publishes {entry} on every interface"


@pytest.mark.parametrize("file", DEMO_FILES, ids=lambda f: f.name)
def test_demo_sets_a_memory_limit_on_every_service(file: Path) -> None:
    for name, svc in compose(file)["services"].items():
        assert mem_limit_bytes(svc) >= 32 * 1024**2, f"{file.name}: {name} has no (usable) mem_limit"


@pytest.mark.parametrize("file", DEMO_FILES, ids=lambda f: f.name)
def test_demo_bridges_need_a_control_token_that_says_change_me_by_default(file: Path) -> None:
    for name in demo_bridges(file):
        tokens = load_config([], container_env(name, file)).control_tokens
        assert tokens and all("change-me" in t for t in tokens), (name, tokens)


@pytest.mark.parametrize("file", DEMO_FILES, ids=lambda f: f.name)
def test_demo_control_token_is_taken_from_the_shell_when_set(file: Path) -> None:
    for name in demo_bridges(file):
        config = load_config([], container_env(name, file, {"CONTROL_TOKENS": "mine"}))
        assert config.control_tokens == ("mine",), name


@pytest.mark.parametrize("file", DEMO_FILES, ids=lambda f: f.name)
def test_demo_keeps_presence_on_the_demo_subjects_on_every_bridge(file: Path) -> None:
    for name in demo_bridges(file):
        assert load_config([], container_env(name, file)).presence_subjects == ("demo.>",), name


# The demo service (services/demo_service.py): in both files, from the same image, on their NATS,
# and callable from the page through every bridge.


@pytest.mark.parametrize("file", DEMO_FILES, ids=lambda f: f.name)
def test_demo_runs_one_demo_service_built_from_the_repository_dockerfile(file: Path) -> None:
    [name] = demo_services(file)
    build = service(name, file)["build"]
    assert (file.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    command = service(name, file)["command"]
    copied = image_sources()
    inside = [c for c in copied if command[-1] == c or command[-1].startswith(c.rstrip("/") + "/")]
    assert inside, (command, copied)


@pytest.mark.parametrize("file", DEMO_FILES, ids=lambda f: f.name)
def test_demo_service_reaches_the_nats_services_and_waits_for_them(file: Path) -> None:
    [name] = demo_services(file)
    urls = compose_environment(name, file)["NATS_URL"].split(",")
    assert {urlsplit(u).hostname for u in urls} == set(nats_service_names(file)), urls
    assert set(conditions(service(name, file)["depends_on"]).values()) == {"service_healthy"}


@pytest.mark.parametrize("file", DEMO_FILES, ids=lambda f: f.name)
def test_demo_bridges_let_the_page_call_the_demo_service(file: Path) -> None:
    for name in demo_bridges(file):
        policy = load_config([], container_env(name, file)).policy.for_user()
        assert [s for s in ("svc.echo", "svc.time") if policy.publish_refusal(s)] == [], name


# ---------------------------------------------------------------------------
# The container's command and environment, run for real
# ---------------------------------------------------------------------------


def stage_image_files(workdir: Path) -> None:
    """Lay out what the Dockerfile COPYs, as the image's WORKDIR would hold it."""
    for sources, dest in copy_instructions(final_stage()):
        target = workdir / dest
        matches = [ROOT / m for s in sources for m in context_glob(s)]
        for path in matches:
            if path.is_dir():  # a directory's contents go into the destination
                shutil.copytree(path, target, dirs_exist_ok=True)
            elif dest.endswith("/") or len(matches) > 1:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target / path.name)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def local_url(url: str, ports: dict[str, dict[int, int]]) -> str:
    """A compose-network URL (nats://nats:4222) as seen from this machine."""
    parts = urlsplit(url)
    if parts.hostname not in ports:
        return url
    port = ports[parts.hostname].get(parts.port or 0, parts.port)
    return urlunsplit(parts._replace(netloc=f"127.0.0.1:{port}"))


def local_environment(nats_server: NatsServer, http_port: int) -> dict[str, str]:
    """The container's environment with service names → 127.0.0.1 and test ports."""
    ports = {
        name: {NATS_CLIENT_PORT: nats_server.port, NATS_MONITOR_PORT: nats_server.monitor_port}
        for name in nats_service_names()
    }
    env = {}
    # The image's PATH leads to its virtualenv; here sys.executable plays that part.
    for key, value in container_env().items():
        if key == "PATH":
            continue
        if "://" in value:
            value = ",".join(local_url(v, ports) for v in value.split(","))
        env[key] = value
    env["HTTP_PORT"] = str(http_port)
    # Only PATH from outside: nothing from the developer's shell leaks in.
    return {"PATH": os.environ.get("PATH", ""), **env}


def local_command(command: list[str]) -> list[str]:
    """The image's `python` is this interpreter (it has the runtime requirements)."""
    if Path(command[0]).name.startswith("python"):
        return [sys.executable, *command[1:]]
    return command


def container_command() -> list[str]:
    command = service("bridge").get("command") or last("CMD").exec_form()
    assert command, "no command for the bridge"
    return command


def workdir_of(root: Path) -> Path:
    workdir = only("WORKDIR")
    return root / workdir[-1].args.lstrip("/") if workdir else root


def start_like_the_container(nats_server: NatsServer, root: Path) -> BridgeProcess:
    stage_root = root / "image"
    workdir = workdir_of(stage_root)
    workdir.mkdir(parents=True)
    # COPY destinations are relative to WORKDIR.
    stage_image_files(workdir)
    port = free_port()
    proc = subprocess.Popen(
        local_command(container_command()),
        cwd=workdir,
        env=local_environment(nats_server, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    bridge = BridgeProcess(proc=proc, port=port)
    try:
        wait_for_port(port, timeout=30, proc=proc)
    except BaseException:
        _, out = bridge.stop(signal.SIGKILL, timeout=10)
        raise AssertionError(f"the bridge did not start:\n{out}") from None
    return bridge


@pytest.fixture(scope="module")
def container_bridge(
    nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeProcess]:
    bridge = start_like_the_container(nats_server, tmp_path_factory.mktemp("container"))
    yield bridge
    bridge.stop(signal.SIGTERM, timeout=20)


def demo_control_token(name: str = "bridge", file: Path = COMPOSE_FILE) -> str:
    return load_config([], container_env(name, file)).control_tokens[0]


def test_control_api_of_the_bridge_run_like_the_container_refuses_a_call_without_the_token(
    container_bridge: BridgeProcess,
) -> None:
    assert post_json(f"{container_bridge.http_url}/clients/nobody", {"subjects": ["demo.x"]}) == 401


def test_control_api_of_the_bridge_run_like_the_container_answers_with_the_demo_token(
    container_bridge: BridgeProcess,
) -> None:
    status = post_json(f"{container_bridge.http_url}/clients/nobody", {"subjects": ["demo.x"]},
                       token=demo_control_token())
    assert status == 404  # let in; there is no such connection


def run_healthcheck(command: list[str], port: int) -> subprocess.CompletedProcess[str]:
    assert command[0] == "CMD", command
    env = {**container_env(), "PATH": os.environ.get("PATH", ""), "HTTP_PORT": str(port)}
    return subprocess.run(
        local_command(command[1:]), env=env, capture_output=True, text=True, timeout=15, check=False
    )


async def test_bridge_run_with_the_container_command_and_env_streams_live_test_messages(
    container_bridge: BridgeProcess, ws_factory: Any
) -> None:
    client = await ws_factory(container_bridge.http_url.replace("http", "ws", 1) + "/stream")
    assert client.welcome["nats"] == "connected"
    await client.subscribe(TEST_SUBJECT)
    frame = await client.receive_message(timeout=LIVE_MESSAGE_TIMEOUT)
    assert frame["subject"] == TEST_SUBJECT
    assert frame["data"]["key1"] == "value1"


def test_dockerfile_healthcheck_passes_against_the_bridge_run_like_the_container(
    container_bridge: BridgeProcess,
) -> None:
    result = run_healthcheck(["CMD", *healthcheck_command()], container_bridge.port)
    assert result.returncode == 0, result.stderr


def test_compose_healthcheck_passes_against_the_bridge_run_like_the_container(
    container_bridge: BridgeProcess,
) -> None:
    result = run_healthcheck(compose_healthcheck("bridge"), container_bridge.port)
    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    result = run_healthcheck(["CMD", *healthcheck_command()], free_port())
    assert result.returncode != 0


def test_bridge_run_like_the_container_exits_0_on_sigterm(nats_server: NatsServer, tmp_path: Path) -> None:
    bridge = start_like_the_container(nats_server, tmp_path)
    code, out = bridge.stop(signal.SIGTERM, timeout=20)
    assert code == 0, out


@pytest.fixture
def demo_service_like_its_container(
    nats_server: NatsServer, tmp_path: Path
) -> Iterator[subprocess.Popen[str]]:
    """docker-compose.yml's demo service: its command in a directory holding what the image COPYs,
    with its environment (NATS service names -> the test's nats-server)."""
    [name] = demo_services(COMPOSE_FILE)
    workdir = workdir_of(tmp_path / "image")
    workdir.mkdir(parents=True)
    stage_image_files(workdir)
    ports = {svc: {NATS_CLIENT_PORT: nats_server.port} for svc in nats_service_names()}
    env = {key: ",".join(local_url(v, ports) for v in value.split(",")) if "://" in value else value
           for key, value in {**dockerfile_env(), **compose_environment(name)}.items() if key != "PATH"}
    proc = subprocess.Popen(local_command(service(name)["command"]), cwd=workdir,
                            env={**env, "PATH": os.environ.get("PATH", "")}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=10)


async def test_demo_service_run_like_its_container_answers_and_stops_on_sigterm(
    nats_server: NatsServer, demo_service_like_its_container: subprocess.Popen[str]
) -> None:
    proc = demo_service_like_its_container
    try:
        answer = await ask_until_answered(nats_server.url, "svc.echo", b'{"n": 1}')
        assert json.loads(answer) == {"data": {"n": 1}, "headers": {}}
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


async def ask_until_answered(url: str, subject: str, payload: bytes) -> bytes:
    """A NATS request, tried until a service answers (it may still be starting)."""
    import nats

    nc = await asyncio.wait_for(nats.connect(url), 10)
    try:
        for _ in range(150):
            try:
                return (await nc.request(subject, payload, timeout=1)).data
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.2)
        raise AssertionError(f"nobody answered on {subject}")
    finally:
        await asyncio.wait_for(nc.close(), 10)


# ---------------------------------------------------------------------------
# docker-compose.cluster.yml: three NATS nodes, two bridge replicas, nginx in front
# ---------------------------------------------------------------------------

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
NATS_ROUTE_PORT = 6222
LB_HOST_PORT = 5001


def cluster_nats() -> list[str]:
    return nats_service_names(CLUSTER_FILE)


def cluster_bridges() -> list[str]:
    return demo_bridges(CLUSTER_FILE)


def nats_flags(name: str) -> dict[str, str]:
    """A NATS service's command as {flag: value} (value "" for a flag alone)."""
    command = service(name, CLUSTER_FILE)["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    flags: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("-"):
            following = words[i + 1] if i + 1 < len(words) else ""
            flags[word] = "" if following.startswith("-") else following
    return flags


def conditions(depends: dict[str, Any]) -> dict[str, str]:
    return {name: d["condition"] for name, d in depends.items()}


def lb() -> dict[str, Any]:
    services = compose(CLUSTER_FILE)["services"]
    found = [name for name, svc in services.items() if str(svc.get("image", "")).startswith("nginx:")]
    assert len(found) == 1, found
    return services[found[0]]


def nginx() -> str:
    """deploy/nginx.conf without comments."""
    return "\n".join(line.split("#", 1)[0] for line in NGINX_CONF.read_text().splitlines())


def nginx_directives(name: str) -> list[str]:
    return [m.strip() for m in re.findall(rf"^\s*{re.escape(name)}\s+([^;]*);", nginx(), re.M)]


def test_cluster_has_three_nats_nodes_on_a_pinned_official_image_with_a_shell():
    assert len(cluster_nats()) == 3, cluster_nats()
    for name in cluster_nats():
        image = service(name, CLUSTER_FILE)["image"]
        assert re.fullmatch(r"nats:2(\.\d+){0,2}-alpine[\d.]*", image), image


def test_cluster_nats_nodes_run_jetstream_each_with_its_own_name_and_store():
    names, stores = set(), set()
    for name in cluster_nats():
        flags = nats_flags(name)
        assert {"-js", "--js", "--jetstream"} & set(flags), flags
        names.add(flags.get("--name") or flags.get("--server_name") or flags.get("-n"))
        store = flags.get("-sd") or flags.get("--store_dir")
        volumes = service(name, CLUSTER_FILE).get("volumes") or []
        assert any(str(v).endswith(f":{store}") for v in volumes), (name, store, volumes)
        stores.update(str(v).split(":")[0] for v in volumes)
    assert len(names) == 3 and None not in names, names
    assert len(stores) == 3, stores  # JetStream nodes never share a store


def test_cluster_nats_nodes_form_one_cluster_routed_to_each_other():
    nodes = set(cluster_nats())
    for name in nodes:
        flags = nats_flags(name)
        assert flags.get("--cluster_name") == nats_flags(sorted(nodes)[0]).get("--cluster_name") != None  # noqa: E711
        assert urlsplit(flags["--cluster"]).port == NATS_ROUTE_PORT, flags
        routes = {urlsplit(u) for u in flags["--routes"].split(",")}
        others = {(n, NATS_ROUTE_PORT) for n in nodes - {name}}
        assert {(r.hostname, r.port) for r in routes} >= others, routes
        assert not {"-p", "--port"} & set(flags), "the client port must stay 4222"


def test_cluster_nats_healthchecks_ask_their_monitoring_endpoint():
    for name in cluster_nats():
        command = compose_healthcheck(name, CLUSTER_FILE)
        assert command[:2] == ["CMD", "wget"], command
        assert f"127.0.0.1:{nats_flags(name)['-m']}/healthz" in " ".join(command), command


def test_cluster_has_at_least_two_bridge_replicas_built_from_the_repository_dockerfile():
    bridges = cluster_bridges()
    assert len(bridges) >= 2, bridges
    for name in bridges:
        build = service(name, CLUSTER_FILE)["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile_name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (CLUSTER_FILE.parent / context / dockerfile_name).resolve() == DOCKERFILE.resolve()


def test_cluster_bridges_list_every_nats_node_so_they_fail_over():
    for name in cluster_bridges():
        urls = [urlsplit(u) for u in compose_environment(name, CLUSTER_FILE)["NATS_URL"].split(",")]
        assert {(u.scheme, u.hostname, u.port) for u in urls} == {
            ("nats", n, NATS_CLIENT_PORT) for n in cluster_nats()
        }, urls


def test_cluster_bridges_wait_for_every_nats_node_to_be_healthy():
    for name in cluster_bridges():
        depends = service(name, CLUSTER_FILE)["depends_on"]
        assert conditions(depends) == {n: "service_healthy" for n in cluster_nats()}


def test_cluster_bridges_share_one_control_plane():
    subjects = {load_config([], container_env(name, CLUSTER_FILE)).control_subject
                for name in cluster_bridges()}
    assert len(subjects) == 1, subjects


def test_cluster_has_one_test_stream_not_one_per_replica():
    intervals = [load_config([], container_env(name, CLUSTER_FILE)).test_publish_interval
                 for name in cluster_bridges()]
    assert sum(1 for i in intervals if i > 0) == 1, intervals


def test_cluster_bridges_listen_on_all_interfaces_and_are_reached_only_through_the_balancer():
    for name in cluster_bridges():
        assert load_config([], container_env(name, CLUSTER_FILE)).http_host == "0.0.0.0"
        assert not service(name, CLUSTER_FILE).get("ports"), f"{name} is published past the balancer"


def test_cluster_bridge_healthchecks_ask_healthz_on_the_app_port():
    for name in cluster_bridges():
        command = compose_healthcheck(name, CLUSTER_FILE)
        assert command[0] == "CMD" and url_paths(command) == ["/healthz"], command


def test_cluster_balancer_is_a_pinned_official_nginx_serving_port_5001():
    assert re.fullmatch(r"nginx:1\.\d+(\.\d+)?(-alpine[\d.]*)?", lb()["image"]), lb()["image"]
    listen = {int(v.split()[0]) for v in nginx_directives("listen")}
    published = [(int(str(p).split(":")[-2]), int(str(p).split(":")[-1])) for p in lb()["ports"]]
    assert any(host == LB_HOST_PORT and container in listen for host, container in published), published


def test_cluster_balancer_mounts_the_repository_nginx_conf_over_the_default_one():
    mounts = [str(v).split(":") for v in lb()["volumes"]]
    assert any((CLUSTER_FILE.parent / m[0]).resolve() == NGINX_CONF.resolve()
               and m[1] == "/etc/nginx/conf.d/default.conf" for m in mounts), mounts


def test_cluster_balancer_waits_for_healthy_bridges():
    assert conditions(lb()["depends_on"]) == {n: "service_healthy" for n in cluster_bridges()}


def test_nginx_upstream_is_every_bridge_replica_on_its_app_port():
    block = re.search(r"upstream\s+\w+\s*\{([^}]*)\}", nginx())
    assert block, nginx()
    servers = {m.split()[0] for m in re.findall(r"^\s*server\s+([^;]*);", block.group(1), re.M)}
    assert servers == {f"{name}:{app_port(name, CLUSTER_FILE)}" for name in cluster_bridges()}, servers
    upstream = re.search(r"upstream\s+(\w+)", nginx())
    assert upstream and f"http://{upstream.group(1)}" in nginx_directives("proxy_pass")


def test_nginx_passes_websocket_upgrades():
    headers = {tuple(v.split(None, 1)) for v in nginx_directives("proxy_set_header")}
    assert nginx_directives("proxy_http_version") == ["1.1"]
    assert ("Upgrade", "$http_upgrade") in headers
    connection = dict(headers)["Connection"]
    assert connection == "upgrade" or re.search(rf"map\s+\$http_upgrade\s+{re.escape(connection)}", nginx())


def test_nginx_keeps_the_browsers_host_so_the_pages_origin_is_accepted():
    # The bridge lets a page connect when Origin matches Host; "bridges" would not.
    assert ("Host", "$http_host") in {tuple(v.split(None, 1)) for v in nginx_directives("proxy_set_header")}


def test_nginx_keeps_quiet_websockets_open_past_the_ping_interval():
    ping = Config().ping_interval
    (timeout,) = nginx_directives("proxy_read_timeout")
    seconds = int(timeout[:-1]) * {"s": 1, "m": 60, "h": 3600}[timeout[-1]] if timeout[-1].isalpha() \
        else int(timeout)
    assert seconds > ping, timeout


def test_cluster_services_restart_unless_stopped():
    for name in compose(CLUSTER_FILE)["services"]:
        assert service(name, CLUSTER_FILE).get("restart") == "unless-stopped", name


def start_cluster_replica(name: str, nodes: list[NatsServer], root: Path) -> BridgeProcess:
    """A replica of the cluster file, run like its container: NATS service names → the nodes' ports."""
    workdir = workdir_of(root / name)
    workdir.mkdir(parents=True)
    stage_image_files(workdir)
    ports = {svc: {NATS_CLIENT_PORT: node.port} for svc, node in zip(cluster_nats(), nodes, strict=True)}
    env = {key: ",".join(local_url(v, ports) for v in value.split(",")) if "://" in value else value
           for key, value in container_env(name, CLUSTER_FILE).items() if key != "PATH"}
    port = free_port()
    env.update(HTTP_PORT=str(port), PATH=os.environ.get("PATH", ""))
    command = service(name, CLUSTER_FILE).get("command") or last("CMD").exec_form()
    proc = subprocess.Popen(local_command(command), cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    bridge = BridgeProcess(proc=proc, port=port)
    wait_for_port(port, timeout=30, proc=proc)
    return bridge


async def test_cluster_replicas_run_like_their_containers_share_the_control_plane(
    cluster: list[NatsServer], tmp_path: Path, ws_factory: Any
) -> None:
    first, second = (start_cluster_replica(name, cluster, tmp_path) for name in cluster_bridges()[:2])
    token = demo_control_token(cluster_bridges()[1], CLUSTER_FILE)
    try:
        client = await ws_factory(first.http_url.replace("http", "ws", 1) + "/stream")
        status = 0
        for _ in range(50):  # until the second replica has heard the first one announce itself
            status = (await asyncio.to_thread(post_json, f"{second.http_url}/clients/{client.connection_id}",
                                              {"subjects": [TEST_SUBJECT]}, token))
            if status == 200:
                break
            await asyncio.sleep(0.2)
        assert status == 200
        frame = await client.receive_message(timeout=LIVE_MESSAGE_TIMEOUT)
        assert frame["subject"] == TEST_SUBJECT
    finally:
        for bridge in (first, second):
            bridge.stop(signal.SIGTERM, timeout=20)


def post_json(url: str, body: Any, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
