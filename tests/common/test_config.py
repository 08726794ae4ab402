from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from services.common.certs import init_certificates
from services.common.config import ConfigError, Settings, environment_variables
from services.common.keyring import DEV_MARKER, init_keys


def test_empty_environment_gives_safe_development_defaults() -> None:
    settings = Settings.from_env({})

    assert settings.env == "development"
    assert (settings.host, settings.port) == ("127.0.0.1", 50051)
    assert settings.data_dir == Path("data")
    assert settings.keys_dir == Path("data/keys")
    assert settings.consent_db_url == "sqlite:///data/consent.db"
    assert settings.keystore_db_url == "sqlite:///data/keystore.db"
    assert settings.max_message_bytes == 4 * 1024 * 1024
    assert settings.max_batch == 1000
    assert settings.grace_seconds == 5.0
    assert (settings.log_level, settings.log_format) == ("INFO", "auto")
    assert settings.otlp_endpoint is None
    assert settings.transport == "embedded"
    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.phone_default_region == "GB"
    assert settings.callers_file is None
    assert (settings.tls_cert, settings.tls_key, settings.tls_ca) == (None, None, None)
    assert not settings.tls_enabled
    assert settings.token is None
    assert settings.keyring_json is None


def test_paths_and_databases_follow_the_data_dir(tmp_path: Path) -> None:
    settings = Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path)})

    assert settings.keys_dir == tmp_path / "keys"
    assert settings.db_url("identity") == f"sqlite:///{tmp_path.as_posix()}/identity.db"


def test_shared_database_url_applies_where_no_service_url_is_given() -> None:
    settings = Settings.from_env(
        {
            "STEWARD_DATABASE_URL": "postgresql+psycopg://db/steward",
            "STEWARD_TAGGING_DB_URL": "postgresql+psycopg://db/tagging",
        }
    )

    assert settings.db_url("tagging") == "postgresql+psycopg://db/tagging"
    for service in ("consent", "identity", "recommend", "keystore"):
        assert settings.db_url(service) == "postgresql+psycopg://db/steward"


def test_values_are_parsed_from_their_variables() -> None:
    settings = Settings.from_env(
        {
            "STEWARD_PORT": "0",
            "STEWARD_KEYS_DIR": "/run/secrets/keys",
            "STEWARD_TRANSPORT": "JetStream",
            "STEWARD_LOG_LEVEL": "debug",
            "STEWARD_LOG_FORMAT": "json",
            "STEWARD_GRACE_SECONDS": "0.5",
            "STEWARD_PHONE_REGION": "fr",
            "STEWARD_CALLERS_FILE": "callers.yaml",
            "STEWARD_TLS_CERT": "certs/consent.crt",
            "STEWARD_TLS_KEY": "certs/consent.key",
            "STEWARD_TLS_CA": "certs/ca.crt",
            "STEWARD_TOKEN": "a-token",
            "STEWARD_MAX_WORKERS": "8",
            "STEWARD_MAX_CONCURRENT_CALLS": "2",
            "STEWARD_CONSENT_TARGET": "consent:50051",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        }
    )

    assert settings.port == 0
    assert settings.keys_dir == Path("/run/secrets/keys")
    assert settings.transport == "jetstream"
    assert (settings.log_level, settings.log_format) == ("DEBUG", "json")
    assert settings.grace_seconds == 0.5
    assert settings.phone_default_region == "FR"
    assert settings.callers_file == Path("callers.yaml")
    assert settings.tls_cert == Path("certs/consent.crt")
    assert (settings.tls_key, settings.tls_ca) == (Path("certs/consent.key"), Path("certs/ca.crt"))
    assert settings.tls_enabled
    assert settings.token == "a-token"
    assert settings.otlp_endpoint == "http://collector:4317"
    assert settings.max_workers == 8
    assert settings.max_concurrent_calls == 2
    assert settings.consent_target == "consent:50051"


def test_empty_variables_count_as_unset() -> None:
    assert Settings.from_env({"STEWARD_PORT": "", "STEWARD_ENV": ""}) == Settings.from_env({})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("STEWARD_PORT", "fifty"),
        ("STEWARD_PORT", "70000"),
        ("STEWARD_ENV", "staging"),
        ("STEWARD_TRANSPORT", "kafka"),
        ("STEWARD_LOG_FORMAT", "xml"),
        ("STEWARD_LOG_LEVEL", "LOUD"),
        ("STEWARD_MAX_BATCH", "0"),
        ("STEWARD_MAX_WORKERS", "0"),
        ("STEWARD_MAX_CONCURRENT_CALLS", "0"),
        ("STEWARD_MAX_MESSAGE_BYTES", "-1"),
        ("STEWARD_GRACE_SECONDS", "nan"),
        ("STEWARD_PHONE_REGION", "GBR"),
    ],
)
def test_invalid_values_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_unknown_service_database_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown service database 'billing'"):
        Settings.from_env({}).db_url("billing")


def test_settings_are_immutable_and_hide_secrets_in_repr() -> None:
    settings = Settings.from_env({"STEWARD_TOKEN": "s3cret-token", "STEWARD_KEYRING_JSON": "{}"})

    with pytest.raises(FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    assert "s3cret-token" not in repr(settings)
    assert "keyring_json" not in repr(settings)


def test_production_refuses_to_start_without_a_callers_file(tmp_path: Path) -> None:
    init_keys(tmp_path / "keys", development=False)

    with pytest.raises(ConfigError, match="STEWARD_CALLERS_FILE is not set"):
        Settings.from_env({"STEWARD_ENV": "production", "STEWARD_DATA_DIR": str(tmp_path)})


def test_production_refuses_development_certificates(tmp_path: Path) -> None:
    init_keys(tmp_path / "keys", development=False)
    pki = init_certificates(tmp_path / "certs", services=["consent"])
    (consent,) = pki.services
    # A container gets the certificate alone, as a secret, without the marker beside it.
    mounted = tmp_path / "secrets"
    mounted.mkdir()
    (mounted / "tls.pem").write_bytes(consent.certificate.read_bytes())

    for certificate in (consent.certificate, mounted / "tls.pem"):
        with pytest.raises(ConfigError, match="is a development certificate"):
            Settings.from_env(
                {
                    "STEWARD_ENV": "production",
                    "STEWARD_DATA_DIR": str(tmp_path),
                    "STEWARD_CALLERS_FILE": str(tmp_path / "callers.yaml"),
                    "STEWARD_TLS_CERT": str(certificate),
                    "STEWARD_TLS_KEY": str(consent.private_key),
                    "STEWARD_TLS_CA": str(pki.ca.certificate),
                }
            )


def test_production_starts_with_production_certificates(tmp_path: Path) -> None:
    init_keys(tmp_path / "keys", development=False)
    pki = init_certificates(tmp_path / "certs", services=["consent"], development=False)
    (consent,) = pki.services

    settings = Settings.from_env(
        {
            "STEWARD_ENV": "production",
            "STEWARD_DATA_DIR": str(tmp_path),
            "STEWARD_CALLERS_FILE": str(tmp_path / "callers.yaml"),
            "STEWARD_TLS_CERT": str(consent.certificate),
            "STEWARD_TLS_KEY": str(consent.private_key),
            "STEWARD_TLS_CA": str(pki.ca.certificate),
        }
    )

    assert settings.tls_enabled and settings.env == "production"


def test_tls_files_are_configured_all_together_or_not_at_all() -> None:
    with pytest.raises(ConfigError, match="missing: STEWARD_TLS_KEY, STEWARD_TLS_CA"):
        Settings.from_env({"STEWARD_TLS_CERT": "consent.crt"})


def test_the_retired_admin_token_is_refused_rather_than_ignored() -> None:
    with pytest.raises(ConfigError, match="STEWARD_ADMIN_TOKEN is no longer read"):
        Settings.from_env({"STEWARD_ADMIN_TOKEN": "a-secret"})


def test_production_refuses_development_keys(tmp_path: Path) -> None:
    init_keys(tmp_path / "keys", development=True)

    with pytest.raises(ConfigError, match=DEV_MARKER):
        Settings.from_env(
            {
                "STEWARD_ENV": "production",
                "STEWARD_DATA_DIR": str(tmp_path),
                "STEWARD_CALLERS_FILE": str(tmp_path / "callers.yaml"),
            }
        )


def test_production_starts_with_real_secrets_and_keys(tmp_path: Path) -> None:
    init_keys(tmp_path / "keys", development=False)

    settings = Settings.from_env(
        {
            "STEWARD_ENV": "production",
            "STEWARD_DATA_DIR": str(tmp_path),
            "STEWARD_CALLERS_FILE": str(tmp_path / "callers.yaml"),
        }
    )

    assert settings.env == "production"


def test_development_tolerates_development_keys_and_no_callers_file(tmp_path: Path) -> None:
    init_keys(tmp_path / "keys", development=True)

    assert Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path)}).callers_file is None


def test_environment_variables_names_every_variable_read_including_per_service_urls() -> None:
    names = environment_variables()

    assert {
        "STEWARD_ENV",
        "STEWARD_DATABASE_URL",
        "STEWARD_CONSENT_DB_URL",
        "STEWARD_KEYSTORE_DB_URL",
        "STEWARD_KEYRING_JSON",
        "STEWARD_IDENTITY_TARGET",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    } <= names
    assert "STEWARD_NO_SUCH_SETTING" not in names


def test_every_variable_named_as_read_changes_the_settings_or_is_refused() -> None:
    defaults = Settings.from_env({})
    for variable in sorted(environment_variables()):
        try:
            settings = Settings.from_env({variable: "7"})
        except ConfigError as error:
            assert variable in str(error)
            continue
        assert settings != defaults, f"{variable} is listed as read but changes nothing"
