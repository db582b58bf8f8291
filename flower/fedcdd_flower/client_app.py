"""The ClientApp: one fedcdd client per SuperNode (its client id and data come from the
node config), training with libfedcdd. Masked mode replies with the upload (one uint8 Array)
and the strategy's extra arrays; dense mode replies as FlowerTune clients do (the trained
adapter as an ArrayRecord keyed by PEFT names, plus num-examples), so Flower's own
strategies can drive it. The client's state (SCAFFOLD's c_i, FedSA-LoRA's B) lives in the
node's context between rounds."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedcdd

from .dataset import AppConfig, NodeData
from .strategy import from_record, to_record

app = ClientApp()

STATE_KEY = "fedcdd.state"

# One client per ClientApp process; rebuilt when the process (or the config) is new.
_cached: dict[tuple[str, int, str | None], fedcdd.Client] = {}


def client_for(context: Context) -> tuple[fedcdd.Client, AppConfig, NodeData]:
    cfg = AppConfig.from_run_config(context.run_config)
    node = NodeData.from_node_config(context.node_config)
    key = (fedcdd.config_text(cfg.run), node.client_id, node.data_path)
    if key not in _cached:
        _cached.clear()
        _cached[key] = fedcdd.Client(cfg.run, node.client_id, node.data_path)
    return _cached[key], cfg, node


def fault_drill(upload: bytes, fault: str) -> bytes:
    """For fault drills only (node config `fault`): `nan-upload` turns the last value of the
    last tensor into NaN and re-seals the checksum, so the bytes parse but the server must
    reject the tensor; `corrupt-upload` flips a byte (the checksum catches it)."""
    if fault == "nan-upload":
        body = bytearray(upload[:-4])
        body[-4:] = struct.pack("<f", float("nan"))
        return bytes(body) + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
    if fault == "corrupt-upload":
        b = bytearray(upload)
        b[len(b) // 2] ^= 0x55
        return bytes(b)
    raise ValueError(f"unknown fault {fault!r}: expected nan-upload or corrupt-upload")


@app.query()
def query(msg: Message, context: Context) -> Message:
    client, _, node = client_for(context)
    metrics = MetricRecord({"client-id": node.client_id, "num-examples": client.num_examples})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    client, cfg, node = client_for(context)
    config = msg.content["config"]
    server_round = int(config["server-round"])
    state = from_record(context.state[STATE_KEY]) if STATE_KEY in context.state else {}
    if str(config.get("upload", cfg.upload)) == "dense" or "arrays" in msg.content:
        # FlowerTune style: the global adapter under "arrays", the trained one back.
        global_ = from_record(msg.content["arrays"])
        res = client.train_round(server_round - 1, global_, None, state)
        reply = RecordDict(
            {
                "arrays": to_record(res.adapter),
                "metrics": MetricRecord({"num-examples": res.num_samples, "train_loss": res.loss}),
            }
        )
    else:
        global_ = from_record(msg.content["global"])
        extras = from_record(msg.content["extras"])
        res = client.train_round(server_round - 1, global_, extras, state)
        upload = res.upload
        if "fault" in context.node_config:
            upload = fault_drill(upload, str(context.node_config["fault"]))
        reply = RecordDict(
            {
                "upload": ArrayRecord(
                    array_dict={"upload": Array(np.frombuffer(upload, dtype=np.uint8).copy())}
                ),
                "extras": to_record(res.extras),
                "metrics": MetricRecord(
                    {
                        "num-examples": res.num_samples,
                        "train-loss": res.loss,
                        "upload-bytes": len(res.upload),
                    }
                ),
            }
        )
    if res.state:
        context.state[STATE_KEY] = to_record(res.state)
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Loss of the sent adapter on the node's own eval file (node config `eval-path`)."""
    client, _, _ = client_for(context)
    path = context.node_config.get("eval-path")
    if not path:
        raise ValueError("evaluate needs --node-config eval-path=\"/path/eval.jsonl\" on the SuperNode")
    adapter = from_record(msg.content["arrays"])
    report = client.evaluate(adapter, str(path))
    metrics = MetricRecord(
        {"num-examples": int(report["overall"]["tokens"]), "eval_loss": float(report["overall"]["loss"])}
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
