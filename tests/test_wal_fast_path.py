"""The per-WAL-file fast paths: argv and configuration read without argparse or tomllib, the spool
protocol between wal-fetch and its background prefetcher, and how little a call imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backupd import age, control, paths, spool
from backupd.cli import quick
from backupd.logarchive import LogArchive
from drivers.postgres.walfetch import Prefetcher
from drivers.postgres.walnames import archive_name
from storage.filesystem import FilesystemStorage

REPO = Path(__file__).resolve().parents[1]
SEG = 16 * 1024 * 1024


# -- reading the command line and the configuration ------------------------------------------

def test_constants_match_the_full_path() -> None:
    assert quick.DEFAULT_CONFIG == str(paths.DEFAULT_CONFIG)
    assert quick.DEFAULT_STATE_DIR == str(paths.DEFAULT_STATE_DIR)
    assert quick.SOCKET_NAME == control.SOCKET_NAME and quick.OK_REPLY == control.OK_REPLY
    assert str(paths.wal_fetch_spool(Path("/s"), "j")) == spool.directory("/s", "j") == "/s/spool/j/wal-fetch"


@pytest.mark.parametrize("argv, expected", [
    (["--config", "/c", "wal-push", "pg_wal/X"], ("wal-push", "/c", ["pg_wal/X"], None)),
    (["--config=/c", "--log-level", "debug", "wal-fetch", "--job", "j", "A", "B"], ("wal-fetch", "/c", ["A", "B"], "j")),
    (["wal-fetch", "A", "B", "--job=j"], ("wal-fetch", None, ["A", "B"], "j")),
    (["wal-push", "X", "--no-daemon"], None),
    (["wal-fetch", "--job", "j", "--prefetch-from", "A"], None),
    (["wal-push", "--help"], None),
    (["wal-push"], None),
    (["wal-fetch", "A"], None),
    (["--verbose", "wal-push", "X"], None),
    (["backup", "orders"], None),
])
def test_parse(argv: list[str], expected: tuple | None) -> None:
    call = quick.parse(argv)
    assert (None if call is None else (call.command, call.config, call.args, call.job)) == expected


@pytest.mark.parametrize("text, expected", [
    ('[daemon]\nstate_dir = "/srv/state"\n', "/srv/state"),
    ("[daemon]\nstate_dir = '/srv/state'  # comment\n", "/srv/state"),
    ('daemon.state_dir = "/srv/state"\n', "/srv/state"),
    ('[ daemon ]\nmetrics_listen = "127.0.0.1:1"\nstate_dir="/a"\n[jobs.x]\nstate_dir = "/not-this"\n', "/a"),
    ('[storage.main]\ntype = "filesystem"\npath = "/r"\n', quick.DEFAULT_STATE_DIR),
    ('[encryption]\nrecipients = [\n  "age1x",  # [daemon]\n  "age1y",\n]\n[daemon]\nstate_dir = "/s"\n', "/s"),
    ('[jobs.x]\nchecks = ["SELECT a[1] = 2 FROM t", \'#\']\n[daemon]\nstate_dir = "/s"\n', "/s"),
    ('[jobs.x]\nnested = [\n  [1, 2],\n  [3],\n]\n[daemon]\nstate_dir = "/s"\n', "/s"),
    ('[daemon]\nstate_dir = "/s\\\\x"\n', None),  # an escape: leave it to tomllib
    ('[daemon]\nstate_dir = """/s"""\n', None),
    ('daemon = { state_dir = "/s" }\n', None),
    ('["daemon"]\nstate_dir = "/s"\n', None),
    ('[daemon]\n"state_dir" = "/s"\n', None),
    ("[[daemon]]\nstate_dir = '/s'\n", None),
    ('[daemon]\nstate_dir = "/s" junk\n', None),
    ('[daemon]\nstate_dir = "/s\n', None),
])
def test_scan_state_dir(text: str, expected: str | None) -> None:
    assert quick.scan_state_dir(text) == expected


KEY = st.sampled_from(["state_dir", "timezone", "path", "daemon", "x-y", "checks"])
SCALAR = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12).map(json.dumps),
    st.text(st.sampled_from("ab/#[]{}=.\" "), max_size=8).map(lambda t: "'" + t.replace("'", "") + "'"),
    st.integers(-5, 5).map(str),
    st.just("true"),
)
VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3).map(
    lambda items: "[\n  " + ",\n  ".join(items) + "\n]" if len(items) > 1 else "[" + ", ".join(items) + "]"),
    max_leaves=6)
LINE = st.one_of(
    st.tuples(st.sampled_from(["", "daemon.", "jobs.x."]), KEY, VALUE).map(lambda t: f"{t[0]}{t[1]} = {t[2]}"),
    st.sampled_from(["daemon", "jobs.x", " daemon ", "daemon.sub", "storage.main"]).map(lambda t: f"[{t}]"),
    st.just("# a comment [daemon]"),
    st.just(""),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(LINE, max_size=10))
def test_scan_agrees_with_tomllib_whenever_it_answers(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return  # the daemon would refuse this file too
    found = quick.scan_state_dir(text)
    if found is None:
        return
    daemon = parsed.get("daemon", {})
    expected = daemon.get("state_dir", quick.DEFAULT_STATE_DIR) if isinstance(daemon, dict) else None
    assert found == expected


def test_state_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[daemon]\nstate_dir = "/from-file"\n')
    assert quick.state_dir(str(config)) == "/from-file"
    monkeypatch.setenv("backupd_daemon__state_dir", "/from-env")
    assert quick.state_dir(str(config)) == "/from-env"
    monkeypatch.delenv("backupd_daemon__state_dir")
    monkeypatch.setenv("BACKUPD_DAEMON", '{"state_dir": "/json"}')
    assert quick.state_dir(str(config)) is None
    assert quick.state_dir(str(tmp_path / "missing.toml")) is None


def test_a_fast_call_imports_almost_nothing(tmp_path: Path) -> None:
    """Start-up is the cost of every WAL file: no argparse, json, tomllib, pathlib, typing or plugins."""
    directory = Path(spool.directory(str(tmp_path / "state"), "j"))
    directory.mkdir(parents=True)
    (directory / "000000010000000000000005").write_bytes(b"wal")
    for later in range(6, 6 + quick.LOW_WATER):  # enough ahead: no prefetcher is started
        (directory / f"0000000100000000000000{later:02X}").write_bytes(b"wal")
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    probe = ("import sys; from backupd.cli.main import main; code = main(sys.argv[1:]); "
             "heavy = sorted({'argparse', 'json', 'tomllib', 'pathlib', 'typing', 'subprocess', 'pydantic', "
             "'structlog'} & set(sys.modules)); print(code, heavy)")
    out = subprocess.run([sys.executable, "-c", probe, "--config", str(config), "wal-fetch", "--job", "j",
                          "000000010000000000000005", str(tmp_path / "got")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0 []", out.stdout + out.stderr
    assert (tmp_path / "got").read_bytes() == b"wal"


# -- the spool ----------------------------------------------------------------------------------

def test_deliver_moves_or_keeps(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / "A").write_bytes(b"one")
    assert spool.deliver(str(directory), "A", str(tmp_path / "dest")) is True
    assert (tmp_path / "dest").read_bytes() == b"one" and not (directory / "A").exists()
    assert spool.deliver(str(directory), "A", str(tmp_path / "dest2")) is False and not (tmp_path / "dest2").exists()
    (directory / "B").write_bytes(b"last")
    (directory / (spool.KEEP + "B")).touch()
    for attempt in range(2):  # the newest archived segment is asked for again at the end of recovery
        assert spool.deliver(str(directory), "B", str(tmp_path / f"b{attempt}")) is True
        assert (tmp_path / f"b{attempt}").read_bytes() == b"last"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]


def test_absent_markers_expire(tmp_path: Path) -> None:
    marker = tmp_path / (spool.ABSENT + "00000002.history")
    marker.touch()
    assert spool.absent(str(tmp_path), "00000002.history")
    old = time.time() - spool.ABSENT_TTL - 1
    os.utime(marker, (old, old))
    assert not spool.absent(str(tmp_path), "00000002.history")


@pytest.fixture
def archive(tmp_path: Path) -> tuple[LogArchive, age.X25519Identity, dict[str, bytes]]:
    identity = age.X25519Identity.generate()
    archive = LogArchive(FilesystemStorage(tmp_path / "repo"), "j", "wal", [identity.to_recipient()], level=1)
    contents = {}
    source = tmp_path / "src"
    source.mkdir()
    for segno in range(0x10, 0x16):
        name = f"0000000100000000000000{segno:02X}"
        contents[name] = os.urandom(1024) * 16
        (source / name).write_bytes(contents[name])
        archive.push_file(archive_name(name), source / name)
    return archive, identity, contents


def run_prefetcher(prefetcher: Prefetcher, first: str) -> threading.Thread:
    thread = threading.Thread(target=prefetcher.run, args=(first,), daemon=True)
    thread.start()
    return thread


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_prefetcher_runs_ahead_finds_the_end_and_cleans_up(tmp_path: Path, archive) -> None:  # type: ignore[no-untyped-def]
    wal, identity, contents = archive
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / spool.LOCK).touch()
    names = sorted(contents)
    prefetcher = Prefetcher(wal, [identity], None, directory, depth=3, idle=1.5, idle_before_first=30)
    thread = run_prefetcher(prefetcher, names[0])
    wait_for(lambda: all((directory / n).exists() for n in names[:3]), "the first segments were not spooled")
    assert not (directory / names[3]).exists(), "more than depth segments ahead"
    for name in names[:-1]:  # replay consumes them one by one
        wait_for(lambda: (directory / name).exists(), f"{name} was not spooled")
        assert spool.deliver(str(directory), name, str(tmp_path / "got"))
        assert (tmp_path / "got").read_bytes() == contents[name]
        spool.touch(str(directory))
    end = "000000010000000000000016"
    wait_for(lambda: spool.absent(str(directory), end), "no absent marker at the end of the archive")
    assert (directory / (spool.KEEP + names[-1])).exists()
    for attempt in range(2):  # PostgreSQL reads the newest segment again once it finds no next one
        assert spool.deliver(str(directory), names[-1], str(tmp_path / "got"))
        assert (tmp_path / "got").read_bytes() == contents[names[-1]]
    assert spool.absent(str(directory), "00000002.history"), "the next timeline's history is looked up"
    thread.join(10)
    assert not thread.is_alive(), "the prefetcher did not leave when replay stopped asking"
    assert sorted(p.name for p in directory.iterdir()) == [spool.LOCK], "markers or segments left behind"


def test_prefetcher_answers_requests_and_moves_its_window(tmp_path: Path, archive) -> None:  # type: ignore[no-untyped-def]
    wal, identity, contents = archive
    directory = tmp_path / "spool"
    directory.mkdir()
    names = sorted(contents)
    prefetcher = Prefetcher(wal, [identity], None, directory, depth=2, idle=1.0, idle_before_first=30)
    thread = run_prefetcher(prefetcher, names[0])
    wait_for(lambda: (directory / names[1]).exists(), "not spooled")
    # Replay jumps ahead (another backup, another timeline): the window follows the request.
    assert spool.ask(str(directory), names[4], str(tmp_path / "far"), timeout=10) is True
    assert (tmp_path / "far").read_bytes() == contents[names[4]]
    wait_for(lambda: (directory / names[5]).exists(), "the window did not move after the request")
    assert not (directory / names[0]).exists() and not (directory / names[1]).exists()
    assert spool.ask(str(directory), "00000005.history", str(tmp_path / "h"), timeout=10) is False
    thread.join(10)
    assert not thread.is_alive()


# -- wal-push: the hand-over to the daemon, and what the daemon does with repeats ------------------

def test_wal_push_hands_over_and_reports_a_refusal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "c.toml"
    recipient = age.X25519Identity.generate().to_recipient()
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n[storage.main]\ntype = "filesystem"\npath = "{tmp_path}/repo"\n'
                      f'[encryption]\nrecipients = ["{recipient}"]\n[jobs.j]\ndriver = "postgres"\n'
                      f'dsn = "postgresql://postgres@127.0.0.1:1/x"\nstorage = "main"\narchive_logs = true\n'
                      f'data_dir = "{tmp_path}"\n')
    segment = tmp_path / "pg_wal" / "000000010000000000000007"
    segment.parent.mkdir()
    segment.write_bytes(b"wal")
    seen: list[dict] = []
    answer = {"ok": True, "name": "00000001/000000010000000000000007", "status": "stored"}
    server = control.ControlServer(control.socket_path(state), {"wal-push": lambda m: seen.append(m) or answer})
    server.start()
    try:
        ok = subprocess.run([str(REPO / ".venv" / "bin" / "backupd"), "--config", str(config), "wal-push",
                             "pg_wal/000000010000000000000007"], cwd=tmp_path, capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
        assert seen == [{"op": "wal-push", "path": str(segment)}]
        answer.clear()
        answer.update({"ok": False, "error": "already archived with different content"})
        refused = subprocess.run([str(REPO / ".venv" / "bin" / "backupd"), "--config", str(config), "wal-push",
                                  str(segment)], capture_output=True, text=True)
    finally:
        server.stop()
    assert refused.returncode == 1  # the full command asked again and reported the daemon's answer
    assert "already archived with different content" in refused.stderr
    assert not (tmp_path / "repo" / "j").exists(), "a refused push must not be uploaded by the client instead"


def test_pusher_does_not_read_an_unchanged_file_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from backupd.logarchive import LogConflict
    from drivers.postgres import walarchive

    identity = age.X25519Identity.generate()
    pusher = walarchive.WalPusher(LogArchive(FilesystemStorage(tmp_path / "repo"), "j", "wal",
                                             [identity.to_recipient()], level=1), "j", tmp_path)
    segment = tmp_path / "000000010000000000000009"
    segment.write_bytes(os.urandom(4096))
    assert pusher.push(segment).status == "stored"
    real_digest = walarchive.file_digest

    def no_reading(path: Path) -> tuple[int, str]:
        raise AssertionError("an unchanged, already pushed file was read again")

    monkeypatch.setattr(walarchive, "file_digest", no_reading)
    assert pusher.push(segment).status == "identical"  # archive_command after the push-ahead: free
    monkeypatch.setattr(walarchive, "file_digest", real_digest)
    segment.write_bytes(os.urandom(4096))  # same name, other bytes: read, compared, refused
    with pytest.raises(LogConflict):
        pusher.push(segment)


def test_wal_fetch_answers_from_the_spool_without_reading_the_configuration(tmp_path: Path) -> None:
    """A fresh absent marker ends recovery at once; a stale one is not trusted and the full command runs."""
    state = tmp_path / "state"
    directory = Path(spool.directory(str(state), "j"))
    directory.mkdir(parents=True)
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\nno_such_key = 1\n')  # the full command refuses this
    marker = directory / (spool.ABSENT + "00000002.history")
    marker.touch()
    argv = [str(REPO / ".venv" / "bin" / "backupd"), "--config", str(config), "wal-fetch", "--job", "j",
            "00000002.history", "pg_wal/RECOVERYHISTORY"]
    (tmp_path / "pg_wal").mkdir()
    fresh = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert fresh.returncode == 1 and "00000002.history: not in the archive of job j" in fresh.stderr
    old = time.time() - spool.ABSENT_TTL - 1
    os.utime(marker, (old, old))
    stale = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert stale.returncode == 2 and "no_such_key" in stale.stderr, "a stale marker must send it to the full command"
    (directory / "000000010000000000000003").write_bytes(b"segment")
    hit = subprocess.run([*argv[:6], "000000010000000000000003", "pg_wal/RECOVERYXLOG"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert hit.returncode == 0 and (tmp_path / "pg_wal" / "RECOVERYXLOG").read_bytes() == b"segment"


@pytest.mark.parametrize("breakage", ['[jobs.j\n', 'schedule = "0 2 * *\n', 'what is this\n'])
def test_a_broken_file_does_not_stop_archiving_while_the_daemon_runs(tmp_path: Path, breakage: str) -> None:
    state = tmp_path / "state"
    config = tmp_path / "c.toml"
    config.write_text(f'[daemon]\nstate_dir = "{state}"\n[jobs.j]\ndriver = "postgres"\n{breakage}')
    segment = tmp_path / "000000010000000000000009"
    segment.write_bytes(b"wal")
    push = [str(REPO / ".venv" / "bin" / "backupd"), "--config", str(config), "wal-push", str(segment)]
    seen: list[dict] = []
    answer = {"ok": True, "name": "00000001/000000010000000000000009", "status": "stored"}
    server = control.ControlServer(control.socket_path(state), {"wal-push": lambda m: seen.append(m) or answer})
    server.start()
    try:
        handed = subprocess.run(push, capture_output=True, text=True)
    finally:
        server.stop()
    assert handed.returncode == 0, handed.stderr
    assert seen == [{"op": "wal-push", "path": str(segment)}]
    alone = subprocess.run(push, capture_output=True, text=True)  # no daemon: the broken file is reported
    assert alone.returncode == 2 and "c.toml" in alone.stderr


# -- one parser, one request: what the full command gets from the fast path ------------------------

def _answering_socket(path: Path, reply: bytes) -> tuple[list[bytes], threading.Thread]:
    """A stand-in daemon at ``path`` answering every request with ``reply``; the requests it got."""
    import socket

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)
    server.settimeout(0.2)
    got: list[bytes] = []

    def serve() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not getattr(thread, "stop", False):
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                got.append(conn.makefile("rb").readline())
                conn.sendall(reply)
        server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return got, thread


def test_a_refused_push_asks_the_daemon_once_and_reports_its_answer(tmp_path: Path) -> None:
    import tempfile

    state = Path(tempfile.mkdtemp(prefix="backupd-q-", dir="/tmp"))  # a unix socket path must stay short
    try:
        got, thread = _answering_socket(state / quick.SOCKET_NAME,
                                        b'{"ok": false, "error": "wal-push refused: not this cluster"}\n')
        config = tmp_path / "c.toml"
        config.write_text(f'[daemon]\nstate_dir = "{state}"\n[storage.main]\ntype = "filesystem"\npath = "{tmp_path}"\n')
        segment = tmp_path / "000000010000000000000001"
        segment.write_bytes(b"wal")
        out = subprocess.run([sys.executable, "-m", "backupd", "--config", str(config), "wal-push", str(segment)],
                             capture_output=True, text=True, timeout=60)
        thread.stop = True  # type: ignore[attr-defined]
        thread.join()
    finally:
        import shutil

        shutil.rmtree(state, ignore_errors=True)
    assert out.returncode == 1, out.stderr
    assert "backupd: error: wal-push 000000010000000000000001: wal-push refused: not this cluster" in out.stderr
    assert len(got) == 1, got


@pytest.mark.parametrize("argv, code, says", [
    (["wal-push"], 2, "backupd wal-push: error: the following arguments are required: path"),
    (["wal-push", "X", "--bogus"], 2, "backupd wal-push: error: unrecognized arguments: --bogus"),
    (["wal-push", "X", "Y"], 2, "backupd wal-push: error: unrecognized arguments: Y"),
    (["wal-fetch", "--job"], 2, "backupd wal-fetch: error: argument --job: expected one argument"),
    (["--log-level", "loud", "wal-push", "X"], 2, "argument --log-level: invalid choice: 'loud'"),
    (["wal-fetch", "A"], 2, "wal-fetch: NAME and DEST are required"),
])
def test_usage_errors_are_reported_like_every_command(tmp_path: Path, argv: list[str], code: int, says: str) -> None:
    out = subprocess.run([sys.executable, "-m", "backupd", "--config", str(tmp_path / "none.toml"), *argv],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == code, out.stderr
    assert says in out.stderr


def test_help_is_the_quick_parsers_own() -> None:
    out = subprocess.run([sys.executable, "-m", "backupd", "wal-push", "--help"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.startswith("usage: backupd wal-push") and "--no-daemon" in out.stdout
    listing = subprocess.run([sys.executable, "-m", "backupd", "--help"], capture_output=True, text=True, check=True)
    assert "archive one WAL file (PostgreSQL archive_command: wal-push %p)" in " ".join(listing.stdout.split()) \
        .replace("wal- push", "wal-push")
