"""ctypes bindings of libfedcdd (include/fedcdd.h): the types, the functions this package
calls, and the library lookup. Everything here is private; the API is in `fedcdd`."""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any, Callable

MAX_DIMS = 4

OK = 0
ERR_NULL_POINTER = 1
ERR_INVALID_ARGUMENT = 2
ERR_SHAPE = 3
ERR_NON_FINITE = 4
ERR_BAD_WEIGHT = 5
ERR_NO_CLIENTS = 6
ERR_TENSOR_NAME = 7
ERR_BAD_ENCODING = 8
ERR_BUFFER_TOO_SMALL = 9
ERR_CALL_ORDER = 10
ERR_IO = 11
ERR_RUN = 12
ERR_INTERNAL = 99

DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_AS_INPUT = 0, 1, 2, 255
MODE_BATCH, MODE_STREAMING = 0, 1
SAMPLES_FROM_UPLOAD = -1.0

c_size_p = ctypes.POINTER(ctypes.c_size_t)


class Tensor(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("shape", c_size_p),
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


class TensorView(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("shape", ctypes.c_size_t * MAX_DIMS),
        ("ndim", ctypes.c_size_t),
        ("len", ctypes.c_size_t),
        ("data", ctypes.POINTER(ctypes.c_float)),
    ]


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


class UploadHeader(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint32),
        ("round", ctypes.c_uint32),
        ("client_id", ctypes.c_uint32),
        ("num_samples", ctypes.c_uint64),
        ("num_tensors", ctypes.c_size_t),
        ("byte_len", ctypes.c_size_t),
    ]


class RecordInfo(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("ndim", ctypes.c_size_t),
        ("shape", ctypes.c_size_t * MAX_DIMS),
        ("numel", ctypes.c_size_t),
        ("dtype", ctypes.c_uint32),
        ("masked", ctypes.c_int32),
        ("kept_columns", ctypes.c_size_t),
        ("columns", ctypes.c_size_t),
        ("sigma", ctypes.c_float),
        ("seed", ctypes.c_uint64),
    ]


P = ctypes.c_void_p
u8p = ctypes.POINTER(ctypes.c_uint8)
st = ctypes.c_int32

# name: (restype, argtypes)
SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "fedcdd_version": (ctypes.c_char_p, []),
    "fedcdd_last_error": (ctypes.c_char_p, []),
    "fedcdd_status_name": (ctypes.c_char_p, [st]),
    "fedcdd_algorithm_from_name": (st, [ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32)]),
    "fedcdd_config_default": (st, [ctypes.c_uint32, ctypes.POINTER(Config)]),
    "fedcdd_aggregator_new": (st, [ctypes.POINTER(Config), ctypes.POINTER(P)]),
    "fedcdd_aggregator_free": (None, [P]),
    "fedcdd_aggregator_set_global": (st, [P, ctypes.POINTER(Tensor), ctypes.c_size_t]),
    "fedcdd_aggregator_passes": (st, [P, c_size_p]),
    "fedcdd_aggregator_add_client": (
        st,
        [P, ctypes.c_uint32, ctypes.c_double, ctypes.POINTER(Tensor), ctypes.c_size_t],
    ),
    "fedcdd_aggregator_add_upload": (st, [P, u8p, ctypes.c_size_t, ctypes.c_double]),
    "fedcdd_aggregator_begin_pass2": (st, [P]),
    "fedcdd_aggregator_finalize": (st, [P, ctypes.POINTER(Output), ctypes.c_size_t]),
    "fedcdd_aggregator_reset_round": (st, [P]),
    "fedcdd_aggregator_state_size": (st, [P, c_size_p]),
    "fedcdd_aggregator_save_state": (st, [P, u8p, ctypes.c_size_t, c_size_p]),
    "fedcdd_aggregator_load_state": (st, [P, u8p, ctypes.c_size_t]),
    "fedcdd_encode_options_default": (st, [ctypes.POINTER(EncodeOptions)]),
    "fedcdd_default_seed": (ctypes.c_uint64, [ctypes.c_uint32, ctypes.c_uint32]),
    "fedcdd_encode_upload_size": (
        st,
        [
            ctypes.POINTER(EncodeOptions),
            ctypes.POINTER(Tensor),
            ctypes.c_size_t,
            ctypes.POINTER(Tensor),
            ctypes.c_size_t,
            c_size_p,
        ],
    ),
    "fedcdd_encode_upload": (
        st,
        [
            ctypes.POINTER(EncodeOptions),
            ctypes.POINTER(Tensor),
            ctypes.c_size_t,
            ctypes.POINTER(Tensor),
            ctypes.c_size_t,
            u8p,
            ctypes.c_size_t,
            c_size_p,
        ],
    ),
    "fedcdd_upload_parse": (st, [u8p, ctypes.c_size_t, ctypes.POINTER(P)]),
    "fedcdd_upload_free": (None, [P]),
    "fedcdd_upload_get_header": (st, [P, ctypes.POINTER(UploadHeader)]),
    "fedcdd_upload_tensor_info": (st, [P, ctypes.c_size_t, ctypes.POINTER(RecordInfo)]),
    "fedcdd_upload_decode": (st, [P, ctypes.c_size_t, ctypes.c_uint32, P, ctypes.c_size_t]),
    "fedcdd_tensors_new": (st, [ctypes.POINTER(P)]),
    "fedcdd_tensors_free": (None, [P]),
    "fedcdd_tensors_add": (st, [P, ctypes.POINTER(Tensor)]),
    "fedcdd_tensors_count": (st, [P, c_size_p]),
    "fedcdd_tensors_get": (st, [P, ctypes.c_size_t, ctypes.POINTER(TensorView)]),
    "fedcdd_bytes_get": (st, [P, ctypes.POINTER(u8p), c_size_p]),
    "fedcdd_bytes_free": (None, [P]),
    "fedcdd_client_new": (
        st,
        [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.POINTER(P)],
    ),
    "fedcdd_client_free": (None, [P]),
    "fedcdd_client_num_examples": (st, [P, ctypes.POINTER(ctypes.c_uint64)]),
    "fedcdd_client_set_records": (st, [P, u8p, ctypes.c_size_t]),
    "fedcdd_client_initial_adapter": (st, [P, ctypes.POINTER(P)]),
    "fedcdd_client_train_round": (st, [P, ctypes.c_uint32, P, P, P, ctypes.POINTER(P)]),
    "fedcdd_client_result_free": (None, [P]),
    "fedcdd_client_result_upload": (st, [P, ctypes.POINTER(u8p), c_size_p]),
    "fedcdd_client_result_parts": (
        st,
        [
            P,
            ctypes.POINTER(P),
            ctypes.POINTER(P),
            ctypes.POINTER(ctypes.c_double),
            ctypes.POINTER(ctypes.c_uint64),
        ],
    ),
    "fedcdd_client_evaluate": (st, [P, P, u8p, ctypes.c_size_t, ctypes.POINTER(P)]),
    "fedcdd_server_new": (
        st,
        [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(P)],
    ),
    "fedcdd_server_free": (None, [P]),
    "fedcdd_server_counts": (st, [P, c_size_p, c_size_p, c_size_p]),
    "fedcdd_server_begin_round": (
        st,
        [P, ctypes.c_uint32, c_size_p, ctypes.c_size_t, c_size_p],
    ),
    "fedcdd_server_global": (st, [P, ctypes.POINTER(P)]),
    "fedcdd_server_configure_train": (st, [P, ctypes.POINTER(P)]),
    "fedcdd_server_add_reply": (
        st,
        [P, ctypes.c_size_t, u8p, ctypes.c_size_t, P, ctypes.c_double],
    ),
    "fedcdd_server_finish_round": (st, [P, ctypes.POINTER(P)]),
    "fedcdd_server_finish": (st, [P, ctypes.POINTER(P)]),
}

_FILE_NAMES = {"linux": "libfedcdd.so", "darwin": "libfedcdd.dylib", "win32": "fedcdd.dll"}


def _file_name() -> str:
    for prefix, name in _FILE_NAMES.items():
        if sys.platform.startswith(prefix):
            return name
    return "libfedcdd.so"


def library_path() -> Path:
    """Where libfedcdd is loaded from: $FEDCDD_LIB, else the copy inside this package, else
    a development build of the source tree this package sits in (target/release)."""
    env = os.environ.get("FEDCDD_LIB")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    packaged = here / _file_name()
    if packaged.is_file():
        return packaged
    dev = here.parent.parent / "target" / "release" / _file_name()
    if dev.is_file():
        return dev
    return packaged


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    """The loaded library, with every signature this package uses declared."""
    global _LIB
    if _LIB is None:
        path = library_path()
        try:
            cdll = ctypes.CDLL(str(path))
        except OSError as e:
            raise OSError(
                f"cannot load libfedcdd from {path} ({e}); install the package with "
                "`pip install ./python` (it builds the library with cargo) or set FEDCDD_LIB"
            ) from e
        for name, (restype, argtypes) in SIGNATURES.items():
            f: Callable[..., Any] = getattr(cdll, name)
            f.restype = restype  # type: ignore[attr-defined]
            f.argtypes = argtypes  # type: ignore[attr-defined]
        _LIB = cdll
    return _LIB
