"""Flower run config -> `fedcdd run` config: the keys whose sentinel means "the default"."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedcdd_flower.dataset import AppConfig  # noqa: E402


def test_sentinels_leave_the_model_defaults_to_fedcdd() -> None:
    app = AppConfig.from_run_config(
        {"model.name": "/models/smollm", "train.lr": 0.0, "train.lr-min": 0.0, "train.warmup-steps": -1}
    )
    assert app.run == {"references": [], "model": "/models/smollm"}


def test_set_rates_and_warm_up_pass_through() -> None:
    app = AppConfig.from_run_config({"train.lr": 1e-4, "train.lr-min": 1e-5, "train.warmup-steps": 0})
    assert (app.run["lr"], app.run["lr_min"], app.run["warmup_steps"]) == (1e-4, 1e-5, 0)


def test_unknown_prefix_is_an_error() -> None:
    with pytest.raises(ValueError, match="lr"):
        AppConfig.from_run_config({"lr": 0.1})
