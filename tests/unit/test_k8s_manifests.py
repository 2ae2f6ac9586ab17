"""deploy/k8s: each kustomization renders with `kubectl kustomize`, every object it
renders is valid against the Kubernetes JSON schemas (kubernetes-validate, strict), and
the manifests agree with the code they run.

What "agree" means, checked per Deployment with inkling's own parser and loaders
(not with copies of their defaults):

- the container's args are an `inkling` command line (`inkling.cli.build_parser`), its
  role the Deployment's component;
- the settings that process would load (flags > the container's INKLING_* variables >
  the inkling.toml of the ConfigMap mounted at INKLING_CONFIG > defaults; the loaders
  refuse unknown keys) bind every interface on the declared gRPC port; every probe
  targets a declared port, the gRPC ones the app's health service name;
  terminationGracePeriodSeconds covers the preStop sleep and the SIGTERM drain;
- the metrics endpoint is where the Prometheus annotations and the port say;
- the data directory and the model registry lie on the inkling-data claim; every file
  [security] names is mounted from a Secret or ConfigMap key; with Redis ACLs on, the
  pod's init container provides the passwords of the roles the process connects as;
- every HorizontalPodAutoscaler, PodDisruptionBudget and Service selects an existing
  Deployment; every ConfigMap, Secret and claim a pod uses is rendered, or is a Secret
  the README's "Kubernetes" section tells the operator to create.

kubectl is required: without it the tests fail and say so (CI machines have it).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tomllib
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from events_server.admin import admin_allowed
from events_server.settings import EventsSettings
from inkling.cli import build_parser
from inkling.config import PROJECT_ROOT, load_settings
from inkling.redis_acl import SERVE_ROLES, AclFiles, connect_as
from inkling.serving.security import SecuritySettings
from inkling.serving.settings import RankingSettings, RetrievalSettings, load_server_settings
from inkling.telemetry.providers import DEFAULT_METRICS_PORTS
from inkling.telemetry.settings import load_telemetry_settings
from stream_worker.settings import load_worker_settings

K8S = PROJECT_ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "production": K8S / "overlays" / "production"}
K8S_VERSIONS = ("1.30.0", "1.37.0")
"""The oldest Kubernetes the manifests target (gRPC probes are GA since 1.27) and the
newest one whose schemas kubernetes-validate ships."""
KUBECTL_TIMEOUT_S = 120
DATA_CLAIM = "inkling-data"
SERVER_CLASSES: dict[str, type[Any]] = {
    "retrieval": RetrievalSettings,
    "ranking": RankingSettings,
    "events": EventsSettings,
}
HEALTH_SERVICES = {
    "retrieval": "inkling.v1.RetrievalService",
    "ranking": "inkling.v1.RankingService",
    "events": "inkling.v1.EventService",
}
"""The names each app registers (`App.service_names`, checked against the apps below);
its health service answers for them and for ""."""
ROLES = (*SERVER_CLASSES, "worker")
README = PROJECT_ROOT / "README.md"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"


def _kubectl() -> str:
    found = shutil.which("kubectl") or next(
        (p for p in ("/usr/local/bin/kubectl", "/usr/bin/kubectl") if os.access(p, os.X_OK)),
        None,
    )
    if found is None:
        pytest.fail(
            "kubectl is not installed: these tests render deploy/k8s with `kubectl kustomize` "
            "(install kubectl 1.27 or later; CI machines have it)",
            pytrace=False,
        )
    return found


@functools.cache
def _render(name: str) -> tuple[dict[str, Any], ...]:
    try:
        out = subprocess.run(
            [_kubectl(), "kustomize", str(KUSTOMIZATIONS[name])],
            capture_output=True,
            text=True,
            timeout=KUBECTL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"kubectl kustomize {name} took over {KUBECTL_TIMEOUT_S} s", pytrace=False)
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize {name} failed:\n{out.stderr}", pytrace=False)
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, tuple[dict[str, Any], ...]]:
    return request.param, _render(request.param)


def _of(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any] | None:
    return next((o for o in _of(objects, kind) if o["metadata"]["name"] == name), None)


def _component(deployment: dict[str, Any]) -> str:
    return str(deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def _main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: one container per pod"
    return dict(containers[0])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- rendering and schemas ---------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(
    rendered: tuple[str, tuple[dict[str, Any], ...]], version: str
) -> None:
    name, objects = rendered
    problems = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.path)
            problems.append(f"{obj['kind']}/{obj['metadata']['name']} at {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: {e}")
    assert problems == [], f"{name} against Kubernetes {version}"


def test_each_role_is_deployed_with_what_it_needs(
    rendered: tuple[str, tuple[dict[str, Any], ...]],
) -> None:
    _, objects = rendered
    deployments = {_component(d): d for d in _of(objects, "Deployment")}
    assert sorted(deployments) == sorted(ROLES)
    autoscaled = {
        h["spec"]["scaleTargetRef"]["name"] for h in _of(objects, "HorizontalPodAutoscaler")
    }
    servers = {deployments[r]["metadata"]["name"] for r in SERVER_CLASSES}
    assert autoscaled == servers  # the worker count is bounded by partitions, not CPU
    for role, deployment in deployments.items():
        if deployment["metadata"]["name"] in autoscaled:
            # A replicas field would reset the autoscaler's count on every apply.
            assert "replicas" not in deployment["spec"], role
        hpa = next(
            (h for h in _of(objects, "HorizontalPodAutoscaler")
             if h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]),
            None,
        )  # fmt: skip
        if hpa is not None:
            metrics = hpa["spec"]["metrics"]
            assert [m["resource"]["name"] for m in metrics] == ["cpu"], role
            assert 1 < hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], role
        # Requests and limits both set, requests within limits.
        resources = _main_container(deployment)["resources"]
        for what in ("cpu", "memory"):
            request = _quantity(resources["requests"][what])
            limit = _quantity(resources["limits"][what])
            assert 0 < request <= limit, f"{role} {what}: request {request} > limit {limit}"
    claims = _of(objects, "PersistentVolumeClaim")
    assert [c["metadata"]["name"] for c in claims] == [DATA_CLAIM]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteMany"]


_UNITS = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "": 1.0}


def _quantity(value: str | int | float) -> float:
    match = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|)", str(value))
    assert match is not None, f"unexpected quantity {value!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


# -- the containers against the code -----------------------------------------------------


def _parsed_args(deployment: dict[str, Any]) -> Any:
    container = _main_container(deployment)
    # The image's entrypoint is `inkling` (Dockerfile): a command here would bypass it.
    assert "command" not in container, deployment["metadata"]["name"]
    try:
        return build_parser().parse_args([str(a) for a in container["args"]])
    except SystemExit:
        pytest.fail(
            f"{deployment['metadata']['name']}: `inkling {' '.join(container['args'])}` is not "
            "an inkling command line",
            pytrace=False,
        )


def test_container_args_name_a_real_inkling_subcommand_for_the_role(
    rendered: tuple[str, tuple[dict[str, Any], ...]],
) -> None:
    _, objects = rendered
    for deployment in _of(objects, "Deployment"):
        role = _component(deployment)
        args = _parsed_args(deployment)
        if role == "worker":
            assert args.command == "worker"
        else:
            assert (args.command, args.role) == ("serve", role)


class Pod:
    """One Deployment's pod, and the settings its process would load."""

    def __init__(self, objects: tuple[dict[str, Any], ...], deployment: dict[str, Any], tmp: Path):
        self.objects = objects
        self.name = deployment["metadata"]["name"]
        self.role = _component(deployment)
        self.spec = deployment["spec"]["template"]["spec"]
        self.annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        self.container = _main_container(deployment)
        self.args = _parsed_args(deployment)
        env = {}
        for var in self.container.get("env", []):
            assert "valueFrom" not in var, f"{self.name}: {var['name']} should be a file, not env"
            env[var["name"]] = str(var["value"])
        assert "INKLING_CONFIG" in env, f"{self.name}: no INKLING_CONFIG"
        self.toml_text = self.file_text(env["INKLING_CONFIG"])
        self.config_file = tmp / f"{self.name}.toml"
        self.config_file.write_text(self.toml_text)
        self.env = {**env, "INKLING_CONFIG": str(self.config_file)}
        self.settings = load_settings(
            overrides={"data_dir": self.args.data_dir, "redis_address": self.args.redis},
            environ=self.env,
        )
        self.server: Any = None
        self.worker = None
        if self.role == "worker":
            self.worker = load_worker_settings(None, None, self.env)
        if self.role in SERVER_CLASSES:
            overrides = {
                "host": self.args.host,
                "port": self.args.port,
                "workers": self.args.workers,
                "grace_s": self.args.grace_s,
            }
            if self.role == "ranking":
                overrides["retrieval_address"] = self.args.retrieval_address
            self.server = load_server_settings(
                SERVER_CLASSES[self.role], self.role, None, overrides, self.env
            )
        self.telemetry = load_telemetry_settings(None, environ=self.env)
        self.security = self.load_security(tmp)

    def ports(self) -> dict[str, int]:
        return {p["name"]: int(p["containerPort"]) for p in self.container.get("ports", [])}

    def mount_for(self, path: str, container: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """The volume mount (and its volume) that `path` lies in: the deepest one."""
        container = container or self.container
        target = PurePosixPath(path)
        best = None
        for mount in container.get("volumeMounts", []):
            root = PurePosixPath(mount["mountPath"])
            if (target == root or root in target.parents) and (
                best is None or len(root.parts) > len(PurePosixPath(best["mountPath"]).parts)
            ):
                best = mount
        assert best is not None, f"{self.name}: nothing is mounted where {path} lies"
        volume = next(v for v in self.spec["volumes"] if v["name"] == best["name"])
        return best, volume

    def file_text(self, path: str) -> str:
        """A file the pod reads from a rendered ConfigMap."""
        mount, volume = self.mount_for(path)
        assert "configMap" in volume, f"{self.name}: {path} is not from a ConfigMap"
        config_map = _named(self.objects, "ConfigMap", volume["configMap"]["name"])
        assert config_map is not None, f"{self.name}: ConfigMap {volume['configMap']['name']}"
        key = str(PurePosixPath(path).relative_to(mount["mountPath"]))
        assert key in config_map["data"], f"{self.name}: {path}: no key {key}"
        return str(config_map["data"][key])

    def provided_file(self, path: str) -> bool:
        """Whether `path` is a key of a Secret or ConfigMap volume (items listed)."""
        mount, volume = self.mount_for(path)
        relative = str(PurePosixPath(path).relative_to(mount["mountPath"]))
        for kind in ("secret", "configMap"):
            if kind in volume:
                items = volume[kind].get("items")
                if items is not None:
                    return relative in {i["path"] for i in items}
                if kind == "configMap":
                    cm = _named(self.objects, "ConfigMap", volume["configMap"]["name"])
                    return cm is not None and relative in cm["data"]
        return False

    def load_security(self, tmp: Path) -> SecuritySettings:
        """[security] as this process loads it, each file it names stood in for by an
        empty one (after checking that the pod mounts it), since the loader checks
        that the files exist."""
        table = tomllib.loads(self.toml_text).get("security", {})
        path_fields = [f.name for f in fields(SecuritySettings) if "Path" in str(f.type)]
        env = dict(self.env)
        self.security_files: dict[str, str] = {}
        for name in path_fields:
            value = env.get(f"INKLING_SECURITY_{name.upper()}") or table.get(name)
            if not value:
                continue
            self.security_files[name] = str(value)
            stand_in = tmp / f"{self.name}-{name}"
            stand_in.write_text("")
            env[f"INKLING_SECURITY_{name.upper()}"] = str(stand_in)
        return load_server_settings(SecuritySettings, "security", None, None, env)


def _pods(objects: tuple[dict[str, Any], ...], tmp: Path) -> dict[str, Pod]:
    return {p.role: p for p in (Pod(objects, d, tmp) for d in _of(objects, "Deployment"))}


def _probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        kind: container[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


def _flag(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_servers_listen_where_the_ports_services_and_probes_say(
    rendered: tuple[str, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    _, objects = rendered
    pods = _pods(objects, tmp_path)
    for role in SERVER_CLASSES:
        pod, rs = pods[role], pods[role].server
        assert rs.host == "0.0.0.0", f"{role} binds {rs.host}: probes and Services cannot reach it"
        assert rs.workers == 1, f"{role}: one process per pod (each its own metrics port)"
        assert pod.ports()["grpc"] == rs.port, role
        probes = _probes(pod.container)
        assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}, role
        for kind, probe in probes.items():
            if "grpc" in probe:
                assert probe["grpc"]["port"] == rs.port, f"{role} {kind}"
                assert probe["grpc"].get("service", "") in ("", HEALTH_SERVICES[role])
                assert not pod.security.tls, f"{role} {kind}: the kubelet's gRPC probe is plaintext"
            else:
                command = [str(c) for c in probe["exec"]["command"]]
                assert _flag(command, "--port") == str(rs.port), f"{role} {kind}"
                assert _flag(command, "--service") == HEALTH_SERVICES[role], f"{role} {kind}"
                script = command[1]
                assert pod.provided_file(script), f"{role} {kind}: {script} is not mounted"
                ca = _flag(command, "--ca-file")
                assert ca is not None and pod.provided_file(ca), f"{role} {kind}: CA {ca}"
        service = _named(objects, "Service", f"inkling-{role}")
        assert service is not None, role
        assert _selects(service["spec"]["selector"], pod_labels(objects, pod.name))
        (port,) = service["spec"]["ports"]
        assert port["port"] == rs.port and port["targetPort"] in ("grpc", rs.port), role


def pod_labels(objects: tuple[dict[str, Any], ...], deployment: str) -> dict[str, str]:
    found = _named(objects, "Deployment", deployment)
    assert found is not None, deployment
    return dict(found["spec"]["template"]["metadata"]["labels"])


def test_the_health_service_names_are_the_apps() -> None:
    from events_server.app import EventsApp
    from ranking_server.app import RankingApp
    from retrieval_server.app import RetrievalApp

    apps = {"retrieval": RetrievalApp, "ranking": RankingApp, "events": EventsApp}
    for role, app in apps.items():
        assert HEALTH_SERVICES[role] in app.service_names, role


def test_termination_grace_covers_the_prestop_sleep_and_the_drain(
    rendered: tuple[str, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    _, objects = rendered
    for role, pod in _pods(objects, tmp_path).items():
        period = pod.spec["terminationGracePeriodSeconds"]
        if pod.server is None:
            continue  # a worker has no drain setting (worker.yaml says what its stop does)
        pre_stop = pod.container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep", role
        sleep_s = float(pre_stop[1])
        assert sleep_s > 0, role
        assert period >= sleep_s + pod.server.grace_s + 5, (
            f"{role}: {period} s < preStop {sleep_s} s + grace_s {pod.server.grace_s} s + 5 s "
            "to close"
        )


def test_metrics_are_served_where_prometheus_is_told_to_scrape(
    rendered: tuple[str, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    _, objects = rendered
    for role, pod in _pods(objects, tmp_path).items():
        assert pod.telemetry.enabled, f"{role}: telemetry off means no /metrics"
        port = pod.args.metrics_port
        if port is None:
            port = pod.telemetry.metrics_port
        if port is None:
            port = DEFAULT_METRICS_PORTS[role]
        host = pod.telemetry.metrics_host or (pod.server.host if pod.server else "127.0.0.1")
        assert host == "0.0.0.0", f"{role}: /metrics on {host} cannot be scraped"
        assert pod.ports()["metrics"] == port, role
        assert pod.annotations["prometheus.io/scrape"] == "true", role
        assert pod.annotations["prometheus.io/port"] == str(port), role
        assert pod.annotations["prometheus.io/path"] == "/metrics", role
        if pod.server is None:  # the worker's probes are on its metrics endpoint
            probes = _probes(pod.container)
            assert set(probes) == {"startupProbe", "livenessProbe"}, role
            for kind, probe in probes.items():
                assert probe["httpGet"]["port"] == port, f"{role} {kind}"
                assert probe["httpGet"]["path"] == "/metrics", f"{role} {kind}"


def test_each_component_is_a_job_the_alerts_know() -> None:
    # The alerts and the dashboard tell services apart by job (inkling-<role>); the
    # README's scrape example makes the job from the component label.
    config = yaml.safe_load((PROJECT_ROOT / "deploy/observability/prometheus.yml").read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    for name in KUSTOMIZATIONS:
        components = {_component(d) for d in _of(_render(name), "Deployment")}
        assert {f"inkling-{c}" for c in components} == jobs, name


def test_the_bus_partitions_agree(
    rendered: tuple[str, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    _, objects = rendered
    pods = _pods(objects, tmp_path)
    worker = pods["worker"].worker
    assert worker is not None
    assert pods["events"].server.partitions == worker.partitions
    assert pods["ranking"].server.bus_partitions == worker.partitions
    replicas = _named(objects, "Deployment", "inkling-worker")["spec"]["replicas"]  # type: ignore[index]
    assert 1 <= replicas <= worker.partitions, "a worker beyond the partitions owns nothing"


def test_ranking_finds_retrieval_through_its_service(
    rendered: tuple[str, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    _, objects = rendered
    pods = _pods(objects, tmp_path)
    host, _, port = pods["ranking"].server.retrieval_address.rpartition(":")
    service = _named(objects, "Service", host.split(".")[0])
    assert service is not None, f"no Service {host}"
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert _selects(service["spec"]["selector"], pod_labels(objects, "inkling-retrieval"))
    assert int(port) == pods["retrieval"].server.port


def test_data_and_registry_live_on_the_shared_claim(
    rendered: tuple[str, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    _, objects = rendered
    for role, pod in _pods(objects, tmp_path).items():
        writes = role == "worker" or (role == "events" and admin_allowed(pod.security.allow))
        needs = writes or role in ("retrieval", "ranking")
        data_dir = str(pod.settings.data_dir)
        if not needs:
            continue
        mount, volume = pod.mount_for(data_dir)
        assert volume.get("persistentVolumeClaim", {}).get("claimName") == DATA_CLAIM, role
        assert mount["mountPath"] == data_dir, role
        assert bool(mount.get("readOnly")) is not writes, f"{role}: read-only is {not writes}"
        if pod.server is not None and hasattr(pod.server, "registry_dir"):
            registry = str(pod.server.registry_dir or pod.settings.data_dir / "registry")
            _, volume = pod.mount_for(registry)
            assert volume.get("persistentVolumeClaim", {}).get("claimName") == DATA_CLAIM, role


def test_every_file_security_names_is_mounted(
    rendered: tuple[str, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    _, objects = rendered
    for role, pod in _pods(objects, tmp_path).items():
        for name, path in pod.security_files.items():
            assert pod.provided_file(path), f"{role}: [security] {name} = {path} is not mounted"
        if pod.server is not None and pod.security.pseudonymising:
            # Unset, a server would make a random key under the data directory
            # (inkling/pseudonym.py, `configured`): ingest and ranking must share one key,
            # from a Secret, and nothing may be written to a read-only volume.
            assert pod.security.pseudonym_keys_file is not None, role


def _redis_roles(pod: Pod) -> set[str]:
    if pod.role == "worker":
        return {"worker"}
    roles = {SERVE_ROLES[pod.role]}
    if pod.role == "events" and admin_allowed(pod.security.allow):
        roles.add("eraser")
    return roles


def _acl_init(pod: Pod) -> tuple[dict[str, Any], dict[str, Any], set[str]]:
    """The init container that writes acl-secrets, the volume it writes into, and the
    Secret keys it is given."""
    redis_dir = str(pod.settings.redis_dir)
    mount, volume = pod.mount_for(redis_dir)
    assert mount["mountPath"] == redis_dir and "emptyDir" in volume, pod.role
    for init in pod.spec.get("initContainers", []):
        written = [m for m in init["volumeMounts"] if m["name"] == volume["name"]]
        if not written:
            continue
        secrets = [
            v for m in init["volumeMounts"] for v in pod.spec["volumes"]
            if v["name"] == m["name"] and "secret" in v
        ]  # fmt: skip
        assert len(secrets) == 1, pod.role
        return init, written[0], {i["key"] for i in secrets[0]["secret"]["items"]}
    pytest.fail(f"{pod.role}: no init container writes {redis_dir}")


def test_redis_acl_gives_each_process_its_own_roles_only(
    rendered: tuple[str, tuple[dict[str, Any], ...]], tmp_path: Path
) -> None:
    name, objects = rendered
    pods = _pods(objects, tmp_path)
    with_acl = {role for role, pod in pods.items() if pod.security.redis_acl}
    assert with_acl in (set(), set(ROLES)), f"{name}: ACLs for some roles only: {with_acl}"
    for role in with_acl:
        _, _, keys = _acl_init(pods[role])
        assert keys == _redis_roles(pods[role]), role


def test_the_acl_init_script_writes_a_file_inkling_accepts(tmp_path: Path) -> None:
    objects = _render("production")
    (tmp_path / "pods").mkdir()
    pods = _pods(objects, tmp_path / "pods")
    for role, pod in pods.items():
        init, written, keys = _acl_init(pod)
        command = init["command"]
        assert command[:2] == ["/bin/sh", "-c"], role
        secret_mount = next(m for m in init["volumeMounts"] if m.get("readOnly"))
        root = tmp_path / role
        # A Secret volume as the kubelet lays it out: keys are links into ..data.
        secrets = root / "secret"
        (secrets / "..2026_01_01").mkdir(parents=True)
        (secrets / "..data").symlink_to("..2026_01_01")
        passwords = {key: f"i{key}0123456789abcdef" for key in keys}
        for key, password in passwords.items():
            (secrets / "..2026_01_01" / key).write_text(password)
            (secrets / key).symlink_to(f"..data/{key}")
        data = root / "data"
        data.mkdir()
        # The memory volume, where the server sees it: <its data_dir>/redis.
        seen_as = root / "seen-as"
        (seen_as / "redis").mkdir(parents=True)
        script = (
            command[2]
            .replace("/data", str(data))
            .replace(secret_mount["mountPath"], str(secrets))
            .replace(written["mountPath"], str(seen_as / "redis"))
        )
        subprocess.run(["/bin/sh", "-c", script], check=True, timeout=30)
        assert (data / "redis").is_dir(), role  # the mount point of the server's emptyDir
        # What the server process then does: read it (mode 0600 or refused) and connect
        # to Redis as each of its roles.
        assert AclFiles(seen_as / "redis").passwords() == passwords, role
        settings = pod.settings.__class__(data_dir=seen_as, redis_address="redis:6379")
        for key in keys:
            address = connect_as(settings, key, pod.security).redis_address
            assert address == f"redis:6379,username={key},password={passwords[key]}", role


# -- references --------------------------------------------------------------------------


def _readme_kubernetes_section() -> str:
    text = README.read_text()
    match = re.search(r"^## Kubernetes\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match is not None, "README has no '## Kubernetes' section"
    return match.group(1)


def test_every_configmap_secret_and_claim_used_exists_or_is_documented(
    rendered: tuple[str, tuple[dict[str, Any], ...]],
) -> None:
    name, objects = rendered
    documented = _readme_kubernetes_section()
    for deployment in _of(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        where = deployment["metadata"]["name"]
        assert _named(objects, "ServiceAccount", spec["serviceAccountName"]) is not None
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert _named(objects, "ConfigMap", volume["configMap"]["name"]), where
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                assert _named(objects, "PersistentVolumeClaim", claim), where
            elif "secret" in volume:
                secret = volume["secret"]["secretName"]
                assert volume["secret"].get("optional") is not True, f"{where}: {secret}"
                if _named(objects, "Secret", secret) is None:
                    assert f"`{secret}`" in documented, (
                        f"{name}: {where} mounts Secret {secret}, which is neither rendered nor "
                        "listed in the README's Kubernetes section"
                    )
                    for item in volume["secret"]["items"]:
                        assert f"`{item['key']}`" in documented, f"{secret} key {item['key']}"
            else:
                assert "emptyDir" in volume, f"{where}: volume {volume['name']}"
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            assert "envFrom" not in container, where
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= {v["name"] for v in spec.get("volumes", [])}, where


def test_autoscalers_budgets_and_services_select_existing_deployments(
    rendered: tuple[str, tuple[dict[str, Any], ...]],
) -> None:
    _, objects = rendered
    templates = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in _of(objects, "Deployment")
    }
    for d in _of(objects, "Deployment"):
        assert _selects(d["spec"]["selector"]["matchLabels"], templates[d["metadata"]["name"]])
    for hpa in _of(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
        assert target["name"] in templates, hpa["metadata"]["name"]
    budgeted = set()
    for pdb in _of(objects, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        chosen = [n for n, labels in templates.items() if _selects(selector, labels)]
        assert len(chosen) == 1, f"{pdb['metadata']['name']} selects {chosen}"
        budgeted.update(chosen)
    assert budgeted == set(templates), "every Deployment has a PodDisruptionBudget"
    for service in _of(objects, "Service"):
        chosen = [
            n for n, labels in templates.items() if _selects(service["spec"]["selector"], labels)
        ]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {chosen}"


# -- the two settings files and the image ------------------------------------------------


def test_production_settings_are_the_base_plus_security() -> None:
    base = tomllib.loads((KUSTOMIZATIONS["base"] / "inkling.toml").read_text())
    production = tomllib.loads((KUSTOMIZATIONS["production"] / "inkling.toml").read_text())
    assert "security" not in base
    assert "security" in production
    production.pop("security")
    assert production == base


def test_the_dockerfile_builds_what_the_manifests_run() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) >= 2 and all(f == "${PYTHON_IMAGE}" for f in froms), "multi-stage, one base"
    assert re.search(
        r'--index-url https://download\.pytorch\.org/whl/cpu "torch==2\.13\.0"', text
    ), "CPU torch 2.13.0 from PyTorch's CPU index"
    user = re.findall(r"^USER (\d+):(\d+)$", text, re.M)
    assert user and user[-1][0] != "0", "a numeric, non-root user"
    assert re.search(r'^ENTRYPOINT \["inkling"\]$', text, re.M)
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M)
    sources = {s for line in copied for s in line.split()}
    assert not any(s.startswith("data") for s in sources), "no data baked into the image"
    assert "data/" in DOCKERIGNORE.read_text().split(), ".dockerignore keeps data/ out"
    repo = re.search(r"INKLING_FEATURE_REPO=(\S+)", text)
    assert repo is not None and f"COPY feature_repo {repo.group(1)}" in text
    for name, _ in KUSTOMIZATIONS.items():
        for deployment in _of(_render(name), "Deployment"):
            spec = deployment["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsUser"] == int(user[-1][0])
            assert spec["securityContext"]["runAsNonRoot"] is True
