"""Registration of the Debezium connectors in connectors/debezium/ over the Kafka Connect REST API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError, TargetUnavailableError

__all__ = ["ConnectorSpec", "apply_connectors", "connector_status", "load_connectors"]


class ConnectorSpec:
    """One connector file: its name and config."""

    def __init__(self, path: Path, name: str, config: dict[str, str]) -> None:
        self.path, self.name, self.config = path, name, config


def load_connectors(directory: Path, config: Config) -> list[ConnectorSpec]:
    """Read connector files; each must belong to a site whose source names it, with the expected topic prefix."""
    specs = []
    by_name = {s.source.connector: s for s in config.source_sites() if s.source}
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            name, body = data["name"], data["config"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a connector file ({{'name', 'config'}}): {exc}") from None
        site = by_name.get(name)
        if site is None:
            raise ConfigError(f"{path}: field 'name': no site in sites/ has source.connector '{name}'")
        prefix = body.get("topic.prefix")
        if prefix is None or config.source_topic(site) != f"{prefix}.{site.source.schema_name}.{site.source.table}":  # type: ignore[union-attr]
            raise ConfigError(
                f"{path}: field 'config.topic.prefix': '{prefix}' does not give the topic "
                f"{config.source_topic(site)} that topics.yaml declares for {site.site}"
            )
        specs.append(ConnectorSpec(path, name, {k: str(v) for k, v in body.items()}))
    return specs


def _request(url: str, method: str = "GET", body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        raise ConfigError(f"Kafka Connect refused {method} {url}: {exc.code} {detail}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise TargetUnavailableError(f"Kafka Connect at {url} is not reachable: {exc}") from None


def apply_connectors(connect_url: str, specs: list[ConnectorSpec], *, dry_run: bool = False) -> list[str]:
    """Create or update each connector (PUT /connectors/<name>/config is idempotent)."""
    lines = []
    existing = set(_request(f"{connect_url}/connectors"))
    for spec in specs:
        verb = "update" if spec.name in existing else "create"
        lines.append(f"{verb}  {spec.name} ({spec.path.name})")
        if not dry_run:
            _request(f"{connect_url}/connectors/{spec.name}/config", "PUT", spec.config)
    return lines


def connector_status(connect_url: str, name: str) -> dict[str, Any]:
    """Connector and task states as Connect reports them."""
    result: dict[str, Any] = _request(f"{connect_url}/connectors/{name}/status")
    return result
