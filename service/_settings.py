"""Service settings: the one place that reads the environment (prefix ``DENDRO_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Configuration of the API and the workers.

    Every field can be set as ``DENDRO_<NAME>`` (e.g. ``DENDRO_STORAGE``,
    ``DENDRO_DATA_DIR``, ``DENDRO_API_TOKEN``); command-line flags override them.
    """

    model_config = SettingsConfigDict(env_prefix="DENDRO_", extra="ignore")

    data_dir: Path = Field(default=Path(".data"), description="Database, datasets, exports.")
    storage: str | None = Field(default=None, description="Database URL; default: SQLite in data_dir.")
    api_token: SecretStr | None = Field(default=None, description="If set, every write needs it.")
    read_requires_token: bool = Field(default=False, description="Also guard reads with the token.")
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    # Limits with safe defaults; over a limit is a 422 naming it.
    max_trials: int = Field(default=100_000, ge=1)
    max_epochs: int = Field(default=1_000, ge=1)
    max_params: int = Field(default=50_000_000, ge=1)
    max_population: int = Field(default=4_096, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1_024)
    max_page_size: int = Field(default=1_000, ge=1)
    #: seconds a study read may serve later GETs (workers' writes show up at most twice this
    #: late; this API's own writes at once); 0, the default, reads for every request
    snapshot_max_age: float = Field(default=0.0, ge=0.0, le=60.0)
    heartbeat_interval: int = Field(default=5, ge=1, description="Seconds between a worker's lease beats.")
    grace_period: int = Field(default=20, ge=2, description="Seconds without a beat before a worker's lease is stale: its trials are failed and re-queued once.")
    worker_timeout: float = Field(default=30.0, description="Seconds without a beat before a worker is shown dead.")
    #: modules imported first by the API and every worker (plus ``--plugin`` and the
    #: ``dendro.plugins`` entry points): they register model families and datasets
    plugins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated importable module names (DENDRO_PLUGINS).")
    #: ``dendro serve --workers N``: seconds before restarting a local worker that died,
    #: doubled after each quick death up to ``worker_restart_max``
    worker_restart_min: float = Field(default=1.0, gt=0)
    worker_restart_max: float = Field(default=60.0, gt=0)
    # Fault injection for the reliability tests, off by default: a worker raises CUDA's
    # out-of-memory error after the first epoch of these trial numbers (of any study it
    # serves), through the same path as a real one. E.g. DENDRO_FAULT_OOM_TRIALS='[2]'.
    fault_oom_trials: list[int] = Field(default_factory=list, description="Testing only: trial "
                                        "numbers whose training raises an injected out-of-memory error.")
    # And a floor under each epoch's time, so that the tests that stop, delete or kill a worker
    # mid-trial do not race training that a warm machine finishes in milliseconds.
    fault_epoch_seconds: float = Field(default=0.0, ge=0, description="Testing only: seconds a "
                                       "worker waits after each epoch (DENDRO_FAULT_EPOCH_SECONDS).")

    @field_validator("storage", "api_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: Any) -> Any:
        # `DENDRO_API_TOKEN=` (as compose writes an unset variable) means no token, not an
        # empty one that every write would have to present.
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("plugins", mode="before")
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    @property
    def storage_default(self) -> bool:
        """Whether the storage is the data dir's ``dendro.db`` (neither a flag nor DENDRO_STORAGE)."""
        return not self.storage

    @property
    def storage_url_redacted(self) -> str:
        """The storage URL with its password hidden, for logs and messages."""
        from sqlalchemy.engine import make_url

        try:
            return make_url(self.storage_url).render_as_string(hide_password=True)
        except Exception:  # noqa: BLE001 - a malformed URL is reported where it is opened
            return "<storage URL>"

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{self.data_dir.resolve() / 'dendro.db'}"

    @property
    def token(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None


@lru_cache
def get_settings() -> Settings:
    return Settings()
