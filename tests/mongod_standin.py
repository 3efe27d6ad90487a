"""A test-only ``mongod`` over SecantusDB, a MongoDB-compatible server in Python (PyPI ``secantusdb``).

No real mongod can be installed on the machines these tests run on (see
ENVIRONMENT.md). This program takes mongod's own arguments (``--dbpath --port
--bind_ip --logpath --replSet --unixSocketPrefix``; ``--wiredTigerCacheSizeGB`` is
ignored) and serves SecantusDB on them, adding exactly three things SecantusDB 0.7.0b3 lacks:

1. ``applyOps`` (what ``mongorestore --oplogReplay`` sends): each ``i``/``u``/``d``
   entry is applied through SecantusDB's own insert/update/delete commands, an
   insert as an upsert by ``_id`` and a ``u`` entry's ``{$v: 2, diff}`` through
   SecantusDB's own diff applier, as mongod applies oplog entries idempotently;
   a ``c`` entry runs its ``o`` as a command on its database; ``n`` is skipped.
2. A race-free tailable cursor on ``local.oplog.rs``: SecantusDB reads its resume
   position after the initial query, losing entries written in between; here the
   first batch and the resume position come from one scan of the oplog.
3. mongod's unix socket, ``<unixSocketPrefix>/mongodb-<port>.sock`` (the scratch
   mongod of ``verify`` is reached only through it inside the sandbox).

``--oplogMaxEntries N`` (stand-in only) caps the oplog so tests can roll it
over. ``--replSet NAME`` makes it a one-node replica set named NAME (with an oplog);
without it, a standalone. It proves how backupd drives the real mongodump,
mongorestore and pymongo, not mongod's own behaviour.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

import bson
from secantus import commands
from secantus.diff import apply_update_description
from secantus.server import SecantusDBServer


def _ns(ns: str) -> tuple[str, str]:
    db, _, coll = ns.partition(".")
    return db, coll


def _apply_one(entry: Mapping[str, Any], ctx: commands.CommandContext) -> dict[str, Any]:
    op = entry.get("op")
    db, coll = _ns(str(entry.get("ns", "")))
    on = dataclasses.replace(ctx, db_name=db)
    if op == "n":
        return {"ok": 1.0}
    if op == "c":
        return commands.dispatch(dict(entry["o"]), on)
    if op == "i":
        doc = dict(entry["o"])
        return commands.dispatch({"update": coll, "updates": [{"q": {"_id": doc["_id"]}, "u": doc, "upsert": True}],
                                  "$db": db}, on)
    if op == "u":
        query = dict(entry["o2"])
        change = dict(entry["o"])
        if change.get("$v") == 2 and "diff" in change:
            found = ctx.storage.find_matching(db, coll, query)
            if not found:
                return {"ok": 1.0}
            change = apply_update_description(found[0], change["diff"])
        return commands.dispatch({"update": coll, "updates": [{"q": query, "u": change}], "$db": db}, on)
    if op == "d":
        return commands.dispatch({"delete": coll, "deletes": [{"q": dict(entry["o"]), "limit": 1}], "$db": db}, on)
    return {"ok": 0.0, "errmsg": f"applyOps: unknown op {op!r}", "code": 2, "codeName": "BadValue"}


def _apply_ops(doc: dict[str, Any], ctx: commands.CommandContext) -> dict[str, Any]:
    results = []
    for entry in doc.get("applyOps") or []:
        reply = _apply_one(entry, ctx)
        if not reply.get("ok") or reply.get("writeErrors"):
            errors = reply.get("writeErrors") or [reply]
            return {"ok": 0.0, "errmsg": f"applyOps: {errors[0].get('errmsg')}", "code": errors[0].get("code", 8),
                    "applied": len(results), "results": results + [False]}
        results.append(True)
    return {"ok": 1.0, "applied": len(results), "results": results}


def _find_tailable_oplog(filter_: dict[str, Any], initial_docs: list[dict[str, Any]], batch_size: int, ns: str,
                         await_data: bool, ctx: commands.CommandContext) -> dict[str, Any]:
    """The first batch and the resume position from the same scan: no entry falls between them."""
    storage = ctx.storage
    state = {"after_seq": -1}

    def producer() -> list[dict[str, Any]]:
        rows = storage.read_oplog(start_seq=state["after_seq"] + 1, limit=1000)
        if not rows:
            return []
        state["after_seq"] = rows[-1][0]
        entries = [entry for _seq, entry in rows]
        return [e for e in entries if commands.matches(e, filter_)] if filter_ else entries

    first: list[dict[str, Any]] = []
    while len(first) < batch_size and (more := producer()):
        first += more
    cursor_id = ctx.cursors.register_tailable(ns, producer, await_data=await_data,
                                              initial_remaining=first[batch_size:])
    return {"cursor": {"firstBatch": first[:batch_size], "id": bson.Int64(cursor_id), "ns": ns}, "ok": 1.0}


def install() -> None:
    commands._HANDLERS["applyOps"] = _apply_ops
    commands._find_tailable_oplog = _find_tailable_oplog


def serve_unix(server: SecantusDBServer, path: str) -> None:
    """mongod's unix socket: the same connection handler as TCP."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    os.chmod(path, 0o777)
    listener.listen(64)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            with server._active_conns_lock:
                server._active_conns += 1
            threading.Thread(target=server._handle_client, args=(conn, ("unix", 0)), daemon=True).start()

    threading.Thread(target=accept, name="standin-unix-accept", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mongod (SecantusDB stand-in)")
    parser.add_argument("--dbpath", required=True)
    parser.add_argument("--port", type=int, default=27017)
    parser.add_argument("--bind_ip", default="127.0.0.1")
    parser.add_argument("--logpath")
    parser.add_argument("--replSet")
    parser.add_argument("--unixSocketPrefix", default="/tmp")
    parser.add_argument("--wiredTigerCacheSizeGB", type=float, help="accepted as mongod does; SecantusDB ignores it")
    parser.add_argument("--oplogMaxEntries", type=int, default=100_000,
                        help="stand-in only: SecantusDB's oplog cap, so tests can roll the oplog over")
    parser.add_argument("--version", action="store_true")
    args = parser.parse_args(argv)
    if args.version:
        print("db version v7.0.0 (SecantusDB stand-in, tests/mongod_standin.py)")
        return 0
    logging.basicConfig(filename=args.logpath, level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install()
    server = SecantusDBServer(host=args.bind_ip.split(",")[0], port=args.port, storage_path=args.dbpath,
                              replica_set_name=args.replSet, enable_test_commands=False,
                              oplog_max_entries=args.oplogMaxEntries)
    server.start()
    serve_unix(server, os.path.join(args.unixSocketPrefix, f"mongodb-{server.port}.sock"))
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
