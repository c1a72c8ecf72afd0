"""compose.yaml and CI's overrides: valid against the Compose Specification's published JSON
schema, each file as written and the files as they run (merged, variables filled in), with
dclint's copy of the schema (an npm package that scripts/bootstrap --test installs; skipped
where npm is not installed); holding only the keys and values compose.yaml is written with
(structure_problems, by hand, stricter than the schema: that takes a string for most booleans
and numbers, any restart policy, ports as numbers, and names no declared network or volume);
and wired as the gate needs: only nginx published, every dependency waited for until healthy,
PostgreSQL initialised with Wacrm's schema and then the shipped trigger, nginx on the shipped
config with only its addresses changed.  .ci/compose brings the stack up for real where
podman runs (docker compose / podman-compose then check the files themselves)."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from jsonschema.exceptions import best_match

from loader.settings import OPTIONS as LOADER_OPTIONS
from sidecar.settings import OPTIONS as SIDECAR_OPTIONS
from tests.deploy import schemas

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "compose"
COMPOSE = ROOT / "compose.yaml"
OVERRIDE = DEPLOY / "compose.podman-ci.yaml"
CNI_OVERRIDE = DEPLOY / "compose.podman-cni.yaml"
CI_SCRIPT = ROOT / ".ci" / "compose"

GATE_SERVICES = ("sidecar", "loader", "upstream")
SERVICES = {"nginx", "redis", "postgres", *GATE_SERVICES}

#: The variables compose.yaml reads, with the values .ci/compose gives them.
CI_ENV = {"WACRM_HTTP_BIND": "127.0.0.1", "WACRM_HTTP_PORT": "41234", "WACRM_PG_PASSWORD": "x"}


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*)|(?P<bad>))"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Return *value* with compose's ``${VAR}``, ``${VAR:-default}`` (and ``-``, ``:?``,
    ``?``) and ``$$`` filled in from *env*, as docker compose and podman-compose do."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        if m["bad"] is not None:
            raise ValueError(f"a lone $ in {value!r}: write $$")
        name = m["name"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        set_, nonempty = name in env, bool(env.get(name))
        if op in (":-", "-"):
            return env[name] if (nonempty if op == ":-" else set_) else arg
        if op in (":?", "?") and not (nonempty if op == ":?" else set_):
            raise ValueError(f"{name} is required: {arg}")
        return env.get(name, "")

    return _VAR.sub(one, value)


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, for what the CI override holds: mappings are
    merged key by key, anything else is replaced (a test holds the override to that)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(override)


def leaves(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    else:
        yield path, value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def ci_override() -> dict[str, Any]:
    return load(OVERRIDE)


@pytest.fixture(scope="module")
def stack(compose: dict[str, Any]) -> dict[str, Any]:
    """compose.yaml as it runs by default: every variable at its default."""
    return interpolate(compose, {})


def render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_nginx", DEPLOY / "render_nginx.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the files' structure ----------------------------------------------------------------------

# What compose.yaml and the overrides use is written out below, and anything else fails (a
# mistyped key, a wrongly typed value, a condition docker compose does not know), stricter than
# the Compose Specification's schema (below) and without node.  A key the files start to use is
# added here, after the Compose Specification.

_DURATION = re.compile(r"([0-9]+(\.[0-9]+)?(us|ms|s|m|h))+")
_PORT = re.compile(r"(\S+:)?[0-9]+:[0-9]+(/(tcp|udp))?")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


HEALTHCHECK = {
    "test": lambda v: _strings(v) and v[:1] in (["CMD"], ["CMD-SHELL"]) and len(v) > 1,
    "interval": lambda v: isinstance(v, str) and bool(_DURATION.fullmatch(v)),
    "timeout": lambda v: isinstance(v, str) and bool(_DURATION.fullmatch(v)),
    "start_period": lambda v: isinstance(v, str) and bool(_DURATION.fullmatch(v)),
    "retries": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
}
TOP = {"name", "services", "networks", "volumes"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
SERVICE = {
    "image": lambda v: isinstance(v, str) and bool(v),
    "build": lambda v: (
        isinstance(v, dict)
        and set(v) <= {"context", "dockerfile"}
        and all(isinstance(x, str) for x in v.values())
    ),
    "restart": lambda v: v in ("no", "always", "on-failure", "unless-stopped"),
    "command": _strings,
    "working_dir": lambda v: isinstance(v, str) and v.startswith("/"),
    "environment": lambda v: (
        isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
    ),
    "ports": lambda v: _strings(v) and all(_PORT.fullmatch(p) for p in v),
    "expose": lambda v: _strings(v) and all(p.isdigit() for p in v),
    "volumes": lambda v: _strings(v) and all(len(m.split(":")) in (2, 3) for m in v),
    "tmpfs": lambda v: _strings(v) and all(p.startswith("/") for p in v),
    "networks": _strings,
    "read_only": lambda v: isinstance(v, bool),
    "cap_drop": _strings,
    "security_opt": _strings,
    # depends_on and healthcheck: structure_problems looks inside.
    "depends_on": lambda v: isinstance(v, dict),
    "healthcheck": lambda v: isinstance(v, dict),
}


def structure_problems(doc: Mapping[str, Any]) -> list[str]:
    """Return what in the compose file *doc* is not a key or value that compose.yaml's
    structure allows (the checks above), nor names a declared service, network or volume."""
    problems = [
        f"{k}: unknown top-level key" for k in doc if k not in TOP and not k.startswith("x-")
    ]
    networks, volumes = doc.get("networks", {}), doc.get("volumes", {})
    for name, network in networks.items():
        if not isinstance(network, dict) or {k for k in network if not k.startswith("x-")} - {
            "internal"
        }:
            problems.append(f"networks/{name}: {network!r}")
        elif not isinstance(network.get("internal", False), bool):
            problems.append(f"networks/{name}/internal: not a boolean")
    for name, volume in volumes.items():
        if volume != {}:
            problems.append(f"volumes/{name}: {volume!r}")
    services = doc.get("services", {})
    for name, service in services.items():
        where = f"services/{name}"
        for key, value in service.items():
            check = SERVICE.get(key)
            if check is None:
                problems.append(f"{where}/{key}: unknown key")
            elif not check(value):
                problems.append(f"{where}/{key}: {value!r}")
        for net in service.get("networks", []) if _strings(service.get("networks")) else []:
            if net not in networks:
                problems.append(f"{where}/networks: {net} is not declared")
        for mount in service.get("volumes", []) if _strings(service.get("volumes")) else []:
            source = mount.split(":")[0]
            if not source.startswith((".", "/")) and source not in volumes:
                problems.append(f"{where}/volumes: {source} is not declared")
        healthcheck = service.get("healthcheck", {})
        for key, value in healthcheck.items() if isinstance(healthcheck, dict) else []:
            check = HEALTHCHECK.get(key)
            if check is None or not check(value):
                problems.append(f"{where}/healthcheck/{key}: {value!r}")
        if isinstance(healthcheck, dict) and healthcheck and "test" not in healthcheck:
            problems.append(f"{where}/healthcheck: no test")
        depends_on = service.get("depends_on", {})
        for dep, how in depends_on.items() if isinstance(depends_on, dict) else []:
            if dep not in services:
                problems.append(f"{where}/depends_on: {dep} is not a service")
            if (
                not isinstance(how, dict)
                or set(how) - {"condition", "restart", "required"}
                or how.get("condition") not in CONDITIONS
                or not all(isinstance(how.get(k, True), bool) for k in ("restart", "required"))
            ):
                problems.append(f"{where}/depends_on/{dep}: {how!r}")
    return problems


CI = "deploy/compose/compose.podman-ci.yaml"
CNI = "deploy/compose/compose.podman-cni.yaml"


#: The ways the files are run: which are merged, and the variables they are filled in with.
COMBINATIONS = pytest.mark.parametrize(
    "files,env",
    [
        (["compose.yaml"], {}),
        (["compose.yaml"], CI_ENV),
        (["compose.yaml", CI], {}),
        (["compose.yaml", CNI], {}),
        (["compose.yaml", CI, CNI], CI_ENV),
    ],
    ids=["defaults", "ci-env", "+ci", "+cni", "+ci+cni-ci-env"],
)


def merged(files: list[str], env: Mapping[str, str]) -> dict[str, Any]:
    """Return *files* merged in order, filled in from *env*."""
    doc: Any = {}
    for name in files:
        doc = merge(doc, load(ROOT / name))
    return interpolate(doc, env)


@COMBINATIONS
def test_the_files_hold_only_what_compose_yaml_is_written_with(
    files: list[str], env: dict[str, str]
) -> None:
    assert structure_problems(merged(files, env)) == []


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d["services"]["nginx"].update(helthcheck={}),
        lambda d: d["services"]["nginx"]["depends_on"]["sidecar"].update(condition="healthy"),
        lambda d: d["services"]["loader"]["depends_on"]["redis"].pop("condition"),
        lambda d: d["services"]["nginx"]["depends_on"]["sidecar"].update(restart="true"),
        lambda d: d["services"]["redis"]["healthcheck"].update(tset=["CMD", "true"]),
        lambda d: d["services"]["redis"]["healthcheck"].update(interval=5),
        lambda d: d["services"]["redis"]["healthcheck"].update(retries="5"),
        lambda d: d["services"]["redis"]["healthcheck"].update(test="redis-cli ping"),
        lambda d: d["networks"]["gate"].update(internl=True),
        lambda d: d["networks"]["gate"].update(internal="true"),
        lambda d: d["services"]["nginx"].update(ports={"80": 8080}),
        lambda d: d["services"]["nginx"].update(ports=[8080]),
        lambda d: d["services"]["sidecar"].update(read_only="yes"),
        lambda d: d["services"]["sidecar"].update(restart="unless_stopped"),
        lambda d: d["services"]["sidecar"].update(networks=["gates"]),
        lambda d: d["services"]["loader"]["environment"].update(PGPORT=5432),
        lambda d: d["services"]["postgres"].update(volumes=["pg_data:/var/lib/postgresql/data"]),
        lambda d: d.update(volume={}),
    ],
    ids=[
        "service-key",
        "condition",
        "no-condition",
        "depends-restart",
        "healthcheck-key",
        "interval",
        "retries",
        "healthcheck-test",
        "network-key",
        "internal",
        "ports",
        "port-number",
        "read-only",
        "restart",
        "undeclared-network",
        "environment-number",
        "undeclared-volume",
        "top-level-key",
    ],
)
def test_the_structure_check_catches_a_broken_file(stack: dict[str, Any], breakage: Any) -> None:
    broken = copy.deepcopy(stack)
    breakage(broken)
    assert structure_problems(broken) != []


# -- the Compose Specification's schema -------------------------------------------------------


@functools.cache
def compose_schema() -> jsonschema.Draft7Validator:
    """Return a validator of the Compose Specification's published JSON schema (dclint's
    copy, installed by scripts/bootstrap --test)."""
    schema = json.loads(schemas.installed("dclint/schemas/compose.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def schema_problems(doc: Mapping[str, Any]) -> list[str]:
    """Return where and why the compose file *doc* breaks the Compose Specification's schema,
    a line each (for a value no alternative of a oneOf fits, the closest one's reason)."""
    problems = []
    for error in compose_schema().iter_errors(doc):
        best = best_match([error])
        problems.append(f"{'/'.join(map(str, best.absolute_path)) or '(root)'}: {best.message}")
    return problems


@pytest.mark.parametrize("name", ["compose.yaml", CI, CNI])
def test_each_file_as_written_holds_to_the_compose_specification(name: str) -> None:
    assert schema_problems(load(ROOT / name)) == []


@COMBINATIONS
def test_the_files_as_run_hold_to_the_compose_specification(
    files: list[str], env: dict[str, str]
) -> None:
    assert schema_problems(merged(files, env)) == []


#: Breakages of the stack the published schema refuses: the change, and the path it names.
SCHEMA_BREAKAGES = {
    "service-key": (lambda d: d["services"]["nginx"].update(helthcheck={}), "services/nginx"),
    "condition": (
        lambda d: d["services"]["nginx"]["depends_on"]["sidecar"].update(condition="healthy"),
        "services/nginx/depends_on/sidecar/condition",
    ),
    "no-condition": (
        lambda d: d["services"]["loader"]["depends_on"]["redis"].pop("condition"),
        "services/loader/depends_on/redis",
    ),
    "healthcheck-key": (
        lambda d: d["services"]["redis"]["healthcheck"].update(tset=["CMD", "true"]),
        "services/redis/healthcheck",
    ),
    "interval-type": (
        lambda d: d["services"]["redis"]["healthcheck"].update(interval=5),
        "services/redis/healthcheck/interval",
    ),
    "ports-type": (
        lambda d: d["services"]["nginx"].update(ports={"80": 8080}),
        "services/nginx/ports",
    ),
    "network-key": (lambda d: d["networks"]["gate"].update(internl=True), "networks/gate"),
    "top-level-key": (lambda d: d.update(volume={}), "(root)"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BREAKAGES))
def test_the_compose_specification_refuses_a_broken_file(stack: dict[str, Any], case: str) -> None:
    breakage, where = SCHEMA_BREAKAGES[case]
    broken = copy.deepcopy(stack)
    breakage(broken)
    problems = schema_problems(broken)
    assert [p.split(": ", 1)[0] for p in problems] == [where], problems
    assert structure_problems(broken) != []


# -- how the stack is wired --------------------------------------------------------------------


def test_the_services(stack: dict[str, Any]) -> None:
    assert set(stack["services"]) == SERVICES


def test_only_nginx_is_published_on_the_host_loopback_by_default(stack: dict[str, Any]) -> None:
    published = {n for n, s in stack["services"].items() if s.get("ports")}
    assert published == {"nginx"}
    assert stack["services"]["nginx"]["ports"] == ["127.0.0.1:8080:80"]
    with_ci = interpolate(load(COMPOSE), CI_ENV)
    assert with_ci["services"]["nginx"]["ports"] == ["127.0.0.1:41234:80"]
    for name in SERVICES - {"nginx"}:
        assert "network_mode" not in stack["services"][name], name


def test_only_nginx_is_on_the_network_that_has_a_way_out(stack: dict[str, Any]) -> None:
    assert stack["networks"]["gate"]["internal"] is True
    for name, service in stack["services"].items():
        nets = set(service["networks"])
        assert nets == ({"edge", "gate"} if name == "nginx" else {"gate"}), name


def test_every_dependency_is_waited_for_until_healthy(stack: dict[str, Any]) -> None:
    services = stack["services"]
    for service in services.values():
        assert "healthcheck" in service
    graph = {n: dict(s.get("depends_on") or {}) for n, s in services.items()}
    for name, deps in graph.items():
        for dep, how in deps.items():
            assert how["condition"] == "service_healthy", (name, dep)
            assert "healthcheck" in services[dep], dep
    assert set(graph["nginx"]) == {"sidecar", "upstream", "loader"}
    assert set(graph["loader"]) == {"postgres", "redis"}
    assert set(graph["sidecar"]) == {"redis"}
    # No cycle: every service can be started after those it needs.
    done: set[str] = set()
    while len(done) < len(graph):
        ready = {n for n, deps in graph.items() if n not in done and set(deps) <= done}
        assert ready, f"depends_on cycle among {set(graph) - done}"
        done |= ready


def test_the_gate_services_run_the_image_built_from_the_dockerfile(stack: dict[str, Any]) -> None:
    services = stack["services"]
    images = {services[n]["image"] for n in GATE_SERVICES}
    assert len(images) == 1
    for name in GATE_SERVICES:
        build = services[name]["build"]
        assert (ROOT / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile"
        assert services[name]["read_only"] is True
        assert services[name]["cap_drop"] == ["ALL"]
    assert services["sidecar"]["command"] == ["wacrm-sidecar"]
    assert services["loader"]["command"] == ["wacrm-loader", "run"]
    assert services["sidecar"]["healthcheck"]["test"] == ["CMD", "wacrm-healthcheck"]


def test_the_real_images_are_official_ones_pinned_by_tag(stack: dict[str, Any]) -> None:
    for name, repo in (("nginx", "nginx"), ("redis", "redis"), ("postgres", "postgres")):
        image = stack["services"][name]["image"]
        assert re.fullmatch(rf"{repo}:\d+(\.\d+)*(-alpine)?", image), image


def test_the_demo_upstream_runs_from_the_mounted_demo_folder(stack: dict[str, Any]) -> None:
    # The image ships sidecar/ and loader/ only (.dockerignore), so demo/ is mounted.
    assert "!demo/" not in (ROOT / ".dockerignore").read_text()
    upstream = stack["services"]["upstream"]
    command = upstream["command"]
    assert command[:3] == ["python", "-m", "demo.upstream"]
    assert f"./demo:{upstream['working_dir']}/demo:ro" in upstream["volumes"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "8000" in upstream["healthcheck"]["test"][-1]


def bind_mounts(service: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        if source.startswith("."):
            yield source, target, mode[0] if mode else "rw"


def test_every_bind_mount_is_a_file_of_the_repository_read_only(stack: dict[str, Any]) -> None:
    mounts = [m for s in stack["services"].values() for m in bind_mounts(s)]
    assert len(mounts) == 5
    for source, _target, mode in mounts:
        assert (ROOT / source).exists(), source
        assert mode == "ro", source


def test_postgres_gets_wacrms_schema_then_the_shipped_trigger(stack: dict[str, Any]) -> None:
    initdb = sorted(
        (target, source)
        for source, target, _ in bind_mounts(stack["services"]["postgres"])
        if target.startswith("/docker-entrypoint-initdb.d/")
    )
    assert [source for _, source in initdb] == [
        "./deploy/compose/wacrm-schema.sql",
        "./loader/wacrm-notify.sql",
    ]
    assert all(target.endswith(".sql") for target, _ in initdb)


def test_the_loader_reads_postgres_with_the_one_password(stack: dict[str, Any]) -> None:
    raw = load(COMPOSE)["services"]
    loader, postgres = stack["services"]["loader"], stack["services"]["postgres"]
    password = raw["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password.startswith("${WACRM_PG_PASSWORD:-")
    assert raw["loader"]["environment"]["PGPASSWORD"] == password
    user, db = postgres["environment"]["POSTGRES_USER"], postgres["environment"]["POSTGRES_DB"]
    # No password in the URL: it would show in every `inspect` and process listing.
    assert loader["environment"]["WACRM_SOURCE"] == f"postgresql://{user}@postgres:5432/{db}"
    # On TCP: during initialisation the image's server listens on the socket only.
    test = postgres["healthcheck"]["test"]
    assert test[:2] == ["CMD", "pg_isready"] and test[test.index("-h") + 1] == "127.0.0.1"


def test_the_gate_settings_are_real_ones_and_agree(stack: dict[str, Any]) -> None:
    services = stack["services"]
    known = {
        "sidecar": {o.env for o in SIDECAR_OPTIONS},
        "loader": {o.env for o in LOADER_OPTIONS},
    }
    for name, settings in known.items():
        ours = {k for k in services[name]["environment"] if k.startswith("WACRM_")}
        assert ours <= settings, ours - settings
    for key in ("WACRM_REDIS_URL", "WACRM_REDIS_PREFIX"):
        assert services["sidecar"]["environment"].get(key) == (
            services["loader"]["environment"].get(key)
        ), key
    assert services["sidecar"]["environment"]["WACRM_REDIS_URL"].startswith("redis://redis:")


def test_the_loader_is_healthy_once_ready_on_the_images_metrics_port(
    stack: dict[str, Any],
) -> None:
    port = re.search(r"WACRM_LOADER_METRICS_PORT=(\d+)", (ROOT / "Dockerfile").read_text())
    assert port
    loader = stack["services"]["loader"]
    assert f"http://127.0.0.1:{port[1]}/readyz" in loader["healthcheck"]["test"][-1]
    assert port[1] in loader["expose"]


# -- nginx: the shipped config, other addresses ------------------------------------------------


def test_nginx_conf_is_the_shipped_one_rendered_with_the_stacks_addresses() -> None:
    render = render_module()
    want = render.render((ROOT / "nginx" / "nginx.conf").read_text())
    got = (DEPLOY / "nginx.conf").read_text()
    assert got == want, "deploy/compose/nginx.conf is out of date: run render_nginx.py"


def test_the_rendering_changes_nothing_but_addresses_paths_and_the_opening_comment() -> None:
    render = render_module()
    shipped = (ROOT / "nginx" / "nginx.conf").read_text()
    rendered = render.render(shipped)
    body = [line for line in shipped.splitlines() if not line.startswith("#")]
    out = [line for line in rendered.splitlines() if not line.startswith("#")]
    assert len(body) == len(out)
    for before, after in zip(body, out, strict=True):
        # Word by word: only a word holding a placeholder may change.
        words, new = before.split(), after.split()
        assert len(words) == len(new), (before, after)
        for word, now in zip(words, new, strict=True):
            assert word == now or re.search(r"@[A-Z_]+@", word), (before, after)


def test_nginx_conf_names_the_stacks_services_and_mounts(stack: dict[str, Any]) -> None:
    render = render_module()
    services = stack["services"]
    conf = (DEPLOY / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server (\S+);", conf, re.M)
    assert servers == [render.SIDECAR, render.UPSTREAM]
    sidecar_host, sidecar_port = render.SIDECAR.split(":")
    upstream_host, upstream_port = render.UPSTREAM.split(":")
    assert sidecar_host == "sidecar" and sidecar_port in services["sidecar"]["expose"]
    # The sidecar's own port: WACRM_PORT's default, which compose.yaml leaves alone.
    assert "WACRM_PORT" not in services["sidecar"]["environment"]
    assert next(o for o in SIDECAR_OPTIONS if o.env == "WACRM_PORT").default == int(sidecar_port)
    upstream = services["upstream"]["command"]
    assert upstream_host == "upstream" and upstream[upstream.index("--port") + 1] == upstream_port
    nginx = services["nginx"]
    mounts = {target: source for source, target, _ in bind_mounts(nginx)}
    assert mounts["/etc/nginx/nginx.conf"] == "./deploy/compose/nginx.conf"
    assert mounts[f"{render.NGINX_DIR}/snippets"] == "./nginx/snippets"
    assert nginx["ports"][0].rsplit(":", 1)[1] == render.LISTEN
    assert f"{render.RUNDIR}/nginx-tmp" in nginx["tmpfs"]


# -- CI's override -----------------------------------------------------------------------------


def test_the_ci_override_changes_the_images_only(ci_override: dict[str, Any]) -> None:
    changed = dict(leaves(ci_override))
    assert set(changed) == {("services", n, "image") for n in SERVICES}
    for path, value in changed.items():
        assert value.startswith("localhost/"), path


def test_the_cni_override_makes_gate_ordinary_and_turns_edge_dns_off_and_nothing_else() -> None:
    # A container on two CNI networks asks their DNS servers in a changing order, and the
    # edge network's server knows no name on the gate network: nginx, on both, must ask only
    # the gate network's.
    assert dict(leaves(load(CNI_OVERRIDE))) == {
        ("networks", "gate", "internal"): False,
        ("networks", "edge", "x-podman.disable_dns"): True,
    }
    assert load(COMPOSE)["services"]["nginx"]["networks"] == ["edge", "gate"]
    script = CI_SCRIPT.read_text()
    assert "CNI_OVERRIDE=deploy/compose/compose.podman-cni.yaml" in script


def test_the_ci_override_names_the_images_ci_compose_builds(ci_override: dict[str, Any]) -> None:
    script = CI_SCRIPT.read_text()
    services = ci_override["services"]
    gate_image = re.search(r"^GATE_IMAGE=(\S+)", script, re.M)
    assert gate_image
    assert {services[n]["image"] for n in GATE_SERVICES} == {gate_image[1]}
    standins = re.search(r"^STANDINS=\(([^)]*)\)", script, re.M)
    assert standins
    assert set(standins[1].split()) == {"nginx", "redis", "postgres"}
    for name in standins[1].split():
        assert services[name]["image"] == f"localhost/wacrm-compose-{name}:ci"
        assert (DEPLOY / "standins" / f"{name}.Containerfile").is_file()
