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
    ctx = parse_command(c["command"])
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
    # probes run a real status command against the same cache dir
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        pctx = parse_command(c[probe]["exec"]["command"])
        assert pctx.info_name == "status" and pctx.params["as_json"] and pctx.params["cache_dir"] == p["cache_dir"]
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # metrics: a port for the scraper, matching --metrics-addr (non-loopback is explicitly allowed)
    port = int(p["metrics_addr"].rpartition(":")[2])
    assert {pt["containerPort"] for pt in c["ports"]} == {port} and p["metrics_allow_remote"]


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
    assert r.returncode == 0 and '"objects"' in r.stdout

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
