"""Where a store lives: a local directory or an fsspec URL, behind one interface.

zarr reads and writes the arrays; this module does the rest through one fsspec filesystem (small
keys, listing, removal, putting a store built under a temporary name in place: docs/design.md,
section 2). A URL is `s3://bucket/train.zarr`, `gs://...` and the like; a `file://` URL is a local
path. Credentials come from each filesystem's own
configuration, never from qks (README.md, "Scaling out").
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem

from qks_pipeline.atomic import atomic_write
from qks_pipeline.errors import QKSError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

log = logging.getLogger(__name__)

ROOT_METADATA = "zarr.json"
# zarr's temporary chunk files (.partial) and `qks_pipeline.atomic`'s (.tmp<pid>)
INTERRUPTED_WRITE = re.compile(r"\.partial$|\.tmp\d+$")


def is_url(location: str | Path) -> bool:
    """A remote fsspec URL (`s3://...`); plain paths and `file://` URLs are local."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def local_path(location: str | Path) -> Path:
    return Path(str(location).removeprefix("file://"))


@dataclass(frozen=True)
class Location:
    """A store's root.

    `url` is the location as the user gave it (a Path when local), `fs` the filesystem, `root` the
    path within it.
    """

    url: str | Path
    fs: fsspec.AbstractFileSystem
    root: str

    @classmethod
    def of(cls, location: str | Path) -> Location:
        if not is_url(location):
            path = local_path(location)
            return cls(path, LocalFileSystem(), str(path))
        try:
            fs, root = fsspec.url_to_fs(location)
        # unknown protocol, or its package (s3fs, gcsfs) is not installed
        except (ImportError, ValueError) as e:
            raise QKSError(f"cannot open this URL: {e}", location) from None
        return cls(location.rstrip("/"), fs, root.rstrip("/"))

    @property
    def local(self) -> bool:
        return isinstance(self.url, Path)

    def open_group(self, mode: str) -> zarr.Group:
        """The Zarr v3 group here; a refusal (no such bucket, no permission) is one clear error."""
        try:
            return zarr.open_group(self.url, mode=mode, zarr_format=3)
        except OSError as e:
            message = f"cannot open a store here ({type(e).__name__}: {e})"
            raise QKSError(message, self.url) from None

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def exists(self, key: str = "") -> bool:
        # another process (a dask worker) may have written it
        self.fs.invalidate_cache(self._path(key))
        return self.fs.exists(self._path(key))

    def holds_store(self) -> bool:
        """True when a Zarr store is here, False when nothing (or an empty directory) is.

        Anything else is refused: qks never replaces what it did not write.
        """
        if self.exists(ROOT_METADATA):
            return True
        if self.fs.isfile(self.root) or self.list(""):
            raise QKSError("exists and is not a feature cache; refusing to replace it", self.url)
        return False

    def read_text(self, key: str) -> str:
        return self.fs.cat_file(self._path(key)).decode()

    def write_text(self, key: str, text: str) -> None:
        """Write one small key atomically."""
        if self.local:
            atomic_write(self._path(key), text)
        else:
            self.fs.pipe_file(self._path(key), text.encode())

    def delete(self, key: str) -> None:
        """Remove one key (a file), if there."""
        if self.exists(key):
            self.fs.rm_file(self._path(key))

    def makedirs(self, key: str) -> None:
        """A directory locally; nothing on object storage (prefixes exist through their keys)."""
        self.fs.makedirs(self._path(key), exist_ok=True)

    def list(self, key: str) -> list[str]:
        """Names directly under `key` (none when it does not exist)."""
        path = self._path(key)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in entries)

    def find(self, key: str) -> set[str]:
        """Keys of every file under `key`, from the store's root (one listing)."""
        if self.local:
            root = str(self.url)
            return {
                os.path.join(d, f)[len(root) + 1 :].replace(os.sep, "/")
                for d, _, files in os.walk(os.path.join(root, key))
                for f in files
            }
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return {p[len(self.root) + 1 :] for p in self.fs.find(path)}

    def remove(self) -> None:
        if self.exists():
            self.fs.rm(self.root, recursive=True)

    @contextlib.contextmanager
    def building(self) -> Iterator[Location]:
        """A fresh `<name>.creating` beside this location to build a store in.

        It is put here when the block succeeds and removed when it fails: a store that exists is
        whole, a failure leaves nothing taking the space (an OSError, such as a full disk, is one
        clear error).
        """
        tmp = Location.of(f"{self.url}.creating")
        tmp.remove()
        try:
            yield tmp
            self.replace_with(tmp)
        # a full disk, a bad label, an interrupt
        except BaseException as e:
            tmp.remove()
            if isinstance(e, OSError):
                message = f"cannot create the store: {e.strerror or e}"
                raise QKSError(message, e.filename or self.url) from None
            raise

    def replace_with(self, built: Location) -> None:
        """Put the store built at `built` here, replacing what is here; `built` is gone after."""
        self.remove()
        if self.local:
            os.replace(built.root, self.root)
            return
        meta = built._path(ROOT_METADATA)
        rest = [k for k in sorted(built.fs.find(built.root)) if k != meta]
        targets = [self._path(k[len(built.root) + 1 :]) for k in rest]
        self.fs.copy(rest, targets)
        # last: a store that opens is whole
        self.fs.copy(meta, self._path(ROOT_METADATA))
        built.remove()

    @contextlib.contextmanager
    def writer_lock(self, writer: str = "extraction", what: str = "store") -> Iterator[None]:
        """Hold an exclusive lock on `<store>.lock` while this process writes the store.

        A second writer is refused at once, naming the holder ("another `writer` is writing this
        `what`"). The lock file stays (removing it would let two runs lock two different files);
        the operating system releases the lock however its holder exits. Local stores (and
        directories, as a training run's) only: object storage has none.
        """
        if not self.local or fcntl is None:
            if self.local:
                log.warning(
                    "no file locking on this system (Windows): make sure no other run writes %s",
                    self.url,
                )
            yield
            return
        lock = self.url.with_name(self.url.name + ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f"pid {f.read().strip() or '?'}, lock {lock.name}"
                message = f"another {writer} is writing this {what} ({holder})"
                raise QKSError(message, self.url) from None
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield

    def remove_interrupted_writes(self) -> list[str]:
        """Delete what writes cut short by a kill leave inside a local store; return their paths.

        Those are zarr's `<chunk>.<uuid>.partial` files and our `.<name>.tmp<pid>` files. Call it
        only under `writer_lock`.
        """
        if not self.local or not self.url.is_dir():
            return []
        removed = [
            p for p in self.url.rglob("*") if p.is_file() and INTERRUPTED_WRITE.search(p.name)
        ]
        for p in removed:
            p.unlink(missing_ok=True)
        return [str(p) for p in removed]

    def size(self) -> int:
        """Bytes of all files (objects) under this location."""
        return int(self.fs.du(self.root, total=True))
