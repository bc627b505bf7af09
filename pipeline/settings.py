"""Deployment settings: from the environment (prefix CDRSYNC_), with defaults for the local stack."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Where things are and how hard to try. Secrets never have defaults here."""

    model_config = SettingsConfigDict(env_prefix="CDRSYNC_", frozen=True, extra="ignore")

    config_root: Path = Field(default=_REPO_ROOT, description="directory holding topics.yaml and sites/")
    kafka_bootstrap: str = Field(default="localhost:9092", validation_alias="KAFKA_BOOTSTRAP")
    connect_url: str = Field(default="http://localhost:8083", validation_alias="CONNECT_URL")
    state_dir: Path = Field(default=_REPO_ROOT / ".stack" / "worker", description="RocksDB tables")
    web_port: int = 6066
    sink_attempts: int = Field(default=5, ge=1, description="in-process write attempts before a retry topic")
    park_limit_seconds: int = Field(
        default=3600, ge=1, description="how long a resource waits for a reference"
    )
