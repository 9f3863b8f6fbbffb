"""The files in deploy/: each parses, they agree with the configuration schema and with each
other (ports, paths, environment), and every metric the dashboard and the alert rules use
exists on a running broker's /metrics. Docker is not run: the files are read as data."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml

from actors import config as configuration
from actors.config import ENV_PREFIX, Config
from actors.embedded_kafka import EmbeddedKafka
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

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC_NAME = re.compile(r"\btaskbroker_[a-z0-9_]+\b")


def yaml_documents(relative: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((DEPLOY / relative).read_text()) if d is not None]


def kubernetes(kind: str) -> dict[str, Any]:
    found = [
        document
        for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
        for document in yaml_documents(str(path.relative_to(DEPLOY)))
        if document.get("kind") == kind
    ]
    assert len(found) == 1, f"{len(found)} {kind} manifests"
    document: dict[str, Any] = found[0]
    return document


def compose_service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = yaml_documents("docker-compose.yml")[0]["services"][name]
    return service


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
def configmap_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    text = kubernetes("ConfigMap")["data"]["config.toml"]
    path = tmp_path_factory.mktemp("configmap") / "config.toml"
    path.write_text(text)
    return configuration.load(path)


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
        elif path.name == "Dockerfile":
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
    broker = compose_service("taskbroker")
    environment = broker["environment"]
    assert all(key.startswith(ENV_PREFIX) for key in environment)
    config = env_config(environment, DEPLOY / "config.toml")
    assert config.kafka_cluster == "kafka:9092"
    assert config.kafka_topic == "taskworker"

    container_ports = {int(mapping.split(":")[-1]) for mapping in broker["ports"]}
    assert container_ports == {config.grpc_port, config.metrics_port}
    mounts = {volume.split(":")[1] for volume in broker["volumes"]}
    assert str(PurePosixPath(config.db_path).parent) in mounts
    assert broker["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    grace_s = _duration_s(broker["stop_grace_period"])
    assert grace_s > (config.shutdown_timeout_ms + config.grpc_shutdown_grace_ms) / 1000


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

    worker = services["worker"]
    assert worker["environment"]["WORKER_BROKER"] == f"taskbroker:{image_config.grpc_port}"
    assert not any(key.startswith(ENV_PREFIX) for key in worker["environment"])
    assert worker["deploy"]["replicas"] >= 2
    assert "/opt/taskbroker/worker.py" in worker["entrypoint"]
    produce = services["demo-tasks"]["command"]
    assert f"--topic={image_config.kafka_topic}" in produce

    prometheus = yaml_documents("prometheus/prometheus.yml")[0]
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"taskbroker:{image_config.metrics_port}"]
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
    assert budget["spec"]["maxUnavailable"] == 1
    container_ports = {
        p["name"] for p in statefulset["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    listed = yaml_documents("kubernetes/kustomization.yaml")[0]["resources"]
    assert sorted(listed) == sorted(
        p.name for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_image_and_configmap_configs_agree_on_what_the_files_rely_on(
    image_config: Config, configmap_config: Config
) -> None:
    for key in ("grpc_port", "metrics_port", "db_path", "shutdown_timeout_ms", "mailbox"):
        assert getattr(image_config, key) == getattr(configmap_config, key), key


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


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_worker", DEPLOY / "worker.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.kafka
@pytest.mark.slow
def test_the_demo_worker_completes_tasks_on_a_running_broker(
    exported_sample_names: tuple[set[str], RunningBroker, LoadDone],
) -> None:
    _, running, load = exported_sample_names
    worker = load_worker()
    stopping = threading.Event()
    completed: list[int] = []
    thread = threading.Thread(
        target=lambda: completed.append(worker.run(running.grpc_target, NAMESPACE, 0.0, stopping)),
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
