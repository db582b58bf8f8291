// Memory ops and elementwise ops: fill, strided copy, axpy, scale, sum of squares (f64
// partial sums per block), dropout (the shared counter hash), SwiGLU, f32 -> f16/bf16.

extern "C" __global__ void fill_f32(float* x, float value, u64 n) {
    GRID_STRIDE(i, n) x[i] = value;
}

// count runs of len floats: dst[dst_off + r*dst_stride + c] = src[src_off + r*src_stride + c].
extern "C" __global__ void copy_2d_f32(const float* src, float* dst, u64 count, u64 len,
                                       u64 src_off, u64 src_stride, u64 dst_off,
                                       u64 dst_stride) {
    GRID_STRIDE(idx, count * len) {
        u64 r = (u64)idx / len, c = (u64)idx % len;
        dst[dst_off + r * dst_stride + c] = src[src_off + r * src_stride + c];
    }
}

extern "C" __global__ void axpy_f32(float* y, float a, const float* x, u64 n) {
    GRID_STRIDE(i, n) y[i] = y[i] + a * x[i];
}

extern "C" __global__ void scale_f32(float* x, float a, u64 n) {
    GRID_STRIDE(i, n) x[i] = x[i] * a;
}

// partial[blockIdx.x] = sum of x[i]^2 (in f64) over this block's grid-stride share.
extern "C" __global__ void sum_squares_f32(const float* x, u64 n, double* partial) {
    __shared__ double scratch[32];
    double s = 0.0;
    GRID_STRIDE(i, n) {
        double v = (double)x[i];
        s += v * v;
    }
    s = block_sum_d(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// The dropout mask of `fedcdd_kernels::dropout_keep`, bit for bit.
__device__ __forceinline__ bool dropout_keep(u64 seed, u64 i, float p) {
    unsigned s = (unsigned)(seed ^ (seed >> 32));
    unsigned z = ((unsigned)i) * 0x9E3779B9u ^ s;
    z ^= z >> 16;
    z *= 0x85EBCA6Bu;
    z ^= z >> 13;
    z *= 0xC2B2AE35u;
    z ^= z >> 16;
    return (float)(z >> 8) * (1.0f / 16777216.0f) >= p;
}

// out = keep ? x * scale : 0 (scale = 1/(1-p) computed on the host); p == 0 copies.
extern "C" __global__ void dropout_forward_f32(const float* x, float* out, float p, float scale,
                                               u64 seed, u64 n) {
    GRID_STRIDE(i, n) {
        if (p == 0.0f) {
            out[i] = x[i];
        } else {
            out[i] = dropout_keep(seed, (u64)i, p) ? x[i] * scale : 0.0f;
        }
    }
}

// dx += keep ? dy * scale : 0; p == 0 adds dy.
extern "C" __global__ void dropout_backward_f32(const float* dy, float* dx, float p, float scale,
                                                u64 seed, u64 n) {
    GRID_STRIDE(i, n) {
        if (p == 0.0f) {
            dx[i] = dx[i] + dy[i];
        } else if (dropout_keep(seed, (u64)i, p)) {
            dx[i] = dx[i] + dy[i] * scale;
        }
    }
}

// out = silu(gate) * up, silu(g) = g / (1 + exp(-g)).
extern "C" __global__ void swiglu_forward_f32(const float* gate, const float* up, float* out,
                                              u64 n) {
    GRID_STRIDE(i, n) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// dgate = dout * up * sig * (1 + g * (1 - sig)); dup = dout * (g * sig).
extern "C" __global__ void swiglu_backward_f32(const float* gate, const float* up,
                                               const float* dout, float* dgate, float* dup,
                                               u64 n) {
    GRID_STRIDE(i, n) {
        float g = gate[i];
        float sig = 1.0f / (1.0f + expf(-g));
        float d = dout[i];
        dgate[i] = d * up[i] * sig * (1.0f + g * (1.0f - sig));
        dup[i] = d * (g * sig);
    }
}

// Round-to-nearest-even narrowing of activations for the cuBLAS f16/bf16 GEMMs.
extern "C" __global__ void convert_f32_bf16(const float* x, __nv_bfloat16* out, u64 n) {
    GRID_STRIDE(i, n) out[i] = __float2bfloat16_rn(x[i]);
}
extern "C" __global__ void convert_f32_f16(const float* x, __half* out, u64 n) {
    GRID_STRIDE(i, n) out[i] = __float2half_rn(x[i]);
}
