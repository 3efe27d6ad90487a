"""The Redis driver end to end against throwaway redis-server instances, through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from core_fixtures import Keys
from redis_support import PASSWORD, USER, RedisServer, cmdlines, free_port, keyspace, populate, start_redis
from support import error_lines, require_tool, run_backupd, write_config


@pytest.fixture
def redis_bin() -> str:
    return require_tool("redis-server")


@pytest.fixture
def source(redis_bin: str, tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(redis_bin, tmp_path / "source")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def big_value() -> bytes:
    return os.urandom(6 << 20)  # incompressible: LZF cannot shrink it inside the RDB


def job_config(tmp_path: Path, keys: Keys, server: RedisServer, *, password: str = PASSWORD,
               checks: list[str] | None = None, user: str | None = USER, name: str = "backupd.toml") -> Path:
    password_file = tmp_path / f"{name}.redis.pass"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    who = f"{user}@" if user else ""
    return write_config(tmp_path / name, {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.cache": {"driver": "redis", "dsn": f"redis://{who}127.0.0.1:{server.port}/0",
                       "password_file": str(password_file), "storage": "main",
                       "verify": {"checks": checks or ["EXISTS big", "-n 3 GET other-db", "XLEN events"]}},
    })


def test_round_trip_every_type(source: RedisServer, redis_bin: str, big_value: bytes, keys: Keys,
                               tmp_path: Path) -> None:
    counts = populate(source, big_value)  # the TTL is an hour: DEBUG DIGEST covers TTLs
    assert counts["db0"] > 2000 and counts["db3"] == 2
    digest = source.command("DEBUG", "DIGEST")
    config = job_config(tmp_path, keys, source)

    backup_id = run_backupd("backup", "cache", config=config, check=True).out.strip()
    manifest = json.loads(run_backupd("show", backup_id, "--json", config=config, check=True).out)
    assert manifest["method"] == "rdb"
    assert manifest["row_counts"] == counts
    assert manifest["metadata"]["redis_version"] == source.command("INFO", "server").decode().split(
        "redis_version:")[1].split()[0]
    assert manifest["metadata"]["transfer"] == "diskless"
    assert manifest["metadata"]["key_counts"] == "parsed from the RDB stream"
    assert manifest["metadata"]["keys_with_ttl"] == {"db0": 1}
    assert manifest["objects"][0]["name"] == "rdb" and manifest["objects"][0]["raw_size"] > len(big_value)
    assert manifest["tool_versions"]["redis-server"] == manifest["metadata"]["redis_version"]

    target = tmp_path / "restored"
    result = run_backupd("restore", "cache", "--to", str(target), config=config, check=True)
    dump = target / "dump.rdb"
    assert dump.stat().st_size == manifest["objects"][0]["raw_size"]
    assert f"redis-server --dir {target} --dbfilename dump.rdb --appendonly no" in result.out

    copy = start_redis(redis_bin, target, acl_user=False)  # loads dump.rdb from its dir, as the output says
    try:
        assert copy.command("DEBUG", "DIGEST") == digest  # the whole dataset, every type, byte for byte
        assert copy.command("GET", "big") == big_value
        assert copy.command("TYPE", "events") == "stream" and copy.command("XLEN", "events") == 5
        assert copy.command("XPENDING", "events", "workers")[0] == 2
        assert copy.command("ZSCORE", "scores", "max") == b"inf"
        assert copy.command("GET", "other-db", db=3) == b"x"
    finally:
        copy.stop()


def test_verify_loads_into_scratch_server_and_counts(source: RedisServer, big_value: bytes, keys: Keys,
                                                     tmp_path: Path) -> None:
    populated = time.monotonic()
    counts = populate(source, big_value, ttl_ms=3000)
    config = job_config(tmp_path, keys, source)
    backup_id = run_backupd("backup", "cache", config=config, check=True).out.strip()
    assert time.monotonic() - populated < 3, "the backup must hold the short-lived key for this test"
    time.sleep(max(0.0, populated + 3.1 - time.monotonic()))  # expired now: counts must still match the snapshot
    assert source.command("EXISTS", "session") == 0
    result = run_backupd("verify", "cache", "--json", config=config)
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)["reports"][0]
    assert report["backup_id"] == backup_id and report["result"] == "passed"
    assert report["counts_found"] == report["counts_expected"] == counts
    assert {c["check"]: c["ok"] for c in report["checks"]} == {
        "load into redis-server": True, "EXISTS big": True, "-n 3 GET other-db": True, "XLEN events": True}

    failing = job_config(tmp_path, keys, source, checks=["EXISTS no-such-key", "GET 'session'"], name="b.toml")
    bad = run_backupd("verify", "cache", config=failing)
    assert bad.code == 3
    assert "check failed: EXISTS no-such-key (returned 0)" in bad.out
    assert "check failed: GET 'session' (returned nil)" in bad.out  # expired keys read as absent


def test_wrong_password_is_a_clear_error(source: RedisServer, keys: Keys, tmp_path: Path) -> None:
    config = job_config(tmp_path, keys, source, password="not-the-password")
    result = run_backupd("backup", "cache", config=config)
    assert result.code == 1
    lines = error_lines(result.err)
    assert lines[0] == (f"backupd: error: redis://127.0.0.1:{source.port}: authentication as user 'backup' "
                        "failed: WRONGPASS: invalid username-password pair or user is disabled.")
    assert "not-the-password" not in result.err + result.out
    assert json.loads(run_backupd("list", "--json", config=config).out)["backups"] == []

    check = run_backupd("check", "cache", config=config)
    assert check.code == 1
    assert any(line.startswith("FAIL") and "authentication as user 'backup' failed" in line
               for line in check.out.splitlines())


def test_missing_password_names_password_file(source: RedisServer, keys: Keys, tmp_path: Path) -> None:
    config = write_config(tmp_path / "nopw.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient]},
        "jobs.cache": {"driver": "redis", "dsn": f"redis://127.0.0.1:{source.port}", "storage": "main"},
    })
    result = run_backupd("backup", "cache", config=config)
    assert result.code == 1
    assert "the server requires a password and none is configured" in result.err
    assert "hint: set password_file for the job" in result.err


def test_password_never_in_argv_or_logs(source: RedisServer, keys: Keys, tmp_path: Path) -> None:
    populate(source, b"v" * 1000)
    source.command("CONFIG", "SET", "repl-diskless-sync-delay", "2")  # keep the backup running while we look
    config = job_config(tmp_path, keys, source)
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.extend(line for line in cmdlines() if "backupd" in line or "redis" in line)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run_backupd("--log-level", "debug", "backup", "cache", config=config)
    finally:
        stop.set()
        watcher.join()
    assert result.code == 0, result.err
    assert any(" backup cache" in line for line in seen)  # we did watch the backup run
    assert not [line for line in seen if PASSWORD in line]
    assert PASSWORD not in result.err + result.out
    verify = run_backupd("--log-level", "debug", "verify", "cache", config=config)
    assert verify.code == 0 and PASSWORD not in verify.err + verify.out


def test_restore_refuses_overwrite_table_and_shows_plan(source: RedisServer, keys: Keys, tmp_path: Path) -> None:
    populate(source, b"x")
    config = job_config(tmp_path, keys, source)
    backup_id = run_backupd("backup", "cache", config=config, check=True).out.strip()
    target = tmp_path / "live"
    target.mkdir()
    (target / "dump.rdb").write_bytes(b"precious")

    plan = run_backupd("restore", "cache", "--to", str(target), "--dry-run", config=config)
    assert backup_id in plan.out and "refuse to overwrite it without --force" in plan.out
    assert plan.code == 1 and "dump.rdb: file exists; refusing to overwrite it" in plan.err  # as the real run
    assert (target / "dump.rdb").read_bytes() == b"precious"

    refused = run_backupd("restore", "cache", "--to", str(target), config=config)
    assert refused.code == 1 and "dump.rdb: file exists; refusing to overwrite it" in refused.err
    assert (target / "dump.rdb").read_bytes() == b"precious"

    table = run_backupd("restore", "cache", "--to", str(target), "--table", "x", config=config)
    assert table.code == 2 and "--table is not supported" in table.err

    run_backupd("restore", "cache", "--to", str(target), "--force", config=config, check=True)
    assert (target / "dump.rdb").read_bytes()[:5] == b"REDIS"
    assert [p.name for p in target.iterdir()] == ["dump.rdb"]  # no temp file left behind


def test_disk_based_transfer_and_check(source: RedisServer, keys: Keys, tmp_path: Path) -> None:
    counts = populate(source, os.urandom(1 << 20))
    source.command("CONFIG", "SET", "repl-diskless-sync", "no")  # the server writes an RDB, then sends $<len>
    config = job_config(tmp_path, keys, source)
    backup_id = run_backupd("backup", "cache", config=config, check=True).out.strip()
    manifest = json.loads(run_backupd("show", backup_id, "--json", config=config).out)
    assert manifest["metadata"]["transfer"] == "disk" and manifest["row_counts"] == counts
    assert run_backupd("verify", "cache", config=config).code == 0

    check = run_backupd("check", "cache", config=config)
    assert check.code == 0, check.out
    assert any("jobs.cache: redis connection" in line and f"as user {USER}" in line for line in check.out.splitlines())
    assert any("jobs.cache: redis server: Redis 7" in line or "redis server: Redis" in line
               for line in check.out.splitlines())


def test_empty_dataset_backs_up_and_verifies(source: RedisServer, keys: Keys, tmp_path: Path) -> None:
    assert keyspace(source) == {}
    config = job_config(tmp_path, keys, source, checks=["PING"])
    backup_id = run_backupd("backup", "cache", config=config, check=True).out.strip()
    manifest = json.loads(run_backupd("show", backup_id, "--json", config=config).out)
    assert manifest["row_counts"] == {} and manifest["objects"][0]["raw_size"] > 0
    assert run_backupd("verify", "cache", config=config).code == 0


def test_bad_dsn_is_a_config_error(keys: Keys, tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.toml", {
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient]},
        "jobs.cache": {"driver": "redis", "dsn": "http://u:hunter2@127.0.0.1:6379", "storage": "main"},
    })
    result = run_backupd("backup", "cache", config=config)
    assert result.code == 2
    assert "jobs.cache.dsn: expected a redis://, rediss:// or unix:// URL" in result.err
    assert "hunter2" not in result.err


def test_tls_backup_and_untrusted_certificate(redis_bin: str, keys: Keys, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    certs = tmp_path / "certs"
    certs.mkdir()
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(certs / "key.pem"),
                    "-out", str(certs / "cert.pem")], check=True, capture_output=True)
    tls_port = free_port()
    server = start_redis(redis_bin, tmp_path / "tls", extra=[
        f"tls-port {tls_port}", f"tls-cert-file {certs / 'cert.pem'}", f"tls-key-file {certs / 'key.pem'}",
        f"tls-ca-cert-file {certs / 'cert.pem'}", "tls-auth-clients no"])
    try:
        counts = populate(server, b"secret-bytes")
        base = job_config(tmp_path, keys, server)
        text = base.read_text().replace(f"redis://{USER}@127.0.0.1:{server.port}/0",
                                        f"rediss://{USER}@127.0.0.1:{tls_port}/0")
        untrusted = tmp_path / "untrusted.toml"
        untrusted.write_text(text)
        result = run_backupd("backup", "cache", config=untrusted)
        assert result.code == 1 and "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in result.err

        trusted = tmp_path / "trusted.toml"
        trusted.write_text(text.replace('storage = "main"', f'storage = "main"\ntls_ca_file = "{certs / "cert.pem"}"'))
        backup_id = run_backupd("backup", "cache", config=trusted, check=True).out.strip()
        manifest = json.loads(run_backupd("show", backup_id, "--json", config=trusted).out)
        assert manifest["row_counts"] == counts
        assert manifest["metadata"]["server"] == f"rediss://127.0.0.1:{tls_port}"
    finally:
        server.stop()
