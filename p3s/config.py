"""One frozen settings object, read from a TOML file and ``P3S_*`` environment variables.

Every value has a default, so ``p3s`` runs with no file at all on its embedded
default (SQLite and an in-process broker).  A value in the environment wins over
the file: ``P3S_BROKER_URL`` sets ``[broker] url``, ``P3S_STATE_DIR`` sets the
top-level ``state_dir``.  Lists and tables in the environment are JSON.
Nothing is read at import time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from p3s.errors import ConfigError

EMBEDDED_BROKER_URL = "memory://"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# kombu transports p3s speaks: RabbitMQ (AMQP 0-9-1, plain or TLS) and the in-process one.
BROKER_SCHEMES = ("amqp", "amqps", "pyamqp", "memory")
FAILOVER_STRATEGIES = ("round-robin", "shuffle")
QUEUE_TYPES = ("classic", "quorum")
# P3S_* variables that are not settings: the config file's name, and what a pilot
# gives its payloads (a payload may run p3s commands itself).
NOT_SETTINGS_ENV = frozenset(
    {
        "P3S_CONFIG",
        "P3S_INPUT",
        "P3S_INPUT_NAME",
        "P3S_JOB_ID",
        "P3S_WORKDIR",
        "P3S_WORKFLOW_ID",
        "P3S_OUTDIR",
        "P3S_PARENT_OUTDIRS",
        "P3S_NODE",
        "P3S_TEMPLATE",
        "P3S_DEADLINE",
    }
)

log = logging.getLogger(__name__)


#: Where a list of broker URLs (kombu's failover list) splits: a ``;`` that
#: starts another URL.  A ``;`` inside a password is percent-encoded there.
_URL_LIST_SEPARATOR = re.compile(r";\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(text: str) -> list[str]:
    """The URLs of a ``;``-separated list (one URL gives a list of one)."""
    return [u.strip() for u in _URL_LIST_SEPARATOR.split(text)]


def mask_url(url: str) -> str:
    """Return ``url`` (or each URL of a ``;``-separated list) with any password replaced by ``***``."""
    if not url:
        return url
    if _URL_LIST_SEPARATOR.search(url):
        return ";".join(mask_url(u) for u in split_urls(url))
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    if parts.password is None:
        return url
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{_host_part(parts.netloc)}"))


def split_bind(text: str, where: str = "web.bind") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a host and a port number; ConfigError if it is not one."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{where}: expected HOST:PORT such as 127.0.0.1:8080, got {text!r}")
    return host, int(port)


def _host_part(netloc: str) -> str:
    """The host and port of a netloc exactly as written (IPv6 brackets kept)."""
    return netloc.rsplit("@", 1)[-1]


def _with_password(url: str, password_file: str) -> str:
    """Put the password read from ``password_file`` into ``url``."""
    if not password_file:
        return url
    try:
        password = Path(password_file).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read password file {password_file}: {exc.strerror}") from exc
    parts = urlsplit(url)
    netloc = f"{quote(parts.username or '', safe='')}:{quote(password, safe='')}@{_host_part(parts.netloc)}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach RabbitMQ; an empty url means the in-process embedded broker."""

    # One node's URL, or the nodes of a cluster separated by ";" (a list in TOML):
    # each part connects to a live one and moves to another when its node goes.
    url: str = field(default="", repr=False)
    # Which node a part tries first: "round-robin" (in the order given) or
    # "shuffle" (an order of its own per connection, spreading the parts).
    failover_strategy: str = "round-robin"
    # "classic", or "quorum" (a cluster): the dispatcher's queues (events,
    # status, expired) and p3s.invalid are replicated quorum queues.  The task
    # queues stay classic, for their priorities.
    queue_type: str = "classic"
    # false in a cluster: task queues are then transient, so RabbitMQ deletes
    # one with its node and the next declare puts it on a live node.
    task_queue_durable: bool = True
    password_file: str = ""
    heartbeat_s: float = 30.0
    # Per task queue; 0 leaves the queue unbounded.  When full, RabbitMQ drops
    # the oldest task and dead-letters it, so the drop is counted.
    max_queue_length: int = 0
    ssl_ca: str = ""
    ssl_cert: str = ""
    ssl_key: str = ""
    # Declare exchanges and queues at start-up.  Turn off for least-privilege
    # users (pilots, watchers) when the topology comes from definitions.json.
    declare_topology: bool = True
    # Stamp every published message with the broker login as its AMQP user_id:
    # RabbitMQ refuses a message whose user_id is not the connection's user, so
    # the dispatcher can tell which account sent a report.
    stamp_user_id: bool = True

    @property
    def embedded(self) -> bool:
        return not self.url or self.url.startswith("memory://")

    @property
    def effective_url(self) -> str:
        if self.embedded:
            return EMBEDDED_BROKER_URL
        return ";".join(self.node_urls)

    @property
    def node_urls(self) -> tuple[str, ...]:
        """Each node's URL, with the password from password_file put in."""
        if self.embedded:
            return (EMBEDDED_BROKER_URL,)
        return tuple(_with_password(u, self.password_file) for u in split_urls(self.url))

    def __repr__(self) -> str:
        return f"BrokerSettings(url={mask_url(self.url)!r})"


@dataclass(frozen=True)
class DatabaseSettings:
    """Where the dispatcher keeps its records; an empty url means SQLite in state_dir."""

    url: str = field(default="", repr=False)
    password_file: str = ""
    echo: bool = False

    def __repr__(self) -> str:
        return f"DatabaseSettings(url={mask_url(self.url)!r})"


@dataclass(frozen=True)
class SourceSettings:
    """One storage source the watcher follows."""

    name: str = "buffer"
    kind: str = "inotify"
    location: str = ""
    pattern: str = "*"
    stream: str = "raw"
    # Pilots read the file as url_prefix + path relative to location; empty: the local path
    # (an xrootd source's events carry location + relative path when this is empty).
    url_prefix: str = ""
    # poll and xrootd: seconds between scans, and how many consecutive scans a file's
    # size and mtime must hold still before it is published.
    scan_interval_s: float = 5.0
    stable_scans: int = 2
    # poll and xrootd: directories listed every scan even when their mtime did not
    # change (coarse mtimes, files growing in place): the newest N.
    newest_dirs: int = 2
    # poll and xrootd: a listing failing or slower than this marks the source unhealthy.
    health_timeout_s: float = 10.0
    # Name of the primary source this one stands in for; empty: always active.
    fallback_for: str = ""
    # A fallback becomes active once its primary has been unhealthy this long ...
    failover_after_s: float = 60.0
    # ... and then publishes at most this many files per minute (it reads no file content).
    max_files_per_minute: int = 60


@dataclass(frozen=True)
class WatcherSettings:
    """What the watcher ignores, rescans and holds while the broker is away."""

    ignore: tuple[str, ...] = (".*", "*.tmp", "*.part", "*~")
    rescan_age_s: float = 3600.0
    backlog_max: int = 100_000


@dataclass(frozen=True)
class DispatcherSettings:
    """Batching, reaping and shedding limits of the dispatcher."""

    batch_size: int = 500
    # A batch of pilots' and watchers' reports alone is held open this long for
    # more of them, so that many heartbeats share one transaction; a data event,
    # job report or dead letter is recorded at once all the same.  0: no wait.
    heartbeat_linger_s: float = 0.5
    reap_interval_s: float = 2.0
    # A queued job is expired by the reaper this long after its deadline: RabbitMQ's
    # TTL and the pilot's own check usually act first, with better reasons.
    reap_grace_s: float = 2.0
    heartbeat_timeout_s: float = 60.0
    # Extra time after a deadline before `p3s audit` calls an active job stale.
    audit_grace_s: float = 60.0
    # Shed new files (decision `shed`) while a task queue holds this many tasks
    # or its oldest task has waited this long; 0 turns a limit off.
    shed_queue_depth: int = 0
    shed_queue_age_s: float = 0.0
    # Run-time statistics used as a stage's expected run time when its node
    # gives no expected_s: the p95 of this many recent finished jobs.
    expected_sample: int = 50
    # Broker accounts whose status reports (pilots) and data events (watchers,
    # operators' p3s submit) are believed, by the validated AMQP user_id; empty:
    # any account the broker lets publish there.
    report_users: tuple[str, ...] = ()
    event_users: tuple[str, ...] = ()


@dataclass(frozen=True)
class PilotSettings:
    """Defaults for pilots; the command line overrides them."""

    queues: tuple[str, ...] = ("default",)
    heartbeat_s: float = 10.0
    work_root: str = ""
    kill_grace_s: float = 5.0
    max_jobs: int = 0
    idle_exit_s: float = 0.0
    lifetime_s: float = 0.0
    # A pilot started as root runs its payloads as this user (and its primary
    # group), so a payload cannot read the pilot's credentials; empty: as itself.
    payload_user: str = ""


@dataclass(frozen=True)
class MetricsSettings:
    """Where a daemon serves Prometheus metrics; port 0 turns them off."""

    address: str = "127.0.0.1"
    port: int = 0


@dataclass(frozen=True)
class TemplatesSettings:
    """Limits on an imported template (p3s.dagengine.TemplateLimits has the same fields)."""

    max_bytes: int = 5_000_000
    max_nodes: int = 2000
    max_edges: int = 20_000
    max_depth: int = 32
    max_wall_s: float = 7 * 24 * 3600.0
    max_budget_s: float = 7 * 24 * 3600.0


@dataclass(frozen=True)
class WebSettings:
    """The web monitor (``p3s web``): where it listens, who may look and who may act."""

    bind: str = "127.0.0.1:8080"
    # Viewers read every page without a login; false: every page needs one.
    anonymous_view: bool = True
    # Lines ``name:password``; a line without ``:`` is the password of ``operator``.
    password_file: str = ""
    # Lines ``name:token``: ``Authorization: Bearer <token>``, or the token typed as a password.
    token_file: str = ""
    # The key that signs session cookies; empty: <state_dir>/web-secret, made 0600 when missing.
    secret_file: str = ""
    # The pilot count the overview checks the live pilots against; 0: no check.
    nominal_pilots: int = 0
    # Seconds between live refreshes of a page, and how long a computed page is shared.
    refresh_s: float = 5.0
    cache_s: float = 1.0
    # Processes serving requests (uvicorn workers on one socket); one is enough for a few viewers.
    workers: int = 1


@dataclass(frozen=True)
class ResultsSettings:
    """DQM results: run and subrun from file names, expected ranges, how long results are kept."""

    # By stream (``*``: every other stream): a regular expression with named
    # groups run and (optional) subrun, searched in the file name.
    run_patterns: Mapping[str, str] = field(default_factory=dict)
    # By template, then metric: [low, high] (-inf/inf for an open end); wins over the manifest's range.
    ranges: Mapping[str, Mapping[str, tuple[float, ...]]] = field(default_factory=dict)
    # p3s purge removes result records older than this, keeping the newest of each category.
    retention_days: float = 90.0
    # ... and may delete the files those results list (and leave the output
    # directories of workflows with results to the records' purge) only if true.
    delete_files: bool = False
    manifest_max_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        # Plain dicts, not the read-only views _coerce makes: dataclasses.asdict
        # (p3s config show) cannot copy a view nested in a section.
        object.__setattr__(self, "run_patterns", dict(self.run_patterns))
        object.__setattr__(self, "ranges", {t: dict(m) for t, m in self.ranges.items()})


@dataclass(frozen=True)
class Settings:
    """The effective configuration of every p3s part."""

    state_dir: str = ""
    output_root: str = ""
    log_root: str = ""
    log_level: str = "INFO"
    broker: BrokerSettings = BrokerSettings()
    database: DatabaseSettings = DatabaseSettings()
    sources: tuple[SourceSettings, ...] = ()
    watcher: WatcherSettings = WatcherSettings()
    dispatcher: DispatcherSettings = DispatcherSettings()
    pilot: PilotSettings = PilotSettings()
    metrics: MetricsSettings = MetricsSettings()
    templates: TemplatesSettings = TemplatesSettings()
    results: ResultsSettings = ResultsSettings()
    web: WebSettings = WebSettings()
    # Fraction of files to process, by stream name or by glob on the file name.
    sampling: Mapping[str, float] = field(default_factory=dict)
    source_file: str = ""

    @property
    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        return Path(base) / "p3s"

    @property
    def output_path(self) -> Path:
        return Path(self.output_root).expanduser() if self.output_root else self.state_path / "outputs"

    @property
    def log_path(self) -> Path:
        return Path(self.log_root).expanduser() if self.log_root else self.state_path / "logs"

    @property
    def database_url(self) -> str:
        if not self.database.url:
            return f"sqlite:///{self.state_path / 'p3s.db'}"
        return _with_password(self.database.url, self.database.password_file)

    def to_dict(self, masked: bool = True) -> dict[str, Any]:
        """Every setting as plain data, passwords masked unless asked otherwise."""
        # asdict deep-copies, and a mappingproxy cannot be copied.
        data = _plain(dataclasses.asdict(dataclasses.replace(self, sampling=dict(self.sampling))))
        if masked:
            data["broker"]["url"] = mask_url(self.broker.url)
            data["database"]["url"] = mask_url(self.database.url)
        data["effective"] = {
            "broker_url": mask_url(self.broker.effective_url) if masked else self.broker.effective_url,
            "database_url": mask_url(self.database_url) if masked else self.database_url,
            "state_dir": str(self.state_path),
            "output_root": str(self.output_path),
            "log_root": str(self.log_path),
        }
        return data


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a TOML or environment value to the type a field declares."""
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return _build(hint, value, where)
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if isinstance(value, str):
            value = (
                _json(value, where)
                if value.strip().startswith("[")
                else [v.strip() for v in value.split(",") if v.strip()]
            )
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or hint in (Mapping, dict):
        if isinstance(value, str):
            value = _json(value, where)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        val_hint = typing.get_args(hint)[1] if typing.get_args(hint) else Any
        return types.MappingProxyType({str(k): _coerce(v, val_hint, f"{where}.{k}") for k, v in value.items()})
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != number:
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: not valid JSON: {exc}") from None


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where or 'top level'}: unknown setting {unknown[0]!r}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip(".")) for k, v in values.items()}
    return cls(**kwargs)


def setting_variables() -> frozenset[str]:
    """Every ``P3S_*`` environment variable that sets a setting."""
    names = set()
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if f.name == "source_file":
            continue
        hint = hints[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            names.update(f"P3S_{f.name}_{sub.name}".upper() for sub in dataclasses.fields(hint))
        else:
            names.add(f"P3S_{f.name}".upper())
    return frozenset(names)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``P3S_*`` variables in ``environ`` that p3s does not read, each with the nearest it does."""
    known = setting_variables()
    out = []
    for name in sorted(environ):
        # P3S_TEST_* belong to the test suite, not to p3s.
        if not name.startswith("P3S_") or name in known or name in NOT_SETTINGS_ENV or name.startswith("P3S_TEST_"):
            continue
        import difflib  # only for a mistyped name: every command reads the settings

        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        out.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return out


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``P3S_SECTION_KEY`` variables into a nested dict shaped like the TOML file."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name == "source_file":
            continue
        hint = typing.get_type_hints(Settings)[f.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            for sub in dataclasses.fields(hint):
                name = f"P3S_{f.name}_{sub.name}".upper()
                if name in environ:
                    out.setdefault(f.name, {})[sub.name] = environ[name]
        else:
            name = f"P3S_{f.name}".upper()
            if name in environ:
                out[f.name] = environ[name]
    return out


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (or ``$P3S_CONFIG``), apply ``P3S_*`` overrides and validate.

    Raises ConfigError naming the setting when a value is malformed.
    """
    environ = os.environ if environ is None else environ
    path = path or environ.get("P3S_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    broker = data.get("broker")
    if isinstance(broker, dict) and isinstance(broker.get("url"), list):
        # The nodes of a cluster as a TOML list: the same as the ";"-separated string.
        if not all(isinstance(u, str) for u in broker["url"]):
            raise ConfigError(f"broker.url: expected URL strings, got {mask_url(str(broker['url']))!r}")
        broker["url"] = ";".join(broker["url"])
    for key, value in _environment_overrides(environ).items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    settings = _build(Settings, data, "")
    settings = dataclasses.replace(settings, source_file=str(path or ""))
    _validate(settings)
    settings = dataclasses.replace(settings, log_level=settings.log_level.upper())
    for name in unknown_variables(environ):
        log.warning("config: environment variable %s is not a p3s setting; ignored", name)
    return settings


def _validate(s: Settings) -> None:
    if s.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {s.log_level!r}")
    if not s.broker.embedded:
        _validate_broker(s.broker)
    for stream, fraction in s.sampling.items():
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"sampling.{stream}: fraction must be between 0 and 1, got {fraction}")
    names = [src.name for src in s.sources]
    if len(names) != len(set(names)):
        raise ConfigError("sources: two sources share a name")
    for src in s.sources:
        if src.fallback_for and (src.fallback_for == src.name or src.fallback_for not in names):
            raise ConfigError(f"sources.{src.name}.fallback_for: {src.fallback_for!r} is not another source")
        if src.kind not in ("inotify", "poll", "xrootd"):
            raise ConfigError(f"sources.{src.name}.kind: must be inotify, poll or xrootd, got {src.kind!r}")
    if s.broker.max_queue_length < 0:
        raise ConfigError("broker.max_queue_length: must be 0 (unbounded) or positive")
    if s.dispatcher.batch_size < 1:
        raise ConfigError("dispatcher.batch_size: must be at least 1")
    linger = s.dispatcher.heartbeat_linger_s
    if not (math.isfinite(linger) and 0.0 <= linger < s.dispatcher.heartbeat_timeout_s):
        raise ConfigError(f"dispatcher.heartbeat_linger_s: must be 0 or more seconds, less than "
                          f"dispatcher.heartbeat_timeout_s, got {linger}")
    split_bind(s.web.bind)
    if not 1 <= s.web.workers <= 64:
        raise ConfigError(f"web.workers: must be from 1 to 64, got {s.web.workers}")
    if s.web.nominal_pilots < 0:
        raise ConfigError("web.nominal_pilots: must be 0 (no check) or positive")
    if not (math.isfinite(s.web.refresh_s) and s.web.refresh_s > 0):
        raise ConfigError(f"web.refresh_s: must be a positive number of seconds, got {s.web.refresh_s}")
    if not (math.isfinite(s.web.cache_s) and s.web.cache_s >= 0):
        raise ConfigError(f"web.cache_s: must be 0 (nothing shared) or a positive number of seconds, "
                          f"got {s.web.cache_s}")
    for key, limit in dataclasses.asdict(s.templates).items():
        if not limit > 0:
            raise ConfigError(f"templates.{key}: must be positive, got {limit}")
    _validate_results(s.results)


def _validate_results(r: ResultsSettings) -> None:
    from p3s.results.runs import compile_pattern

    for stream, pattern in r.run_patterns.items():
        compile_pattern(f"results.run_patterns.{stream}", pattern)
    for template, metrics in r.ranges.items():
        for metric, bounds in metrics.items():
            if len(bounds) != 2 or math.isnan(bounds[0]) or math.isnan(bounds[1]) or bounds[0] > bounds[1]:
                raise ConfigError(f"results.ranges.{template}.{metric}: expected [low, high] with low <= high, "
                                  f"got {list(bounds)}")
    if not (math.isfinite(r.retention_days) and r.retention_days > 0):
        raise ConfigError(f"results.retention_days: must be a positive number of days, got {r.retention_days}")
    if r.manifest_max_bytes < 1:
        raise ConfigError("results.manifest_max_bytes: must be positive")


def _validate_broker(b: BrokerSettings) -> None:
    urls = split_urls(b.url)
    for url in urls:
        if ";" in url or not url:
            raise ConfigError(f"broker.url: {mask_url(b.url)!r}: a ';' may only separate two node URLs "
                              "(write a ';' in a password as %3B)")
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in BROKER_SCHEMES or (scheme == "memory" and len(urls) > 1):
            raise ConfigError(
                f"broker.url: {mask_url(url)!r} is not a broker URL p3s can use: it must start with "
                "amqp:// or amqps:// (RabbitMQ; several nodes separated by ';'), or be empty for the embedded broker"
            )
    if b.failover_strategy not in FAILOVER_STRATEGIES:
        raise ConfigError(f"broker.failover_strategy: must be one of {', '.join(FAILOVER_STRATEGIES)}, "
                          f"got {b.failover_strategy!r}")
    if b.queue_type not in QUEUE_TYPES:
        raise ConfigError(f"broker.queue_type: must be one of {', '.join(QUEUE_TYPES)}, got {b.queue_type!r}")


# -- writing settings back as TOML ---------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(settings: Settings, masked: bool = True) -> str:
    """The settings as a TOML file that ``load_settings`` reads back to the same settings.

    Passwords written in a URL are masked unless ``masked`` is false (such a
    file then loads with ``***`` as the password: keep passwords in
    ``password_file``).  The effective values computed from the settings
    (paths, URLs) follow as comments.
    """
    # Not to_dict: its effective URLs read the password files, which this file must not need.
    data = _plain(dataclasses.asdict(dataclasses.replace(settings, sampling=dict(settings.sampling))))
    if masked:
        data["broker"]["url"] = mask_url(settings.broker.url)
        data["database"]["url"] = mask_url(settings.database.url)
    data.pop("source_file", None)
    effective = {
        "state_dir": str(settings.state_path),
        "output_root": str(settings.output_path),
        "log_root": str(settings.log_path),
        "broker": "embedded (in-process)" if settings.broker.embedded else mask_url(settings.broker.url),
    }
    lines = [f"# p3s settings{' from ' + settings.source_file if settings.source_file else ''}", ""]
    tables: list[tuple[str, Mapping[str, Any]]] = []
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for key, value in data.items():
        if key == "sources":
            arrays.append((key, value))
        elif isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, table in tables:
        lines += ["", f"[{_toml_key(key)}]"]
        lines += [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in table.items()]
    for key, items in arrays:
        for item in items:
            lines += ["", f"[[{_toml_key(key)}]]"]
            lines += [f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in item.items()]
    lines += ["", "# effective values, computed from the settings above (not settings themselves):"]
    lines += [f"#   {k} = {_toml_value(v)}" for k, v in effective.items()]
    return "\n".join(lines) + "\n"
