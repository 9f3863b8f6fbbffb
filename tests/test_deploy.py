"""The files in deploy/: each parses, they agree with the configuration schema and with each
other (ports, paths, environment), and every metric the dashboard and the alert rules use
exists on a running broker's /metrics. Compose and Kubernetes run several brokers of one
consumer group, each on its own volume and ports, every one reachable at the addresses the
workers are given, and the disruption budget lets one go at a time. The push-delivery
examples (docker-compose.push.yml, Dockerfile.push-worker, push_app.py, kubernetes-push/)
give each broker its own pool: they map every application to a worker service that exists,
on the port its worker listens on, and run the pinned push worker.
Docker and kubectl are not run: the files are read as data."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml

from actors import config as configuration
from actors.config import ENV_PREFIX, Config, DeliveryMode
from actors.embedded_kafka import EmbeddedKafka, free_port
from tests import client_venv
from tests.ops_support import (
    NAMESPACE,
    LoadDone,
    RunningBroker,
    put_load,
    running_broker,
    sample,
    scrape,
    settled_families,
    wait_until,
)
from tests.test_push_compat import WORKER_COMMAND

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC_NAME = re.compile(r"\btaskbroker_[a-z0-9_]+\b")


def yaml_documents(relative: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((DEPLOY / relative).read_text()) if d is not None]


def manifests(kind: str, folder: str = "kubernetes") -> list[dict[str, Any]]:
    """Every manifest of `kind` in a folder (a JSON patch file, a list, is none)."""
    return [
        document
        for path in sorted((DEPLOY / folder).glob("*.yaml"))
        for document in yaml_documents(str(path.relative_to(DEPLOY)))
        if isinstance(document, dict) and document.get("kind") == kind
    ]


def kubernetes(kind: str, folder: str = "kubernetes") -> dict[str, Any]:
    found = manifests(kind, folder)
    assert len(found) == 1, f"{len(found)} {kind} manifests in {folder}"
    return found[0]


def compose_service(name: str, file: str = "docker-compose.yml") -> dict[str, Any]:
    service: dict[str, Any] = yaml_documents(file)[0]["services"][name]
    return service


BROKER_BUILD = {"context": "..", "dockerfile": "deploy/Dockerfile"}


def compose_brokers() -> dict[str, dict[str, Any]]:
    """The compose services that run the broker: the broker image with its own command (no
    `command`, no `entrypoint`), by name."""
    services: dict[str, dict[str, Any]] = yaml_documents("docker-compose.yml")[0]["services"]
    builders = [name for name, service in services.items() if "build" in service]
    images = {
        services[name]["image"] for name in builders if services[name]["build"] == BROKER_BUILD
    }
    assert len(images) == 1, f"the broker image is built by {builders}"
    return {
        name: service
        for name, service in services.items()
        if service.get("image") in images and not {"command", "entrypoint"} & service.keys()
    }


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """host port -> container port of a compose service's `ports`."""
    published = {}
    for mapping in service.get("ports", []):
        host, _, container = str(mapping).rpartition(":")
        published[int(host)] = int(container)
    return published


def load_worker() -> ModuleType:
    """deploy/worker.py as a module: its address parser and broker rotation."""
    spec = importlib.util.spec_from_file_location("deploy_worker", DEPLOY / "worker.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def worker_brokers(environment: dict[str, str]) -> list[tuple[str, int]]:
    """(host, port) of every broker a demo worker is given, read as worker.py reads it."""
    addresses: list[str] = load_worker().parse_brokers(environment["WORKER_BROKERS"])
    assert len(set(addresses)) == len(addresses), addresses
    return [(host, int(port)) for host, _, port in (a.rpartition(":") for a in addresses)]


def voluntary_disruptions(budget: dict[str, Any], replicas: int) -> int:
    """How many of `replicas` pods a PodDisruptionBudget lets go at once (integer forms)."""
    spec = budget["spec"]
    bound = spec.get("maxUnavailable", spec.get("minAvailable"))
    if not isinstance(bound, int):
        pytest.fail(f"only integer budgets are checked here: {spec}")
    allowed = bound if "maxUnavailable" in spec else replicas - bound
    return max(0, min(allowed, replicas))


class Dockerfile:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""

    def __init__(self, text: str) -> None:
        joined = re.sub(r"\\\n", " ", text)
        self.instructions: list[tuple[str, str]] = []
        for line in joined.splitlines():
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                keyword, _, rest = stripped.partition(" ")
                self.instructions.append((keyword.upper(), rest.strip()))

    def all(self, keyword: str) -> list[str]:
        return [rest for k, rest in self.instructions if k == keyword]

    def final_stage(self) -> Dockerfile:
        last_from = max(i for i, (k, _) in enumerate(self.instructions) if k == "FROM")
        stage = Dockerfile("")
        stage.instructions = self.instructions[last_from:]
        return stage


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile((DEPLOY / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def image_config() -> Config:
    return configuration.load(DEPLOY / "config.toml")


@pytest.fixture(scope="module")
def configmap_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    text = kubernetes("ConfigMap")["data"]["config.toml"]
    path = tmp_path_factory.mktemp("configmap") / "config.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def configmap_config(configmap_path: Path) -> Config:
    return configuration.load(configmap_path)


# --- every file parses --------------------------------------------------------------------------


def test_every_file_in_deploy_parses() -> None:
    checked = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        text = path.read_text()
        if path.suffix in {".yml", ".yaml"}:
            assert yaml_documents(str(path.relative_to(DEPLOY))), path
        elif path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".toml":
            tomllib.loads(text)
        elif path.suffix == ".py":
            compile(text, str(path), "exec")
        elif path.name.split(".")[0] == "Dockerfile":
            assert Dockerfile(text).instructions[0][0] in {"FROM", "ARG"}
        elif path.suffix == ".md":
            assert text.startswith("#"), path
        else:
            pytest.fail(f"{path}: no check for this kind of file")
        checked.append(path.relative_to(DEPLOY))
    assert len(checked) >= 10


# --- the Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_with_a_healthcheck(
    dockerfile: Dockerfile, image_config: Config
) -> None:
    final = dockerfile.final_stage()
    assert final.all("FROM") == ["python:3.11-slim"]
    users = final.all("USER")
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    healthcheck = " ".join(final.all("HEALTHCHECK"))
    assert f"http://127.0.0.1:{image_config.metrics_port}/healthz" in healthcheck
    exposed = {int(port) for line in final.all("EXPOSE") for port in line.split()}
    assert exposed == {image_config.grpc_port, image_config.metrics_port}
    assert final.all("STOPSIGNAL") == ["SIGTERM"]


def test_dockerfile_runs_the_broker_on_the_baked_config_with_the_store_on_a_volume(
    dockerfile: Dockerfile, image_config: Config
) -> None:
    final = dockerfile.final_stage()
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["taskbroker"]
    command = json.loads(final.all("CMD")[-1])
    assert command[:2] == ["run", "--config"]
    config_path = command[2]
    copies = [shlex.split(line) for line in final.all("COPY")]
    assert ["deploy/config.toml", config_path] in [c[-2:] for c in copies]
    volumes = final.all("VOLUME")
    assert [str(PurePosixPath(image_config.db_path).parent)] == volumes
    assert image_config.kafka_cluster  # an image never falls back to the embedded Kafka


# --- compose -------------------------------------------------------------------------------------


def env_config(environment: dict[str, str], base: Path | None = None) -> Config:
    """Loading the TASKBROKER_ variables through the real loader refuses unknown keys."""
    return configuration.load(base, env={k: str(v) for k, v in environment.items()})


def test_compose_broker_environment_ports_and_volume_match_the_config(
    image_config: Config,
) -> None:
    for name, broker in compose_brokers().items():
        environment = broker["environment"]
        assert all(key.startswith(ENV_PREFIX) for key in environment)
        config = env_config(environment, DEPLOY / "config.toml")
        assert config.kafka_cluster == "kafka:9092"
        assert config.kafka_topic == "taskworker"

        container_ports = set(published_ports(broker).values())
        assert container_ports == {config.grpc_port, config.metrics_port}, name
        mounts = {volume.split(":")[1] for volume in broker["volumes"]}
        assert str(PurePosixPath(config.db_path).parent) in mounts, name
        grace_s = _duration_s(broker["stop_grace_period"])
        assert grace_s > (config.shutdown_timeout_ms + config.grpc_shutdown_grace_ms) / 1000
        assert broker["restart"] == "unless-stopped", "a broker comes back on its own file"


def test_compose_runs_several_brokers_of_one_group_each_with_its_own_volume_and_ports() -> None:
    document = yaml_documents("docker-compose.yml")[0]
    brokers = compose_brokers()
    assert len(brokers) >= 2
    assert sorted(brokers) == [f"taskbroker-{ordinal}" for ordinal in range(len(brokers))]
    assert [b.get("build") for b in brokers.values()].count(BROKER_BUILD) == 1  # built once

    configs = {
        name: env_config(broker["environment"], DEPLOY / "config.toml")
        for name, broker in brokers.items()
    }
    assert (
        len({(c.kafka_cluster, c.kafka_topic, c.kafka_consumer_group) for c in configs.values()})
        == 1
    )

    # Each broker's database directory on a named volume of its own, none shared.
    data_volumes = []
    for name, broker in brokers.items():
        data_dir = str(PurePosixPath(configs[name].db_path).parent)
        [source] = [v.split(":")[0] for v in broker["volumes"] if v.split(":")[1] == data_dir]
        assert source in document["volumes"], f"{name}: {source} is not a named volume"
        data_volumes.append(source)
    every_source = [
        v.split(":")[0]
        for service in document["services"].values()
        for v in service.get("volumes", [])
    ]
    for source in data_volumes:
        assert every_source.count(source) == 1, f"{source} is mounted more than once"

    # Host ports: each broker publishes both of its own, and no two services share one.
    host_ports = [port for s in document["services"].values() for port in published_ports(s)]
    assert len(set(host_ports)) == len(host_ports), host_ports
    for name, broker in brokers.items():
        assert len(published_ports(broker)) == 2, name


def test_compose_topic_has_more_partitions_than_brokers() -> None:
    script = " ".join(compose_service("kafka-init")["command"])
    [partitions] = {int(n) for n in re.findall(r"--partitions[ =](\d+)", script)}
    assert partitions > len(compose_brokers())


def test_compose_kafka_topics_workers_and_monitoring_are_wired_together(
    image_config: Config,
) -> None:
    services = yaml_documents("docker-compose.yml")[0]["services"]
    kafka = services["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert "kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"]
    topics_script = " ".join(services["kafka-init"]["command"])
    for topic in (image_config.kafka_topic, image_config.kafka_deadletter_topic):
        assert topic in topics_script

    brokers = compose_brokers()
    worker = services["worker"]
    assert not any(key.startswith(ENV_PREFIX) for key in worker["environment"])
    # Every broker, at its gRPC port inside the compose network, and nothing else.
    assert sorted(worker_brokers(worker["environment"])) == sorted(
        (name, env_config(broker["environment"], DEPLOY / "config.toml").grpc_port)
        for name, broker in brokers.items()
    )
    assert set(worker["depends_on"]) == set(brokers)
    assert worker["deploy"]["replicas"] >= len(brokers)
    assert "/opt/taskbroker/worker.py" in worker["entrypoint"]
    produce = services["demo-tasks"]["command"]
    assert f"--topic={image_config.kafka_topic}" in produce

    prometheus = yaml_documents("prometheus/prometheus.yml")[0]
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{name}:{image_config.metrics_port}" for name in brokers)
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert set(prometheus["rule_files"]) <= mounted

    datasource = yaml_documents("grafana/provisioning/datasources/prometheus.yml")[0]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml_documents("grafana/provisioning/dashboards/taskbroker.yml")[0]
    dashboards_path = provider["providers"][0]["options"]["path"]
    grafana_mounts = dict(reversed(v.split(":")[:2]) for v in services["grafana"]["volumes"])
    assert grafana_mounts[dashboards_path] == "./grafana/dashboards"
    assert grafana_mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match[1]) * (60 if match[2] == "m" else 1)


# --- Kubernetes ---------------------------------------------------------------------------------


def test_statefulset_mounts_its_own_volume_and_the_configmap(configmap_config: Config) -> None:
    statefulset = kubernetes("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    claims = {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    data_mounts = [path for name, path in mounts.items() if name in claims]
    assert data_mounts == [str(PurePosixPath(configmap_config.db_path).parent)]

    config_volume = next(v for v in pod["volumes"] if "configMap" in v)
    assert config_volume["configMap"]["name"] == kubernetes("ConfigMap")["metadata"]["name"]
    args = container["args"]
    config_file = PurePosixPath(args[args.index("--config") + 1])
    assert str(config_file.parent) == mounts[config_volume["name"]]
    assert config_file.name in kubernetes("ConfigMap")["data"]

    environment = {e["name"]: e["value"] for e in container.get("env", [])}
    assert all(key.startswith(ENV_PREFIX) for key in environment)
    env_config(environment)  # every variable names a real key with a valid value
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_statefulset_ports_probes_and_grace_match_the_config(configmap_config: Config) -> None:
    statefulset = kubernetes("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": configmap_config.grpc_port, "metrics": configmap_config.metrics_port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    shutdown_s = (
        configmap_config.shutdown_timeout_ms + configmap_config.grpc_shutdown_grace_ms
    ) / 1000
    assert pod["terminationGracePeriodSeconds"] > shutdown_s
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(configmap_config.metrics_port)


def test_service_is_headless_and_selectors_match_the_pods() -> None:
    statefulset = kubernetes("StatefulSet")
    service = kubernetes("Service")
    budget = kubernetes("PodDisruptionBudget")
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]

    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    for selector in (
        service["spec"]["selector"],
        statefulset["spec"]["selector"]["matchLabels"],
        budget["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    container_ports = {
        p["name"] for p in statefulset["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    listed = yaml_documents("kubernetes/kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(
        p.name for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_statefulset_runs_several_brokers_each_on_a_claim_of_its_own() -> None:
    statefulset = kubernetes("StatefulSet")
    assert statefulset["spec"]["replicas"] >= 2
    [template] = statefulset["spec"]["volumeClaimTemplates"]  # one claim per pod, per template
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]  # never shared by two brokers
    assert template["spec"]["resources"]["requests"]["storage"]
    volumes = statefulset["spec"]["template"]["spec"]["volumes"]
    assert template["metadata"]["name"] not in {v["name"] for v in volumes}
    assert not manifests("PersistentVolumeClaim"), "a claim of its own per pod, no shared one"
    env = statefulset["spec"]["template"]["spec"]["containers"][0].get("env", [])
    assert f"{ENV_PREFIX}DB_PATH" not in {e["name"] for e in env}  # each pod its own mount


def pull_worker_deployments(folder: str = "kubernetes") -> list[dict[str, Any]]:
    """The Deployments that run the demo pull worker (they set WORKER_BROKERS)."""
    return [
        deployment
        for deployment in manifests("Deployment", folder)
        if any(
            e["name"] == "WORKER_BROKERS"
            for c in deployment["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", [])
        )
    ]


def test_kubernetes_workers_are_given_every_broker_pod_by_its_stable_name(
    configmap_config: Config, dockerfile: Dockerfile
) -> None:
    statefulset = kubernetes("StatefulSet")
    service = kubernetes("Service")
    assert service["spec"]["clusterIP"] == "None"  # a DNS name per pod
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    pods = [
        f"{statefulset['metadata']['name']}-{n}" for n in range(statefulset["spec"]["replicas"])
    ]
    broker_selectors = [
        service["spec"]["selector"],
        statefulset["spec"]["selector"]["matchLabels"],
        kubernetes("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    broker_container = statefulset["spec"]["template"]["spec"]["containers"][0]
    grpc_ports = {p["containerPort"] for p in broker_container["ports"] if p["name"] == "grpc"}
    assert grpc_ports == {configmap_config.grpc_port}

    [deployment] = pull_worker_deployments()
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    environment = {e["name"]: e["value"] for e in container["env"]}
    assert sorted(worker_brokers(environment)) == sorted(
        (f"{name}.{service['metadata']['name']}", configmap_config.grpc_port) for name in pods
    )
    assert not any(key.startswith(ENV_PREFIX) for key in environment)
    # worker.py from the broker's image, where the Dockerfile puts it.
    assert container["image"] == broker_container["image"]
    copies = [shlex.split(line)[-2:] for line in dockerfile.final_stage().all("COPY")]
    [worker_path] = [destination for source, destination in copies if source == "deploy/worker.py"]
    assert container["command"] == ["python", worker_path]
    for selector in broker_selectors:  # the brokers' Service and budget take no worker
        assert not selector.items() <= pod["metadata"]["labels"].items()
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    assert deployment["spec"]["replicas"] >= len(pods)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def push_overlay_replicas() -> dict[str, int]:
    """The overlay's replica counts by name (kustomize `replicas:`)."""
    kustomization = yaml_documents(f"{PUSH_KUBERNETES}/kustomization.yaml")[0]
    return {r["name"]: r["count"] for r in kustomization.get("replicas", [])}


def test_the_disruption_budget_lets_one_broker_go_and_keeps_the_others() -> None:
    statefulset = kubernetes("StatefulSet")
    budget = kubernetes("PodDisruptionBudget")
    name = statefulset["metadata"]["name"]
    for where, replicas in (
        ("kubernetes", statefulset["spec"]["replicas"]),
        (PUSH_KUBERNETES, push_overlay_replicas().get(name, statefulset["spec"]["replicas"])),
    ):
        allowed = voluntary_disruptions(budget, replicas)
        assert 1 <= allowed < replicas, f"{where}: {allowed} of {replicas} brokers may go"


def test_image_and_configmap_configs_agree_on_what_the_files_rely_on(
    image_config: Config, configmap_config: Config
) -> None:
    for key in ("grpc_port", "metrics_port", "db_path", "shutdown_timeout_ms", "mailbox"):
        assert getattr(image_config, key) == getattr(configmap_config, key), key


# --- push delivery: the compose override, the worker image, the Kubernetes overlay -----------

PUSH_COMPOSE = "docker-compose.push.yml"
PUSH_KUBERNETES = "kubernetes-push"
PUSH_DOCKERFILE = "Dockerfile.push-worker"
# The demo app's settings (push_app.py) that the examples pass to the worker.
WORKER_SECRET_ENV = "DEMO_RPC_SECRET"
BROKER_SECRET_ENV = f"{ENV_PREFIX}GRPC_SHARED_SECRET"


@pytest.fixture(scope="module")
def push_worker_image() -> Dockerfile:
    return Dockerfile((DEPLOY / PUSH_DOCKERFILE).read_text())


def option(arguments: list[str], name: str) -> str | None:
    """The value of `--name=value` or `--name value` in a command line; the last one wins."""
    value = None
    for index, argument in enumerate(arguments):
        if argument.startswith(f"{name}="):
            value = argument.partition("=")[2]
        elif argument == name and index + 1 < len(arguments):
            value = arguments[index + 1]
    return value


def worker_command(image: Dockerfile, command: list[str]) -> list[str]:
    """The push worker's command line: the image's ENTRYPOINT with `command` for its CMD."""
    entrypoint: list[str] = json.loads(image.all("ENTRYPOINT")[-1])
    return [*entrypoint, *command]


def endpoints(config: Config) -> list[tuple[str, str, int]]:
    """(application, host, port) of every worker_map endpoint."""
    found = []
    for application, addresses in config.worker_map.items():
        for address in addresses:
            host, _, port = address.rpartition(":")
            found.append((application, host, int(port)))
    assert found, "no worker_map endpoint"
    return found


def test_push_worker_image_runs_the_pinned_client_push_worker(
    push_worker_image: Dockerfile,
) -> None:
    assert push_worker_image.all("FROM") == ["python:3.11-slim"]
    installs = " ".join(push_worker_image.all("RUN"))
    pins = re.findall(r"taskbroker-client==([\w.]+)", installs)
    assert pins == [client_venv.CLIENT_VERSION] == ["0.20.30"]
    for requirement in client_venv.REQUIREMENTS:  # the compatibility test's pins
        assert f'"{requirement}"' in installs, requirement

    command = worker_command(push_worker_image, json.loads(push_worker_image.all("CMD")[-1]))
    assert command[: 1 + len(WORKER_COMMAND)] == ["python", *WORKER_COMMAND]
    module, _, attribute = (option(command, "--app-module") or "").partition(":")
    assert attribute == "app"
    env = dict(
        pair.split("=", 1) for line in push_worker_image.all("ENV") for pair in shlex.split(line)
    )
    copies = [shlex.split(line)[-2:] for line in push_worker_image.all("COPY")]
    assert [f"{module}.py", f"{env['PYTHONPATH']}/{module}.py"] in copies
    assert (DEPLOY / f"{module}.py").is_file()

    port = int(option(command, "--grpc-port") or 0)
    exposed = {int(p) for line in push_worker_image.all("EXPOSE") for p in line.split()}
    assert exposed == {port}
    assert f"127.0.0.1:{port}" in " ".join(push_worker_image.all("HEALTHCHECK"))
    assert push_worker_image.all("USER")[-1].split(":")[0] not in {"root", "0"}
    assert push_worker_image.all("STOPSIGNAL") == ["SIGTERM"]


def test_compose_push_override_gives_each_broker_its_own_pool_of_push_workers(
    push_worker_image: Dockerfile,
) -> None:
    base = yaml_documents("docker-compose.yml")[0]["services"]
    override = yaml_documents(PUSH_COMPOSE)[0]["services"]
    brokers = compose_brokers()
    pools = set(override) - set(base)
    assert len(pools) == len(brokers)  # one pool per broker
    [builder] = [name for name in pools if "build" in override[name]]  # the image, built once
    assert override[builder]["build"] == {"context": ".", "dockerfile": PUSH_DOCKERFILE}

    produce = compose_service("demo-tasks", PUSH_COMPOSE)["command"]
    served = set()
    for name, broker in brokers.items():
        broker_env = {**broker["environment"], **override[name]["environment"]}
        assert all(key.startswith(ENV_PREFIX) for key in broker_env)
        config = env_config(broker_env, DEPLOY / "config.toml")
        assert config.delivery_mode is DeliveryMode.PUSH
        assert option(produce, "--application") in config.worker_map
        assert option(produce, "--topic") == config.kafka_topic

        for application, host, port in endpoints(config):
            worker = override[host]
            assert "entrypoint" not in worker  # the image's: the pinned worker on its port
            assert worker["image"] == override[builder]["image"]
            command = worker_command(push_worker_image, worker["command"])
            assert int(option(command, "--grpc-port") or 0) == port, application
            # Results go back to the broker that pushed: a pool serves one broker.
            assert option(command, "--broker-service") == f"{name}:{config.grpc_port}"
            assert host not in served, f"{host} serves two brokers"
            served.add(host)
            assert worker["deploy"]["replicas"] >= 1
            # Signing, when the broker has it, with the same secret on both sides.
            assert worker.get("environment", {}).get(WORKER_SECRET_ENV) == broker_env.get(
                BROKER_SECRET_ENV
            )
    assert served == pools

    # The base's demo tasks, for that application.
    unchanged = [a for a in produce if not a.startswith("--application=")]
    assert unchanged == compose_service("demo-tasks")["command"]
    assert override["worker"]["deploy"]["replicas"] == 0  # GetTask is refused in push mode


def json_patched(document: dict[str, Any], operations: list[dict[str, Any]]) -> dict[str, Any]:
    """`document` after the JSON patch's add and replace operations (all the overlay uses)."""
    patched = copy.deepcopy(document)
    for operation in operations:
        *parents, leaf = operation["path"].removeprefix("/").split("/")
        target: Any = patched
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        if operation["op"] not in {"add", "replace"}:
            pytest.fail(f"unsupported JSON patch operation {operation}")
        if isinstance(target, list) and leaf == "-":
            target.append(operation["value"])
        elif isinstance(target, list) and operation["op"] == "add":
            target.insert(int(leaf), operation["value"])
        elif isinstance(target, list):
            target[int(leaf)] = operation["value"]
        else:
            target[leaf] = operation["value"]
    return patched


def pod_environment(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's environment as in the pod: `$(VAR)` expanded from the variables
    defined before it, as Kubernetes does; metadata.name is the pod's name."""
    environment: dict[str, str] = {}
    for variable in container.get("env", []):
        if "valueFrom" in variable:
            assert variable["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
            value = pod_name
        else:
            value = re.sub(
                r"\$\((\w+)\)",
                lambda match: environment.get(match[1], match[0]),
                variable["value"],
            )
        environment[variable["name"]] = value
    return environment


def test_kubernetes_push_overlay_gives_each_broker_pod_its_own_pool_of_push_workers(
    configmap_path: Path, configmap_config: Config, push_worker_image: Dockerfile
) -> None:
    kustomization = yaml_documents(f"{PUSH_KUBERNETES}/kustomization.yaml")[0]
    assert "../kubernetes" in kustomization["resources"]  # the base, unchanged
    listed = set(kustomization["resources"]) | {p["path"] for p in kustomization["patches"]}
    assert {p.name for p in (DEPLOY / PUSH_KUBERNETES).glob("*.yaml")} - listed == {
        "kustomization.yaml"
    }

    statefulset = kubernetes("StatefulSet")
    for patch in kustomization["patches"]:
        assert patch["target"] == {"kind": "StatefulSet", "name": "taskbroker"}
        statefulset = json_patched(
            statefulset, yaml_documents(f"{PUSH_KUBERNETES}/{patch['path']}")[0]
        )
    counts = push_overlay_replicas()
    for pull_workers in pull_worker_deployments():  # GetTask is refused in push mode
        assert counts.get(pull_workers["metadata"]["name"]) == 0
    name = statefulset["metadata"]["name"]
    replicas = counts.get(name, statefulset["spec"]["replicas"])
    broker_service = kubernetes("Service")
    broker_selectors = [
        broker_service["spec"]["selector"],
        statefulset["spec"]["selector"]["matchLabels"],
        kubernetes("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    services = {s["metadata"]["name"]: s for s in manifests("Service", PUSH_KUBERNETES)}
    # The demo app's name (push_app.py; see the last test of this section).
    demo_application = option(
        compose_service("demo-tasks", PUSH_COMPOSE)["command"], "--application"
    )
    deployments = manifests("Deployment", PUSH_KUBERNETES)
    assert deployments

    for ordinal in range(replicas):
        pod_name = f"{name}-{ordinal}"
        environment = pod_environment(
            statefulset["spec"]["template"]["spec"]["containers"][0], pod_name
        )
        config = env_config(
            {k: v for k, v in environment.items() if k.startswith(ENV_PREFIX)}, configmap_path
        )
        assert config.delivery_mode is DeliveryMode.PUSH
        for application, host, port in endpoints(config):
            assert application == demo_application
            service = services[host]  # one name for the whole pool, in this namespace
            assert service["spec"]["clusterIP"] == "None", "round_robin needs every pod's address"
            [service_port] = [p for p in service["spec"]["ports"] if p["port"] == port]
            [deployment] = [
                d
                for d in deployments
                if service["spec"]["selector"].items()
                <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            pod = deployment["spec"]["template"]
            assert (
                deployment["spec"]["selector"]["matchLabels"].items()
                <= pod["metadata"]["labels"].items()
            )
            for selector in broker_selectors:  # the brokers' selectors take no worker
                assert not selector.items() <= pod["metadata"]["labels"].items()
            [container] = pod["spec"]["containers"]
            assert "command" not in container  # the image's ENTRYPOINT: the pinned worker
            # The image that docker-compose.push.yml builds (the tags differ, as the broker's).
            [image] = {
                service["image"]
                for service in yaml_documents(PUSH_COMPOSE)[0]["services"].values()
                if service.get("build", {}).get("dockerfile") == PUSH_DOCKERFILE
            }
            assert container["image"].partition(":")[0] == image.partition(":")[0]
            command = worker_command(push_worker_image, container["args"])
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports[service_port["targetPort"]] == int(option(command, "--grpc-port") or 0)
            assert container["readinessProbe"]["grpc"]["port"] == ports[service_port["targetPort"]]
            # Results go back to the broker pod that pushed, by its own DNS name.
            assert option(command, "--broker-service") == (
                f"{pod_name}.{broker_service['metadata']['name']}:{configmap_config.grpc_port}"
            ), application
            worker_env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert worker_env.get(WORKER_SECRET_ENV) == environment.get(BROKER_SECRET_ENV)
            if container["securityContext"].get("readOnlyRootFilesystem"):
                assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_readme_push_section_keys_and_defaults_match_the_config() -> None:
    readme = (DEPLOY / "README.md").read_text()
    section = readme.partition("\n## Push delivery\n")[2].partition("\n## ")[0]
    assert section, "no Push delivery section"
    defaults = Config()
    rows = re.findall(r"^\| `([a-z_.]+)` \| `?([^|`]+?)`? \|", section, re.MULTILINE)
    assert len(rows) >= 9
    for key, default in rows:
        value: Any = defaults
        for part in key.split("."):
            value = getattr(value, part)
        assert str(getattr(value, "value", value)) == default, key
    assert "](#metrics)" in section  # the push metrics are documented there, once
    for name in (PUSH_COMPOSE, PUSH_DOCKERFILE, "push_app.py", PUSH_KUBERNETES):
        assert name in section, name
    assert f"taskbroker-client=={client_venv.CLIENT_VERSION}" in section


@pytest.mark.slow
def test_the_demo_app_serves_the_produced_tasks_in_the_pinned_client(
    tmp_path: Path,
) -> None:
    """push_app.py imports in the client's own venv; its application is the worker_map key
    and its task the one `demo-tasks` produces; its secrets become the client's JSON list."""
    produce = compose_service("demo-tasks", PUSH_COMPOSE)["command"]
    script = (
        "import json, push_app; "
        f"push_app.app.get_task({option(produce, '--namespace')!r}, "
        f"{option(produce, '--taskname')!r}); "
        "print(json.dumps([push_app.app.name, push_app.app.config['rpc_secret']]))"
    )
    result = subprocess.run(
        [str(client_venv.client_python()), "-c", script],
        env={**os.environ, "PYTHONPATH": str(DEPLOY), WORKER_SECRET_ENV: "new, old"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    name, secret = json.loads(result.stdout)
    assert name == option(produce, "--application")
    assert json.loads(secret) == ["new", "old"]


# --- the demo worker's choice of broker, without a broker ---------------------------------------


def test_worker_broker_addresses_are_a_comma_separated_list() -> None:
    worker = load_worker()
    assert worker.parse_brokers(" a:1, b:2 ,,") == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="WORKER_BROKERS"):
        worker.parse_brokers(" , ")


def test_worker_moves_on_after_a_miss_and_after_its_share_of_tasks() -> None:
    rotation = load_worker().Rotation(["a:1", "b:1", "c:1"], start=4, rebalance_after=2)
    assert rotation.current == "b:1"
    rotation.took()
    assert not rotation.due
    rotation.took()
    assert rotation.due  # fetch no next task from b: report, then move on
    rotation.move_on(missed=False)
    assert (rotation.current, rotation.due, rotation.idle) == ("c:1", False, False)
    rotation.move_on(missed=True)  # c had nothing
    assert rotation.current == "a:1"
    assert "a:1" in repr(rotation)


def test_worker_rests_only_after_a_whole_round_of_brokers_had_nothing() -> None:
    rotation = load_worker().Rotation(["a:1", "b:1"], start=0, rebalance_after=32)
    rotation.move_on(missed=True)
    assert not rotation.idle  # b may have tasks
    rotation.move_on(missed=True)
    assert rotation.idle
    assert rotation.current == "a:1"
    rotation.took()
    assert not rotation.idle


def test_a_worker_of_one_broker_never_moves_away_from_it() -> None:
    rotation = load_worker().Rotation(["a:1"], start=0, rebalance_after=1)
    rotation.took()
    assert not rotation.due
    rotation.move_on(missed=True)
    assert (rotation.current, rotation.idle) == ("a:1", True)


# --- metric names against a running broker --------------------------------------------------------


def used_metric_names() -> dict[str, set[str]]:
    """Each metric name the dashboard and the alert rules use, with where it is used."""
    used: dict[str, set[str]] = {}
    dashboard = json.loads((DEPLOY / "grafana/dashboards/taskbroker.json").read_text())
    expressions = [
        ("dashboard", target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    expressions += [
        ("dashboard variable", v["definition"])
        for v in dashboard["templating"]["list"]
        if "definition" in v
    ]
    alerts = yaml_documents("prometheus/alerts.yml")[0]
    expressions += [
        (f"alert {rule['alert']}", rule["expr"])
        for group in alerts["groups"]
        for rule in group["rules"]
    ]
    for where, expression in expressions:
        for name in METRIC_NAME.findall(expression):
            used.setdefault(name, set()).add(where)
    return used


@pytest.fixture(scope="module")
def exported_sample_names(
    kafka: EmbeddedKafka, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[set[str], RunningBroker, LoadDone]]:
    with running_broker(kafka, tmp_path_factory.mktemp("deploy")) as running:
        load = put_load(running, kafka)
        families = settled_families(running, load)
        names = {s.name for family in families.values() for s in family.samples}
        yield names, running, load


@pytest.mark.kafka
@pytest.mark.slow
def test_every_metric_in_the_dashboard_and_alerts_exists_on_a_running_broker(
    exported_sample_names: tuple[set[str], RunningBroker, LoadDone],
) -> None:
    exported, _, _ = exported_sample_names
    used = used_metric_names()
    assert len(used) >= 25
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not missing, f"used but not exported: {missing}"
    alerts = {w for where in used.values() for w in where if w.startswith("alert")}
    assert len(alerts) >= 8


@pytest.mark.kafka
@pytest.mark.slow
def test_the_demo_worker_completes_tasks_on_a_running_broker(
    exported_sample_names: tuple[set[str], RunningBroker, LoadDone],
) -> None:
    _, running, load = exported_sample_names
    worker = load_worker()
    stopping = threading.Event()
    completed: list[int] = []
    # A broker that is away first: the worker moves on to the one that answers, and comes
    # back to the away one every `REBALANCE_AFTER` tasks, and finishes every task all the same.
    brokers = [f"127.0.0.1:{free_port()}", running.grpc_target]
    thread = threading.Thread(
        target=lambda: completed.append(worker.run(brokers, NAMESPACE, 0.0, stopping, start=0)),
        name="demo-worker",
    )
    thread.start()
    try:

        def all_done() -> bool:
            applied = sample(
                scrape(running.metrics_url),
                "taskbroker_state_conclusions",
                "taskbroker_state_conclusions_total",
                outcome="applied",
            )
            return applied == load.produced

        wait_until(all_done, "the demo worker to complete every task")
    finally:
        stopping.set()
        thread.join(10)
    assert not thread.is_alive()
    assert completed == [load.produced - load.completed]
