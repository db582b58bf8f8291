#!/usr/bin/env python3
"""An independent reader of fedcdd client uploads (`.fcdu`, format version 1).

Written from `docs/wire-format.md` alone (not from the Rust sources), with the Python 3
standard library only, so that the test suite (`tests/tests/wire_python.rs`) can check the
specification and the Rust reader against each other.

    python3 fcdu_reader.py UPLOAD --json OUT.json [--no-values] [--max-elements N]
    python3 fcdu_reader.py --batch LIST OUT.json [--no-values] [--max-elements N]
    python3 fcdu_reader.py --self-test
    python3 fcdu_reader.py --round-check IN.json OUT.json

The upload is validated completely (every check of the spec's "Validation" section) before
anything is reconstructed. The JSON written is

    {"version", "round", "client_id", "num_samples", "byte_len",
     "tensors": [{"name", "dims", "dtype": "f32"|"f16"|"bf16", "kind": "dense"|"masked",
                  "importance": "column_l2"|"element_abs"|"row_l2"|null,
                  "kept": [indices] | null, "sigma": float | null, "sigma_bits": u32 | null,
                  "seed": int | null, "bits": [u32] | null}]}

where `bits` are the f32 bit patterns of the reconstructed values (each value rounded to the
record's dtype, then widened to f32 exactly), row-major; `null` with `--no-values`.

Exit status: 0 on success; 2 with `error: ...` on stderr for an invalid upload (or an
unreadable file, or bad arguments); 3 with `error: ...` when the upload is valid but declares
more elements than `--max-elements` (a limit of this reader, not of the format); 70 with
`internal error: ...` for a bug in this reader.

`--batch LIST OUT.json` reads every upload named in LIST (one path a line) in one process
and writes a JSON list of `{"path", "status", "error", "result"}`: the exit status and
`error:` message the single-file mode would give, and the JSON above (or null).

`--round-check IN OUT` reads a JSON list of u32 f32 bit patterns and writes
`{"f16": [...], "bf16": [...]}`: each value rounded to f16 / bf16 (round-to-nearest-even)
and widened back to f32, as bit patterns, so that the test can compare this reader's
rounding with the Rust `half` crate. `--self-test` checks the f16 rounding done with
`struct`'s 'e' format against an integer implementation.
"""

import json
import math
import struct
import sys

MAGIC = b"FCDU"
VERSION = 1
MAX_NAME_LEN = 1024
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 31
DTYPES = {0: ("f32", 4), 1: ("f16", 2), 2: ("bf16", 2)}
KINDS = {0: "dense", 1: "masked"}
IMPORTANCES = {0: "column_l2", 1: "element_abs", 2: "row_l2"}
# Smallest possible record: name length (1) + name (1) + dims count (1) + one dim (1) +
# dtype (1) + payload kind (1) + one 2-byte value (dense f16/bf16). Bounds num_tensors.
MIN_RECORD_LEN = 8
DEFAULT_MAX_READ_ELEMENTS = 1 << 24

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
RECORD_KEY_SALT = 0x6A09E667F3BCC909
TWO_POW_M53 = 2.0 ** -53
TWO_PI = 2.0 * math.pi  # == Rust's core::f64::consts::TAU (doubling is exact)

_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")
_F16 = struct.Struct("<e")
_U16 = struct.Struct("<H")


class FormatError(Exception):
    """The upload is invalid."""


class TooLarge(Exception):
    """The upload is valid but larger than this reader was told to reconstruct."""


# ---------------------------------------------------------------------------------------------
# Floating point helpers (Python floats are f64)
# ---------------------------------------------------------------------------------------------


def f32_bits(x):
    """f64 value -> bit pattern of the nearest f32 (round-to-nearest-even; overflow -> inf)."""
    try:
        return _U32.unpack(_F32.pack(x))[0]
    except OverflowError:
        # struct refuses finite values that round to infinity; IEEE rounding gives ±inf.
        return 0xFF800000 if x < 0 else 0x7F800000


def f32_from_bits(b):
    """Value of an f32 bit pattern as a Python float (exact; NaN payloads are not kept)."""
    return _F32.unpack(_U32.pack(b))[0]


def round_f32(x):
    """f64 value -> nearest f32 value, as a Python float."""
    return f32_from_bits(f32_bits(x))


def f16_to_f32_bits(h):
    """Exact widening of an f16 bit pattern to an f32 bit pattern (NaNs are quieted, as an
    IEEE conversion does)."""
    sign = (h & 0x8000) << 16
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0x1F:
        if man == 0:
            return sign | 0x7F800000
        return sign | 0x7FC00000 | (man << 13)
    if exp == 0:
        if man == 0:
            return sign
        # Subnormal: value man·2⁻²⁴; normalise.
        e = 1
        while not man & 0x400:
            man <<= 1
            e -= 1
        return sign | ((e + 112) << 23) | ((man & 0x3FF) << 13)
    return sign | ((exp + 112) << 23) | (man << 13)


def bf16_to_f32_bits(b):
    """Exact widening of a bf16 bit pattern to an f32 bit pattern (NaNs are quieted, as an
    IEEE conversion does and as the Rust reader does; the spec is silent on NaNs)."""
    w = (b & 0xFFFF) << 16
    if (w & 0x7FFFFFFF) > 0x7F800000:
        w |= 0x00400000
    return w


def f32_bits_to_f16(b):
    """Rounds an f32 (bit pattern) to f16 with round-to-nearest-even, using `struct`'s 'e'
    format (which rounds half to even from the exact f64 value) for finite values."""
    sign16 = (b >> 16) & 0x8000
    if (b & 0x7F800000) == 0x7F800000:
        man = b & 0x7FFFFF
        if man == 0:
            return sign16 | 0x7C00
        return sign16 | 0x7E00 | (man >> 13)  # NaN: quiet, keep the top payload bits
    x = f32_from_bits(b)
    try:
        return _U16.unpack(_F16.pack(x))[0]
    except OverflowError:
        # |x| ≥ 65520 rounds to infinity; struct raises instead.
        return sign16 | 0x7C00


def f32_bits_to_bf16(b):
    """Rounds an f32 (bit pattern) to bf16 with round-to-nearest-even (bit arithmetic)."""
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return ((b >> 16) | 0x0040) & 0xFFFF  # NaN: quiet, keep the top payload bits
    lsb = (b >> 16) & 1
    return ((b + 0x7FFF + lsb) >> 16) & 0xFFFF  # carries into the exponent (inf) correctly


def f32_bits_to_f16_reference(b):
    """Integer-only f32 -> f16 round-to-nearest-even, to check `f32_bits_to_f16`."""
    sign = (b >> 16) & 0x8000
    exp = (b >> 23) & 0xFF
    man = b & 0x7FFFFF
    if exp == 0xFF:
        return sign | 0x7C00 | ((0x200 | (man >> 13)) if man else 0)
    if exp == 0 and man == 0:
        return sign
    # value = sig · 2^(e) with sig an integer
    if exp == 0:
        sig, e = man, -149
    else:
        sig, e = man | 0x800000, exp - 150
    # f16 quantum at this magnitude: 2^-24 for subnormals, 2^(E-10) for normals.
    top = sig.bit_length() - 1 + e  # floor(log2(value))
    q = max(top - 10, -24)
    shift = q - e
    if shift <= 0:
        n = sig << (-shift)
    else:
        n = sig >> shift
        rem = sig & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and n & 1):
            n += 1
    # n · 2^q; encode
    if q == -24:
        # subnormal quantum: n < 2048 (n == 1024 means the smallest normal)
        return sign | n if n < 0x400 else sign | ((n >> 10) << 10) | (n & 0x3FF)
    if n == 0x800:  # rounding carried into the next binade
        n >>= 1
        q += 1
    biased = q + 10 + 15
    if biased >= 31:
        return sign | 0x7C00
    return sign | (biased << 10) | (n & 0x3FF)


# ---------------------------------------------------------------------------------------------
# Noise generator (spec: "Reconstructing a masked tensor")
# ---------------------------------------------------------------------------------------------


def splitmix64_mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


class NoiseGenerator:
    """xoshiro256++ keyed by (seed, record index), yielding Box–Muller normals in pairs."""

    def __init__(self, seed, record_index):
        key = splitmix64_mix(((record_index ^ RECORD_KEY_SALT) + GOLDEN) & M64)
        state = (seed ^ key) & M64
        s = []
        for _ in range(4):
            state = (state + GOLDEN) & M64
            s.append(splitmix64_mix(state))
        self.s0, self.s1, self.s2, self.s3 = s
        self.pending = None

    def next_u64(self):
        s0, s1, s2, s3 = self.s0, self.s1, self.s2, self.s3
        x = (s0 + s3) & M64
        result = ((((x << 23) | (x >> 41)) & M64) + s0) & M64
        t = (s1 << 17) & M64
        s2 ^= s0
        s3 ^= s1
        s1 ^= s2
        s0 ^= s3
        s2 ^= t
        s3 = ((s3 << 45) | (s3 >> 19)) & M64
        self.s0, self.s1, self.s2, self.s3 = s0, s1, s2, s3
        return result

    def next_normal(self):
        if self.pending is not None:
            z, self.pending = self.pending, None
            return z
        a = self.next_u64()
        b = self.next_u64()
        u1 = ((a >> 11) + 1) * TWO_POW_M53
        u2 = (b >> 11) * TWO_POW_M53
        r = math.sqrt(-2.0 * math.log(u1))
        theta = TWO_PI * u2
        self.pending = r * math.sin(theta)
        return r * math.cos(theta)


# ---------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------


class Reader:
    """Cursor over the bytes before the checksum; every read is bounds-checked."""

    def __init__(self, data, end):
        self.data = data
        self.pos = 0
        self.end = end

    def remaining(self):
        return self.end - self.pos

    def take(self, n, what):
        if n < 0 or n > self.remaining():
            raise FormatError(
                "%s: needs %d bytes at offset %d, only %d left" % (what, n, self.pos, self.remaining())
            )
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def varint(self, bits, what):
        """Unsigned LEB128 as postcard reads it: at most ceil(bits/7) bytes, the value must
        fit in `bits` bits. (Non-minimal encodings such as `81 00` are accepted, as postcard
        accepts them.)"""
        max_len = (bits + 6) // 7
        value = 0
        for i in range(max_len):
            if self.pos >= self.end:
                raise FormatError("%s: truncated varint at offset %d" % (what, self.pos))
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if value >> bits:
                    raise FormatError("%s: varint overflows u%d" % (what, bits))
                return value
        raise FormatError("%s: varint longer than %d bytes (u%d)" % (what, max_len, bits))


def parse_upload(data):
    """Validates `data` completely; returns (header dict, list of record dicts)."""
    if len(data) < 4:
        raise FormatError("upload is %d bytes, shorter than its checksum" % len(data))
    body_end = len(data) - 4
    stored_crc = _U32.unpack(data[body_end:])[0]
    actual_crc = zlib_crc32(data[:body_end])
    if stored_crc != actual_crc:
        raise FormatError("checksum mismatch: stored %08x, computed %08x" % (stored_crc, actual_crc))

    rd = Reader(data, body_end)
    magic = rd.take(4, "magic")
    if magic != MAGIC:
        raise FormatError("wrong magic %r (expected %r)" % (bytes(magic), MAGIC))
    version = rd.varint(16, "version")
    if version != VERSION:
        raise FormatError("unknown version %d (this reader knows %d)" % (version, VERSION))
    header = {
        "version": version,
        "round": rd.varint(32, "round"),
        "client_id": rd.varint(32, "client_id"),
        "num_samples": rd.varint(64, "num_samples"),
    }
    num_tensors = rd.varint(32, "num_tensors")
    if num_tensors > rd.remaining() // MIN_RECORD_LEN:
        raise FormatError(
            "num_tensors %d is more than the %d bytes left could hold" % (num_tensors, rd.remaining())
        )
    records = []
    for t in range(num_tensors):
        try:
            records.append(parse_record(rd, t))
        except FormatError as e:
            raise FormatError("tensor %d: %s" % (t, e))
    if rd.remaining() != 0:
        raise FormatError("%d bytes after the last record" % rd.remaining())
    header["byte_len"] = len(data)
    return header, records


def parse_record(rd, index):
    name_len = rd.varint(64, "name length")
    if name_len == 0:
        raise FormatError("empty name")
    if name_len > MAX_NAME_LEN:
        raise FormatError("name of %d bytes (at most %d)" % (name_len, MAX_NAME_LEN))
    raw = rd.take(name_len, "name")
    try:
        name = bytes(raw).decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise FormatError("name is not UTF-8")

    ndims = rd.varint(64, "dims count")
    if ndims == 0 or ndims > MAX_DIMS:
        raise FormatError("%d dims (1 to %d)" % (ndims, MAX_DIMS))
    dims = [rd.varint(32, "dim") for _ in range(ndims)]
    if any(d == 0 for d in dims):
        raise FormatError("zero dimension in %s" % (dims,))
    p = 1
    for d in dims:
        p *= d
    if p > MAX_ELEMENTS:
        raise FormatError("%d elements (at most 2^31)" % p)
    rows = 1 if ndims == 1 else dims[0]
    cols = p // rows

    dtype_code = rd.varint(32, "dtype")
    if dtype_code not in DTYPES:
        raise FormatError("unknown dtype %d" % dtype_code)
    dtype, size = DTYPES[dtype_code]
    kind_code = rd.varint(32, "payload kind")
    if kind_code not in KINDS:
        raise FormatError("unknown payload kind %d" % kind_code)
    rec = {
        "index": index,
        "name": name,
        "dims": dims,
        "dtype": dtype,
        "kind": KINDS[kind_code],
        "importance": None,
        "kept": None,
        "sigma": None,
        "sigma_bits": None,
        "seed": None,
        "P": p,
    }
    if kind_code == 0:
        rec["values"] = rd.take(p * size, "dense values")
        return rec

    imp_code = rd.varint(32, "importance")
    if imp_code not in IMPORTANCES:
        raise FormatError("unknown importance %d" % imp_code)
    if imp_code == 0:
        r_units, c_units = rows, cols
    elif imp_code == 1:
        r_units, c_units = 1, p
    else:
        r_units, c_units = cols, rows
    k = rd.varint(32, "kept count")
    if k == 0:
        raise FormatError("no kept columns (K = 0)")
    if k > c_units:
        raise FormatError("K = %d kept columns of %d" % (k, c_units))
    sigma_bits = _U32.unpack(rd.take(4, "sigma"))[0]
    if (sigma_bits & 0x7F800000) == 0x7F800000:
        raise FormatError("non-finite sigma")
    sigma = f32_from_bits(sigma_bits)
    if sigma < 0.0:
        raise FormatError("negative sigma %r" % sigma)
    seed = rd.varint(64, "seed")
    kept_raw = rd.take(4 * k, "kept indices")
    kept = list(struct.unpack("<%dI" % k, kept_raw))
    prev = -1
    for c in kept:
        if c <= prev:
            raise FormatError("kept indices not strictly ascending (%d after %d)" % (c, prev))
        if c >= c_units:
            raise FormatError("kept index %d out of range (%d columns)" % (c, c_units))
        prev = c
    rec.update(
        importance=IMPORTANCES[imp_code],
        kept=kept,
        sigma=sigma,
        sigma_bits=sigma_bits,
        seed=seed,
        R=r_units,
        C=c_units,
        values=rd.take(k * r_units * size, "kept values"),
    )
    return rec


def zlib_crc32(data):
    import zlib  # standard library

    return zlib.crc32(data) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------------


def stored_f32_bits(blob, dtype):
    """Little-endian values of `dtype` -> list of f32 bit patterns (exact widening)."""
    if dtype == "f32":
        return list(struct.unpack("<%dI" % (len(blob) // 4), blob))
    halves = struct.unpack("<%dH" % (len(blob) // 2), blob)
    if dtype == "f16":
        return [f16_to_f32_bits(h) for h in halves]
    return [bf16_to_f32_bits(h) for h in halves]


def round_to_dtype_bits(b, dtype):
    """f32 bit pattern -> rounded to `dtype` and widened back to f32 bits."""
    if dtype == "f32":
        return b
    if dtype == "f16":
        return f16_to_f32_bits(f32_bits_to_f16(b))
    return bf16_to_f32_bits(f32_bits_to_bf16(b))


def reconstruct(rec):
    """Every value of the record as f32 bit patterns, row-major."""
    dtype = rec["dtype"]
    stored = stored_f32_bits(rec["values"], dtype)
    if rec["kind"] == "dense":
        return stored
    R, C = rec["R"], rec["C"]
    sigma = rec["sigma"]
    pos_of = {}
    for k, c in enumerate(rec["kept"]):
        pos_of[c] = k
    gen = NoiseGenerator(rec["seed"], rec["index"])
    out = []
    append = out.append
    zero = sigma == 0.0  # also true for -0.0

    def masked_value():
        if zero:
            return 0
        z32 = round_f32(gen.next_normal())
        return round_to_dtype_bits(f32_bits(sigma * z32), dtype)

    if rec["importance"] == "row_l2":
        # Units are the tensor's rows (C of them, R values each): row-major is unit by unit.
        for c in range(C):
            k = pos_of.get(c)
            for r in range(R):
                append(stored[k * R + r] if k is not None else masked_value())
        return out
    for r in range(R):
        for c in range(C):
            k = pos_of.get(c)
            append(stored[k * R + r] if k is not None else masked_value())
    # Units are the tensor's elements in row-major order in both layouts (R×C = rows×cols,
    # or 1×P), so `out` is already row-major.
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def read_upload_json(path, with_values, max_elements):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise FormatError("cannot read %s: %s" % (path, e.strerror or e))
    header, records = parse_upload(data)
    total = sum(r["P"] for r in records)
    if with_values and total > max_elements:
        raise TooLarge(
            "the upload declares %d elements, more than --max-elements %d" % (total, max_elements)
        )
    tensors = []
    for rec in records:
        tensors.append(
            {
                "name": rec["name"],
                "dims": rec["dims"],
                "dtype": rec["dtype"],
                "kind": rec["kind"],
                "importance": rec["importance"],
                "kept": rec["kept"],
                "sigma": rec["sigma"],
                "sigma_bits": rec["sigma_bits"],
                "seed": rec["seed"],
                "bits": reconstruct(rec) if with_values else None,
            }
        )
    out = dict(header)
    out["tensors"] = tensors
    return out


def self_test():
    """Checks the struct-based f16 rounding against the integer reference on every f16 value,
    the midpoints between neighbours and their f32 neighbours, subnormals and overflow."""
    import random

    cases = set([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001, 0x477FE000,
                 0x477FEFFF, 0x477FF000, 0x33000000, 0x33000001, 0x32FFFFFF, 0x387FC000])
    for h in range(0x7C00):
        w = f16_to_f32_bits(h)
        nxt = f16_to_f32_bits(h + 1) if h + 1 < 0x7C00 else 0x47800000
        mid = f32_bits((f32_from_bits(w) + f32_from_bits(nxt)) / 2.0)
        for b in (w, mid - 1, mid, mid + 1):
            cases.add(b)
            cases.add(b | 0x80000000)
    rng = random.Random(1)
    for _ in range(200000):
        cases.add(rng.getrandbits(32))
    bad = 0
    for b in sorted(cases):
        if (b & 0x7F800000) == 0x7F800000 and b & 0x7FFFFF:
            continue  # NaN handled separately
        got = f32_bits_to_f16(b)
        want = f32_bits_to_f16_reference(b)
        if got != want:
            bad += 1
            if bad < 10:
                print("f16 rounding of %08x: struct %04x, reference %04x" % (b, got, want))
    # bf16: ties to even, overflow to inf.
    assert f32_bits_to_bf16(0x3F808000) == 0x3F80  # tie, even stays
    assert f32_bits_to_bf16(0x3F818000) == 0x3F82  # tie, odd rounds up
    assert f32_bits_to_bf16(0x3F808001) == 0x3F81
    assert f32_bits_to_bf16(0x7F7FFFFF) == 0x7F80
    assert f32_bits_to_bf16(0x7F7F7FFF) == 0x7F7F
    assert f32_bits_to_bf16(0x00008000) == 0x0000
    assert f32_bits_to_bf16(0x00018000) == 0x0002
    print("self-test: %d f16 rounding cases, %d mismatches" % (len(cases), bad))
    return 0 if bad == 0 else 1


def round_check(inp, outp):
    with open(inp) as f:
        bits = json.load(f)
    res = {
        "f16": [f16_to_f32_bits(f32_bits_to_f16(b)) for b in bits],
        "bf16": [bf16_to_f32_bits(f32_bits_to_bf16(b)) for b in bits],
    }
    with open(outp, "w") as f:
        json.dump(res, f)
    return 0


USAGE = (
    "usage: fcdu_reader.py UPLOAD --json OUT.json [--no-values] [--max-elements N]\n"
    "       fcdu_reader.py --batch LIST OUT.json [--no-values] [--max-elements N]\n"
    "       fcdu_reader.py --self-test\n"
    "       fcdu_reader.py --round-check IN.json OUT.json"
)


def process(path, with_values, max_elements):
    """Reads one upload: (exit status, error message or None, result or None). The status
    and message are exactly what the single-file mode exits with and prints."""
    try:
        return 0, None, read_upload_json(path, with_values, max_elements)
    except FormatError as e:
        return 2, str(e), None
    except TooLarge as e:
        return 3, str(e), None


def main(argv):
    if argv[:1] == ["--self-test"] and len(argv) == 1:
        return self_test()
    if argv[:1] == ["--round-check"] and len(argv) == 3:
        return round_check(argv[1], argv[2])
    upload = json_out = batch = None
    with_values = True
    max_elements = DEFAULT_MAX_READ_ELEMENTS
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--json" and i + 1 < len(argv):
            json_out = argv[i + 1]
            i += 2
        elif a == "--batch" and i + 2 < len(argv):
            batch, json_out = argv[i + 1], argv[i + 2]
            i += 3
        elif a == "--max-elements" and i + 1 < len(argv):
            try:
                max_elements = int(argv[i + 1])
            except ValueError:
                raise FormatError("--max-elements needs an integer\n" + USAGE)
            i += 2
        elif a == "--no-values":
            with_values = False
            i += 1
        elif a in ("-h", "--help"):
            print(USAGE)
            return 0
        elif upload is None and not a.startswith("--"):
            upload = a
            i += 1
        else:
            raise FormatError("unexpected argument %r\n%s" % (a, USAGE))
    if (upload is None) == (batch is None):
        raise FormatError("give one upload, or --batch\n" + USAGE)
    if batch is not None:
        # Many uploads in one process (the test suite reads hundreds): one JSON list of
        # {"path", "status", "error", "result"}, each as the single-file mode would end.
        try:
            with open(batch) as f:
                paths = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise FormatError("cannot read %s: %s" % (batch, e.strerror or e))
        out = []
        for path in paths:
            status, message, result = process(path, with_values, max_elements)
            out.append({"path": path, "status": status, "error": message, "result": result})
        write_json(json_out, out)
        return 0
    status, message, result = process(upload, with_values, max_elements)
    if status != 0:
        sys.stderr.write("error: %s\n" % message)
        return status
    write_json(json_out, result)
    return 0


def write_json(path, value):
    text = json.dumps(value, separators=(",", ":"))
    if path is None or path == "-":
        sys.stdout.write(text + "\n")
        return
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise FormatError("cannot write %s: %s" % (path, e.strerror or e))


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except FormatError as e:
        sys.stderr.write("error: %s\n" % e)
        status = 2
    except KeyboardInterrupt:
        status = 130
    except Exception as e:  # a bug in this reader, not a verdict on the upload
        sys.stderr.write("internal error: %s: %s\n" % (type(e).__name__, e))
        status = 70
    sys.exit(status)
