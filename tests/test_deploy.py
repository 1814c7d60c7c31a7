"""deploy/: the image, the compose file and the Kubernetes manifests keep their invariants.

No container engine runs here, so these tests read the files (PyYAML, a small Dockerfile reader)
and check what users rely on: replica counts, probes, start order, the replica-set
initialisation, non-root pods and image, and that every `TIMERD_*` name is a real setting.
Where the tools are installed, `nginx -t` checks deploy/nginx.conf and `node --check` the
replica-set initialisation script.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from api.validation import MAX_BODY_BYTES
from tests.support.procs import TimerdProcesses, free_port, timerd_env
from timerd.errors import ConfigError
from timerd.settings import Settings, build_settings, env_name
from timerd.signing import Signer

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
NGINX_CONF = DEPLOY / "nginx.conf"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Variables the deployment files set before timerd knows them; timerd ignores TIMERD_* names it
# does not know, so they are harmless until then. A name may stay once it is a Settings field.
#   TIMERD_AUTH  "protected mode": without API keys, no non-loopback bind unless "none" (being
#                added by another issue). TIMERD_METRICS_PORT, listed here at first, is a
#                setting now.
NOT_YET_SETTINGS = frozenset({"TIMERD_AUTH"})

SETTING_NAMES = frozenset(env_name(f.name) for f in dataclasses.fields(Settings))
API_PORT = Settings().port
REPLICA_SET = "rs0"
TIMERD_NAME = re.compile(r"\bTIMERD_[A-Z0-9_]*[A-Z0-9]")
CHECK_TIMEOUT_S = 20


def load_yaml(path: Path) -> list[Any]:
    """Every document of a YAML file, empty ones left out."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def seconds(duration: str | int) -> float:
    """A compose duration (`30s`, `1m30s`, `500ms`) in seconds."""
    if isinstance(duration, int):
        return float(duration)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def size_bytes(size: str) -> int:
    """An nginx size (`16k`, `1m`, `1024`) in bytes."""
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", size)
    assert match, f"not an nginx size: {size!r}"
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match[2].lower()]
    return int(match[1]) * scale


def test_deploy_holds_the_image_compose_file_manifests_and_readme() -> None:
    for name in ("Dockerfile", "compose.yaml", "nginx.conf", "README.md", "k8s"):
        assert (DEPLOY / name).exists(), name
    assert DOCKERIGNORE.is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses_into_mappings(path: Path) -> None:
    docs = load_yaml(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs)


def test_every_timerd_variable_named_in_deploy_files_is_a_setting() -> None:
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in [*deploy_files(), DOCKERIGNORE]
        for name in TIMERD_NAME.findall(path.read_text())
        if name not in SETTING_NAMES | NOT_YET_SETTINGS
    }
    assert not unknown, "not timerd settings (a typo, or add to NOT_YET_SETTINGS):\n" + "\n".join(
        sorted(unknown)
    )


# ---------------------------------------------------------------------------------------------
# compose.yaml


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- KEY=value` form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def replicas(service: dict[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):  # the short form: no condition
        return {name: {} for name in deps}
    return dict(deps)


def healthcheck_enabled(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("test")) and not check.get("disable", False)


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    (compose,) = load_yaml(COMPOSE)
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def timerd_services(services: dict[str, dict[str, Any]], role: str) -> dict[str, dict[str, Any]]:
    """The services running the image built from deploy/Dockerfile with `timerd ROLE`."""
    return {
        name: s
        for name, s in services.items()
        if str(s.get("image", "")).startswith("timerd") and command(s)[:1] == [role]
    }


def mongo_members(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if command(s)[:1] == ["mongod"]}


def init_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if "rs.initiate" in " ".join(command(s))}


def load_balancers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith("nginx")}


def init_script(service: dict[str, Any]) -> str:
    cmd = command(service)
    assert cmd[0] == "mongosh"
    return cmd[cmd.index("--eval") + 1]


def test_compose_runs_three_api_replicas_and_two_daemons(
    services: dict[str, dict[str, Any]],
) -> None:
    api = timerd_services(services, "api")
    daemons = timerd_services(services, "daemon")
    assert sum(replicas(s) for s in api.values()) == 3
    assert sum(replicas(s) for s in daemons.values()) == 2
    for name, service in api.items():
        cmd = command(service)
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0", name
    for name, service in {**api, **daemons}.items():
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name


def test_compose_timerd_services_use_the_replica_set(services: dict[str, dict[str, Any]]) -> None:
    members = mongo_members(services)
    timerd = {**timerd_services(services, "api"), **timerd_services(services, "daemon")}
    assert len(timerd) == 5
    for name, service in timerd.items():
        store = urlsplit(environment(service)["TIMERD_STORE"])
        assert store.scheme == "mongodb", name
        hosts = {host.split(":")[0] for host in store.netloc.rsplit("@", 1)[-1].split(",")}
        assert hosts == set(members), name
        assert parse_qs(store.query)["replicaSet"] == [REPLICA_SET], name
        assert environment(service)["TIMERD_AUTH"] == "none", name


def test_compose_has_three_mongo_members_in_the_replica_set(
    services: dict[str, dict[str, Any]],
) -> None:
    members = mongo_members(services)
    assert len(members) == 3
    for name, member in members.items():
        cmd = command(member)
        assert cmd[cmd.index("--replSet") + 1] == REPLICA_SET, name
        assert "--bind_ip_all" in cmd, name
        assert str(member["image"]).startswith("mongo:7"), name
        assert healthcheck_enabled(member), name
        assert any(str(v).endswith(":/data/db") for v in member.get("volumes", [])), name


def test_compose_initiates_the_replica_set_with_every_member_idempotently(
    services: dict[str, dict[str, Any]],
) -> None:
    members = mongo_members(services)
    ((_, init),) = init_services(services).items()
    script = init_script(init)
    assert re.search(rf"_id:\s*\"{REPLICA_SET}\"", script)
    hosts = re.findall(r"host:\s*\"([^\"]+)\"", script)
    assert sorted(hosts) == sorted(f"{m}:27017" for m in members)
    assert "AlreadyInitialized" in script  # a second `up` finds the set initiated and goes on
    assert "PRIMARY" in script  # and it waits until the set can take writes
    assert init.get("restart", "no") == "no", "a one-shot service must not be restarted"
    assert {m: d.get("condition") for m, d in depends_on(init).items()} == dict.fromkeys(
        members, "service_healthy"
    )


def test_the_replica_set_initialisation_script_is_valid_javascript(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot check the mongosh script's syntax")
    ((_, init),) = init_services(services).items()
    script = tmp_path / "init.js"
    script.write_text(init_script(init))
    result = subprocess.run(
        [node, "--check", str(script)],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_starts_in_order(services: dict[str, dict[str, Any]]) -> None:
    ((init_name, _),) = init_services(services).items()
    api = timerd_services(services, "api")
    for name, service in {**api, **timerd_services(services, "daemon")}.items():
        assert depends_on(service)[init_name]["condition"] == "service_completed_successfully", name
    ((_, lb),) = load_balancers(services).items()
    assert {n: d.get("condition") for n, d in depends_on(lb).items()} == dict.fromkeys(
        api, "service_healthy"
    )
    for name, service in api.items():
        assert healthcheck_enabled(service), name
        assert f":{API_PORT}/healthz" in " ".join(service["healthcheck"]["test"]), name
    for name, service in timerd_services(services, "daemon").items():
        assert healthcheck_enabled(service), name
        port = environment(service)["TIMERD_METRICS_PORT"]
        assert f":{port}/healthz" in " ".join(service["healthcheck"]["test"]), name


def test_compose_dependencies_are_conditional_and_acyclic_and_services_restart(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for dep, spec in depends_on(service).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec.get("condition"), f"{name} → {dep}: say which condition to wait for"
            if spec["condition"] == "service_healthy":
                assert healthcheck_enabled(services[dep]), f"{dep} has no healthcheck"
    one_shot = set(init_services(services))
    for name, service in services.items():
        if name not in one_shot:
            assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, name

    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, "dependency cycle: " + " → ".join((*path, name))
        if name not in done:
            for dep in depends_on(services[name]):
                visit(dep, (*path, name))
            done.add(name)

    for name in services:
        visit(name, ())


def test_compose_daemons_outlast_their_drain_grace(services: dict[str, dict[str, Any]]) -> None:
    daemons = timerd_services(services, "daemon")
    for name, service in daemons.items():
        grace = float(environment(service).get("TIMERD_DRAIN_GRACE_S", Settings().drain_grace_s))
        assert seconds(service["stop_grace_period"]) > grace, name


def test_compose_settings_are_accepted_by_timerd(services: dict[str, dict[str, Any]]) -> None:
    for role in ("api", "daemon"):
        for name, service in timerd_services(services, role).items():
            env = {
                k: v
                for k, v in environment(service).items()
                if k in SETTING_NAMES and "$" not in v  # ${…} is filled in by compose
            }
            build_settings(None, env)  # raises ConfigError naming a bad value
            assert env, name


# ---------------------------------------------------------------------------------------------
# nginx.conf


def upstream_servers(conf: str) -> list[list[str]]:
    """The arguments of each `server` of the upstream, address first."""
    (block,) = re.findall(r"upstream\s+timerd_api\s*\{(.*?)\}", conf, re.DOTALL)
    return [args.split() for args in re.findall(r"^\s*server\s+([^;]+);", block, re.MULTILINE)]


def directives(conf: str, name: str) -> list[str]:
    """The arguments of every `name …;` directive, comments left out."""
    text = re.sub(r"#[^\n]*", "", conf)
    return [m.strip() for m in re.findall(rf"(?<![\w$]){name}\s+([^;{{]*);", text)]


def test_nginx_balances_over_every_api_replica(services: dict[str, dict[str, Any]]) -> None:
    conf = NGINX_CONF.read_text()
    api = timerd_services(services, "api")
    assert sorted(s[0] for s in upstream_servers(conf)) == sorted(
        f"{name}:{API_PORT}" for name in api
    )
    assert directives(conf, "proxy_pass") == ["http://timerd_api"]
    ((_, lb),) = load_balancers(services).items()
    assert f"./{NGINX_CONF.name}:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    (listen,) = directives(conf, "listen")
    assert any(str(port).endswith(f":{listen}") for port in lb["ports"])


def test_nginx_is_health_aware_and_passes_bodies_and_timerd_errors_through() -> None:
    conf = NGINX_CONF.read_text()
    servers = upstream_servers(conf)
    assert servers
    for server in servers:  # a replica that fails is set aside for a while
        assert any(arg.startswith("max_fails=") for arg in server), server
    # Only connection errors and timeouts go to the next replica: timerd's own error answers
    # (JSON, with Retry-After for 503) reach the client unchanged.
    (next_upstream,) = directives(conf, "proxy_next_upstream")
    assert set(next_upstream.split()) <= {"error", "timeout"}
    assert "non_idempotent" not in conf  # a POST already sent is never sent twice
    assert directives(conf, "proxy_intercept_errors") in ([], ["off"])
    assert directives(conf, "proxy_pass_request_body") in ([], ["on"])
    assert directives(conf, "proxy_request_buffering") in ([], ["on"])
    # timerd, not nginx, answers an oversized body, with its own JSON 413
    (body_limit,) = directives(conf, "client_max_body_size")
    assert size_bytes(body_limit) > MAX_BODY_BYTES
    # nginx's own errors (no replica reachable, timeout) speak timerd's JSON error shape
    for status in ("502", "504"):
        ((page,),) = [args.split()[1:] for args in directives(conf, "error_page") if status in args]
        answer = re.search(
            rf"location = {re.escape(page)}\s*\{{.*?return {status} '(.*?)';", conf, re.DOTALL
        )
        assert answer, status
        assert set(json.loads(answer[1].replace("\\n", ""))["error"]) >= {"code", "message"}


def test_nginx_cuts_off_slow_and_oversized_clients_before_timerd() -> None:
    conf = NGINX_CONF.read_text()
    for name in ("client_header_timeout", "client_body_timeout", "send_timeout"):
        (timeout,) = directives(conf, name)
        assert 0 < seconds(timeout) <= 30, (name, timeout)
    # one request line or header line at most a buffer; timerd bounds the whole head itself
    (buffers,) = directives(conf, "large_client_header_buffers")
    _, size = buffers.split()
    assert size_bytes(size) <= Settings().max_request_head_bytes
    ((page,),) = [args.split()[-1:] for args in directives(conf, "error_page") if "494" in args]
    answer = re.search(
        rf"location = {re.escape(page)}\s*\{{.*?return 431 '(.*?)';", conf, re.DOTALL
    )
    assert answer
    assert json.loads(answer[1].replace("\\n", ""))["error"]["code"] == "headers_too_large"


def nginx_binary() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    # Debian puts nginx in /usr/sbin, which a non-root PATH often lacks.
    return next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def test_nginx_accepts_the_config(services: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed: `nginx -t` cannot check deploy/nginx.conf")
    conf = NGINX_CONF.read_text()
    for name in timerd_services(services, "api"):  # compose's names do not resolve here
        conf = re.sub(rf"\bserver\s+{re.escape(name)}:", "server 127.0.0.1:", conf)
    # Temporary files inside tmp_path, so the check needs neither root nor /var/lib/nginx.
    temp = "".join(
        f"    {kind}_temp_path {tmp_path / kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = conf.replace("http {\n", "http {\n" + temp, 1)
    copy = tmp_path / "nginx.conf"
    copy.write_text(conf)
    result = subprocess.run(
        [nginx, "-t", "-p", str(tmp_path), "-c", str(copy), "-g", f"pid {tmp_path}/nginx.pid;"],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of deploy/k8s by (kind, name), the kustomization left out."""
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml(path):
            if doc["kind"] == "Kustomization":
                continue
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} is defined twice"
            objects[key] = doc
    return objects


def of_kind(k8s: dict[tuple[str, str], dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for (k, _), obj in k8s.items() if k == kind]


def deployment(k8s: dict[tuple[str, str], dict[str, Any]], role: str) -> dict[str, Any]:
    """The Deployment whose container runs `timerd ROLE`."""
    (found,) = [d for d in of_kind(k8s, "Deployment") if containers(d)[0]["args"][0] == role]
    return found


def containers(deploy: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = deploy["spec"]["template"]["spec"]["containers"]
    return found


def pod_labels(deploy: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deploy["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def config_value(k8s: dict[tuple[str, str], dict[str, Any]], name: str) -> str | None:
    for cm in of_kind(k8s, "ConfigMap"):
        if name in cm.get("data", {}):
            return str(cm["data"][name])
    return None


def container_port(container: dict[str, Any], port: str | int) -> int:
    """The port number a probe or Service means by a port name or number."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def test_the_kustomization_applies_every_manifest(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert ("Namespace", kustomization["namespace"]) in k8s
    images = {c["image"].split(":")[0] for d in of_kind(k8s, "Deployment") for c in containers(d)}
    assert images <= {image["name"] for image in kustomization.get("images", [])}


def test_k8s_api_deployment_has_three_replicas_and_probes(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    api = deployment(k8s, "api")
    assert api["spec"]["replicas"] == 3
    (container,) = containers(api)
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    port = int(config_value(k8s, "TIMERD_PORT") or API_PORT)
    assert_probes(container, port)


def assert_probes(container: dict[str, Any], port: int) -> None:
    """Readiness asks /readyz (the store answers), liveness /healthz, both on `port`."""
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert container_port(container, get["port"]) == port, probe


def test_k8s_daemon_deployment_has_two_replicas_that_outlast_their_drain(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    daemon = deployment(k8s, "daemon")
    assert daemon["spec"]["replicas"] == 2
    grace = float(config_value(k8s, "TIMERD_DRAIN_GRACE_S") or Settings().drain_grace_s)
    assert daemon["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace
    # one daemon replaced at a time: the other holds or takes the lease meanwhile
    assert daemon["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    (container,) = containers(daemon)
    args = container["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"  # its probe port, for kubelet
    assert_probes(container, int(config_value(k8s, "TIMERD_METRICS_PORT") or 0))


@pytest.mark.parametrize("role", ["api", "daemon"])
def test_k8s_pods_run_as_the_images_non_root_user_unprivileged(
    k8s: dict[tuple[str, str], dict[str, Any]], role: str
) -> None:
    deploy = deployment(k8s, role)
    assert selects(deploy["spec"]["selector"]["matchLabels"], pod_labels(deploy))
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_uid() != 0
    assert pod.get("automountServiceAccountToken") is False
    for container in containers(deploy):
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security.get("privileged", False) is False
        assert "ALL" in security["capabilities"]["drop"]
        assert not security["capabilities"].get("add")
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        assert "memory" in container["resources"]["limits"]


def test_k8s_service_selects_the_api_pods_only(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    api = deployment(k8s, "api")
    daemon = deployment(k8s, "daemon")
    (service,) = of_kind(k8s, "Service")
    selector = service["spec"]["selector"]
    assert selects(selector, pod_labels(api))
    assert not selects(selector, pod_labels(daemon))
    (container,) = containers(api)
    for port in service["spec"]["ports"]:
        assert container_port(container, port["targetPort"]) == API_PORT


def test_k8s_config_maps_and_secrets_the_pods_name_exist(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    def references(pod: dict[str, Any]) -> Iterator[tuple[str, str, bool]]:
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in source:
                        ref = source[key]
                        yield kind, ref["name"], ref.get("optional", False)
            for var in container.get("env", []):
                value_from = var.get("valueFrom", {})
                for key, kind in (("configMapKeyRef", "ConfigMap"), ("secretKeyRef", "Secret")):
                    if key in value_from:
                        ref = value_from[key]
                        yield kind, ref["name"], ref.get("optional", False)
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                yield "ConfigMap", volume["configMap"]["name"], False
            if "secret" in volume:
                yield "Secret", volume["secret"]["secretName"], False

    for role in ("api", "daemon"):
        refs = list(references(deployment(k8s, role)["spec"]["template"]["spec"]))
        assert {kind for kind, _, _ in refs} == {"ConfigMap", "Secret"}, role
        for kind, name, optional in refs:
            assert optional or (kind, name) in k8s, f"{role} names the missing {kind} {name}"


def test_k8s_disruption_budgets_keep_two_api_pods_and_one_daemon(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    budgets = of_kind(k8s, "PodDisruptionBudget")
    wanted = {"api": 2, "daemon": 1}
    assert len(budgets) == len(wanted)
    for role, min_available in wanted.items():
        deploy = deployment(k8s, role)
        (budget,) = [
            b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], pod_labels(deploy))
        ]
        assert budget["spec"]["minAvailable"] == min_available, role
        assert min_available < deploy["spec"]["replicas"], f"{role}: drains would be blocked"
        others = [d for d in of_kind(k8s, "Deployment") if d is not deploy]
        assert not any(
            selects(budget["spec"]["selector"]["matchLabels"], pod_labels(d)) for d in others
        )


def test_k8s_settings_are_accepted_and_the_secret_ships_no_usable_signing_secret(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (config,) = of_kind(k8s, "ConfigMap")
    assert config["data"]["TIMERD_AUTH"] == "none"
    build_settings(None, {k: str(v) for k, v in config["data"].items() if k in SETTING_NAMES})
    (secret,) = of_kind(k8s, "Secret")
    values = secret["stringData"]
    assert urlsplit(values["TIMERD_STORE"]).scheme == "mongodb"
    # A placeholder that timerd accepted would sign every webhook with a published secret.
    with pytest.raises(ConfigError, match="TIMERD_SIGNING_SECRET"):
        Signer.from_setting(values["TIMERD_SIGNING_SECRET"])


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, `(INSTRUCTION, arguments)`, one list per stage."""
    text = re.sub(r"^\s*#.*\n", "", DOCKERFILE.read_text(), flags=re.MULTILINE)
    text = re.sub(r"\\\n", " ", text)  # line continuations
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        if not line.strip():
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages[1:]  # stages[0] holds the ARGs before the first FROM


def final_stage() -> dict[str, list[str]]:
    instructions: dict[str, list[str]] = {}
    for instruction, args in dockerfile_stages()[-1]:
        instructions.setdefault(instruction, []).append(args)
    return instructions


def image_uid() -> int:
    (user,) = final_stage()["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit(), "USER must be numeric, so that Kubernetes can check runAsNonRoot"
    return int(uid)


def test_the_image_runs_timerd_as_a_fixed_non_root_user() -> None:
    final = final_stage()
    assert image_uid() != 0
    assert json.loads(final["ENTRYPOINT"][-1]) == ["timerd"]
    cmd = json.loads(final["CMD"][-1])
    assert cmd[0] == "run"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert str(API_PORT) in final["EXPOSE"][-1].split()
    assert "/var/lib/timerd" in " ".join(final["VOLUME"])
    assert "TIMERD_STORE=sqlite:////var/lib/timerd/timerd.db" in " ".join(final["ENV"]).split()


def test_the_image_is_built_in_stages_without_compilers_in_the_final_one() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = final_stage()
    assert any(args.startswith("--from=") for args in final["COPY"])
    assert "timerd-*.whl" in " ".join(args for _, args in stages[0])  # installs the built wheel
    final_runs = " ".join(final.get("RUN", []))
    for tool in ("gcc", "build-essential", "apt-get install", "pip install"):
        assert tool not in final_runs


def healthcheck_code() -> str:
    (healthcheck,) = final_stage()["HEALTHCHECK"]
    argv = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert argv[:2] == ["python", "-c"]
    code: str = argv[2]
    assert "/healthz" in code
    return code


def test_the_image_healthcheck_passes_on_a_live_api_or_daemon_and_fails_without(
    tmp_path: Path,
) -> None:
    def check(api_port: int, metrics_port: int) -> int:
        env = {"TIMERD_PORT": str(api_port), "TIMERD_METRICS_PORT": str(metrics_port)}
        return subprocess.run(
            [sys.executable, "-c", healthcheck_code()],
            env=timerd_env(env),
            capture_output=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        ).returncode

    nothing = free_port()
    assert check(nothing, nothing) != 0
    store = f"sqlite:///{tmp_path / 'timerd.db'}"
    with TimerdProcesses(tmp_path) as procs:
        api = procs.start("api", store)
        daemon = procs.start("daemon", store)  # its port is its probe (metrics) port
        assert check(api.port, nothing) == 0
        assert check(nothing, daemon.port) == 0


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(relative: str) -> bool:
    """Whether .dockerignore leaves `relative` (or a folder above it) out of the build context."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    spans = ["/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    for line in dockerignore_patterns():
        assert not line.startswith("!"), "exceptions are not modelled here"
        pattern = line.strip("/")
        if pattern.startswith("**/"):  # at any depth
            if any(fnmatch.fnmatch(span, pattern.removeprefix("**/")) for span in spans):
                return True
        elif any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            return True
    return False


def test_the_build_context_holds_what_the_dockerfile_copies() -> None:
    copied = [
        source
        for stage in dockerfile_stages()
        for instruction, args in stage
        if instruction == "COPY" and not args.startswith("--from=")
        for source in args.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f".dockerignore leaves out {source}"
    for left_out in (".venv", ".git", "timerd.db", ".mypy_cache", "timerd/__pycache__"):
        assert dockerignored(left_out), left_out
