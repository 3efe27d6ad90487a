"""The one runner for native tools and scratch servers: status reporting, the child registry, cancellation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from backupd import children
from backupd.daemon.runs import Runs
from backupd.errors import DriverError
from backupd.sandbox import SandboxPolicy
from backupd.scratch import ScratchFailed, ScratchServer
from backupd.tool import Tool, find_tool, run
from support import require_tool


def test_exit_status_and_stderr_are_reported_the_same_way() -> None:
    with pytest.raises(DriverError, match=r"^sh exited with status 3: boom$"):
        run(["sh", "-c", "echo boom >&2; exit 3"])
    with pytest.raises(DriverError, match=r"^sh was killed by signal SIGKILL: "):
        run(["sh", "-c", "kill -9 $$"])
    with pytest.raises(DriverError, match="did not finish within 1 s"):
        run(["sleep", "30"], timeout=1)
    assert not children.live()


def test_stderr_summary_prefers_error_lines_and_redacts() -> None:
    with pytest.raises(DriverError) as caught:
        run(["sh", "-c", "echo chatter >&2; echo 'ERROR: postgresql://u:hunter2@h/db refused' >&2; "
                         "echo more chatter >&2; exit 1"])
    assert "hunter2" not in str(caught.value) and "ERROR" in str(caught.value)
    assert "chatter" not in str(caught.value)


def test_a_failed_stream_raises_inside_the_read_loop() -> None:
    with Tool(["sh", "-c", "printf abc; exit 2"]) as tool:
        data = b""
        with pytest.raises(DriverError, match="exited with status 2"):
            while chunk := tool.read(1 << 16):
                data += chunk
        assert data == b"abc" and tool.size == 3


def test_feed_streams_stdin_and_checks_the_exit() -> None:
    import io
    with Tool(["sh", "-c", "wc -c"], stdin=subprocess.PIPE) as tool:
        assert tool.feed(io.BytesIO(b"x" * 300_000)) == 300_000
        assert tool.stdout.read().strip() == b"300000"
        tool.check()


def test_find_tool_names_every_candidate() -> None:
    with pytest.raises(DriverError, match="no-such-a or no-such-b: not found"):
        find_tool(["no-such-a", "no-such-b"])
    assert find_tool(["no-such-a", "sh"]).endswith("/sh")


def test_cancelling_a_run_kills_its_children_and_only_them() -> None:
    runs = Runs()
    outside = Tool(["sleep", "60"])
    started = threading.Event()
    with runs.start("verify:orders", "orders", None) as run_:
        inside = Tool(["sleep", "60"])
        started.set()
        run_.abort("timeout")
        assert inside.proc.wait(5) == -signal.SIGKILL
        late = Tool(["sleep", "60"])  # started after the abort: killed at once
        assert late.proc.wait(5) == -signal.SIGKILL
    assert outside.poll() is None
    assert outside.pid in [pid for pid, _ in children.live()]
    children.kill_all(grace=2)
    assert outside.proc.wait(5) is not None
    for tool in (outside, inside, late):
        tool.close()
    assert not children.live()


def _sandbox(tmp_path: Path):
    require_tool("bwrap")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    os.chmod(tmp_path, 0o711)
    os.chmod(scratch, 0o777)
    return SandboxPolicy(hidden=(tmp_path / "secret",)).for_scratch([scratch], user=None), scratch


def test_sandbox_hides_the_host_and_the_network(tmp_path: Path) -> None:
    box, scratch = _sandbox(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("AGE-SECRET-KEY-1")
    script = (f"cat {secret} 2>&1; ls /root /var/lib /etc/backupd 2>&1; echo env=$AWS_SECRET_ACCESS_KEY; "
              f"cat /proc/1/comm; touch /usr/x 2>&1; echo ok > {scratch}/w; "
              f"{sys.executable} -c 'print(1)' 2>&1 | tail -1")
    out = run(["sh", "-c", script], sandbox=box, env={"AWS_SECRET_ACCESS_KEY": ""})
    assert "AGE-SECRET-KEY" not in out
    assert out.count("No such file or directory") >= 4
    assert "Read-only file system" in out
    assert "env=\n" in out
    assert (scratch / "w").read_text() == "ok\n"


def test_sandbox_has_only_a_private_loopback(tmp_path: Path) -> None:
    import socket
    box, _ = _sandbox(tmp_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        out = run(["/usr/bin/python3", "-c",
                   f"import socket\ntry:\n socket.create_connection(('127.0.0.1', {port}), 2); print('reached')\n"
                   f"except OSError as e: print('refused', e)"], sandbox=box)
    finally:
        listener.close()
    assert out.startswith("refused")


def test_scratch_server_reports_an_early_exit_with_its_log(tmp_path: Path) -> None:
    box, scratch = _sandbox(tmp_path)
    log = scratch / "server.log"
    server = ScratchServer("fake", ["sh", "-c", f"echo 'FATAL: bad config' > {log}; exit 1"], box,
                           ready=lambda: False, log=log)
    with pytest.raises(ScratchFailed, match=r"scratch fake exited with status 1 at start: FATAL: bad config"):
        server.start(timeout=10)
    assert not children.live()


def test_scratch_server_is_stopped_with_its_own_signal(tmp_path: Path) -> None:
    box, scratch = _sandbox(tmp_path)
    marker = scratch / "stopped"
    script = f"trap 'echo INT > {marker}; exit 0' INT; touch {scratch}/up; while :; do sleep 0.05; done"
    server = ScratchServer("fake", ["sh", "-c", script], box, ready=lambda: (scratch / "up").exists(),
                           stop_signal=signal.SIGINT)
    with server:
        assert server.running
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "INT\n"
    assert not children.live()
