#!/usr/bin/env bash
# make demo: sample SQLite database -> backup -> list -> verify -> restore.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKUPD=.venv/bin/backupd
export BACKUPD_CONFIG=config/quickstart.toml

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf var && mkdir -p var

step "generate an age identity (private key in var/identity.txt)"
$BACKUPD keys generate > var/identity.txt 2> var/recipient.txt
chmod 600 var/identity.txt
recipient=$(sed -n 's/^Public key: //p' var/recipient.txt)
echo "recipient: $recipient"
export BACKUPD_ENCRYPTION__RECIPIENTS="[\"$recipient\"]"

step "generate a signing key (var/signing.key): every manifest gets a manifest.json.sig"
$BACKUPD keys generate --signing -o var/signing.key 2> var/signer.txt
signer=$(sed -n 's/^Public key: //p' var/signer.txt)
echo "signing public key: $signer"
export BACKUPD_SIGNING__TRUSTED_KEYS="[\"$signer\"]"  # only backups it signed are restored, verified, pruned

step "make a sample database: var/demo.sqlite3"
.venv/bin/python - <<'PY'
import sqlite3
db = sqlite3.connect("var/demo.sqlite3")
db.executescript("""
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers, total_cents INTEGER, note TEXT);
""")
db.executemany("INSERT INTO customers VALUES (?, ?)", [(i, f"customer {i}") for i in range(1, 1001)])
db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)",
               [(i, i % 1000 + 1, i * 37 % 100000, f"order {i} " + "x" * (i % 50)) for i in range(1, 50001)])
db.commit()
print("customers:", db.execute("select count(*) from customers").fetchone()[0],
      "orders:", db.execute("select count(*) from orders").fetchone()[0])
PY

step "backupd check demo"
$BACKUPD --log-level warning check demo

step "backupd backup demo"
id=$($BACKUPD --log-level warning backup demo)
echo "backup id: $id"

step "backupd list"
$BACKUPD --log-level warning list

step "backupd verify demo (restores into a scratch file, compares row counts)"
$BACKUPD --log-level warning verify demo

step "backupd verify demo --integrity-only (sha256 of every object, no key needed)"
$BACKUPD --log-level warning verify demo --integrity-only

step "backupd restore demo --to var/restored.sqlite3"
$BACKUPD --log-level warning restore demo --to var/restored.sqlite3
.venv/bin/python -c "
import sqlite3
db = sqlite3.connect('var/restored.sqlite3')
print('restored orders:', db.execute('select count(*) from orders').fetchone()[0])"

step "recover one object without backupd: age -d | zstd -d"
if command -v age >/dev/null && command -v zstd >/dev/null; then
  age -d -i var/identity.txt "var/repository/demo/backups/$id/db.zst.age" | zstd -d -q > var/by-hand.sqlite3
  cmp var/by-hand.sqlite3 var/restored.sqlite3 && echo "age -d | zstd -d gives the same bytes"
else
  echo "(age or zstd CLI not installed; skipped)"
fi
step "check the manifest's signature without backupd: ssh-keygen -Y verify"
if command -v ssh-keygen >/dev/null; then
  echo "backupd $signer" > var/allowed_signers
  ssh-keygen -Y verify -n backupd -f var/allowed_signers -I backupd \
    -s "var/repository/demo/backups/$id/manifest.json.sig" < "var/repository/demo/backups/$id/manifest.json"
else
  echo "(ssh-keygen not installed; skipped)"
fi
step "backupd prune demo --dry-run (what retention would keep, and why)"
$BACKUPD --log-level warning prune demo --dry-run

step "done: repository in var/repository, config in config/quickstart.toml"
cat <<EOF
Carry on from this directory with the demo's configuration:
  export BACKUPD_CONFIG=config/quickstart.toml
  .venv/bin/backupd list
  .venv/bin/backupd show $id
  .venv/bin/backupd verify demo --integrity-only
  .venv/bin/backupd prune demo --dry-run
Reading needs no key; checking signatures needs the demo's signing public key:
  export BACKUPD_SIGNING__TRUSTED_KEYS='["$signer"]'
Taking another backup needs the demo's public key too:
  export BACKUPD_ENCRYPTION__RECIPIENTS='["$recipient"]'
  .venv/bin/backupd backup demo
EOF
