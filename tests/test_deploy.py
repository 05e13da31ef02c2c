"""deploy/kubernetes: the YAML parses, carries what a cluster needs, and the commands it runs are real
s3cache command lines (parsed by the real click commands, and run against a real daemon)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from conftest import write_manifest

from s3cache.cli import main
from s3cache.manifest.parse import Entry, parse

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"


def docs(name: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all((K8S / name).read_text()) if d}


def parse_command(argv: list[str]) -> click.Context:
    """The context click builds for ``argv`` (types converted, required options checked), not invoked."""
    assert argv[0] == "s3cache", argv
    cmd = main.get_command(click.Context(main), argv[1])
    assert cmd is not None, f"no command {argv[1]!r}"
    return cmd.make_context(argv[1], list(argv[2:]))


def mounts_of(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def test_daemonset_is_complete_and_its_commands_are_valid():
    ds = docs("daemonset.yaml")["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    (c,) = [c for c in pod["containers"] if c["name"] == "s3cache"]
    ctx = parse_command(expand(c["command"], c, {"status.podIP": "10.1.2.3"}))
    assert ctx.info_name == "serve"
    p = ctx.params
    assert p["manifest_dir"] is not None and p["max_size"] > 0 and p["metrics_addr"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = mounts_of(c)
    # the cache dir is the node's disk, the manifest comes from the ConfigMap
    cache = mounts[str(p["cache_dir"])]
    assert "hostPath" in volumes[cache["name"]] and not cache.get("readOnly")
    manifest_dir = str(p["manifest_dir"])
    assert volumes[mounts[manifest_dir]["name"]]["configMap"]["name"] == docs("configmap.yaml")["ConfigMap"]["metadata"]["name"]
    assert all(key.endswith(".txt") for key in docs("configmap.yaml")["ConfigMap"]["data"])  # each key a job
    # probes run a real status command against the same cache dir: alive while starting (startup,
    # liveness), ready only once serving (readiness)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        pctx = parse_command(c[probe]["exec"]["command"])
        assert pctx.info_name == "status" and pctx.params["cache_dir"] == p["cache_dir"]
        assert pctx.params["ready"] == (probe == "readinessProbe"), probe
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # metrics: a port for the scraper, matching --metrics-addr (non-loopback is explicitly allowed); and
    # the peer tier's port, matching --peer-addr
    port = int(p["metrics_addr"].rpartition(":")[2])
    ports = {pt["name"]: pt["containerPort"] for pt in c["ports"]}
    assert ports == {"metrics": port, "peer": int(p["peer_addr"].rpartition(":")[2])} and p["metrics_allow_remote"]


def daemon_container() -> tuple[dict, dict]:
    """The DaemonSet's pod spec and its s3cache container."""
    pod = docs("daemonset.yaml")["DaemonSet"]["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "s3cache"]
    return pod, c


def expand(argv: list[str], container: dict, values: dict[str, str]) -> list[str]:
    """``argv`` with each ``$(VAR)`` of the container's env replaced as the kubelet does; a variable taken
    from the pod's fields (``fieldRef``) gets ``values[fieldPath]``."""
    env = {e["name"]: e.get("value") or values[e["valueFrom"]["fieldRef"]["fieldPath"]] for e in container["env"]}
    out = []
    for a in argv:
        for name, value in env.items():
            a = a.replace(f"$({name})", value)
        assert "$(" not in a, f"{a}: a variable the container does not define"
        out.append(a)
    return out


def test_the_peer_tier_has_its_port_a_headless_service_and_a_private_secret():
    """The DaemonSet's peer flags name what peers.yaml ships: --peers dns: the headless Service selecting
    the daemon pods, on the port --peer-addr listens on; --peer-secret-file the shipped Secret's key,
    mounted as a plain file (a Secret volume's entries are symlinks, which the daemon will not open),
    readable by the daemon's group and not by others; and the Secret ships no key every cluster would share."""
    from s3cache.peer.members import source_kind

    pod, c = daemon_container()
    ds = docs("daemonset.yaml")["DaemonSet"]
    p = parse_command(expand(c["command"], c, {"status.podIP": "10.1.2.3"})).params
    assert p["peer_addr"].startswith("10.1.2.3:")
    peer_port = int(p["peer_addr"].rpartition(":")[2])
    shipped = docs("peers.yaml")
    svc = shipped["Service"]
    assert source_kind(p["peers"]) == "dns"
    name, namespace, rest = p["peers"][len("dns:"):].split(".", 2)
    assert (name, namespace) == (svc["metadata"]["name"], svc["metadata"]["namespace"]) and rest.startswith("svc")
    assert namespace == ds["metadata"]["namespace"]
    assert svc["spec"]["clusterIP"] == "None" and not svc["spec"].get("publishNotReadyAddresses")
    assert svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    (sp,) = svc["spec"]["ports"]
    ports = {pt["name"]: pt["containerPort"] for pt in c["ports"]}
    assert sp["port"] == peer_port == ports[sp["targetPort"]]

    secret = shipped["Secret"]
    assert not secret.get("data") and not secret.get("stringData")  # each cluster sets its own key
    mount = mounts_of(c)[str(p["peer_secret_file"])]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert vol["secret"]["secretName"] == secret["metadata"]["name"] and mount.get("readOnly")
    assert mount["subPath"] in {i["path"] for i in vol["secret"]["items"]}  # one regular file, not a symlink
    mode = vol["secret"]["defaultMode"]
    assert mode & 0o007 == 0 and mode & 0o040  # the daemon's group reads it (fsGroup), others never
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]

    policy = shipped["NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"]["labels"].items()
    rules = {r["ports"][0]["port"]: r.get("from") for r in policy["spec"]["ingress"]}
    assert set(rules) == set(ports)  # every port the daemon opens is admitted, and only those
    assert [f["podSelector"]["matchLabels"] for f in rules["peer"]] == [policy["spec"]["podSelector"]["matchLabels"]]


def test_the_daemonsets_peer_flags_start_a_real_daemon(tmp_path, s3, bucket, daemons):
    """The DaemonSet's peer flags as written, with the pod's IP 127.0.0.1, a free port, localhost for the
    Service's name and the secret file in the mode the Secret volume gives it: the daemon starts, finds
    itself in DNS, and serves."""
    from s3cache.testing import free_port

    pod, c = daemon_container()
    argv = expand(c["command"], c, {"status.podIP": "127.0.0.1"})
    port = free_port()
    vol = next(v for v in pod["volumes"] if "secret" in v)
    secret = tmp_path / "peer-secret"
    secret.write_text(os.urandom(32).hex())
    os.chmod(secret, vol["secret"]["defaultMode"])
    peer_args = []
    for flag in ("--peers", "--peer-addr", "--peer-secret-file"):
        value = argv[argv.index(flag) + 1]
        value = {"--peers": "dns:localhost", "--peer-secret-file": str(secret)}.get(flag, value)
        peer_args += [flag, value.replace(":7480", f":{port}")]
    s3.put_object(Bucket=bucket, Key="train-0", Body=b"a" * 100)
    d = daemons(tmp_path / "cache", manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/train-0"]),
                args=peer_args)
    st = d.status()["peers"]
    assert st["me"] == f"127.0.0.1:{port}" and st["hosts"] >= 1


def test_every_namespace_used_is_shipped_and_admits_hostpath_volumes():
    """``kubectl apply -f deploy/kubernetes`` works as shipped: each object's namespace is a Namespace
    applied with it, and a namespace holding a pod with a hostPath volume enforces the one Pod Security
    level that admits hostPath (baseline and restricted forbid it)."""
    objects = [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    shipped = {d["metadata"]["name"]: d for d in objects if d["kind"] == "Namespace"}
    used = {d["metadata"]["namespace"] for d in objects if d["kind"] != "Namespace"}
    assert used and used <= shipped.keys(), f"namespaces used but not shipped: {used - shipped.keys()}"
    # kubectl apply -f DIR takes the files in name order: the Namespace must come before its objects
    first = sorted(K8S.glob("*.yaml"))[0]
    assert {d["kind"] for d in yaml.safe_load_all(first.read_text()) if d} == {"Namespace"}, first.name
    for d in objects:
        pod = d["spec"]["template"]["spec"] if d["kind"] == "DaemonSet" else d["spec"] if d["kind"] == "Pod" else None
        if pod and any("hostPath" in v for v in pod.get("volumes", [])):
            labels = shipped[d["metadata"]["namespace"]]["metadata"]["labels"]
            assert labels["pod-security.kubernetes.io/enforce"] == "privileged", d["metadata"]["name"]


def test_the_docs_say_why_the_namespace_is_privileged_and_never_to_pip_install_the_name():
    operating = (ROOT / "docs" / "operating.md").read_text()
    assert "pod-security.kubernetes.io/enforce" in operating and "hostPath" in operating
    for f in K8S.glob("*.yaml"):
        assert "pip install s3cache" not in f.read_text(), f  # that name on PyPI is another project


def test_the_startup_probe_gives_a_slow_start_its_time():
    (c,) = [c for c in docs("daemonset.yaml")["DaemonSet"]["spec"]["template"]["spec"]["containers"]]
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 120  # a cold million-entry start fits
    assert "initialDelaySeconds" not in c["livenessProbe"]  # the startup probe gates liveness instead


def test_configmap_manifests_parse():
    data = docs("configmap.yaml")["ConfigMap"]["data"]
    assert data
    for name, text in data.items():
        assert name.endswith(".txt")
        entries = list(parse(text.splitlines(), path=name))
        assert entries and all(isinstance(e, Entry) for e in entries)


def test_pod_example_mounts_the_same_cache_read_only_and_joins_its_group():
    ds_pod = docs("daemonset.yaml")["DaemonSet"]["spec"]["template"]["spec"]
    pod = docs("pod-example.yaml")["Pod"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    mount = mounts_of(c)[env["S3CACHE_DIR"]]
    assert mount["readOnly"] is True
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (ds_vol,) = [v for v in ds_pod["volumes"] if "hostPath" in v]
    assert vol["hostPath"]["path"] == ds_vol["hostPath"]["path"]
    assert ds_pod["securityContext"]["runAsGroup"] in pod["securityContext"]["supplementalGroups"]
    assert pod["nodeSelector"] == ds_pod["nodeSelector"]
    assert "resolve(" in c["command"][-1]


def test_the_examples_commands_work_against_a_real_daemon(tmp_path, s3, bucket, daemons):
    """The pod's reader program and the DaemonSet's probe, run as written (only paths and URIs swapped)."""
    s3.put_object(Bucket=bucket, Key="train-0", Body=b"a" * 100)
    s3.put_object(Bucket=bucket, Key="train-1", Body=b"b" * 200)
    probe = docs("daemonset.yaml")["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    argv = probe["exec"]["command"]
    cache = tmp_path / "cache"
    probe_cmd = [sys.executable, "-m", "s3cache", *[str(cache) if a == "/cache" else a for a in argv[1:]]]
    assert subprocess.run(probe_cmd, capture_output=True, timeout=120).returncode != 0  # no daemon: not ready
    d = daemons(cache, manifest=write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/train-0"]))
    r = subprocess.run(probe_cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ready: serving "), r.stdout + r.stderr

    (c,) = docs("pod-example.yaml")["Pod"]["spec"]["containers"]
    assert c["command"][:2] == ["python", "-c"]
    env = {**os.environ, "S3CACHE_DIR": str(d.cache_dir),
           "TRAIN_URIS": f"s3://{bucket}/train-0 s3://{bucket}/train-1"}
    r = subprocess.run([sys.executable, "-c", c["command"][2]], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert [line.split()[1] for line in r.stdout.splitlines()] == ["100", "200"]


@pytest.mark.parametrize("bad", [["s3cache", "serve", "--max-size", "12Q"], ["s3cache", "serve", "--no-such"]])
def test_parse_command_rejects_what_click_rejects(bad):
    with pytest.raises(click.UsageError):
        parse_command(bad)
