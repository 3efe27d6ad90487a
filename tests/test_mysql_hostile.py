"""Hostile backup content against the host: verify and restore of dumps and copies an attacker wrote.

A writer to the repository holds the job's public key, so it can replace a
backup's stream with content of its own that passes the integrity check. Each
test takes a real backup of a throwaway server, swaps in a crafted stream and
runs the real CLI: the scratch server and the clients around it must write
nothing outside the scratch and read nothing of the host (the age identity
above all, which verification needs and which the old scratch server, running
as root with secure_file_priv unset, could read and smuggle out through table
names into the verify report).
"""

from __future__ import annotations

import binascii
import json
import os
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import pytest

from core_fixtures import Keys
from mysql_support import Mariadb, forge_stream, open_dir, started, stored_stream
from support import run_backupd
from test_mysql_driver import Job, backup, make_job, tools  # noqa: F401

pytestmark = pytest.mark.usefixtures("tools")


@pytest.fixture(scope="module")
def source() -> Iterator[Mariadb]:
    server = started(log_bin=True, server_id=31)
    try:
        server.sql("CREATE DATABASE hostile1", "CREATE TABLE hostile1.t (id INT PRIMARY KEY)",
                   "INSERT INTO hostile1.t VALUES (1), (2), (3)")
        yield server
    finally:
        server.destroy()


@pytest.fixture
def outside() -> Iterator[Path]:
    """A world-writable host directory: only the sandbox and the server's settings keep writes out of it."""
    path = Path(tempfile.mkdtemp(prefix="backupd-mysql-outside-", dir="/tmp"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


HEADER = "CREATE DATABASE IF NOT EXISTS `hostile1`;\nUSE `hostile1`;\n" \
         "CREATE TABLE t (id INT PRIMARY KEY);\nINSERT INTO t VALUES (1),(2),(3);\n"
CHUNK = 28


def smuggle(source_sql: str) -> str:
    """SQL that names tables after hex chunks of ``@k`` (k000_..., k028_...), as the attack on the report did."""
    lines = [source_sql]
    for start in range(0, 280, CHUNK):
        lines.append(f"SET @s = CONCAT('CREATE TABLE `k{start:03d}_', COALESCE(NULLIF(HEX(SUBSTRING(@k, {start + 1}, "
                     f"{CHUNK})), ''), 'unread'), '` (id INT)');\nPREPARE s FROM @s;\nEXECUTE s;\nDEALLOCATE PREPARE s;")
    return "\n".join(lines) + "\n"


def attacks(identity: Path, outside: Path) -> dict[str, str]:
    return {
        "outfile": f"SELECT 'owned' INTO OUTFILE '{outside}/outfile';\n",
        "load_file": smuggle(f"SET @k = LOAD_FILE('{identity}');"),
        "local_infile": "CREATE TABLE leak (line TEXT);\n"
                        f"LOAD DATA LOCAL INFILE '{identity}' INTO TABLE leak;\n"
                        + smuggle("SET @k = (SELECT GROUP_CONCAT(line SEPARATOR '\\n') FROM leak);"),
        "general_log": f"SET GLOBAL general_log_file = '{outside}/general.log';\nSET GLOBAL general_log = 1;\n"
                       "SELECT 'logged';\nSET GLOBAL general_log = 0;\n",
        "shell": f"\\! id > {outside}/shell\n",
    }


def smuggled(text: str) -> bytes:
    """What the table names in ``text`` carry, decoded in order."""
    found = {int(m[1]): binascii.unhexlify(m[2]) for m in re.finditer(r"k(\d{3})_([0-9A-F]{2,})", text)}
    return b"".join(found[start] for start in sorted(found))


def reports(job: Job) -> str:
    return "\n".join(path.read_text() for path in sorted((job.repo / "shop" / "verify").glob("*.json")))


@pytest.mark.parametrize("attack", ["outfile", "load_file", "local_infile", "general_log", "shell"])
def test_a_hostile_dump_reads_and_writes_nothing_of_the_host_during_verify(
        attack: str, source: Mariadb, tmp_path: Path, keys: Keys, outside: Path) -> None:
    job = make_job(tmp_path, keys, source, ["hostile1"])
    backup_id = backup(job)
    if attack == "load_file":  # the server reads only world-readable files: the sandbox must hide it anyway
        keys.identity_file.chmod(0o644)
    crafted = HEADER + attacks(keys.identity_file, outside)[attack]
    forge_stream(job.repo, "shop", backup_id, "dump", crafted.encode(), keys.identity.to_recipient())

    result = run_backupd("verify", "shop", config=job.config, timeout=300)

    assert list(outside.iterdir()) == [], f"{attack}: the scratch wrote on the host"
    secret = str(keys.identity).encode()
    seen = reports(job) + result.out + result.err
    assert secret.decode() not in seen and secret not in smuggled(seen), f"{attack}: the identity was read"
    assert b"public key" not in smuggled(seen)
    # The server or the client rejected the content (general_log: the directory does not exist in the
    # sandbox; load_file: the smuggled names are tables the manifest lacks): a failed verification.
    assert result.code == 3, result.out + result.err
    report = json.loads(sorted((job.repo / "shop" / "verify").glob("*.json"))[-1].read_text())
    assert report["result"] == "failed"


# ---- the sandbox itself -------------------------------------------------------------------------


def uids(pid: int) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(v) for v in re.search(r"^Uid:\s+(.*)$", status, re.M)[1].split()]


@pytest.mark.parametrize("mode", ["bwrap", "off"])
def test_the_scratch_server_reads_and_writes_nothing_of_the_host(mode: str, source: Mariadb, tmp_path: Path,
                                                                 keys: Keys) -> None:
    """A statement in the scratch server, even with secure_file_priv lifted, reaches nothing of the host.

    "off" (verify.sandbox = "off") is the control: the same statements then do read the
    identity and the production datadir and write to /tmp, so the sandbox is what stops them.
    """
    from drivers.mysql.scratch import MariadbScratch, install_db

    production = source.datadir / "hostile1" / "db.opt"  # readable to the mysql user, were it visible
    for path in (source.base, source.datadir, production.parent):
        path.chmod(0o755)
    production.chmod(0o644)
    marker = Path(f"/tmp/backupd-general-log-{os.getpid()}-{mode}.log")
    with open_dir() as base:
        identity_file = base / "identity.txt"  # readable to any user: only the sandbox hides it
        shutil.copy(keys.identity_file, identity_file)
        identity_file.chmod(0o644)
        job = make_job(tmp_path, Keys(keys.identity, keys.recipient, identity_file), source, ["hostile1"],
                       verify={"sandbox": mode})
        sandbox_for = job.context().driver.scratch_sandbox
        try:
            install_db(base / "data", sandbox_for)
            with MariadbScratch(base / "data", base / "run", sandbox_for) as server:
                conn = server.credentials.connect()
                with conn.cursor() as cur:
                    cur.execute("SELECT @@secure_file_priv, @@local_infile, @@skip_networking")
                    assert cur.fetchone() == (f"{base / 'run' / 'files'}/", 0, 1)
                conn.close()
                assert server.pid is not None and 0 not in uids(server.pid), "mariadbd runs as root"
            with MariadbScratch(base / "data", base / "run", sandbox_for, ["--secure-file-priv="]) as server:
                conn = server.credentials.connect()
                with conn.cursor() as cur:
                    cur.execute("SELECT LOAD_FILE(%s), LOAD_FILE(%s)", (str(identity_file), str(production)))
                    identity, datadir_file = cur.fetchone()
                    cur.execute("SET GLOBAL general_log_file = %s", (str(marker),))
                    cur.execute("SET GLOBAL general_log = 1")
                    cur.execute("SELECT 'written'")
                    cur.execute("SET GLOBAL general_log = 0")
                conn.close()
            if mode == "bwrap":
                assert identity is None and datadir_file is None
                assert not marker.exists()
            else:
                assert str(keys.identity).encode() in identity and datadir_file is not None
                assert b"written" in marker.read_bytes()
        finally:
            marker.unlink(missing_ok=True)


# ---- physical copies ------------------------------------------------------------------------------


def xb_member(path: str, data: bytes) -> bytes:
    """One file as an xbstream carries it: a payload chunk and its end-of-file chunk."""
    name = path.encode()
    head = b"XBSTCK01\0"
    return (head + b"P" + struct.pack("<I", len(name)) + name + struct.pack("<QQI", len(data), 0, zlib.crc32(data))
            + data + head + b"E" + struct.pack("<I", len(name)) + name)


def physical_job(tmp_path: Path, keys: Keys, source: Mariadb) -> tuple[Job, str]:
    job = make_job(tmp_path, keys, source, ["hostile1"], method="physical")
    return job, backup(job)


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.backupd-")]


def test_mbstream_refusing_a_member_fails_restore_and_verify(source: Mariadb, tmp_path: Path, keys: Keys) -> None:
    job, backup_id = physical_job(tmp_path, keys, source)
    stream = stored_stream(job.repo, "shop", backup_id, "physical", keys.identity)
    forge_stream(job.repo, "shop", backup_id, "physical", stream + xb_member("../escaped.txt", b"outside\n"),
                 keys.identity.to_recipient())
    dest = tmp_path / "restored" / "datadir"

    restored = run_backupd("restore", "shop", "--to", str(dest), config=job.config, timeout=300)
    assert restored.code == 1, restored.out + restored.err
    assert "mbstream refused part of the backup" in restored.err and "invalid filename" in restored.err
    assert not dest.exists() and leftovers(dest.parent, "datadir") == []
    assert not (dest.parent / "escaped.txt").exists()

    verified = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert verified.code == 3, verified.out + verified.err
    assert "mbstream (extracting the backup) refused a member of the stream" in verified.out
    assert "escaped" not in verified.out  # the report names no content


def test_a_failed_physical_restore_leaves_no_data_directory(source: Mariadb, tmp_path: Path, keys: Keys) -> None:
    job, backup_id = physical_job(tmp_path, keys, source)
    stream = stored_stream(job.repo, "shop", backup_id, "physical", keys.identity)
    forge_stream(job.repo, "shop", backup_id, "physical", stream[:len(stream) // 2] + b"NOTMAGIC" + b"x" * 64,
                 keys.identity.to_recipient())
    for dest in (tmp_path / "new", tmp_path / "empty"):
        if dest.name == "empty":
            dest.mkdir()
        restored = run_backupd("restore", "shop", "--to", str(dest), config=job.config, timeout=300)
        assert (list(dest.iterdir()) == [] if dest.name == "empty" else not dest.exists())
        assert leftovers(tmp_path, dest.name) == []
        assert restored.code == 1 and "mbstream (extracting the backup) exited with status 1" in restored.err


def test_restore_force_unlinks_symlinks_instead_of_writing_through_them(source: Mariadb, tmp_path: Path,
                                                                        keys: Keys) -> None:
    job, _ = physical_job(tmp_path, keys, source)
    outside = tmp_path / "outside"
    (outside / "mysql").mkdir(parents=True)
    (outside / "mysql" / "keep.txt").write_text("keep\n")
    (outside / "victim").write_text("untouched\n")
    dest = tmp_path / "datadir"
    dest.mkdir()
    (dest / "mysql").symlink_to(outside / "mysql")
    (dest / "ibdata1").symlink_to(outside / "victim")
    (dest / "hostile1").symlink_to(outside)

    restored = run_backupd("restore", "shop", "--to", str(dest), "--force", config=job.config, timeout=300)
    assert restored.code == 0, restored.err
    assert sorted(p.name for p in outside.rglob("*")) == ["keep.txt", "mysql", "victim"]
    assert (outside / "victim").read_text() == "untouched\n"
    for name in ("mysql", "ibdata1", "hostile1"):
        assert not (dest / name).is_symlink() and (dest / name).exists()
    assert leftovers(tmp_path, "datadir") == []


# ---- what a verification reports ------------------------------------------------------------------


def test_a_dump_the_scratch_rejects_fails_verification_and_one_that_cannot_run_is_exit_1(
        source: Mariadb, tmp_path: Path, keys: Keys) -> None:
    job = make_job(tmp_path, keys, source, ["hostile1"])
    backup_id = backup(job)
    forge_stream(job.repo, "shop", backup_id, "dump", (HEADER + "INSERT INTO t VALUES ('secret-row-value';\n").encode(),
                 keys.identity.to_recipient())
    rejected = run_backupd("verify", "shop", config=job.config, timeout=300)
    assert rejected.code == 3, rejected.out + rejected.err
    assert "mariadb (loading the dump) exited with status 1: ERROR 1064 (42000) at line 5" in rejected.out
    report = reports(job)
    assert '"result": "failed"' in report and "secret-row-value" not in report + rejected.out

    no_bwrap = tmp_path / "bin"  # a PATH without bubblewrap: the sandbox cannot start
    no_bwrap.mkdir()
    unsandboxed = run_backupd("verify", "shop", config=job.config, timeout=300, env={"PATH": str(no_bwrap)})
    assert unsandboxed.code == 1, unsandboxed.out + unsandboxed.err
    assert "bwrap: not found" in unsandboxed.err and 'verify.sandbox = "off"' in unsandboxed.err
