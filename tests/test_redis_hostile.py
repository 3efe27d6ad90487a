"""Hostile RDB content: bounded parsing on restore, a sandboxed scratch server on verify.

An attacker who can write the repository (or a corrupted disk) hands backupd an
RDB crafted to hurt the host: an aux field of hundreds of MiB that zstd shrinks
to a few KiB, a database number of 2^32, lengths that lie. Restore and verify
must either read it in bounded memory or refuse it in one clear line; the
scratch redis-server that verification starts runs as an unprivileged user in
bubblewrap, on a unix socket only, with the module and DEBUG commands off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import zstandard

from backupd import age
from backupd.context import JobContext
from backupd.settings import load_settings
from core_fixtures import Keys
import redis_support
from redis_support import RedisServer, start_redis
from support import BACKUPD, REPO_ROOT, error_lines, require_tool, run_backupd, write_config

#: Peak RSS (KiB) a restore may reach: the interpreter, the pipeline and 1 MiB chunks, far below the
#: 400 MiB aux field (836 MiB before the parser was bounded).
RSS_LIMIT_KIB = 200 * 1024

#: Runs argv and prints its peak RSS (KiB) on the last line of stdout: a fresh process whose only child it is.
MEASURE = ("import resource, subprocess, sys\n"
           "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
           "sys.stdout.write(proc.stdout); sys.stderr.write(proc.stderr)\n"
           "print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")


def length(n: int) -> bytes:
    """An RDB length: 6-bit, 14-bit, 32-bit or 64-bit form."""
    if n < 1 << 6:
        return bytes([n])
    if n < 1 << 14:
        return bytes([0x40 | n >> 8, n & 0xFF])
    if n < 1 << 32:
        return b"\x80" + struct.pack(">I", n)
    return b"\x81" + struct.pack(">Q", n)


def rdb_string(data: bytes) -> bytes:
    return length(len(data)) + data


def aux(key: bytes, value: bytes) -> bytes:
    return b"\xfa" + rdb_string(key) + rdb_string(value)


HEADER = b"REDIS0009" + aux(b"redis-ver", b"7.0.15")
END = b"\xff" + b"\0" * 8  # EOF opcode, checksum 0 (= not checked, as with rdbchecksum no)


def small_rdb(*body: bytes) -> bytes:
    return HEADER + b"".join(body) + END


def key_value(key: bytes, value: bytes) -> bytes:
    return b"\x00" + rdb_string(key) + rdb_string(value)


def bomb_chunks(aux_size: int) -> Iterator[bytes]:
    """An RDB whose one aux field is ``aux_size`` bytes of 'A', then one key in db 0."""
    yield HEADER + b"\xfa" + rdb_string(b"bomb") + length(aux_size)
    block = b"A" * (1 << 20)
    left = aux_size
    while left:
        piece = block[:min(left, len(block))]
        left -= len(piece)
        yield piece
    yield b"\xfe\x00" + key_value(b"k", b"v") + END


def plant(repo: Path, job: str, backup_id: str, chunks: Iterator[bytes], recipient: str,
          row_counts: dict[str, int] | None = None) -> int:
    """Replace the backup's rdb object with ``chunks`` (zstd -19, age to ``recipient``); fix the manifest."""
    compressor = zstandard.ZstdCompressor(level=19).compressobj()
    compressed = bytearray()
    raw = 0
    for chunk in chunks:
        raw += len(chunk)
        compressed += compressor.compress(chunk)
    compressed += compressor.flush()
    encryptor = age.Encryptor([age.X25519Recipient.parse(recipient)])
    stored = encryptor.update(bytes(compressed)) + encryptor.finalize()
    directory = repo / job / "backups" / backup_id
    (directory / "rdb.zst.age").write_bytes(stored)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["objects"][0]
    entry.update(raw_size=raw, stored_size=len(stored), sha256=hashlib.sha256(stored).hexdigest())
    manifest["raw_size"], manifest["stored_size"] = raw, len(stored)
    if row_counts is not None:
        manifest["row_counts"] = row_counts
    manifest_path.write_text(json.dumps(manifest))
    (repo / job / "index.json").unlink(missing_ok=True)
    return len(stored)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[RedisServer]:
    server = start_redis(require_tool("redis-server"), tmp_path / "source")
    try:
        server.command("SET", "k", "v")
        yield server
    finally:
        server.stop()


@pytest.fixture
def backed_up(source: RedisServer, keys: Keys, tmp_path: Path) -> tuple[Path, str]:
    password_file = tmp_path / "redis.pass"
    password_file.write_text(source.admin.password or "")
    password_file.chmod(0o600)
    config = write_config(tmp_path / "backupd.toml", {
        "daemon": {"state_dir": str(tmp_path / "state")},
        "storage.main": {"type": "filesystem", "path": str(tmp_path / "repo")},
        "encryption": {"recipients": [keys.recipient], "identity_file": str(keys.identity_file)},
        "jobs.cache": {"driver": "redis", "dsn": f"redis://127.0.0.1:{source.port}/0",
                       "password_file": str(password_file), "storage": "main",
                       "verify": {"checks": ["PING"]}},
    })
    backup_id = run_backupd("backup", "cache", config=config, check=True).out.strip()
    return config, backup_id


def measured_restore(config: Path, target: Path) -> tuple[int, int, str]:
    """(exit status, peak RSS in KiB, stderr) of ``backupd restore`` in a child process."""
    import subprocess

    argv = [sys.executable, "-c", MEASURE, *BACKUPD, "--config", str(config), "--log-format", "json",
            "restore", "cache", "--to", str(target)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    code, rss = proc.stdout.strip().splitlines()[-1].split()
    return int(code), int(rss), proc.stderr


def test_aux_bomb_restores_in_bounded_memory(backed_up: tuple[Path, str], keys: Keys, tmp_path: Path) -> None:
    config, backup_id = backed_up
    aux_size = 400 << 20
    stored = plant(tmp_path / "repo", "cache", backup_id, bomb_chunks(aux_size), keys.recipient, {"db0": 1})
    assert stored < 64 << 10  # a few KiB in the repository

    code, rss, err = measured_restore(config, tmp_path / "out")
    assert code == 0, err
    assert rss < RSS_LIMIT_KIB, f"restore peaked at {rss // 1024} MiB for a {stored}-byte object"
    assert (tmp_path / "out" / "dump.rdb").stat().st_size > aux_size


@pytest.mark.parametrize("body, message", [
    (b"\xfe" + length(1 << 40), "database number 1099511627776 is above the 16383 backupd accepts"),
    (b"\xfe" + length(5) + b"\x00" + length(1 << 62), "RDB truncated after"),
    (b"\xfa" + length(3) + b"key" + b"\xc3" + length(1 << 30) + length(5), "RDB truncated after"),
    (b"\xfe\x00\x0e" + rdb_string(b"list") + length(1 << 60), "RDB truncated after"),
    (b"\xfe\x00\x00" + b"\xc7", "unknown string encoding 7"),
    (b"\xfe\x00\x00" + b"\xbf", "unknown length encoding 0xbf"),
], ids=["huge-db", "lying-key-length", "lying-lzf", "lying-list", "bad-encoding", "bad-length"])
def test_lying_lengths_are_one_line_errors(backed_up: tuple[Path, str], keys: Keys, tmp_path: Path,
                                           body: bytes, message: str) -> None:
    config, backup_id = backed_up
    plant(tmp_path / "repo", "cache", backup_id, iter([HEADER + body]), keys.recipient)
    for command in (["restore", "cache", "--to", str(tmp_path / "out")], ["verify", "cache"]):
        result = run_backupd(*command, config=config)
        lines = error_lines(result.err)
        text = result.out + "\n".join(lines)
        assert message in text, (command, result.code, text)
        assert "Traceback" not in result.err and "internal error" not in result.err
        if command[0] == "restore":
            assert result.code == 1 and len(lines) <= 2, lines
            assert not (tmp_path / "out" / "dump.rdb").exists()
        else:
            assert result.code == 3, text  # the backup is bad: a failed verification, report saved
            assert list((tmp_path / "repo" / "cache" / "verify").glob("*.json"))


def test_database_count_is_capped_not_taken_from_the_file(backed_up: tuple[Path, str], keys: Keys,
                                                          tmp_path: Path) -> None:
    config, backup_id = backed_up
    plant(tmp_path / "repo", "cache", backup_id, iter([small_rdb(b"\xfe" + length(16383), key_value(b"k", b"v"))]),
          keys.recipient, {"db16383": 1})
    result = run_backupd("verify", "cache", "--json", config=config)
    assert result.code == 0, result.out + result.err
    report = json.loads(result.out)["reports"][0]
    assert report["counts_found"] == {"db16383": 1}


def test_rdb_the_server_refuses_is_a_failed_verification(backed_up: tuple[Path, str], keys: Keys,
                                                         tmp_path: Path) -> None:
    """Our parser accepts a module value it can skip; redis-server (no such module) refuses to load it."""
    config, backup_id = backed_up
    module_value = b"\x07" + rdb_string(b"k") + length(0x123456789) + length(0)  # MODULE_2, id, EOF
    plant(tmp_path / "repo", "cache", backup_id, iter([small_rdb(b"\xfe\x00", module_value)]), keys.recipient,
          {"db0": 1})
    result = run_backupd("verify", "cache", config=config)
    assert result.code == 3, result.out + result.err
    assert "redis-server refused the RDB" in result.out
    assert list((tmp_path / "repo" / "cache" / "verify").glob("*.json"))


def test_scratch_server_is_sandboxed(backed_up: tuple[Path, str], keys: Keys, tmp_path: Path) -> None:
    """Not root, no view of the identity file or /root, no TCP listener, DEBUG and MODULE refused."""
    from drivers.redis.driver import DUMP_NAME
    from drivers.redis.resp import RedisReplyError
    from drivers.redis.scratch import scratch_server

    require_tool("bwrap")
    config, _ = backed_up
    ctx = JobContext(load_settings(config), "cache")
    driver = ctx.driver
    scratch = Path(tempfile.mkdtemp(prefix="backupd-verify-test-"))  # where verify puts it: not under tmp_path (0700)
    (scratch / DUMP_NAME).write_bytes(small_rdb(b"\xfe\x00", key_value(b"k", b"v")))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, True)
        endpoint, server = stack.enter_context(scratch_server(driver, scratch, DUMP_NAME, 16))
        pid = server.server_pid(server.tool.pid)
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "redis-server"
        if os.geteuid() == 0:
            assert "0" not in uids, status
        root = Path(f"/proc/{pid}/root")
        assert not (root / str(keys.identity_file).lstrip("/")).exists()
        assert not (root / str(config).lstrip("/")).exists()
        assert not (root / "root").exists() or not any((root / "root").iterdir())
        assert (root / "usr/bin/redis-server").exists()
        listening = [line for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
                     if line.split()[3] == "0A"]
        assert listening == []  # port 0: no TCP socket at all, in a network namespace of its own
        from drivers.redis.resp import Connection
        with Connection(endpoint, timeout=10) as conn:
            assert conn.command("DBSIZE") == 1
            for command in (("DEBUG", "SLEEP", "0"), ("MODULE", "LOAD", "/usr/lib/x.so")):
                with pytest.raises(RedisReplyError):
                    conn.command(*command)
            assert conn.command("CONFIG", "GET", "port") == [b"port", b"0"]
    assert not Path(f"/proc/{pid}").exists()


@pytest.fixture(scope="module")
def real_rdb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real RDB with every type (and an LZF-compressed value) from a real redis-server."""
    return redis_support.real_rdb(tmp_path_factory.mktemp("fuzz-source"))


def test_fuzzed_rdb_is_read_or_refused_in_one_line(real_rdb: bytes) -> None:
    """Cut anywhere, bytes flipped anywhere: a summary or an RdbFormatError with a one-line message, nothing else."""
    import random

    from drivers.redis.rdb import RdbFormatError
    from drivers.redis.transfer import StreamingParser

    rng = random.Random(13)
    cases = [real_rdb[:cut] for cut in sorted(rng.sample(range(len(real_rdb)), 60))]
    for _ in range(300):
        data = bytearray(real_rdb)
        for _ in range(rng.choice((1, 2, 8))):
            data[rng.randrange(9, len(data))] = rng.randrange(256)
        cases.append(bytes(data))
    refused = 0
    for data in cases:
        parser = StreamingParser()  # the way backup, restore and verify run it: in a thread, fed in chunks
        for start in range(0, len(data), 65536):
            parser.feed(data[start:start + 65536])
        try:
            summary = parser.finish(timeout=60)
        except RdbFormatError as exc:
            refused += 1
            message = str(exc)
            assert "\n" not in message and message, repr(message)
            assert not message.startswith(("RuntimeError", "MemoryError", "RecursionError")), message
            continue
        assert max(summary.keys, default=0) <= 16383 and len(summary.aux) <= 64
        assert all(len(value) <= 1024 for value in summary.aux.values())
    assert refused >= 60  # every cut, at least


def test_verify_with_the_sandbox_off_still_runs_unprivileged(backed_up: tuple[Path, str], tmp_path: Path) -> None:
    config, _ = backed_up
    config.write_text(config.read_text().replace('checks = ["PING"]', 'checks = ["PING"], sandbox = "off"'))
    result = run_backupd("verify", "cache", "--json", config=config)
    assert result.code == 0, result.out + result.err
    assert json.loads(result.out)["reports"][0]["counts_found"] == {"db0": 1}


def test_rdb_with_a_type_backupd_does_not_know_is_left_to_redis_server(backed_up: tuple[Path, str], keys: Keys,
                                                                       tmp_path: Path) -> None:
    """An unknown value type (a newer Redis) restores as is; the scratch server decides, and refuses it."""
    config, backup_id = backed_up
    plant(tmp_path / "repo", "cache", backup_id,
          iter([small_rdb(b"\xfe\x00", key_value(b"k", b"v"), b"\xfe" + length(40) + b"\x63" + rdb_string(b"k"))]),
          keys.recipient, {})
    restored = run_backupd("restore", "cache", "--to", str(tmp_path / "out"), config=config)
    assert restored.code == 0, restored.err
    result = run_backupd("verify", "cache", config=config)
    assert result.code == 3, result.out + result.err
    assert "redis-server refused the RDB" in result.out
    assert "more than" not in result.out  # the scratch server had room for every database backupd accepts
