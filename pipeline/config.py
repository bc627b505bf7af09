"""Configuration as data: topics.yaml and sites/*.yaml, validated at start-up with clear errors."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .ids import global_patient_key, shared_identifier
from .resources import SUPPORTED_TYPES

__all__ = [
    "CaptureConfig",
    "Config",
    "IdentityConfig",
    "RetryTier",
    "Route",
    "SiteConfig",
    "SourceTable",
    "TargetEndpoint",
    "TopicSpec",
    "TopicsConfig",
    "WritebackConfig",
    "expand_env",
    "load_config",
    "load_sites",
    "load_topics",
]

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SITE_NAME = r"^[a-z][a-z0-9-]{0,39}$"


def expand_env(text: str, environ: dict[str, str] | None = None) -> str:
    """Replace ${VAR} and ${VAR:-default} with values from the environment."""
    env = os.environ if environ is None else environ

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is None:
            raise ConfigError(f"environment variable {name} is not set and has no default")
        return default

    return _ENV_PATTERN.sub(substitute, text)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TopicSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")
    partitions: int | None = Field(default=None, ge=1)
    schema_name: str | None = Field(default=None, alias="schema")
    config: dict[str, str] = Field(default_factory=dict)


class RetryTier(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")
    delay_seconds: int = Field(ge=1)
    partitions: int | None = Field(default=None, ge=1)
    config: dict[str, str] = Field(default_factory=dict)


class SourceTopics(_Strict):
    name_template: str
    partitions: int = Field(default=3, ge=1)
    config: dict[str, str] = Field(default_factory=dict)


class TopicDefaults(_Strict):
    replication_factor: int = Field(default=1, ge=1)
    partitions: int = Field(default=6, ge=1)


_REQUIRED_TOPICS = ("normalized", "identified", "ready", "dlq", "audit")


class TopicsConfig(_Strict):
    defaults: TopicDefaults = TopicDefaults()
    source: SourceTopics
    topics: dict[str, TopicSpec]
    retry_tiers: list[RetryTier] = Field(min_length=1)

    @model_validator(mode="after")
    def _required_and_copartitioned(self) -> TopicsConfig:
        missing = [key for key in _REQUIRED_TOPICS if key not in self.topics]
        if missing:
            raise ValueError(f"topics: missing required entries {missing}")
        # identity keys records by patient; ready must be partitioned the same way (co-partitioning).
        if self.partitions_of("identified") != self.partitions_of("ready"):
            raise ValueError("topics: identified and ready must have the same number of partitions")
        return self

    def partitions_of(self, key: str) -> int:
        """Partition count of a declared topic, falling back to the default."""
        return self.topics[key].partitions or self.defaults.partitions

    def name(self, key: str) -> str:
        """The Kafka name of a declared topic (e.g. ``name('normalized')``)."""
        return self.topics[key].name


class SourceTable(_Strict):
    database: str
    schema_name: str = Field(alias="schema")
    table: str
    connector: str


class Route(_Strict):
    target: str
    trigger: Literal["all", "tumorboard-flag"] = "all"
    resource_types: list[str] | None = None


class TargetEndpoint(_Strict):
    fhir_base_url: str = Field(pattern=r"^https?://")
    auth_token: SecretStr | None = None
    timeout_seconds: float = Field(default=30, gt=0)
    # How the sink writes a resource it holds no target version of (a first write, or its table lost the
    # version in a crash); it never writes blind over what it does not know it wrote (pipeline/sink.py):
    # - "guarded": one PUT with If-Match: W/"0" (FhirClient.create_if_absent). HAPI creates an absent resource
    #   and refuses (409) an existing one, which is then read and handled as with "read". Needs a server that
    #   never issues version "0".
    # - "read": read it first, then PUT (two round trips for every new resource).
    first_write: Literal["guarded", "read"] = "guarded"

    @field_validator("auth_token", mode="before")
    @classmethod
    def _empty_token_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value


UNKEYED_WARNING = (
    "central Patient ids of {sites} derive from the shared identifier without a secret: anyone holding such an "
    "id could recover the insurance number by trying every possible one. Set CDRSYNC_PATIENT_KEY_SECRET "
    "(identity.patient_key_secret_env) before the first sync, and never change it"
)


class IdentityConfig(_Strict):
    # The identifier every site shares for a person (e.g. the German statutory insurance number
    # http://fhir.de/sid/gkv/kvid-10): the central Patient's id derives from it (DESIGN.md decision 4).
    shared_identifier_system: str = Field(min_length=1)
    # How a value is compared: as written (only trimmed), or in capitals with every space removed, so that
    # "a123 456 789" and "A123456789" are one person. Sites routing to one target must agree (checked).
    shared_identifier_form: Literal["as-written", "uppercase-no-spaces"] = "as-written"
    # The environment variable holding a secret the central Patient's id is keyed with (the value is read from
    # the environment itself, never pasted into the YAML). Without it the id is uuid5 over the number alone,
    # and an insurance number has so few possible values that anyone holding an id (in a log, a Kafka key, an
    # audit row) could find it by trying them all. Set before the first sync and never changed: every central
    # Patient id depends on it (`cdrsync worker` refuses to start when it differs from the one recorded).
    patient_key_secret_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    _secret: str | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_secret(self) -> IdentityConfig:
        self._secret = (os.environ.get(self.patient_key_secret_env) or None) if self.patient_key_secret_env else None
        return self

    @property
    def keyed(self) -> bool:
        return self._secret is not None

    def patient_key(self, resource: dict[str, Any]) -> str | None:
        """The global patient key of a Patient (its central id), None if it has no shared identifier."""
        value = shared_identifier(resource, self.shared_identifier_system, self.shared_identifier_form)
        return None if value is None else global_patient_key(self.shared_identifier_system, value, self._secret)

    def key_check(self) -> str:
        """What the patient ids of this configuration are made with, without giving the secret away: the key
        of a fixed number that is no one's (the same with the same system, form and secret, else different)."""
        form = "" if self.shared_identifier_form == "as-written" else f"|{self.shared_identifier_form}"
        return global_patient_key(
            f"urn:cdrsync:patient-key-check|{self.shared_identifier_system}{form}", "0", self._secret
        )

    def matching(self) -> str:
        """How patients are matched, as far as sites sharing a target must agree (never the secret itself)."""
        form = "" if self.shared_identifier_form == "as-written" else f" ({self.shared_identifier_form})"
        keyed = f"patient key check {self.key_check()[:8]}" if self.keyed else "no patient key secret"
        return f"{self.shared_identifier_system}{form}, {keyed}"


# --- back-flow (pipeline/capture.py, pipeline/backflow.py) ---------------------------------------------
class CaptureConfig(_Strict):
    """How a target site's own changes are captured when Debezium cannot read its database (README: Back-flow)."""

    method: Literal["fhir-history"]
    poll_seconds: float = Field(default=2.0, gt=0)
    # Each poll reads again this far back before the newest version read: a version the server stamped
    # earlier but committed later (a slow request) is still found (pipeline/capture.py query_since).
    lookback_seconds: float = Field(default=60.0, ge=0)
    schema_name: str = Field(default="fhir", alias="schema")  # the Debezium-shaped topic and source block
    table: str = "resource"


class WritebackConfig(_Strict):
    """Where back-flow (central's decisions) is written at a hospital: its own source table, or a FHIR endpoint."""

    method: Literal["source-table", "fhir"] = "source-table"
    fhir_base_url: str | None = Field(default=None, pattern=r"^https?://")
    # For "fhir", as a target's (TargetEndpoint): a bearer token (from the environment: ${SITE_B_FHIR_TOKEN:-}),
    # the timeout of one request, and how a copy the endpoint does not hold yet is created.
    auth_token: SecretStr | None = None
    timeout_seconds: float = Field(default=30, gt=0)
    first_write: Literal["guarded", "read"] = "guarded"
    # Where the worker reaches the hospital's database for "source-table" (default PG_HOST, PG_PORT): a hospital's
    # database is usually a server of its own. User and password still come from the environment.
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)

    @field_validator("host", "port", "auth_token", "fhir_base_url", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return None if value in ("", None) else value

    @model_validator(mode="after")
    def _endpoint_for_fhir(self) -> WritebackConfig:
        if self.method == "fhir" and not self.fhir_base_url:
            raise ValueError("writeback.method 'fhir' needs writeback.fhir_base_url")
        return self

    def endpoint(self) -> TargetEndpoint:
        """The hospital's FHIR endpoint (method "fhir")."""
        assert self.fhir_base_url is not None
        return TargetEndpoint(
            fhir_base_url=self.fhir_base_url,
            auth_token=self.auth_token,
            timeout_seconds=self.timeout_seconds,
            first_write=self.first_write,
        )


# --- end back-flow ---------------------------------------------------------------------------------------


class SiteConfig(_Strict):
    site: str = Field(pattern=_SITE_NAME)
    display_name: str = ""
    adapter: Literal["fhir", "openehr", "hl7v2"]
    source: SourceTable | None = None
    # IANA zone in which the source writes times without an offset (HL7 v2 DTM, openEHR local date-times).
    timezone: str = "UTC"
    # Identifier system per assigning authority (HL7 v2 CX-4) or EHR subject namespace (openEHR PARTY_REF).
    identifier_systems: dict[str, str] = Field(default_factory=dict)
    resource_types: list[str] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    target: TargetEndpoint | None = None
    identity: IdentityConfig | None = None
    capture: CaptureConfig | None = None  # this target's own changes flow back to the hospitals
    writeback: WritebackConfig | None = None  # this hospital receives back-flow

    @field_validator("resource_types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - SUPPORTED_TYPES)
        if unknown:
            raise ValueError(f"unsupported resource types {unknown}; supported: {sorted(SUPPORTED_TYPES)}")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use an IANA name such as Europe/Berlin)") from None
        return value

    @property
    def zone(self) -> ZoneInfo:
        """The site's time zone."""
        return ZoneInfo(self.timezone)

    @model_validator(mode="after")
    def _routes_need_a_source(self) -> SiteConfig:
        if self.routes and self.source is None:
            raise ValueError("a site with routes needs a 'source' to read from")
        if self.routes and self.identity is None:
            raise ValueError("a site with routes needs 'identity.shared_identifier_system' to match patients")
        if self.capture is not None and (self.target is None or not self.resource_types):
            raise ValueError("a site with 'capture' needs a 'target' endpoint and the 'resource_types' that flow back")
        if self.writeback is not None and self.writeback.method == "source-table" and self.source is None:
            raise ValueError("writeback.method 'source-table' needs the site's 'source' table")
        return self


@dataclass(frozen=True)
class Config:
    """Everything declared as data: the topics and every site."""

    topics: TopicsConfig
    sites: dict[str, SiteConfig]

    def source_topic(self, site: SiteConfig) -> str:
        """The Debezium topic of a site's source table (or the Debezium-shaped topic of its capture)."""
        if site.source is None and site.capture is not None:
            return self.topics.source.name_template.format(
                site=site.site, schema=site.capture.schema_name, table=site.capture.table
            )
        assert site.source is not None
        return self.topics.source.name_template.format(
            site=site.site, schema=site.source.schema_name, table=site.source.table
        )

    def capture_sites(self) -> list[SiteConfig]:
        """Target sites whose own changes are captured by cdrsync (back-flow sources)."""
        return [s for s in self.sites.values() if s.capture is not None and s.source is None]

    def unkeyed_patient_sites(self) -> list[str]:
        """Sites whose central Patient ids derive from the shared number without a secret (IdentityConfig)."""
        return sorted(s.site for s in self.sites.values() if s.routes and s.identity and not s.identity.keyed)

    def source_sites(self) -> list[SiteConfig]:
        """Sites that have a captured source table."""
        return [s for s in self.sites.values() if s.source is not None]

    def site_of_topic(self, topic: str) -> SiteConfig:
        """The site whose Debezium topic this is; EnvelopeError-worthy if none."""
        for site in [*self.source_sites(), *self.capture_sites()]:
            if self.source_topic(site) == topic:
                return site
        raise KeyError(topic)

    def target(self, name: str) -> TargetEndpoint:
        """The FHIR endpoint of a target site."""
        endpoint = self.sites[name].target
        assert endpoint is not None
        return endpoint


def _format_validation(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(file)"
        lines.append(f"{path}: field '{field}': {item['msg']}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    try:
        return yaml.safe_load(expand_env(text))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_topics(path: Path) -> TopicsConfig:
    """Read and validate topics.yaml."""
    try:
        return TopicsConfig.model_validate(_read_yaml(path))
    except ValidationError as exc:
        raise ConfigError(_format_validation(path, exc)) from exc


def load_sites(paths: Iterable[Path]) -> dict[str, SiteConfig]:
    """Read and validate site files; names must be unique and routes must name a target site."""
    sites: dict[str, SiteConfig] = {}
    origin: dict[str, Path] = {}
    for path in sorted(paths):
        try:
            site = SiteConfig.model_validate(_read_yaml(path))
        except ValidationError as exc:
            raise ConfigError(_format_validation(path, exc)) from exc
        if site.site in sites:
            raise ConfigError(f"{path}: field 'site': '{site.site}' is already declared in {origin[site.site]}")
        sites[site.site] = site
        origin[site.site] = path
    for name, site in sites.items():
        for index, route in enumerate(site.routes):
            target = sites.get(route.target)
            if target is None or target.target is None:
                raise ConfigError(
                    f"{origin[name]}: field 'routes.{index}.target': '{route.target}' is not a site with a "
                    "'target' endpoint"
                )
    _one_shared_identifier_per_target(sites, origin)
    return sites


def _one_shared_identifier_per_target(sites: dict[str, SiteConfig], origin: dict[str, Path]) -> None:
    """Every site routing to one target matches patients by the same identifier system, compared in the same
    form: the central Patient's id derives from system and value, so two spellings of one system (an old
    NamingSystem URI, a trailing slash), or one site folding case and another not, would make a shared
    patient two central Patients."""
    for target in {route.target for site in sites.values() for route in site.routes}:
        systems = {
            name: site.identity.matching()
            for name, site in sites.items()
            if site.identity is not None and any(route.target == target for route in site.routes)
        }
        if len(set(systems.values())) > 1:
            named = "; ".join(f"{origin[name]}: {system}" for name, system in sorted(systems.items()))
            raise ConfigError(
                f"sites routing to '{target}' match patients by different shared identifier systems ({named}): "
                "the same person would become one central Patient per system; declare the same "
                "identity.shared_identifier_system, shared_identifier_form and patient key secret in each"
            )


def load_config(root: Path) -> Config:
    """Load topics.yaml and sites/*.yaml under a project root."""
    site_files = list((root / "sites").glob("*.yaml"))
    if not site_files:
        raise ConfigError(f"{root / 'sites'}: no site files (*.yaml)")
    return Config(topics=load_topics(root / "topics.yaml"), sites=load_sites(site_files))
