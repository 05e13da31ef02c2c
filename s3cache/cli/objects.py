"""Commands about named objects: ``resolve``, ``pin``, ``unpin`` and ``verify``.

Invariant: every URI is checked (``check_uris``, ``parse_uri``) before anything is sent, so a typo
exits 2 and changes nothing; each URI that fails gets its own error line, and the exit code is the
worst of them. URIs from the daemon are shown percent-encoded, as users write them (``shown_uri``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import S3CacheError
from .common import (
    cache_dir_option,
    check_uris,
    exit_code,
    main,
    request,
    run,
    shown_uri,
)


@main.command("resolve")
@cache_dir_option
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds (all URIs together).")
@click.argument("uris", nargs=-1, required=True)
def resolve_cmd(cache_dir: Path, timeout: float | None, uris: tuple[str, ...]) -> None:
    """Print the local path of each URI, one a line, waiting until each file has landed.

    Paths that resolved go to stdout in the order given; each URI that did not gets one error line on
    stderr, and the exit code is 2 if a URI was malformed, else 1 if any failed.
    """
    outcomes = run(_resolve_each, list(uris), cache_dir, timeout)
    codes = []
    for uri, got in outcomes:
        if isinstance(got, S3CacheError):
            text = str(got)
            # an error about one object names it already (as the daemon spells it: percent-encoded)
            named = uri in text or getattr(got, "uri", None) is not None
            click.echo(f"s3cache: error: {text if named else f'{uri}: {text}'}", err=True)
            codes.append(exit_code(got))
        else:
            click.echo(got)
    if codes:
        sys.exit(max(codes))


def _resolve_each(uris: list[str], cache_dir: Path, timeout: float | None) -> list[tuple[str, str | S3CacheError]]:
    """Each URI with its path or its own error. All are asked for at once (so they are fetched side by
    side); a failure the batch cannot pin on one URI is settled by asking for the rest one at a time.
    DaemonNotRunning concerns them all and is raised."""
    import time

    from s3cache.manifest.refs import parse_uri
    from s3cache.reader.resolve import resolve

    from ..errors import DaemonNotRunning, FetchFailed

    got: dict[int, str | S3CacheError] = {}
    canonical: dict[int, str] = {}
    for i, u in enumerate(uris):
        try:
            canonical[i] = parse_uri(u).uri
        except S3CacheError as e:
            got[i] = e
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    pending = list(canonical)
    while pending:
        try:
            got.update(zip(pending, resolve([uris[i] for i in pending], cache_dir=cache_dir, timeout=left())))
            break
        except DaemonNotRunning:
            raise
        except FetchFailed as e:
            failed = [i for i in pending if canonical[i] == e.uri]
            if failed:
                got.update((i, e) for i in failed)
                pending = [i for i in pending if i not in failed]
                continue
        except S3CacheError:
            pass
        for i in pending:  # which URI the error was about is not known: ask for each alone
            try:
                got[i] = resolve(uris[i], cache_dir=cache_dir, timeout=left())
            except DaemonNotRunning:
                raise
            except S3CacheError as e:
                got[i] = e
        break
    return [(u, got[i]) for i, u in enumerate(uris)]


# What the daemon's pin/unpin reply says happened to each URI ("outcome"), and whether that is what the
# user asked for. The reply: {"ok": true, "pinned": <URIs pinned in all, CLI and manifest pins each
# counted once>, "results": [{"uri": "s3://...", "outcome": "<one of the keys below>"}, ...]}.
PIN_OUTCOMES: dict[str, dict[str, tuple[str, bool]]] = {
    "pin": {"pinned": ("pinned", True), "already_pinned": ("already pinned", True),
            "manifest": ("already pinned by the manifest", True),
            "refused": ("not pinned", False)},
    "unpin": {"unpinned": ("unpinned", True), "not_pinned": ("not pinned", True),
              "manifest": ("pinned by the manifest: edit the manifest to unpin it", False)},
}


def pin_report(op: str, uris: list[str], reply: dict) -> tuple[list[str], list[str], int]:
    """(stdout lines, stderr lines, exit code) for a pin/unpin reply."""
    out: list[str] = []
    err: list[str] = []
    results = reply.get("results")
    if results is None:  # a daemon from before per-URI results: say only what is known
        out.append(f"asked the daemon to {op} {len(uris)} object(s); {reply['pinned']} pinned in all")
        return out, err, 0
    for r in results:
        text, as_asked = PIN_OUTCOMES[op].get(r["outcome"], (f"unexpected reply {r['outcome']!r}", False))
        if r.get("code"):  # what S3 said about an object it refused
            text += f": S3 says {r['code']}" + (f" ({r['reason']})" if r.get("reason") else "")
        uri = shown_uri(r["uri"])
        if as_asked:
            out.append(f"{text:<15} {uri}")
        else:
            err.append(f"s3cache: error: {uri}: {text}")
    out.append(f"{reply['pinned']} pinned in all")
    return out, err, 1 if err else 0


def _pin_op(op: str, cache_dir: Path, uris: tuple[str, ...]) -> None:
    canonical = run(check_uris, uris)
    reply = run(request, cache_dir, {"op": op, "uris": canonical})
    out, err, code = pin_report(op, canonical, reply)
    for line in out:
        click.echo(line)
    for line in err:
        click.echo(line, err=True)
    sys.exit(code)


@main.command()
@cache_dir_option
@click.argument("uris", nargs=-1, required=True)
def pin(cache_dir: Path, uris: tuple[str, ...]) -> None:
    """Keep these objects resident (fetching them now) until unpinned; survives restarts."""
    _pin_op("pin", cache_dir, uris)


@main.command()
@cache_dir_option
@click.argument("uris", nargs=-1, required=True)
def unpin(cache_dir: Path, uris: tuple[str, ...]) -> None:
    """Let these objects be evicted again (a manifest's pin=1 is changed in the manifest, not here)."""
    _pin_op("unpin", cache_dir, uris)


@main.command()
@cache_dir_option
@click.option("--all", "everything", is_flag=True, help="Every cached file.")
@click.option("--source", is_flag=True, help="Also ask S3 whether each object changed since it was cached.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.argument("uris", nargs=-1)
def verify(cache_dir: Path, everything: bool, source: bool, as_json: bool, uris: tuple[str, ...]) -> None:
    """Re-hash cached files against their recorded checksum (and with --source, check S3 for changes).

    A file that no longer matches is moved to .s3cache/quarantine (never deleted silently) and fetched
    again; the command then exits 1. Objects changed in S3 are fetched again.
    """
    if not everything and not uris:
        raise click.UsageError("name URIs to verify, or --all")
    report = run(request, cache_dir, {"op": "verify", "uris": run(check_uris, uris), "all": everything,
                                        "source": source}, timeout=None)["report"]
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(f"checked {report['checked']} file(s): {report['ok']} ok, {len(report['mismatched'])} "
                   f"corrupt, {len(report['changed'])} changed in S3, {len(report['gone'])} gone from S3")
        for m in report["mismatched"]:
            if m.get("quarantined"):
                click.echo(f"corrupt     {shown_uri(m['uri'])} ({m['path']}): quarantined at {m['quarantined']}, fetching again")
            else:  # it could not be moved aside: it was removed instead, or is still there and not served
                click.echo(f"corrupt     {shown_uri(m['uri'])} ({m['path']}): not quarantined ({m.get('error', 'unknown error')})")
        for c in report["changed"]:
            click.echo(f"changed     {shown_uri(c['uri'])}: ETag {c['was']} -> {c['etag']}, fetching again")
        for g in report["gone"]:
            click.echo(f"gone        {shown_uri(g['uri'])}: {g['code']}")
        for u in report["not_cached"]:
            click.echo(f"not cached  {shown_uri(u)}")
        for e in report.get("errors", []):  # S3 gave no usable answer about it: not checked this time
            click.echo(f"unchecked   {shown_uri(e['uri'])}: {e['error']}")
    if report["mismatched"]:
        sys.exit(1)

