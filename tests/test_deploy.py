"""The deployment files, checked with what runs here (no Docker engine runs on these machines)."""

import json
import re
import subprocess
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_the_image_builds_and_serves_the_dashboard():
    """The image once held the binaries only, so a compose deployment served a dashboard that never
    hydrated: the builder stage must build the browser half and the collector serve it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^\s*&& ui/build.sh --release", dockerfile, re.M), "the builder stage builds the dashboard's wasm"
    assert "COPY --from=builder /out/site /usr/share/switchyard/site" in dockerfile
    assert re.search(r"^ENV COLLECTOR_UI_DIR=/usr/share/switchyard/site$", dockerfile, re.M), "the collector serves them from the image"


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def run_plan():
    """What ./run starts: {process: set of the environment variables it is given}."""
    out = subprocess.run([str(ROOT / "run"), "--plan"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    plan = {}
    for line in out.stdout.splitlines():
        name, *env = line.split()
        assert plan.setdefault(name, set(env)) == set(env), f"every {name} instance gets the same variables"
    return plan


def test_every_process_run_starts_is_in_compose_with_the_same_environment_variables():
    services = compose()["services"]
    plan = run_plan()
    assert {"collector", "nats", "registry", "users", "catalog", "inventory", "payments", "orders", "notifications",
            "gateway", "loadgen"} <= set(plan), plan
    for name, env in plan.items():
        assert name in services, f"./run starts {name}, which docker-compose.yml lacks"
        assert set(services[name].get("environment") or {}) == env, name


def test_compose_has_prometheus_with_the_repos_config_and_every_service_checked():
    services = compose()["services"]
    prom = services["prometheus"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    assert "--enable-feature=exemplar-storage" in prom["command"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["collector-otlp"]["metrics_path"] == "/metrics/otlp" and jobs["collector-otlp"]["honor_labels"] is True
    # Host names in the Prometheus config are compose services.
    for job in config["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                assert target.split(":")[0] in services, target
    # Every long-running service has ports, an environment, a health check, and a volume for its state.
    for name, svc in services.items():
        if name == "loadgen":
            continue  # a client: it serves nothing and keeps no state
        assert svc.get("ports") or svc.get("expose"), name
        assert "healthcheck" in svc and svc["healthcheck"]["test"], name
        assert svc.get("volumes") or name == "gateway", f"{name} keeps its data in a volume"  # the gateway keeps none
        assert "environment" in svc or name == "nats", name


def test_compose_follows_the_compose_specification_schema():
    schema = json.loads((ROOT / "deploy" / "compose-spec.schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert errors == []
    # The schema is strict enough to catch a mistake.
    broken = compose()
    broken["services"]["gateway"]["healthcheck"]["intervall"] = "5s"
    assert any("intervall" in e.message for e in validator.iter_errors(broken))
