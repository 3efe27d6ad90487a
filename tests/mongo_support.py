"""Fake mongodump/mongorestore executables, synthetic archives and a fake server for the MongoDB driver tests.

No MongoDB server or tools can be installed on the machines these tests were
written on: the fakes record exactly what backupd hands the tools (argv, the
--config file and its mode, stdin) and play back archives built with pymongo's
``bson`` in the mongodump archive layout.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
from pathlib import Path
from typing import Iterator

import bson
from bson import Timestamp
from bson.raw_bson import RawBSONDocument

MAGIC = 0x8199E26D
TERM = struct.pack("<i", -1)

FAKE_TOOL = r'''#!{python}
import json, os, shutil, stat, sys, time
name = os.path.basename(sys.argv[0])
log = os.environ["FAKE_MONGO_LOG"]
if sys.argv[1:] == ["--version"]:
    print(name + " version: 100.9.4")
    sys.exit(0)
record = {"tool": name, "argv": sys.argv}
for arg in sys.argv[1:]:
    if arg.startswith("--config="):
        path = arg.split("=", 1)[1]
        record["config_mode"] = oct(stat.S_IMODE(os.stat(path).st_mode))
        record["config"] = open(path).read()
mode = os.environ.get("FAKE_" + name.upper() + "_MODE", "ok")
if name == "mongodump":
    if mode == "fail":
        sys.stdout.buffer.write(open(os.environ["FAKE_ARCHIVE"], "rb").read()[:100])
        sys.stdout.flush()
        sys.stderr.write("Failed: error connecting to db server: mongodb://backup:leaked-pw@db1:27017 refused\n")
        sys.exit(2)
    if mode == "ok" or mode == "truncated":
        data = open(os.environ["FAKE_ARCHIVE"], "rb").read()
        if mode == "truncated":
            data = data[:-30]
        for i in range(0, len(data), 7000):
            sys.stdout.buffer.write(data[i:i + 7000])
        sys.stdout.flush()
    # mode "empty": nothing at all, status 0
else:
    n = len([l for l in open(log)]) if os.path.exists(log) else 0
    if "--archive" in sys.argv:
        record["stdin_bytes"] = len(sys.stdin.buffer.read())
    for arg in sys.argv[1:]:
        if arg.startswith("--dir="):
            src = os.path.join(arg.split("=", 1)[1], "oplog.bson")
            record["oplog_copy"] = os.environ["FAKE_MONGO_LOG"] + ".oplog-%d.bson" % n
            shutil.copy(src, record["oplog_copy"])
    if mode == "fail":
        sys.stderr.write("Failed: restore error: E11000 duplicate key\n")
        with open(log, "a") as out:
            out.write(json.dumps(record) + "\n")
        sys.exit(1)
with open(log, "a") as out:
    out.write(json.dumps(record) + "\n")
'''


def install_fakes(bin_dir: Path) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("mongodump", "mongorestore"):
        path = bin_dir / name
        path.write_text(FAKE_TOOL.replace("{python}", sys.executable))
        path.chmod(0o755)


def tool_calls(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def oplog_entry(ts: Timestamp, ns: str = "shop.orders", op: str = "i", n: int = 0) -> dict:
    return {"ts": ts, "t": 1, "h": 0, "v": 2, "op": op, "ns": ns, "o": {"_id": n, "n": n}}


def build_archive(collections: dict[str, list[dict]], oplog: list[dict]) -> bytes:
    """A mongodump archive: magic, header, prelude, then per namespace: header, documents, terminator."""
    out = bytearray(struct.pack("<I", MAGIC))
    out += bson.encode({"concurrent_collections": 4, "version": "0.1", "server_version": "7.0.5",
                        "tool_version": "100.9.4"})
    for ns in collections:
        db, coll = ns.split(".", 1)
        out += bson.encode({"db": db, "collection": coll, "metadata": "{}", "size": 0, "type": "collection"})
    if oplog:  # mongodump --oplog announces the oplog in the prelude too (db "", collection "oplog")
        out += bson.encode({"db": "", "collection": "oplog", "metadata": "", "size": 0, "type": ""})
    out += TERM
    blocks = [(ns.split(".", 1)[0], ns.split(".", 1)[1], docs) for ns, docs in collections.items()]
    if oplog:
        blocks.append(("", "oplog", oplog))
    for db, coll, docs in blocks:
        for start in range(0, max(len(docs), 1), 50):  # several blocks per namespace, as the multiplexer writes
            out += bson.encode({"db": db, "collection": coll, "EOF": False, "CRC": 0})
            out += b"".join(bson.encode(doc) for doc in docs[start:start + 50])
            out += TERM
        out += bson.encode({"db": db, "collection": coll, "EOF": True, "CRC": 0}) + TERM
    return bytes(out)


def raw(entry: dict) -> RawBSONDocument:
    return RawBSONDocument(bson.encode(entry))


class FakeOplog:
    """An OplogSource over a list of entries: tail() yields them, then None while idle."""

    def __init__(self, entries: list[dict], idle_rounds: int = 3) -> None:
        self.entries = entries
        self.idle_rounds = idle_rounds

    def oldest(self) -> Timestamp | None:
        return self.entries[0]["ts"] if self.entries else None

    def tail(self, since: Timestamp, stop: threading.Event) -> Iterator[RawBSONDocument | None]:
        for entry in self.entries:
            ts = entry["ts"]
            if (ts.time, ts.inc) >= (since.time, since.inc):
                yield raw(entry)
        for _ in range(self.idle_rounds):
            yield None
        stop.set()
        yield None


class FakeServer:
    """Stands in for drivers.mongodb.server.MongoServer (version, topology, oplog edges)."""

    replica_set_name: str | None = "rs0"
    newest: Timestamp = Timestamp(1_800_000_000, 1)
    fail_auth = False

    def __init__(self, uri: str, password: str | None, **_: object) -> None:
        from backupd.errors import DriverError

        if self.fail_auth:
            raise DriverError("mongodb://backup@db1:27017: buildInfo: authentication failed or not authorized")
        self.where = uri
        self.password = password

    def __enter__(self) -> "FakeServer":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass

    def version(self) -> str:
        return "7.0.5"

    def replica_set(self) -> str | None:
        return self.replica_set_name

    def newest_oplog_ts(self) -> Timestamp:
        return self.newest

    def oldest(self) -> Timestamp:
        return Timestamp(1_700_000_000, 1)


#: A stand-in ``mongod`` for verification tests: Debian's /usr/bin/python3 and the standard library only
#: (the sandbox sees /usr, not the test's virtual environment). It answers pymongo's handshake, buildInfo,
#: ping and listDatabases (empty) on mongod's unix socket, ``<prefix>/mongodb-<port>.sock``, and writes
#: what it can see of the host, its arguments and its memory bounds to ``<dbpath>/standin.json``: the sandbox proof.
STANDIN_MONGOD = r'''#!/usr/bin/python3
import json, os, resource, socket, struct, sys, threading
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
dbpath, port, prefix = args["--dbpath"], args["--port"], args["--unixSocketPrefix"]
PROBES = __PROBES__
seen = {"uid": os.getuid(), "visible": {p: os.path.exists(p) for p in PROBES}, "args": args,
        "oom_score_adj": open("/proc/self/oom_score_adj").read().strip(),
        "rlimit_data": resource.getrlimit(resource.RLIMIT_DATA),
        "root": sorted(os.listdir("/root")) if os.path.isdir("/root") else None}
with open(os.path.join(dbpath, "standin.json"), "w") as out:
    json.dump(seen, out)

def enc(doc):
    out = b""
    for key, value in doc.items():
        name = key.encode() + b"\0"
        if isinstance(value, bool):
            out += b"\x08" + name + (b"\x01" if value else b"\x00")
        elif isinstance(value, int):
            out += b"\x12" + name + struct.pack("<q", value)
        elif isinstance(value, float):
            out += b"\x01" + name + struct.pack("<d", value)
        elif isinstance(value, str):
            data = value.encode() + b"\0"
            out += b"\x02" + name + struct.pack("<i", len(data)) + data
        elif isinstance(value, list):
            out += b"\x04" + name + enc({str(i): v for i, v in enumerate(value)})
        else:
            out += b"\x03" + name + enc(value)
    return struct.pack("<i", len(out) + 5) + out + b"\0"

def first_key(doc):
    return doc[5:doc.index(b"\0", 5)].decode()

HELLO = {"ismaster": True, "isWritablePrimary": True, "helloOk": True, "maxBsonObjectSize": 16777216,
         "maxMessageSizeBytes": 48000000, "maxWriteBatchSize": 100000, "logicalSessionTimeoutMinutes": 30,
         "connectionId": 1, "minWireVersion": 0, "maxWireVersion": 17, "readOnly": False, "ok": 1.0}
REPLIES = {"hello": HELLO, "ismaster": HELLO, "isMaster": HELLO,
           "buildInfo": {"version": "7.0.0", "versionArray": [7, 0, 0, 0], "ok": 1.0},
           "buildinfo": {"version": "7.0.0", "versionArray": [7, 0, 0, 0], "ok": 1.0},
           "listDatabases": {"databases": [], "totalSize": 0, "ok": 1.0}}

def read_exact(conn, n):
    data = b""
    while len(data) < n:
        more = conn.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data

def serve(conn):
    try:
        while True:
            size, request_id, _, opcode = struct.unpack("<iiii", read_exact(conn, 16))
            body = read_exact(conn, size - 16)
            if opcode == 2013:  # OP_MSG: flags, kind-0 section
                flags = struct.unpack("<I", body[:4])[0]
                reply = enc(REPLIES.get(first_key(body[5:]), {"ok": 1.0}))
                if flags & 2:
                    continue
                payload = struct.pack("<I", 0) + b"\0" + reply
            elif opcode == 2004:  # OP_QUERY: flags, collection name, skip, limit, query
                start = body.index(b"\0", 4) + 1 + 8
                reply = enc(REPLIES.get(first_key(body[start:]), {"ok": 1.0}))
                opcode, payload = 1, struct.pack("<iqii", 0, 0, 0, 1) + reply
            else:
                return
            conn.sendall(struct.pack("<iiii", 16 + len(payload), 0, request_id, opcode) + payload)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()

path = os.path.join(prefix, "mongodb-%s.sock" % port)
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen(16)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


def install_standin_mongod(directory: Path, probes: list[str]) -> Path:
    """The stand-in mongod in ``directory`` (which the scratch user must be able to read); returns its path."""
    directory.chmod(0o755)
    path = directory / "mongod"
    path.write_text(STANDIN_MONGOD.replace("__PROBES__", repr(probes)))
    path.chmod(0o755)
    return path
