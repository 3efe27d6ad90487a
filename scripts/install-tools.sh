#!/usr/bin/env bash
# Installs the Debian tools the test suite drives (age, zstd, ssh-keygen, ...) when missing.
# With CI=true a tool that is still missing afterwards fails the run: tests never
# silently skip in CI.
set -euo pipefail

declare -A PACKAGE_OF=(
  [age]=age
  [zstd]=zstd
  [sqlite3]=sqlite3
  [pg_dump]=postgresql
  [pg_restore]=postgresql
  [mariadbd]=mariadb-server
  [mariadb-dump]=mariadb-client
  [mariadb-binlog]=mariadb-client
  [mariadb-backup]=mariadb-backup
  [mbstream]=mariadb-backup
  [redis-server]=redis-server
  [openssl]=openssl
  [promtool]=prometheus
  [systemd-analyze]=systemd
  [bwrap]=bubblewrap
  [prlimit]=util-linux
  [choom]=util-linux
  [ssh-keygen]=openssh-client
  [faketime]=faketime
)

missing=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$tool]}")
done

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "warning: missing tools (${missing[*]}) and cannot apt-get install them here" >&2
  fi
fi

still=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || still+=("$tool")
done
if [ ${#still[@]} -gt 0 ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "error: required tools missing: ${still[*]}" >&2
    exit 1
  fi
  echo "warning: tests needing ${still[*]} will be skipped" >&2
fi
