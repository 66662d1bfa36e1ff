"""How stages write their outputs: a full disk or an unwritable folder is one line, and a stage's
set of outputs is replaced as a whole.

- :func:`writing` turns an ``OSError`` of a write (no space, read-only, permission, a file where a
  folder should be) into an :class:`OutputError` naming the path and the params key to change;
  :func:`check_writable` finds an unusable folder before any compute.
- :class:`OutputSet` stages every output of a stage in a hidden sibling folder
  (``<parent>/.<tag>.staging``), then moves the finished set into place. The move is journalled: the
  staged folder is renamed to ``.<tag>.commit`` (the commit point), then each entry is swapped in, the
  old one set aside in ``.<tag>.old``. A process killed before the commit point leaves the previous
  set untouched; one killed after it is rolled forward by the next run of the stage (or by
  :meth:`OutputSet.recover`), so the folder holds the previous complete set or the new complete one,
  never two runs' files side by side.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.outputs")

# errnos of a write that the user fixes by freeing space or pointing the stage elsewhere
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_UNWRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST}
MANIFEST = ".manifest.json"


class OutputError(PipelineError):
    """An output cannot be written: a full disk, a read-only or unwritable folder."""


def is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _NO_SPACE | _UNWRITABLE


def output_error(err: OSError, path: Path | str, key: str) -> OutputError:
    """The one line for a failed write: the path, what the OS said, the fix (``key`` names the setting)."""
    where = err.filename if isinstance(err.filename, str) and err.filename else str(path)
    what = err.strerror or type(err).__name__
    if err.errno in _NO_SPACE:
        fix = f"free space on that disk or point {key} at another disk"
    else:
        fix = f"make the folder writable or point {key} at a writable folder"
    return OutputError(f"{where}: cannot write ({what}); {fix}; the previous outputs are kept")


@contextlib.contextmanager
def writing(path: Path | str, key: str) -> Iterator[None]:
    """Writes inside the block that fail for want of space or permission become one :class:`OutputError`."""
    try:
        yield
    except OSError as err:
        if is_write_error(err):
            raise output_error(err, path, key) from None
        raise


def check_writable(folder: Path | str, key: str) -> None:
    """Create ``folder`` if needed and write (then remove) a probe file in it: a folder that cannot take
    files is refused before any compute."""
    folder = Path(folder)
    probe = folder / f".write-probe.{os.getpid()}"
    with writing(folder, key):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.close(fd)
        os.unlink(probe)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class OutputSet:
    """The entries ``names`` of ``parent`` (files or folders), replaced together.

    ``with OutputSet(parent, names, tag, key) as staging:`` yields the folder to write the new set
    into (entries of the same names); on a clean exit the set is moved into place, ``names`` in
    order (put the file readers look for first, e.g. DVC's metrics, last). An entry of ``names``
    the new set lacks is removed. On an exception nothing in ``parent`` changes and the staging
    folder is removed; an ``OSError`` of a write becomes an :class:`OutputError` naming ``key``.
    """

    def __init__(self, parent: Path | str, names: Sequence[str], tag: str, key: str) -> None:
        self.parent = Path(parent)
        self.names = list(names)
        self.key = key
        self.staging = self.parent / f".{tag}.staging"
        self.commit_dir = self.parent / f".{tag}.commit"
        self.old_dir = self.parent / f".{tag}.old"

    # ------------------------------------------------------------------ the stage's side
    def __enter__(self) -> Path:
        with writing(self.parent, self.key):
            self.parent.mkdir(parents=True, exist_ok=True)
            self.recover()
            self.staging.mkdir()
        return self.staging

    def __exit__(self, kind, err, tb) -> bool:  # type: ignore[no-untyped-def]
        if kind is not None:
            with contextlib.suppress(OSError):
                _remove(self.staging)
            if isinstance(err, OSError) and is_write_error(err):
                raise output_error(err, self.staging, self.key) from None
            return False
        try:
            with writing(self.parent, self.key):
                self.commit()
        except BaseException:
            with contextlib.suppress(OSError):
                _remove(self.staging)
            raise
        return False

    def commit(self) -> None:
        """Move the staged set into place (the rename of the staging folder is the commit point)."""
        present = [name for name in self.names if (self.staging / name).exists()]
        manifest = self.staging / MANIFEST
        with open(manifest, "w") as fh:
            json.dump({"names": self.names, "present": present}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(self.staging)
        os.replace(self.staging, self.commit_dir)
        _fsync_dir(self.parent)
        self._roll_forward()

    # ------------------------------------------------------------------ recovery
    def recover(self) -> None:
        """Finish a set a killed process committed; drop one it had only staged."""
        if (self.commit_dir / MANIFEST).is_file():
            log.info("%s: finishing the replacement of outputs %s that a stopped run committed",
                     self.parent, ", ".join(self.names))  # fmt: skip
            self._roll_forward()
        for stale in (self.staging, self.commit_dir, self.old_dir):
            if stale.exists():
                _remove(stale)

    def _roll_forward(self) -> None:
        manifest = json.loads((self.commit_dir / MANIFEST).read_text())
        present = set(manifest["present"])
        self.old_dir.mkdir(exist_ok=True)
        for name in manifest["names"]:
            new, dest, aside = self.commit_dir / name, self.parent / name, self.old_dir / name
            if name in present and not new.exists():
                continue  # moved in already (a roll-forward that was itself stopped)
            if dest.exists() or dest.is_symlink():
                if aside.exists():
                    _remove(aside)
                os.replace(dest, aside)
            if name in present:
                os.replace(new, dest)
        _fsync_dir(self.parent)
        _remove(self.old_dir)
        _remove(self.commit_dir)
