"""The shipped deploy files pass the real validators.

* ``promtool check rules`` and ``promtool test rules`` over deploy/prometheus
  (every alert has a case where it fires and one where it must not, in
  deploy/prometheus/tests/heimdall.test.yml);
* ``docker-compose config`` over docker-compose.yml (Debian's docker-compose,
  no engine needed);
* the Kubernetes manifests against the Kubernetes JSON schemas
  (``kubernetes-validate``, schemas shipped in the package: no cluster, no network).

``make test`` installs promtool and docker-compose (deploy/ensure-tools.sh);
where that was impossible these tests skip and say why. Each validator is also
shown a broken file, so a validator that accepts anything fails here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS / "rules" / "heimdall.rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "heimdall.test.yml"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30.0"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed and deploy/ensure-tools.sh could not install it "
            f"(Debian package {package}; needs apt-get as root)"
        )
    return path


def _run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


# -- Prometheus rules ----------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    promtool = _tool("promtool", "prometheus")
    result = _run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_every_alert_pass() -> None:
    promtool = _tool("promtool", "prometheus")
    result = _run(promtool, "test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    assert alerts == fired, f"alerts never shown firing: {sorted(alerts - fired)}"
    assert alerts == quiet, f"alerts never shown quiet: {sorted(alerts - quiet)}"
    assert {
        "HeimdallPredictLatencyHigh",
        "HeimdallPredictErrorRatioHigh",
        "HeimdallCacheHitRatioLow",
        "HeimdallNoReadyWorker",
        "HeimdallQueueGrowing",
        "HeimdallRedisMemoryNearMax",
        "HeimdallWorkerHeartbeatMissing",
    } <= alerts


def test_promtool_rejects_a_wrong_expectation(tmp_path: Path) -> None:
    promtool = _tool("promtool", "prometheus")
    (tmp_path / "rules").mkdir()
    shutil.copy(RULES, tmp_path / "rules" / RULES.name)
    broken = RULE_TESTS.read_text().replace("severity: critical", "severity: page", 1)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / RULE_TESTS.name).write_text(broken)
    result = _run(promtool, "test", "rules", tmp_path / "tests" / RULE_TESTS.name)
    assert result.returncode != 0


# -- docker-compose ------------------------------------------------------------------------


def _compose_config(source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of ``source`` as if it were the repo's compose file.

    Debian's docker-compose (1.29) predates the top-level ``name:`` of the Compose
    Specification; it is passed as ``-p`` instead, everything else is checked as is.
    """
    compose = _tool("docker-compose", "docker-compose")
    document = yaml.safe_load(source)
    project = str(document.get("name", "heimdall")) if isinstance(document, dict) else "heimdall"
    lines = [line for line in source.splitlines() if not line.startswith("name:")]
    path = tmp_path / "docker-compose.yml"
    path.write_text("\n".join(lines) + "\n")
    return _run(compose, "--project-directory", ROOT, "-p", project, "-f", path, "config", "-q")


def test_docker_compose_config_accepts_the_compose_file(tmp_path: Path) -> None:
    result = _compose_config((ROOT / "docker-compose.yml").read_text(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    source = (ROOT / "docker-compose.yml").read_text()
    broken = source.replace("  worker:\n", "  worker:\n    replicas_typo: 2\n", 1)
    assert broken != source
    result = _compose_config(broken, tmp_path)
    assert result.returncode != 0


# -- Kubernetes ----------------------------------------------------------------------------


def _validate_k8s(document: dict[str, object]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(document, K8S_VERSION, strict=True)


def _manifests() -> list[tuple[str, dict[str, object]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((f"{path.name}:{document['kind']}", document))
    return found


@pytest.mark.parametrize(("name", "document"), _manifests(), ids=lambda v: str(v)[:40])
def test_k8s_manifest_is_valid_against_the_schema(name: str, document: dict[str, object]) -> None:
    _validate_k8s(document)


def test_k8s_schema_check_rejects_a_wrong_field() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    document = yaml.safe_load((K8S / "configmap.yaml").read_text())
    document["data"] = {"HEIMDALL_LOG_LEVEL": 3}  # ConfigMap values must be strings
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(document, K8S_VERSION, strict=True)
