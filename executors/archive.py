"""Deterministic tar.gz archives: configuration versions and plan artifacts.

A configuration version is a snapshot of a workspace's directory taken at
submit; a plan artifact holds the saved plan and the provider lock file.
Both travel to executors on other hosts, so both are packed here and only
unpacked through :func:`unpack`.

Hazards and what guards them:

* **What must not travel.** ``.terraform/`` (another run's providers and
  backend), state files (the state lives in the database; a stray local file
  would shadow it) and plan files are skipped, as are ``.git`` directories.
* **Archives that escape.** An archive is unpacked with the ``data`` filter:
  no absolute paths, no ``..``, no links out of the tree, no devices. A
  symlink in a source directory that points outside it is refused at submit,
  where the user can fix it, not at plan time; one that points inside is
  stored relative to itself, so the filter accepts it however it was spelled.
* **The same bytes for the same tree.** Entries are sorted with mtimes,
  owners and modes normalised, and the gzip header carries no time, so an
  unchanged directory gives the same digest and is stored once.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import os
import tarfile
from collections.abc import Iterable
from pathlib import Path

#: Never part of a configuration version (matched against each path part).
SKIPPED_DIRS = frozenset({".terraform", ".git"})
SKIPPED_FILES = ("*.tfstate", "*.tfstate.*", "*.tfplan", "runq_override.tf")


class ArchiveError(Exception):
    """A directory that cannot be snapshotted, or an archive that cannot be used."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _skipped(rel: Path) -> bool:
    if any(part in SKIPPED_DIRS for part in rel.parts[:-1]):
        return True
    return rel.name in SKIPPED_DIRS or any(fnmatch.fnmatch(rel.name, p) for p in SKIPPED_FILES)


def _walk(root: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            yield Path(dirpath, name)
        for name in dirnames:
            path = Path(dirpath, name)
            if path.is_symlink():
                yield path


def pack_dir(root: Path, limit: int) -> bytes:
    """A tar.gz of the configuration in ``root``, at most ``limit`` bytes."""
    if not root.is_dir():
        raise ArchiveError(f"configuration directory {str(root)!r} does not exist")
    root = root.resolve()
    members: list[tuple[str, Path]] = []
    for path in _walk(root):
        rel = path.relative_to(root)
        if _skipped(rel):
            continue
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                raise ArchiveError(
                    f"{rel} is a symlink to {target}, outside the configuration directory"
                )
        members.append((rel.as_posix(), path))
    return pack_files(members, limit, what=f"configuration directory {str(root)!r}")


def pack_files(members: Iterable[tuple[str, Path]], limit: int, *, what: str) -> bytes:
    """A tar.gz of ``(name in archive, path)`` pairs, at most ``limit`` bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        total = 0
        for name, path in sorted(members):
            info = tar.gettarinfo(str(path), arcname=name)
            if info.islnk():
                # A second name for an inode already packed: stored as a file
                # of its own, so the digest does not depend on hard links.
                info.type = tarfile.REGTYPE
                info.linkname = ""
                info.size = path.stat().st_size
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o755 if info.mode & 0o111 else 0o644
            if info.issym():
                # Stored relative to where the link is: an absolute target,
                # or one spelled through the outside ("../../cfg/x"), would
                # be refused at unpack even though it points inside the tree.
                info.linkname = os.path.relpath(path.resolve(), path.parent.resolve())
            if info.isfile():
                total += info.size
                if total > 8 * limit:  # even gzip will not bring this under the limit
                    raise ArchiveError(
                        f"{what} is over {total} bytes before compression, "
                        f"far over the limit of {limit} bytes"
                    )
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)
    data = _gzip(raw.getvalue())
    if len(data) > limit:
        raise ArchiveError(
            f"{what} is {len(data)} bytes compressed, over the limit of {limit} bytes"
        )
    return data


def pack_bytes(files: dict[str, bytes]) -> bytes:
    """A tar.gz of ``{name: content}``, made as :func:`pack_files` makes one
    (fakes and tests that have no directory to pack)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return _gzip(raw.getvalue())


def _gzip(tar: bytes) -> bytes:
    # No time in the header: the same tree gives the same bytes.
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(tar)
    return out.getvalue()


def unpack(data: bytes, dest: Path) -> None:
    """Extract ``data`` into ``dest``, refusing anything that would escape it."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:
                _extract_checked(tar, dest)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"archive cannot be unpacked: {exc}") from exc


def _extract_checked(tar: tarfile.TarFile, dest: Path) -> None:
    """The ``data`` filter's refusals, for Pythons without extraction filters
    (before 3.11.4; Debian bookworm's python3, the Docker image's, is 3.11.2):
    only files, directories and links, nothing absolute, no special mode
    bits, and nothing written or linked outside ``dest``. Members are checked
    and extracted one at a time, so a path through a link extracted earlier
    is resolved as it is on disk."""
    root = os.path.realpath(dest)

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep)

    for member in tar.getmembers():
        path = os.path.join(root, member.name)
        if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
            raise ArchiveError(f"archive member {member.name!r} is not a file, directory or link")
        if os.path.isabs(member.name) or not inside(path):
            raise ArchiveError(f"archive member {member.name!r} is outside the destination")
        if member.issym() or member.islnk():
            base = os.path.dirname(path) if member.issym() else root
            if os.path.isabs(member.linkname) or not inside(os.path.join(base, member.linkname)):
                raise ArchiveError(f"archive link {member.name!r} points outside the destination")
        member.mode &= 0o755
        tar.extract(member, root)


def names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return sorted(tar.getnames())
