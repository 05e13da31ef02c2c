"""The live progress view of ``s3cache status --watch``: a pure function from a status dict to a rich
renderable, so it can be checked by rendering to a string; the CLI only fetches status and redraws.

Figures come from status alone. Where status does not carry something the view would need (the total
bytes of the manifest, from an older daemon), the view says what it estimated and from what.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from s3cache.manifest.refs import printable, shown

from .config import human_size

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.progress_bar import ProgressBar
    from rich.text import Text

# rich is imported where a view is drawn, not at import: the daemon imports this module for its
# one-line progress (plain_lines), and rich cost ~45 ms of every daemon start before its first GET.

BAR_WIDTH = 40
MAX_FAILURES_SHOWN = 5


def eta_text(seconds: float | None) -> str:
    """``3725`` -> ``"1h 02m"``; ``None`` (no throughput yet) -> ``"unknown"``."""
    if seconds is None:
        return "unknown"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s}s"


def _bar(done: float, total: float) -> ProgressBar:
    from rich.progress_bar import ProgressBar

    return ProgressBar(total=max(total, 1), completed=min(done, max(total, 1)), width=BAR_WIDTH)


def _pct(done: float, total: float) -> str:
    return f"{100.0 * done / total:.1f}%" if total else "-"


def landing(st: dict) -> tuple[int, int | None, float | None, bool]:
    """(bytes landed, total bytes or None, ETA seconds or None, whether the total is an estimate).

    Exact when status has ``manifest_bytes`` and the manifest gives every size. Otherwise each object of
    unknown size counts as the average: of the sizes the manifest gives, else of the files cached so far
    (then the bytes still to come are the objects still to come times that average).
    """
    o, b = st["objects"], st["bytes"]
    rate = st.get("throughput_bytes_per_s", 0) or 0
    mb = st.get("manifest_bytes")
    avg = b["ready"] / o["ready"] if o["ready"] else None
    if mb is not None:
        landed, unknown = mb["ready"], mb.get("unknown_sizes", 0)
        sized = st["manifest_entries"] - unknown
        if sized:
            avg = mb["total"] / sized
        total = mb["total"] + unknown * avg if unknown and avg is not None else mb["total"] if not unknown else None
        estimated = bool(unknown)
    else:
        landed, estimated = b["ready"], True
        remaining_objects = o["queued"] + o["fetching"]
        total = landed + remaining_objects * avg if avg is not None else landed if not remaining_objects else None
    done = o["queued"] + o["fetching"] == 0  # nothing left to fetch (failed objects never land)
    if total is None:
        return landed, None, 0.0 if done else None, estimated
    total = int(total)
    left = max(0, total - landed)
    if left == 0 or done:
        return landed, total, 0.0, estimated
    return landed, total, (left / rate if rate else None), estimated


_HELD = (("leased", "leased"), ("pinned", "pinned"), ("being_read", "being read"),
         ("unread_prefetch", "unread prefetch"), ("needed_sooner", "needed sooner"), ("in_flight", "in flight"))


def why_waiting(st: dict) -> list[Text]:
    """Lines saying why readers or prefetch wait: leases, yielding to a reader, waits for room."""
    from rich.text import Text

    out: list[Text] = []
    leases = st.get("leases") or {}
    if leases.get("files"):
        readers = leases["readers"]
        out.append(Text(f"leases hold {leases['files']} files ({human_size(leases['bytes'])}) for {readers} "
                        f"reader{'s' if readers != 1 else ''} (at most {human_size(leases['budget'])} "
                        f"beyond each reader's two newest)"))
    yields = st.get("prefetch_yields_to") or 0
    if yields:
        out.append(Text(f"prefetch yields to {yields} fetch{'es' if yields != 1 else ''} "
                        f"{'a reader waits' if yields == 1 else 'readers wait'} on", style="yellow"))
    for w in st.get("waiting_for_space") or []:
        who = "a reader waits" if w["reader_waits"] else "prefetch waits"
        limit = "--max-size" if w["limit"] == "max_size" else "the filesystem"
        held = ", ".join(f"{name} {human_size(w['held'][k])}" for k, name in _HELD if w["held"].get(k))
        out.append(Text(f"{who} for room for {w['uri']} ({human_size(w['size'])}, {human_size(w['need'])} "
                        f"short on {limit}, {w['seconds']:.0f}s): {held or 'nothing cached'}",
                        style="red" if w["reader_waits"] else "yellow"))
    return out


def jobs(st: dict) -> list[tuple[str, dict, str]]:
    """(name, its status, a line about it) for each job of a manifest directory (``--manifest-dir``),
    by name; none for a single manifest."""
    out = []
    for name, j in sorted(st.get("jobs", {}).items()):
        asked = j["hits"] + j["misses"]
        out.append((printable(name), j,
                    f"{j['ready']} of {j['objects']} ready ({human_size(j['bytes_ready'])}), {j['readers']} "
                    f"reader{'s' if j['readers'] != 1 else ''}, hit rate {_pct(j['hits'], asked)}, "
                    f"{j['wait_seconds']:.1f}s spent waiting"))
    return out


def render(st: dict) -> RenderableType:
    """The progress view of one status snapshot."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if st.get("state") == "starting":  # the daemon has no parts yet: only its start-up step
        return Text(f"s3cache on {st['cache_dir']} (pid {st['pid']}) is starting: {st['step']} "
                    f"({eta_text(st['seconds'])} so far)" + (f"; {st['progress']}" if st["progress"] else ""))
    o, b = st["objects"], st["bytes"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()

    head = Text(f"s3cache on {st['cache_dir']} (pid {st['pid']}, up {eta_text(st['uptime'])})", style="bold")
    manifest = st.get("manifest") or "none (fetching on demand only)"

    landed, total, eta, estimated = landing(st)
    if total is not None:
        grid.add_row("bytes", _bar(landed, total),
                     f"{human_size(landed)} of {'~' if estimated else ''}{human_size(total)} "
                     f"({_pct(landed, total)})")
    else:
        grid.add_row("bytes", Text("-"), f"{human_size(landed)} landed (total unknown until one object lands)")

    objects_total = o["queued"] + o["fetching"] + o["ready"] + o["failed"]
    grid.add_row("objects", _bar(o["ready"], objects_total),
                 f"{o['ready']} of {objects_total} ready, {o['fetching']} fetching, {o['queued']} queued, "
                 f"{o['failed']} failed")
    rate = st.get("throughput_bytes_per_s", 0) or 0
    grid.add_row("throughput", Text(f"{human_size(rate)}/s"),
                 f"ETA {'~' if estimated and eta else ''}{eta_text(eta)}"
                 + (" (estimated from the average object size)" if estimated and eta else ""))
    fill = b["ready"] + b["reserved"]
    grid.add_row("cache", _bar(fill, b["max"]),
                 f"{human_size(b['ready'])} of {human_size(b['max'])} ({_pct(b['ready'], b['max'])}), "
                 f"{human_size(b['reserved'])} reserved, filesystem {100 * b['free_fraction']:.1f}% free")
    asked = st["hits"] + st["misses"]
    grid.add_row("readers", Text(str(st["readers"])),
                 f"{st['hits']} hits, {st['misses']} misses (hit rate {_pct(st['hits'], asked)}), "
                 f"{st['wait_seconds']:.1f}s spent waiting")
    for name, j, line in jobs(st):
        grid.add_row(Text(f"job {name}"), _bar(j["ready"], j["objects"]), Text(line))
    grid.add_row("fetched", Text(f"{st['fetched']} files"),
                 f"{human_size(st['fetched_bytes'])}; evicted {st['evicted']} files, "
                 f"{human_size(st['evicted_bytes'])}; {st['requests']} S3 requests, {st['retries']} retries")

    notes: list[Text] = []
    if st.get("disk_full"):
        notes.append(Text("the cache filesystem is full: prefetch paused until space returns", style="red"))
    elif st.get("min_free_reached"):
        notes.append(Text("free space below --min-free: prefetch paused (files readers wait on still come)",
                          style="yellow"))
    elif st.get("prefetch_paused"):
        notes.append(Text("prefetch waits for room in the cache (files leased, pinned or not yet read)",
                          style="yellow"))
    notes.extend(why_waiting(st))
    notes.extend(Text(line) for line in plain_lines(st)
                 if line.startswith(("shard ", "pinned ", "quarantine ")) and "pinned      0 object" not in line)
    for e in st.get("manifest_errors", []):
        notes.append(Text(f"manifest: {printable(e)}", style="red"))
    failures = st.get("failures", [])
    if o["failed"]:
        notes.append(Text(f"{o['failed']} failed:", style="red"))
        for f in failures[:MAX_FAILURES_SHOWN]:
            notes.append(Text(f"  {shown(f['uri'])}: {f['code']}", style="red"))
        if o["failed"] > min(len(failures), MAX_FAILURES_SHOWN):
            notes.append(Text(f"  ... and {o['failed'] - min(len(failures), MAX_FAILURES_SHOWN)} more "
                              f"(s3cache status --json)", style="red"))
    return Group(head, Text(f"manifest {manifest} ({st['manifest_entries']} entries)"), grid, *notes)


def _files(n: int) -> str:
    return f"{n} file{'s' if n != 1 else ''}"


def plain_lines(st: dict) -> list[str]:
    """``s3cache status`` as plain lines (no bars, no colour, no width to fit): the text command prints
    them, and so does ``status --watch`` written to a pipe or a log, one frame after another. Every
    figure an operator acts on is here, not only in ``--json``: pinned files, this host's share and
    reads from other shares, what leases hold, the quarantine."""
    if st.get("state") == "starting":  # the daemon has no parts yet: only its start-up step
        return [f"cache dir   {st['cache_dir']} (daemon pid {st['pid']}, up {st['uptime']:.0f}s)",
                f"starting    {st['step']} ({st['seconds']:.0f}s so far)"
                + (f": {st['progress']}" if st["progress"] else "")]
    o, b = st["objects"], st["bytes"]
    pct = 100.0 * b["ready"] / b["max"] if b["max"] else 0.0
    out = [f"cache dir   {st['cache_dir']} (daemon pid {st['pid']}, up {st['uptime']:.0f}s)",
           f"manifest    {st['manifest']} ({st['manifest_entries']} entries)"]
    shard = st.get("shard")
    if shard and shard != "0/1":
        off = st.get("off_share") or {"count": 0, "recent": []}
        line = (f"shard       {shard}: {st['manifest_entries']} of the manifest's {st.get('manifest_total', '?')} "
                f"entries; {off['count']} read(s) from other hosts' shares")
        if off["count"]:
            line += f" (a growing count: readers and --shard disagree), e.g. {shown(off['recent'][-1])}"
        out.append(line)
    out += [f"objects     {o['queued']} queued, {o['fetching']} fetching, {o['ready']} ready, {o['failed']} failed",
            f"cache use   {human_size(b['ready'])} of {human_size(b['max'])} ({pct:.1f}%), "
            f"{human_size(b['reserved'])} reserved, filesystem {100 * b['free_fraction']:.1f}% free"]
    landed, total, eta, estimated = landing(st)
    if total is not None:
        out.append(f"landed      {human_size(landed)} of {'~' if estimated else ''}{human_size(total)} "
                   f"({_pct(landed, total)}), ETA {eta_text(eta)}")
    out.append(f"throughput  {human_size(st['throughput_bytes_per_s'])}/s")
    out.append(f"readers     {st['readers']} ({st['hits']} hits, {st['misses']} misses, "
               f"{st['wait_seconds']:.1f}s spent waiting)")
    leases = st.get("leases")
    if leases is not None:
        out.append(f"leases      {_files(leases['files'])} ({human_size(leases['bytes'])}) held for "
                   f"{leases['readers']} reader(s); budget {human_size(leases['budget'])}, shared by the readers, "
                   f"for files beyond each one's two newest")
    pinned = st.get("pinned")
    if pinned is not None:
        out.append(f"pinned      {pinned['objects']} object(s), {_files(pinned['files'])} cached "
                   f"({human_size(pinned['bytes'])} of the {human_size(pinned['quota_bytes'])} pin quota)")
    q = st.get("quarantine")
    if q is not None and q["files"]:
        out.append(f"quarantine  {_files(q['files'])} ({human_size(q['bytes'])}, counted against the maximum; "
                   f"the oldest go beyond {human_size(q['budget'])}) in {st['cache_dir']}/.s3cache/quarantine")
    for e in st.get("epochs", []):
        out.append(f"epoch {e['epoch']:<5} hit rate {100 * e['hit_rate']:.1f}% ({e['hits']} hits, "
                   f"{e['misses']} misses)")
    for name, _, line in jobs(st):
        out.append(f"job {name:<7} {line}")
    out.append(f"fetched     {st['fetched']} files, {human_size(st['fetched_bytes'])}; evicted {st['evicted']} "
               f"files, {human_size(st['evicted_bytes'])}")
    methods = st.get("verified_by", {})
    if methods:
        out.append("verified    " + ", ".join(f"{k}: {v}" for k, v in sorted(methods.items())))
        if methods.get("size"):
            out.append(f"warning     {methods['size']} file(s) verified by size alone (no checksum known)")
    if st.get("disk_full"):
        out.append("warning     the cache filesystem is full: prefetch paused until space returns")
    out += [f"waiting     {t.plain}" for t in why_waiting(st) if not t.plain.startswith("leases hold")]
    out += [f"failed      {shown(f['uri'])}: {f['code']}" for f in st["failures"]]
    out += [f"manifest    {printable(e)}" for e in st.get("manifest_errors", [])]
    return out


class ServeBar:
    """``s3cache serve``'s progress bar on a terminal: bytes and objects of the manifest, throughput.

    Fed by the daemon's housekeeping once a second (``update(progress)`` with the dict of
    ``Daemon._progress``); log lines go through ``console`` above the bar. Invariant: redrawn only from
    ``update`` (no refresh thread of its own), and ``stop`` leaves the last frame on the terminal.
    """

    def __init__(self, console=None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.console = console or Console(stderr=True)
        self._progress = Progress(TextColumn("{task.description:<8}"), BarColumn(bar_width=BAR_WIDTH),
                                  TextColumn("{task.fields[detail]}"), console=self.console, auto_refresh=False,
                                  transient=False)
        self._bytes = self._progress.add_task("bytes", total=None, detail="")
        self._objects = self._progress.add_task("objects", total=None, detail="")
        self._started = False

    def update(self, p: dict) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        total = p["bytes_total"]
        of = f" of {human_size(total)}" if total is not None else " (total unknown)"
        self._progress.update(self._bytes, completed=p["bytes_done"], total=total or None,
                              detail=f"{human_size(p['bytes_done'])}{of}, {human_size(p['bytes_per_s'])}/s")
        failed = f", {p['failed']} failed" if p["failed"] else ""
        self._progress.update(self._objects, completed=p["objects_done"], total=p["objects_total"] or None,
                              detail=f"{p['objects_done']}/{p['objects_total']} ready{failed}")
        self._progress.refresh()

    def stop(self) -> None:
        if self._started:
            self._progress.stop()
            self._started = False
