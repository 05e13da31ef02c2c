"""The manifest file on disk: read it into a Catalog only when it is whole, and know what to watch.

Two ways a watched manifest misleads a daemon, and what this module does about them:

* **Half-written files.** ``echo ... > m.txt`` and many editors rewrite a file in place: a reader that
  comes in between sees the first half (a line cut at ``size=12``). ``load`` installs nothing unless the
  file parsed *and* was stable: the open file's (device, inode, mtime, size) was the same before and
  after the read, the name still pointed at that file afterwards, and it had not been modified within
  ``settle`` seconds (or was unchanged since the caller's previous attempt, for clocks that disagree
  about mtimes). Otherwise it raises ManifestUnstable, which says when to try again. A writer that
  pauses longer than ``settle`` in the middle of a rewrite can still be caught half-way; writing a
  temporary file and renaming it over the manifest is the one way that is always safe.
* **Symlinks.** Kubernetes mounts a ConfigMap as ``m.txt -> ..data/m.txt`` with ``..data ->
  ..2024_01_01_00_00_00.1234`` and updates it by renaming a new ``..data`` link over the old one: the
  file itself never changes, the link on the way to it does. ``watch_plan`` names every link on the way
  and the file at the end, and the directories holding them, so a watcher sees that rename.

**Files a neighbour controls.** Job files under ``--manifest-dir`` are written by whoever may write that
directory. Each is opened without blocking (a FIFO never hangs the reload thread), must be a regular
file of at most ``MAX_FILE_BYTES`` with lines of at most ``MAX_LINE_CHARS`` (``/dev/zero`` costs no
memory), and may be a symlink only to a file inside the directory (a ConfigMap's ``..data`` links are;
``/proc/self/environ`` is not). An error in a job file names its file and line but quotes none of its
content: the daemon's log and status are readable by others than the file's author.
"""

from __future__ import annotations

import io
import os
import re
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

from s3cache.errors import ManifestError, ManifestUnstable

from .catalog import Catalog
from .jobs import JobStart, job_name
from .parse import Entry, Lister, Prefix, SkipLog, expand, read_open
from .shard import WHOLE, Shard

SETTLE = 0.25  # seconds a file must have gone unmodified; editors finish a save well within it
MAX_FILE_BYTES = 1 << 30  # a manifest of ~10 million lines; more is a mistake or an attack
MAX_LINE_CHARS = 8 << 10  # a line: a URI (at most ~1.1 KiB) and its fields


class Identity(NamedTuple):
    """What changes when a file is replaced (device, inode) or rewritten in place (mtime, size)."""

    dev: int
    ino: int
    mtime_ns: int
    size: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def identity(path: str) -> Identity | None:
    """The identity of the file ``path`` names now (symlinks followed), None if there is none."""
    try:
        return Identity.of(os.stat(path))
    except OSError:
        return None


class Loaded(NamedTuple):
    """A manifest read whole: its catalog, the listed objects left out of it, and the file it came from."""

    catalog: Catalog
    skipped: SkipLog
    identity: Identity
    # load_dir(kept=...): each job file's text in force (compressed), and the jobs refused (file name -> why)
    texts: Mapping[str, bytes] = {}
    refused: Mapping[str, str] = {}


def load(path: str, lister: Lister, shard: Shard = WHOLE, *, settle: float = SETTLE,
         seen: Identity | None = None, clock: Callable[[], float] = time.time) -> Loaded:
    """Read the manifest at ``path`` into the catalog of ``shard``'s share, only if it is stable.

    ``seen`` is the identity from the previous attempt's ManifestUnstable (``e.identity``): a file
    unchanged since then is taken as stable whatever its mtime says. Raises ManifestError for a bad or
    missing file and ManifestUnstable (with ``retry_after`` and ``identity``) for one being written; a
    parse error in a file that changed while it was read is ManifestUnstable too, since the error may
    be in the half that was caught.
    """
    try:
        f = _open_regular(path, follow=True)  # the operator's path: a ConfigMap's links lead anywhere
    except OSError as e:
        raise ManifestError(path, None, f"cannot read manifest: {e.strerror}") from None
    with f:
        before = Identity.of(os.fstat(f.fileno()))
        age = clock() - before.mtime_ns / 1e9
        if age < settle and before != seen:
            raise ManifestUnstable(path, f"modified {max(age, 0.0):.2f}s ago", min(max(settle - age, 0.01), settle),
                                   before)
        skipped = SkipLog()
        try:
            prefixes: list[tuple[str, str]] = []
            lines = _bounded_lines(f, path)
            catalog = Catalog.build(expand(_noting_prefixes(read_open(lines, path), prefixes), lister, skipped), shard)
            catalog.prefixes = tuple(dict.fromkeys(prefixes))  # the demand scope includes them (scope.py)
        except ManifestError:
            if _changed(f, path, before):
                raise ManifestUnstable(path, "changed while it was read", settle) from None
            raise
        if _changed(f, path, before):
            raise ManifestUnstable(path, "changed while it was read", settle)
    return Loaded(catalog, skipped, before)


DirIdentity = tuple[tuple[str, Identity | None], ...]  # a manifest directory: (file name, identity) per job


def dir_identity(path: str) -> DirIdentity | None:
    """The identity of a manifest directory now: its job files' names and identities (None if it
    cannot be listed). Adding, removing, replacing or rewriting a job changes it."""
    try:
        names = sorted(n for n in os.listdir(path)
                       if job_name(n) is not None and not os.path.isdir(os.path.join(path, n)))
    except OSError:
        return None
    return tuple((n, identity(os.path.join(path, n))) for n in names)


def load_dir(path: str, lister: Lister, shard: Shard = WHOLE, *, settle: float = SETTLE,
             seen: DirIdentity | None = None, clock: Callable[[], float] = time.time,
             kept: Mapping[str, bytes] | None = None) -> Loaded:
    """Read a manifest directory (``serve --manifest-dir``): every ``NAME.txt`` in it is job NAME's
    manifest, read in name order into one catalog whose jobs say where each one's entries are.

    A job being written (modified within ``settle`` seconds, unless the directory is as ``seen`` last
    time) or a directory that changed while it was read raises ManifestUnstable. A bad line in a job
    raises ManifestError naming its file and line, unless ``kept`` is given (file name -> that job's text
    in force, as ``texts`` of an earlier result): then each job is installed or refused on its own, a
    refused job's kept text (if any) standing in for it, and ``refused`` says why. ``identity`` of the
    result is a ``DirIdentity``."""
    before = dir_identity(path)
    if before is None:
        if not os.path.isdir(path):
            raise ManifestError(path, None, "not a directory: --manifest-dir wants a directory of NAME.txt files")
        raise ManifestError(path, None, "cannot list the manifest directory")
    if before != seen:
        now = clock()
        for name, ident in before:
            if ident is not None and now - ident.mtime_ns / 1e9 < settle:
                age = max(now - ident.mtime_ns / 1e9, 0.0)
                raise ManifestUnstable(os.path.join(path, name), f"modified {age:.2f}s ago",
                                       min(max(settle - age, 0.01), settle), before)
    texts: dict[str, bytes] = {}
    refused: dict[str, str] = {}

    def job_text(name: str, file: str):
        """The job's manifest as an open text file (read whole and kept, when jobs are kept)."""
        if name in refused:
            texts[name] = kept[name]  # type: ignore[index]
            return io.TextIOWrapper(io.BytesIO(zlib.decompress(kept[name])), encoding="utf-8-sig",  # type: ignore[index]
                                    newline=None)
        try:
            f = open_job(path, name)
        except FileNotFoundError:
            if os.path.lexists(file):  # a link to nothing: that job is broken, not retired
                raise ManifestError(file, None, "cannot read manifest: a symlink to a missing file") from None
            return None  # removed since the listing: the identity check below reads again
        except OSError as e:
            raise ManifestError(file, None, f"cannot read manifest: {e.strerror}") from None
        if kept is None:
            return f
        with f:
            raw = f.read().encode("utf-8")  # open_job capped its size; the BOM is gone already
        texts[name] = zlib.compress(raw, 1)
        return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", newline=None)

    def stream() -> Iterator[Entry | JobStart]:
        for name, _ in before:
            if name in refused and name not in kept:  # type: ignore[operator]
                continue  # refused and never in force: not a job yet
            file = os.path.join(path, name)
            f = job_text(name, file)
            if f is None:
                continue
            with f:
                yield JobStart(job_name(name) or name)
                yield from expand(_noting_prefixes(read_open(_bounded_lines(f, file), file), prefixes),
                                  lister, skipped)

    while True:
        skipped = SkipLog()
        prefixes: list[tuple[str, str]] = []
        try:
            catalog = Catalog.build(stream(), shard)
            catalog.prefixes = tuple(dict.fromkeys(prefixes))
            break
        except ManifestError as e:
            if dir_identity(path) != before:
                raise ManifestUnstable(path, "changed while it was read", settle, before) from None
            name = os.path.basename(e.path)
            unquoted = ManifestError(e.path, e.line, _unquoted(e.reason))  # never the file's own words
            if kept is None or e.path != os.path.join(path, name) or name in refused:
                raise unquoted from None
            refused[name] = str(unquoted)  # read again without it (its kept text in its place)
    if dir_identity(path) != before:
        raise ManifestUnstable(path, "changed while it was read", settle, before)
    return Loaded(catalog, skipped, before, texts, refused)  # type: ignore[arg-type]


def open_job(directory: str, name: str) -> io.TextIOWrapper:
    """Open job file ``name`` of ``directory`` as the module doc says: without blocking, a regular file
    within MAX_FILE_BYTES, through symlinks only to a file inside ``directory``. Raises OSError (with a
    ``strerror`` fit for the message) when it is none of that."""
    file = os.path.join(directory, name)
    if os.path.islink(file):
        real, inside = os.path.realpath(file), os.path.realpath(directory)
        if os.path.commonpath([real, inside]) != inside:
            raise OSError(0, "a symlink that leaves the manifest directory")
        file = real
    return _open_regular(file, follow=False)


def _open_regular(file: str, follow: bool) -> io.TextIOWrapper:
    """``file`` opened for reading without blocking (a FIFO never hangs the caller), if it is a regular
    file of at most MAX_FILE_BYTES; through a symlink at its end only if ``follow``. Raises OSError."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0) | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(file, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise OSError(0, f"larger than {MAX_FILE_BYTES} bytes")
        os.set_blocking(fd, True)
        return open(fd, encoding="utf-8-sig", newline=None, closefd=True)
    except BaseException:
        os.close(fd)
        raise


class _BoundedLines:
    """A text file's lines, at most MAX_LINE_CHARS each and MAX_FILE_BYTES in all (a file that grows
    while it is read, or a file the kernel calls regular but never ends, as /proc's). ``buffer`` is the
    file's, for ``read_open``'s report of a byte that is not UTF-8."""

    def __init__(self, f: io.TextIOWrapper, path: str) -> None:
        self._f, self._path, self.buffer = f, path, f.buffer

    def __iter__(self) -> Iterator[str]:
        total = 0
        for lineno, line in enumerate(iter(lambda: self._f.readline(MAX_LINE_CHARS + 1), ""), 1):
            if len(line) > MAX_LINE_CHARS:
                raise ManifestError(self._path, lineno, f"a line over {MAX_LINE_CHARS} characters")
            total += len(line)
            if total > MAX_FILE_BYTES:
                raise ManifestError(self._path, None, f"more than {MAX_FILE_BYTES} bytes")
            yield line


def _bounded_lines(f: io.TextIOWrapper, path: str) -> _BoundedLines:
    return _BoundedLines(f, path)


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def _unquoted(message: str) -> str:
    """A parse error's message without the text it quotes from the line (``got '...'``)."""
    return _QUOTED.sub("(text not shown)", message)


def _noting_prefixes(items: Iterable[Entry | Prefix], found: list[tuple[str, str]]) -> Iterator[Entry | Prefix]:
    """``items`` passed on as they are, each prefix line's (bucket, prefix) added to ``found``."""
    for item in items:
        if isinstance(item, Prefix):
            found.append((item.bucket, item.prefix))
        yield item


def _changed(f, path: str, before: Identity) -> bool:
    """Whether the open file was modified, or ``path`` now names another file."""
    return Identity.of(os.fstat(f.fileno())) != before or identity(path) != before


class WatchPlan(NamedTuple):
    """What to watch to see the manifest change.

    ``paths``: the manifest's path, every symlink met on the way to the file, and the file's real path
    (all absolute and normalised). ``dirs``: the existing directories that hold them; watch each one
    (not recursively) and reload on any event whose path (source or destination) is in ``paths``.
    After each reload, compute the plan again: a swapped link leads to another real path.
    """

    paths: frozenset[str]
    dirs: frozenset[str]
    trees: frozenset[str] = frozenset()  # a manifest directory: any event on an entry in it counts

    def relevant(self, *event_paths: str | bytes | None) -> bool:
        """Whether an event on these paths (e.g. a watchdog event's src_path and dest_path) may have
        changed what the manifest path leads to."""
        for p in event_paths:
            if p:
                p = os.path.normpath(os.path.abspath(os.fsdecode(p)))
                if p in self.paths or os.path.dirname(p) in self.trees:
                    return True
        return False


def watch_plan(path: str | os.PathLike, directory: bool = False) -> WatchPlan:
    """The WatchPlan for the manifest at ``path`` as the filesystem stands now. ``directory``: a
    manifest directory, whose entries are watched too (any of them: a ConfigMap mounted as a directory
    swaps a ``..data`` link in it, not the job files' names)."""
    start = os.path.normpath(os.path.abspath(os.fspath(path)))
    links, real = _links_on_the_way(start)
    paths = frozenset([start, real, *links])
    dirs = frozenset(d for d in (os.path.dirname(p) for p in paths) if os.path.isdir(d))
    if not directory:
        return WatchPlan(paths, dirs)
    trees = frozenset(d for d in (start, real) if os.path.isdir(d))
    return WatchPlan(paths, dirs | trees, trees)


def _links_on_the_way(path: str, max_links: int = 40) -> tuple[list[str], str]:
    """Resolve ``path`` one component at a time as the kernel does: every symlink met (as the path that
    named it) and where the path leads. Stops where a component is missing (that may appear later)."""
    links: list[str] = []
    todo = [c for c in path.split(os.sep) if c]
    todo.reverse()
    here = os.sep
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            here = os.path.dirname(here)  # ``here`` has no links in it: the parent is the real one
            continue
        nxt = os.path.join(here, part)
        try:
            target = os.readlink(nxt)
        except OSError:  # not a link (or not there): a plain step
            here = nxt
            continue
        links.append(nxt)
        if len(links) > max_links:
            break  # a loop: what is met so far is what there is to watch
        if os.path.isabs(target):
            here = os.sep
        todo.extend(reversed([c for c in target.split(os.sep) if c]))
    return links, os.path.normpath(here)
