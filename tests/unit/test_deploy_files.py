"""Structural checks of the deployment files (nothing here runs Docker or Kubernetes).

Covers docker-compose.yml, deploy/Dockerfile, deploy/k8s/, deploy/prometheus/ and
deploy/grafana/: that they agree with each other and with the worker's contract (its
environment variables, its metrics port and /healthz, its metric names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S_DIR = ROOT / "deploy" / "k8s"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "smw-dashboard.json"

# Must equal the CLI's option -> environment variable mapping (one variable per option).
# To be replaced by an import from worker.config once that exists.
KNOWN_ENV = frozenset(
    {
        "SMW_DATABASE_URL",
        "SMW_DATABASE_PASSWORD",
        "SMW_DATABASE_PASSWORD_FILE",
        "SMW_KAFKA_BOOTSTRAP",
        "SMW_KAFKA_CONFIG",
        "SMW_KAFKA_CONFIG_FILE",
        "SMW_COMMAND_TOPIC",
        "SMW_EVENT_TOPIC",
        "SMW_DLQ_TOPIC",
        "SMW_GROUP_ID",
        "SMW_CONCURRENCY",
        "SMW_METRICS_PORT",
        "SMW_HANDLERS",
        "SMW_LEASE_SECONDS",
        "SMW_LOG_FORMAT",
        "SMW_LOG_LEVEL",
        "SMW_WORKER_ID",
    }
)

# The worker's Prometheus metric families, by type (names as registered).
COUNTERS = frozenset(
    {
        "smw_commands_total",
        "smw_transitions_total",
        "smw_lock_waits_total",
        "smw_dead_letters_total",
    }
)
GAUGES = frozenset(
    {
        "smw_machines_waiting",
        "smw_machines_parked",
        "smw_runnable_backlog",
        "smw_outbox_backlog",
        "smw_outbox_oldest_age_seconds",
        "smw_consumer_lag",
        "smw_build_info",
    }
)
HISTOGRAMS = frozenset({"smw_step_duration_seconds"})
METRIC_FAMILIES = COUNTERS | GAUGES | HISTOGRAMS
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Series names a query may select: counters and gauges by name, histograms only through their
# _bucket/_sum/_count series (there is no series named like the histogram itself).
SERIES_TO_FAMILY: dict[str, str] = {name: name for name in COUNTERS | GAUGES} | {
    name + suffix: name for name in HISTOGRAMS for suffix in HISTOGRAM_SUFFIXES
}
NON_SMW_SERIES = frozenset({"up"})

# PromQL words that look like identifiers but are not metric names.
PROMQL_WORDS = frozenset(
    {
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "topk",
        "bottomk",
        "quantile",
        "rate",
        "irate",
        "increase",
        "delta",
        "histogram_quantile",
        "absent",
        "label_values",
        "and",
        "or",
        "unless",
        "bool",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    }
)

METRICS_PORT = 9400
COMMAND_TOPIC = "statemachine.commands"
EVENT_TOPIC = "statemachine.events"
DLQ_TOPIC = "statemachine.commands.dlq"
SMW_NAME = re.compile(r"\bSMW_[A-Z0-9_]+\b")
SMW_METRIC = re.compile(r"smw_[a-z_]+")


# ---------------------------------------------------------------------------------------------
# helpers


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def series_in(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression.

    Strips strings, label matchers, range selectors and grouping clauses, then keeps the
    identifiers that are not PromQL functions or keywords. Fails on words it does not know so
    that a new function is added to PROMQL_WORDS deliberately instead of passing unnoticed.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return words - PROMQL_WORDS


def assert_known_series(expr: str) -> set[str]:
    names = series_in(expr)
    unknown = names - SERIES_TO_FAMILY.keys() - NON_SMW_SERIES
    assert not unknown, f"{expr!r} selects unknown series {sorted(unknown)}"
    smw_names = set(SMW_METRIC.findall(expr))
    assert smw_names == names - NON_SMW_SERIES, expr
    return names


def families_of(names: set[str]) -> set[str]:
    return {SERIES_TO_FAMILY[n] for n in names if n in SERIES_TO_FAMILY}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result = compose["services"]
    assert isinstance(result, dict)
    return result


@pytest.fixture(scope="module")
def worker_env(services: dict[str, Any]) -> dict[str, str]:
    env = services["worker"]["environment"]
    assert isinstance(env, dict), "use the mapping form for environment"
    return {str(k): str(v) for k, v in env.items()}


@pytest.fixture(scope="module")
def k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                assert isinstance(doc, dict), path
                docs.append(doc)
    return docs


def one_of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def k8s_config(k8s_docs: list[dict[str, Any]]) -> dict[str, str]:
    data = one_of_kind(k8s_docs, "ConfigMap")["data"]
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    data = load_yaml(PROMETHEUS_DIR / "alerts.yml")
    return [rule for group in data["groups"] for rule in group["rules"]]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    return panels


# ---------------------------------------------------------------------------------------------
# environment variables everywhere


def test_known_env_matches_the_contract() -> None:
    assert len(KNOWN_ENV) == 17
    assert all(SMW_NAME.fullmatch(name) for name in KNOWN_ENV)


@pytest.mark.parametrize(
    "path",
    [COMPOSE_FILE, DOCKERFILE, *sorted(K8S_DIR.glob("*.yaml"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_smw_variable_mentioned_is_known(path: Path) -> None:
    mentioned = set(SMW_NAME.findall(path.read_text(encoding="utf-8")))
    assert mentioned <= KNOWN_ENV, sorted(mentioned - KNOWN_ENV)


def test_every_smw_environment_key_is_known(services: dict[str, Any]) -> None:
    for name, service in services.items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use the mapping form for environment"
        smw_keys = {k for k in env if k.startswith("SMW_")}
        assert smw_keys <= KNOWN_ENV, (name, sorted(smw_keys - KNOWN_ENV))


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_services(services: dict[str, Any]) -> None:
    assert set(services) == {
        "mysql",
        "kafka",
        "kafka-init",
        "schema",
        "worker",
        "prometheus",
        "grafana",
    }
    assert services["mysql"]["image"] == "mysql:8.4"
    assert services["kafka"]["image"] == "apache/kafka:4.1.0"
    assert services["kafka-init"]["image"] == services["kafka"]["image"]
    assert services["prometheus"]["image"].startswith("prom/prometheus:")


def test_worker_runs_three_replicas_from_the_dockerfile(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 3
    assert worker["command"] == ["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker  # replicas cannot share a host port
    assert worker["stop_grace_period"] == "60s"
    for name in ("worker", "schema"):
        build = services[name]["build"]
        assert build == {"context": ".", "dockerfile": "deploy/Dockerfile"}
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    assert services["schema"]["image"] == worker["image"]


def test_compose_depends_on_conditions(services: dict[str, Any]) -> None:
    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    assert conditions("worker") == {
        "mysql": "service_healthy",
        "kafka": "service_healthy",
        "kafka-init": "service_completed_successfully",
        "schema": "service_completed_successfully",
    }
    assert conditions("kafka-init") == {"kafka": "service_healthy"}
    assert conditions("schema") == {"mysql": "service_healthy"}
    assert conditions("prometheus") == {"worker": "service_started"}
    assert conditions("grafana") == {"prometheus": "service_healthy"}
    assert "mysql" not in services["mysql"].get("depends_on", {})


def test_one_shots_do_not_restart(services: dict[str, Any]) -> None:
    assert services["kafka-init"]["restart"] == "no"
    assert services["schema"]["restart"] == "no"
    assert services["schema"]["command"] == ["schema", "apply"]


def test_compose_healthchecks(services: dict[str, Any]) -> None:
    with_healthcheck = {name for name, s in services.items() if "healthcheck" in s}
    assert with_healthcheck == {"mysql", "kafka", "worker", "prometheus"}

    mysql_test = services["mysql"]["healthcheck"]["test"]
    assert mysql_test[0] == "CMD-SHELL"
    assert mysql_test[1].startswith("mysqladmin ping -h 127.0.0.1 ")

    assert services["kafka"]["healthcheck"]["test"] == [
        "CMD",
        "/opt/kafka/bin/kafka-topics.sh",
        "--bootstrap-server",
        "localhost:9092",
        "--list",
    ]

    worker_test = services["worker"]["healthcheck"]["test"]
    assert worker_test[:3] == ["CMD", "python", "-c"]  # no curl in the slim image
    assert "urllib.request.urlopen(" in worker_test[3]
    assert "/healthz" in worker_test[3]
    assert "SMW_METRICS_PORT" in worker_test[3]
    assert f"'{METRICS_PORT}'" in worker_test[3]  # fallback equals the default port
    compile(worker_test[3], "<healthcheck>", "exec")


def test_worker_environment(worker_env: dict[str, str], services: dict[str, Any]) -> None:
    assert worker_env == {
        "SMW_DATABASE_URL": "mysql+mysqldb://smw@mysql:3306/smw",
        "SMW_DATABASE_PASSWORD": "${SMW_DATABASE_PASSWORD:-smw-dev-password}",
        "SMW_LOG_FORMAT": "json",
        "SMW_LOG_LEVEL": "INFO",
        "SMW_KAFKA_BOOTSTRAP": "kafka:9092",
        "SMW_COMMAND_TOPIC": COMMAND_TOPIC,
        "SMW_EVENT_TOPIC": EVENT_TOPIC,
        "SMW_DLQ_TOPIC": DLQ_TOPIC,
        "SMW_GROUP_ID": "smw-workers",
        "SMW_CONCURRENCY": "4",
        "SMW_LEASE_SECONDS": "30",
        "SMW_METRICS_PORT": str(METRICS_PORT),
        "SMW_HANDLERS": "handlers",
    }
    schema_env = services["schema"]["environment"]
    for key in ("SMW_DATABASE_URL", "SMW_DATABASE_PASSWORD"):
        assert schema_env[key] == worker_env[key]


def test_worker_reaches_compose_services(
    worker_env: dict[str, str], services: dict[str, Any]
) -> None:
    url = urlsplit(worker_env["SMW_DATABASE_URL"])
    assert url.scheme == "mysql+mysqldb"
    assert url.hostname == "mysql"
    assert url.port == 3306
    assert url.password is None  # the password comes from SMW_DATABASE_PASSWORD

    mysql_env = services["mysql"]["environment"]
    assert mysql_env["MYSQL_DATABASE"] == url.path.lstrip("/")
    assert mysql_env["MYSQL_USER"] == url.username
    assert mysql_env["MYSQL_PASSWORD"] == worker_env["SMW_DATABASE_PASSWORD"]

    host, port = worker_env["SMW_KAFKA_BOOTSTRAP"].split(":")
    assert host == "kafka"
    assert f"PLAINTEXT://{host}:{port}" in services["kafka"]["environment"][
        "KAFKA_ADVERTISED_LISTENERS"
    ].split(",")


def test_kafka_is_single_node_kraft(services: dict[str, Any]) -> None:
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == 1
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == 1
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert listeners == set(protocols)


def test_kafka_init_creates_the_worker_topics(
    services: dict[str, Any], worker_env: dict[str, str]
) -> None:
    script = "\n".join(services["kafka-init"]["command"])
    created = {
        topic: int(partitions)
        for topic, partitions in re.findall(
            r"--create --if-not-exists --topic (\S+) --partitions (\d+) --replication-factor 1",
            script,
        )
    }
    assert created == {COMMAND_TOPIC: 6, EVENT_TOPIC: 6, DLQ_TOPIC: 1}
    assert set(created) == {
        worker_env["SMW_COMMAND_TOPIC"],
        worker_env["SMW_EVENT_TOPIC"],
        worker_env["SMW_DLQ_TOPIC"],
    }
    assert script.count("--bootstrap-server kafka:9092") == 4


def container_to_host(service: dict[str, Any], container_path: str) -> Path:
    """Map a path inside a container to the repository file bind-mounted there."""
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if not source.startswith("./"):
            continue
        if container_path == target or container_path.startswith(target + "/"):
            return ROOT / source / Path(container_path).relative_to(target)
    raise AssertionError(f"{container_path} is not bind-mounted from the repository")


def test_prometheus_scrapes_every_worker_on_its_metrics_port(
    services: dict[str, Any], worker_env: dict[str, str]
) -> None:
    prometheus = services["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = container_to_host(prometheus, config_arg.split("=", 1)[1])
    assert config_path == PROMETHEUS_DIR / "prometheus.yml"
    config = load_yaml(config_path)

    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    worker_job = jobs["smw-worker"]
    assert worker_job["metrics_path"] == "/metrics"
    assert worker_job["dns_sd_configs"] == [
        {"names": ["worker"], "type": "A", "port": METRICS_PORT, "refresh_interval": "15s"}
    ]
    assert worker_job["dns_sd_configs"][0]["port"] == int(worker_env["SMW_METRICS_PORT"])
    assert worker_job["dns_sd_configs"][0]["names"][0] in services

    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    for rule_file in config["rule_files"]:
        assert container_to_host(prometheus, rule_file) == PROMETHEUS_DIR / "alerts.yml"
        assert (PROMETHEUS_DIR / "alerts.yml").is_file()


def test_grafana_provisioning_points_at_the_dashboard(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    provisioning = GRAFANA_DIR / "provisioning"
    assert container_to_host(grafana, "/etc/grafana/provisioning") == provisioning

    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert [(d["type"], d["url"], d["isDefault"]) for d in datasources] == [
        ("prometheus", "http://prometheus:9090", True)
    ]
    assert "prometheus" in services

    providers = load_yaml(provisioning / "dashboards" / "smw.yml")["providers"]
    assert len(providers) == 1
    dashboards_dir = container_to_host(grafana, providers[0]["options"]["path"])
    assert dashboards_dir == GRAFANA_DIR
    assert sorted(p.name for p in dashboards_dir.glob("*.json")) == [DASHBOARD_FILE.name]


# ---------------------------------------------------------------------------------------------
# deploy/Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    result = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
    return result


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    froms = [arg for kw, arg in instructions if kw == "FROM"]
    assert froms == ["python:3.11-slim AS build", "python:3.11-slim"]

    runs = " ".join(arg for kw, arg in instructions if kw == "RUN")
    for package in ("default-libmysqlclient-dev", "pkg-config", "build-essential"):
        assert package in runs
    assert "pip install ." in runs

    last = dict(instructions)  # the last occurrence of each instruction wins
    assert last["ENTRYPOINT"] == '["smw"]'
    assert last["CMD"] == '["worker"]'
    assert last["EXPOSE"] == str(METRICS_PORT)
    assert last["USER"] == "10001:10001"  # numeric, so runAsNonRoot can verify it


# ---------------------------------------------------------------------------------------------
# deploy/k8s


def test_kustomization_lists_every_manifest(k8s_docs: list[dict[str, Any]]) -> None:
    kustomization = load_yaml(K8S_DIR / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    manifests = sorted(p.name for p in K8S_DIR.glob("*.y*ml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == manifests
    assert kustomization["namespace"] == one_of_kind(k8s_docs, "Namespace")["metadata"]["name"]
    assert [image["name"] for image in kustomization["images"]] == ["smw-worker"]


def test_k8s_kinds(k8s_docs: list[dict[str, Any]]) -> None:
    kinds = sorted(doc["kind"] for doc in k8s_docs)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Secret",
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "Service",
            "ServiceMonitor",
        ]
    )
    api_versions = {doc["kind"]: doc["apiVersion"] for doc in k8s_docs}
    assert api_versions["Deployment"] == "apps/v1"
    assert api_versions["Job"] == "batch/v1"
    assert api_versions["PodDisruptionBudget"] == "policy/v1"
    assert api_versions["ServiceMonitor"] == "monitoring.coreos.com/v1"


def test_k8s_config_and_secret(k8s_docs: list[dict[str, Any]], k8s_config: dict[str, str]) -> None:
    assert all(isinstance(v, str) for v in k8s_config.values()), "ConfigMap values must be strings"
    assert set(k8s_config) <= KNOWN_ENV
    assert k8s_config["SMW_METRICS_PORT"] == str(METRICS_PORT)
    assert k8s_config["SMW_COMMAND_TOPIC"] == COMMAND_TOPIC
    assert k8s_config["SMW_EVENT_TOPIC"] == EVENT_TOPIC
    assert k8s_config["SMW_DLQ_TOPIC"] == DLQ_TOPIC
    assert urlsplit(k8s_config["SMW_DATABASE_URL"]).password is None

    secret = one_of_kind(k8s_docs, "Secret")
    assert secret["type"] == "Opaque"
    assert "data" not in secret
    assert set(secret["stringData"]) == {"SMW_DATABASE_PASSWORD"}
    assert not set(secret["stringData"]) & set(k8s_config)
    assert "REPLACE" in (K8S_DIR / "secret.yaml").read_text(encoding="utf-8")


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def test_deployment(k8s_docs: list[dict[str, Any]], k8s_config: dict[str, str]) -> None:
    deployment = one_of_kind(k8s_docs, "Deployment")
    assert deployment["metadata"]["name"] == "smw-worker"
    assert deployment["spec"]["replicas"] == 3
    selector = deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()

    spec = pod_spec(deployment)
    grace = spec["terminationGracePeriodSeconds"]
    assert grace == 60
    assert grace >= 30
    assert grace > int(k8s_config["SMW_LEASE_SECONDS"])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001

    (container,) = spec["containers"]
    assert container["image"] == "smw-worker"
    assert container["args"] == ["worker"]
    assert container["resources"]["requests"]["memory"] == "256Mi"
    assert container["resources"]["limits"]["memory"] == "256Mi"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]  # noqa: S108
    assert [e["name"] for e in container["env"]] == ["SMW_WORKER_ID"]
    assert {e["name"] for e in container["env"]} <= KNOWN_ENV

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(METRICS_PORT),
        "prometheus.io/path": "/metrics",
    }


def assert_env_from(spec: dict[str, Any], k8s_docs: list[dict[str, Any]]) -> None:
    (container,) = spec["containers"]
    assert container["envFrom"] == [
        {"configMapRef": {"name": one_of_kind(k8s_docs, "ConfigMap")["metadata"]["name"]}},
        {"secretRef": {"name": one_of_kind(k8s_docs, "Secret")["metadata"]["name"]}},
    ]


def test_worker_and_job_take_config_and_secret(k8s_docs: list[dict[str, Any]]) -> None:
    assert_env_from(pod_spec(one_of_kind(k8s_docs, "Deployment")), k8s_docs)
    assert_env_from(pod_spec(one_of_kind(k8s_docs, "Job")), k8s_docs)


def test_probes_use_healthz_on_the_metrics_port(
    k8s_docs: list[dict[str, Any]], k8s_config: dict[str, str]
) -> None:
    (container,) = pod_spec(one_of_kind(k8s_docs, "Deployment"))["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": METRICS_PORT}
    assert ports["metrics"] == int(k8s_config["SMW_METRICS_PORT"])
    probes = {key for key in container if key.endswith("Probe")}
    assert probes == {"startupProbe", "readinessProbe", "livenessProbe"}
    for key in probes:
        http_get = container[key]["httpGet"]
        assert http_get["path"] == "/healthz", key
        port = http_get["port"]
        assert (ports[port] if isinstance(port, str) else port) == METRICS_PORT, key


def test_schema_job(k8s_docs: list[dict[str, Any]]) -> None:
    job = one_of_kind(k8s_docs, "Job")
    assert job["metadata"]["name"] == "smw-schema-apply"
    spec = pod_spec(job)
    assert spec["restartPolicy"] in {"Never", "OnFailure"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    (worker,) = pod_spec(one_of_kind(k8s_docs, "Deployment"))["containers"]
    assert container["image"] == worker["image"]
    assert container["args"] == ["schema", "apply"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The Job's pods must not count as workers for the PDB or the Service.
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    worker_selector = one_of_kind(k8s_docs, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not worker_selector.items() <= job_labels.items()


def test_pdb_and_service_select_the_workers(k8s_docs: list[dict[str, Any]]) -> None:
    deployment = one_of_kind(k8s_docs, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]

    pdb = one_of_kind(k8s_docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == selector

    service = one_of_kind(k8s_docs, "Service")
    assert service["metadata"]["name"] == "smw-worker"  # becomes job="smw-worker"
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_service_monitor_selects_the_service(k8s_docs: list[dict[str, Any]]) -> None:
    service = one_of_kind(k8s_docs, "Service")
    monitor = one_of_kind(k8s_docs, "ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "15s"}
    ]
    assert {p["name"] for p in service["spec"]["ports"]} == {"metrics"}


# ---------------------------------------------------------------------------------------------
# deploy/prometheus/alerts.yml


def test_alert_rules(alert_rules: list[dict[str, Any]]) -> None:
    by_name = {rule["alert"]: rule for rule in alert_rules}
    assert len(by_name) == len(alert_rules)
    assert {name: rule["expr"] for name, rule in by_name.items()} == {
        "SmwOutboxStuck": "max(smw_outbox_oldest_age_seconds) > 300",
        "SmwDeadLettersGrowing": "sum by (reason) (increase(smw_dead_letters_total[10m])) > 0",
        "SmwParkedMachines": "sum(smw_machines_parked) > 0",
        "SmwConsumerLagHigh": "sum(smw_consumer_lag) > 1000",
        "SmwWorkerDown": 'up{job="smw-worker"} == 0',
    }
    assert {name: rule.get("for") for name, rule in by_name.items()} == {
        "SmwOutboxStuck": "5m",
        "SmwDeadLettersGrowing": None,
        "SmwParkedMachines": "10m",
        "SmwConsumerLagHigh": "10m",
        "SmwWorkerDown": "2m",
    }
    assert {name: rule["labels"]["severity"] for name, rule in by_name.items()} == {
        "SmwOutboxStuck": "critical",
        "SmwDeadLettersGrowing": "warning",
        "SmwParkedMachines": "warning",
        "SmwConsumerLagHigh": "warning",
        "SmwWorkerDown": "critical",
    }
    assert {name: rule["annotations"]["runbook_url"] for name, rule in by_name.items()} == {
        "SmwOutboxStuck": "README.md#runbook-outbox-stuck",
        "SmwDeadLettersGrowing": "README.md#runbook-dead-letters",
        "SmwParkedMachines": "README.md#runbook-parked-machine",
        "SmwConsumerLagHigh": "README.md#runbook-consumer-lag",
        "SmwWorkerDown": "README.md#runbook-worker-down",
    }
    for rule in alert_rules:
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        assert rule["annotations"]["summary"].strip()
        assert rule["annotations"]["description"].strip()


def test_alert_exprs_use_only_known_metrics(alert_rules: list[dict[str, Any]]) -> None:
    referenced: set[str] = set()
    for rule in alert_rules:
        referenced |= assert_known_series(rule["expr"])
    assert referenced == {
        "smw_outbox_oldest_age_seconds",
        "smw_dead_letters_total",
        "smw_machines_parked",
        "smw_consumer_lag",
        "up",
    }


def test_worker_down_alert_matches_the_scrape_job(
    alert_rules: list[dict[str, Any]], k8s_docs: list[dict[str, Any]]
) -> None:
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    compose_jobs = {job["job_name"] for job in config["scrape_configs"]}
    k8s_job = one_of_kind(k8s_docs, "Service")["metadata"]["name"]
    (rule,) = [r for r in alert_rules if r["alert"] == "SmwWorkerDown"]
    (job,) = re.findall(r'job="([^"]+)"', rule["expr"])
    assert job in compose_jobs
    assert job == k8s_job


# ---------------------------------------------------------------------------------------------
# deploy/grafana/smw-dashboard.json


def test_series_parser() -> None:
    assert series_in(
        "histogram_quantile(0.95, sum by (le, step) (rate(smw_step_duration_seconds_bucket"
        '{machine_type=~"$machine_type"}[$__rate_interval])))'
    ) == {"smw_step_duration_seconds_bucket"}
    assert series_in('up{job="smw-worker"} == 0 or absent(smw_outbox_backlog)') == {
        "up",
        "smw_outbox_backlog",
    }
    with pytest.raises(AssertionError, match="unknown series"):
        assert_known_series("rate(smw_step_duration_seconds[5m])")
    with pytest.raises(AssertionError, match="unknown series"):
        assert_known_series("clamp_min(smw_outbox_backlog, 0)")


def test_dashboard_basics(dashboard: dict[str, Any]) -> None:
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "smw-worker"
    assert dashboard["title"] == "State Machine Worker"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variables["machine_type"]["definition"])
    assert match is not None
    metric, label = match.groups()
    assert (metric, label) == ("smw_commands_total", "machine_type")
    assert metric in SERIES_TO_FAMILY

    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels(dashboard):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[x, y] = panel["title"]


def test_dashboard_targets_use_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    datasource = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == datasource, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == datasource, panel["title"]


def test_dashboard_covers_every_metric(dashboard: dict[str, Any]) -> None:
    used: set[str] = set()
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            used |= assert_known_series(target["expr"])
    assert families_of(used) >= METRIC_FAMILIES - {"smw_build_info"}
    assert families_of(used) <= METRIC_FAMILIES
    assert used - SERIES_TO_FAMILY.keys() <= NON_SMW_SERIES


def test_dashboard_step_duration_quantiles(dashboard: dict[str, Any]) -> None:
    exprs = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    quantiles = {
        match
        for expr in exprs
        if "smw_step_duration_seconds_bucket" in expr
        for match in re.findall(r"histogram_quantile\((0\.\d+),", expr)
    }
    assert quantiles == {"0.5", "0.95", "0.99"}
    for expr in exprs:
        if "histogram_quantile(" in expr:
            assert re.search(r"by \([^)]*\ble\b[^)]*\)", expr), expr
            assert "smw_step_duration_seconds_bucket" in expr
