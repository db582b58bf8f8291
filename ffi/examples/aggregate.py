#!/usr/bin/env python3
"""aggregate.py: a FedCDD server round from Python with libfedcdd through ctypes and NumPy.

Three clients send their LoRA updates (delta = theta - G) as NumPy arrays; the server
aggregates them with FedCDD in batch mode and in two-pass streaming mode, checks that both
agree, shows a NaN client being rejected, round-trips one client through the upload format
(mask + encode, then decode), and prints the new global tensors as lines
    RESULT <tensor name> <value> <value> ...
(the ffi tests compare them with fedcdd-core). Exit status 0 when every check passed.

Usage:
    python3 ffi/examples/aggregate.py [PATH/TO/libfedcdd.so]
The library is taken from the argument, else $FEDCDD_LIB, else the system's search path
(`ctypes.util.find_library("fedcdd")`, e.g. after `ffi/install.sh /usr/local`).
"""

import ctypes
import ctypes.util
import os
import sys

import numpy as np

# ---------------------------------------------------------------------------------------------
# Bindings: the parts of include/fedcdd.h this example uses.
# ---------------------------------------------------------------------------------------------

FEDCDD_OK = 0
FEDCDD_ERR_NON_FINITE = 4
FEDCDD_DTYPE_F32, FEDCDD_DTYPE_F16, FEDCDD_DTYPE_BF16 = 0, 1, 2
FEDCDD_ALG_FEDCDD = 10
FEDCDD_MODE_BATCH, FEDCDD_MODE_STREAMING = 0, 1
FEDCDD_SAMPLES_FROM_UPLOAD = -1.0
FEDCDD_MAX_DIMS = 4


class Config(ctypes.Structure):
    _fields_ = [
        ("algorithm", ctypes.c_uint32),
        ("mode", ctypes.c_uint32),
        ("norm_axis", ctypes.c_uint32),
        ("target", ctypes.c_uint32),
        ("weighting", ctypes.c_uint32),
        ("softmax_temperature", ctypes.c_float),
        ("renormalize", ctypes.c_int32),
        ("server_lr", ctypes.c_float),
        ("beta1", ctypes.c_float),
        ("beta2", ctypes.c_float),
        ("tau", ctypes.c_float),
        ("fedopt_variant", ctypes.c_uint32),
    ]


class Tensor(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("shape", ctypes.POINTER(ctypes.c_size_t)),
        ("ndim", ctypes.c_size_t),
        ("dtype", ctypes.c_uint32),
        ("data", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
    ]


class Output(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("dtype", ctypes.c_uint32),
        ("data", ctypes.c_void_p),
        ("len", ctypes.c_size_t),
    ]


class EncodeOptions(ctypes.Structure):
    _fields_ = [
        ("round", ctypes.c_uint32),
        ("client_id", ctypes.c_uint32),
        ("num_samples", ctypes.c_uint64),
        ("seed", ctypes.c_uint64),
        ("keep_ratio", ctypes.c_float),
        ("noise_scale", ctypes.c_float),
        ("importance", ctypes.c_uint32),
        ("upload_dtype", ctypes.c_uint32),
        ("algorithm", ctypes.c_uint32),
    ]


class RecordInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("ndim", ctypes.c_size_t),
        ("shape", ctypes.c_size_t * FEDCDD_MAX_DIMS),
        ("numel", ctypes.c_size_t),
        ("dtype", ctypes.c_uint32),
        ("masked", ctypes.c_int32),
        ("kept_columns", ctypes.c_size_t),
        ("columns", ctypes.c_size_t),
        ("sigma", ctypes.c_float),
        ("seed", ctypes.c_uint64),
    ]


def load_library(path=None):
    path = path or os.environ.get("FEDCDD_LIB") or ctypes.util.find_library("fedcdd")
    if not path:
        sys.exit("libfedcdd not found: pass its path or set FEDCDD_LIB")
    lib = ctypes.CDLL(path)
    status = ctypes.c_int32
    P = ctypes.POINTER
    sigs = {
        "fedcdd_version": (ctypes.c_char_p, []),
        "fedcdd_last_error": (ctypes.c_char_p, []),
        "fedcdd_status_name": (ctypes.c_char_p, [status]),
        "fedcdd_config_default": (status, [ctypes.c_uint32, P(Config)]),
        "fedcdd_aggregator_new": (status, [P(Config), P(ctypes.c_void_p)]),
        "fedcdd_aggregator_free": (None, [ctypes.c_void_p]),
        "fedcdd_aggregator_set_global": (status, [ctypes.c_void_p, P(Tensor), ctypes.c_size_t]),
        "fedcdd_aggregator_passes": (status, [ctypes.c_void_p, P(ctypes.c_size_t)]),
        "fedcdd_aggregator_add_client": (
            status,
            [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_double, P(Tensor), ctypes.c_size_t],
        ),
        "fedcdd_aggregator_begin_pass2": (status, [ctypes.c_void_p]),
        "fedcdd_aggregator_finalize": (status, [ctypes.c_void_p, P(Output), ctypes.c_size_t]),
        "fedcdd_encode_options_default": (status, [P(EncodeOptions)]),
        "fedcdd_default_seed": (ctypes.c_uint64, [ctypes.c_uint32, ctypes.c_uint32]),
        "fedcdd_encode_upload_size": (
            status,
            [P(EncodeOptions), P(Tensor), ctypes.c_size_t, P(Tensor), ctypes.c_size_t,
             P(ctypes.c_size_t)],
        ),
        "fedcdd_encode_upload": (
            status,
            [P(EncodeOptions), P(Tensor), ctypes.c_size_t, P(Tensor), ctypes.c_size_t,
             ctypes.c_void_p, ctypes.c_size_t, P(ctypes.c_size_t)],
        ),
        "fedcdd_upload_parse": (status, [ctypes.c_void_p, ctypes.c_size_t, P(ctypes.c_void_p)]),
        "fedcdd_upload_free": (None, [ctypes.c_void_p]),
        "fedcdd_upload_tensor_info": (status, [ctypes.c_void_p, ctypes.c_size_t, P(RecordInfo)]),
        "fedcdd_upload_decode": (
            status,
            [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t],
        ),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args
    return lib


class FedcddError(RuntimeError):
    def __init__(self, lib, status, call):
        self.status = status
        name = lib.fedcdd_status_name(status).decode()
        super().__init__(f"{call}: {name}: {lib.fedcdd_last_error().decode()}")


def check(lib, status, call):
    if status != FEDCDD_OK:
        raise FedcddError(lib, status, call)


class Tensors:
    """An adapter ({name: float32 array}) described to the library; keeps the arrays alive."""

    def __init__(self, arrays):
        self.arrays = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in arrays.items()}
        self.c = (Tensor * len(self.arrays))()
        self._keep = []
        for t, (name, a) in zip(self.c, self.arrays.items()):
            shape = (ctypes.c_size_t * a.ndim)(*a.shape)
            name_b = name.encode()
            self._keep += [shape, name_b]
            t.name, t.shape, t.ndim = name_b, shape, a.ndim
            t.dtype, t.data, t.len = FEDCDD_DTYPE_F32, a.ctypes.data, a.size


# ---------------------------------------------------------------------------------------------
# The example
# ---------------------------------------------------------------------------------------------

NAMES = ["layers.0.q_proj.lora_A.weight", "layers.0.q_proj.lora_B.weight"]
SHAPES = [(2, 6), (4, 2)]
SAMPLES = [10.0, 20.0, 30.0]


def example_data():
    """The data of aggregate.c: exact small fractions."""
    glob, updates = {}, []
    for t, (name, shape) in enumerate(zip(NAMES, SHAPES)):
        i = np.arange(shape[0] * shape[1])
        glob[name] = (((i * 5 + t * 3) % 11) - 5).astype(np.float32).reshape(shape) / 16
    for c in range(3):
        upd = {}
        for t, (name, shape) in enumerate(zip(NAMES, SHAPES)):
            i = np.arange(shape[0] * shape[1])
            k = ((i * (c + 2) + t * 7 + c * 3) % 13) - 6
            upd[name] = (k.astype(np.float32) / 32 * (c + 1)).reshape(shape)
        updates.append(upd)
    return glob, updates


def aggregate(lib, mode, glob, updates, samples):
    """One FedCDD round; returns the new global adapter."""
    cfg = Config()
    check(lib, lib.fedcdd_config_default(FEDCDD_ALG_FEDCDD, ctypes.byref(cfg)), "config_default")
    cfg.mode = mode
    agg = ctypes.c_void_p()
    check(lib, lib.fedcdd_aggregator_new(ctypes.byref(cfg), ctypes.byref(agg)), "aggregator_new")
    try:
        g = Tensors(glob)
        check(lib, lib.fedcdd_aggregator_set_global(agg, g.c, len(g.c)), "set_global")
        passes = ctypes.c_size_t()
        check(lib, lib.fedcdd_aggregator_passes(agg, ctypes.byref(passes)), "passes")
        clients = [Tensors(u) for u in updates]
        for p in range(passes.value):
            if p == 1:
                check(lib, lib.fedcdd_aggregator_begin_pass2(agg), "begin_pass2")
            for cid, (t, n) in enumerate(zip(clients, samples)):
                check(lib, lib.fedcdd_aggregator_add_client(agg, cid, n, t.c, len(t.c)),
                      f"add_client {cid}")
        result = {n: np.empty_like(a) for n, a in g.arrays.items()}
        outs = (Output * len(result))()
        for o, (name, a) in zip(outs, result.items()):
            o.name, o.dtype, o.data, o.len = name.encode(), FEDCDD_DTYPE_F32, a.ctypes.data, a.size
        check(lib, lib.fedcdd_aggregator_finalize(agg, outs, len(outs)), "finalize")
        return result
    finally:
        lib.fedcdd_aggregator_free(agg)


def upload_round_trip(lib, glob, update, client_id):
    """Masks and encodes one client's local adapter, then decodes it as the server would."""
    local = Tensors({n: glob[n] + update[n] for n in glob})
    g = Tensors(glob)
    o = EncodeOptions()
    check(lib, lib.fedcdd_encode_options_default(ctypes.byref(o)), "encode_options_default")
    o.round, o.client_id, o.num_samples = 1, client_id, 10
    o.seed = lib.fedcdd_default_seed(1, client_id)
    o.keep_ratio, o.noise_scale = 0.5, 0.5
    size = ctypes.c_size_t()
    check(lib, lib.fedcdd_encode_upload_size(ctypes.byref(o), g.c, len(g.c), local.c,
                                             len(local.c), ctypes.byref(size)), "upload_size")
    buf = (ctypes.c_uint8 * size.value)()
    check(lib, lib.fedcdd_encode_upload(ctypes.byref(o), g.c, len(g.c), local.c, len(local.c),
                                        buf, size.value, ctypes.byref(size)), "encode_upload")
    up = ctypes.c_void_p()
    check(lib, lib.fedcdd_upload_parse(buf, size.value, ctypes.byref(up)), "upload_parse")
    try:
        decoded = {}
        for k in range(len(glob)):
            info = RecordInfo()
            check(lib, lib.fedcdd_upload_tensor_info(up, k, ctypes.byref(info)), "tensor_info")
            shape = tuple(info.shape[: info.ndim])
            out = np.empty(shape, dtype=np.float32)
            check(lib, lib.fedcdd_upload_decode(up, k, FEDCDD_DTYPE_F32, out.ctypes.data,
                                                out.size), "decode")
            decoded[info.name.decode()] = (out, info.kept_columns, info.columns)
        return size.value, decoded
    finally:
        lib.fedcdd_upload_free(up)


def main():
    lib = load_library(sys.argv[1] if len(sys.argv) > 1 else None)
    print("libfedcdd", lib.fedcdd_version().decode())
    glob, updates = example_data()

    batch = aggregate(lib, FEDCDD_MODE_BATCH, glob, updates, SAMPLES)
    streamed = aggregate(lib, FEDCDD_MODE_STREAMING, glob, updates, SAMPLES)
    diff = max(float(np.max(np.abs(streamed[n] - batch[n]) / (1 + np.abs(batch[n]))))
               for n in NAMES)
    assert diff < 1e-5, f"streaming and batch differ by {diff}"
    print(f"batch vs streaming: max relative difference {diff:g}")

    # A client holding NaN is rejected, naming the client and the tensor.
    bad = {n: a.copy() for n, a in updates[1].items()}
    bad[NAMES[0]][1, 2] = np.nan
    try:
        aggregate(lib, FEDCDD_MODE_BATCH, glob, [updates[0], bad], SAMPLES[:2])
        raise AssertionError("a NaN client was accepted")
    except FedcddError as e:
        assert e.status == FEDCDD_ERR_NON_FINITE and "client 1" in str(e) and NAMES[0] in str(e), e
        print("rejected:", lib.fedcdd_last_error().decode())

    # Upload round trip: kept columns exact, the others replaced by seeded noise.
    size, decoded = upload_round_trip(lib, glob, updates[0], 0)
    for name, (out, kept, columns) in decoded.items():
        exact = int(np.sum(np.all(out == updates[0][name], axis=0)))
        assert exact >= kept, f"{name}: a kept column was altered"
        print(f"upload ({size} bytes) {name}: {kept} of {columns} columns kept, {exact} exact")

    for name in NAMES:
        print("RESULT", name, " ".join(f"{v:.9g}" for v in batch[name].ravel()))
    print("OK")


if __name__ == "__main__":
    main()
