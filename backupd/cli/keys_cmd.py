"""backupd keys generate: a new age identity on stdout, its recipient on stderr."""

from __future__ import annotations

import argparse
import sys

from backupd import age
from backupd.timeutil import format_timestamp, utcnow


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("keys", help="manage age keys")
    keys_sub = parser.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="print a new identity (private key); recipient to stderr")
    generate.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    identity = age.X25519Identity.generate()
    recipient = identity.to_recipient()
    # The same layout as age-keygen, so the file works with `age -d -i`.
    print(f"# created: {format_timestamp(utcnow())}")
    print(f"# public key: {recipient}")
    print(identity)
    print(f"Public key: {recipient}", file=sys.stderr)
    return 0
