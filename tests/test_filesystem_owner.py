"""A command run as root (`sudo backupd verify`) leaves a filesystem repository readable to the OS user
the daemon and archive_command run as: what it writes takes the owner of the directory it goes in."""

from __future__ import annotations

import io
import os
import pwd
from pathlib import Path

import pytest

from storage.filesystem import FilesystemStorage

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root can write files another user owns")


def owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, tuple[int, int]]:
    user = pwd.getpwnam("nobody")
    root = tmp_path / "repo"
    root.mkdir()
    os.chown(root, user.pw_uid, user.pw_gid)
    return root, (user.pw_uid, user.pw_gid)


def test_objects_and_directories_root_writes_belong_to_the_repository_owner(repo) -> None:
    root, nobody = repo
    storage = FilesystemStorage(root)
    storage.put("job/backups/1/db.zst.age", io.BytesIO(b"x"), metadata={"sha256": "ab"})
    version = storage.replace("job/index.json", b"{}", version=None)
    storage.replace("job/index.json", b"{} ", version=version)  # a root run rewriting the index
    for path in (root / "job", root / "job/backups", root / "job/backups/1", root / "job/backups/1/db.zst.age",
                 root / "job/index.json"):
        assert owner(path) == nobody, path
    assert all(owner(path) == nobody for path in root.rglob("*"))  # the metadata beside the object too
    assert storage.open("job/index.json").read() == b"{} "


def test_a_repository_root_owns_stays_root_s(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path / "repo")
    storage.put("job/backups/1/db.zst.age", io.BytesIO(b"x"))
    assert owner(tmp_path / "repo/job/backups/1/db.zst.age") == (0, 0)
