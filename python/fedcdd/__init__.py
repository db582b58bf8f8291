"""fedcdd: federated LoRA fine-tuning with FedCDD, over libfedcdd.

Every number is computed by the Rust library; this package moves NumPy arrays and bytes in
and out and turns failures into `FedcddError`.

- `encode_upload` / `decode_upload`: a client's masked update in the wire format.
- `Aggregator`: one server step of FedCDD or a FedAvg/FedOpt baseline over client updates or
  uploads (streaming: memory independent of the number of clients).
- `Client` / `Server`: the two halves of `fedcdd run` for a deployment (e.g. Flower): a
  client trains on its own data and returns its upload; the server samples, aggregates
  through the algorithm's strategy, evaluates and writes the run directory.

Tensors are dicts from PEFT tensor names to NumPy arrays (float32, float16; bfloat16 as
uint16 bits is not accepted here).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import numpy as np

from . import _native as N

__all__ = [
    "Aggregator",
    "Client",
    "FedcddError",
    "RoundResult",
    "Server",
    "Upload",
    "config_text",
    "decode_upload",
    "encode_upload",
    "library_path",
    "version",
]

Tensors = Mapping[str, np.ndarray]
ConfigLike = Union[str, Mapping[str, Any]]


class FedcddError(Exception):
    """A libfedcdd call failed: `status` is the FEDCDD_ERR_* code, `status_name` its name,
    and the message is the library's (it names the client and tensor at fault)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        name = N.lib().fedcdd_status_name(status)
        self.status_name = name.decode() if name else str(status)
        super().__init__(f"{message} ({self.status_name})")


def _check(status: int) -> None:
    if status != N.OK:
        msg = N.lib().fedcdd_last_error()
        raise FedcddError(status, msg.decode("utf-8", "replace") if msg else "unknown error")


def version() -> str:
    """The library's version text."""
    return N.lib().fedcdd_version().decode()


def library_path() -> Path:
    """Where libfedcdd is (or would be) loaded from."""
    return N.library_path()


# ---------------------------------------------------------------------------------------------
# Tensors in and out
# ---------------------------------------------------------------------------------------------

_DTYPES = {np.dtype(np.float32): N.DTYPE_F32, np.dtype(np.float16): N.DTYPE_F16}


class _CTensors:
    """`fedcdd_tensor` structs over NumPy arrays, kept alive as long as this object."""

    def __init__(self, tensors: Tensors) -> None:
        self.arrays: list[np.ndarray] = []
        self.keep: list[Any] = []
        self.array = (N.Tensor * max(1, len(tensors)))()
        self.n = len(tensors)
        for i, (name, value) in enumerate(tensors.items()):
            a = np.ascontiguousarray(value)
            if a.dtype not in _DTYPES:
                a = np.ascontiguousarray(a, dtype=np.float32)
            if a.ndim == 0:
                raise ValueError(f"tensor {name!r}: a scalar is not a tensor")
            shape = (ctypes.c_size_t * a.ndim)(*a.shape)
            encoded = name.encode()
            self.arrays.append(a)
            self.keep += [shape, encoded]
            self.array[i] = N.Tensor(
                encoded, shape, a.ndim, _DTYPES[a.dtype], a.ctypes.data, a.size
            )


class _TensorList:
    """An owned `fedcdd_tensors` handle."""

    def __init__(self, handle: ctypes.c_void_p | None = None) -> None:
        if handle is None:
            handle = ctypes.c_void_p()
            _check(N.lib().fedcdd_tensors_new(ctypes.byref(handle)))
        self.handle = handle

    @classmethod
    def of(cls, tensors: Tensors | None) -> "_TensorList":
        t = cls()
        for name, value in (tensors or {}).items():
            c = _CTensors({name: value})
            _check(N.lib().fedcdd_tensors_add(t.handle, c.array))
        return t

    def to_dict(self) -> dict[str, np.ndarray]:
        return _read_list(self.handle)

    def __del__(self) -> None:
        h = getattr(self, "handle", None)
        if h:
            N.lib().fedcdd_tensors_free(h)
            self.handle = None  # type: ignore[assignment]


def _read_list(handle: ctypes.c_void_p) -> dict[str, np.ndarray]:
    """Copies every tensor of a (borrowed) `fedcdd_tensors` into NumPy arrays."""
    L = N.lib()
    n = ctypes.c_size_t()
    _check(L.fedcdd_tensors_count(handle, ctypes.byref(n)))
    out: dict[str, np.ndarray] = {}
    for i in range(n.value):
        v = N.TensorView()
        _check(L.fedcdd_tensors_get(handle, i, ctypes.byref(v)))
        shape = tuple(v.shape[: v.ndim])
        data = np.ctypeslib.as_array(v.data, shape=(v.len,)).copy() if v.len else np.zeros(0)
        out[v.name.decode()] = data.reshape(shape).astype(np.float32, copy=False)
    return out


def _take_bytes(handle: ctypes.c_void_p) -> bytes:
    L = N.lib()
    try:
        data = N.u8p()
        n = ctypes.c_size_t()
        _check(L.fedcdd_bytes_get(handle, ctypes.byref(data), ctypes.byref(n)))
        return ctypes.string_at(data, n.value)
    finally:
        L.fedcdd_bytes_free(handle)


def _u8(data: bytes) -> tuple[Any, int]:
    buf = (ctypes.c_uint8 * max(1, len(data))).from_buffer_copy(data or b"\0")
    return buf, len(data)


# ---------------------------------------------------------------------------------------------
# Names of the C enums
# ---------------------------------------------------------------------------------------------


def _algorithm(name: str) -> int:
    code = ctypes.c_uint32()
    _check(N.lib().fedcdd_algorithm_from_name(name.encode(), ctypes.byref(code)))
    return code.value


_NORM = {"column": 0, "row": 1, "rank": 2}
_TARGET = {"delta": 0, "weights": 1}
_WEIGHTING = {"p_relu": 0, "relu": 1, "softmax": 2, "samples": 3, "uniform": 4}
_VARIANT = {"reddi": 0, "openfedllm": 1}
_IMPORTANCE = {"column_l2": 0, "element_abs": 1, "row_l2": 2}
_UPLOAD_DTYPE = {None: N.DTYPE_AS_INPUT, "f32": N.DTYPE_F32, "f16": N.DTYPE_F16, "bf16": N.DTYPE_BF16}


def _choice(table: Mapping[Any, int], value: Any, what: str) -> int:
    if value not in table:
        raise ValueError(f"{what} {value!r}: expected one of {', '.join(map(str, table))}")
    return table[value]


# ---------------------------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------------------------


def encode_upload(
    global_: Tensors,
    local: Tensors,
    *,
    round: int = 0,
    client_id: int = 0,
    num_samples: int = 0,
    seed: int | None = None,
    keep_ratio: float = 1.0,
    noise_scale: float = 0.0,
    importance: str = "column_l2",
    dtype: str | None = None,
    algorithm: str = "fedcdd",
) -> bytes:
    """Masks `local − global_` per tensor (keep ratio ρ, noise scale η) and returns the
    upload's bytes. `seed` defaults to the `fedcdd encode` CLI's (from round and client)."""
    L = N.lib()
    opts = N.EncodeOptions()
    _check(L.fedcdd_encode_options_default(ctypes.byref(opts)))
    opts.round, opts.client_id, opts.num_samples = round, client_id, num_samples
    opts.seed = L.fedcdd_default_seed(round, client_id) if seed is None else seed
    opts.keep_ratio, opts.noise_scale = keep_ratio, noise_scale
    opts.importance = _choice(_IMPORTANCE, importance, "importance")
    opts.upload_dtype = _choice(_UPLOAD_DTYPE, dtype, "dtype")
    opts.algorithm = _algorithm(algorithm)
    g, l = _CTensors(global_), _CTensors(local)
    size = ctypes.c_size_t()
    _check(
        L.fedcdd_encode_upload_size(
            ctypes.byref(opts), g.array, g.n, l.array, l.n, ctypes.byref(size)
        )
    )
    buf = (ctypes.c_uint8 * max(1, size.value))()
    written = ctypes.c_size_t()
    _check(
        L.fedcdd_encode_upload(
            ctypes.byref(opts), g.array, g.n, l.array, l.n, buf, size.value, ctypes.byref(written)
        )
    )
    return bytes(buf[: written.value])


@dataclass
class Upload:
    """A decoded upload: its header and every tensor reconstructed (masked columns
    regenerated from the seed, bit-identical to the client's own masked tensor)."""

    version: int
    round: int
    client_id: int
    num_samples: int
    byte_len: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    masked: dict[str, bool] = field(default_factory=dict)


def decode_upload(data: bytes) -> Upload:
    """Validates and decodes upload bytes; corrupt or hostile bytes raise `FedcddError`."""
    L = N.lib()
    buf, n = _u8(data)
    handle = ctypes.c_void_p()
    _check(L.fedcdd_upload_parse(buf, n, ctypes.byref(handle)))
    try:
        h = N.UploadHeader()
        _check(L.fedcdd_upload_get_header(handle, ctypes.byref(h)))
        up = Upload(h.version, h.round, h.client_id, h.num_samples, h.byte_len)
        for i in range(h.num_tensors):
            info = N.RecordInfo()
            _check(L.fedcdd_upload_tensor_info(handle, i, ctypes.byref(info)))
            out = np.empty(info.numel, dtype=np.float32)
            _check(L.fedcdd_upload_decode(handle, i, N.DTYPE_F32, out.ctypes.data, info.numel))
            name = info.name.decode()
            up.tensors[name] = out.reshape(tuple(info.shape[: info.ndim]))
            up.masked[name] = bool(info.masked)
        return up
    finally:
        L.fedcdd_upload_free(handle)


# ---------------------------------------------------------------------------------------------
# Aggregator
# ---------------------------------------------------------------------------------------------


class Aggregator:
    """One server step of `algorithm` (fedavg, fedprox, fedavgm, fedadagrad, fedyogi,
    fedadam, ffa-lora, fedsa-lora, fedcdd) over client updates `Δ_i = θ_i − G` or uploads.
    In streaming mode FedCDD needs two passes: add every client, `begin_pass2()`, add every
    client again in the same order; `passes` says how many. Server state (FedOpt moments)
    is kept across rounds and can be saved with `state_bytes()`."""

    def __init__(
        self,
        algorithm: str = "fedcdd",
        *,
        streaming: bool = False,
        norm_axis: str = "column",
        target: str = "delta",
        weighting: str = "p_relu",
        softmax_temperature: float = 1.0,
        renormalize: bool = True,
        server_lr: float | None = None,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        fedopt_variant: str = "reddi",
    ) -> None:
        L = N.lib()
        cfg = N.Config()
        _check(L.fedcdd_config_default(_algorithm(algorithm), ctypes.byref(cfg)))
        cfg.mode = N.MODE_STREAMING if streaming else N.MODE_BATCH
        cfg.norm_axis = _choice(_NORM, norm_axis, "norm_axis")
        cfg.target = _choice(_TARGET, target, "target")
        cfg.weighting = _choice(_WEIGHTING, weighting, "weighting")
        cfg.softmax_temperature = softmax_temperature
        cfg.renormalize = 1 if renormalize else 0
        if server_lr is not None:
            cfg.server_lr = server_lr
        cfg.beta1, cfg.beta2, cfg.tau = beta1, beta2, tau
        cfg.fedopt_variant = _choice(_VARIANT, fedopt_variant, "fedopt_variant")
        self._handle = ctypes.c_void_p()
        _check(L.fedcdd_aggregator_new(ctypes.byref(cfg), ctypes.byref(self._handle)))
        self._names: list[tuple[str, tuple[int, ...]]] = []

    def __del__(self) -> None:
        h = getattr(self, "_handle", None)
        if h:
            N.lib().fedcdd_aggregator_free(h)
            self._handle = None  # type: ignore[assignment]

    @property
    def passes(self) -> int:
        n = ctypes.c_size_t()
        _check(N.lib().fedcdd_aggregator_passes(self._handle, ctypes.byref(n)))
        return n.value

    def set_global(self, tensors: Tensors) -> None:
        c = _CTensors(tensors)
        _check(N.lib().fedcdd_aggregator_set_global(self._handle, c.array, c.n))
        self._names = [(k, tuple(np.shape(v))) for k, v in tensors.items()]

    def add_client(self, update: Tensors, num_samples: float, client_id: int) -> None:
        """Adds one client's update (Δ per tensor); a rejected client leaves the round as it was."""
        c = _CTensors(update)
        _check(
            N.lib().fedcdd_aggregator_add_client(
                self._handle, client_id, float(num_samples), c.array, c.n
            )
        )

    def add_upload(self, data: bytes, num_samples: float | None = None) -> None:
        """Adds one client's upload (its sample count from the upload unless given)."""
        buf, n = _u8(data)
        samples = N.SAMPLES_FROM_UPLOAD if num_samples is None else float(num_samples)
        _check(N.lib().fedcdd_aggregator_add_upload(self._handle, buf, n, samples))

    def begin_pass2(self) -> None:
        _check(N.lib().fedcdd_aggregator_begin_pass2(self._handle))

    def reset_round(self) -> None:
        _check(N.lib().fedcdd_aggregator_reset_round(self._handle))

    def finalize(self) -> dict[str, np.ndarray]:
        """Ends the round; returns the new global adapter (float32)."""
        outs = (N.Output * max(1, len(self._names)))()
        arrays = []
        keep = []
        for i, (name, shape) in enumerate(self._names):
            a = np.empty(shape, dtype=np.float32)
            encoded = name.encode()
            keep.append(encoded)
            arrays.append(a)
            outs[i] = N.Output(encoded, N.DTYPE_F32, a.ctypes.data, a.size)
        _check(N.lib().fedcdd_aggregator_finalize(self._handle, outs, len(self._names)))
        result = {name: a for (name, _), a in zip(self._names, arrays)}
        return result

    def state_bytes(self) -> bytes:
        L = N.lib()
        n = ctypes.c_size_t()
        _check(L.fedcdd_aggregator_state_size(self._handle, ctypes.byref(n)))
        buf = (ctypes.c_uint8 * max(1, n.value))()
        written = ctypes.c_size_t()
        _check(L.fedcdd_aggregator_save_state(self._handle, buf, n.value, ctypes.byref(written)))
        return bytes(buf[: written.value])

    def load_state(self, data: bytes) -> None:
        buf, n = _u8(data)
        _check(N.lib().fedcdd_aggregator_load_state(self._handle, buf, n))


# ---------------------------------------------------------------------------------------------
# A deployment's client and server
# ---------------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"config value {v!r} of type {type(v).__name__} has no TOML form")


def config_text(config: ConfigLike) -> str:
    """A run configuration as the TOML text libfedcdd reads: a string is taken as TOML
    already; a mapping's keys are those of `config.toml` (`algorithm`, `rounds`, …)."""
    if isinstance(config, str):
        return config
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in config.items() if v is not None)


@dataclass
class RoundResult:
    """What a client's round produced."""

    upload: bytes
    extras: dict[str, np.ndarray]
    adapter: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    loss: float
    num_samples: int


class Client:
    """Client `client_id` of the federation a run config describes (the keys of a run's
    `config.toml`): the base model, its data (partition `client_id` of the config's data, or
    every record of `data`), the algorithm's client side."""

    def __init__(self, config: ConfigLike, client_id: int, data: str | Path | None = None) -> None:
        self._handle = ctypes.c_void_p()
        path = None if data is None else str(data).encode()
        _check(
            N.lib().fedcdd_client_new(
                config_text(config).encode(), client_id, path, ctypes.byref(self._handle)
            )
        )
        self.client_id = client_id

    def __del__(self) -> None:
        h = getattr(self, "_handle", None)
        if h:
            N.lib().fedcdd_client_free(h)
            self._handle = None  # type: ignore[assignment]

    @property
    def num_examples(self) -> int:
        n = ctypes.c_uint64()
        _check(N.lib().fedcdd_client_num_examples(self._handle, ctypes.byref(n)))
        return n.value

    def set_records(self, records: bytes | str | Path) -> None:
        """Replaces the training records: JSONL bytes, or a file path."""
        data = records if isinstance(records, bytes) else Path(records).read_bytes()
        buf, n = _u8(data)
        _check(N.lib().fedcdd_client_set_records(self._handle, buf, n))

    def initial_adapter(self) -> dict[str, np.ndarray]:
        """The federation's round-0 global adapter (the seeded init every process computes)."""
        h = ctypes.c_void_p()
        _check(N.lib().fedcdd_client_initial_adapter(self._handle, ctypes.byref(h)))
        return _TensorList(h).to_dict()

    def train_round(
        self,
        round: int,
        global_: Tensors,
        extras: Tensors | None = None,
        state: Tensors | None = None,
    ) -> RoundResult:
        """Trains round `round` (from 0) from `global_`; returns the masked upload, the extra
        arrays for the server, the trained adapter and the client's new state."""
        L = N.lib()
        g = _TensorList.of(global_)
        e = _TensorList.of(extras)
        s = _TensorList.of(state)
        r = ctypes.c_void_p()
        _check(L.fedcdd_client_train_round(self._handle, round, g.handle, e.handle, s.handle, ctypes.byref(r)))
        try:
            data = N.u8p()
            n = ctypes.c_size_t()
            _check(L.fedcdd_client_result_upload(r, ctypes.byref(data), ctypes.byref(n)))
            upload = ctypes.string_at(data, n.value)
            ex, ad = ctypes.c_void_p(), ctypes.c_void_p()
            loss, samples = ctypes.c_double(), ctypes.c_uint64()
            _check(
                L.fedcdd_client_result_parts(
                    r, ctypes.byref(ex), ctypes.byref(ad), ctypes.byref(loss), ctypes.byref(samples)
                )
            )
            return RoundResult(
                upload=upload,
                extras=_read_list(ex),
                adapter=_read_list(ad),
                state=s.to_dict(),
                loss=loss.value,
                num_samples=samples.value,
            )
        finally:
            L.fedcdd_client_result_free(r)

    def evaluate(self, adapter: Tensors, records: bytes | str | Path) -> dict[str, Any]:
        """Mean token loss, overall and per domain, of `adapter` on `records`."""
        import json

        data = records if isinstance(records, bytes) else Path(records).read_bytes()
        buf, n = _u8(data)
        a = _TensorList.of(adapter)
        out = ctypes.c_void_p()
        _check(N.lib().fedcdd_client_evaluate(self._handle, a.handle, buf, n, ctypes.byref(out)))
        return json.loads(_take_bytes(out))


class Server:
    """The server of the federation a run config describes, writing `run_dir` as `fedcdd run`
    does (`resume` continues its checkpoint)."""

    def __init__(self, config: ConfigLike, run_dir: str | Path, resume: bool = False) -> None:
        self._handle = ctypes.c_void_p()
        _check(
            N.lib().fedcdd_server_new(
                config_text(config).encode(),
                str(run_dir).encode(),
                1 if resume else 0,
                ctypes.byref(self._handle),
            )
        )

    def __del__(self) -> None:
        h = getattr(self, "_handle", None)
        if h:
            N.lib().fedcdd_server_free(h)
            self._handle = None  # type: ignore[assignment]

    def counts(self) -> tuple[int, int, int]:
        """(rounds done, rounds in all, clients in the federation)."""
        a, b, c = ctypes.c_size_t(), ctypes.c_size_t(), ctypes.c_size_t()
        _check(N.lib().fedcdd_server_counts(self._handle, ctypes.byref(a), ctypes.byref(b), ctypes.byref(c)))
        return a.value, b.value, c.value

    def begin_round(self, round: int) -> list[int]:
        """Starts round `round` (from 0): the ids of the clients sampled for it."""
        _, _, n = self.counts()
        ids = (ctypes.c_size_t * max(1, n))()
        count = ctypes.c_size_t()
        _check(N.lib().fedcdd_server_begin_round(self._handle, round, ids, n, ctypes.byref(count)))
        return list(ids[: count.value])

    def global_adapter(self) -> dict[str, np.ndarray]:
        h = ctypes.c_void_p()
        _check(N.lib().fedcdd_server_global(self._handle, ctypes.byref(h)))
        return _TensorList(h).to_dict()

    def configure_train(self) -> dict[str, np.ndarray]:
        """The arrays the strategy sends every sampled client (SCAFFOLD: `c`)."""
        h = ctypes.c_void_p()
        _check(N.lib().fedcdd_server_configure_train(self._handle, ctypes.byref(h)))
        return _TensorList(h).to_dict()

    def add_reply(
        self, client: int, upload: bytes, extras: Tensors | None = None, loss: float = 0.0
    ) -> None:
        """Takes client `client`'s reply; a bad one raises `FedcddError` (the round goes on
        without it and the report lists it)."""
        buf, n = _u8(upload)
        e = _TensorList.of(extras)
        _check(N.lib().fedcdd_server_add_reply(self._handle, client, buf, n, e.handle, float(loss)))

    def finish_round(self) -> str:
        """Aggregates, evaluates and checkpoints the round; returns its log line."""
        out = ctypes.c_void_p()
        _check(N.lib().fedcdd_server_finish_round(self._handle, ctypes.byref(out)))
        return _take_bytes(out).decode()

    def finish(self) -> str:
        """Writes the final adapter and the report; returns the accuracy table."""
        out = ctypes.c_void_p()
        _check(N.lib().fedcdd_server_finish(self._handle, ctypes.byref(out)))
        return _take_bytes(out).decode()


def rounds(server: Server) -> Iterable[int]:
    """The rounds still to run (from 0)."""
    done, total, _ = server.counts()
    return range(done, total)
