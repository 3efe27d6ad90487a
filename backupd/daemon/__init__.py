"""``backupd run``: the scheduler, log archivers, metrics/health server and control socket (see service.py)."""
