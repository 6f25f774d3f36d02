"""executors.archive: the deterministic tar.gz of configuration versions and
saved plans, and the guarded unpack every executor uses."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from executors import archive

LIMIT = 1024 * 1024


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


CONFIG = {
    "main.tf": 'resource "null_resource" "r" {}\n',
    "modules/net/main.tf": 'output "x" { value = 1 }\n',
    "vars.auto.tfvars": "n = 2\n",
}


def test_the_same_tree_gives_the_same_bytes(tmp_path: Path) -> None:
    a = tree(tmp_path / "a", CONFIG)
    first = archive.pack_dir(a, LIMIT)
    # Other mtimes, another order of creation, another place, later.
    b = tree(tmp_path / "elsewhere" / "b", dict(reversed(CONFIG.items())))
    os.utime(b / "main.tf", (1_000_000, 1_000_000))
    time.sleep(1.1)
    second = archive.pack_dir(b, LIMIT)
    assert second == first
    assert archive.sha256(second) == archive.sha256(first)
    assert archive.names(first) == sorted(CONFIG)  # files only, no directory entries
    # A change of content is a different version.
    (b / "vars.auto.tfvars").write_text("n = 3\n")
    assert archive.pack_dir(b, LIMIT) != first


def test_modes_and_owners_are_normalised(tmp_path: Path) -> None:
    root = tree(tmp_path / "c", {"main.tf": "# x\n", "run.sh": "#!/bin/sh\n"})
    (root / "run.sh").chmod(0o750)
    (root / "main.tf").chmod(0o600)
    with tarfile.open(fileobj=io.BytesIO(archive.pack_dir(root, LIMIT)), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["run.sh"].mode == 0o755 and members["main.tf"].mode == 0o644
    assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members.values()} == {
        (0, 0, "", "", 0)
    }


def test_what_must_not_travel_is_skipped(tmp_path: Path) -> None:
    root = tree(
        tmp_path / "s",
        {
            **CONFIG,
            ".terraform/providers/null/bin": "a provider",
            ".terraform/terraform.tfstate": "{}",
            "modules/net/.terraform/x": "nested",
            ".git/HEAD": "ref: refs/heads/main\n",
            "terraform.tfstate": "{}",
            "terraform.tfstate.backup": "{}",
            "runq.tfstate": "{}",
            "old.tfplan": "plan",
            "runq_override.tf": "# runq writes its own\n",
            ".terraform.lock.hcl": "# kept: it pins providers\n",
        },
    )
    names = archive.names(archive.pack_dir(root, LIMIT))
    files = [n for n in names if not (root / n).is_dir()]
    assert sorted(files) == sorted([*CONFIG, ".terraform.lock.hcl"])
    assert not any(".terraform/" in n or n.startswith(".git") for n in names), names
    # And skipping them changes nothing: the same digest as without them.
    bare = tree(tmp_path / "bare", {**CONFIG, ".terraform.lock.hcl": "# kept: it pins providers\n"})
    assert archive.pack_dir(bare, LIMIT) == archive.pack_dir(root, LIMIT)


def test_a_symlink_inside_the_tree_is_kept(tmp_path: Path) -> None:
    root = tree(tmp_path / "in", CONFIG)
    (root / "link.tf").symlink_to("main.tf")
    (root / "mods").symlink_to("modules")
    data = archive.pack_dir(root, LIMIT)
    out = tmp_path / "out"
    archive.unpack(data, out)
    assert (out / "link.tf").read_text() == CONFIG["main.tf"]
    assert (out / "mods" / "net" / "main.tf").read_text() == CONFIG["modules/net/main.tf"]


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_symlink_out_of_the_tree_is_refused(tmp_path: Path, kind: str) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("PRIVATE KEY\n")
    root = tree(tmp_path / "cfg", CONFIG)
    target = secret / "id_rsa" if kind == "file" else secret
    (root / "leak").symlink_to(target)
    with pytest.raises(archive.ArchiveError, match="outside the configuration directory") as e:
        archive.pack_dir(root, LIMIT)
    assert "leak" in str(e.value)


def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(archive.ArchiveError, match="does not exist"):
        archive.pack_dir(tmp_path / "nope", LIMIT)


def test_the_size_limit_names_both_sizes(tmp_path: Path) -> None:
    root = tree(tmp_path / "big", {"main.tf": "# x\n"})
    (root / "blob.bin").write_bytes(os.urandom(20_000))  # incompressible
    with pytest.raises(archive.ArchiveError) as e:
        archive.pack_dir(root, 10_000)
    message = str(e.value)
    assert "over the limit of 10000 bytes" in message
    size = int(message.split(" is ")[1].split(maxsplit=1)[0])
    assert size > 10_000
    # Far over the limit before compression: refused without packing it all.
    (root / "huge.bin").write_bytes(b"\0" * 200_000)
    with pytest.raises(archive.ArchiveError, match="far over the limit of 10000 bytes"):
        archive.pack_dir(root, 10_000)
    assert archive.pack_dir(root, LIMIT)


def evil(entries: list[tarfile.TarInfo], data: bytes = b"pwned\n") -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for info in entries:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return raw.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(
    "entries",
    [
        [entry("../escaped")],
        [entry("a/../../escaped")],
        [entry("link", tarfile.SYMTYPE, "../"), entry("link/escaped")],
        [entry("hard", tarfile.LNKTYPE, "../outside-target")],
        [entry("dev", tarfile.CHRTYPE)],
    ],
    ids=["dotdot", "nested-dotdot", "symlink-dir", "hardlink", "device"],
)
def test_unpack_refuses_a_path_escape(tmp_path: Path, entries: list[tarfile.TarInfo]) -> None:
    dest = tmp_path / "work" / "copy"
    with pytest.raises(archive.ArchiveError, match="cannot be unpacked"):
        archive.unpack(evil(entries), dest)
    assert not (tmp_path / "work" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()


def test_unpack_keeps_an_absolute_name_inside(tmp_path: Path) -> None:
    outside = tmp_path / "absolute-escape"
    dest = tmp_path / "work"
    archive.unpack(evil([entry(str(outside))]), dest)
    assert not outside.exists()
    assert (dest / str(outside).lstrip("/")).read_text() == "pwned\n"


def test_unpack_refuses_garbage(tmp_path: Path) -> None:
    with pytest.raises(archive.ArchiveError, match="cannot be unpacked"):
        archive.unpack(b"not a tar.gz at all", tmp_path / "x")


def test_pack_then_unpack_round_trips(tmp_path: Path) -> None:
    root = tree(tmp_path / "src", CONFIG)
    out = tmp_path / "out"
    archive.unpack(archive.pack_dir(root, LIMIT), out)
    for name, text in CONFIG.items():
        assert (out / name).read_text() == text


def test_pack_files_of_a_saved_plan(tmp_path: Path) -> None:
    plan = tmp_path / "runq.tfplan"
    plan.write_bytes(b"PK\x03\x04 a plan")
    lock = tmp_path / ".terraform.lock.hcl"
    lock.write_text("# lock\n")
    members = [("runq.tfplan", plan), (".terraform.lock.hcl", lock)]
    data = archive.pack_files(members, LIMIT, what="the saved plan")
    assert archive.pack_files(list(reversed(members)), LIMIT, what="x") == data
    assert archive.names(data) == [".terraform.lock.hcl", "runq.tfplan"]
    with pytest.raises(archive.ArchiveError, match="the saved plan is"):
        archive.pack_files(members, 10, what="the saved plan")


@pytest.mark.parametrize("how", ["absolute", "up-and-back"])
def test_a_symlink_spelled_through_the_outside_but_pointing_inside_unpacks(
    tmp_path: Path, how: str
) -> None:
    """Accepted at submit, so it must unpack at plan time too: the archive
    holds it as a link relative to where it is."""
    root = tree(tmp_path / "cfg", CONFIG)
    target = root / "modules" / "net" / "main.tf"
    link = root / "modules" / "net.tf"
    link.symlink_to(
        target if how == "absolute" else Path("..", "..", "cfg", "modules", "net", "main.tf")
    )
    assert link.read_text() == CONFIG["modules/net/main.tf"]
    data = archive.pack_dir(root, LIMIT)
    out = tmp_path / "out"
    archive.unpack(data, out)
    assert (out / "modules" / "net.tf").read_text() == CONFIG["modules/net/main.tf"]
    assert os.readlink(out / "modules" / "net.tf") == "net/main.tf"
    # Where the tree is does not change its snapshot.
    moved = tmp_path / "moved"
    (tmp_path / "cfg").rename(moved)
    if how == "up-and-back":
        # (that spelling names the old place: it now points elsewhere)
        return
    (moved / "modules" / "net.tf").unlink()
    (moved / "modules" / "net.tf").symlink_to(moved / "modules" / "net" / "main.tf")
    assert archive.pack_dir(moved, LIMIT) == data


def test_hard_links_do_not_change_the_digest(tmp_path: Path) -> None:
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    for d in (linked, copied):
        d.mkdir()
        (d / "a.tf").write_text('output "a" { value = 1 }\n')
    os.link(linked / "a.tf", linked / "b.tf")
    (copied / "b.tf").write_text('output "a" { value = 1 }\n')
    assert archive.sha256(archive.pack_dir(linked, LIMIT)) == archive.sha256(
        archive.pack_dir(copied, LIMIT)
    )
