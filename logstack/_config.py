"""Configuration: ``config.yaml`` + ``LOGSTACK_*`` environment overrides, strictly validated.

Sources, lowest to highest priority:

1. the YAML file (``--config`` or ``LOGSTACK_CONFIG``);
2. ``LOGSTACK_<SECTION>_<KEY>`` variables, one per key (server keys also as
   ``LOGSTACK_<KEY>``); values are parsed as YAML scalars, so JSON lists and objects work;
3. for API keys: ``LOGSTACK_SECURITY_API_KEYS`` (JSON) beats the file and
   ``LOGSTACK_API_KEY_<ID>_<TOKEN|NAME|ACTIVE|DESCRIPTION>`` beats both, per token.

Every problem is collected and reported at once, each naming its key (and the variable
it came from), and unknown keys are errors, never ignored.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Any, Final, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError

from ._errors import ConfigError
from ._key_names import normalise_key

ENV_PREFIX = "LOGSTACK_"
KEY_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_WORKERS = 64
"""Most worker processes ``server.workers`` / ``--workers`` allows."""
DEFAULT_BASELINE_KEYS = (
    "password",
    "token",
    "authorization",
    "api_key",
    "secret",
    "card_number",
    "email",
)


def _field_types(annotation: Any) -> set[Any]:
    """The types a field's annotation allows (``int | None``: ``{int, NoneType}``)."""
    if get_origin(annotation) in (Union, UnionType):
        return set(get_args(annotation))
    return {annotation}


def _is_number(annotation: Any) -> bool:
    """``int``, ``float`` or either of them optional."""
    non_null = _field_types(annotation) - {type(None)}
    return bool(non_null) and non_null <= {int, float}


class NumbersNotBooleans(BaseModel):
    """A model whose number fields refuse ``true``/``false`` (the settings, and every
    stage's options: ``keep_last: true`` passed check-config as 1)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Pydantic takes ``true`` for 1: ``LOGSTACK_WAL_QUOTA_BYTES=on`` (a flag set in the
        wrong variable) gave a quota of one byte and every request a 429."""
        name = info.field_name
        if isinstance(value, bool) and name and _is_number(cls.model_fields[name].annotation):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


class _Strict(NumbersNotBooleans):
    # No ``.inf``: an infinite rate, wait or timeout is a typo, and some break arithmetic
    # later (a Retry-After of ``ceil(inf)``).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ServerSettings(_Strict):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    debug: bool = Field(False, description="Verbose service logs.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Service log level (case-insensitive)."
    )
    log_format: Literal["json", "text"] = Field("json", description="Service log format.")
    max_body_bytes: int = Field(
        1024 * 1024, gt=0, description="Largest decoded request body accepted (413 above)."
    )
    max_connections: int = Field(
        4096,
        ge=1,
        description="Connections served at once (per worker); more wait in the listen backlog "
        "until one ends (an idle one costs ~15 KiB and is closed after 75 s).",
    )
    max_body_bytes_in_flight: int = Field(
        32 * 1024 * 1024,
        gt=0,
        description="Memory held by requests at once over all connections (per worker): a "
        "body counts as its bytes arrive, then 5x its JSON size once whole (itself and its "
        "decoded form; a gzip body once inflated). A request that would pass it is answered "
        "503; one alone never is.",
    )
    pipeline_capacity: int = Field(
        256, gt=0, description="Requests queued at the pipeline head before 503 answers."
    )
    listen_backlog: int = Field(
        1024,
        ge=1,
        le=65535,
        description="Connections the kernel holds before they are accepted (capped by "
        "net.core.somaxconn): hundreds of clients connecting at once wait in it.",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the WAL ack.")
    shutdown_grace_s: float = Field(
        10.0, gt=0, description="Time allowed to drain in-flight work on SIGTERM/SIGINT."
    )
    bound_ports_file: str | None = Field(
        None, description="If set, the bound address is written here once listening."
    )
    workers: int = Field(
        1,
        ge=1,
        le=MAX_WORKERS,
        description="Worker processes sharing the port, each with its own WAL shard "
        "(rate limits and WAL quotas are split between them).",
    )

    @model_validator(mode="after")
    def _one_body_fits(self) -> ServerSettings:
        if self.max_body_bytes_in_flight < self.max_body_bytes:
            raise ValueError(
                "max_body_bytes_in_flight must be at least max_body_bytes, or a body of the "
                "largest size could never be received"
            )
        return self

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


_HEADER_WORD: Final = re.compile(r"[\x21-\x7e]+")
"""Printable ASCII without spaces: what an HTTP header value can carry as one word."""
LOKI_TENANT_PATTERN: Final = r"^[A-Za-z0-9!\-_.*'()]{1,150}$"
"""Loki's tenant ID rules (its multi-tenancy docs): a CR/LF in one made every push of the
key fail for good, and ``check-config`` said OK."""


class ApiKey(_Strict):
    """One API key. The token itself is the mapping key in ``security.api_keys``."""

    name: str = Field(pattern=KEY_NAME_PATTERN, description="Names the key in logs, metrics, WAL.")
    active: bool = Field(True, description="Inactive keys are refused with 401.")
    description: str = Field("", description="Free text for operators.")
    rate_limit_rps: float | None = Field(
        None, gt=0, description="Overrides security.rate_limit_rps for this key."
    )
    rate_limit_burst: float | None = Field(
        None, ge=1, description="Overrides security.rate_limit_burst for this key."
    )
    loki_tenant: str | None = Field(
        None,
        pattern=LOKI_TENANT_PATTERN,
        description="X-Scope-OrgID sent for this key (Loki's tenant ID characters, ≤ 150).",
    )


class SecuritySettings(_Strict):
    rate_limit_rps: float = Field(100.0, gt=0, description="Token-bucket refill per key.")
    rate_limit_burst: float = Field(
        200.0, ge=1, description="Token-bucket size per key (≥ 1: one request must fit)."
    )
    admin_token: str | None = Field(
        None, min_length=16, description="Bearer token of the admin endpoints (not an API key)."
    )
    api_keys: dict[str, ApiKey] = Field(
        default_factory=dict, description="Token → key; see the API-key sources below."
    )

    @model_validator(mode="after")
    def _check_keys(self) -> SecuritySettings:
        # Every key's problem at once (it took one run per bad key), in one message:
        # pydantic reports one error per validator.
        problems: list[str] = []
        seen: set[str] = set()
        for token, key in self.api_keys.items():
            if len(token) < 16:
                problems.append(f"api key {key.name!r}: token must be at least 16 characters")
            elif not _HEADER_WORD.fullmatch(token):
                problems.append(
                    f"api key {key.name!r}: a token is sent as 'Bearer <token>': no spaces or "
                    "control characters"
                )
            if key.name in seen:
                problems.append(f"api key name {key.name!r} is used by two tokens")
            seen.add(key.name)
        admin = self.admin_token
        if admin is not None and not _HEADER_WORD.fullmatch(admin):
            problems.append(
                "admin_token: a token is sent as 'Bearer <token>': no spaces or control characters"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class PartialRule(_Strict):
    keep_prefix: int = Field(0, ge=0, description="Keep this many leading characters.")
    keep_suffix: int = Field(0, ge=0, description="Keep this many trailing characters.")
    mask_email: bool = Field(False, description="example@email.com → e*****e@email.com.")
    hash: bool = Field(False, description="Replace by HMAC-SHA256 (stable, for correlation).")


class KeyMaskingOverride(_Strict):
    keys: list[str] = Field(default_factory=list, description="Extra keys masked for this key.")
    partial_rules: dict[str, PartialRule] = Field(
        default_factory=dict, description="Extra partial rules for this key."
    )


class ValueDetector(_Strict):
    name: str = Field(pattern=r"^[a-z0-9_]+$", description="Counted as detector:<name>.")
    pattern: str = Field(description="Python regular expression; every match is replaced.")
    replacement: str = Field("****", description="Text put in place of each match.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return value


BuiltinDetector = Literal["email", "card_number", "jwt", "bearer"]
BUILTIN_DETECTORS: tuple[BuiltinDetector, ...] = ("email", "card_number", "jwt", "bearer")


class MaskingSettings(_Strict):
    baseline_keys: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BASELINE_KEYS),
        description="Keys masked for every API key (may be extended, never reduced).",
    )
    partial_rules: dict[str, PartialRule] = Field(
        default_factory=lambda: {
            "authorization": PartialRule(keep_prefix=5),
            "email": PartialRule(mask_email=True),
        },
        description="Key → partial rule; keys without one become ****.",
    )
    hash_secret: str = Field("", description="HMAC key for `hash: true` rules.")
    overrides: dict[str, KeyMaskingOverride] = Field(
        default_factory=dict, description="Per API-key name: extra keys and rules."
    )
    builtin_detectors: list[BuiltinDetector] = Field(
        default_factory=lambda: list(BUILTIN_DETECTORS),
        description="Value detectors scanning message and string values.",
    )
    detectors: list[ValueDetector] = Field(
        default_factory=list, description="User value detectors (name, pattern, replacement)."
    )

    @model_validator(mode="after")
    def _baseline_kept(self) -> MaskingSettings:
        missing = [k for k in DEFAULT_BASELINE_KEYS if k not in self.baseline_keys]
        if missing:
            raise ValueError(f"baseline_keys must keep the baseline; missing {missing}")
        return self

    @model_validator(mode="after")
    def _keys_can_match(self) -> MaskingSettings:
        named = [(f"baseline_keys[{i}]", k) for i, k in enumerate(self.baseline_keys)]
        named += [(f"partial_rules.{k}", k) for k in self.partial_rules]
        for name, override in self.overrides.items():
            named += [(f"overrides.{name}.keys[{i}]", k) for i, k in enumerate(override.keys)]
            named += [(f"overrides.{name}.partial_rules.{k}", k) for k in override.partial_rules]
        empty = [f"{where} ({key!r})" for where, key in named if not normalise_key(key)]
        if empty:
            raise ValueError(
                "a masked key needs a letter or a digit (keys are compared on those alone, "
                f"so this one could never match): {', '.join(empty)}"
            )
        return self

    @model_validator(mode="after")
    def _hash_needs_secret(self) -> MaskingSettings:
        rules = [(k, r) for k, r in self.partial_rules.items()]
        for name, override in self.overrides.items():
            rules += [(f"overrides.{name}.{k}", r) for k, r in override.partial_rules.items()]
        hashed = [k for k, rule in rules if rule.hash]
        if hashed and not self.hash_secret:
            raise ValueError(
                f"hash_secret is required when a partial rule uses hash: true ({', '.join(hashed)})"
            )
        return self


class SchemaSettings(_Strict):
    label_allowlist: list[str] = Field(
        default_factory=lambda: ["region", "tenant", "schema_version", "version"],
        description="Entry labels allowed (service, env, level are always accepted, ignored).",
    )
    max_entries: int = Field(500, gt=0, description="Most entries in one request.")
    max_entry_bytes: int = Field(32 * 1024, gt=0, description="Largest entry, JSON-encoded.")
    max_message_chars: int = Field(8192, gt=0, description="Longest message.")
    max_labels: int = Field(6, ge=0, description="Most allowed labels per entry.")
    max_metadata_depth: int = Field(5, gt=0, description="Deepest metadata nesting.")


class WalSettings(_Strict):
    root_path: Path = Field(
        Path("./wal"),
        description="Directory holding one folder per key (relative: to the working directory).",
    )
    segment_max_bytes: int = Field(
        128 * 1024 * 1024, ge=4096, description="Rotate the active segment at this size."
    )
    segment_max_age_s: float = Field(
        300.0, gt=0, description="Rotate an active segment this old (if ≥ min_rotate_bytes)."
    )
    segment_min_rotate_bytes: int = Field(
        64 * 1024, ge=0, description="Age rotation only for segments at least this large."
    )
    segment_idle_s: float = Field(3600.0, gt=0, description="Rotate after this long unwritten.")
    segment_force_s: float = Field(6 * 3600.0, gt=0, description="Always rotate at this age.")
    quota_bytes: int = Field(2 * 1024**3, gt=0, description="WAL bytes quota per key.")
    quota_age_s: float = Field(
        24 * 3600.0, gt=0, description="Age quota of the oldest undelivered entry per key."
    )
    quota_soft_ratio: float = Field(
        0.8, gt=0, le=1, description="Share of a quota at which the key gets 429."
    )
    min_free_disk_ratio: float = Field(
        0.2, ge=0, lt=1, description="Below this free share of the WAL disk, ingest gets 503."
    )
    fsync: Literal["always", "interval"] = Field(
        "always", description="always: 202 after fsync. interval: fsync every fsync_interval_ms."
    )
    fsync_interval_ms: int = Field(100, gt=0, description="Period of fsync: interval.")

    @field_validator("root_path", mode="before")
    @classmethod
    def _root_path_given(cls, value: Any) -> Any:
        # An empty value (``LOGSTACK_WAL_ROOT_PATH=`` from an unfilled template) was read
        # as ``.``: a WAL in whatever the working directory is, the real one's acknowledged
        # backlog left undelivered.
        if isinstance(value, str) and not value.strip():
            raise ValueError("must not be empty")
        return value


class LokiSettings(_Strict):
    base_url: str | None = Field("http://localhost:3100", description="One Loki URL.")
    urls: list[str] = Field(
        default_factory=list,
        description="Several Loki URLs, used round-robin (unhealthy ones skipped); beats base_url.",
    )
    push_path: str = Field(
        "/loki/api/v1/push",
        pattern=r"^/\S*$",
        description="Loki's push API path (from its leading /).",
    )
    username: str | None = Field(
        None, description="HTTP basic auth user (e.g. a Grafana Cloud instance id)."
    )
    password: str | None = Field(None, description="HTTP basic auth password (or API token).")
    bearer_token: str | None = Field(
        None, description="Sent as `Authorization: Bearer ...` (instead of basic auth)."
    )
    push_format: Literal["protobuf", "json"] = Field(
        "protobuf", description="protobuf (snappy-compressed) or json."
    )
    gzip: bool = Field(False, description="gzip JSON pushes.")
    structured_metadata: bool = Field(
        False,
        description="Send trace_id/span_id as Loki structured metadata instead of in the line "
        "(needs Loki 3 with allow_structured_metadata).",
    )
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one push.")
    batch_max_entries: int = Field(1000, gt=0, description="Flush a push at this many entries.")
    batch_max_bytes: int = Field(1024 * 1024, gt=0, description="Flush a push at this size.")
    batch_max_wait_s: float = Field(
        1.0, gt=0, description="Flush once the oldest entry waited this long."
    )
    burst_limit_bytes: int = Field(
        6 * 1024 * 1024,
        gt=0,
        description="Loki's ingestion_burst_size_mb in bytes: no push is larger (line + "
        "structured metadata bytes, as Loki counts); a larger entry is dead-lettered.",
    )
    backoff_min_s: float = Field(0.5, gt=0, description="First retry delay.")
    backoff_max_s: float = Field(300.0, gt=0, description="Longest retry delay.")
    max_concurrent_pushes: int = Field(
        4, gt=0, description="Pushes in flight at once, over all keys and URLs."
    )
    endpoint_cooldown_s: float = Field(
        5.0,
        gt=0,
        description="A URL that failed (network error or 5xx) is skipped this long, doubling "
        "per consecutive failure up to backoff_max_s; /ready probes bring it back sooner.",
    )
    ready_probe_interval_s: float = Field(
        10.0,
        gt=0,
        description="Probe /ready of failed URLs, and of all when no push succeeded lately, "
        "this often.",
    )
    ready_window_s: float = Field(
        60.0,
        gt=0,
        description="/readyz fails when Loki answered nothing for this long, or took no "
        "push for this long (refused, throttled or timed out) though its /ready says 200.",
    )

    def endpoints(self) -> list[str]:
        urls = list(self.urls) or ([self.base_url] if self.base_url else [])
        return [u.rstrip("/") for u in urls]

    def authorization(self) -> str | None:
        """The ``Authorization`` header of every request to Loki, if one is configured."""
        if self.bearer_token:
            return f"Bearer {self.bearer_token}"
        if self.username is None:
            return None
        pair = f"{self.username}:{self.password or ''}".encode()
        return f"Basic {base64.b64encode(pair).decode('ascii')}"

    @model_validator(mode="after")
    def _has_url(self) -> LokiSettings:
        if not self.endpoints():
            raise ValueError("set loki.base_url or loki.urls")
        return self

    @field_validator("base_url")
    @classmethod
    def _base_url_usable(cls, url: str | None) -> str | None:
        return None if url is None else _loki_url(url)

    @field_validator("urls")
    @classmethod
    def _urls_usable(cls, urls: list[str]) -> list[str]:
        return [_loki_url(url) for url in urls]

    @model_validator(mode="after")
    def _one_kind_of_auth(self) -> LokiSettings:
        if self.bearer_token and (self.username is not None or self.password is not None):
            raise ValueError("set either loki.bearer_token or loki.username/password, not both")
        if self.password is not None and self.username is None:
            raise ValueError("loki.password needs loki.username")
        return self


def _loki_url(url: str) -> str:
    """A Loki URL the forwarder can use: absolute http(s) with a host and a valid port, no
    spaces, and no credentials (a URL is shown in logs, ``/readyz`` and admin status).
    Errors show the URL without whatever precedes an ``@`` in it: a password there must
    not reach the message either (it is printed, and logged on a reload)."""
    shown = repr(_without_credentials(url))
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError as exc:
        raise ValueError(f"not a usable URL: {shown} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL with a host: {shown}")
    if any(c.isspace() for c in url):
        raise ValueError(f"a URL cannot hold spaces: {shown}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"credentials in the URL ({_without_credentials(url)}) would be shown wherever "
            "the URL is; set loki.username and loki.password (or loki.bearer_token) instead"
        )
    if port == 0:
        raise ValueError(f"port 0 in {shown}")
    return url


def _without_credentials(url: str) -> str:
    """``url`` with anything between ``//`` and the last ``@`` of its authority replaced by
    ``***`` (done on the text, so that it holds for URLs too broken to parse)."""
    scheme, sep, rest = url.partition("//")
    if not sep:
        return url
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority = rest[:authority_end]
    if "@" not in authority:
        return url
    return f"{scheme}//***@{authority.rpartition('@')[2]}{rest[authority_end:]}"


class StageSpec(_Strict):
    """One pipeline element: ``type`` names a ``logstack.stages`` entry point."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str
    name: str | None = Field(
        None,
        pattern=r"^[a-z][a-z0-9_]{0,63}$",
        description="The stage's name in logs (default: its type); a-z, 0-9 and '_'.",
    )
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _type_alone(cls, value: Any) -> Any:
        """``- auth`` is short for ``- type: auth``."""
        return {"type": value} if isinstance(value, str) else value

    @property
    def instance_name(self) -> str:
        return self.name or self.type


DEFAULT_PIPELINE = ("auth", "mask", "validate", "wal_append", "batch", "forward_loki")


class Settings(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    masking: MaskingSettings = Field(default_factory=MaskingSettings)
    schema_: SchemaSettings = Field(default_factory=SchemaSettings, alias="schema")
    wal: WalSettings = Field(default_factory=WalSettings)
    loki: LokiSettings = Field(default_factory=LokiSettings)
    pipeline: list[StageSpec] = Field(
        default_factory=lambda: [StageSpec(type=t) for t in DEFAULT_PIPELINE],
        min_length=1,
        description="Stages in order (default: auth, mask, validate, wal_append, batch, "
        "forward_loki).",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def warnings(self) -> list[str]:
        """What is valid but likely a mistake: said at start-up, on reload and by
        ``logstack check-config``, without refusing the config."""
        names = {key.name for key in self.security.api_keys.values()}
        said = [
            f"masking.overrides.{name}: no API key is named {name!r}, so these rules "
            "apply to no request"
            for name in self.masking.overrides
            if name not in names
        ]
        if not any(key.active for key in self.security.api_keys.values()):
            said.append("security.api_keys: no active API key, so every ingest request gets 401")
        published = self._published_tokens_in_use()
        if published and not _loopback(self.server.host):
            one = len(published) == 1
            who = published[0] if one else f"{', '.join(published[:-1])} and {published[-1]}"
            said.append(
                f"security: {who} "
                f"{'uses a token' if one else 'use tokens'} published in config.yaml and the "
                f"docs, and server.host {self.server.host!r} takes connections from other "
                f"hosts: anyone who read them can use {'it' if one else 'them'}; replace "
                f"{'it' if one else 'them'}"
            )
        loki = self.loki
        if loki.authorization() is not None:
            plain = [url for url in loki.endpoints() if _plain_http_beyond_this_host(url)]
            if plain:
                said.append(
                    f"loki: credentials are sent in the clear to {', '.join(plain)} "
                    "(http://, not https://, to another host)"
                )
        return said

    def _published_tokens_in_use(self) -> list[str]:
        """Which keys (by name, never by token) use one of ``PUBLISHED_TOKENS``."""
        security = self.security
        users = [
            f"API key {key.name!r}"
            for token, key in security.api_keys.items()
            if token in PUBLISHED_TOKENS
        ]
        if security.admin_token in PUBLISHED_TOKENS:
            users.append("the admin token")
        return users

    def key_by_name(self, name: str) -> ApiKey | None:
        for key in self.security.api_keys.values():
            if key.name == name:
                return key
        return None


PUBLISHED_TOKENS: Final = frozenset(
    {
        "logstack_1a2b3c4d5e6f7890abcdef12",
        "logstack_9f8e7d6c5b4a3210fedcba98",
        "logstack_admin123456789abcdef0123",
    }
)
"""The example tokens of the shipped ``config.yaml`` (and the README's tour): public."""


def _loopback(host: str) -> bool:
    """Whether ``server.host`` takes connections from this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _plain_http_beyond_this_host(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme == "http" and not _loopback(parts.hostname or "")


SECTIONS: dict[str, type[BaseModel]] = {
    "server": ServerSettings,
    "security": SecuritySettings,
    "masking": MaskingSettings,
    "schema": SchemaSettings,
    "wal": WalSettings,
    "loki": LokiSettings,
}
SERVER_SHORTCUTS = {f"{ENV_PREFIX}{k.upper()}": k for k in ServerSettings.model_fields}
NON_SETTING_VARS = {f"{ENV_PREFIX}CONFIG"}
_API_KEY_VAR = re.compile(
    r"^LOGSTACK_API_KEY_(?P<id>[A-Z0-9_]+?)_(?P<field>TOKEN|NAME|ACTIVE|DESCRIPTION)$"
)


def _parse_env_value(raw: str) -> Any:
    """Environment values are YAML scalars: ``true``, ``10``, ``[a, b]``, JSON objects."""
    try:
        return yaml.load(raw, Loader=_ConfigLoader) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


_NULL_SPELLINGS = {"null", "Null", "NULL", "~"}


def _parse_env_for_field(model: type[BaseModel], key: str, raw: str) -> Any:
    """Like ``_parse_env_value``, but text fields (``str``, ``Path``) keep the raw string.

    Otherwise a token or path such as ``12345``, ``yes`` or ``#abc`` would become an int,
    a bool or (silently) ``None``. Optional text fields still accept ``null``.
    """
    args = _field_types(model.model_fields[key].annotation)
    non_null = args - {type(None)}
    if non_null and non_null <= {str, Path}:
        if type(None) in args and raw.strip() in _NULL_SPELLINGS:
            return None
        return raw
    return _parse_env_value(raw)


def _env_overrides(
    env: Mapping[str, str], problems: list[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Map ``LOGSTACK_*`` variables onto config paths; returns (overrides, path→variable)."""
    overrides: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in NON_SETTING_VARS or _API_KEY_VAR.match(var):
            continue
        if var == f"{ENV_PREFIX}SECURITY_API_KEYS":
            continue  # merged per token by load_settings, which also reports its problems
        if var.startswith(f"{ENV_PREFIX}API_KEY_"):
            problems.append(
                f"{var}: expected LOGSTACK_API_KEY_<ID>_<TOKEN|NAME|ACTIVE|DESCRIPTION>"
            )
            continue
        if var in SERVER_SHORTCUTS:
            section, key = "server", SERVER_SHORTCUTS[var]
        else:
            rest = var[len(ENV_PREFIX) :].lower()
            section, _, key = rest.partition("_")
            if section in SECTIONS and not key:
                problems.append(
                    f"{var}: unknown setting; a section is set one key at a time "
                    f"({ENV_PREFIX}{section.upper()}_<KEY>)"
                )
                continue
            if section == "pipeline":
                problems.append(f"{var}: unknown setting; the pipeline is set in the file only")
                continue
            if section not in SECTIONS:
                problems.append(f"{var}: unknown setting (no config section {section!r})")
                continue
            if key not in SECTIONS[section].model_fields:
                problems.append(f"{var}: unknown setting {section}.{key}")
                continue
        path = f"{section}.{key}"
        if path in origin:  # LOGSTACK_PORT and LOGSTACK_SERVER_PORT: which one was meant?
            problems.append(f"{origin[path]} and {var} both set {path}: set one of them")
            continue
        overrides.setdefault(section, {})[key] = _parse_env_for_field(
            SECTIONS[section], key, env[var]
        )
        origin[path] = var
    return overrides, origin


def _env_api_keys(env: Mapping[str, str], problems: list[str]) -> dict[str, dict[str, Any]]:
    """``LOGSTACK_API_KEY_<ID>_<FIELD>`` grouped by ID, returned keyed by token."""
    groups: dict[str, dict[str, str]] = {}
    for var, value in env.items():
        match = _API_KEY_VAR.match(var)
        if match:
            groups.setdefault(match["id"], {})[match["field"].lower()] = value
    keys: dict[str, dict[str, Any]] = {}
    for key_id, fields in sorted(groups.items()):
        token = fields.pop("token", None)
        if not token:
            problems.append(f"LOGSTACK_API_KEY_{key_id}_TOKEN: missing (required with the others)")
            continue
        if len(token) < 16:
            problems.append(
                f"LOGSTACK_API_KEY_{key_id}_TOKEN: token must be at least 16 characters"
            )
            continue
        if token in keys:
            # Not one silently replacing the other (its name, its ``active: false``).
            other = keys[token]["_id"]
            problems.append(
                f"LOGSTACK_API_KEY_{key_id}_TOKEN: the same token as "
                f"LOGSTACK_API_KEY_{other}_TOKEN; a token is one key"
            )
            continue
        entry: dict[str, Any] = dict(fields)
        if "active" in entry:
            entry["active"] = _parse_env_value(entry["active"])
        entry.setdefault("_default_name", key_id.lower().replace("_", "-"))
        entry["_id"] = key_id
        keys[token] = entry
    return keys


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + ("schema" if part == "schema_" else str(part))
    return out or "(root)"


def load_settings_for_reload(path: str | os.PathLike[str] | None) -> Settings:
    """``load_settings`` for a SIGHUP: an empty file is refused, and whatever else goes
    wrong reading it is a ``ConfigError`` too (never a reason for the running service to
    stop: a bad file keeps the running config)."""
    try:
        return load_settings(path, allow_empty=False)
    except ConfigError:
        raise
    except Exception as exc:  # the type only: a message could quote the file
        raise ConfigError([f"{path}: cannot be loaded ({type(exc).__name__})"]) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: the second
    ``security:`` block silently replaced the first (every API key gone, "config OK")."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # ``<<``: what it merges in may be overridden by the mapping's own
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if duplicate:
                text = str(key)
                shown = (
                    f"of {len(text)} characters (not shown: it may be a token)"
                    if _may_be_a_token(text)
                    else repr(text[:40])
                )
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {shown} twice",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


_BOOL_TAG: Final = "tag:yaml.org,2002:bool"
_INT_TAG: Final = "tag:yaml.org,2002:int"
_FLOAT_TAG: Final = "tag:yaml.org,2002:float"


class _ConfigLoader(_UniqueKeyLoader):
    """Scalars read as YAML 1.1 (PyYAML's) reads them, except where that surprised, as
    YAML 1.2's core schema reads them: ``0700`` is 700, not octal 448 (``port: 0700``
    listened on 448); ``5:00`` is text, not sexagesimal 300; ``on``/``yes``/``off``/``no``
    are text (still read as booleans where a setting is one, refused where it is a
    number); dates are text. Floats keep YAML 1.1's shape (``1e5`` stays text)."""

    yaml_implicit_resolvers = {
        first: [
            (tag, pattern)
            for tag, pattern in resolvers
            if tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG, "tag:yaml.org,2002:timestamp")
        ]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node)).replace("_", "")
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text)


_ConfigLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ConfigLoader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"),
)
# PyYAML's YAML 1.1 float, without its sexagesimal form: ``1e5`` and ``12345678e1234567``
# (a token, unquoted) stay text, as they were, where YAML 1.2's rule reads them as numbers.
_ConfigLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?"
        r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_ConfigLoader.add_constructor(_INT_TAG, _ConfigLoader.construct_yaml_int)


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    data: Mapping[str, Any] | None = None,
    allow_empty: bool = True,
) -> Settings:
    """Load, merge and validate the configuration; raise ``ConfigError`` listing every problem.

    ``allow_empty=False`` (a reload) refuses an empty file instead of reading it as the
    defaults.

    ``data`` is a configuration already parsed (what a worker gets from its supervisor)
    and takes the place of the file: the environment overrides apply to it exactly as to
    a file, so the result is what the file gave.
    """
    env = os.environ if env is None else env
    if data is not None:
        return _validate(dict(data), env)
    if path is None and env.get(f"{ENV_PREFIX}CONFIG"):
        path = env[f"{ENV_PREFIX}CONFIG"]
    parsed = read_config_file(path, allow_empty=allow_empty) if path is not None else {}
    return _validate(parsed, env)


def read_config_file(path: str | os.PathLike[str], *, allow_empty: bool = True) -> dict[str, Any]:
    """The YAML mapping in ``path``, before any validation; ``ConfigError`` saying why if it
    cannot be read (no file, not UTF-8, not YAML, a key given twice, not a mapping)."""
    try:
        loaded = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_ConfigLoader)
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except UnicodeDecodeError as exc:
        problem = f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError([problem]) from None
    except RecursionError:
        raise ConfigError([f"{path}: nested too deeply to be a configuration"]) from None
    except yaml.MarkedYAMLError as exc:
        # str(exc) quotes the offending line, which may hold a token: report position only.
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(p for p in (exc.context, exc.problem) if p) or "syntax error"
        raise ConfigError([f"{path}: cannot read YAML{at}: {what}"]) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: cannot read YAML: {exc}"]) from None
    if loaded is None:
        if not allow_empty:
            # A half-written file (config management mid-copy) reads as empty: it
            # would otherwise replace every key, the admin token and Loki's URL by
            # the defaults.
            raise ConfigError([f"{path}: the file is empty"])
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return loaded


def _validate(data: dict[str, Any], env: Mapping[str, str]) -> Settings:
    """``data`` with the environment overrides merged in, validated into ``Settings``."""
    problems: list[str] = []
    overrides, origin = _env_overrides(env, problems)
    data = _merge(data, overrides)

    security = data.get("security") or {}
    if not isinstance(security, Mapping):
        problems.append("security: must be a mapping")
        security = {}
    security = dict(security)
    file_keys = security.get("api_keys") or {}
    if not isinstance(file_keys, dict):
        problems.append("security.api_keys: must be a mapping of token → key")
        file_keys = {}
    api_keys: dict[str, Any] = {
        t: dict(v) if isinstance(v, dict) else v for t, v in file_keys.items()
    }
    json_keys = env.get(f"{ENV_PREFIX}SECURITY_API_KEYS")
    if json_keys is not None:
        origin["security.api_keys"] = f"{ENV_PREFIX}SECURITY_API_KEYS"
        parsed = _parse_env_value(json_keys)
        if not isinstance(parsed, dict):
            problems.append("LOGSTACK_SECURITY_API_KEYS: must be a JSON object of token → key")
        else:
            # The JSON variable beats the file per token; other file keys stay.
            api_keys = _merge(dict(file_keys), parsed)
    for token, fields in _env_api_keys(env, problems).items():
        default_name = fields.pop("_default_name")
        key_id = fields.pop("_id")
        current = api_keys.get(token)
        entry = dict(current) if isinstance(current, dict) else {"name": default_name}
        entry.update(fields)
        api_keys[token] = entry
        # Raw-token paths are only looked up, never shown (see _redact_token_loc).
        origin[f"security.api_keys.{token}"] = f"{ENV_PREFIX}API_KEY_{key_id}_TOKEN"
        for field in fields:
            origin[f"security.api_keys.{token}.{field}"] = (
                f"{ENV_PREFIX}API_KEY_{key_id}_{field.upper()}"
            )
    # A YAML token like 1234567890123456 is an int; reject it without echoing it.
    if any(not isinstance(token, str) for token in api_keys):
        problems.append("security.api_keys: every token must be a string (quote it in YAML)")
        api_keys = {t: v for t, v in api_keys.items() if isinstance(t, str)}
    security["api_keys"] = api_keys
    data["security"] = security

    try:
        settings = Settings.model_validate(data)
    except PydanticValidationError as exc:
        for error in exc.errors():
            where = _format_loc(error["loc"])
            source = _source_of(where, origin)
            # Never echo a token: api_keys locations are reported by position, not by value.
            if where.startswith("security.api_keys."):
                where = _redact_token_loc(where, api_keys)
            suffix = f" (from {source})" if source else ""
            msg = error["msg"]
            if error["type"] == "extra_forbidden":
                msg = "unknown key"
                where = _shown_unknown_key(where)
            problems.append(f"{where}: {msg}{suffix}")
    else:
        if not problems:
            return settings
    raise ConfigError(problems)


_LIKE_A_SETTING = re.compile(r"[a-z][a-z_]{0,39}")
"""What a setting's name looks like (every one is lowercase words joined by ``_``)."""


def _may_be_a_token(key: str) -> bool:
    """Long enough to be a token (16+ characters) and not shaped like a setting's name."""
    return len(key) >= 16 and not _LIKE_A_SETTING.fullmatch(key)


def _shown_unknown_key(where: str) -> str:
    """``where`` with its last part, an unknown key, hidden if it may be a token: a token
    indented one level too far or too little became an unknown key, and its message
    printed the token in the clear (check-config, the reload log, the admin status)."""
    parent, _, key = where.rpartition(".")
    if not _may_be_a_token(key):
        return where
    hidden = f"<a key of {len(key)} characters, not shown: it may be a token>"
    return f"{parent}.{hidden}" if parent else hidden


def _source_of(where: str, origin: Mapping[str, str]) -> str | None:
    """The variable(s) behind an error location: its own path or the nearest parent's.

    A section-level error (a model validator) names every variable that set a key of
    that section.
    """
    path = where
    while path:
        if path in origin:
            return origin[path]
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            break
        path = path[:cut]
    if "." not in where and "[" not in where:
        names = sorted({v for k, v in origin.items() if k.startswith(where + ".")})
        return ", ".join(names) or None
    return None


def _redact_token_loc(where: str, api_keys: Mapping[str, Any]) -> str:
    rest = where[len("security.api_keys.") :]
    for token, entry in api_keys.items():
        if rest == token or rest.startswith(token + "."):
            name = entry.get("name") if isinstance(entry, dict) else None
            label = f"<token of {name}>" if name else "<token>"
            return "security.api_keys." + label + rest[len(token) :]
    return where
