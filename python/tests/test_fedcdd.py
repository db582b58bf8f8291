"""Tests of the fedcdd Python package over libfedcdd.

The library comes from $FEDCDD_LIB (the Rust test harness points it at the freshly built
one), the `fedcdd` CLI from $FEDCDD_BIN (for a model and data to train on, and for the
in-process reference run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import fedcdd


def fedcdd_bin() -> str:
    b = os.environ.get("FEDCDD_BIN") or shutil.which("fedcdd")
    if not b:
        pytest.skip("SKIPPED: no fedcdd binary ($FEDCDD_BIN)")
    return b


def adapter(seed: int, layers: int = 2, r: int = 4, d: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(layers):
        base = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        out[f"{base}.lora_A.weight"] = rng.standard_normal((r, d)).astype(np.float32)
        out[f"{base}.lora_B.weight"] = rng.standard_normal((d, r)).astype(np.float32) * 0.01
    return out


def test_version_and_library() -> None:
    assert fedcdd.version().count(".") == 2
    assert fedcdd.library_path().name.startswith(("libfedcdd", "fedcdd"))


def test_dense_upload_round_trips_exactly() -> None:
    g, local = adapter(0), adapter(1)
    data = fedcdd.encode_upload(g, local, round=3, client_id=7, num_samples=42)
    up = fedcdd.decode_upload(data)
    assert (up.round, up.client_id, up.num_samples, up.byte_len) == (3, 7, 42, len(data))
    for name in g:
        assert not up.masked[name]
        np.testing.assert_array_equal(up.tensors[name], local[name] - g[name])


def test_masked_upload_keeps_the_top_columns_and_is_smaller() -> None:
    g, local = adapter(0), adapter(1)
    dense = fedcdd.encode_upload(g, local)
    masked = fedcdd.encode_upload(g, local, keep_ratio=0.25, noise_scale=0.0, seed=5)
    assert len(masked) < len(dense)
    up = fedcdd.decode_upload(masked)
    name = next(n for n in g if n.endswith("lora_A.weight"))
    delta = local[name] - g[name]
    got = up.tensors[name]
    # ρ = 0.25 of 16 columns: the 4 largest-norm columns exact, the others zero (η = 0).
    norms = np.linalg.norm(delta, axis=0)
    keep = np.argsort(-norms, kind="stable")[:4]
    np.testing.assert_array_equal(got[:, keep], delta[:, keep])
    rest = np.setdiff1d(np.arange(16), keep)
    assert np.all(got[:, rest] == 0)


def test_hostile_bytes_raise_fedcdd_error() -> None:
    g, local = adapter(0), adapter(1)
    data = bytearray(fedcdd.encode_upload(g, local))
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(fedcdd.FedcddError) as e:
        fedcdd.decode_upload(bytes(data))
    assert e.value.status_name == "FEDCDD_ERR_BAD_ENCODING"
    with pytest.raises(fedcdd.FedcddError):
        fedcdd.decode_upload(b"")
    with pytest.raises(fedcdd.FedcddError):
        fedcdd.decode_upload(b"FCDU" + bytes(100))


def test_encode_rejects_nan_naming_the_tensor() -> None:
    g, local = adapter(0), adapter(1)
    name = next(iter(local))
    local[name][0, 0] = np.nan
    with pytest.raises(fedcdd.FedcddError) as e:
        fedcdd.encode_upload(g, local)
    assert name in str(e.value) and e.value.status_name == "FEDCDD_ERR_NON_FINITE"


@pytest.mark.parametrize("streaming", [False, True])
def test_fedavg_is_the_weighted_mean(streaming: bool) -> None:
    g = adapter(0)
    updates = [adapter(10 + i) for i in range(3)]
    weights = [10.0, 20.0, 70.0]
    agg = fedcdd.Aggregator("fedavg", streaming=streaming)
    agg.set_global(g)
    for _ in range(agg.passes):
        for i, (u, w) in enumerate(zip(updates, weights)):
            agg.add_client(u, w, i)
        if agg.passes == 2:
            agg.begin_pass2()
    out = agg.finalize()
    total = sum(weights)
    for name in g:
        want = g[name].astype(np.float64) + sum(
            w / total * u[name].astype(np.float64) for u, w in zip(updates, weights)
        )
        np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-6)


def test_fedcdd_streaming_equals_batch_and_identical_clients_give_g_plus_delta() -> None:
    g = adapter(0)
    updates = [adapter(20 + i) for i in range(3)]
    results = []
    for streaming in (False, True):
        agg = fedcdd.Aggregator("fedcdd", streaming=streaming)
        agg.set_global(g)
        for p in range(agg.passes):
            for i, u in enumerate(updates):
                agg.add_client(u, 1.0 + i, i)
            if p + 1 < agg.passes:
                agg.begin_pass2()
        results.append(agg.finalize())
    for name in g:
        # The spec's bound: relative 1e-5, against the tensor's scale.
        scale = float(np.abs(results[0][name]).max())
        np.testing.assert_allclose(results[0][name], results[1][name], rtol=0, atol=1e-5 * scale)
    same = fedcdd.Aggregator("fedcdd")
    same.set_global(g)
    for i in range(3):
        same.add_client(updates[0], 5.0, i)
    out = same.finalize()
    for name in g:
        np.testing.assert_allclose(out[name], g[name] + updates[0][name], rtol=1e-5, atol=1e-6)


def test_aggregator_rejects_a_nan_client_and_keeps_the_round() -> None:
    g = adapter(0)
    agg = fedcdd.Aggregator("fedavg")
    agg.set_global(g)
    agg.add_client(adapter(1), 1.0, 0)
    bad = adapter(2)
    bad[next(iter(bad))][0, 0] = np.inf
    with pytest.raises(fedcdd.FedcddError):
        agg.add_client(bad, 1.0, 1)
    out = agg.finalize()
    for name in g:
        np.testing.assert_allclose(out[name], g[name] + adapter(1)[name], rtol=1e-6, atol=1e-7)


def test_bad_config_is_an_error_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(fedcdd.FedcddError) as e:
        fedcdd.Client({"algorithm": "fedfoo"}, 0)
    assert "fedfoo" in str(e.value)
    with pytest.raises(fedcdd.FedcddError) as e:
        fedcdd.Server({"rounds_typo": 3}, tmp_path / "run")
    assert "rounds_typo" in str(e.value)
    with pytest.raises(fedcdd.FedcddError) as e:
        fedcdd.Server({"algorithm": "flora"}, tmp_path / "run")
    assert "one process" in str(e.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny model and generated multi-domain data, written by the CLI."""
    root = tmp_path_factory.mktemp("tiny")
    b = fedcdd_bin()
    subprocess.run([b, "init-model", "--preset", "tiny", "--out", str(root / "m"), "--quiet"], check=True, timeout=300)
    for name, n, seed in [("train.jsonl", 12, 0), ("eval.jsonl", 3, 9)]:
        subprocess.run([b, "gen-corpus", "--n", str(n), "--seed", str(seed), "--out", str(root / name)], check=True, timeout=300)
    return {
        "model": str(root / "m"),
        "data": str(root / "train.jsonl"),
        "eval_data": str(root / "eval.jsonl"),
        "threads": 1,
        "num_clients": 3,
        "sample_clients": 2,
        "rounds": 2,
        "local_steps": 2,
        "batch": 2,
        "micro_batch": 1,
        "seq": 32,
        "eval_questions": 2,
        "lr": 0.002,
        "references": [],
    }


def federate(cfg: dict, run_dir: Path) -> Path:
    """`fedcdd run`, with every client and the server driven from Python."""
    server = fedcdd.Server(cfg, run_dir)
    done, total, n = server.counts()
    clients = [fedcdd.Client(cfg, k) for k in range(n)]
    states: list[dict] = [{} for _ in range(n)]
    for r in range(done, total):
        chosen = server.begin_round(r)
        g, extras = server.global_adapter(), server.configure_train()
        for k in chosen:
            res = clients[k].train_round(r, g, extras, states[k])
            states[k] = res.state
            server.add_reply(k, res.upload, res.extras, res.loss)
        server.finish_round()
    server.finish()
    return run_dir / "adapter" / "adapter_model.safetensors"


@pytest.mark.parametrize(
    "overrides",
    [
        {"algorithm": "fedcdd"},
        {"algorithm": "scaffold"},
        {"algorithm": "fedsa-lora"},
        # Robust rule, an attacker and clipping; client-level DP (server and client noise).
        {"algorithm": "fedavg", "robust": "median", "attack": "signflip:1"},
        {"algorithm": "fedcdd", "clip": "median:1", "attack": "scale:1:-10"},
        {"algorithm": "fedavg", "dp_clip": 0.05, "dp_noise_multiplier": 0.8},
        {"algorithm": "fedprox", "dp_clip": 0.05, "dp_mode": "client", "attack": "labelflip:1"},
    ],
    ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_client_and_server_reproduce_fedcdd_run(tiny: dict, tmp_path: Path, overrides: dict) -> None:
    cfg = dict(tiny, **overrides)
    ours = federate(cfg, tmp_path / "py")
    ref = tmp_path / "cli"
    sets = []
    for k, v in cfg.items():
        sets += ["--set", f"{k}={fedcdd._toml_value(v)}"]  # type: ignore[attr-defined]
    subprocess.run([fedcdd_bin(), "run", "--quiet", "--out", str(ref), *sets], check=True, timeout=600)
    assert ours.read_bytes() == (ref / "adapter" / "adapter_model.safetensors").read_bytes()


def test_server_rejects_a_corrupt_reply_and_the_round_goes_on(tiny: dict, tmp_path: Path) -> None:
    cfg = dict(tiny, rounds=1, sample_clients=3)
    server = fedcdd.Server(cfg, tmp_path / "run")
    chosen = server.begin_round(0)
    g = server.global_adapter()
    before = {k: v.copy() for k, v in g.items()}
    for k in chosen:
        res = fedcdd.Client(cfg, k).train_round(0, g)
        upload = bytearray(res.upload)
        if k == 1:
            upload[len(upload) // 2] ^= 0x55
            with pytest.raises(fedcdd.FedcddError) as e:
                server.add_reply(k, bytes(upload), res.extras, res.loss)
            assert "client 1" in str(e.value)
            continue
        server.add_reply(k, bytes(upload), res.extras, res.loss)
    line = server.finish_round()
    assert "rejected" in line and "missing" not in line
    after = server.global_adapter()
    assert any(not np.array_equal(before[n], after[n]) for n in before)
    server.finish()
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "rejected the reply of client 1" in summary
    assert "sent no reply" not in summary


def test_client_evaluates_and_takes_records_in_memory(tiny: dict) -> None:
    c = fedcdd.Client(tiny, 0)
    n = c.num_examples
    assert n > 0
    init = c.initial_adapter()
    report = c.evaluate(init, Path(tiny["eval_data"]))
    assert report["overall"]["tokens"] > 0 and np.isfinite(report["overall"]["loss"])
    assert set(report["domains"]) >= {"arithmetic"}
    c.set_records(Path(tiny["data"]).read_bytes()[: 4000].rsplit(b"\n", 1)[0])
    assert 0 < c.num_examples < n
    with pytest.raises(fedcdd.FedcddError):
        c.set_records(b"{not json")
