"""A refused manifest edit is visible (issue 26.3): ``status``'s ``manifest_errors`` and the
``s3cache_manifest_errors`` metric name it until a good version is installed, whether the watch or SIGHUP
read it; and under ``--manifest-dir`` each job's file is installed, or refused, on its own."""

from __future__ import annotations

import signal
import urllib.request

from conftest import write_manifest
from prometheus_client.parser import text_string_to_metric_families

from s3cache.testing import free_port, wait_for


def manifest_errors_metric(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        for fam in text_string_to_metric_families(r.read().decode()):
            for s in fam.samples:
                if s.name == "s3cache_manifest_errors":
                    return s.value
    raise AssertionError("no s3cache_manifest_errors sample")


def test_a_refused_edit_shows_in_status_and_the_metric_until_a_good_one_installs(tmp_path, s3, bucket, daemons):
    for k in ("a", "b"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode() * 100)
    m = write_manifest(tmp_path / "m.txt", [f"s3://{bucket}/a"])
    port = free_port()
    d = daemons(manifest=m, args=["--metrics-addr", f"127.0.0.1:{port}"])
    d.wait_until(lambda st: st["objects"]["ready"] == 1, what="the first manifest's object")
    assert d.status()["manifest_errors"] == [] and manifest_errors_metric(port) == 0

    write_manifest(m, [f"s3://{bucket}/a", f"s3://{bucket}/b colour=red"])
    st = d.wait_until(lambda st: st["manifest_errors"], timeout=30, what="the refused edit in status")
    assert len(st["manifest_errors"]) == 1 and f"{m}:2" in st["manifest_errors"][0]
    assert st["manifest_entries"] == 1 and manifest_errors_metric(port) == 1
    # SIGHUP reads the same bad file: still one error (the latest refusal), still the old manifest.
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: d.log().count("manifest not reloaded") >= 2, 30, "SIGHUP to refuse the bad line")
    st = d.status()
    assert len(st["manifest_errors"]) == 1 and f"{m}:2" in st["manifest_errors"][0]

    write_manifest(m, [f"s3://{bucket}/a", f"s3://{bucket}/b"])
    d.wait_until(lambda st: st["manifest_entries"] == 2 and st["manifest_errors"] == [], timeout=30,
                 what="the good edit to clear the error")
    assert manifest_errors_metric(port) == 0


def put_job(jobs, name: str, lines: list[str]) -> None:
    tmp = jobs / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.rename(jobs / f"{name}.txt")


def test_one_jobs_bad_file_holds_back_no_other_jobs_edit(tmp_path, s3, bucket, daemons):
    for k in ("a/0", "a/1", "b/0", "b/1"):
        s3.put_object(Bucket=bucket, Key=k, Body=k.encode())
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    put_job(jobs, "a", [f"s3://{bucket}/a/0"])
    put_job(jobs, "b", [f"s3://{bucket}/b/0"])
    d = daemons(args=["--manifest-dir", str(jobs)])
    d.wait_until(lambda st: st["objects"]["ready"] == 2, what="both jobs' files")

    put_job(jobs, "b", [f"s3://{bucket}/b/0", f"s3://{bucket}/b/1 size=many"])  # b breaks
    st = d.wait_until(lambda st: st["manifest_errors"], timeout=30, what="b's refusal in status")
    assert len(st["manifest_errors"]) == 1 and "b.txt:2" in st["manifest_errors"][0]
    put_job(jobs, "a", [f"s3://{bucket}/a/0", f"s3://{bucket}/a/1"])  # a's edit is not held back
    st = d.wait_until(lambda st: st["jobs"]["a"]["ready"] == 2, timeout=30, what="a's edit to install")
    assert st["jobs"]["b"]["objects"] == 1 and st["manifest_entries"] == 3  # b stays as it was
    assert len(st["manifest_errors"]) == 1 and "b.txt:2" in st["manifest_errors"][0]

    d.proc.send_signal(signal.SIGHUP)  # a new watch: b's version in force stays in force
    wait_for(lambda: "reloading the configuration" in d.log() and d.log().count("b.txt:2") >= 2, 30,
             "SIGHUP to read the jobs again")
    st = d.wait_until(lambda st: "b" in st["jobs"], what="the status after SIGHUP")
    assert st["jobs"]["b"]["objects"] == 1 and st["manifest_entries"] == 3 and st["jobs"]["b"]["ready"] == 1

    put_job(jobs, "b", [f"s3://{bucket}/b/0", f"s3://{bucket}/b/1"])  # b fixed
    st = d.wait_until(lambda st: st["jobs"]["b"]["ready"] == 2 and st["manifest_errors"] == [], timeout=30,
                      what="b's fix to install")
    assert st["manifest_entries"] == 4


def test_a_new_job_with_a_bad_line_does_not_stop_the_others_from_starting(tmp_path, s3, bucket, daemons):
    s3.put_object(Bucket=bucket, Key="a/0", Body=b"a0")
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    put_job(jobs, "a", [f"s3://{bucket}/a/0"])
    put_job(jobs, "b", ["s3://no such bucket/x"])
    d = daemons(args=["--manifest-dir", str(jobs)])
    st = d.wait_until(lambda st: st["objects"]["ready"] == 1, what="job a served")
    assert set(st["jobs"]) == {"a"} and len(st["manifest_errors"]) == 1 and "b.txt:1" in st["manifest_errors"][0]
