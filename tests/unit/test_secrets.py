"""Credentials from files, their redaction from logs, and the Kafka/MongoDB client settings
built from them (no server needed)."""

from __future__ import annotations

import io
import logging
import ssl
from pathlib import Path

import pytest
from streamcrawl.core.config import Settings
from streamcrawl.core.kafka import client_options
from streamcrawl.core.secrets import (
    RedactingFilter,
    mongo_client_uri,
    read_secret,
    redact,
)


def _secret_file(tmp_path: Path, value: str, name: str = "pw") -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")
    return path


def test_a_secret_read_from_a_file_is_redacted_from_any_text(tmp_path: Path) -> None:
    secret = read_secret(str(_secret_file(tmp_path, "s3cr3t-Kafka/pw")), "X")
    assert secret == "s3cr3t-Kafka/pw"  # the file's trailing newline is not part of it
    assert redact("connect failed for user with s3cr3t-Kafka/pw.") == (
        "connect failed for user with ***."
    )
    assert redact("password=s3cr3t-Kafka%2Fpw") == "password=***"  # URL-quoted form too


def test_uri_passwords_are_redacted_even_if_never_read() -> None:
    assert redact("mongodb://crawler:hunter2@db:27017/?authSource=x down") == (
        "mongodb://crawler:***@db:27017/?authSource=x down"
    )
    assert redact("http://proxy.example:3128/ stays") == "http://proxy.example:3128/ stays"


def test_missing_or_empty_secret_files_are_one_line_errors_without_content(
    tmp_path: Path,
) -> None:
    with pytest.raises(ValueError, match=r"^STREAMCRAWL_X: cannot read .*/absent: No such file"):
        read_secret(str(tmp_path / "absent"), "STREAMCRAWL_X")
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_secret(str(tmp_path / "empty"), "STREAMCRAWL_X")


def test_the_log_filter_redacts_messages_arguments_and_tracebacks(tmp_path: Path) -> None:
    secret = read_secret(str(_secret_file(tmp_path, "tb-secret-42")), "X")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test_secrets.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.error("uri %s", "mongodb://u:plain-pw@h/")
        try:
            raise RuntimeError(f"auth failed with {secret}")
        except RuntimeError:
            logger.exception("stage failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "mongodb://u:***@h/" in text and "plain-pw" not in text
    assert "RuntimeError: auth failed with ***" in text and secret not in text


def test_mongo_password_file_is_merged_into_the_uri(tmp_path: Path) -> None:
    password = _secret_file(tmp_path, "p@ss:w/rd")
    settings = Settings.from_env(
        {
            "STREAMCRAWL_MONGO_URI": "mongodb://crawler@h1:27017,h2:27017/db?authSource=admin",
            "STREAMCRAWL_MONGO_PASSWORD_FILE": str(password),
        }
    )
    assert mongo_client_uri(settings) == (
        "mongodb://crawler:p%40ss%3Aw%2Frd@h1:27017,h2:27017/db?authSource=admin"
    )
    plain = Settings.from_env({"STREAMCRAWL_MONGO_URI": "mongodb://h:1/"})
    assert mongo_client_uri(plain) == "mongodb://h:1/"
    userless = Settings.from_env(
        {"STREAMCRAWL_MONGO_URI": "mongodb://h:1/", "STREAMCRAWL_MONGO_PASSWORD_FILE": "x"}
    )
    with pytest.raises(ValueError, match="needs the user name"):
        mongo_client_uri(userless)


def test_kafka_client_options_for_sasl_ssl(tmp_path: Path) -> None:
    password = _secret_file(tmp_path, "kafka-pw")
    settings = Settings.from_env(
        {
            "STREAMCRAWL_KAFKA_BOOTSTRAP": "b1:9093,b2:9093",
            "STREAMCRAWL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAMCRAWL_KAFKA_SASL_USERNAME": "streamcrawl",
            "STREAMCRAWL_KAFKA_SASL_PASSWORD_FILE": str(password),
        }
    )
    options = client_options(settings)
    context = options.pop("ssl_context")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert options == {
        "bootstrap_servers": "b1:9093,b2:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "streamcrawl",
        "sasl_plain_password": "kafka-pw",
    }
    # The settings, and so the environment handed to child processes, hold only the path.
    assert "kafka-pw" not in repr(settings) and "kafka-pw" not in str(settings.as_env())
    assert client_options(Settings.from_env({})) == {
        "bootstrap_servers": "127.0.0.1:19092",
        "security_protocol": "PLAINTEXT",
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAMCRAWL_KAFKA_SECURITY_PROTOCOL": "TLS"}, "expected one of PLAINTEXT"),
        (
            {
                "STREAMCRAWL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "STREAMCRAWL_KAFKA_SASL_MECHANISM": "GSSAPI",
            },
            "STREAMCRAWL_KAFKA_SASL_MECHANISM='GSSAPI'",
        ),
    ],
)
def test_bad_kafka_security_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_sasl_without_user_or_password_file_is_refused_when_a_client_is_made() -> None:
    settings = Settings.from_env({"STREAMCRAWL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    with pytest.raises(
        ValueError,
        match="needs STREAMCRAWL_KAFKA_SASL_USERNAME and STREAMCRAWL_KAFKA_SASL_PASSWORD_FILE",
    ):
        client_options(settings)
