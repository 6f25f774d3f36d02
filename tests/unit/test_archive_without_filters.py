"""executors.archive.unpack on a Python without tarfile extraction filters
(before 3.11.4, like Debian bookworm's 3.11.2 in the Docker image): the same
archives unpack, and the same escapes are refused."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from executors.archive import ArchiveError, pack_dir, unpack


@pytest.fixture(autouse=True)
def no_filters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(tarfile, "data_filter", raising=False)


def tar_of(*members: tuple[str, str, str]) -> bytes:
    """(kind, name, content or link target) -> a tar.gz."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for kind, name, value in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
                tar.addfile(info)
            else:
                data = value.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_configuration_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "modules" / "vpc").mkdir(parents=True)
    (src / "main.tf").write_text('module "vpc" { source = "./modules/vpc" }\n')
    (src / "modules" / "vpc" / "main.tf").write_text("# vpc\n")
    (src / "modules" / "net").symlink_to("vpc")
    dest = tmp_path / "dest"
    unpack(pack_dir(src, 1 << 20), dest)
    assert (dest / "main.tf").read_text() == (src / "main.tf").read_text()
    assert (dest / "modules" / "net" / "main.tf").read_text() == "# vpc\n"


@pytest.mark.parametrize(
    "members",
    [
        [("file", "/etc/evil", "x")],
        [("file", "../evil", "x")],
        [("sym", "up", "../..")],
        [("sym", "abs", "/etc")],
        [("fifo", "pipe", "")],
        # Each link stays inside on its own; the path through the first one
        # does not.
        [("dir", "d", ""), ("sym", "d/l", ".."), ("file", "d/l/../evil", "x")],
        [("dir", "d", ""), ("sym", "d/l", ".."), ("sym", "d/l/up", "..")],
    ],
)
def test_escapes_are_refused(tmp_path: Path, members: list[tuple[str, str, str]]) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError):
        unpack(tar_of(*members), dest)
    assert not (tmp_path / "evil").exists()
