"""Every setting, read once from the environment and the command line into a frozen object.

No other module reads ``os.environ``. Each field's environment variable is its upper-case
name; its flag is the same name in kebab case (``KAFKA_TOPIC`` <-> ``--kafka-topic``), and
flags win. A bad value raises :class:`~worker.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

import orjson

from worker.errors import ConfigError

IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")  # used with fullmatch
# Enumerated settings: each value one of its Literal's (matched without regard to case).
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
VectorType = Literal["vector", "halfvec"]
Encoding = Literal["base64", "float"]
LogLevel = Literal["debug", "info", "warning", "error"]
ChunkUnit = Literal["chars", "tokens"]
Tokenizer = Literal["cl100k_base", "bytes"]
ENUMERATED: Final[dict[str, Any]] = {
    "SecurityProtocol": SecurityProtocol,
    "SaslMechanism": SaslMechanism,
    "VectorType": VectorType,
    "Encoding": Encoding,
    "LogLevel": LogLevel,
    "ChunkUnit": ChunkUnit,
    "Tokenizer": Tokenizer,
}
MAX_INDEXED_DIMENSIONS: Final[dict[str, int]] = {"vector": 2000, "halfvec": 4000}  # HNSW's limits


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('**********')" if self._value else "Secret('')"

    __str__ = __repr__


NO_SECRET: Final = Secret("")
LOCAL_DATABASE: Final = Secret("postgresql://postgres@127.0.0.1:5432/postgres")


def _setting(default: Any, help: str, **bounds: Any) -> Any:
    return field(default=default, metadata={"help": help, **bounds})


@dataclass(frozen=True, kw_only=True)
class Settings:
    # Kafka
    kafka_bootstrap_servers: str = _setting("127.0.0.1:9092", "comma-separated host:port list")
    kafka_topic: tuple[str, ...] = _setting(
        ("documents",), "topic(s) to consume (produce publishes to the first); comma list"
    )
    kafka_group_id: str = _setting("embedding-ingest", "consumer group id")
    kafka_dlq_topic: str = _setting("", "dead-letter topic [<first topic>.dlq]")
    kafka_security_protocol: SecurityProtocol = _setting("PLAINTEXT", "/".join(get_args(SecurityProtocol)))
    kafka_sasl_mechanism: SaslMechanism = _setting("", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    kafka_sasl_username: str = _setting("", "SASL user name")
    kafka_sasl_password: Secret = _setting(NO_SECRET, "SASL password")
    kafka_sasl_password_file: str = _setting("", "file holding the SASL password (a mounted Secret)")
    kafka_ssl_cafile: str = _setting("", "CA bundle for SSL/SASL_SSL (system default if empty)")
    kafka_ssl_certfile: str = _setting(
        "", "client certificate (PEM) for SSL/SASL_SSL, for a broker that asks for one (mTLS)"
    )
    kafka_ssl_keyfile: str = _setting("", "its private key (PEM, unencrypted), if not in KAFKA_SSL_CERTFILE")
    kafka_producer_idempotence: bool = _setting(True, "idempotent dead-letter/produce producer")
    kafka_max_poll_records: int = _setting(500, "records fetched per poll", low=1, high=100_000)
    kafka_max_partition_fetch_bytes: int = _setting(
        1_048_576, "fetch size per partition, and per fetch response", low=1024, high=1 << 30
    )
    kafka_group_instance_id: str = _setting(
        "", "static membership (KIP-345): a restart within the session timeout causes no rebalance"
    )
    kafka_session_timeout_ms: int = _setting(45_000, "group session timeout", low=1000, high=3_600_000)
    kafka_max_poll_interval_ms: int = _setting(
        300_000, "longest a batch may take before the group evicts us", low=1000, high=86_400_000
    )
    # PostgreSQL
    database_url: Secret = _setting(
        LOCAL_DATABASE, "libpq URL (sslmode, sslrootcert, sslcert and sslkey honoured)"
    )
    database_password_file: str = _setting(
        "", "file holding the database password (a mounted Secret), for a DATABASE_URL without one"
    )
    database_schema: str = _setting("public", "schema of the documents and chunks tables")
    database_pool_size: int = _setting(4, "asyncpg pool size", low=1, high=1000)
    database_statement_cache_size: int = _setting(
        100, "prepared statements cached per connection; 0 behind pgbouncer", low=0, high=100_000
    )
    vector_type: VectorType = _setting("vector", "pgvector column type: vector or halfvec")
    # Embedding API
    embedding_url: str = _setting("http://127.0.0.1:8000/v1", "base URL of an OpenAI-compatible API")
    embedding_model: str = _setting("text-embedding-3-small", "model name sent with each request")
    embedding_dimensions: int = _setting(1536, "vector dimensions", low=1, high=16_000)
    embedding_send_dimensions: bool = _setting(True, "send `dimensions` in requests")
    embedding_api_key: Secret = _setting(NO_SECRET, "bearer token")
    embedding_api_key_file: str = _setting(
        "", "file holding the bearer token; read again on a 401, so a rotated key needs no restart"
    )
    embedding_batch_size: int = _setting(
        64,
        "inputs the batcher aims to fill each request with: fewer, larger requests; capped by "
        "EMBEDDING_MAX_INPUTS",
        low=1,
        high=2048,
    )
    embedding_max_inputs: int = _setting(
        2048,
        "most inputs the API accepts in one request (OpenAI 2048; text-embeddings-inference its "
        "--max-client-batch-size, 32 by default): a limit of the provider, not a goal",
        low=1,
        high=1_000_000,
    )
    embedding_extra_body: str = _setting(
        "",
        'JSON object merged into every embedding request\'s body, e.g. {"input_type": "document"}; '
        "not model, input, dimensions or encoding_format",
    )
    embedding_concurrency: int = _setting(4, "embedding requests in flight", low=1, high=1024)
    embedding_timeout: float = _setting(60.0, "seconds per embedding request", low=0.1, high=3600)
    embedding_encoding: Encoding = _setting("base64", "encoding_format asked for: base64 or float")
    embedding_batch_chars: int = _setting(
        100_000, "characters per embedding request at most", low=1000, high=10_000_000
    )
    embedding_tokenizer: Tokenizer = _setting(
        "cl100k_base", "how tokens are counted: cl100k_base (OpenAI's models) or bytes (never counts low)"
    )
    embedding_max_input_tokens: int = _setting(
        8191, "tokens per input at most; a longer chunk is split further", low=16, high=10_000_000
    )
    embedding_max_request_tokens: int = _setting(
        300_000, "tokens per embedding request at most", low=16, high=1_000_000_000
    )
    embedding_linger_ms: int = _setting(
        20, "wait this long to fill a request before sending it", low=0, high=10_000
    )
    embedding_adaptive: bool = _setting(
        True, "where the API sends no x-ratelimit-* headers, adapt concurrency to 429s and latency (AIMD)"
    )
    embedding_max_rpm: int = _setting(
        0, "requests per minute this process may send; 0 for no cap", low=0, high=10**9
    )
    embedding_max_tpm: int = _setting(
        0, "tokens (chars/4) per minute this process may send; 0 for no cap", low=0, high=10**12
    )
    embedding_retry_deadline_seconds: float = _setting(
        300.0,
        "a request failing this long while the API is up is isolated, then dead-lettered",
        low=1,
        high=86400,
    )
    embedding_max_attempts: int = _setting(
        5, "attempts per embedding request before pausing", low=1, high=100
    )
    embedding_price_per_mtok: float = _setting(
        0.02,
        "price per million tokens, for `usage`'s cost estimate (text-embedding-3-small's)",
        low=0,
        high=1e6,
    )
    embedding_ledger_hours: float = _setting(
        168.0,
        "keep each paid embedding not yet stored this long, so none is bought twice; 0: no ledger",
        low=0,
        high=87_600,
    )
    # Pipeline
    max_in_flight_records: int = _setting(
        1000, "records fetched but not yet stored; past it partitions pause", low=1, high=10_000_000
    )
    max_in_flight_bytes: int = _setting(
        16 * 1_048_576, "bytes of records in flight; past it partitions pause", low=1024, high=1 << 40
    )
    write_batch_documents: int = _setting(256, "documents per write transaction", low=1, high=100_000)
    database_writers: int = _setting(2, "write transactions in flight", low=1, high=64)
    commit_interval_ms: int = _setting(1000, "how often stored offsets are committed", low=10, high=600_000)
    index_build_memory: str = _setting("512MB", "maintenance_work_mem for the HNSW build after a backfill")
    # Chunking and limits
    chunk_unit: ChunkUnit = _setting("chars", "what CHUNK_SIZE and CHUNK_OVERLAP count: chars or tokens")
    chunk_size: int = _setting(1000, "characters (or tokens) per chunk", low=16, high=1_000_000)
    chunk_overlap: int = _setting(
        100, "characters (or tokens) shared by neighbouring chunks", low=0, high=1_000_000
    )
    max_text_bytes: int = _setting(1_048_576, "largest document text accepted", low=1, high=1 << 30)
    # Operations
    health_port: int = _setting(
        8080, "HTTP port for /healthz /readyz /metrics; 0 picks one", low=0, high=65535
    )
    log_level: LogLevel = _setting("info", "debug, info, warning or error")
    shutdown_grace_seconds: float = _setting(
        30.0,
        "on a stop or revoke: time to store what is ready; on a stop, also to receive the answers "
        "already paid for",
        low=0,
        high=3600,
    )
    startup_timeout_seconds: float = _setting(
        300.0,
        "start-up waits this long for an unreachable broker or database, then exits 1; 0: forever",
        low=0,
        high=86400,
    )

    loop_slow_callback_ms: int = _setting(
        0,
        "log each callback that holds the event loop longer (asyncio debug mode); 0: off",
        low=0,
        high=60_000,
    )
    debug_endpoints: bool = _setting(
        False, "serve GET /debug/memory (tracemalloc, which costs memory and speed)"
    )

    def __post_init__(self) -> None:
        def bad(name: str, message: str) -> ConfigError:
            return ConfigError(name.upper(), message)

        if not self.kafka_bootstrap_servers.strip():
            raise bad("kafka_bootstrap_servers", "must not be empty")
        if not self.kafka_topic or any(not t for t in self.kafka_topic):
            raise bad("kafka_topic", "must name at least one topic")
        if not self.kafka_group_id:
            raise bad("kafka_group_id", "must not be empty")
        if self.kafka_dlq_topic in self.kafka_topic:
            raise bad("kafka_dlq_topic", "must differ from the consumed topic")
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_mechanism:
            raise bad("kafka_sasl_mechanism", f"is required with {self.kafka_security_protocol}")
        url = _split_url(self.database_url.reveal(), "DATABASE_URL")
        if url.scheme not in ("postgres", "postgresql"):
            raise bad("database_url", "must be a postgresql:// URL")
        try:
            url.port  # noqa: B018 - parsing it is the check
        except ValueError:
            raise bad("database_url", "has a port that is not a number from 0 to 65535") from None
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise bad(name, f"{path} is not a readable file")
        if self.kafka_ssl_keyfile and not self.kafka_ssl_certfile:
            raise bad("kafka_ssl_keyfile", "is given without KAFKA_SSL_CERTFILE, its certificate")
        if self.kafka_ssl_certfile and self.kafka_security_protocol not in ("SSL", "SASL_SSL"):
            raise bad(
                "kafka_ssl_certfile",
                f"is used only over TLS, and KAFKA_SECURITY_PROTOCOL is {self.kafka_security_protocol}",
            )
        _check_tls_parameters(url)
        if not IDENTIFIER.fullmatch(self.database_schema):
            raise bad("database_schema", "must be a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*)")
        if self.embedding_dimensions > MAX_INDEXED_DIMENSIONS[self.vector_type]:
            raise bad(
                "embedding_dimensions",
                f"{self.embedding_dimensions} is more than an HNSW index on {self.vector_type} takes "
                f"({MAX_INDEXED_DIMENSIONS[self.vector_type]})"
                + ("; use VECTOR_TYPE=halfvec (up to 4000)" if self.vector_type == "vector" else ""),
            )
        emb = _split_url(self.embedding_url, "EMBEDDING_URL")
        if emb.scheme not in ("http", "https") or not emb.netloc:
            raise bad("embedding_url", "must be an http:// or https:// URL")
        if not self.embedding_model:
            raise bad("embedding_model", "must not be empty")
        self.extra_body  # noqa: B018 - parsing it is the check
        if self.chunk_overlap >= self.chunk_size // 2:
            raise bad("chunk_overlap", f"must be less than half of CHUNK_SIZE ({self.chunk_size})")
        if self.chunk_unit == "tokens" and self.chunk_size > self.embedding_max_input_tokens:
            raise bad(
                "chunk_size",
                f"{self.chunk_size} tokens is more than EMBEDDING_MAX_INPUT_TOKENS "
                f"({self.embedding_max_input_tokens})",
            )
        if self.embedding_max_input_tokens > self.embedding_max_request_tokens:
            raise bad(
                "embedding_max_input_tokens",
                f"must not exceed EMBEDDING_MAX_REQUEST_TOKENS ({self.embedding_max_request_tokens})",
            )
        if not re.fullmatch(r"[0-9]+\s*(kB|MB|GB)", self.index_build_memory):
            raise bad("index_build_memory", "must be a PostgreSQL size such as 512MB or 2GB")
        if self.database_writers > self.database_pool_size:
            raise bad("database_writers", f"must not exceed DATABASE_POOL_SIZE ({self.database_pool_size})")

    @property
    def dlq_topic(self) -> str:
        return self.kafka_dlq_topic or f"{self.kafka_topic[0]}.dlq"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value, so logs can mask them wherever they turn up: the key, the SASL
        password, and a password either URL carries (as written, and decoded; a password from
        DATABASE_PASSWORD_FILE is in DATABASE_URL by then)."""
        found = [self.api_key, self.kafka_sasl_password.reveal()]
        for url in (self.database_url.reveal(), self.embedding_url):
            password = _url_password(url)
            found += [password, urllib.parse.unquote(password)]
        return tuple(dict.fromkeys(s for s in found if s))

    def shown(self) -> dict[str, Any]:
        """Every setting as a start-up log line shows it: secrets as ``**********`` (a database
        URL keeps all but its password), lists joined with commas."""
        shown: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _URLS:
                value = _masked_url(value.reveal() if isinstance(value, Secret) else value)
            elif isinstance(value, Secret):
                value = "**********" if value else ""
            elif isinstance(value, tuple):
                value = ",".join(value)
            shown[f.name.upper()] = value
        return shown

    def environment(self) -> dict[str, str]:
        """These settings as the environment variables that give them (secrets revealed): for a
        child process that must run with exactly them, flags given to this one included."""
        found: dict[str, str] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                value = value.reveal()
            elif isinstance(value, tuple):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = str(value).lower()
            found[f.name.upper()] = str(value)
        return found

    @property
    def api_key(self) -> str:
        return self.embedding_api_key.reveal()

    @property
    def extra_body(self) -> dict[str, Any]:
        """EMBEDDING_EXTRA_BODY as an object: parsed here to check it, and once by the embedder."""
        return _json_object(self.embedding_extra_body)

    @classmethod
    def load(cls, environ: Mapping[str, str], flags: Mapping[str, str | None] | None = None) -> Settings:
        """Build settings from environment variables overlaid with command-line flags.

        ``flags`` maps field names to the raw strings given on the command line (None: not given).
        """
        raw: dict[str, str] = {}
        for f in dataclasses.fields(cls):
            value = (flags or {}).get(f.name)
            if value is None:
                value = environ.get(f.name.upper())
            if value is not None:
                raw[f.name] = value
        values = {name: _parse(name, text) for name, text in raw.items()}
        for secret, file_setting in SECRET_FILES.items():
            path = values.get(file_setting)
            if not path:
                continue
            text = read_secret_file(file_setting.upper(), path)  # the file wins over the variable
            if secret == "database_url":
                values[secret] = _with_password(values.get(secret, LOCAL_DATABASE), text)
            else:
                values[secret] = Secret(text)
        return cls(**values)


# Secrets that a file can give instead (a Kubernetes Secret mounted as files): secret -> its *_FILE.
SECRET_FILES: Final = {
    "embedding_api_key": "embedding_api_key_file",
    "kafka_sasl_password": "kafka_sasl_password_file",
    "database_url": "database_password_file",  # the password, put into the URL
}


def read_secret_file(setting: str, path: str) -> str:
    """A secret file's text without the line end a file usually has: ConfigError naming ``setting``
    when it cannot be read or is empty."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(setting, f"{path} is not UTF-8 text") from None
    if not text:
        raise ConfigError(setting, f"{path} is empty")
    return text


def _with_password(url: Secret, password: str) -> Secret:
    """DATABASE_URL with the password from DATABASE_PASSWORD_FILE, as libpq's ``password``
    parameter (in place of any the URL had), so that user and host stay as they were written."""
    parts = _split_url(url.reveal(), "DATABASE_URL")
    if parts.password is not None:
        parts = parts._replace(netloc=f"{parts.netloc.partition(':')[0]}@{parts.netloc.rpartition('@')[2]}")
    query = [
        (k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k != "password"
    ]
    query.append(("password", password))
    return Secret(urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query))))


_SSLMODES: Final = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_tls_parameters(url: urllib.parse.SplitResult) -> None:
    """DATABASE_URL's sslmode is one libpq knows, and the files it names are there."""
    query = dict(urllib.parse.parse_qsl(url.query))
    mode = query.get("sslmode")
    if mode is not None and mode not in _SSLMODES:
        named = ", ".join(_SSLMODES[:-1])
        raise ConfigError("DATABASE_URL", f"sslmode must be {named} or verify-full, got {mode!r}")
    for name in ("sslrootcert", "sslcert", "sslkey"):
        path = query.get(name)
        if path and path != "system" and not Path(path).expanduser().is_file():
            raise ConfigError("DATABASE_URL", f"{name}={path} is not a readable file")


def secrets_in(flags: Mapping[str, str | None]) -> list[str]:
    """The variables among ``flags`` (field name -> raw text, None: not given) whose value is a
    secret: the ``Secret`` settings, and the URLs (DATABASE_URL, EMBEDDING_URL) that carry a
    password."""
    found = []
    for f in dataclasses.fields(Settings):
        text = flags.get(f.name)
        if not text or not text.strip():
            continue
        secret = bool(_url_password(text)) if f.name in _URLS else f.type == "Secret"
        if secret:
            found.append(f.name.upper())
    return found


_URLS: Final = ("database_url", "embedding_url")


def _url_password(url: str) -> str:
    """A libpq URL's password: in its user info or as a ``password`` parameter."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        password = parts.password
    except ValueError:
        return ""
    return password or "".join(urllib.parse.parse_qs(parts.query).get("password", []))


def _masked_url(url: str) -> str:
    """``url`` with its password (in the user info, or a ``password`` parameter) as ``**********``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        parts = parts._replace(netloc=f"{parts.username or ''}:**********@{parts.netloc.rpartition('@')[2]}")
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "password" for key, _ in query):
        masked = [(key, "**********" if key == "password" else value) for key, value in query]
        parts = parts._replace(query=urllib.parse.urlencode(masked, safe="*/"))
    return urllib.parse.urlunsplit(parts)


# What the worker itself sends: another value in the extra body would give vectors that do not
# match the index's (another model, size or encoding), or no vectors of these texts at all.
RESERVED_BODY_FIELDS: Final = ("model", "input", "dimensions", "encoding_format")


def _json_object(text: str) -> dict[str, Any]:
    """EMBEDDING_EXTRA_BODY's object (``{}`` when empty), or the ConfigError saying what is wrong."""
    if not text.strip():
        return {}
    try:
        value = orjson.loads(text)  # what it parses, the request's orjson can send as it was
    except orjson.JSONDecodeError as exc:
        raise _bad_extra_body(f"is not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise _bad_extra_body(f"is a JSON {_JSON_KINDS.get(type(value), 'value')}, not an object")
    reserved = [key for key in RESERVED_BODY_FIELDS if key in value]
    if reserved:
        raise ConfigError(
            "EMBEDDING_EXTRA_BODY",
            f"must not set {', '.join(reserved)}: the worker sends model, input, dimensions and "
            "encoding_format itself (EMBEDDING_MODEL, EMBEDDING_DIMENSIONS, EMBEDDING_ENCODING), and "
            "vectors asked for otherwise would not match the index",
        )
    return value


_JSON_KINDS: Final = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _bad_extra_body(what: str) -> ConfigError:
    return ConfigError(
        "EMBEDDING_EXTRA_BODY", f'{what}; give a JSON object such as {{"input_type": "document"}}'
    )


def _split_url(url: str, setting: str) -> urllib.parse.SplitResult:
    try:
        return urllib.parse.urlsplit(url)
    except ValueError:
        raise ConfigError(setting, "is not a valid URL") from None


def describe() -> list[tuple[str, str, str]]:
    """(VARIABLE, default, help) for every setting: the CLI's flags and the README's table."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        if isinstance(default, tuple):
            shown = ",".join(default)
        elif isinstance(default, Secret):
            shown = "" if f.name != "database_url" else default.reveal()
        elif isinstance(default, bool):
            shown = str(default).lower()
        else:
            shown = str(default)
        rows.append((f.name.upper(), shown, f.metadata["help"]))
    return rows


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(name: str, text: str) -> Any:
    f = next(f for f in dataclasses.fields(Settings) if f.name == name)
    env = name.upper()
    kind = f.type
    text = text.strip()
    if kind == "bool":
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(env, f"must be true or false, got {text!r}")
    if kind in ("int", "float"):
        try:
            number: int | float = int(text) if kind == "int" else float(text)
        except ValueError:
            raise ConfigError(
                env, f"must be a{'n integer' if kind == 'int' else ' number'}, got {text!r}"
            ) from None
        low, high = f.metadata.get("low"), f.metadata.get("high")
        if low is not None and high is not None and not low <= number <= high:
            raise ConfigError(env, f"must be between {low} and {high}, got {text}")
        return number
    if kind == "Secret":
        return Secret(text)
    if kind == "tuple[str, ...]":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if isinstance(kind, str) and kind in ENUMERATED:
        choices = get_args(ENUMERATED[kind])
        found = {choice.lower(): choice for choice in choices}.get(text.lower())
        if found is None:
            named = [c for c in choices if c]
            raise ConfigError(env, f"must be {', '.join(named[:-1])} or {named[-1]}, got {text!r}")
        return found
    return text
