"""One Flower `Strategy` for every fedcdd algorithm (chosen by `fedcdd.algorithm`): client
sampling, the server's extra arrays, aggregation, server state, evaluation and the
checkpoint all happen in libfedcdd's server (`fedcdd.Server`); this class moves messages.

Masked uploads travel as one uint8 `Array` per reply (the wire format), never as dense
tensors; the server keeps them compact and decodes one at a time while aggregating.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.common.logger import log

import fedcdd


def to_record(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class FedcddStrategy(Strategy):
    """Drives a `fedcdd.Server`: round `r` of Flower (from 1) is the server's round `r - 1`."""

    def __init__(self, server: fedcdd.Server, round_timeout: float) -> None:
        self.server = server
        self.round_timeout = round_timeout
        # client id -> node id, from the discovery query.
        self.node_of: dict[int, int] = {}

    def summary(self) -> None:
        done, total, clients = self.server.counts()
        log(INFO, "\t├──> fedcdd server: %d of %d rounds done, %d clients", done, total, clients)
        log(INFO, "\t└──> nodes by client id: %s", self.node_of)

    def discover(self, grid: Grid, num_clients: int, timeout: float) -> None:
        """Asks every connected SuperNode which client it is, until all `num_clients` answered
        or `timeout` seconds passed (then the missing clients are reported in every round)."""
        deadline = time.monotonic() + timeout
        asked: set[int] = set()
        while len(self.node_of) < num_clients and time.monotonic() < deadline:
            new = [n for n in grid.get_node_ids() if n not in asked]
            if not new:
                time.sleep(1.0)
                continue
            msgs = [
                Message(
                    content=RecordDict({"config": ConfigRecord({"ask": "client-id"})}),
                    message_type=MessageType.QUERY,
                    dst_node_id=n,
                )
                for n in new
            ]
            asked.update(new)
            for reply in grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
                if reply.has_error():
                    log(WARNING, "node %d did not say which client it is: %s", reply.metadata.src_node_id, reply.error.reason)
                    continue
                k = int(reply.content["metrics"]["client-id"])
                node = reply.metadata.src_node_id
                if k in self.node_of and self.node_of[k] != node:
                    log(WARNING, "client %d is claimed by nodes %d and %d; keeping %d", k, self.node_of[k], node, self.node_of[k])
                    continue
                self.node_of[k] = node
        missing = sorted(set(range(num_clients)) - set(self.node_of))
        if missing:
            log(WARNING, "no SuperNode for clients %s after %.0f s", missing, timeout)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        chosen = self.server.begin_round(server_round - 1)
        content = RecordDict(
            {
                "global": to_record(self.server.global_adapter()),
                "extras": to_record(self.server.configure_train()),
                "config": ConfigRecord({"server-round": server_round, "upload": "masked"}),
            }
        )
        messages = []
        for k in chosen:
            node = self.node_of.get(k)
            if node is None:
                log(WARNING, "round %d: client %d has no SuperNode; it will be reported missing", server_round, k)
                continue
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node))
        log(INFO, "configure_train: round %d, clients %s", server_round, chosen)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        client_of = {node: k for k, node in self.node_of.items()}
        for msg in replies:
            node = msg.metadata.src_node_id
            k = client_of.get(node)
            if msg.has_error():
                log(WARNING, "round %d: node %d (client %s) failed: %s", server_round, node, k, msg.error.reason)
                continue
            if k is None:
                log(WARNING, "round %d: a reply from unknown node %d is ignored", server_round, node)
                continue
            try:
                upload = msg.content["upload"]["upload"].numpy().tobytes()
                extras = from_record(msg.content["extras"]) if "extras" in msg.content else {}
                loss = float(msg.content["metrics"]["train-loss"])
                self.server.add_reply(k, upload, extras, loss)
            except (fedcdd.FedcddError, KeyError, ValueError) as e:
                log(WARNING, "round %d: rejected the reply of node %d (client %d): %s", server_round, node, k, e)
        line = self.server.finish_round()
        log(INFO, "%s", line)
        return None, MetricRecord({"round": server_round})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # The server evaluates the global model per domain itself (in finish_round).
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
