// Tiled f32 GEMM, row-major: C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C.
// op(A) = A stored [m,k], or A^T with A stored [k,m] (trans_a); op(B) = B stored [k,n], or
// B^T with B stored [n,k] (trans_b). A is f32; B is f32, f16 or bf16 (a frozen weight,
// widened on load), so the same kernel serves `matmul`, the LoRA products and the linear
// layers when cuBLAS is not used. beta == 0 never reads C (NaN in C does not survive).
// Split-K (gridDim.z > 1) is only used with beta == 1: each split atomically adds
// alpha * its partial product.
//
// 64x64 tile per block of 256 threads, 4x4 outputs per thread, k in steps of 16.

#define GBM 64
#define GBN 64
#define GBK 16

template <typename TB>
__device__ void gemm_tiled(const float* A, const TB* B, float* C, int M, int N, int K,
                           int trans_a, int trans_b, float alpha, float beta, int k_per_split) {
    __shared__ float As[GBK][GBM + 4];
    __shared__ float Bs[GBK][GBN + 4];
    int tid = threadIdx.x;
    int tx = tid % 16, ty = tid / 16;
    int row0 = blockIdx.y * GBM, col0 = blockIdx.x * GBN;
    int k_begin = blockIdx.z * k_per_split;
    int k_end = min(K, k_begin + k_per_split);
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (int k0 = k_begin; k0 < k_end; k0 += GBK) {
        // A tile: GBM x GBK, 4 elements per thread, coalesced along the stored rows.
#pragma unroll
        for (int l = 0; l < 4; l++) {
            int idx = tid + 256 * l;
            int i, p;
            if (trans_a) {
                i = idx % GBM;
                p = idx / GBM;
            } else {
                p = idx % GBK;
                i = idx / GBK;
            }
            int gi = row0 + i, gp = k0 + p;
            float a = 0.0f;
            if (gi < M && gp < k_end) a = trans_a ? A[(i64)gp * M + gi] : A[(i64)gi * K + gp];
            As[p][i] = a;
        }
        // B tile: GBK x GBN.
#pragma unroll
        for (int l = 0; l < 4; l++) {
            int idx = tid + 256 * l;
            int j, p;
            if (trans_b) {
                p = idx % GBK;
                j = idx / GBK;
            } else {
                j = idx % GBN;
                p = idx / GBN;
            }
            int gj = col0 + j, gp = k0 + p;
            float b = 0.0f;
            if (gj < N && gp < k_end)
                b = trans_b ? ld_f32(B, (i64)gj * K + gp) : ld_f32(B, (i64)gp * N + gj);
            Bs[p][j] = b;
        }
        __syncthreads();
#pragma unroll
        for (int p = 0; p < GBK; p++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = As[p][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = Bs[p][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        int gi = row0 + ty + 16 * i;
        if (gi >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int gj = col0 + tx + 16 * j;
            if (gj >= N) continue;
            float* c = &C[(i64)gi * N + gj];
            if (gridDim.z > 1) {
                atomicAdd(c, alpha * acc[i][j]);
            } else if (beta == 0.0f) {
                *c = alpha * acc[i][j];
            } else {
                *c = alpha * acc[i][j] + beta * *c;
            }
        }
    }
}

#define GEMM(SUFFIX, TB)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                      \
        gemm_##SUFFIX(const float* A, const TB* B, float* C, int M, int N, int K,          \
                      int trans_a, int trans_b, float alpha, float beta, int k_per_split) { \
        gemm_tiled<TB>(A, B, C, M, N, K, trans_a, trans_b, alpha, beta, k_per_split);      \
    }

GEMM(f32, float)
GEMM(f16, __half)
GEMM(bf16, __nv_bfloat16)
