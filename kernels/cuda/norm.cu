// HF LlamaRMSNorm, one block per row: rstd = 1/sqrt(mean(x^2) + eps), y = w * (x * rstd);
// backward dx (+)= rstd * (w * dy - x * coef), coef = rstd^2 * sum(dy * w * x) / dim.
// The weight is frozen and keeps its dtype (f32 / f16 / bf16).

template <typename TW>
__device__ void rmsnorm_forward(const float* x, const TW* w, float* y, float* rstd, int dim,
                                float eps) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    const float* xr = x + row * dim;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, scratch);
    float rs = 1.0f / sqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[row] = rs;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) y[row * dim + c] = ld_f32(w, c) * (xr[c] * rs);
}

template <typename TW>
__device__ void rmsnorm_backward(const float* dy, const float* x, const TW* w, const float* rstd,
                                 float* dx, int dim, int accumulate) {
    __shared__ float scratch[32];
    i64 row = blockIdx.x;
    i64 o = row * dim;
    float rs = rstd[row];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) dot += dy[o + c] * ld_f32(w, c) * x[o + c];
    dot = block_sum(dot, scratch);
    float coef = dot * rs * rs / (float)dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float g = rs * (ld_f32(w, c) * dy[o + c] - x[o + c] * coef);
        dx[o + c] = accumulate ? dx[o + c] + g : g;
    }
}

#define RMSNORM(SUFFIX, TW)                                                                   \
    extern "C" __global__ void rmsnorm_forward_##SUFFIX(const float* x, const TW* w, float* y, \
                                                        float* rstd, int dim, float eps) {    \
        rmsnorm_forward<TW>(x, w, y, rstd, dim, eps);                                         \
    }                                                                                         \
    extern "C" __global__ void rmsnorm_backward_##SUFFIX(const float* dy, const float* x,     \
                                                         const TW* w, const float* rstd,      \
                                                         float* dx, int dim, int accumulate) { \
        rmsnorm_backward<TW>(dy, x, w, rstd, dx, dim, accumulate);                            \
    }

RMSNORM(f32, float)
RMSNORM(f16, __half)
RMSNORM(bf16, __nv_bfloat16)
