"""Configuration: a TOML file plus ``BACKUPD_...`` environment overrides.

Loading is two-phase. The core model validates the daemon, encryption, job
scheduling and retention keys; then each storage table and each job's
connection keys are validated by the model their plugin declares, so a
third-party driver brings its own keys and a typo anywhere is still an error.
Every error is reported at once as ``dotted.key.path: what is wrong (got VALUE)``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from backupd import plugins, sshsig
from backupd.errors import ConfigError, PluginError, read_secret
from backupd.paths import DEFAULT_CONFIG, DEFAULT_STATE_DIR
from backupd.redact import describe_url, redact, url_password_problem
from backupd.chain import INCREMENTAL_METHODS, supports_types
from backupd.schedule import parse_schedule
from backupd.sizes import MiB, parse_size
from backupd.timeutil import parse_duration

JOB_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
RECIPIENT_RE = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _duration(value: Any) -> dt.timedelta | None:
    if value is None or isinstance(value, dt.timedelta):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.timedelta(seconds=value)
    if isinstance(value, str):
        return parse_duration(value)
    raise ValueError("expected a duration such as 90s, 15m, 7d")


class DaemonSettings(Strict):
    state_dir: Path = DEFAULT_STATE_DIR
    metrics_listen: str = "127.0.0.1:9847"
    timezone: str = "UTC"
    max_parallel_jobs: int = Field(default=2, ge=1)
    shutdown_timeout: dt.timedelta = dt.timedelta(minutes=5)
    #: How late a scheduled run may still start (host down, daemon busy); None: one period of its schedule.
    misfire_grace_time: dt.timedelta | None = None
    #: Random delay up to this long added to every scheduled run (spreads many hosts' load).
    jitter: dt.timedelta | None = None
    #: Longest wait between restarts of a log archiver that keeps failing.
    archiver_backoff_max: dt.timedelta = dt.timedelta(minutes=5)
    #: How often the daemon lists each job's verification reports, so a `backupd verify` run
    #: elsewhere (the CLI, another host) shows in its metrics.
    repository_poll_interval: dt.timedelta = dt.timedelta(minutes=1)

    _durations = field_validator("shutdown_timeout", "misfire_grace_time", "jitter", "archiver_backoff_max",
                                 "repository_poll_interval", mode="before")(_duration)

    @field_validator("metrics_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9847")
        return value

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone") from None
        return value


class EncryptionSettings(Strict):
    #: Needed to write (backups, archived logs); reading the repository (list, show,
    #: verify --integrity-only, prune) needs none, so a DR or audit host may leave it out.
    recipients: list[str] = []
    identity_file: Path | None = None

    def require_recipients(self, needed_for: str) -> list[str]:
        if not self.recipients:
            raise ConfigError(
                f"encryption.recipients is empty: {needed_for} encrypts to it",
                hint='add recipients = ["age1..."] (the public key `backupd keys generate` prints) to [encryption], '
                     "or set BACKUPD_ENCRYPTION__RECIPIENTS",
            )
        return self.recipients

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, values: list[str]) -> list[str]:
        for value in values:
            if not RECIPIENT_RE.match(value):
                raise ValueError(f"not an age X25519 recipient (age1...): {value!r}")
        return values


def _public_key_line(value: str) -> str:
    sshsig.parse_public_key(value)
    return value


#: ``ssh-ed25519 AAAA... comment``; a bad line is an error at its own index (signing.trusted_keys.1).
PublicKeyLine = Annotated[str, AfterValidator(_public_key_line)]


class SigningSettings(Strict):
    #: Hosts that write backups and logs sign them with this Ed25519 key (OpenSSH format, 0600).
    key_file: Path | None = None
    #: Hosts that restore, verify or prune accept what these keys signed (more than one: rotation).
    trusted_keys: list[PublicKeyLine] = []

    def public_keys(self) -> list[sshsig.PublicKey]:
        return [sshsig.parse_public_key(line) for line in self.trusted_keys]


class RetentionSettings(Strict):
    keep_last: int | None = Field(default=None, ge=1)
    keep_hourly: int | None = Field(default=None, ge=1)
    keep_daily: int | None = Field(default=None, ge=1)
    keep_weekly: int | None = Field(default=None, ge=1)
    keep_monthly: int | None = Field(default=None, ge=1)
    keep_yearly: int | None = Field(default=None, ge=1)
    keep_within: dt.timedelta | None = None
    pitr_window: dt.timedelta | None = None

    _durations = field_validator("keep_within", "pitr_window", mode="before")(_duration)

    def is_empty(self) -> bool:
        return all(value is None for value in self.model_dump().values())


class VerifySettings(Strict):
    schedule: str | None = None
    checks: list[str] = []
    #: scratch servers run in a bubblewrap sandbox; "off" only where it cannot run, chosen explicitly
    sandbox: Literal["bwrap", "off"] = "bwrap"
    #: RLIMIT_DATA of every scratch process (sandboxed or not); None: half the host's memory (``backupd.sandbox``)
    memory_limit: Annotated[int, BeforeValidator(parse_size), Field(ge=64 * MiB)] | None = None
    full_read_interval: dt.timedelta = dt.timedelta(days=30)
    timeout: dt.timedelta = dt.timedelta(hours=2)

    _durations = field_validator("full_read_interval", "timeout", mode="before")(_duration)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            parse_schedule(value)
        return value


class JobSettings(BaseModel):
    """Keys every job has. Connection keys belong to the driver's own model."""

    model_config = ConfigDict(extra="allow")

    driver: str
    #: One repository, or several (``["local", "offsite"]``): every object goes to each (``backupd.copies``).
    storage: str | list[str]
    #: How many repositories must commit a backup (and hold a log) for the job to succeed.
    min_copies: int = Field(default=1, ge=1)
    method: str | None = None
    schedule: str | None = None
    #: diff and incr backups (DESIGN.md "Backup types"); method physical on drivers that take them
    diff_schedule: str | None = None
    incr_schedule: str | None = None
    compression: str = "zstd:3"
    # of a backup's compression and encryption threads; unset: the driver's own default_cpu_priority
    cpu_priority: Literal["low", "idle", "normal"] | None = None
    archive_logs: bool = False
    os_user: str | None = None
    timeout: dt.timedelta = dt.timedelta(hours=6)
    retention: RetentionSettings = RetentionSettings()
    #: Per repository, replaces ``retention`` for that one (``{ local = {...}, offsite = {...} }``).
    retention_by_storage: dict[str, RetentionSettings] = {}
    verify: VerifySettings = VerifySettings()
    #: Narrows signing.trusted_keys for this job (so host A's key cannot vouch for host B's job).
    trusted_keys: list[PublicKeyLine] | None = None

    _durations = field_validator("timeout", mode="before")(_duration)

    @field_validator("trusted_keys")
    @classmethod
    def _trusted_keys(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must not be empty; leave it out to trust every key in signing.trusted_keys")
        return value

    @field_validator("schedule", "diff_schedule", "incr_schedule")
    @classmethod
    def _schedule(cls, value: str | None) -> str | None:
        if value is not None:
            parse_schedule(value)
        return value

    def typed_schedules(self) -> dict[str, str]:
        """The schedule of each backup type the job has one for: {"full": ..., "diff": ..., "incr": ...}."""
        schedules = {"full": self.schedule, "diff": self.diff_schedule, "incr": self.incr_schedule}
        return {kind: schedule for kind, schedule in schedules.items() if schedule}

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError("must name at least one [storage.NAME]")
            if len(set(value)) != len(value):
                raise ValueError("names a storage more than once")
        return value

    @property
    def storages(self) -> list[str]:
        """The job's repositories, in the order reads try them."""
        return self.storage if isinstance(self.storage, list) else [self.storage]

    def retention_for(self, storage: str) -> RetentionSettings:
        """The retention policy of one of the job's repositories."""
        return self.retention_by_storage.get(storage, self.retention)

    @field_validator("compression")
    @classmethod
    def _compression(cls, value: str) -> str:
        compression_level(value)
        return value

    @property
    def compression_level(self) -> int:
        return compression_level(self.compression)

    def driver_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


def compression_level(text: str) -> int:
    algorithm, _, level = text.partition(":")
    if algorithm != "zstd":
        raise ValueError("only zstd is supported: 'zstd' or 'zstd:LEVEL' (1-19)")
    if not level:
        return 3
    if not level.lstrip("-").isdigit() or not -7 <= int(level) <= 19:
        raise ValueError("zstd level must be an integer from -7 to 19")
    return int(level)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BACKUPD_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    daemon: DaemonSettings = DaemonSettings()
    storage: dict[str, dict[str, Any]]
    encryption: EncryptionSettings = EncryptionSettings()
    signing: SigningSettings = SigningSettings()
    jobs: dict[str, JobSettings] = {}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init kwargs; the environment overrides it.
        return env_settings, init_settings

    # Filled by load_settings(): validated plugin option models.
    _storage_options: dict[str, BaseModel] = {}
    _driver_options: dict[str, BaseModel] = {}
    source: Path | None = None

    def storage_options(self, name: str) -> BaseModel:
        return self._storage_options[name]

    def driver_options(self, job: str) -> BaseModel:
        return self._driver_options[job]

    def job(self, name: str) -> JobSettings:
        try:
            return self.jobs[name]
        except KeyError:
            known = ", ".join(sorted(self.jobs)) or "none"
            raise ConfigError(f"unknown job {name!r} (configured jobs: {known})") from None

    def trusted_keys(self, job: str) -> list[sshsig.PublicKey]:
        """The keys whose signatures ``job``'s backups and logs are accepted with (empty: signing not checked)."""
        lines = self.job(job).trusted_keys
        return self.signing.public_keys() if lines is None else [sshsig.parse_public_key(line) for line in lines]


def format_error(loc: tuple[Any, ...], msg: str, value: Any, *, has_value: bool = True) -> str:
    path = ".".join(str(part) for part in loc) or "(file)"
    msg = msg.removeprefix("Value error, ")
    if not has_value:
        return f"{path}: {msg}"
    return f"{path}: {msg} (got {echo(value)})"


def echo(value: Any) -> str:
    """A value as an error message may show it: a connection URL by its host, port and database only."""
    if isinstance(value, str) and "://" in value:
        return describe_url(value)
    return redact(repr(value))


def url_password_errors(loc: tuple[Any, ...], table: dict[str, Any]) -> list[str]:
    """Secrets never sit in the file: a URL-valued key carrying a password is an error, whatever it holds."""
    errors = []
    for key, value in table.items():
        problem = url_password_problem(value) if isinstance(value, str) and "://" in value else None
        if problem:
            errors.append(format_error(loc + (key,), f"{problem}; put the password in password_file instead "
                                       "(or the environment)", value))
    return errors


def _without(errors: list[str], flagged: list[str]) -> list[str]:
    """Plugin errors minus their own word on a password the core already reported for the same key."""
    keys = {line.partition(":")[0] for line in flagged}
    return [line for line in errors if line.partition(":")[0] not in keys or "password" not in line]


def _pydantic_errors(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[str]:
    lines = []
    for error in exc.errors():
        loc = prefix + tuple(error["loc"])
        if error["type"] == "missing":
            lines.append(format_error(loc, "required key is missing", None, has_value=False))
        elif error["type"] == "extra_forbidden":
            lines.append(format_error(loc, "unknown key", error.get("input")))
        else:
            lines.append(format_error(loc, error["msg"], error.get("input")))
    return lines


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found", hint="pass --config PATH or set BACKUPD_CONFIG") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied reading the configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_settings(path: Path | None = None, *, data: dict[str, Any] | None = None) -> Settings:
    """Read, validate and resolve the configuration; raise ConfigError listing every problem."""
    if data is None:
        path = path or Path(os.environ.get("BACKUPD_CONFIG") or DEFAULT_CONFIG)
        data = read_toml(path)
    errors: list[str] = []
    settings: Settings | None = None
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        errors.extend(_pydantic_errors(exc))

    # Phase two runs even when phase one failed, so every error is listed at once.
    # It reads the merged settings when they exist (environment overrides applied).
    storage_tables = settings.storage if settings else _tables(data.get("storage"))
    job_tables = (
        {name: {**job.driver_options(), "driver": job.driver, "storage": job.storage, "method": job.method,
                "diff_schedule": job.diff_schedule, "incr_schedule": job.incr_schedule}
         for name, job in settings.jobs.items()}
        if settings
        else _tables(data.get("jobs"))
    )
    storage_options = _validate_storage(storage_tables, errors)
    driver_options = _validate_jobs(job_tables, set(storage_tables), errors)
    if settings is not None:
        errors.extend(_narrowing_errors(settings))
    if errors or settings is None:
        raise ConfigError(_summary(path, errors), errors=errors)
    settings._storage_options = storage_options
    settings._driver_options = driver_options
    settings.source = path
    return settings


_CORE_JOB_KEYS = set(JobSettings.model_fields)


def _tables(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict):
        return {}
    return {name: table for name, table in value.items() if isinstance(table, dict)}


def _validate_storage(tables: dict[str, dict[str, Any]], errors: list[str]) -> dict[str, BaseModel]:
    validated: dict[str, BaseModel] = {}
    for name, table in tables.items():
        loc: tuple[Any, ...] = ("storage", name)
        kind = table.get("type")
        if not kind:
            errors.append(format_error(loc + ("type",), "required key is missing", None, has_value=False))
            continue
        try:
            backend = plugins.storage_class(str(kind))
        except PluginError as exc:
            errors.append(format_error(loc + ("type",), str(exc), kind))
            continue
        flagged = url_password_errors(loc, table)
        errors.extend(flagged)
        try:
            validated[name] = backend.options_model(**table)
        except ValidationError as exc:
            errors.extend(_without(_pydantic_errors(exc, loc), flagged))
    return validated


def _validate_jobs(tables: dict[str, dict[str, Any]], storages: set[str], errors: list[str]) -> dict[str, BaseModel]:
    validated: dict[str, BaseModel] = {}
    for name, table in tables.items():
        loc: tuple[Any, ...] = ("jobs", name)
        if not JOB_NAME_RE.match(name):
            errors.append(format_error(loc, "job names are lowercase letters, digits, '_', '-', '.'", name))
        named = table.get("storage")
        for storage in named if isinstance(named, list) else [] if named is None else [named]:
            if storage not in storages:
                known = ", ".join(sorted(storages)) or "none defined"
                errors.append(format_error(loc + ("storage",), f"no [storage.{storage}] table (defined: {known})",
                                           storage))
        options = {k: v for k, v in table.items() if k not in _CORE_JOB_KEYS}
        flagged = url_password_errors(loc, options)
        errors.extend(flagged)
        kind = table.get("driver")
        if not kind:
            continue  # phase one reported it
        try:
            driver = plugins.driver_descriptor(str(kind))  # its options model, not the driver
        except PluginError as exc:
            errors.append(format_error(loc + ("driver",), str(exc), kind))
            continue
        method = table.get("method")
        if method is not None and method not in driver.methods:
            errors.append(format_error(loc + ("method",), f"{kind} supports {', '.join(driver.methods)}", method))
        for key in ("diff_schedule", "incr_schedule"):
            if table.get(key) is not None and not supports_types(driver.capabilities, method or driver.methods[0]):
                errors.append(format_error(loc + (key,), f"diff and incr backups need method "
                                           f"{' or '.join(INCREMENTAL_METHODS)} on a driver that takes them "
                                           f"(driver {kind}, method {method or driver.methods[0]})", table[key]))
        try:
            validated[name] = driver.options_model(**options)
        except ValidationError as exc:
            errors.extend(_without(_pydantic_errors(exc, loc), flagged))
    return validated


def _narrowing_errors(settings: Settings) -> list[str]:
    """A job's trusted_keys narrows signing.trusted_keys: each of its keys must be one of those."""
    trusted = settings.signing.public_keys()
    errors = []
    for name, job in settings.jobs.items():
        if job.min_copies > len(job.storages):
            errors.append(format_error(("jobs", name, "min_copies"),
                                       f"the job has {len(job.storages)} storage(s)", job.min_copies))
        for other in sorted(set(job.retention_by_storage) - set(job.storages)):
            errors.append(format_error(("jobs", name, "retention_by_storage", other),
                                       f"not one of the job's storages ({', '.join(job.storages)})", other))
        for index, line in enumerate(job.trusted_keys or []):
            key = sshsig.parse_public_key(line)
            if key not in trusted:
                errors.append(format_error(("jobs", name, "trusted_keys", index),
                                           f"{key} is not in signing.trusted_keys (a job's list narrows that one)",
                                           line))
    return errors


def _summary(path: Path | None, errors: list[str]) -> str:
    where = str(path) if path else "configuration"
    count = len(errors)
    return f"{where}: {count} error{'s' if count != 1 else ''} in the configuration"


def read_secret_file(path: Path, what: str) -> str:
    """Read a secret from a ``*_file``; the first line, without its newline."""
    try:
        text = read_secret(path, what).decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not UTF-8 text") from None
    secret = text.splitlines()[0] if text else ""
    if not secret:
        raise ConfigError(f"{what} {path}: file is empty")
    return secret

