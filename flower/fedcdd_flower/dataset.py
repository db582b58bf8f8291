"""The app's configuration: Flower's run config (`model.*`, `train.*`, `fedcdd.*`) as a
`fedcdd run` configuration, and each SuperNode's data from its node config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

# Keys of the app itself, not of the run configuration.
APP_KEYS = {"upload", "server", "run-dir", "round-timeout", "discovery-timeout"}
UPLOAD_MODES = ("masked", "dense")
SERVERS = ("fedcdd", "stock-fedavg")


@dataclass
class AppConfig:
    """The run configuration (`config.toml` keys) and the app's own settings."""

    run: dict[str, Any] = field(default_factory=dict)
    upload: str = "masked"
    server: str = "fedcdd"
    run_dir: str = ""
    round_timeout: float = 3600.0
    discovery_timeout: float = 600.0

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Any]) -> "AppConfig":
        app = cls()
        # A deployment's server has no client data: reference points need it.
        app.run["references"] = []
        for key, value in rc.items():
            if key == "num-server-rounds":
                app.run["rounds"] = int(value)
                continue
            prefix, _, rest = key.partition(".")
            if prefix not in ("model", "train", "fedcdd") or not rest:
                raise ValueError(
                    f"run config key {key!r}: expected num-server-rounds or a model.*, train.* "
                    "or fedcdd.* key"
                )
            if prefix == "fedcdd" and rest in APP_KEYS:
                setattr(app, rest.replace("-", "_"), value)
                continue
            name = "model" if (prefix, rest) == ("model", "name") else rest.replace("-", "_")
            if name in ("server_lr", "keep_ratio", "lr", "lr_min") and float(value) == 0.0:
                continue  # the algorithm's (or the model's) default
            if name == "warmup_steps" and int(value) < 0:
                continue  # the model's default
            app.run[name] = value
        if app.upload not in UPLOAD_MODES:
            raise ValueError(f"fedcdd.upload {app.upload!r}: expected one of {UPLOAD_MODES}")
        if app.server not in SERVERS:
            raise ValueError(f"fedcdd.server {app.server!r}: expected one of {SERVERS}")
        return app

    def run_dir_for(self, run_id: int) -> Path:
        """Where the ServerApp writes the run directory."""
        if self.run_dir:
            return Path(self.run_dir).expanduser()
        root = os.environ.get("FEDCDD_RUNS", str(Path.home() / ".fedcdd" / "runs"))
        algorithm = self.run.get("algorithm", "fedcdd")
        return Path(root) / f"flower-{algorithm}-run{run_id}"


@dataclass
class NodeData:
    """A SuperNode's data: a partition of the run's data (`partition-id`), or its own file."""

    client_id: int
    data_path: str | None

    @classmethod
    def from_node_config(cls, nc: Mapping[str, Any]) -> "NodeData":
        if "partition-id" not in nc:
            raise ValueError(
                "the SuperNode needs --node-config 'partition-id=K' (its client id, 0-based) "
                "and, for its own data, data-path=\"/path/file.jsonl\""
            )
        path = nc.get("data-path")
        return cls(int(nc["partition-id"]), str(path) if path else None)
