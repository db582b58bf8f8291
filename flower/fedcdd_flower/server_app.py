"""The ServerApp: `fedcdd.server = "fedcdd"` runs any fedcdd algorithm through
`FedcddStrategy` (aggregation, evaluation and the run directory in libfedcdd);
`fedcdd.server = "stock-fedavg"` drives the same ClientApps with Flower's own FedAvg in dense
mode (FlowerTune-style replies) and saves the final arrays, to show the interop."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

import fedcdd

from .dataset import AppConfig
from .strategy import FedcddStrategy, from_record, to_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = AppConfig.from_run_config(context.run_config)
    run_dir = cfg.run_dir_for(context.run_id)
    if cfg.server == "stock-fedavg":
        stock_fedavg(grid, cfg, run_dir)
        return
    resume = (run_dir / "checkpoint" / "state.json").is_file()
    log(INFO, "fedcdd: %s into %s%s", cfg.run.get("algorithm", "fedcdd"), run_dir, " (resuming)" if resume else "")
    server = fedcdd.Server(cfg.run, run_dir, resume=resume)
    done, total, clients = server.counts()
    strategy = FedcddStrategy(server, cfg.round_timeout)
    strategy.discover(grid, clients, cfg.discovery_timeout)
    strategy.summary()
    for server_round in range(done + 1, total + 1):
        messages = strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=cfg.round_timeout)
        strategy.aggregate_train(server_round, replies)
    table = server.finish()
    log(INFO, "fedcdd: finished; report in %s/summary.md\n%s", run_dir, table)


def stock_fedavg(grid: Grid, cfg: AppConfig, run_dir: Path) -> None:
    """Flower's stock FedAvg over fedcdd ClientApps in dense mode (they must be configured
    with fedcdd.upload = "dense"); the initial arrays are the federation's round-0 adapter."""
    # The initial adapter is a pure function of the config (seeded PEFT init), so the
    # ServerApp computes it as every client does.
    probe = fedcdd.Client(cfg.run, 0)
    initial = to_record(probe.initial_adapter())
    del probe
    clients = int(cfg.run.get("num_clients", 4))
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=clients,
        min_available_nodes=clients,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(cfg.run.get("rounds", 3)),
        timeout=cfg.round_timeout,
        train_config=ConfigRecord({"upload": "dense"}),
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    final = from_record(result.arrays)
    np.savez(run_dir / "final_arrays.npz", **final)
    log(INFO, "stock FedAvg finished; final arrays in %s", run_dir / "final_arrays.npz")
