"""Signed log objects (WAL segments, binlogs, oplog slices): an attacker who can write the repository
but holds no trusted signing key cannot get a log object of theirs replayed.

Each object is pushed with ``<key>.sig`` beside it (an SSH signature over its key and plaintext
sha256). With trusted keys, ``LogArchive.open`` refuses an unsigned or badly signed object before
reading it, and one whose content is not the signed content at its end; ``fetch_to`` then leaves
nothing behind. Without trusted keys nothing is checked (as before signing).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from backupd import age, signing
from backupd.errors import UntrustedObject
from backupd.logarchive import LogArchive
from backupd.pipeline import encode_bytes
from backupd.sshsig import SigningKey
from core_fixtures import Keys, Repo, keys  # noqa: F401 (fixture)
from drivers.postgres.cluster import chown_tree
from pg_fixtures import JOB, PgEnv, pg_env  # noqa: F401 (fixture)
from backupd.storage import Storage
from storage.filesystem import FilesystemStorage
from mysql_support import started
from signing_support import add_signing, read as read_stored, signing_key_file
from support import error_lines, run_backupd, write_config
from test_mysql_driver import RunningArchiver, backup, make_job, tools  # noqa: F401 (fixture)

HOST_A = SigningKey.generate("backupd@host-a")
STRANGER = SigningKey.generate("backupd@stranger")


def key_file(path: Path, key: SigningKey) -> Path:
    path.write_text(key.to_openssh())
    path.chmod(0o600)
    return path


def archive(storage: FilesystemStorage, keys: Keys, **options: object) -> LogArchive:
    return LogArchive(storage, "db", "wal", [age.parse_recipient(keys.recipient)], **options)  # type: ignore[arg-type]


def push(storage: FilesystemStorage, keys: Keys, tmp_path: Path, name: str, data: bytes,
         signer: SigningKey | None = HOST_A) -> str:
    path = tmp_path / name.replace("/", "_")
    path.write_bytes(data)
    signing_key = None if signer is None else key_file(tmp_path / f"signing-{signer.public.comment}", signer)
    archive(storage, keys, signing_key_file=signing_key).push_file(name, path)
    return LogArchive(storage, "db", "wal").key(name)


def replace_object(storage: Storage, keys: Keys, key: str, data: bytes, sha256: str | None = None) -> None:
    """What an attacker with write access does: other valid age content, metadata as they like."""
    body = encode_bytes(data, [age.parse_recipient(keys.recipient)], 3)
    storage.delete(key)
    storage.put(key, io.BytesIO(body), metadata={"sha256": sha256 or hashlib.sha256(data).hexdigest(),
                                                 "raw-size": str(len(data))})


def read(storage: FilesystemStorage, keys: Keys, name: str, trusted: list[SigningKey] | None = None) -> bytes:
    reader = archive(storage, keys, trusted=[k.public for k in trusted or []])
    with reader.open(name, [keys.identity]) as stream:
        return stream.read()


def test_a_pushed_log_is_signed_and_read_back(fs_storage: FilesystemStorage, keys: Keys, tmp_path: Path) -> None:
    key = push(fs_storage, keys, tmp_path, "00000001/000000010000000000000003", b"wal" * 1000)
    sig_key = LogArchive(fs_storage, "db", "wal").layout.log_signature_key("wal", "00000001/000000010000000000000003")
    assert sig_key == key + ".sig"
    fs_storage.stat(sig_key)
    assert read(fs_storage, keys, "00000001/000000010000000000000003", [HOST_A]) == b"wal" * 1000
    # listings see the log, not its signature
    assert [o.name for o in LogArchive(fs_storage, "db", "wal").list()] == ["00000001/000000010000000000000003"]


def test_the_signature_checks_by_hand_with_ssh_keygen(fs_storage: FilesystemStorage, keys: Keys,
                                                      tmp_path: Path) -> None:
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen not installed")
    data = b"segment" * 100
    key = push(fs_storage, keys, tmp_path, "00000001/000000010000000000000004", data)
    sig = tmp_path / "log.sig"
    sig.write_bytes(fs_storage.open(key + ".sig").read())
    signers = tmp_path / "allowed_signers"
    signers.write_text(f"backupd {HOST_A.public.line()}\n")
    # the signature covers the log's kind, name and sha256 (not its storage key: it survives a move)
    message = f"backupd-log-v2\nwal\n00000001/000000010000000000000004\n{hashlib.sha256(data).hexdigest()}\n"
    done = subprocess.run(["ssh-keygen", "-Y", "verify", "-n", "backupd", "-f", str(signers), "-I", "backupd",
                           "-s", str(sig)], input=message.encode(), capture_output=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("same_sha256_metadata", [True, False])
def test_a_replaced_log_object_is_refused(fs_storage: FilesystemStorage, keys: Keys, tmp_path: Path,
                                          same_sha256_metadata: bool) -> None:
    name = "00000001/000000010000000000000005"
    original = b"real" * 2000
    key = push(fs_storage, keys, tmp_path, name, original)
    forged = b"evil" * 2000
    replace_object(fs_storage, keys, key, forged,
                   hashlib.sha256(original).hexdigest() if same_sha256_metadata else None)
    with pytest.raises(UntrustedObject, match=key):
        read(fs_storage, keys, name, [HOST_A])
    dest = tmp_path / "spool" / "000000010000000000000005"
    dest.parent.mkdir()
    with pytest.raises(UntrustedObject, match=key):
        archive(fs_storage, keys, trusted=[HOST_A.public]).fetch_to(name, dest, [keys.identity])
    assert list(dest.parent.iterdir()) == []  # nothing spooled, not even a temporary file


def test_a_moved_signature_is_refused(fs_storage: FilesystemStorage, keys: Keys, tmp_path: Path) -> None:
    data = b"same bytes" * 500
    first = push(fs_storage, keys, tmp_path, "00000001/000000010000000000000006", data)
    second = push(fs_storage, keys, tmp_path, "00000001/000000010000000000000007", data)
    fs_storage.delete(second + ".sig")
    fs_storage.put(second + ".sig", io.BytesIO(fs_storage.open(first + ".sig").read()))
    with pytest.raises(UntrustedObject, match=second):
        read(fs_storage, keys, "00000001/000000010000000000000007", [HOST_A])


def test_a_stranger_s_signature_is_refused(fs_storage: FilesystemStorage, keys: Keys, tmp_path: Path) -> None:
    key = push(fs_storage, keys, tmp_path, "00000001/000000010000000000000008", b"x" * 100, signer=STRANGER)
    with pytest.raises(UntrustedObject, match=key):
        read(fs_storage, keys, "00000001/000000010000000000000008", [HOST_A])


def test_untrusted_lists_logs_no_trusted_key_vouches_for(storage: Storage, keys: Keys, tmp_path: Path) -> None:
    names = [f"00000001/0000000100000000000000{n:02X}" for n in range(0x30, 0x36)]
    pushed = {name: push(storage, keys, tmp_path, name, name.encode() * 100,  # type: ignore[arg-type]
                         signer=None if name == names[1] else STRANGER if name == names[2] else HOST_A)
              for name in names}
    storage.delete(pushed[names[3]] + ".sig")  # the signature of another log in its place
    storage.put(pushed[names[3]] + ".sig", io.BytesIO(read_stored(storage, pushed[names[0]] + ".sig")))
    replace_object(storage, keys, pushed[names[4]], b"forged" * 100)  # other content, its own sha256
    replace_object(storage, keys, pushed[names[5]], b"forged" * 100,  # the signed sha256 kept: found when read
                   hashlib.sha256(names[5].encode() * 100).hexdigest())
    checked = archive(storage, keys, trusted=[HOST_A.public])  # type: ignore[arg-type]
    found = list(checked.untrusted())
    assert [line.split()[1] for line in found] == [pushed[n] for n in names[1:5]], found
    assert "missing; the log object is not signed" in found[0]
    assert f"signed by ssh-ed25519 {STRANGER.public.fingerprint}, which is not a trusted key" in found[1]
    assert "does not match the data" in found[2] and "does not match the data" in found[3]
    with pytest.raises(UntrustedObject, match=pushed[names[5]]):
        with checked.open(names[5], [keys.identity]) as stream:
            stream.read()
    assert list(archive(storage, keys).untrusted()) == []  # without trusted keys nothing is checked


def test_unsigned_logs_are_refused_with_trusted_keys_and_read_without(fs_storage: FilesystemStorage, keys: Keys,
                                                                     tmp_path: Path) -> None:
    name = "00000001/000000010000000000000009"
    key = push(fs_storage, keys, tmp_path, name, b"old" * 100, signer=None)
    with pytest.raises(UntrustedObject, match=f"{key}.sig: missing"):
        read(fs_storage, keys, name, [HOST_A])
    assert read(fs_storage, keys, name) == b"old" * 100
    reader = archive(fs_storage, keys, trusted=[HOST_A.public], allow_unsigned=True)
    with reader.open(name, [keys.identity]) as stream:
        assert stream.read() == b"old" * 100


def test_partial_objects_are_re_signed_as_they_grow_and_deleted_with_their_signature(
        fs_storage: FilesystemStorage, keys: Keys, tmp_path: Path) -> None:
    signer = key_file(tmp_path / "signing", HOST_A)
    logs = archive(fs_storage, keys, signing_key_file=signer)
    path = tmp_path / "binlog.partial"
    for size in (10, 20):
        path.write_bytes(b"p" * size)
        logs.push_file("mysql-bin.000001.partial", path, replace=True)
        assert read(fs_storage, keys, "mysql-bin.000001.partial", [HOST_A]) == b"p" * size
    logs.delete("mysql-bin.000001.partial")
    assert list(fs_storage.list("db/")) == []


def test_a_second_push_of_other_bytes_keeps_the_first_signature(fs_storage: FilesystemStorage, keys: Keys,
                                                                tmp_path: Path) -> None:
    from backupd.logarchive import LogConflict

    name = "00000001/00000001000000000000000A"
    push(fs_storage, keys, tmp_path, name, b"first" * 10)
    with pytest.raises(LogConflict):
        push(fs_storage, keys, tmp_path, name, b"second" * 10)
    assert read(fs_storage, keys, name, [HOST_A]) == b"first" * 10
    assert signing.signature_key(LogArchive(fs_storage, "db", "wal").key(name)).endswith(".zst.age.sig")


# -- against a real PostgreSQL cluster: a replaced WAL segment is never replayed ---------------------

ARCHIVE_LOGS = True
METHOD = "physical"


def test_a_replaced_wal_segment_is_refused_by_wal_fetch_and_not_replayed(pg_env: PgEnv) -> None:  # noqa: F811
    key = pg_env.root / "signing.key"
    key_file(key, HOST_A)
    settings = write_config(pg_env.root / "signing.toml", {"signing": {
        "key_file": str(key), "trusted_keys": [HOST_A.public.line()]}}).read_text()
    pg_env.config.write_text(settings + "\n" + pg_env.config.read_text())
    chown_tree(pg_env.root, "postgres")
    pg_env.sql("CREATE TABLE orders (id serial PRIMARY KEY, note text)")
    pg_env.sql("INSERT INTO orders (note) SELECT 'before' FROM generate_series(1, 100)")
    pg_env.backupd("backup", JOB, check=True)
    pg_env.sql("INSERT INTO orders (note) SELECT 'after' FROM generate_series(1, 100)")
    segment = pg_env.switch_and_wait_archived()
    pg_env.switch_and_wait_archived()  # a segment after it, so the archive goes on past the forgery

    repo = FilesystemStorage(pg_env.repo)
    wal = LogArchive(repo, JOB, "wal")
    name = f"{segment[:8]}/{segment}"
    original = wal.stat(name)
    assert repo.stat(wal.layout.log_signature_key("wal", name))
    forged = (pg_env.cluster.data / "pg_wal" / segment).read_bytes()[:8192] * 2048  # another 16 MiB, valid age
    identity = age.load_identities(pg_env.identity)[0]
    replace_object(repo, Keys(identity, str(identity.to_recipient()), pg_env.identity), wal.key(name), forged,
                   original.sha256)
    chown_tree(pg_env.root, "postgres")

    fetched = pg_env.backupd("wal-fetch", "--job", JOB, segment, str(pg_env.root / segment))
    assert fetched.code == 1 and "does not match its signature" in fetched.err and wal.key(name) in fetched.err, \
        fetched.err
    assert not (pg_env.root / segment).exists()

    restored = pg_env.restored_cluster("after-forgery")
    result = pg_env.backupd("restore", JOB, "--to", str(restored.data))
    assert result.code == 0, result.err  # the backup itself is signed; its WAL is fetched during recovery
    pg_env.start_restored(restored)
    try:
        with restored.connect("shop") as conn:  # recovery stopped before the forged segment
            notes = dict(conn.execute("SELECT note, count(*) FROM orders GROUP BY note").fetchall())
        assert notes == {"before": 100}, notes
        assert "does not match its signature" in restored.log_tail(), restored.log_tail()
    finally:
        restored.stop()


# -- through the CLI on each backend: a replaced WAL segment is refused by wal-fetch ----------------


def test_a_replaced_wal_segment_is_refused_by_wal_fetch_and_its_prefetcher(repository: Repo, keys: Keys,
                                                                           tmp_path: Path) -> None:
    state, data_dir = tmp_path / "state", tmp_path / "pgdata"
    (data_dir / "pg_wal" / "archive_status").mkdir(parents=True)
    config = add_signing(write_config(tmp_path / "wal.toml", {
        "daemon": {"state_dir": str(state)},
        "storage.main": repository.table,
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.pg": {"driver": "postgres", "dsn": "postgresql://postgres@127.0.0.1:1/x", "storage": "main",
                    "archive_logs": True, "data_dir": str(data_dir)},
    }), [HOST_A.public.line()], signing_key_file(tmp_path / "host-a.key", HOST_A))
    segments = [f"0000000100000000000000{n:02X}" for n in range(0x20, 0x24)]
    for name in segments:
        path = data_dir / "pg_wal" / name
        path.write_bytes(name.encode() * 512)
        run_backupd("wal-push", "--no-daemon", "--job", "pg", str(path), config=config, check=True)
    wal = LogArchive(repository.storage, "pg", "wal")
    forged = wal.key(f"00000001/{segments[1]}")
    replace_object(repository.storage, keys, forged, b"forged WAL" * 800,
                   wal.stat(f"00000001/{segments[1]}").sha256)

    first = data_dir / "pg_wal" / "RECOVERYXLOG"
    run_backupd("wal-fetch", "--job", "pg", segments[0], str(first), config=config, check=True)
    assert first.read_bytes() == segments[0].encode() * 512  # and the prefetcher reads on past it
    dest = data_dir / "pg_wal" / "RECOVERYXLOG2"
    fetched = run_backupd("wal-fetch", "--job", "pg", segments[1], str(dest), config=config)
    assert fetched.code == 1, fetched.err
    line = next(line for line in error_lines(fetched.err) if line.startswith("backupd: error"))
    assert forged in line and "does not match its signature" in line, fetched.err
    assert not dest.exists()
    spool = state / "spool" / "pg" / "wal-fetch"
    assert not (spool / segments[1]).exists()
    later = data_dir / "pg_wal" / "RECOVERYXLOG3"  # the archive goes on past the forgery
    run_backupd("wal-fetch", "--job", "pg", segments[2], str(later), config=config, check=True)
    assert later.read_bytes() == segments[2].encode() * 512


# -- against real MariaDB servers: a replaced binlog stops the restore before the target is touched --

@pytest.mark.usefixtures("tools")
def test_a_replaced_binlog_is_refused_before_the_target_is_touched(repository: Repo, tmp_path: Path,
                                                                   keys: Keys) -> None:  # noqa: F811
    source, target = started(log_bin=True, server_id=31), started(log_bin=False, server_id=32)
    try:
        source.sql("CREATE DATABASE sig1", "CREATE TABLE sig1.t (id INT PRIMARY KEY)", "INSERT INTO sig1.t VALUES (1)")
        job = make_job(tmp_path, keys, source, ["sig1"], storage=repository.table, archive_logs=True,
                       binlog_flush_interval="1s")
        add_signing(job.config, [HOST_A.public.line()], signing_key_file(tmp_path / "signing.key", HOST_A))
        with RunningArchiver(job) as running:
            backup(job)
            time.sleep(1.1)  # S3 keeps arrival times to the second: the drill's window must not look empty
            source.sql("INSERT INTO sig1.t VALUES (2)")
            name = running.wait_archived(source)
            archive = running.archive
            original = archive.stat(name)
            replace_object(repository.storage, keys, archive.key(name), b"forged binlog" * 100, original.sha256)
        result = run_backupd("restore", "shop", "--to", target.url(), config=job.config)
        assert result.code == 1, result.err
        line = next(line for line in error_lines(result.err) if line.startswith("backupd: error"))
        assert "does not match its signature" in line and archive.key(name) in line, result.err
        assert target.sql("SHOW DATABASES LIKE 'sig1'") == []  # nothing loaded before the binlogs were checked
        drill = run_backupd("verify", "shop", "--pitr-drill", "--json", config=job.config, timeout=300)
        assert drill.code == 3, drill.out + drill.err
        problems = [p for report in json.loads(drill.out)["reports"] for p in report["problems"]]
        assert any(archive.key(name) in p and "does not match its signature" in p for p in problems), problems

        # verify checks every archived log's signature over its key and recorded sha256 (the content only
        # when it is replayed, as above): an unsigned binlog fails it, full and --integrity-only
        repository.storage.delete(archive.key(name) + ".sig")
        for args in ([], ["--integrity-only"]):
            verify = run_backupd("verify", "shop", "--json", *args, config=job.config, timeout=300)
            assert verify.code == 3, (args, verify.out + verify.err)
            problems = [p for report in json.loads(verify.out)["reports"] for p in report["problems"]]
            assert problems == [f"log {archive.key(name)} of job shop is not trusted: {archive.key(name)}.sig: "
                                "missing; the log object is not signed"], (args, problems)
    finally:
        source.destroy()
        target.destroy()


def test_a_verification_checks_only_the_log_signatures_new_since_the_last(fs_storage: FilesystemStorage, keys: Keys,
                                                                          tmp_path: Path) -> None:
    """A nightly verification must not read one signature per archived log: what an earlier one vouched for and
    is unchanged since is skipped; a replaced log, and every log after a change of trusted keys, is checked."""
    from backupd.vouched import Vouched

    names = [f"00000001/0000000100000000000000{n:02X}" for n in range(0x40, 0x46)]
    pushed = {name: push(fs_storage, keys, tmp_path, name, name.encode() * 100) for name in names}
    state = tmp_path / "state"

    def verify_once(trusted: list[SigningKey]) -> tuple[list[str], int]:
        vouched = Vouched(state, fs_storage.location, "db", [k.public for k in trusted])
        try:
            found = list(archive(fs_storage, keys, trusted=[k.public for k in trusted]).untrusted(vouched))
        finally:
            vouched.close()
        return found, vouched.checked

    assert verify_once([HOST_A]) == ([], 6)
    assert verify_once([HOST_A]) == ([], 0)
    push(fs_storage, keys, tmp_path, "00000001/000000010000000000000046", b"new" * 100)
    time.sleep(0.01)
    replace_object(fs_storage, keys, pushed[names[2]], b"forged" * 100)
    found, checked = verify_once([HOST_A])
    assert checked == 2 and [line.split()[1] for line in found] == [pushed[names[2]]], found
    assert verify_once([HOST_A])[1] == 1  # still untrusted: checked every time until it is gone
    fs_storage.delete(pushed[names[4]] + ".sig")  # a vouched-for log's signature removed: checked again
    found, checked = verify_once([HOST_A])
    assert checked == 2 and [line.split()[1] for line in found] == [pushed[names[2]], pushed[names[4]]], found
    assert verify_once([HOST_A, STRANGER])[1] == 7  # other trusted keys: nothing vouched for under them yet
