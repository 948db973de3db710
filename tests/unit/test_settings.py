"""Settings: defaults, environment, flags, and one clear ConfigError naming the variable."""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from worker import cli
from worker.errors import ConfigError
from worker.settings import Secret, Settings, describe

VARIABLES = [name for name, _, _ in describe()]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No setting leaks in from the environment the tests happen to run in."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def config_error(environ: dict[str, str], flags: dict[str, str | None] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Settings.load(environ, flags)
    return info.value


def test_defaults() -> None:
    s = Settings.load({})
    assert s.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert s.kafka_topic == ("documents",)
    assert s.kafka_group_id == "embedding-ingest"
    assert s.dlq_topic == "documents.dlq"
    assert s.database_schema == "public"
    assert s.vector_type == "vector"
    assert (s.chunk_size, s.chunk_overlap) == (1000, 100)
    assert s.health_port == 8080
    assert s.api_key == ""
    assert s.embedding_send_dimensions is True


def test_environment_is_parsed_into_types() -> None:
    s = Settings.load(
        {
            "KAFKA_TOPIC": " a , b,, c ",
            "KAFKA_GROUP_ID": "g",
            "DATABASE_URL": "postgres://u:p@db:5432/x?sslmode=require",
            "DATABASE_SCHEMA": "_Emb_1",
            "EMBEDDING_DIMENSIONS": " 384 ",
            "EMBEDDING_TIMEOUT": "2.5",
            "EMBEDDING_SEND_DIMENSIONS": "off",
            "KAFKA_PRODUCER_IDEMPOTENCE": "No",
            "EMBEDDING_API_KEY": "sk-1",
            "CHUNK_SIZE": "200",
            "CHUNK_OVERLAP": "99",
            "SHUTDOWN_GRACE_SECONDS": "0",
            "HEALTH_PORT": "0",
        }
    )
    assert s.kafka_topic == ("a", "b", "c")
    assert s.dlq_topic == "a.dlq"
    assert s.kafka_group_id == "g"
    assert s.database_url == Secret("postgres://u:p@db:5432/x?sslmode=require")
    assert s.database_schema == "_Emb_1"
    assert s.embedding_dimensions == 384
    assert s.embedding_timeout == 2.5
    assert s.embedding_send_dimensions is False
    assert s.kafka_producer_idempotence is False
    assert s.api_key == "sk-1"
    assert (s.chunk_size, s.chunk_overlap) == (200, 99)
    assert (s.shutdown_grace_seconds, s.health_port) == (0.0, 0)


@pytest.mark.parametrize("text", ["1", "true", "YES", "On"])
def test_true_spellings(text: str) -> None:
    assert Settings.load(
        {"EMBEDDING_SEND_DIMENSIONS": "false", "KAFKA_PRODUCER_IDEMPOTENCE": text}
    ).kafka_producer_idempotence


def test_explicit_dlq_topic() -> None:
    assert Settings.load({"KAFKA_DLQ_TOPIC": "dead"}).dlq_topic == "dead"


def test_flags_win_over_environment() -> None:
    environ = {"KAFKA_TOPIC": "env-topic", "CHUNK_SIZE": "300", "EMBEDDING_MODEL": "env-model"}
    s = Settings.load(environ, {"kafka_topic": "flag-topic", "chunk_size": "400", "embedding_model": None})
    assert s.kafka_topic == ("flag-topic",)
    assert s.chunk_size == 400
    assert s.embedding_model == "env-model", "a flag not given (None) leaves the environment's value"


def test_a_bad_environment_value_is_overridden_by_a_good_flag() -> None:
    assert Settings.load({"CHUNK_SIZE": "lots"}, {"chunk_size": "64", "chunk_overlap": "8"}).chunk_size == 64


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"KAFKA_TOPIC": ""}, "KAFKA_TOPIC"),
        ({"KAFKA_TOPIC": " , ,"}, "KAFKA_TOPIC"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "  "}, "KAFKA_BOOTSTRAP_SERVERS"),
        ({"KAFKA_GROUP_ID": ""}, "KAFKA_GROUP_ID"),
        ({"KAFKA_TOPIC": "a,b", "KAFKA_DLQ_TOPIC": "b"}, "KAFKA_DLQ_TOPIC"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_MECHANISM"),
        ({"KAFKA_MAX_POLL_RECORDS": "many"}, "KAFKA_MAX_POLL_RECORDS"),
        ({"KAFKA_MAX_POLL_RECORDS": "1.5"}, "KAFKA_MAX_POLL_RECORDS"),
        ({"KAFKA_MAX_POLL_RECORDS": "0"}, "KAFKA_MAX_POLL_RECORDS"),
        ({"KAFKA_MAX_POLL_RECORDS": ""}, "KAFKA_MAX_POLL_RECORDS"),
        ({"EMBEDDING_DIMENSIONS": "0"}, "EMBEDDING_DIMENSIONS"),
        ({"EMBEDDING_DIMENSIONS": "-3"}, "EMBEDDING_DIMENSIONS"),
        ({"HEALTH_PORT": "65536"}, "HEALTH_PORT"),
        ({"CHUNK_SIZE": "15"}, "CHUNK_SIZE"),
        ({"EMBEDDING_TIMEOUT": "fast"}, "EMBEDDING_TIMEOUT"),
        ({"EMBEDDING_TIMEOUT": "0"}, "EMBEDDING_TIMEOUT"),
        ({"EMBEDDING_TIMEOUT": "nan"}, "EMBEDDING_TIMEOUT"),
        ({"EMBEDDING_TIMEOUT": "inf"}, "EMBEDDING_TIMEOUT"),
        ({"SHUTDOWN_GRACE_SECONDS": "-1"}, "SHUTDOWN_GRACE_SECONDS"),
        ({"EMBEDDING_SEND_DIMENSIONS": "maybe"}, "EMBEDDING_SEND_DIMENSIONS"),
        ({"KAFKA_PRODUCER_IDEMPOTENCE": ""}, "KAFKA_PRODUCER_IDEMPOTENCE"),
        ({"DATABASE_URL": "mysql://u@h/db"}, "DATABASE_URL"),
        ({"DATABASE_URL": "127.0.0.1:5432"}, "DATABASE_URL"),
        ({"DATABASE_SCHEMA": "my-schema"}, "DATABASE_SCHEMA"),
        ({"DATABASE_SCHEMA": "public; DROP TABLE x"}, "DATABASE_SCHEMA"),
        ({"DATABASE_SCHEMA": "1st"}, "DATABASE_SCHEMA"),
        ({"DATABASE_SCHEMA": "s" * 64}, "DATABASE_SCHEMA"),
        ({"DATABASE_SCHEMA": '"quoted"'}, "DATABASE_SCHEMA"),
        ({"VECTOR_TYPE": "sparsevec"}, "VECTOR_TYPE"),
        ({"EMBEDDING_DIMENSIONS": "2001"}, "EMBEDDING_DIMENSIONS"),
        ({"VECTOR_TYPE": "halfvec", "EMBEDDING_DIMENSIONS": "4001"}, "EMBEDDING_DIMENSIONS"),
        ({"EMBEDDING_URL": "ftp://h/v1"}, "EMBEDDING_URL"),
        ({"EMBEDDING_URL": "http://"}, "EMBEDDING_URL"),
        ({"EMBEDDING_MODEL": ""}, "EMBEDDING_MODEL"),
        ({"EMBEDDING_ENCODING": "hex"}, "EMBEDDING_ENCODING"),
        ({"CHUNK_SIZE": "100", "CHUNK_OVERLAP": "50"}, "CHUNK_OVERLAP"),
        ({"CHUNK_SIZE": "100", "CHUNK_OVERLAP": "80"}, "CHUNK_OVERLAP"),
        ({"CHUNK_OVERLAP": "500"}, "CHUNK_OVERLAP"),
        ({"LOG_LEVEL": "trace"}, "LOG_LEVEL"),
        ({"CHUNK_UNIT": "words"}, "CHUNK_UNIT"),
        ({"EMBEDDING_TOKENIZER": "o200k_base"}, "EMBEDDING_TOKENIZER"),
        ({"CHUNK_UNIT": "tokens", "CHUNK_SIZE": "9000"}, "CHUNK_SIZE"),
        ({"EMBEDDING_MAX_INPUT_TOKENS": "400000"}, "EMBEDDING_MAX_INPUT_TOKENS"),
        ({"EMBEDDING_MAX_REQUEST_TOKENS": "8000"}, "EMBEDDING_MAX_INPUT_TOKENS"),
        ({"EMBEDDING_API_KEY_FILE": "/nonexistent/dir/key"}, "EMBEDDING_API_KEY_FILE"),
        ({"EMBEDDING_MAX_INPUTS": "0"}, "EMBEDDING_MAX_INPUTS"),
        ({"EMBEDDING_MAX_INPUTS": "many"}, "EMBEDDING_MAX_INPUTS"),
        ({"EMBEDDING_EXTRA_BODY": '{"input_type": document}'}, "EMBEDDING_EXTRA_BODY"),
        ({"EMBEDDING_EXTRA_BODY": '{"input_type": "document"'}, "EMBEDDING_EXTRA_BODY"),
        ({"EMBEDDING_EXTRA_BODY": "input_type=document"}, "EMBEDDING_EXTRA_BODY"),
        ({"EMBEDDING_EXTRA_BODY": '[{"input_type": "document"}]'}, "EMBEDDING_EXTRA_BODY"),
        ({"EMBEDDING_EXTRA_BODY": '"document"'}, "EMBEDDING_EXTRA_BODY"),
        ({"EMBEDDING_EXTRA_BODY": "null"}, "EMBEDDING_EXTRA_BODY"),
        ({"EMBEDDING_EXTRA_BODY": '{"n": NaN}'}, "EMBEDDING_EXTRA_BODY"),
    ],
)
def test_bad_value_names_its_variable(environ: dict[str, str], variable: str) -> None:
    error = config_error(environ)
    assert error.setting == variable
    assert str(error).startswith(f"{variable}: ")
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("vector_type", "dimensions"), [("vector", 2000), ("halfvec", 2001), ("halfvec", 4000)]
)
def test_dimension_limits_follow_the_vector_type(vector_type: str, dimensions: int) -> None:
    s = Settings.load({"VECTOR_TYPE": vector_type, "EMBEDDING_DIMENSIONS": str(dimensions)})
    assert (s.vector_type, s.embedding_dimensions) == (vector_type, dimensions)


def test_the_extra_body_is_an_object_merged_into_requests_and_empty_by_default() -> None:
    assert Settings.load({}).extra_body == {}
    assert Settings.load({"EMBEDDING_EXTRA_BODY": "  "}).extra_body == {}
    body = '{"input_type": "document", "user": "ingest", "truncate": {"end": true}}'
    s = Settings.load({"EMBEDDING_EXTRA_BODY": body})
    assert s.extra_body == {"input_type": "document", "user": "ingest", "truncate": {"end": True}}
    assert s.shown()["EMBEDDING_EXTRA_BODY"] == body


@pytest.mark.parametrize("field", ["model", "input", "dimensions", "encoding_format"])
def test_the_extra_body_may_not_set_what_the_worker_sends(field: str) -> None:
    error = config_error({"EMBEDDING_EXTRA_BODY": f'{{"input_type": "document", "{field}": 1}}'})
    assert error.setting == "EMBEDDING_EXTRA_BODY"
    assert str(error).startswith(f"EMBEDDING_EXTRA_BODY: must not set {field}: ")
    assert "match the index" in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    ("body", "says"),
    [("{", "is not JSON"), ("[1, 2]", "is a JSON array, not an object"), ("3", "is a JSON number")],
)
def test_an_extra_body_that_is_no_object_says_what_it_is(body: str, says: str) -> None:
    message = str(config_error({"EMBEDDING_EXTRA_BODY": body}))
    assert message.startswith(f"EMBEDDING_EXTRA_BODY: {says}")
    assert '{"input_type": "document"}' in message, "with an example of what it takes"


def test_max_inputs_defaults_to_openais_limit_and_takes_a_providers() -> None:
    assert (Settings.load({}).embedding_max_inputs, Settings.load({}).embedding_batch_size) == (2048, 64)
    s = Settings.load({"EMBEDDING_MAX_INPUTS": "32", "EMBEDDING_BATCH_SIZE": "128"})
    assert (s.embedding_max_inputs, s.embedding_batch_size) == (32, 128), "neither refuses the other"


def test_too_many_dimensions_for_vector_suggests_halfvec() -> None:
    assert "halfvec" in str(config_error({"EMBEDDING_DIMENSIONS": "3072"}))


def test_bad_flag_names_its_variable() -> None:
    error = config_error({}, {"chunk_size": "x"})
    assert str(error).startswith("CHUNK_SIZE: ")


def test_api_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  sk-from-file\n\n", encoding="utf-8")
    s = Settings.load({"EMBEDDING_API_KEY": "sk-from-env", "EMBEDDING_API_KEY_FILE": str(key_file)})
    assert s.api_key == "sk-from-file"


def test_api_key_file_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    assert config_error({"EMBEDDING_API_KEY_FILE": str(tmp_path)}).setting == "EMBEDDING_API_KEY_FILE"


def test_api_key_file_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"\xff\xfesk-latin1-\xe9")
    assert config_error({"EMBEDDING_API_KEY_FILE": str(key_file)}).setting == "EMBEDDING_API_KEY_FILE"


@pytest.mark.parametrize(
    ("variable", "url"),
    [("DATABASE_URL", "postgresql://u:p@[::1/db"), ("EMBEDDING_URL", "http://[::1/v1")],
)
def test_malformed_url_is_a_config_error(variable: str, url: str) -> None:
    assert config_error({variable: url}).setting == variable


def test_schema_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^DATABASE_SCHEMA: "):
        Settings(database_schema="public\n")


SECRETS = {
    "EMBEDDING_API_KEY": "sk-embed-hunter2",
    "DATABASE_URL": "postgresql://ingest:pg-hunter2@db:5432/app",
    "KAFKA_SASL_PASSWORD": "sasl-hunter2",
}


def test_secrets_never_show_in_repr_or_str() -> None:
    s = Settings.load(SECRETS)
    assert s.api_key == "sk-embed-hunter2"
    assert s.kafka_sasl_password.reveal() == "sasl-hunter2"
    for shown in (repr(s), str(s), repr(s.database_url), str(s.embedding_api_key)):
        assert "hunter2" not in shown
    assert "**********" in repr(s.database_url)


def test_secrets_never_show_in_config_errors() -> None:
    error = config_error({**SECRETS, "DATABASE_URL": "mysql://ingest:pg-hunter2@db/app"})
    assert error.setting == "DATABASE_URL"
    assert "hunter2" not in str(error)


def test_secret_compares_by_value_and_is_falsy_when_empty() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert not Secret("")
    assert repr(Secret("")) == "Secret('')"


# -- the CLI: exit 2 and one line naming the setting -----------------------------------------


@pytest.mark.parametrize(
    ("variable", "flag", "value"),
    [
        ("CHUNK_SIZE", "--chunk-size", "big"),
        ("KAFKA_TOPIC", "--kafka-topic", ""),
        ("VECTOR_TYPE", "--vector-type", "bitvec"),
        ("DATABASE_URL", "--database-url", "mysql://root:db-hunter2@h/x"),
        ("EMBEDDING_API_KEY_FILE", "--embedding-api-key-file", "/nonexistent/key"),
        ("EMBEDDING_EXTRA_BODY", "--embedding-extra-body", '{"model": "other"}'),
        ("EMBEDDING_EXTRA_BODY", "--embedding-extra-body", "[1]"),
        ("EMBEDDING_MAX_INPUTS", "--embedding-max-inputs", "0"),
    ],
)
@pytest.mark.parametrize("form", ["env", "flag"])
def test_cli_reports_a_bad_setting_in_one_line_and_exits_2(
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    flag: str,
    value: str,
    form: str,
) -> None:
    if form == "env":
        clean_env.setenv(variable, value)
        argv = ["run"]
    else:
        argv = ["run", flag, value]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert variable in lines[0]
    assert "hunter2" not in err
    assert out == ""


def test_cli_flag_wins_over_a_bad_environment_value(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("CHUNK_SIZE", "big")
    clean_env.setenv("VECTOR_TYPE", "nope")
    # The flag repairs CHUNK_SIZE, so the one reported is the environment's VECTOR_TYPE.
    assert cli.main(["migrate", "--chunk-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "VECTOR_TYPE" in err
    assert "CHUNK_SIZE" not in err


def test_the_settings_shown_at_start_hide_every_secret_and_keep_the_rest() -> None:
    settings = Settings.load(
        {
            "KAFKA_TOPIC": "docs,more",
            "DATABASE_URL": "postgresql://ingest:pg-SECRET-pw@db.internal:5432/search?sslmode=require",
            "EMBEDDING_API_KEY": "sk-SECRET-key",
            "KAFKA_SASL_PASSWORD": "kafka-SECRET",
        }
    )
    shown = settings.shown()
    assert set(shown) == set(VARIABLES)
    assert "SECRET" not in repr(shown)
    assert shown["DATABASE_URL"] == "postgresql://ingest:**********@db.internal:5432/search?sslmode=require"
    assert (shown["EMBEDDING_API_KEY"], shown["KAFKA_SASL_PASSWORD"]) == ("**********", "**********")
    assert shown["KAFKA_TOPIC"] == "docs,more"
    assert shown["EMBEDDING_DIMENSIONS"] == settings.embedding_dimensions


@pytest.mark.parametrize(
    ("database_url", "embedding_url"),
    [
        ("postgresql://u:pg-SECRET@db/x", "http://api/v1"),
        ("postgresql://u@db/x?sslmode=require&password=pg-SECRET", "http://api/v1"),
        ("postgresql://u@db/x", "https://user:emb-SECRET@api.example/v1"),
    ],
)
def test_a_password_in_either_url_is_masked_in_logs_and_in_the_settings_shown(
    database_url: str, embedding_url: str
) -> None:
    settings = Settings.load({"DATABASE_URL": database_url, "EMBEDDING_URL": embedding_url})
    secret = "pg-SECRET" if "pg-SECRET" in database_url else "emb-SECRET"
    assert secret in settings.secrets, "logs mask it wherever it turns up"
    assert "SECRET" not in repr(settings.shown())
    assert "sslmode=require" in settings.shown()["DATABASE_URL"] or "sslmode" not in database_url


def test_every_secret_can_come_from_a_file_which_wins(tmp_path: Path) -> None:
    files = {}
    for name, value in (("sasl", "sasl pass\n"), ("db", "p@ss:w/rd\n"), ("key", "sk-file\n")):
        files[name] = tmp_path / name
        files[name].write_text(value)
    s = Settings.load(
        {
            "KAFKA_SASL_PASSWORD": "from-env",
            "KAFKA_SASL_PASSWORD_FILE": str(files["sasl"]),
            "DATABASE_URL": "postgresql://ingest:old@db.internal:5432/search?sslmode=verify-full",
            "DATABASE_PASSWORD_FILE": str(files["db"]),
            "EMBEDDING_API_KEY_FILE": str(files["key"]),
        }
    )
    assert s.kafka_sasl_password.reveal() == "sasl pass"
    assert s.api_key == "sk-file"
    url = urllib.parse.urlsplit(s.database_url.reveal())
    assert (url.username, url.password, url.hostname, url.port) == ("ingest", None, "db.internal", 5432)
    assert urllib.parse.parse_qs(url.query) == {"sslmode": ["verify-full"], "password": ["p@ss:w/rd"]}
    assert "p@ss:w/rd" in s.secrets and "sasl pass" in s.secrets
    shown = s.shown()
    assert "p@ss" not in str(shown) and "sasl pass" not in str(shown) and "old" not in shown["DATABASE_URL"]


@pytest.mark.parametrize("setting", ["KAFKA_SASL_PASSWORD_FILE", "DATABASE_PASSWORD_FILE"])
def test_a_secret_file_missing_or_empty_names_its_setting(tmp_path: Path, setting: str) -> None:
    assert config_error({setting: str(tmp_path / "absent")}).setting == setting
    empty = tmp_path / "empty"
    empty.write_text("\n")
    error = config_error({setting: str(empty)})
    assert error.setting == setting and "is empty" in str(error)


def test_database_tls_parameters_are_checked(tmp_path: Path) -> None:
    base = "postgresql://ingest@db:5432/search"
    assert "sslmode must be" in str(config_error({"DATABASE_URL": f"{base}?sslmode=verify_full"}))
    error = config_error({"DATABASE_URL": f"{base}?sslmode=verify-full&sslrootcert={tmp_path}/ca.pem"})
    assert error.setting == "DATABASE_URL" and "sslrootcert" in str(error)
    ca = tmp_path / "ca.pem"
    ca.write_text("a CA")
    Settings.load({"DATABASE_URL": f"{base}?sslmode=verify-full&sslrootcert={ca}"})


def test_kafka_client_certificate_settings_are_checked(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("a certificate")
    tls = {"KAFKA_SECURITY_PROTOCOL": "SSL"}
    assert config_error({**tls, "KAFKA_SSL_CERTFILE": str(tmp_path / "no")}).setting == "KAFKA_SSL_CERTFILE"
    assert config_error({**tls, "KAFKA_SSL_KEYFILE": str(cert)}).setting == "KAFKA_SSL_KEYFILE"
    error = config_error({"KAFKA_SSL_CERTFILE": str(cert)})  # PLAINTEXT
    assert error.setting == "KAFKA_SSL_CERTFILE" and "only over TLS" in str(error)
    Settings.load({**tls, "KAFKA_SSL_CERTFILE": str(cert), "KAFKA_SSL_KEYFILE": str(cert)})


def test_the_environment_of_settings_gives_the_same_settings(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-file\n")
    given = Settings.load(
        {
            "KAFKA_TOPIC": "a,b",
            "KAFKA_SASL_PASSWORD": "p@ss",
            "DATABASE_URL": "postgresql://ingest@db/search?sslmode=require",
            "EMBEDDING_API_KEY_FILE": str(key),
            "EMBEDDING_SEND_DIMENSIONS": "false",
            "EMBEDDING_TIMEOUT": "12.5",
        },
        {"chunk_size": "700"},  # a flag: children get it too
    )
    assert Settings.load(given.environment()) == given
