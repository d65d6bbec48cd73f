"""The deploy files agree with the code: compose, Kubernetes, Dockerfile, .env.example.

No Docker engine or cluster runs here, so these tests read the files and check
them against what the code really reads and exports: the settings of
``heimdall.config.Settings``, the env names of ``deploy/gunicorn.conf.py``, the
metrics of ``app.metrics`` and the dotenv parsing .env.example must survive.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask
from honcho.environ import parse as parse_dotenv
from prometheus_client import CollectorRegistry
from pydantic import AliasChoices

from app.metrics import init_metrics
from heimdall.config import Settings
from tasks.metrics import RedisCollector, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

PROCESS_SETTINGS = {
    "HEIMDALL_API_BIND": "0.0.0.0:8000",
    "HEIMDALL_API_WORKERS": "2",
    "HEIMDALL_API_THREADS": "256",
    "HEIMDALL_WORKER_CONCURRENCY": "2",
    "HEIMDALL_FLOWER_PORT": "5555",
    "FLOWER_BASIC_AUTH": "admin:heimdall",
    "FLOWER_BASIC_AUTH_FILE": "",
    "FLOWER_ADDRESS": "127.0.0.1",
    "FLOWER_PORT": "5555",
    "PROMETHEUS_MULTIPROC_DIR": "var/prometheus",
    "HEIMDALL_API_CONTROL_SOCKET": "var/run/gunicorn.ctl",
    "HEIMDALL_RUN_DIR": "var/run",
    "REDIS_PASSWORD_FILE": "",
}
"""Environment read by the deploy files (not by Settings), with the default each one has."""

COMPOSE_SERVICES = {
    "redis",
    "redis-cache",
    "postgres",
    "minio",
    "minio-init",
    "mlflow",
    "register",
    "api",
    "worker",
    "flower",
    "prometheus",
    "grafana",
}

_ASSIGNMENT = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
_SELECTOR = re.compile(r"\b((?:flask|heimdall)_\w+)\{([^}]*)\}")


# -- helpers -------------------------------------------------------------------------------


def settings_env_names() -> dict[str, str]:
    """Settings field -> the env name operators use (the first alias, else HEIMDALL_<FIELD>)."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names[field] = str(alias.choices[0])
        elif isinstance(alias, str):
            names[field] = alias
        else:
            names[field] = f"{prefix}{field}".upper()
    return names


def all_settings_env_names() -> set[str]:
    """Every env name Settings accepts (all aliases), upper case."""
    prefix = Settings.model_config.get("env_prefix", "")
    names = set()
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice).upper() for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field}".upper())
    return names


def known_env_names() -> set[str]:
    """Env names a deploy file may set: the settings plus the process settings."""
    return all_settings_env_names() | set(PROCESS_SETTINGS)


def load_compose() -> dict[str, Any]:
    """docker-compose.yml, YAML anchors and merge keys resolved."""
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(doc, dict)
    return doc


def command_text(command: Any) -> str:
    """A compose/k8s command (string or list) as one string."""
    return " ".join(command) if isinstance(command, list) else str(command)


def env_example() -> dict[str, str]:
    """NAME -> documented value of every (commented) assignment in .env.example."""
    found = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = _ASSIGNMENT.match(line.strip())
        if match:
            found[match.group(2)] = match.group(3).strip()
    return found


def k8s_docs(name: str) -> list[dict[str, Any]]:
    """The YAML documents of one manifest file in deploy/k8s/."""
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single document of ``kind``."""
    matching = [d for d in docs if d["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    """The first container of a Deployment."""
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No service settings in the environment (the integration fixtures set some)."""
    for name in list(os.environ):
        if name.upper() in known_env_names() or name.startswith(("HEIMDALL_", "CELERY_")):
            monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- docker-compose.yml --------------------------------------------------------------------


def test_compose_has_every_service() -> None:
    services = load_compose()["services"]
    assert not COMPOSE_SERVICES - set(services)


def test_compose_commands_and_ports() -> None:
    services = load_compose()["services"]
    api = command_text(services["api"]["command"])
    assert "gunicorn -c deploy/gunicorn.conf.py wsgi:app" in api
    assert any(str(p).endswith("8000:8000") for p in services["api"]["ports"])

    worker = command_text(services["worker"]["command"])
    assert "celery -A tasks worker" in worker
    assert "--pool=prefork" in worker
    assert " -E" in worker

    flower = command_text(services["flower"]["command"])
    assert "deploy/flower.sh" in flower
    assert services["flower"]["environment"]["FLOWER_PORT"] == "5555"
    assert any(str(p).endswith("5555:5555") for p in services["flower"]["ports"])
    assert "FLOWER_BASIC_AUTH_FILE" in services["flower"]["environment"]

    assert command_text(services["register"]["command"]) == "heimdall model register --if-missing"

    mlflow = command_text(services["mlflow"]["command"])
    assert "mlflow server" in mlflow
    assert "--serve-artifacts" in mlflow
    assert "--artifacts-destination s3://" in mlflow
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the image installs psycopg2.
    assert "--backend-store-uri postgresql+psycopg2://" in mlflow
    assert "psycopg2-binary" in mlflow and "boto3" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mc mb" in command_text(services["minio-init"]["command"])


def test_compose_heimdall_services_share_image_and_env_anchor() -> None:
    doc = load_compose()
    services = doc["services"]
    env = doc["x-heimdall-env"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for name in ("api", "register"):
        assert services[name]["environment"] == env, name
    for name in ("worker", "flower"):
        own = services[name]["environment"]
        assert {k: v for k, v in own.items() if k in env} == env, name
    images = {services[name]["image"] for name in ("api", "worker", "flower", "register")}
    assert len(images) == 1
    assert services["api"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / services["api"]["build"]["dockerfile"]).is_file()
    text = (ROOT / "docker-compose.yml").read_text()
    assert "x-heimdall-env: &heimdall-env" in text
    assert "environment: *heimdall-env" in text


def test_compose_env_names_are_settings() -> None:
    # Settings ignores unknown names (extra="ignore"): a typo would pass silently.
    doc = load_compose()
    unknown = set(doc["x-heimdall-env"]) - known_env_names()
    assert not unknown
    assert set(doc["services"]["flower"]["environment"]) - known_env_names() == set()


def test_compose_dependencies_and_healthchecks() -> None:
    services = load_compose()["services"]
    for name in ("redis", "postgres", "mlflow", "api"):
        assert "test" in services[name]["healthcheck"], name
    api_deps = services["api"]["depends_on"]
    assert api_deps["redis"]["condition"] == "service_healthy"
    assert api_deps["register"]["condition"] == "service_completed_successfully"
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["register"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    mlflow_deps = services["mlflow"]["depends_on"]
    assert mlflow_deps["postgres"]["condition"] == "service_healthy"
    assert mlflow_deps["minio-init"]["condition"] == "service_completed_successfully"
    for name, service in services.items():
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"


def test_compose_bind_mounts_exist() -> None:
    for name, service in load_compose()["services"].items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_prometheus_scrapes_api_and_flower() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets["heimdall-api"] == ["api:8000"]
    assert targets["heimdall-worker"] == ["worker:9808"]
    assert targets["flower"] == ["flower:5555"]
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    worker_env = load_compose()["services"]["worker"]["environment"]
    assert worker_env["HEIMDALL_WORKER_METRICS_PORT"] == "9808"


def test_grafana_provisioning_parses() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    providers = yaml.safe_load((provisioning / "dashboards" / "heimdall.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "heimdall.json").read_text())
    uid = datasources["datasources"][0]["uid"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == uid


def test_dashboard_queries_metrics_the_api_exports(clean_env: pytest.MonkeyPatch) -> None:
    # Build the API's real exporter (single-process mode: one registry for the HTTP
    # metrics and Heimdall's counters), serve one request, touch every labelled counter,
    # then check each API metric and label the dashboard queries is exported.
    app = Flask("metrics-probe")
    app.add_url_rule("/api/v1/predict", "predict", lambda: "ok", methods=["POST"])
    exporter, counters = init_metrics(app)
    counters.dispatch_timeouts.labels(endpoint="predict").inc()
    counters.prediction_errors.labels(type="invalid-iq").inc()
    counters.predict_latency.labels(endpoint="predict", outcome="computed").observe(0.1)
    counters.jobs_submitted.labels(kind="predict").inc()
    counters.jobs_finished.labels(kind="predict", state="succeeded").inc()
    counters.model_requests.labels(model_version="1", result="ok").inc()
    app.test_client().post("/api/v1/predict")
    exported: dict[str, set[str]] = {}
    for metric in exporter.registry.collect():
        for sample in metric.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "heimdall.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    api_exprs = [e for e in exprs if 'job="heimdall-api"' in e]
    selectors = [s for e in api_exprs for s in re.findall(_SELECTOR, e)]
    used = {metric for metric, _ in selectors}
    assert {
        "flask_http_request_duration_seconds_bucket",
        "heimdall_cache_hits_total",
        "heimdall_cache_misses_total",
    } <= used
    assert used <= set(exported), f"not exported: {sorted(used - set(exported))}"
    for metric, matchers in selectors:
        for label in re.findall(r"(\w+)\s*(?:=|!=|=~|!~)\s*\"", matchers):
            assert label == "job" or label in exported[metric], f"{metric}: {label}"
    for expr in api_exprs:
        for grouped, metric in re.findall(r"by \(([^)]*)\)\s*\(rate\((\w+)\{", expr):
            for label in (x.strip() for x in grouped.split(",")):
                assert label in exported[metric], f"{metric}: by {label}"
    flower_exprs = [e for e in exprs if 'job="flower"' in e]
    assert any("flower_events_total" in e for e in flower_exprs)


def test_dashboard_queries_metrics_the_worker_exports() -> None:
    # The worker's metrics in a private single-process registry, every labelled one
    # touched, plus the names of the Redis figures read at scrape time.
    registry = CollectorRegistry()
    worker = WorkerMetrics.create(registry)
    worker.tasks.labels(task="heimdall.predict", state="SUCCESS").inc()
    worker.task_duration.labels(task="heimdall.predict").observe(0.1)
    worker.queue_wait.labels(task="heimdall.predict").observe(0.1)
    worker.items.labels(model_version="1", status="ok").inc()
    worker.model_loads.labels(outcome="loaded", model_version="1").inc()
    exported: dict[str, set[str]] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    exported["heimdall_worker_heartbeat_timestamp_seconds"] |= {"pid"}  # added by liveall
    redis_figures = RedisCollector(Settings(redis_url="redis://127.0.0.1:1/0"), ["celery"])
    for family in redis_figures.collect():
        exported.setdefault(family.name, set()).update({"role", "queue"})

    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "heimdall.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    worker_exprs = [e for e in exprs if 'job="heimdall-worker"' in e]
    used = {metric for e in worker_exprs for metric, _ in re.findall(_SELECTOR, e)}
    assert {"heimdall_worker_onnx_seconds_bucket", "heimdall_queue_length"} <= used
    assert used <= set(exported), f"not exported: {sorted(used - set(exported))}"
    for expr in worker_exprs:
        for grouped, metric in re.findall(r"by \(([^)]*)\)\s*\((?:rate|increase)\((\w+)\{", expr):
            for label in (x.strip() for x in grouped.split(",")):
                assert label in exported[metric], f"{metric}: by {label}"


# -- Kubernetes ----------------------------------------------------------------------------

EXPECTED_KINDS = {
    "api.yaml": ["Deployment", "Service"],
    "worker.yaml": ["Deployment"],
    "flower.yaml": ["Deployment", "Service"],
    "configmap.yaml": ["ConfigMap"],
    "flower-auth.secret.example.yaml": ["Secret"],
    "redis-auth.secret.example.yaml": ["Secret"],
}


def test_every_k8s_manifest_parses_with_expected_kinds() -> None:
    found = {path.name for path in K8S.glob("*.yaml")}
    assert found == set(EXPECTED_KINDS)
    for name, kinds in EXPECTED_KINDS.items():
        docs = k8s_docs(name)
        assert sorted(d["kind"] for d in docs) == sorted(kinds), name
        for doc in docs:
            assert doc["apiVersion"] and doc["metadata"]["name"]
            assert "namespace" not in doc["metadata"]


def test_k8s_services_select_their_deployments() -> None:
    for name in ("api.yaml", "flower.yaml"):
        docs = k8s_docs(name)
        deployment, service = one(docs, "Deployment"), one(docs, "Service")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()
        port_names = {p["name"] for p in container(deployment)["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names


def test_k8s_api_probes_and_command() -> None:
    api = container(one(k8s_docs("api.yaml"), "Deployment"))
    assert command_text(api["command"]) == "gunicorn -c deploy/gunicorn.conf.py wsgi:app"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert api["ports"][0]["containerPort"] == 8000


def test_k8s_worker_command_and_liveness_agree_on_the_node_name() -> None:
    worker = container(one(k8s_docs("worker.yaml"), "Deployment"))
    command = command_text(worker["command"])
    assert "celery -A tasks worker" in command
    assert "--pool=prefork" in command
    node = re.search(r"-n (\S+)@%h", command)
    assert node is not None
    probe = command_text(worker["livenessProbe"]["exec"]["command"])
    assert "celery -A tasks inspect ping" in probe
    assert f"{node.group(1)}@$HOSTNAME" in probe
    assert probe.startswith("sh -c")  # $HOSTNAME needs a shell: exec probes have none
    # $(VAR) in a command expands only from variables the container defines.
    for var in re.findall(r"\$\((\w+)\)", command):
        assert var in {e["name"] for e in worker.get("env", [])}


def test_k8s_flower_auth_comes_from_the_secret() -> None:
    flower = container(one(k8s_docs("flower.yaml"), "Deployment"))
    assert "deploy/flower.sh" in command_text(flower["command"])
    env = {e["name"]: e for e in flower["env"]}
    ref = env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]
    secret = one(k8s_docs("flower-auth.secret.example.yaml"), "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]


def test_k8s_configmap_holds_known_settings_as_strings() -> None:
    data = one(k8s_docs("configmap.yaml"), "ConfigMap")["data"]
    # ConfigMap values must be strings: a bare YAML number is rejected by the API server.
    assert all(isinstance(v, str) for v in data.values())
    assert set(data) <= known_env_names()
    assert "MLFLOW_TRACKING_URI" in data
    for name in ("api.yaml", "worker.yaml", "flower.yaml"):
        refs = container(one(k8s_docs(name), "Deployment"))["envFrom"]
        assert {"configMapRef": {"name": "heimdall-config"}} in refs
        assert {"secretRef": {"name": "heimdall-redis"}} in refs


# -- .env.example --------------------------------------------------------------------------


def test_env_example_documents_every_setting() -> None:
    documented = env_example()
    missing = {field: env for field, env in settings_env_names().items() if env not in documented}
    assert not missing, f"document these settings in .env.example: {missing}"
    assert set(PROCESS_SETTINGS) <= set(documented)
    assert set(documented) <= known_env_names()


def test_env_example_documents_what_gunicorn_conf_reads() -> None:
    source = (DEPLOY / "gunicorn.conf.py").read_text()
    read = set(re.findall(r"os\.environ(?:\.get|\.setdefault)?\(\s*\"([A-Z_]+)\"", source))
    read |= set(re.findall(r"os\.environ\[\"([A-Z_]+)\"\]", source))
    assert read, "deploy/gunicorn.conf.py reads no environment variable any more?"
    assert read <= set(env_example())
    assert read <= set(PROCESS_SETTINGS)


def test_env_example_changes_nothing_when_copied() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    active = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert active == []
    # honcho (make run) loads .env: the file as shipped sets nothing.
    assert parse_dotenv("\n".join(lines)) == {}


def test_env_example_values_are_the_defaults(clean_env: pytest.MonkeyPatch) -> None:
    documented = env_example()
    defaults = Settings().model_dump()
    uncommented = "\n".join(f"{name}={value}" for name, value in documented.items() if value)
    # Uncommenting every line must not change a setting, as honcho would read it.
    for name, value in parse_dotenv(uncommented).items():
        assert value == documented[name], f"honcho reads {name} as {value!r}"
        if name in all_settings_env_names():
            clean_env.setenv(name, value)
    assert Settings().model_dump() == defaults
    for name, value in PROCESS_SETTINGS.items():
        assert documented[name] == value, name
    # Settings whose default is None are documented empty (and must stay commented out).
    for field, env in settings_env_names().items():
        if Settings.model_fields[field].default is None:
            assert documented[env] == "", env


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[str]:
    """Instructions of deploy/Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[str] = []
    pending = ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined = (pending + line).strip()
        pending = ""
        if joined:
            instructions.append(joined)
    return instructions


def test_dockerfile_builds_a_non_root_serving_image() -> None:
    instructions = dockerfile_instructions()
    froms = [i.split()[1] for i in instructions if i.startswith("FROM ")]
    assert froms and all(image == "python:3.11-slim" for image in froms)
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    text = "\n".join(instructions)
    assert "pip install ." in text
    assert "torch" not in text and "[train" not in text
    assert "PROMETHEUS_MULTIPROC_DIR=" in text
    healthchecks = [i for i in instructions if i.startswith("HEALTHCHECK ")]
    assert len(healthchecks) == 1 and "/health" in healthchecks[0]
    assert instructions[-1] == 'CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py", "wsgi:app"]'
    for instruction in instructions:
        if instruction.startswith("COPY ") and "--from=" not in instruction:
            for source in instruction.split()[1:-1]:
                assert (ROOT / source).exists(), source
