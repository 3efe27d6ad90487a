"""backupd keys generate [--signing] [-o FILE]: a new age identity, or with --signing an Ed25519 signing key
in OpenSSH format (stdout, or a new 0600 file); its public half (recipient, public key line) on stderr."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from backupd import age, sshsig
from backupd.errors import BackupdError, UsageError
from backupd.timeutil import format_timestamp, utcnow


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("keys", help="manage age keys and signing keys")
    keys_sub = parser.add_subparsers(dest="keys_command", required=True)
    generate = keys_sub.add_parser("generate", help="a new identity (private key) on stdout or in a new file; "
                                                    "its recipient (public key) to stderr")
    generate.add_argument("--signing", action="store_true",
                          help="an Ed25519 signing key (OpenSSH private key format) for [signing] key_file; "
                               "its public key line goes in [signing] trusted_keys")
    generate.add_argument("-o", "--output", type=Path, metavar="FILE",
                          help="write the private key to this new file (mode 0600; an existing file is never replaced)")
    generate.set_defaults(handler=run_generate)


def write_new_secret(path: Path, text: str) -> None:
    """Create ``path`` 0600 with ``text``; UsageError if it exists (O_EXCL: no race, no symlink followed)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise UsageError(f"{path}: file exists; refusing to overwrite a key file") from None
    except OSError as exc:
        raise BackupdError(f"{path}: cannot create the key file: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, text.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def run_generate(args: argparse.Namespace) -> int:
    if args.signing:
        return generate_signing_key(args.output)
    identity = age.X25519Identity.generate()
    recipient = identity.to_recipient()
    # The same layout as age-keygen, so the file works with `age -d -i`.
    text = f"# created: {format_timestamp(utcnow())}\n# public key: {recipient}\n{identity}\n"
    if args.output is not None:
        write_new_secret(args.output, text)
    else:
        sys.stdout.write(text)
    print(f"Public key: {recipient}", file=sys.stderr)
    return 0


def generate_signing_key(output: Path | None) -> int:
    key = sshsig.SigningKey.generate(comment=f"backupd@{socket.gethostname()}")
    if output is not None:
        write_new_secret(output, key.to_openssh())
    else:
        sys.stdout.write(key.to_openssh())
    print(f"Public key: {key.public.line()}", file=sys.stderr)
    return 0
