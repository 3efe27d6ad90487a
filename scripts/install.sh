#!/usr/bin/env bash
# Install backupd from this checkout the way README.md ("Installing under /opt") describes, step by step.
#
#   sudo scripts/install.sh --user postgres      # a PostgreSQL host: backupd runs as the cluster's owner
#   sudo scripts/install.sh                      # any other host: a dedicated system user, backupd
#
# Options:
#   --user USER     the one OS user the daemon, the CLI and PostgreSQL's archive_command run as
#                   (default backupd, created when missing; postgres on a PostgreSQL host)
#   --extras LIST   the package extras for your drivers (default postgres,mysql,mongodb)
#   --prefix DIR    install under DIR instead of / (tests; the unit is then not for systemd)
#   --python PATH   the interpreter for the venv (default /usr/bin/python3: Debian's, which every user
#                   can execute, unlike a pyenv build under /root)
#
# It starts nothing: it prints the steps left (keys, configuration, check, systemctl).
set -euo pipefail

SOURCE=$(cd "$(dirname "$0")/.." && pwd)
USER_NAME=backupd
EXTRAS=postgres,mysql,mongodb
PREFIX=
PYTHON=/usr/bin/python3

while [ $# -gt 0 ]; do
  case "$1" in
    --user) USER_NAME=$2; shift 2 ;;
    --extras) EXTRAS=$2; shift 2 ;;
    --prefix) PREFIX=${2%/}; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ "$(id -u)" != 0 ]; then
  echo "install.sh: run it as root (it creates a user, /opt/backupd, /etc/backupd and /var/lib/backupd)" >&2
  exit 2
fi
if [ ! -x "$PYTHON" ]; then
  echo "install.sh: $PYTHON not found: install Debian's python3 and python3-venv" >&2
  exit 2
fi

OPT=$PREFIX/opt/backupd
ETC=$PREFIX/etc/backupd
STATE=$PREFIX/var/lib/backupd
REPO=$PREFIX/var/backups/backupd
UNITS=$PREFIX/etc/systemd/system
step() { printf '== %s\n' "$*"; }

# What we install must be readable by USER (PostgreSQL runs archive_command as its own user).
umask 022

step "1. the OS user $USER_NAME"
if ! id -u "$USER_NAME" >/dev/null 2>&1; then
  if [ "$USER_NAME" != backupd ]; then
    echo "install.sh: user $USER_NAME does not exist (install the database first, or use --user backupd)" >&2
    exit 2
  fi
  useradd --system --home-dir /var/lib/backupd --shell /usr/sbin/nologin --user-group backupd
fi
GROUP_NAME=$(id -gn "$USER_NAME")

step "2. a virtual environment in $OPT/venv with backupd[$EXTRAS]"
install -d -m 0755 "$OPT"
[ -x "$OPT/venv/bin/python" ] || "$PYTHON" -m venv "$OPT/venv"
"$OPT/venv/bin/python" -m pip install --quiet --upgrade pip
"$OPT/venv/bin/python" -m pip install --quiet "$SOURCE[$EXTRAS]"
install -m 0644 "$SOURCE/README.md" "$OPT/README.md"   # the unit's Documentation=

step "3. configuration in $ETC (0750 root:$GROUP_NAME; the file 0640, secrets 0600 $USER_NAME)"
install -d -m 0750 -o root -g "$GROUP_NAME" "$ETC"
if [ ! -e "$ETC/backupd.toml" ]; then
  sed -e "s|^state_dir = \"/var/lib/backupd\"|state_dir = \"$STATE\"|" -e "s|^path = \"/var/backups/backupd\"|path = \"$REPO\"|" \
      "$SOURCE/config/backupd.example.toml" \
    | install -m 0640 -o root -g "$GROUP_NAME" /dev/stdin "$ETC/backupd.toml"
else
  echo "   $ETC/backupd.toml exists: kept"
fi

step "4. state directory $STATE and a local repository directory $REPO (0700 $USER_NAME)"
install -d -m 0700 -o "$USER_NAME" -g "$GROUP_NAME" "$STATE"
install -d -m 0755 "$(dirname "$REPO")"
install -d -m 0700 -o "$USER_NAME" -g "$GROUP_NAME" "$REPO"

step "5. the systemd unit in $UNITS"
install -d -m 0755 "$UNITS"
sed -e "s|/opt/backupd|$OPT|g" -e "s|/etc/backupd|$ETC|g" "$SOURCE/systemd/backupd.service" > "$UNITS/backupd.service"
chmod 0644 "$UNITS/backupd.service"
if [ "$USER_NAME" != backupd ]; then
  install -d -m 0755 "$UNITS/backupd.service.d"
  printf '# written by scripts/install.sh --user %s\n[Service]\nUser=%s\nGroup=%s\n' \
    "$USER_NAME" "$USER_NAME" "$GROUP_NAME" > "$UNITS/backupd.service.d/user.conf"
  chmod 0644 "$UNITS/backupd.service.d/user.conf"
fi

BACKUPD=$OPT/venv/bin/backupd
cat <<EOF
Installed. Left to do (README.md, "Installing under /opt"):
  umask 077; $BACKUPD keys generate > $ETC/identity.txt   # prints "Public key: age1..."
  chown $USER_NAME: $ETC/identity.txt                      # only on hosts that restore or verify
  edit $ETC/backupd.toml: [encryption] recipients = ["age1..."], identity_file, storage, jobs
  runuser -u $USER_NAME -- $BACKUPD --config $ETC/backupd.toml check
  PostgreSQL: archive_command = '$BACKUPD --config $ETC/backupd.toml wal-push --job JOB %p'
  systemctl daemon-reload && systemctl enable --now backupd
EOF
