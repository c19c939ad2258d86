"""Process settings: one frozen object, built once, passed down explicitly.

Layering, lowest to highest precedence::

    defaults  <  TOML file ([breastai] table)  <  BREASTAI_* environment  <  CLI flags

Only :func:`settings_from_args` sees the environment, and it receives it as
an argument; core code never reads ``os.environ``. Every invalid value is
refused with a :class:`~service.errors.ConfigurationError` that names it,
so the process refuses to start instead of failing on the first study.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.errors import ConfigurationError
from service.image_limits import DEFAULT_MAX_DECODED_MB, DEFAULT_MAX_FRAME_MEGAPIXELS, ImageLimits
from service.peers import AllowedPeer, parse_allowed_peer

ENV_PREFIX = "BREASTAI_"

QueueKind = Literal["embedded", "rabbitmq"]
LogFormat = Literal["json", "console"]
DestinationKind = Literal["dicom", "folder"]
InferenceBackend = Literal["auto", "tensorrt", "cuda", "cpu"]

_QUEUE_KINDS: tuple[str, ...] = ("embedded", "rabbitmq")
_LOG_FORMATS: tuple[str, ...] = ("json", "console")
_LOG_LEVELS: tuple[str, ...] = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# models.inference.backends.BACKEND_CHOICES: service does not import models, so the names are repeated here (and a
# unit test holds the two lists equal).
INFERENCE_BACKENDS: tuple[str, ...] = ("auto", "tensorrt", "cuda", "cpu")

# "AE@host:port"; the host may be a bracketed IPv6 literal.
_DICOM_DESTINATION = re.compile(r"^(?P<ae>[^@]+)@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\[\]]+):(?P<port>[0-9]+)$")


def validate_ae_title(value: str, what: str = "AE title") -> str:
    """Check an Application Entity title against the AE value representation.

    DICOM PS3.5 §6.2 (VR "AE"): at most 16 characters of the default
    character repertoire, no backslash, no control characters, and not only
    spaces (leading and trailing spaces are not significant).

    Returns
    -------
    str
        ``value`` unchanged, so that the call can be used inline.

    Raises
    ------
    ConfigurationError
        Naming ``what`` and the bad value.
    """
    if not value.strip():
        raise ConfigurationError(f"{what} must not be empty: {value!r}")
    if len(value) > 16:
        raise ConfigurationError(f"{what} is longer than 16 characters (PS3.5 AE VR): {value!r}")
    if "\\" in value or any(ord(ch) < 0x20 or ord(ch) > 0x7E for ch in value):
        raise ConfigurationError(f"{what} has a backslash or a non-printable/non-ASCII character: {value!r}")
    return value


def _validate_port(value: int, what: str, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if not low <= value <= 65535:
        raise ConfigurationError(f"{what} must be in {low}..65535: {value!r}")


@dataclass(frozen=True)
class Destination:
    """Where results are sent: a DICOM node (C-STORE SCP) or a local folder.

    Attributes
    ----------
    kind
        ``"dicom"`` (PS3.7 C-STORE to ``ae_title`` at ``host:port``) or
        ``"folder"`` (result files written under ``path``).
    """

    kind: DestinationKind
    ae_title: str = ""
    host: str = ""
    port: int = 0
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.kind == "dicom":
            validate_ae_title(self.ae_title, "destination AE title")
            if not self.host:
                raise ConfigurationError(f"destination {self.ae_title!r} has no host")
            _validate_port(self.port, f"destination port of {self.ae_title!r}")
        elif self.kind == "folder":
            if self.path is None or not str(self.path).strip():
                raise ConfigurationError("a folder destination needs a path")
        else:
            raise ConfigurationError(f"unknown destination kind {self.kind!r}, expected 'dicom' or 'folder'")

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``"AE@host:port"`` (a DICOM node) or a folder path.

        Raises
        ------
        ConfigurationError
            If the text looks like a DICOM node (contains ``@``) but does not
            parse, or names an invalid AE title or port, or is empty.
        """
        text = text.strip()
        if not text:
            raise ConfigurationError("empty destination")
        if "@" in text:
            match = _DICOM_DESTINATION.match(text)
            if match is None:
                raise ConfigurationError(f"destination {text!r} is not of the form AE@host:port")
            host = match["host"]
            if host.startswith("["):
                host = host[1:-1]
            try:
                return cls(kind="dicom", ae_title=match["ae"], host=host, port=int(match["port"]))
            except ConfigurationError as exc:
                raise ConfigurationError(f"destination {text!r}: {exc}") from exc
        return cls(kind="folder", path=Path(text))

    def __str__(self) -> str:
        if self.kind == "dicom":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{self.ae_title}@{host}:{self.port}"
        return str(self.path)


def _default_destinations() -> tuple[Destination, ...]:
    return (Destination(kind="folder", path=Path("var/results")),)


@dataclass(frozen=True)
class Settings:
    """Everything the service needs to run, validated at construction.

    Attributes
    ----------
    ae_title
        Our AE title as Storage SCP (PS3.8 A-ASSOCIATE called AE title).
    port, bind_address
        Where the listener accepts associations.
    allowed_ae
        Calling AE titles that may associate, each ``AE`` or ``AE@host``
        (an address, a CIDR network or a host name: service.peers); empty
        accepts any.
    destinations
        Where results go; never empty.
    quiet_period_s
        A study is complete once every association that delivered to it has
        released and no instance arrived for this long.
    stable_age_s
        Fallback: a study whose newest instance is this old is complete even
        if an association never released.
    spool_dir
        Root of the durable spool shared by listener and workers.
    queue, amqp_url, queue_name
        Which job queue, and for RabbitMQ where and under which name.
    metrics_port, metrics_address
        Prometheus exposition; port 0 turns it off.
    log_format, log_level
        Structured logging to stderr.
    max_instance_mb
        Larger C-STORE data sets are refused with 0xA700 (out of resources).
    max_associations
        Concurrent associations the listener accepts; more are rejected
        (transient: local limit exceeded, PS3.8 7.1.1.3), so a flood of
        senders cannot exhaust memory or threads.
    max_pdu_kb
        The Maximum Length Received we announce (PS3.8 D.1.1): senders cut
        data sets into P-DATA PDUs of at most this size. Larger PDUs cost
        less CPU per instance (a 1 MB image in 16 KB PDUs is 64 of them);
        each association buffers at most one.
    listener_processes
        Processes that receive associations on the listener's one port
        (service.receivers): a Python process receives on about one core,
        whatever the associations. 1 receives in the process that tracks
        and seals studies; N > 1 starts N receiver processes beside it,
        each accepting up to ``max_associations``. 0 (the default) chooses
        (service.receivers.receiver_processes): one per available core, at
        most 4, for ``breastai listen``; 1 for ``breastai serve``, whose
        worker needs the cores.
    tls_cert_file, tls_key_file, tls_ca_file, tls_require_client_cert, tls_destinations
        DICOM TLS (service.tls): the listener serves TLS only once a
        certificate and key are set, and requires senders' certificates
        signed by the CA file if asked; results go over TLS with
        ``tls_destinations``, the PACS verified against the CA file.
    keep_delivered_hours
        How long a delivered study's instances and report stay in the spool,
        so that instances arriving later give one revised report over the
        whole study that names the first (0: a report of their own).
    spool_reserve_mb
        Space kept free on the spool's disk: below it new instances get
        0xA700, and finishing work may use it when the disk fills anyway.
    spool_quota_mb
        The most the spool's unreported work may take (incoming, sealed and
        dead-lettered studies; delivered ones kept for a revision are bounded
        by ``keep_delivered_hours``); past it new instances get 0xA700 until
        the workers drain it. 0: bounded by the disk and ``spool_reserve_mb``.
    max_frame_megapixels, max_decoded_mb
        Images that declare larger frames, or more decoded bytes in all, are
        refused with 0xC211 before any pixel is decoded (service.image_limits).
    send_retries, send_backoff_s
        Result C-STORE retries towards destinations.
    model_dir
        Model weights; ``None`` uses the bundled reference models.
    job_retry_limit
        Deliveries of a job that fails transiently before it is dead-lettered.
    us_families
        Model families run on each ultrasound lesion, in report order (manifest
        roles such as ``dlr_bm``); empty uses the model folder's default list.
    inference_backend
        Where the models run (models.inference.backends): ``auto`` (TensorRT
        with a GPU, else ONNX Runtime's CUDA provider with a GPU, else the
        CPU), or ``tensorrt``, ``cuda``, ``cpu``, which refuse to start where
        they cannot run.
    engine_cache_dir
        TensorRT engines built from the model files, kept between starts.
    inference_max_batch, inference_max_wait_ms
        Calls of one model from concurrent jobs are run together, up to this
        many items, the first waiting at most this long for the others; 1 runs
        every item on its own (models.inference.batching).
    worker_concurrency
        Jobs one worker process runs at once, sharing its loaded models (each
        RabbitMQ consumer on its own connection); 1 runs one at a time.
    image_concurrency
        Images of one study a job analyses at once, each on a thread of its
        own (workers.consumer.process_study): one image's host work runs
        beside another's networks, and their calls of a model can be batched.
        1 analyses them one after the other.
    """

    ae_title: str = "BREASTAI"
    port: int = 11112
    bind_address: str = "0.0.0.0"
    allowed_ae: tuple[str, ...] = ()
    destinations: tuple[Destination, ...] = field(default_factory=_default_destinations)
    quiet_period_s: float = 5.0
    stable_age_s: float = 60.0
    spool_dir: Path = Path("var/spool")
    queue: QueueKind = "embedded"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    queue_name: str = "breastai.studies"
    metrics_port: int = 9464
    metrics_address: str = "0.0.0.0"
    log_format: LogFormat = "json"
    log_level: str = "INFO"
    max_instance_mb: int = 512
    max_associations: int = 16
    max_pdu_kb: int = 1024
    listener_processes: int = 0
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    tls_require_client_cert: bool = False
    tls_destinations: bool = False
    keep_delivered_hours: float = 24.0
    spool_reserve_mb: int = 64
    spool_quota_mb: int = 0
    max_frame_megapixels: int = DEFAULT_MAX_FRAME_MEGAPIXELS
    max_decoded_mb: int = DEFAULT_MAX_DECODED_MB
    send_retries: int = 5
    send_backoff_s: float = 2.0
    model_dir: Path | None = None
    job_retry_limit: int = 30
    us_families: tuple[str, ...] = ()
    inference_backend: InferenceBackend = "auto"
    engine_cache_dir: Path = Path("var/engines")
    inference_max_batch: int = 1
    inference_max_wait_ms: float = 2.0
    worker_concurrency: int = 1
    image_concurrency: int = 2

    @property
    def allowed_peers(self) -> tuple[AllowedPeer, ...]:
        """The allow-list with host names resolved now (service.peers); empty admits every caller."""
        return tuple(parse_allowed_peer(entry) for entry in self.allowed_ae)

    @property
    def image_limits(self) -> ImageLimits:
        """The largest frame and instance the listener accepts and a worker decodes (service.image_limits)."""
        return ImageLimits(self.max_frame_megapixels, self.max_decoded_mb)

    def __post_init__(self) -> None:
        validate_ae_title(self.ae_title, "ae_title")
        _validate_port(self.port, "port")
        _validate_port(self.metrics_port, "metrics_port", allow_zero=True)
        for entry in self.allowed_ae:
            validate_ae_title(entry.partition("@")[0].strip(), "allowed_ae entry's AE title")
            parse_allowed_peer(entry, resolve=False)
        if not self.destinations:
            raise ConfigurationError("at least one destination is required")
        for dest in self.destinations:
            if not isinstance(dest, Destination):
                raise ConfigurationError(f"destinations must be Destination objects, got {dest!r}")
        if not self.bind_address:
            raise ConfigurationError("bind_address must not be empty")
        if self.quiet_period_s < 0:
            raise ConfigurationError(f"quiet_period_s must be >= 0: {self.quiet_period_s!r}")
        if self.stable_age_s <= 0 or self.stable_age_s < self.quiet_period_s:
            raise ConfigurationError(
                f"stable_age_s must be > 0 and >= quiet_period_s ({self.quiet_period_s!r}): {self.stable_age_s!r}"
            )
        if self.queue not in _QUEUE_KINDS:
            raise ConfigurationError(f"queue must be one of {_QUEUE_KINDS}: {self.queue!r}")
        if not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise ConfigurationError(f"amqp_url must start with amqp:// or amqps://: {_redact_url(self.amqp_url)!r}")
        if not re.match(r"^[A-Za-z0-9_.:-]{1,200}$", self.queue_name) or self.queue_name.startswith("amq."):
            raise ConfigurationError(f"queue_name must be 1-200 of [A-Za-z0-9_.:-], not 'amq.*': {self.queue_name!r}")
        if self.log_format not in _LOG_FORMATS:
            raise ConfigurationError(f"log_format must be one of {_LOG_FORMATS}: {self.log_format!r}")
        if self.log_level not in _LOG_LEVELS:
            raise ConfigurationError(f"log_level must be one of {_LOG_LEVELS}: {self.log_level!r}")
        if self.max_instance_mb <= 0:
            raise ConfigurationError(f"max_instance_mb must be > 0: {self.max_instance_mb!r}")
        if self.max_associations < 1:
            raise ConfigurationError(f"max_associations must be >= 1: {self.max_associations!r}")
        if self.keep_delivered_hours < 0:
            raise ConfigurationError(f"keep_delivered_hours must be >= 0: {self.keep_delivered_hours!r}")
        if not 16 <= self.max_pdu_kb <= 16384:
            raise ConfigurationError(f"max_pdu_kb must be in 16..16384: {self.max_pdu_kb!r}")
        if not 0 <= self.listener_processes <= 64:
            raise ConfigurationError(f"listener_processes must be in 0..64 (0: chosen): {self.listener_processes!r}")
        if self.spool_quota_mb < 0:
            raise ConfigurationError(f"spool_quota_mb must be >= 0: {self.spool_quota_mb!r}")
        if self.spool_reserve_mb < 0:
            raise ConfigurationError(f"spool_reserve_mb must be >= 0: {self.spool_reserve_mb!r}")
        if self.max_frame_megapixels <= 0:
            raise ConfigurationError(f"max_frame_megapixels must be > 0: {self.max_frame_megapixels!r}")
        if self.max_decoded_mb <= 0:
            raise ConfigurationError(f"max_decoded_mb must be > 0: {self.max_decoded_mb!r}")
        if self.send_retries < 0:
            raise ConfigurationError(f"send_retries must be >= 0: {self.send_retries!r}")
        if self.send_backoff_s < 0:
            raise ConfigurationError(f"send_backoff_s must be >= 0: {self.send_backoff_s!r}")
        if self.job_retry_limit < 1:
            raise ConfigurationError(f"job_retry_limit must be >= 1: {self.job_retry_limit!r}")
        if self.inference_backend not in INFERENCE_BACKENDS:
            raise ConfigurationError(
                f"inference_backend must be one of {INFERENCE_BACKENDS}: {self.inference_backend!r}"
            )
        if not 1 <= self.inference_max_batch <= 256:
            raise ConfigurationError(f"inference_max_batch must be in 1..256: {self.inference_max_batch!r}")
        if not 0 <= self.inference_max_wait_ms <= 1000:
            raise ConfigurationError(f"inference_max_wait_ms must be in 0..1000: {self.inference_max_wait_ms!r}")
        if not 1 <= self.worker_concurrency <= 64:
            raise ConfigurationError(f"worker_concurrency must be in 1..64: {self.worker_concurrency!r}")
        if not 1 <= self.image_concurrency <= 64:
            raise ConfigurationError(f"image_concurrency must be in 1..64: {self.image_concurrency!r}")


def _redact_url(url: str) -> str:
    # Never echo a broker password back into an error message or a log line.
    return re.sub(r"//([^:/@]+):([^@/]*)@", r"//\1:***@", url)


# --- string / TOML value conversion -------------------------------------------------


def _to_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigurationError(f"{name} must be an integer: {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer: {value!r}") from None


def _to_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigurationError(f"{name} must be a number: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value).strip())
    except ValueError:
        raise ConfigurationError(f"{name} must be a number: {value!r}") from None


def _to_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string: {value!r}")
    return value.strip()


def _to_path(name: str, value: Any) -> Path:
    text = _to_str(name, value)
    if not text:
        raise ConfigurationError(f"{name} must not be empty")
    return Path(text)


def _to_bool(name: str, value: Any) -> bool:
    # TOML gives booleans; the environment gives text.
    if isinstance(value, bool):
        return value
    text = _to_str(name, value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"{name} must be true or false: {value!r}")


def _to_optional_path(name: str, value: Any) -> Path | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _to_path(name, value)


def _to_str_list(name: str, value: Any) -> tuple[str, ...]:
    # Environment values are comma separated; TOML values are arrays (or one string).
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [_to_str(name, item) for item in value]
    else:
        raise ConfigurationError(f"{name} must be a list of strings: {value!r}")
    return tuple(item for item in items if item)


def _to_destinations(name: str, value: Any) -> tuple[Destination, ...]:
    return tuple(Destination.parse(item) for item in _to_str_list(name, value))


def _to_upper(name: str, value: Any) -> str:
    return _to_str(name, value).upper()


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "ae_title": _to_str,
    "port": _to_int,
    "bind_address": _to_str,
    "allowed_ae": _to_str_list,
    "us_families": _to_str_list,
    "destinations": _to_destinations,
    "quiet_period_s": _to_float,
    "stable_age_s": _to_float,
    "spool_dir": _to_path,
    "queue": _to_str,
    "amqp_url": _to_str,
    "queue_name": _to_str,
    "metrics_port": _to_int,
    "metrics_address": _to_str,
    "log_format": _to_str,
    "log_level": _to_upper,
    "max_instance_mb": _to_int,
    "max_associations": _to_int,
    "tls_cert_file": _to_optional_path,
    "tls_key_file": _to_optional_path,
    "tls_ca_file": _to_optional_path,
    "tls_require_client_cert": _to_bool,
    "tls_destinations": _to_bool,
    "keep_delivered_hours": _to_float,
    "spool_reserve_mb": _to_int,
    "spool_quota_mb": _to_int,
    "max_pdu_kb": _to_int,
    "listener_processes": _to_int,
    "max_frame_megapixels": _to_int,
    "max_decoded_mb": _to_int,
    "send_retries": _to_int,
    "send_backoff_s": _to_float,
    "model_dir": _to_optional_path,
    "job_retry_limit": _to_int,
    "inference_backend": _to_str,
    "engine_cache_dir": _to_path,
    "inference_max_batch": _to_int,
    "inference_max_wait_ms": _to_float,
    "worker_concurrency": _to_int,
    "image_concurrency": _to_int,
}

# The environment name of a field is BREASTAI_<FIELD_UPPER>, except for the
# list of destinations, which is named like its (repeatable) flag.
_ENV_NAMES: dict[str, str] = {name: ENV_PREFIX + name.upper() for name in _CONVERTERS}
_ENV_NAMES["destinations"] = ENV_PREFIX + "DESTINATION"
CONFIG_ENV = ENV_PREFIX + "CONFIG"

assert set(_CONVERTERS) == {f.name for f in dataclasses.fields(Settings)}, "every Settings field needs a converter"


def env_name(field_name: str) -> str:
    """The ``BREASTAI_*`` environment variable that sets ``field_name``."""
    return _ENV_NAMES[field_name]


def _default_text(field_name: str) -> str:
    value = getattr(Settings(), field_name)
    if isinstance(value, tuple):
        return ",".join(str(item) for item in value) or "(none)"
    if value is None:
        return "(bundled)"
    return str(value)


def load_toml(path: Path) -> dict[str, Any]:
    """Read the ``[breastai]`` table of a TOML file, converted to field values.

    Raises
    ------
    ConfigurationError
        If the file is unreadable, not TOML, lacks the table, or has keys
        that are not settings.
    """
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigurationError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    table = document.get("breastai")
    if not isinstance(table, dict):
        raise ConfigurationError(f"config file {str(path)!r} has no [breastai] table")
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in _CONVERTERS:
            raise ConfigurationError(f"config file {str(path)!r}: unknown setting {key!r}")
        values[key] = _CONVERTERS[key](key, raw)
    return values


def load_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    """Field values from ``BREASTAI_*`` variables (unknown ones are ignored).

    Unknown ``BREASTAI_*`` names are left alone because other parts of the
    deployment may share the prefix.
    """
    values: dict[str, Any] = {}
    for name, variable in _ENV_NAMES.items():
        if variable in environ:
            values[name] = _CONVERTERS[name](variable, environ[variable])
    return values


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the settings flags to ``parser``.

    Every flag defaults to ``None`` (argparse's "not given"), so that
    :func:`settings_from_args` can tell a flag from the lower layers.
    """
    group = parser.add_argument_group("service settings")

    def helptext(text: str, field_name: str) -> str:
        # argparse %-formats help strings; the default AMQP URL contains "%2F".
        default = _default_text(field_name).replace("%", "%%")
        return f"{text} [env {env_name(field_name)}; default {default}]"

    group.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"TOML file with a [breastai] table [env {CONFIG_ENV}; default none]",
    )
    group.add_argument("--port", type=int, help=helptext("DICOM listener port", "port"))
    group.add_argument("--bind-address", help=helptext("DICOM listener bind address", "bind_address"))
    group.add_argument("--ae-title", help=helptext("our AE title (Storage SCP)", "ae_title"))
    group.add_argument(
        "--destination",
        action="append",
        metavar="AE@HOST:PORT|FOLDER",
        help=helptext("result destination, repeatable (comma separated in env)", "destinations"),
    )
    group.add_argument(
        "--quiet-period",
        type=float,
        metavar="SECONDS",
        help=helptext("seconds without new instances before a released study is complete", "quiet_period_s"),
    )
    group.add_argument(
        "--allowed-ae",
        action="append",
        metavar="AE[@HOST]",
        help=helptext(
            "calling AE title allowed to associate, optionally bound to a host, address or CIDR network; "
            "repeatable; none = any",
            "allowed_ae",
        ),
    )
    group.add_argument("--spool-dir", type=Path, help=helptext("durable spool directory", "spool_dir"))
    group.add_argument("--queue", choices=_QUEUE_KINDS, help=helptext("job queue", "queue"))
    group.add_argument("--amqp-url", help=helptext("RabbitMQ URL", "amqp_url"))
    group.add_argument("--metrics-port", type=int, help=helptext("Prometheus port, 0 = off", "metrics_port"))
    group.add_argument("--log-format", choices=_LOG_FORMATS, help=helptext("log format", "log_format"))
    group.add_argument("--log-level", type=str.upper, choices=_LOG_LEVELS, help=helptext("log level", "log_level"))
    group.add_argument("--model-dir", type=Path, help=helptext("model weights directory", "model_dir"))
    group.add_argument(
        "--inference-backend",
        choices=INFERENCE_BACKENDS,
        help=helptext("where the models run: auto picks TensorRT, then CUDA, then the CPU", "inference_backend"),
    )
    group.add_argument(
        "--worker-concurrency",
        type=int,
        metavar="JOBS",
        help=helptext("jobs one worker process runs at once, sharing its models", "worker_concurrency"),
    )
    group.add_argument(
        "--image-concurrency",
        type=int,
        metavar="IMAGES",
        help=helptext("images of one study analysed at once, on a thread each", "image_concurrency"),
    )
    group.add_argument(
        "--us-families",
        action="append",
        metavar="ROLE",
        help=helptext(
            "model family run on ultrasound lesions, repeatable, in report order "
            "(comma separated in env); none = the model folder's default",
            "us_families",
        ),
    )


# argparse destination -> Settings field, for the flags add_settings_arguments adds.
_FLAG_FIELDS: dict[str, str] = {
    "port": "port",
    "bind_address": "bind_address",
    "ae_title": "ae_title",
    "destination": "destinations",
    "quiet_period": "quiet_period_s",
    "allowed_ae": "allowed_ae",
    "spool_dir": "spool_dir",
    "queue": "queue",
    "amqp_url": "amqp_url",
    "metrics_port": "metrics_port",
    "log_format": "log_format",
    "log_level": "log_level",
    "model_dir": "model_dir",
    "us_families": "us_families",
    "inference_backend": "inference_backend",
    "worker_concurrency": "worker_concurrency",
    "image_concurrency": "image_concurrency",
}


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """Build the one :class:`Settings` from defaults, file, environment and flags.

    Parameters
    ----------
    args
        Parsed flags from a parser prepared with :func:`add_settings_arguments`.
    environ
        The process environment (passed in so that core code never reads it).

    Raises
    ------
    ConfigurationError
        For any invalid value, naming it.
    """
    values: dict[str, Any] = {}
    config_path: Path | None = getattr(args, "config", None)
    if config_path is None and environ.get(CONFIG_ENV, "").strip():
        config_path = Path(environ[CONFIG_ENV].strip())
    if config_path is not None:
        values.update(load_toml(config_path))
    values.update(load_environment(environ))
    for dest, name in _FLAG_FIELDS.items():
        given = getattr(args, dest, None)
        if given is None:
            continue
        if isinstance(given, list):
            values[name] = _CONVERTERS[name]("--" + dest.replace("_", "-"), given)
        else:
            values[name] = _CONVERTERS[name](
                "--" + dest.replace("_", "-"), given if isinstance(given, (int, float)) else str(given)
            )
    try:
        return Settings(**values)
    except TypeError as exc:  # a wrong type that slipped past a converter
        raise ConfigurationError(f"invalid settings: {exc}") from exc
