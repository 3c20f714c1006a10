"""The Helm chart, offline: lint, render, validate against Kubernetes 1.32's schemas, and check that
what it renders actually works for this pipeline (the config parses, each pod finds its shard, the
Services find the pods, secrets come from existing Secrets). No cluster runs here.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import run, tool, venv_tool
from helpers import ROOT

from stream.config import load_config
from stream.live.shard import resolve

CHART = ROOT / "helm" / "stream-redact"
VALUES = {
    "default": None,
    "gpu-auth": CHART / "ci" / "gpu-auth-values.yaml",
    "external-mediamtx": CHART / "ci" / "external-mediamtx-values.yaml",
}
K8S = "1.32.0"
CRDS = {"ServiceMonitor"}  # not in the Kubernetes schemas; checked by hand below


def helm(*args: str) -> Any:
    return run([tool("helm"), *args])


@functools.cache
def rendered(name: str) -> list[dict]:
    values = VALUES[name]
    res = helm("template", "sr", str(CHART), "--namespace", "video", *(["-f", str(values)] if values else []))
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def worker(docs: list[dict]) -> dict:
    return one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.mark.parametrize("name", list(VALUES))
def test_lint_strict(name: str) -> None:
    values = VALUES[name]
    res = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


@pytest.mark.parametrize("name", list(VALUES))
def test_rendered_manifests_are_valid_kubernetes(name: str, tmp_path: Path) -> None:
    docs = [d for d in rendered(name) if d["kind"] not in CRDS]
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    res = run([venv_tool("kubernetes-validate"), "-k", K8S, "--strict", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == len(docs), res.stdout


def test_gpu_workers() -> None:
    docs = rendered("gpu-auth")
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = worker(docs)
    assert sts["spec"]["replicas"] == 3
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["runtimeClassName"] == "nvidia"
    assert c["image"] == "registry.example.org/video/stream-redact:0.1.0-gpu"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast-ssd"


def test_default_is_one_cpu_worker() -> None:
    docs = rendered("default")
    c = worker(docs)
    assert one(docs, "StatefulSet")["spec"]["replicas"] == 1
    assert "nvidia.com/gpu" not in str(c["resources"])
    assert c["image"] == "stream-redact:0.1.0-cpu"
    assert "STREAM_REDACT_TOKENS" not in env_of(c)  # no secret named: the API refuses all (safe default)
    assert not [d for d in docs if d["kind"] == "ServiceMonitor"]


@pytest.mark.parametrize("name", list(VALUES))
def test_workers_are_locked_down(name: str) -> None:
    docs = rendered(name)
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    sc = worker(docs)["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"] for m in worker(docs)["volumeMounts"]}
    assert {"/tmp", "/var/lib/stream-redact", "/etc/stream-redact"} <= mounts  # writable where it must be
    # the frame slots of pipeline.workers > 1 live in /dev/shm: memory, sized, not the runtime's 64 MiB
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert "/dev/shm" in mounts and shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    if any(d["kind"] == "Deployment" for d in docs):
        msc = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["securityContext"]
        assert msc["readOnlyRootFilesystem"] is True and msc["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("name", list(VALUES))
def test_probes_use_the_health_endpoints(name: str) -> None:
    c = worker(rendered(name))
    port = c["ports"][0]
    assert port["name"] == "http" and port["containerPort"] == 9108
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_secrets_come_from_existing_secrets() -> None:
    c = worker(rendered("gpu-auth"))
    env = env_of(c)
    refs = {k: v["valueFrom"]["secretKeyRef"] for k, v in env.items() if "valueFrom" in v
            and "secretKeyRef" in v["valueFrom"]}
    assert refs == {
        "STREAM_REDACT_TOKENS": {"name": "stream-redact-tokens", "key": "tokens"},
        "KAFKA_SASL_PASSWORD": {"name": "stream-redact-kafka", "key": "password"},
        "MEDIAMTX_USER": {"name": "stream-redact-mediamtx", "key": "username"},
        "MEDIAMTX_PASSWORD": {"name": "stream-redact-mediamtx", "key": "password"},
    }
    assert c["envFrom"] == [{"secretRef": {"name": "camera-credentials"}}]
    assert not [d for d in rendered("gpu-auth") if d["kind"] == "Secret"]  # the chart never holds secrets
    text = yaml.safe_dump_all(rendered("gpu-auth"))
    assert "password:" not in text.replace("password_env:", "")


def _pipeline_config(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The rendered pipeline config, loaded as a worker would (env from its Secrets, files mounted)."""
    docs = rendered(name)
    text = one(docs, "ConfigMap", "sr-stream-redact")["data"]["config.yaml"]
    for var in ("CAM_USER", "CAM_PASS", "MEDIAMTX_USER", "MEDIAMTX_PASSWORD", "KAFKA_SASL_PASSWORD"):
        monkeypatch.setenv(var, f"{var.lower()}-value")
    (tmp_path / "kafka-tls").mkdir()
    (tmp_path / "kafka-tls" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    text = text.replace("/etc/stream-redact/kafka-tls", str(tmp_path / "kafka-tls"))
    text = text.replace("/var/lib/stream-redact", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()  # the state volume
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path)


@pytest.mark.parametrize("name", list(VALUES))
def test_pipeline_config_is_valid(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _pipeline_config(name, tmp_path, monkeypatch)
    assert cfg.http.host == "0.0.0.0" and cfg.http.port == 9108
    assert cfg.auth.tokens_env == "STREAM_REDACT_TOKENS"
    for s in cfg.streams:  # every stream is published to the media server, under redacted/<id>
        urls = [o.url for o in s.outputs if o.type == "rtsp"]
        assert urls and urls[-1].endswith(f":8554/redacted/{s.id}"), urls


def test_gpu_config_sends_events_to_kafka_over_sasl_ssl(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _pipeline_config("gpu-auth", tmp_path, monkeypatch)
    k = cfg.events.kafka
    assert k is not None and k.security_protocol == "SASL_SSL"
    assert k.bootstrap_servers == ["kafka-0.kafka.data.svc:9093", "kafka-1.kafka.data.svc:9093"]
    assert k.sasl is not None and k.sasl.password_env == "KAFKA_SASL_PASSWORD" and k.sasl.username
    assert k.ssl is not None and k.ssl.ca_file is not None and k.ssl.ca_file.name == "ca.crt"
    assert cfg.streams[0].outputs[-1].url.startswith("rtsp://mediamtx_user-value:mediamtx_password-value@"
                                                      "sr-stream-redact-mediamtx:8554/")
    c = worker(rendered("gpu-auth"))
    mount = next(m for m in c["volumeMounts"] if m["name"] == "kafka-tls")
    assert mount["mountPath"] == "/etc/stream-redact/kafka-tls"


@pytest.mark.parametrize("name", list(VALUES))
def test_every_stream_runs_on_exactly_one_pod(name: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What each pod's `--shard-index auto` resolves to, from its host name and the chart's env."""
    docs = rendered(name)
    sts = one(docs, "StatefulSet")
    env = env_of(worker(docs))
    count = env["STREAM_REDACT_SHARD_COUNT"]["value"]
    assert env["STREAM_REDACT_SHARD_INDEX"]["value"] == "auto"
    assert int(count) == sts["spec"]["replicas"]
    ids = [s.id for s in _pipeline_config(name, tmp_path, monkeypatch).streams]
    runs: list[str] = []
    for i in range(sts["spec"]["replicas"]):
        shard = resolve(None, None, environ={"STREAM_REDACT_SHARD_INDEX": "auto",
                                             "STREAM_REDACT_SHARD_COUNT": count},
                        hostname=f"{sts['metadata']['name']}-{i}")
        assert shard is not None and shard.index == i
        runs += shard.split(ids)[0]
    assert sorted(runs) == sorted(ids)


@pytest.mark.parametrize("name", list(VALUES))
def test_services_and_budget_select_the_workers(name: str) -> None:
    docs = rendered(name)
    sts = one(docs, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = one(docs, "Service", "sr-stream-redact")
    headless = one(docs, "Service", "sr-stream-redact-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == "sr-stream-redact-headless"
    for s in (svc, headless):
        assert s["spec"]["selector"].items() <= labels.items()
        assert s["spec"]["ports"][0]["targetPort"] == "http"
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for pdb in pdbs:
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        assert sm["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()
        assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_mediamtx_component() -> None:
    docs = rendered("gpu-auth")
    conf = yaml.safe_load(one(docs, "ConfigMap", "sr-stream-redact-mediamtx")["data"]["mediamtx.yml"])
    users = {u["user"]: u for u in conf["authInternalUsers"]}
    assert {p["action"] for p in users["any"]["permissions"]} == {"read", "playback"}  # viewers only read
    assert users["stream-redact"]["pass"].startswith("sha256:")
    assert all(p["path"] == "~^redacted/" for u in users.values() for p in u["permissions"])
    svc = one(docs, "Service", "sr-stream-redact-mediamtx")
    assert {p["port"] for p in svc["spec"]["ports"]} == {8554, 8888, 8889, 8189}
    external = rendered("external-mediamtx")
    assert not [d for d in external if "mediamtx" in d["metadata"]["name"]]


BAD_VALUES = [
    ({"replicaCount": 0}, "replicaCount: Must be greater than or equal to 1"),
    ({"gpu": {"enabled": True, "count": "two"}}, "gpu.count: Invalid type. Expected: integer, given: string"),
    ({"streams": [{"id": "bad id!", "source": {"type": "rtsp"}}]}, "streams.0.id: Does not match pattern"),
    ({"streams": [{"id": "a", "source": {"type": "http"}}]}, "streams.0.source.type"),
    ({"streams": [{"id": "a"}]}, "streams.0: source is required"),
    ({"kafka": {"enabled": True}}, "kafka.bootstrapServers: Array must have at least 1 items"),
    ({"kafka": {"enabled": True, "bootstrapServers": ["k:9093"], "securityProtocol": "SASL_SSL"}},
     "kafka.sasl.existingSecret: String length must be greater than or equal to 1"),
    ({"kafka": {"bootstrapServers": ["kafka"]}}, "kafka.bootstrapServers.0: Does not match pattern"),
    ({"kafka": {"securityProtocol": "TLS"}}, "kafka.securityProtocol"),
    ({"auth": {"existingSecret": "Not_A_Secret_Name"}}, "auth.existingSecret"),
    ({"service": {"port": 70000}}, "service.port: Must be less than or equal to 65535"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "podSecurityContext.runAsNonRoot"),
    ({"securityContext": {"allowPrivilegeEscalation": True}}, "securityContext.allowPrivilegeEscalation"),
    ({"pipeline": {"streams": []}}, "pipeline: Must not validate the schema (not)"),
    ({"mediamtx": {"enabled": False}},
     "mediamtx.externalUrl: String length must be greater than or equal to 1"),
    ({"mediamtx": {"publisher": {"existingSecret": "mtx"}}}, "mediamtx.publisher.passHash"),
    ({"resources": {"limits": {"memory": "lots"}}}, "resources.limits.memory"),
    ({"replicas": 3}, "Additional property replicas is not allowed"),
]


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=[m.split(":")[0] for _, m in BAD_VALUES])
def test_bad_values_are_rejected_by_the_schema(values: dict, message: str, tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(values))
    res = helm("template", "sr", str(CHART), "-f", str(f))
    assert res.returncode != 0, f"accepted: {values}"
    assert "values don't meet the specifications of the schema" in res.stderr, res.stderr
    assert message in res.stderr, res.stderr


def test_duplicate_stream_ids_are_rejected(tmp_path: Path) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text(yaml.safe_dump({"streams": [{"id": "a", "source": {"type": "whip"}}] * 2}))
    res = helm("template", "sr", str(CHART), "-f", str(f))
    assert res.returncode != 0
    assert 'streams: id "a" is used twice; give each stream its own id' in res.stderr


def test_chart_packages(tmp_path: Path) -> None:
    res = helm("package", str(CHART), "-d", str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "stream-redact-0.1.0.tgz").is_file()


# cluster.mode kafka: a Deployment whose pods share the streams through a Kafka consumer group.
KAFKA_SERVERS = "kafka.data.svc:9092"
KAFKA_VALUES = {
    # the production-shaped example: GPUs, SASL/TLS, autoscaler, ServiceMonitor
    "kafka-cluster": ["-f", str(CHART / "ci" / "kafka-cluster-values.yaml")],
    # the defaults with the mode flipped and brokers given: nothing else set
    "kafka-plain": ["--set", "cluster.mode=kafka,kafka.enabled=true",
                    "--set", f"kafka.bootstrapServers={{{KAFKA_SERVERS}}}"],
}


@functools.cache
def rendered_kafka(name: str) -> list[dict]:
    res = helm("template", "sr", str(CHART), "--namespace", "video", *KAFKA_VALUES[name])
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def kafka_workers(docs: list[dict]) -> dict:
    """The worker Deployment (the chart's other Deployment is MediaMTX's)."""
    return one(docs, "Deployment", "sr-stream-redact")


def kafka_worker(docs: list[dict]) -> dict:
    return kafka_workers(docs)["spec"]["template"]["spec"]["containers"][0]


def render_fails(values: dict, tmp_path: Path) -> str:
    """Render with ``values``; the render must fail. Returns helm's error output."""
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    res = helm("template", "sr", str(CHART), "-f", str(f))
    assert res.returncode != 0, f"rendered: {values}"
    return res.stderr


def kafka_mode(**more: Any) -> dict:
    """Values for kafka mode with brokers, merged one level deep with ``more``."""
    values: dict[str, Any] = {"cluster": {"mode": "kafka"},
                              "kafka": {"enabled": True, "bootstrapServers": [KAFKA_SERVERS]}}
    for key, value in more.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and key in values else value
    return values


@pytest.mark.parametrize("name", list(KAFKA_VALUES))
def test_kafka_mode_lint_strict(name: str) -> None:
    res = helm("lint", "--strict", str(CHART), *KAFKA_VALUES[name])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


@pytest.mark.parametrize("name", list(KAFKA_VALUES))
def test_kafka_mode_manifests_are_valid_kubernetes(name: str, tmp_path: Path) -> None:
    docs = [d for d in rendered_kafka(name) if d["kind"] not in CRDS]
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    res = run([venv_tool("kubernetes-validate"), "-k", K8S, "--strict", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed") == len(docs), res.stdout


@pytest.mark.parametrize("name", list(KAFKA_VALUES))
def test_kafka_mode_runs_a_deployment_of_single_process_workers(name: str) -> None:
    docs = rendered_kafka(name)
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    dep = kafka_workers(docs)
    c = kafka_worker(docs)
    assert c["args"] == ["run", "--config", "/etc/stream-redact/config.yaml", "--workers", "1"]
    env = env_of(c)
    assert not {"STREAM_REDACT_SHARD_INDEX", "STREAM_REDACT_SHARD_COUNT"} & env.keys()
    assert not any("--shard" in a for a in c["args"])
    # a replaced pod's streams are started elsewhere before it is gone: one extra pod, none missing
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate",
                                       "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    # the same pod as in static mode otherwise: probes, lockdown, mounts
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert {"/tmp", "/var/lib/stream-redact", "/etc/stream-redact", "/dev/shm"} <= {
        m["mountPath"] for m in c["volumeMounts"]}
    assert next(v for v in pod["volumes"] if v["name"] == "state")["emptyDir"]


def test_kafka_mode_pods_may_run_worker_processes_each_a_member_with_its_port(tmp_path: Path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(kafka_mode(pipeline={"workers": 3}, replicaCount=2)))
    res = helm("template", "sr", str(CHART), "-f", str(f))
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    c = kafka_worker(docs)
    assert c["args"] == ["run", "--config", "/etc/stream-redact/config.yaml", "--workers", "3"]
    port = c["ports"][0]["containerPort"]
    assert [(p["name"], p["containerPort"]) for p in c["ports"][1:]] == [
        (f"worker-{i}", port + 1 + i) for i in range(3)]
    config = yaml.safe_load(one(docs, "ConfigMap", "sr-stream-redact")["data"]["config.yaml"])
    assert config["workers"] == 3 and config["cluster"]["advertise_url"] == f"http://${{POD_IP}}:{port}"
    out = tmp_path / "m.yaml"
    out.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] not in CRDS]))
    valid = run([venv_tool("kubernetes-validate"), "-k", K8S, "--strict", str(out)])
    assert valid.returncode == 0, valid.stdout + valid.stderr


def test_kafka_mode_replicas_and_autoscaler() -> None:
    plain = rendered_kafka("kafka-plain")
    assert kafka_workers(plain)["spec"]["replicas"] == 1  # replicaCount, as in static mode
    assert not [d for d in plain if d["kind"] == "HorizontalPodAutoscaler"]  # off by default

    docs = rendered_kafka("kafka-cluster")
    dep = kafka_workers(docs)
    assert "replicas" not in dep["spec"]  # the autoscaler owns the count; an upgrade must not reset it
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}]
    # scaling down moves streams: at most one worker at a time, after a long quiet spell
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert down["stabilizationWindowSeconds"] >= 300
    assert kafka_worker(docs)["resources"]["requests"]["cpu"] == "6"  # what utilisation is measured against


@pytest.mark.parametrize("name, session", [("kafka-plain", 10), ("kafka-cluster", 15)])
def test_kafka_mode_gives_a_stopping_pod_time_to_hand_over(name: str, session: int) -> None:
    """SIGTERM: the pod stops its streams, then leaves the group; cut short, they stay dark a session."""
    pod = kafka_workers(rendered_kafka(name))["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == session + 50
    static = one(rendered("default"), "StatefulSet")["spec"]["template"]["spec"]
    assert static["terminationGracePeriodSeconds"] == 30  # static mode keeps its own value


def test_kafka_mode_grace_period_can_be_set(tmp_path: Path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(kafka_mode(cluster={"mode": "kafka", "terminationGracePeriodSeconds": 120})))
    res = helm("template", "sr", str(CHART), "-f", str(f))
    assert res.returncode == 0, res.stderr
    dep = one([d for d in yaml.safe_load_all(res.stdout) if d], "Deployment", "sr-stream-redact")
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120


@pytest.mark.parametrize("name", list(KAFKA_VALUES))
def test_kafka_mode_config_joins_the_group(name: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered config loads as a worker loads it, in kafka mode, on the brokers of the events."""
    docs = rendered_kafka(name)
    text = one(docs, "ConfigMap", "sr-stream-redact")["data"]["config.yaml"]
    for var in ("CAM_USER", "CAM_PASS", "KAFKA_SASL_PASSWORD"):
        monkeypatch.setenv(var, f"{var.lower()}-value")
    monkeypatch.setenv("POD_IP", "10.42.0.7")  # the downward API's status.podIP
    (tmp_path / "kafka-tls").mkdir()
    (tmp_path / "kafka-tls" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "state").mkdir()
    text = text.replace("/etc/stream-redact/kafka-tls", str(tmp_path / "kafka-tls"))
    text = text.replace("/var/lib/stream-redact", str(tmp_path / "state"))
    (tmp_path / "config.yaml").write_text(text)
    cfg = load_config(tmp_path / "config.yaml")
    expected = {
        "kafka-plain": ("stream-redact", 64, 10.0, [KAFKA_SERVERS], 0),
        "kafka-cluster": ("cctv-redaction", 32, 15.0,
                          ["kafka-0.kafka.data.svc:9093", "kafka-1.kafka.data.svc:9093"], 3),
    }[name]
    assert cfg.cluster.mode == "kafka"
    assert (cfg.cluster.group_id, cfg.cluster.partitions, cfg.cluster.session_timeout_s) == expected[:3]
    assert cfg.cluster.assignments_topic == "stream-redact.assignments"
    assert cfg.cluster.streams_topic == "stream-redact.streams"
    assert cfg.cluster.members_topic == "stream-redact.members"
    # other pods redirect API requests for this pod's streams to the pod's own address
    assert cfg.cluster.advertise_url == "http://10.42.0.7:9108"
    env = kafka_workers(docs)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in env
    assert cfg.events.kafka is not None and cfg.events.kafka.bootstrap_servers == expected[3]
    assert len(cfg.streams) == expected[4]  # every worker has every stream; the group picks which it runs
    # the pods roll when the cluster settings change
    checksum = kafka_workers(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert len(checksum) == 64


@pytest.mark.parametrize("name", list(VALUES))
def test_static_mode_config_has_no_cluster_section(name: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    text = one(rendered(name), "ConfigMap", "sr-stream-redact")["data"]["config.yaml"]
    assert "cluster" not in yaml.safe_load(text)
    assert _pipeline_config(name, tmp_path, monkeypatch).cluster.mode == "static"


def test_kafka_mode_services_budget_and_monitor_select_the_workers() -> None:
    for name in KAFKA_VALUES:
        docs = rendered_kafka(name)
        dep = kafka_workers(docs)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        svc = one(docs, "Service", "sr-stream-redact")
        assert svc["spec"]["selector"].items() <= labels.items() and svc["spec"]["ports"][0]["port"] == 9108
        pdb = one(docs, "PodDisruptionBudget")
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # no per-pod DNS in kafka mode: the headless Service is there only for the ServiceMonitor
    plain = rendered_kafka("kafka-plain")
    assert not [d for d in plain if d["metadata"]["name"] == "sr-stream-redact-headless"]
    docs = rendered_kafka("kafka-cluster")
    headless = one(docs, "Service", "sr-stream-redact-headless")
    assert headless["spec"]["selector"].items() <= kafka_workers(docs)["spec"]["template"]["metadata"][
        "labels"].items()
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= headless["metadata"]["labels"].items()


def test_kafka_mode_secrets_come_from_existing_secrets() -> None:
    docs = rendered_kafka("kafka-cluster")
    env = env_of(kafka_worker(docs))
    assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "stream-redact-kafka",
                                                                        "key": "password"}
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert "password:" not in yaml.safe_dump_all(docs).replace("password_env:", "")


def test_kafka_mode_pod_disruption_budget_is_configurable(tmp_path: Path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(kafka_mode(podDisruptionBudget={"maxUnavailable": "25%"})))
    res = helm("template", "sr", str(CHART), "-f", str(f))
    assert res.returncode == 0, res.stderr
    pdb = one([d for d in yaml.safe_load_all(res.stdout) if d], "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == "25%"


KAFKA_BAD = [
    ({"cluster": {"mode": "kafka"}},
     "cluster.mode kafka needs Kafka brokers, which the workers join a consumer group on: set "
     "kafka.enabled=true and kafka.bootstrapServers"),
    ({"cluster": {"mode": "kafka"}, "kafka": {"bootstrapServers": [KAFKA_SERVERS]}},
     "cluster.mode kafka needs Kafka brokers"),  # brokers given but Kafka off: still none to join
    (kafka_mode(persistence={"enabled": True}),
     "persistence.enabled needs cluster.mode static: in kafka mode the workers are a Deployment"),
    (kafka_mode(pipeline={"workers": 4}, replicaCount=17),
     "replicaCount (17) x pipeline.workers (4) = 68 group members is more than cluster.partitions (64)"),
    (kafka_mode(replicaCount=65), "replicaCount (65) is more than cluster.partitions (64)"),
    (kafka_mode(cluster={"autoscaling": {"enabled": True, "maxReplicas": 9}, "partitions": 8}),
     "cluster.autoscaling.maxReplicas (9) is more than cluster.partitions (8)"),
    (kafka_mode(cluster={"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}),
     "cluster.autoscaling.minReplicas (5) is more than cluster.autoscaling.maxReplicas (3)"),
    (kafka_mode(cluster={"autoscaling": {"enabled": True}}, resources={"requests": {"cpu": None}}),
     "cluster.autoscaling.enabled scales on CPU utilisation, which is measured against the pods' CPU "
     "request: set resources.requests.cpu"),
    (kafka_mode(cluster={"sessionTimeoutS": 30, "terminationGracePeriodSeconds": 40}),
     "cluster.terminationGracePeriodSeconds (40) is shorter than cluster.sessionTimeoutS + 20 s (50)"),
    (kafka_mode(cluster={"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}),
     "cluster.rollingUpdate.maxSurge and maxUnavailable are both 0"),
]


@pytest.mark.parametrize("values, message", KAFKA_BAD, ids=[m.split(" (")[0].split(":")[0][:40]
                                                              for _, m in KAFKA_BAD])
def test_kafka_mode_refuses_what_cannot_work(values: dict, message: str, tmp_path: Path) -> None:
    err = render_fails(values, tmp_path)
    assert message in err, err


KAFKA_SCHEMA_BAD = [
    ({"cluster": {"mode": "etcd"}}, "cluster.mode"),
    ({"cluster": {"sessionTimeoutS": 2}}, "cluster.sessionTimeoutS: Must be greater than or equal to 6"),
    ({"cluster": {"partitions": 0}}, "cluster.partitions: Must be greater than or equal to 1"),
    ({"cluster": {"groupId": ""}}, "cluster.groupId: String length must be greater than or equal to 1"),
    ({"cluster": {"assignmentsTopic": "no spaces"}}, "cluster.assignmentsTopic: Does not match pattern"),
    ({"cluster": {"shards": 3}}, "Additional property shards is not allowed"),
    ({"pipeline": {"cluster": {"mode": "kafka"}}}, "pipeline: Must not validate the schema (not)"),
]


@pytest.mark.parametrize("values, message", KAFKA_SCHEMA_BAD,
                         ids=[m.split(":")[0] for _, m in KAFKA_SCHEMA_BAD])
def test_bad_cluster_values_are_rejected_by_the_schema(values: dict, message: str, tmp_path: Path) -> None:
    err = render_fails(values, tmp_path)
    assert "values don't meet the specifications of the schema" in err, err
    assert message in err, err
