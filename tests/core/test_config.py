"""``load_settings``: YAML file + ``LOGSTACK_*`` overrides, API key sources, strict errors.

Every call passes ``env=`` explicitly so the real environment never leaks in.
"""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from logstack._config import (
    DEFAULT_BASELINE_KEYS,
    DEFAULT_PIPELINE,
    PUBLISHED_TOKENS,
    SECTIONS,
    ApiKey,
    Settings,
    load_settings,
    load_settings_for_reload,
)
from logstack._errors import ConfigError

TOKEN_FILE = "logstack_file_0123456789abcdef"
TOKEN_JSON = "logstack_json_0123456789abcdef"
TOKEN_ENV = "logstack_env_0123456789abcdef"
TOKEN_SHARED = "logstack_shared_0123456789abcdef"
SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def fails(path: Path | str | None = None, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={} if env is None else env)
    return info.value


def problem_for(err: ConfigError, needle: str) -> str:
    """The single problem mentioning ``needle`` (fails with every problem listed otherwise)."""
    matching = [p for p in err.problems if needle in p]
    assert len(matching) == 1, (needle, err.problems)
    return matching[0]


def keys_by_name(settings: Settings) -> dict[str, tuple[str, ApiKey]]:
    return {key.name: (token, key) for token, key in settings.security.api_keys.items()}


# --------------------------------------------------------------------------------------
# Defaults and the file
# --------------------------------------------------------------------------------------


def test_defaults_with_no_file_and_empty_env() -> None:
    settings = load_settings(None, env={})
    assert settings == Settings()
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert settings.server.log_level == "INFO"
    assert settings.security.api_keys == {}
    assert settings.security.admin_token is None
    assert settings.masking.baseline_keys == list(DEFAULT_BASELINE_KEYS)
    assert settings.schema_.max_entries == 500
    assert settings.wal.root_path == Path("./wal")
    assert settings.wal.segment_max_bytes == 128 * 1024 * 1024
    assert settings.loki.endpoints() == ["http://localhost:3100"]
    assert [stage.type for stage in settings.pipeline] == list(DEFAULT_PIPELINE)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, ""), env={}) == Settings()
    assert load_settings(write(tmp_path, "# only a comment\n"), env={}) == Settings()


def test_yaml_file_values_are_applied(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
server:
  host: 0.0.0.0
  port: 9100
  debug: true
  log_level: warning
security:
  rate_limit_rps: 1
  rate_limit_burst: 5
  admin_token: logstack_admin123456789abcdef0123
  api_keys:
    {TOKEN_FILE}:
      name: payments-api
      description: Payments
masking:
  baseline_keys: [{", ".join(DEFAULT_BASELINE_KEYS)}, ssn]
  partial_rules:
    authorization: {{keep_prefix: 7}}
  detectors:
    - {{name: order_id, pattern: "ORD-[0-9]+", replacement: "ORD-****"}}
schema:
  label_allowlist: [region]
  max_entries: 10
wal:
  root_path: /var/lib/logstack/wal
  segment_max_bytes: 8192
  fsync: interval
loki:
  urls: ["http://loki-a:3100/", "http://loki-b:3100"]
  gzip: true
  push_format: protobuf
pipeline:
  - type: auth
  - type: forward_loki
    name: loki
    options: {{retries: 3}}
""",
    )
    settings = load_settings(path, env={})
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 9100
    assert settings.server.debug is True
    assert settings.server.log_level == "WARNING"
    assert settings.security.rate_limit_rps == 1.0
    assert settings.security.rate_limit_burst == 5.0
    assert settings.security.admin_token == "logstack_admin123456789abcdef0123"
    key = settings.security.api_keys[TOKEN_FILE]
    assert (key.name, key.active, key.description) == ("payments-api", True, "Payments")
    assert settings.key_by_name("payments-api") is key
    assert settings.key_by_name("nobody") is None
    assert settings.masking.baseline_keys[-1] == "ssn"
    assert settings.masking.partial_rules["authorization"].keep_prefix == 7
    assert "email" not in settings.masking.partial_rules  # a file mapping replaces the default
    assert settings.masking.detectors[0].name == "order_id"
    assert settings.schema_.label_allowlist == ["region"]
    assert settings.schema_.max_entries == 10
    assert settings.wal.root_path == Path("/var/lib/logstack/wal")
    assert settings.wal.segment_max_bytes == 8192
    assert settings.wal.fsync == "interval"
    assert settings.loki.endpoints() == ["http://loki-a:3100", "http://loki-b:3100"]
    assert settings.loki.gzip is True
    assert settings.loki.push_format == "protobuf"
    assert [(s.type, s.instance_name) for s in settings.pipeline] == [
        ("auth", "auth"),
        ("forward_loki", "loki"),
    ]
    assert settings.pipeline[1].options == {"retries": 3}
    # Keys the file does not mention keep their defaults.
    assert settings.server.max_body_bytes == 1024 * 1024
    assert settings.wal.quota_bytes == 2 * 1024**3


def test_path_accepts_str_and_pathlike(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 9001}\n")
    assert load_settings(str(path), env={}).server.port == 9001
    assert load_settings(path, env={}).server.port == 9001


def test_logstack_config_env_picks_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 9200}\n")
    assert load_settings(env={"LOGSTACK_CONFIG": str(path)}).server.port == 9200


def test_explicit_path_beats_logstack_config(tmp_path: Path) -> None:
    explicit = write(tmp_path, "server: {port: 9300}\n", "explicit.yaml")
    via_env = write(tmp_path, "server: {port: 9400}\n", "via-env.yaml")
    settings = load_settings(explicit, env={"LOGSTACK_CONFIG": str(via_env)})
    assert settings.server.port == 9300


def test_empty_logstack_config_means_no_file() -> None:
    assert load_settings(env={"LOGSTACK_CONFIG": ""}) == Settings()


def test_real_environment_does_not_leak_when_env_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOGSTACK_PORT", "1234")
    monkeypatch.setenv("LOGSTACK_BOGUS_SETTING", "x")
    assert load_settings(None, env={}).server.port == 8000


def test_unrelated_variables_are_ignored() -> None:
    env = {"PATH": "/usr/bin", "HOME": "/root", "LOGSTACKPORT": "1", "logstack_port": "2"}
    assert load_settings(None, env=env) == Settings()


def test_shipped_config_yaml_loads_cleanly() -> None:
    if not SHIPPED_CONFIG.exists():
        pytest.skip(f"{SHIPPED_CONFIG} does not exist yet")
    settings = load_settings(SHIPPED_CONFIG, env={})
    assert isinstance(settings, Settings)
    assert settings.loki.endpoints()


# --------------------------------------------------------------------------------------
# LOGSTACK_<SECTION>_<KEY> overrides
# --------------------------------------------------------------------------------------


def test_env_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
server: {port: 9000, host: 10.0.0.1}
wal: {root_path: /from/file, segment_max_bytes: 8192, fsync: always}
loki: {base_url: "http://file:3100", gzip: false}
schema: {label_allowlist: [region], max_labels: 3}
""",
    )
    env = {
        "LOGSTACK_WAL_ROOT_PATH": "/from/env",
        "LOGSTACK_WAL_SEGMENT_MAX_BYTES": "65536",
        "LOGSTACK_LOKI_BASE_URL": "http://env:3100",
        "LOGSTACK_LOKI_GZIP": "true",
        "LOGSTACK_SCHEMA_LABEL_ALLOWLIST": '["tenant", "region", "zone"]',
    }
    settings = load_settings(path, env=env)
    assert settings.wal.root_path == Path("/from/env")
    assert settings.wal.segment_max_bytes == 65536
    assert isinstance(settings.wal.segment_max_bytes, int)
    assert settings.loki.base_url == "http://env:3100"
    assert settings.loki.gzip is True
    assert settings.schema_.label_allowlist == ["tenant", "region", "zone"]
    # File values the environment does not touch survive.
    assert settings.server.port == 9000
    assert settings.server.host == "10.0.0.1"
    assert settings.wal.fsync == "always"
    assert settings.schema_.max_labels == 3


@pytest.mark.parametrize(
    "raw",
    ['["tenant", "zone"]', "[tenant, zone]", "- tenant\n- zone\n"],
    ids=["json", "yaml-flow", "yaml-block"],
)
def test_list_override_accepts_json_and_yaml(raw: str) -> None:
    settings = load_settings(None, env={"LOGSTACK_SCHEMA_LABEL_ALLOWLIST": raw})
    assert settings.schema_.label_allowlist == ["tenant", "zone"]


def test_empty_list_override() -> None:
    settings = load_settings(None, env={"LOGSTACK_SCHEMA_LABEL_ALLOWLIST": "[]"})
    assert settings.schema_.label_allowlist == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        *[(raw, True) for raw in ("true", "True", "yes", "1")],
        *[(raw, False) for raw in ("false", "FALSE", "no", "0", "off")],
    ],
)
def test_boolean_overrides(raw: str, expected: bool) -> None:
    settings = load_settings(None, env={"LOGSTACK_LOKI_GZIP": raw, "LOGSTACK_DEBUG": raw})
    assert settings.loki.gzip is expected
    assert settings.server.debug is expected


def test_numeric_overrides_keep_their_types() -> None:
    env = {
        "LOGSTACK_WAL_QUOTA_SOFT_RATIO": "0.5",
        "LOGSTACK_WAL_FSYNC_INTERVAL_MS": "250",
        "LOGSTACK_LOKI_TIMEOUT_S": "2",
        "LOGSTACK_SECURITY_RATE_LIMIT_RPS": "2000",
    }
    settings = load_settings(None, env=env)
    assert settings.wal.quota_soft_ratio == 0.5
    assert settings.wal.fsync_interval_ms == 250
    assert settings.loki.timeout_s == 2.0
    assert settings.security.rate_limit_rps == 2000.0


@pytest.mark.parametrize(
    ("raw", "expected"), [("0700", 700), ("010", 10), ("0o17", 15), ("0x1F", 31), ("1_000", 1000)]
)
def test_numbers_are_read_as_yaml_1_2_reads_them(tmp_path: Path, raw: str, expected: int) -> None:
    """YAML 1.1 (PyYAML's) read ``0700`` as octal: ``LOGSTACK_PORT=0700`` listened on 448."""
    assert load_settings(None, env={"LOGSTACK_PORT": raw}).server.port == expected
    path = write(tmp_path, f"wal:\n  fsync_interval_ms: {raw}\n")
    assert load_settings(path, env={}).wal.fsync_interval_ms == expected


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("LOGSTACK_WAL_QUOTA_BYTES", "on"),
        ("LOGSTACK_WAL_QUOTA_BYTES", "true"),
        ("LOGSTACK_SERVER_WORKERS", "yes"),
        ("LOGSTACK_PORT", "on"),
        ("LOGSTACK_WAL_SEGMENT_MAX_AGE_S", "5:00"),
        ("LOGSTACK_SECURITY_RATE_LIMIT_RPS", "True"),
        ("LOGSTACK_LOKI_TIMEOUT_S", "false"),
    ],
)
def test_a_boolean_or_a_sexagesimal_is_not_a_number(variable: str, raw: str) -> None:
    """They were taken: ``LOGSTACK_WAL_QUOTA_BYTES=on`` passed check-config as a one-byte
    quota (every request then got a 429), ``5:00`` was 300 s."""
    problem = problem_for(fails(env={variable: raw}), variable)
    assert "number" in problem or "integer" in problem, problem


def test_a_boolean_number_in_the_file_names_its_key(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "wal:\n  quota_bytes: yes\n  segment_max_bytes: true\n"))
    assert "wal.quota_bytes" in problem_for(err, "quota_bytes")
    assert "must be a number, not true" in problem_for(err, "segment_max_bytes")


def test_text_shaped_like_an_exponent_stays_text(tmp_path: Path) -> None:
    """As under YAML 1.1: a YAML 1.2 reader made ``12345678e1234567`` (a token, unquoted)
    and ``1e5`` numbers, and refused configs that loaded before (an audit)."""
    token = "12345678e1234567"
    path = write(
        tmp_path,
        f"security:\n  api_keys:\n    {token}: {{name: 1e5}}\n"
        "schema:\n  label_allowlist: [region, 1e3]\n",
    )
    settings = load_settings(path, env={})
    assert settings.security.api_keys[token].name == "1e5"
    assert settings.schema_.label_allowlist[-1] == "1e3"


def test_dates_in_text_settings_stay_text(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"security:\n  api_keys:\n    {TOKEN_FILE}:\n      name: a\n"
        "      description: 2025-01-01\n",
    )
    [key] = load_settings(path, env={}).security.api_keys.values()
    assert key.description == "2025-01-01"


@pytest.mark.parametrize("raw", ["", "  "])
def test_an_empty_wal_root_path_is_refused(tmp_path: Path, raw: str) -> None:
    """It was read as ``.``: a WAL in the working directory (``/`` under systemd), and the
    real WAL's acknowledged backlog left behind."""
    problem = problem_for(fails(env={"LOGSTACK_WAL_ROOT_PATH": raw}), "root_path")
    assert "must not be empty" in problem and "LOGSTACK_WAL_ROOT_PATH" in problem
    problem = problem_for(fails(write(tmp_path, "wal:\n  root_path: ''\n")), "root_path")
    assert "must not be empty" in problem


@pytest.mark.parametrize(
    ("variable", "said"),
    [
        (
            "LOGSTACK_WAL",
            "unknown setting; a section is set one key at a time (LOGSTACK_WAL_<KEY>)",
        ),
        ("LOGSTACK_PIPELINE", "unknown setting; the pipeline is set in the file only"),
        ("LOGSTACK_COLOUR_X", "unknown setting (no config section 'colour')"),
    ],
)
def test_a_variable_that_is_no_setting_says_why(variable: str, said: str) -> None:
    """``LOGSTACK_WAL='{}'`` was "no config section 'wal'", though ``wal`` is one."""
    assert problem_for(fails(env={variable: "{}"}), variable) == f"{variable}: {said}"


def test_mapping_override_is_parsed_as_json() -> None:
    raw = json.dumps({"email": {"mask_email": True}, "phone": {"keep_suffix": 4}})
    settings = load_settings(None, env={"LOGSTACK_MASKING_PARTIAL_RULES": raw})
    assert settings.masking.partial_rules["phone"].keep_suffix == 4
    assert settings.masking.partial_rules["email"].mask_email is True


def test_detectors_override_as_json() -> None:
    raw = json.dumps([{"name": "order_id", "pattern": r"ORD-\d+"}])
    settings = load_settings(None, env={"LOGSTACK_MASKING_DETECTORS": raw})
    assert [(d.name, d.pattern, d.replacement) for d in settings.masking.detectors] == [
        ("order_id", r"ORD-\d+", "****")
    ]


@pytest.mark.parametrize(
    ("var", "raw", "section", "field", "expected"),
    [
        # Text settings keep the raw string, even when it looks like a number, a
        # boolean, a date or a YAML comment.
        ("LOGSTACK_SECURITY_ADMIN_TOKEN", "12345678901234567890", "security", "admin_token", None),
        (
            "LOGSTACK_SECURITY_ADMIN_TOKEN",
            "#admin-token-0123456789",
            "security",
            "admin_token",
            None,
        ),
        ("LOGSTACK_MASKING_HASH_SECRET", "12345", "masking", "hash_secret", None),
        ("LOGSTACK_MASKING_HASH_SECRET", "yes", "masking", "hash_secret", None),
        ("LOGSTACK_WAL_ROOT_PATH", "2024", "wal", "root_path", Path("2024")),
        ("LOGSTACK_LOKI_USERNAME", "2024-01-01", "loki", "username", None),
        ("LOGSTACK_HOST", "1.5", "server", "host", None),
    ],
)
def test_text_settings_keep_the_raw_string(
    var: str, raw: str, section: str, field: str, expected: Any
) -> None:
    settings = load_settings(None, env={var: raw})
    value = getattr(getattr(settings, "schema_" if section == "schema" else section), field)
    assert value == (raw if expected is None else expected)


def test_optional_text_setting_can_be_unset_with_null(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server: {bound_ports_file: /tmp/ports}\nloki: {urls: ['http://a:3100']}\n",
    )
    env = {"LOGSTACK_SERVER_BOUND_PORTS_FILE": "null", "LOGSTACK_LOKI_BASE_URL": "~"}
    settings = load_settings(path, env=env)
    assert settings.server.bound_ports_file is None
    assert settings.loki.base_url is None
    assert settings.loki.endpoints() == ["http://a:3100"]


def test_server_shortcuts() -> None:
    env = {"LOGSTACK_HOST": "0.0.0.0", "LOGSTACK_PORT": "8080", "LOGSTACK_LOG_LEVEL": "debug"}
    settings = load_settings(None, env=env)
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == 8080
    assert settings.server.log_level == "DEBUG"


@pytest.mark.parametrize("raw", ["debug", "Info", "WARNING", "error"])
def test_log_level_is_case_insensitive(raw: str) -> None:
    assert load_settings(None, env={"LOGSTACK_LOG_LEVEL": raw}).server.log_level == raw.upper()
    assert (
        load_settings(None, env={"LOGSTACK_SERVER_LOG_LEVEL": raw}).server.log_level == raw.upper()
    )


def test_server_shortcut_and_long_form_both_work_and_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "server: {port: 9000, host: 10.0.0.1}\n")
    settings = load_settings(
        path, env={"LOGSTACK_PORT": "9001", "LOGSTACK_SERVER_HOST": "10.0.0.2"}
    )
    assert (settings.server.port, settings.server.host) == (9001, "10.0.0.2")


# Every field of every section must be reachable by LOGSTACK_<SECTION>_<KEY>.

_COMPLEX_VALUES: dict[tuple[str, str], Any] = {
    ("security", "api_keys"): {TOKEN_JSON: {"name": "svc", "active": False}},
    ("masking", "baseline_keys"): [*DEFAULT_BASELINE_KEYS, "ssn"],
    ("masking", "partial_rules"): {"phone": {"keep_suffix": 4}},
    ("masking", "overrides"): {"svc": {"keys": ["iban"], "partial_rules": {}}},
    ("masking", "builtin_detectors"): ["jwt"],
    ("masking", "detectors"): [{"name": "order_id", "pattern": "ORD-[0-9]+"}],
    ("schema", "label_allowlist"): ["zone"],
    ("loki", "urls"): ["http://loki-a:3100", "http://loki-b:3100"],
}
_TEXT_VALUES: dict[tuple[str, str], str] = {
    ("loki", "base_url"): "http://custom-loki:3100",
    ("loki", "push_path"): "/custom/loki/api/v1/push",  # a path: from its leading /
}
_COMPANIONS: dict[tuple[str, str], dict[str, str]] = {("loki", "password"): {"username": "u"}}
"""Other fields of its section a field is only valid with."""


def _valid_override(model: type[BaseModel], section: str, field: str) -> tuple[str, Any]:
    """A valid environment value (raw string) for the field, different from its default."""
    if (section, field) in _COMPLEX_VALUES:
        value = _COMPLEX_VALUES[(section, field)]
        return json.dumps(value), value
    info = model.model_fields[field]
    annotation = info.annotation
    default = info.get_default(call_default_factory=True)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if annotation is bool:
        return str(not default).lower(), not default
    if annotation is int:
        return str(default + 1), default + 1
    if annotation is float:
        return str(default / 2), default / 2
    if typing.get_origin(annotation) is typing.Literal:
        choice = next(c for c in typing.get_args(annotation) if c != default)
        return str(choice), choice
    if annotation is str:
        value = _TEXT_VALUES.get((section, field), f"custom-{section}-{field}-0123456789")
        # (long enough for token fields)
        return value, value
    if annotation is Path:
        return "/srv/custom/path", Path("/srv/custom/path")
    raise AssertionError(f"no test value for {section}.{field}: {annotation!r}; add one")


ALL_FIELDS = [
    (section, field) for section, model in SECTIONS.items() for field in model.model_fields
]


def test_sections_cover_every_settings_section() -> None:
    assert set(SECTIONS) == {
        (info.alias or name) for name, info in Settings.model_fields.items()
    } - {"pipeline"}
    assert len(ALL_FIELDS) > 50


@pytest.mark.parametrize(("section", "field"), ALL_FIELDS, ids=[".".join(f) for f in ALL_FIELDS])
def test_every_field_is_reachable_by_its_env_variable(section: str, field: str) -> None:
    model = SECTIONS[section]
    var = f"LOGSTACK_{section.upper()}_{field.upper()}"
    raw, value = _valid_override(model, section, field)
    companions = _COMPANIONS.get((section, field), {})
    env = {f"LOGSTACK_{section.upper()}_{k.upper()}": v for k, v in companions.items()}
    settings = load_settings(None, env={var: raw, **env})
    got = getattr(getattr(settings, "schema_" if section == "schema" else section), field)
    expected = getattr(model.model_validate({field: value, **companions}), field)
    assert got == expected
    assert got != model.model_fields[field].get_default(call_default_factory=True)


@pytest.mark.parametrize(("section", "field"), ALL_FIELDS, ids=[".".join(f) for f in ALL_FIELDS])
def test_every_field_variable_is_recognised_and_named_on_bad_value(
    section: str, field: str
) -> None:
    var = f"LOGSTACK_{section.upper()}_{field.upper()}"
    # "@@@" is not valid YAML, so it stays a string: wrong for every non-text field.
    env = {var: "@@@"}
    try:
        load_settings(None, env=env)
    except ConfigError as err:
        assert not any("unknown setting" in p for p in err.problems), err.problems
        assert var in str(err)
        if (section, field) != ("security", "api_keys"):
            assert f"{section}.{field}" in str(err)
    else:
        annotation = SECTIONS[section].model_fields[field].annotation
        assert annotation in (str, Path, str | None), (
            f"{var}=@@@ should be rejected for {annotation!r}"
        )


SERVER_FIELDS = list(SECTIONS["server"].model_fields)


@pytest.mark.parametrize("field", SERVER_FIELDS)
def test_every_server_field_has_a_shortcut(field: str) -> None:
    raw, value = _valid_override(SECTIONS["server"], "server", field)
    settings = load_settings(None, env={f"LOGSTACK_{field.upper()}": raw})
    assert getattr(settings.server, field) == getattr(
        SECTIONS["server"].model_validate({field: value}), field
    )


# --------------------------------------------------------------------------------------
# API keys: file < LOGSTACK_SECURITY_API_KEYS < LOGSTACK_API_KEY_<ID>_<FIELD>
# --------------------------------------------------------------------------------------


def _file_with_key(tmp_path: Path, token: str, body: str = "name: from-file") -> Path:
    return write(tmp_path, f"security:\n  api_keys:\n    {token}:\n      {body}\n")


def test_keys_from_all_three_sources_coexist(tmp_path: Path) -> None:
    path = _file_with_key(tmp_path, TOKEN_FILE)
    env = {
        "LOGSTACK_SECURITY_API_KEYS": json.dumps({TOKEN_JSON: {"name": "from-json"}}),
        "LOGSTACK_API_KEY_PAYMENTS_TOKEN": TOKEN_ENV,
        "LOGSTACK_API_KEY_PAYMENTS_NAME": "from-env",
        "LOGSTACK_API_KEY_PAYMENTS_DESCRIPTION": "Payments service API key",
    }
    settings = load_settings(path, env=env)
    assert {t: k.name for t, k in settings.security.api_keys.items()} == {
        TOKEN_FILE: "from-file",
        TOKEN_JSON: "from-json",
        TOKEN_ENV: "from-env",
    }
    assert all(key.active for key in settings.security.api_keys.values())
    assert settings.security.api_keys[TOKEN_ENV].description == "Payments service API key"


def test_json_beats_file_for_the_same_token(tmp_path: Path) -> None:
    path = _file_with_key(tmp_path, TOKEN_SHARED, "{name: from-file, active: true}")
    env = {"LOGSTACK_SECURITY_API_KEYS": json.dumps({TOKEN_SHARED: {"name": "from-json"}})}
    settings = load_settings(path, env=env)
    assert list(settings.security.api_keys) == [TOKEN_SHARED]
    assert settings.security.api_keys[TOKEN_SHARED].name == "from-json"


def test_individual_variables_beat_json_and_file_for_the_same_token(tmp_path: Path) -> None:
    path = _file_with_key(tmp_path, TOKEN_SHARED, "{name: from-file, description: file}")
    env = {
        "LOGSTACK_SECURITY_API_KEYS": json.dumps(
            {TOKEN_SHARED: {"name": "from-json", "description": "json", "active": True}}
        ),
        "LOGSTACK_API_KEY_SVC_TOKEN": TOKEN_SHARED,
        "LOGSTACK_API_KEY_SVC_NAME": "from-env",
        "LOGSTACK_API_KEY_SVC_ACTIVE": "false",
    }
    settings = load_settings(path, env=env)
    assert list(settings.security.api_keys) == [TOKEN_SHARED]
    key = settings.security.api_keys[TOKEN_SHARED]
    assert key.name == "from-env"
    assert key.active is False
    assert key.description == "json"  # not set by the variables: JSON still beats the file


def test_individual_variables_beat_json_without_a_file() -> None:
    env = {
        "LOGSTACK_SECURITY_API_KEYS": json.dumps({TOKEN_SHARED: {"name": "from-json"}}),
        "LOGSTACK_API_KEY_SVC_TOKEN": TOKEN_SHARED,
        "LOGSTACK_API_KEY_SVC_DESCRIPTION": "from env",
    }
    key = load_settings(None, env=env).security.api_keys[TOKEN_SHARED]
    assert key.name == "from-json"  # no NAME variable: the existing name stays
    assert key.description == "from env"


def test_active_defaults_to_true_in_every_source(tmp_path: Path) -> None:
    path = _file_with_key(tmp_path, TOKEN_FILE)
    env = {
        "LOGSTACK_SECURITY_API_KEYS": json.dumps({TOKEN_JSON: {"name": "from-json"}}),
        "LOGSTACK_API_KEY_SVC_TOKEN": TOKEN_ENV,
    }
    keys = load_settings(path, env=env).security.api_keys
    assert [keys[t].active for t in (TOKEN_FILE, TOKEN_JSON, TOKEN_ENV)] == [True, True, True]


@pytest.mark.parametrize("raw", ["false", "False", "no", "0", "off"])
def test_active_false_variable_deactivates_a_file_key(tmp_path: Path, raw: str) -> None:
    path = _file_with_key(tmp_path, TOKEN_FILE, "{name: payments-api, active: true}")
    env = {"LOGSTACK_API_KEY_PAYMENTS_TOKEN": TOKEN_FILE, "LOGSTACK_API_KEY_PAYMENTS_ACTIVE": raw}
    key = load_settings(path, env=env).security.api_keys[TOKEN_FILE]
    assert key.active is False
    assert key.name == "payments-api"


def test_active_true_variable_reactivates_a_json_key() -> None:
    env = {
        "LOGSTACK_SECURITY_API_KEYS": json.dumps({TOKEN_JSON: {"name": "x", "active": False}}),
        "LOGSTACK_API_KEY_X_TOKEN": TOKEN_JSON,
        "LOGSTACK_API_KEY_X_ACTIVE": "true",
    }
    assert load_settings(None, env=env).security.api_keys[TOKEN_JSON].active is True


@pytest.mark.parametrize(
    ("key_id", "name"),
    [("PAYMENTS", "payments"), ("USER_SERVICE", "user-service"), ("SVC2", "svc2")],
)
def test_individual_key_without_name_gets_a_name_from_its_id(key_id: str, name: str) -> None:
    settings = load_settings(None, env={f"LOGSTACK_API_KEY_{key_id}_TOKEN": TOKEN_ENV})
    assert settings.security.api_keys[TOKEN_ENV].name == name


def test_id_may_contain_a_field_word() -> None:
    env = {
        "LOGSTACK_API_KEY_USER_NAME_TOKEN": TOKEN_ENV,
        "LOGSTACK_API_KEY_USER_NAME_NAME": "user-names",
    }
    settings = load_settings(None, env=env)
    assert settings.security.api_keys[TOKEN_ENV].name == "user-names"


def test_several_individual_keys() -> None:
    env = {
        "LOGSTACK_API_KEY_PAYMENTS_TOKEN": "logstack_payments_123456789",
        "LOGSTACK_API_KEY_PAYMENTS_NAME": "payments-api",
        "LOGSTACK_API_KEY_PAYMENTS_ACTIVE": "true",
        "LOGSTACK_API_KEY_USER_TOKEN": "logstack_user_987654321",
        "LOGSTACK_API_KEY_USER_NAME": "user-service",
        "LOGSTACK_API_KEY_USER_ACTIVE": "false",
    }
    named = keys_by_name(load_settings(None, env=env))
    assert named["payments-api"][0] == "logstack_payments_123456789"
    assert named["payments-api"][1].active is True
    assert named["user-service"][0] == "logstack_user_987654321"
    assert named["user-service"][1].active is False


def test_two_individual_keys_with_one_token_are_refused() -> None:
    """The second group silently replaced the first (its name gone, its ``ACTIVE=false``
    applied to both), and check-config said "config OK"."""
    env = {
        "LOGSTACK_API_KEY_A_TOKEN": TOKEN_ENV,
        "LOGSTACK_API_KEY_A_NAME": "alpha",
        "LOGSTACK_API_KEY_B_TOKEN": TOKEN_ENV,
        "LOGSTACK_API_KEY_B_NAME": "beta",
        "LOGSTACK_API_KEY_B_ACTIVE": "false",
    }
    problem = problem_for(fails(env=env), "same token")
    assert "LOGSTACK_API_KEY_B_TOKEN" in problem and "LOGSTACK_API_KEY_A_TOKEN" in problem
    assert TOKEN_ENV not in problem


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    """Two short tokens and a name used twice took three runs of check-config to find."""
    path = write(
        tmp_path,
        "security:\n  api_keys:\n    short_a: {name: a}\n    short_b: {name: b}\n"
        f"    {TOKEN_FILE}: {{name: dup}}\n    {TOKEN_SHARED}: {{name: dup}}\n",
    )
    problem = problem_for(fails(path), "api key")
    assert "api key 'a': token must be at least 16" in problem
    assert "api key 'b': token must be at least 16" in problem
    assert "api key name 'dup' is used by two tokens" in problem


@pytest.mark.parametrize(
    "text",
    [
        # indented one level too little: an unknown key of ``security``
        f'security:\n  api_keys:\n    "{TOKEN_FILE}": {{name: a}}\n'
        f'  "{TOKEN_SHARED}": {{name: b}}\n',
        # at the top level
        f'"{TOKEN_SHARED}": {{name: b}}\n',
        # given twice
        f'security:\n  api_keys:\n    "{TOKEN_SHARED}": {{name: a}}\n    "{TOKEN_SHARED}": {{}}\n',
    ],
    ids=["misindented", "top-level", "duplicated"],
)
def test_a_token_in_the_wrong_place_is_not_printed(tmp_path: Path, text: str) -> None:
    """check-config, the reload log and the admin status printed it: "security.<the token>:
    unknown key" (a secrets audit)."""
    err = fails(write(tmp_path, text))
    assert all(TOKEN_SHARED not in problem for problem in err.problems), err.problems
    assert any("not shown: it may be a token" in problem for problem in err.problems)


def test_an_unknown_key_that_looks_like_a_setting_is_still_named(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "security:\n  rate_limit_brust: 5\nwal:\n  maxBytes: 1\n"))
    assert problem_for(err, "rate_limit_brust") == "security.rate_limit_brust: unknown key"
    assert problem_for(err, "maxBytes") == "wal.maxBytes: unknown key"


@pytest.mark.parametrize("token", ["ADMIN SECRET with space", "admin_token_\x01_0123456789"])
def test_an_admin_token_that_cannot_be_sent_is_refused(token: str) -> None:
    """API keys had this check; the admin token took spaces and control characters."""
    problem = problem_for(fails(env={"LOGSTACK_SECURITY_ADMIN_TOKEN": token}), "admin_token")
    assert "no spaces or control characters" in problem
    assert token not in problem


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://loki.example.com:3100", True),
        ("https://loki.example.com:3100", False),
        ("http://127.0.0.1:3100", False),
        ("http://localhost:3100", False),
    ],
)
def test_loki_credentials_over_plain_http_to_another_host_are_warned(
    url: str, warned: bool
) -> None:
    env = {"LOGSTACK_LOKI_BASE_URL": url, "LOGSTACK_LOKI_BEARER_TOKEN": "loki_bearer_0123456789"}
    said = [w for w in load_settings(None, env=env).warnings() if w.startswith("loki:")]
    assert bool(said) == warned, said
    assert all("loki_bearer" not in w for w in said)
    no_credentials = load_settings(None, env={"LOGSTACK_LOKI_BASE_URL": url})
    assert not [w for w in no_credentials.warnings() if w.startswith("loki:")]


def test_description_variable_stays_text() -> None:
    env = {
        "LOGSTACK_API_KEY_SVC_TOKEN": TOKEN_ENV,
        "LOGSTACK_API_KEY_SVC_DESCRIPTION": "true",
        "LOGSTACK_API_KEY_SVC_NAME": "2024",
    }
    key = load_settings(None, env=env).security.api_keys[TOKEN_ENV]
    assert key.description == "true"
    assert key.name == "2024"


def test_json_keys_with_per_key_settings() -> None:
    raw = json.dumps(
        {
            TOKEN_JSON: {
                "name": "svc",
                "description": "d",
                "rate_limit_rps": 5,
                "rate_limit_burst": 10,
                "loki_tenant": "team-a",
            }
        }
    )
    key = load_settings(None, env={"LOGSTACK_SECURITY_API_KEYS": raw}).security.api_keys[TOKEN_JSON]
    assert (key.rate_limit_rps, key.rate_limit_burst, key.loki_tenant) == (5.0, 10.0, "team-a")


def test_missing_token_is_an_error_naming_the_variable() -> None:
    err = fails(
        env={"LOGSTACK_API_KEY_ORPHAN_NAME": "orphan", "LOGSTACK_API_KEY_ORPHAN_ACTIVE": "1"}
    )
    assert "LOGSTACK_API_KEY_ORPHAN_TOKEN" in problem_for(err, "ORPHAN")


def test_empty_token_is_an_error_naming_the_variable() -> None:
    err = fails(env={"LOGSTACK_API_KEY_ORPHAN_TOKEN": ""})
    assert "LOGSTACK_API_KEY_ORPHAN_TOKEN" in problem_for(err, "ORPHAN")


@pytest.mark.parametrize(
    "var", ["LOGSTACK_API_KEY_SVC_TOKN", "LOGSTACK_API_KEY_TOKEN", "LOGSTACK_API_KEY_SVC_token"]
)
def test_malformed_api_key_variable_is_an_error(var: str) -> None:
    err = fails(env={var: TOKEN_ENV})
    assert var in problem_for(err, var)
    assert TOKEN_ENV not in str(err)


def test_invalid_active_variable_names_the_variable_not_the_token() -> None:
    env = {"LOGSTACK_API_KEY_SVC_TOKEN": TOKEN_ENV, "LOGSTACK_API_KEY_SVC_ACTIVE": "maybe"}
    err = fails(env=env)
    problem = problem_for(err, "active")
    assert "LOGSTACK_API_KEY_SVC_ACTIVE" in problem
    assert "svc" in problem
    assert TOKEN_ENV not in str(err)


def test_invalid_name_variable_names_the_variable_not_the_token() -> None:
    env = {"LOGSTACK_API_KEY_SVC_TOKEN": TOKEN_ENV, "LOGSTACK_API_KEY_SVC_NAME": "bad name!"}
    err = fails(env=env)
    assert "LOGSTACK_API_KEY_SVC_NAME" in problem_for(err, ".name")
    assert TOKEN_ENV not in str(err)


@pytest.mark.parametrize("raw", ['["a", "b"]', "not json {", "42"])
def test_json_keys_variable_must_be_an_object(raw: str) -> None:
    err = fails(env={"LOGSTACK_SECURITY_API_KEYS": raw})
    assert err.problems == ["LOGSTACK_SECURITY_API_KEYS: must be a JSON object of token → key"], (
        err.problems
    )


def test_bad_json_key_names_the_variable_not_the_token() -> None:
    raw = json.dumps({TOKEN_JSON: {"name": "svc", "actve": True}})
    err = fails(env={"LOGSTACK_SECURITY_API_KEYS": raw})
    problem = problem_for(err, "actve")
    assert "unknown key" in problem
    assert "LOGSTACK_SECURITY_API_KEYS" in problem
    assert TOKEN_JSON not in str(err)


def test_two_tokens_with_the_same_name_in_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"security:\n  api_keys:\n"
        f"    {TOKEN_FILE}: {{name: dup}}\n"
        f"    {TOKEN_SHARED}: {{name: dup}}\n",
    )
    err = fails(path)
    assert "'dup'" in problem_for(err, "two tokens")
    assert TOKEN_FILE not in str(err)
    assert TOKEN_SHARED not in str(err)


def test_two_tokens_with_the_same_name_across_sources(tmp_path: Path) -> None:
    path = _file_with_key(tmp_path, TOKEN_FILE, "name: payments")
    env = {"LOGSTACK_API_KEY_PAYMENTS_TOKEN": TOKEN_ENV}  # default name "payments"
    err = fails(path, env)
    assert "'payments'" in problem_for(err, "two tokens")
    assert TOKEN_FILE not in str(err)
    assert TOKEN_ENV not in str(err)


def test_too_short_token_in_the_file(tmp_path: Path) -> None:
    short = "abc123secret"
    err = fails(_file_with_key(tmp_path, short, "name: shorty"))
    problem = problem_for(err, "16 characters")
    assert "shorty" in problem
    assert short not in str(err)


def test_too_short_token_in_json() -> None:
    short = "abc123secret"
    err = fails(env={"LOGSTACK_SECURITY_API_KEYS": json.dumps({short: {"name": "shorty"}})})
    assert "shorty" in problem_for(err, "16 characters")
    assert short not in str(err)


def test_too_short_token_variable_names_the_variable() -> None:
    short = "abc123secret"
    err = fails(env={"LOGSTACK_API_KEY_SVC_TOKEN": short})
    assert "LOGSTACK_API_KEY_SVC_TOKEN" in problem_for(err, "16 characters")
    assert short not in str(err)


def test_numeric_token_in_yaml_is_an_error_not_a_crash(tmp_path: Path) -> None:
    token = "12345678901234567890"
    err = fails(_file_with_key(tmp_path, token, "name: numeric"))
    assert "security.api_keys" in problem_for(err, "string")
    assert token not in str(err)


def test_api_keys_must_be_a_mapping(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "security:\n  api_keys: [a, b]\n"))
    assert "security.api_keys" in problem_for(err, "mapping")


@pytest.mark.parametrize(
    "body",
    [
        "{name: 'has space'}",  # bad name pattern
        "{name: svc, colour: red}",  # unknown key
        "{name: svc, active: maybe}",  # wrong type
        "{name: svc, rate_limit_rps: -1}",  # out of range
        "just-a-string",  # not a mapping
        "{active: true}",  # name missing
    ],
)
def test_tokens_are_never_echoed(tmp_path: Path, body: str) -> None:
    err = fails(_file_with_key(tmp_path, TOKEN_FILE, body))
    assert TOKEN_FILE not in str(err)
    assert all(TOKEN_FILE not in p for p in err.problems)
    assert any("security.api_keys.<token" in p for p in err.problems), err.problems


def test_token_is_not_echoed_by_a_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, f"security:\n  api_keys:\n    {TOKEN_FILE}: {{name: svc\n")
    err = fails(path)
    assert TOKEN_FILE not in str(err)
    assert str(path) in problem_for(err, "YAML")


def test_admin_token_is_not_echoed() -> None:
    err = fails(env={"LOGSTACK_SECURITY_ADMIN_TOKEN": "too-short-tok"})
    problem = problem_for(err, "admin_token")
    assert "LOGSTACK_SECURITY_ADMIN_TOKEN" in problem
    assert "too-short-tok" not in str(err)


# --------------------------------------------------------------------------------------
# Bad configurations
# --------------------------------------------------------------------------------------


def test_unknown_key_in_file(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "wal:\n  segmnt_max_bytes: 1000000\n"))
    assert err.problems == ["wal.segmnt_max_bytes: unknown key"]
    assert "wal.segmnt_max_bytes: unknown key" in str(err)


def test_unknown_section_in_file(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "walx:\n  root_path: /x\n"))
    assert err.problems == ["walx: unknown key"]


def test_seed_readme_keys_are_rejected(tmp_path: Path) -> None:
    """The seed README's ``wal_root_path`` / ``timeout_seconds`` are not our keys."""
    err = fails(write(tmp_path, "wal: {wal_root_path: ./wal}\nloki: {timeout_seconds: 30}\n"))
    assert set(err.problems) == {
        "wal.wal_root_path: unknown key",
        "loki.timeout_seconds: unknown key",
    }


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("server: {port: abc}", "server.port"),
        ("server: {debug: perhaps}", "server.debug"),
        ("server: {log_level: loud}", "server.log_level"),
        ("wal: {segment_max_bytes: 1.5}", "wal.segment_max_bytes"),
        ("wal: {fsync: sometimes}", "wal.fsync"),
        ("schema: {label_allowlist: region}", "schema.label_allowlist"),
        ("schema: {label_allowlist: [region, [x]]}", "schema.label_allowlist[1]"),
        ("loki: {timeout_s: soon}", "loki.timeout_s"),
        ("masking: {partial_rules: {email: {keep_prefix: -1}}}", "masking.partial_rules.email"),
        ("wal: 5", "wal"),
        ("pipeline: [{name: x}]", "pipeline[0].type"),
    ],
)
def test_wrong_types_name_the_key(tmp_path: Path, text: str, where: str) -> None:
    err = fails(write(tmp_path, text + "\n"))
    assert any(p.startswith(where) for p in err.problems), err.problems


def test_security_section_must_be_a_mapping(tmp_path: Path) -> None:
    for text in ("security: [1, 2]\n", "security: abc\n", "security: 5\n"):
        err = fails(write(tmp_path, text))
        assert any(p.startswith("security") for p in err.problems), err.problems


@pytest.mark.parametrize("port", [-1, 65536, 70000])
def test_out_of_range_port_in_file(tmp_path: Path, port: int) -> None:
    err = fails(write(tmp_path, f"server: {{port: {port}}}\n"))
    assert problem_for(err, "server.port").startswith("server.port:")


@pytest.mark.parametrize("var", ["LOGSTACK_PORT", "LOGSTACK_SERVER_PORT"])
def test_out_of_range_port_from_env_names_the_variable(var: str) -> None:
    err = fails(env={var: "70000"})
    problem = problem_for(err, "server.port")
    assert f"(from {var})" in problem
    assert "65535" in problem


def test_wrong_type_from_env_names_key_and_variable(tmp_path: Path) -> None:
    err = fails(
        write(tmp_path, "wal: {segment_max_bytes: 8192}\n"),
        {"LOGSTACK_WAL_SEGMENT_MAX_BYTES": "lots"},
    )
    problem = problem_for(err, "wal.segment_max_bytes")
    assert "LOGSTACK_WAL_SEGMENT_MAX_BYTES" in problem


def test_below_minimum_segment_size_from_env() -> None:
    err = fails(env={"LOGSTACK_WAL_SEGMENT_MAX_BYTES": "100"})
    assert "LOGSTACK_WAL_SEGMENT_MAX_BYTES" in problem_for(err, "wal.segment_max_bytes")


def test_bad_list_item_from_env_names_the_variable() -> None:
    err = fails(env={"LOGSTACK_SCHEMA_LABEL_ALLOWLIST": "[region, [x]]"})
    problem = problem_for(err, "schema.label_allowlist[1]")
    assert "LOGSTACK_SCHEMA_LABEL_ALLOWLIST" in problem


@pytest.mark.parametrize(
    ("var", "expected"),
    [
        ("LOGSTACK_WAL_SEGMNT_MAX_BYTES", "unknown setting wal.segmnt_max_bytes"),
        ("LOGSTACK_WALL_ROOT_PATH", "unknown setting"),
        ("LOGSTACK_BOGUS", "unknown setting"),
        ("LOGSTACK_LOKI", "unknown setting"),
        ("LOGSTACK_PIPELINE", "unknown setting"),
        ("LOGSTACK_SECURITY_API_KEY", "unknown setting security.api_key"),
    ],
)
def test_unknown_logstack_variable(var: str, expected: str) -> None:
    err = fails(env={var: "1"})
    problem = problem_for(err, var)
    assert problem.startswith(f"{var}:")
    assert expected in problem


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "server:\n  port: [8000\n")
    err = fails(path)
    assert len(err.problems) == 1
    assert err.problems[0].startswith(f"{path}: cannot read YAML")
    assert "line" in err.problems[0]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    err = fails(path)
    assert err.problems == [f"{path}: top level must be a mapping"]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = fails(path)
    assert err.problems == [f"{path}: no such file"]


def test_missing_file_from_logstack_config(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    err = fails(env={"LOGSTACK_CONFIG": str(path)})
    assert err.problems == [f"{path}: no such file"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    err = fails(tmp_path)
    assert str(tmp_path) in err.problems[0]


def test_invalid_detector_regex_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, "masking:\n  detectors:\n    - {name: broken, pattern: '(unclosed'}\n")
    err = fails(path)
    problem = problem_for(err, "masking.detectors[0].pattern")
    assert "regular expression" in problem


def test_invalid_detector_regex_from_env() -> None:
    raw = json.dumps([{"name": "ok", "pattern": "a+"}, {"name": "broken", "pattern": "[a-"}])
    err = fails(env={"LOGSTACK_MASKING_DETECTORS": raw})
    problem = problem_for(err, "masking.detectors[1].pattern")
    assert "regular expression" in problem
    assert "LOGSTACK_MASKING_DETECTORS" in problem


def test_removing_a_baseline_masking_key_in_file(tmp_path: Path) -> None:
    kept = [k for k in DEFAULT_BASELINE_KEYS if k != "email"]
    err = fails(write(tmp_path, f"masking:\n  baseline_keys: {json.dumps(kept)}\n"))
    problem = problem_for(err, "baseline_keys")
    assert problem.startswith("masking")
    assert "'email'" in problem


def test_removing_a_baseline_masking_key_from_env() -> None:
    err = fails(env={"LOGSTACK_MASKING_BASELINE_KEYS": "[password, token]"})
    problem = problem_for(err, "baseline_keys")
    assert "'secret'" in problem
    assert "LOGSTACK_MASKING_BASELINE_KEYS" in problem


def test_adding_baseline_keys_is_fine() -> None:
    raw = json.dumps([*DEFAULT_BASELINE_KEYS, "ssn"])
    settings = load_settings(None, env={"LOGSTACK_MASKING_BASELINE_KEYS": raw})
    assert "ssn" in settings.masking.baseline_keys


def test_loki_needs_a_url() -> None:
    err = fails(env={"LOGSTACK_LOKI_BASE_URL": "null"})
    problem = problem_for(err, "loki")
    assert "base_url" in problem
    assert "LOGSTACK_LOKI_BASE_URL" in problem


def test_unknown_builtin_detector(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "masking: {builtin_detectors: [email, ssn]}\n"))
    problem_for(err, "masking.builtin_detectors[1]")


def test_several_problems_are_reported_together(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
server: {{port: 70000}}
wal: {{segmnt_max_bytes: 1}}
bogus: {{}}
masking:
  detectors: [{{name: broken, pattern: "(" }}]
security:
  api_keys:
    {TOKEN_FILE}: {{name: "bad name"}}
""",
    )
    env = {
        "LOGSTACK_LOKI_TIMEOUT_S": "soon",
        "LOGSTACK_NOPE": "1",
        "LOGSTACK_API_KEY_ORPHAN_NAME": "orphan",
        "HOME": "/root",
    }
    err = fails(path, env)
    expected = [
        "server.port",
        "wal.segmnt_max_bytes: unknown key",
        "bogus: unknown key",
        "masking.detectors[0].pattern",
        "security.api_keys.<token",
        "loki.timeout_s",
        "LOGSTACK_NOPE: unknown setting",
        "LOGSTACK_API_KEY_ORPHAN_TOKEN",
    ]
    for needle in expected:
        assert any(needle in p for p in err.problems), (needle, err.problems)
        assert needle in str(err)
    assert "(from LOGSTACK_LOKI_TIMEOUT_S)" in problem_for(err, "loki.timeout_s")
    assert len(err.problems) == len(expected)
    assert TOKEN_FILE not in str(err)


def test_env_problems_alone_are_reported_even_if_validation_passes() -> None:
    err = fails(env={"LOGSTACK_NOPE": "1"})
    assert err.problems == ["LOGSTACK_NOPE: unknown setting (no config section 'nope')"]


def test_hash_rule_without_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "masking:\n  overrides:\n    svc:\n      partial_rules:\n        user_id: {hash: true}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert "hash_secret is required" in str(info.value)
    assert "overrides.svc.user_id" in str(info.value)
    ok = load_settings(path, env={"LOGSTACK_MASKING_HASH_SECRET": "s3cr3t-for-hmac"})
    assert ok.masking.overrides["svc"].partial_rules["user_id"].hash


def test_listen_backlog_reaches_hypercorn() -> None:
    """Hypercorn's own default (100) made a burst of 300 connects wait for SYN retries."""
    from logstack._service import hypercorn_config

    assert hypercorn_config(load_settings(env={})).backlog == 1024
    tuned = load_settings(env={"LOGSTACK_SERVER_LISTEN_BACKLOG": "4096"})
    assert hypercorn_config(tuned).backlog == 4096
    with pytest.raises(ConfigError, match="listen_backlog"):
        load_settings(env={"LOGSTACK_SERVER_LISTEN_BACKLOG": "0"})


@pytest.mark.parametrize("where", ["security", "key"])
def test_a_burst_below_one_request_is_refused(where: str) -> None:
    """A bucket that can never hold one token would answer 429 forever."""
    env = {"LOGSTACK_SECURITY_RATE_LIMIT_BURST": "0.5"}
    if where == "key":
        env = {
            "LOGSTACK_SECURITY_API_KEYS": json.dumps(
                {"token_0123456789abcdef": {"name": "svc", "rate_limit_burst": 0.5}}
            )
        }
    with pytest.raises(ConfigError, match="rate_limit_burst"):
        load_settings(env=env)


def test_a_masked_key_without_a_letter_or_digit_is_refused(tmp_path: Path) -> None:
    """Keys are compared on their letters and digits alone: ``---`` could never match."""
    path = tmp_path / "config.yaml"
    path.write_text(
        "masking:\n"
        "  partial_rules: {'***': {keep_prefix: 1}}\n"
        "  overrides:\n    svc:\n      keys: [pin, '---', пароль]\n"
    )
    problem = problem_for(fails(path), "letter or a digit")
    assert "overrides.svc.keys[1] ('---')" in problem
    assert "partial_rules.*** ('***')" in problem
    assert "пароль" not in problem  # letters of any script count


def test_an_override_for_no_api_key_is_a_warning(tmp_path: Path) -> None:
    """Valid (the key may come later), but likely a typo that leaves values unmasked."""
    path = tmp_path / "config.yaml"
    path.write_text(
        f"security:\n  api_keys:\n    {TOKEN_JSON}: {{name: billing}}\n"
        "masking:\n  overrides:\n    billing: {keys: [iban]}\n    biling: {keys: [iban]}\n"
    )
    assert load_settings(path, env={}).warnings() == [
        "masking.overrides.biling: no API key is named 'biling', so these rules apply to no request"
    ]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:3100", "not an http:// or https:// URL with a host"),
        ("ftp://loki", "not an http:// or https:// URL with a host"),
        ("http://", "not an http:// or https:// URL with a host"),
        ("http://loki:99999", "not a usable URL"),
        ("http://lo ki:3100", "a URL cannot hold spaces"),
        ("http://loki:0", "port 0"),
    ],
)
def test_a_loki_url_the_forwarder_cannot_use_fails_the_config(url: str, problem: str) -> None:
    """It used to pass, and the forwarder then retried forever while the WAL filled."""
    err = fails(env={"LOGSTACK_LOKI_BASE_URL": url})
    assert problem in problem_for(err, "loki.base_url")
    err = fails(env={"LOGSTACK_LOKI_URLS": json.dumps(["http://good:3100", url])})
    assert problem in problem_for(err, "loki.urls")


def test_credentials_in_a_loki_url_are_refused_without_being_repeated() -> None:
    """A URL is shown in logs, /readyz and admin status; the forwarder never sent them."""
    err = fails(env={"LOGSTACK_LOKI_BASE_URL": "http://loki-user:S3cretLokiPass@loki:3100"})
    problem = problem_for(err, "loki.base_url")
    assert "set loki.username and loki.password" in problem
    assert "S3cretLokiPass" not in str(err) and "loki-user" not in str(err)


def test_loki_credentials_are_one_kind() -> None:
    ok = load_settings(env={"LOGSTACK_LOKI_USERNAME": "123", "LOGSTACK_LOKI_PASSWORD": "tok"})
    assert ok.loki.authorization() == "Basic MTIzOnRvaw=="
    bearer = load_settings(env={"LOGSTACK_LOKI_BEARER_TOKEN": "abc"})
    assert bearer.loki.authorization() == "Bearer abc"
    assert load_settings(env={}).loki.authorization() is None
    both = fails(env={"LOGSTACK_LOKI_USERNAME": "u", "LOGSTACK_LOKI_BEARER_TOKEN": "abc"})
    assert "either loki.bearer_token or loki.username/password" in str(both)
    alone = fails(env={"LOGSTACK_LOKI_PASSWORD": "tok"})
    assert "loki.password needs loki.username" in str(alone)


def test_no_active_api_key_is_a_warning() -> None:
    """Valid (a deployment may add keys by SIGHUP), but nothing can be ingested."""
    warning = "security.api_keys: no active API key, so every ingest request gets 401"
    assert load_settings(env={}).warnings() == [warning]
    inactive = json.dumps({TOKEN_JSON: {"name": "svc", "active": False}})
    assert load_settings(env={"LOGSTACK_SECURITY_API_KEYS": inactive}).warnings() == [warning]
    active = json.dumps({TOKEN_JSON: {"name": "svc"}})
    assert load_settings(env={"LOGSTACK_SECURITY_API_KEYS": active}).warnings() == []


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (b"server:\n  host: caf\xe9\n", "not UTF-8 text"),
        (b"a: " + b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
        (b"security:\n  rate_limit_rps: 5\nsecurity:\n  rate_limit_rps: 6\n", "twice"),
        (b"loki:\n  push_path: loki/api/v1/push\n", "loki.push_path"),
        (b"security:\n  rate_limit_rps: .inf\n", "security.rate_limit_rps"),
        (b"loki:\n  timeout_s: .inf\n", "loki.timeout_s"),
    ],
    ids=["latin-1", "deep", "duplicate-key", "push-path", "inf-rate", "inf-timeout"],
)
def test_a_file_that_cannot_be_a_configuration_is_a_config_error(
    tmp_path: Path, text: bytes, problem: str
) -> None:
    """Each was either a traceback (exit 1), or accepted: the second ``security:`` block
    silently replaced the first, an infinite rate made a 500, a push path without its
    ``/`` failed every push."""
    path = tmp_path / "config.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as refused:
        load_settings(path, env={})
    assert problem in str(refused.value)


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "base: &base {rate_limit_rps: 5, rate_limit_burst: 10}\n"
        "security:\n  <<: *base\n  rate_limit_rps: 7\n"
    )
    with pytest.raises(ConfigError, match="base: unknown"):  # the anchor's own key
        load_settings(path, env={})
    path.write_text(
        "security:\n  <<: {rate_limit_rps: 5, rate_limit_burst: 10}\n  rate_limit_rps: 7\n"
    )
    security = load_settings(path, env={}).security
    assert (security.rate_limit_rps, security.rate_limit_burst) == (7, 10)


@pytest.mark.parametrize(
    ("token", "tenant"),
    [
        ("token with a space 0123456789", None),
        ("token_with_a_newline\n0123456789", None),
        ("good_token_0123456789abcdef", "team-a\r\nX-Injected: 1"),
        ("good_token_0123456789abcdef", "x" * 151),
    ],
    ids=["space-in-token", "newline-in-token", "crlf-in-tenant", "long-tenant"],
)
def test_tokens_and_tenants_must_fit_in_a_header(token: str, tenant: str | None) -> None:
    """A tenant with a CR/LF passed ``check-config`` and then failed every push of its key
    for good; a token with a space can never be sent."""
    key: dict[str, Any] = {"name": "payments-api"}
    if tenant is not None:
        key["loki_tenant"] = tenant
    with pytest.raises(ValueError):
        Settings.model_validate({"security": {"api_keys": {token: key}}})


def test_a_reload_refuses_an_empty_file_and_reports_any_failure(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("")
    assert load_settings(path, env={}).security.api_keys == {}  # at start: the defaults
    with pytest.raises(ConfigError, match="the file is empty"):
        load_settings_for_reload(path)


def test_a_setting_given_by_two_variables_is_refused() -> None:
    """``LOGSTACK_PORT`` and ``LOGSTACK_SERVER_PORT`` both set: the second won, silently."""
    with pytest.raises(ConfigError, match="LOGSTACK_PORT and LOGSTACK_SERVER_PORT both set"):
        load_settings(env={"LOGSTACK_PORT": "8001", "LOGSTACK_SERVER_PORT": "8002"})
    assert load_settings(env={"LOGSTACK_PORT": "8001"}).server.port == 8001


@pytest.mark.parametrize(
    ("host", "warned"),
    [("0.0.0.0", True), ("10.1.2.3", True), ("::", True), ("127.0.0.1", False), ("::1", False)],
)
def test_the_published_example_tokens_on_a_reachable_address_are_warned(
    host: str, warned: bool
) -> None:
    """config.yaml's demo keys and admin token are in the README for anyone to read."""
    settings = load_settings(SHIPPED_CONFIG, env={"LOGSTACK_SERVER_HOST": host})
    said = [w for w in settings.warnings() if w.startswith("security:")]
    assert bool(said) == warned, said
    if warned:
        [warning] = said
        assert "'payments-api'" in warning and "'user-service'" in warning
        assert "the admin token" in warning
        assert not any(token in warning for token in PUBLISHED_TOKENS)


def test_the_published_tokens_are_those_of_the_shipped_config() -> None:
    settings = load_settings(SHIPPED_CONFIG, env={})
    shipped = {*settings.security.api_keys, settings.security.admin_token}
    assert shipped == PUBLISHED_TOKENS


def test_own_tokens_on_a_reachable_address_are_not_warned() -> None:
    env = {
        "LOGSTACK_SERVER_HOST": "0.0.0.0",
        "LOGSTACK_SECURITY_API_KEYS": '{"own_token_0123456789abcdef": {"name": "a"}}',
        "LOGSTACK_SECURITY_ADMIN_TOKEN": "own_admin_token_0123456789",
    }
    assert not [w for w in load_settings(None, env=env).warnings() if w.startswith("security:")]
