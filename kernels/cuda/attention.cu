// Causal grouped-query attention, flash style: scores live in registers and shared memory
// one 32-key tile at a time; no [q_len, kv_len] matrix is ever written to global memory.
//
// Layouts (AttnShape): q, out, dq [batch, q_len, q_heads, D]; k, v, dk, dv
// [batch, kv_stride, kv_heads, D] with rows < kv_len valid (rows beyond are never read);
// lse, delta [batch, q_heads, q_len]. Query i sits at position q_pos0 + i and sees keys
// j <= q_pos0 + i, j < kv_len; query head h reads KV head h / (q_heads / kv_heads).
//
// Thread layout: 4 warps. Forward and dQ: a block owns 16 queries of one (batch, head),
// each warp 4 of them; lane j of a warp scores key j of the tile; lane c owns output
// columns c, c + 32, ... (DJ = ceil(D / 32) of them, D <= 32 * DJ).
// dK/dV: a block owns 32 keys of one (batch, KV head), each warp 8 of them, and loops over
// the group's query heads and the query tiles that see them (no atomics: deterministic).
// Shared memory is dynamic (the host sizes it from D and raises the per-function limit).

#define QT 16   // queries per block (forward, dQ)
#define KT 32   // keys per tile
#define KW 8    // keys per warp in dK/dV

__device__ __forceinline__ i64 q_index(int b, int i, int h, int q_len, int qh, int D) {
    return (((i64)b * q_len + i) * qh + h) * D;
}
__device__ __forceinline__ i64 kv_index(int b, int j, int kvh, int kv_stride, int kvn, int D) {
    return (((i64)b * kv_stride + j) * kvn + kvh) * D;
}

// Loads rows [j0, j0 + KT) of one KV head into smem (row pitch `pitch`), zeros past kv_len.
__device__ __forceinline__ void load_kv_tile(float* dst, int pitch, const float* src, int b,
                                             int j0, int kvh, int kv_len, int kv_stride,
                                             int kvn, int D) {
    for (int idx = threadIdx.x; idx < KT * D; idx += blockDim.x) {
        int jj = idx / D, c = idx % D;
        int j = j0 + jj;
        dst[jj * pitch + c] = j < kv_len ? src[kv_index(b, j, kvh, kv_stride, kvn, D) + c] : 0.0f;
    }
}

// Loads `rows` queries [i0, i0 + rows) of head h into smem (row pitch `pitch`).
__device__ __forceinline__ void load_q_tile(float* dst, int pitch, int rows, const float* src,
                                            int b, int i0, int h, int q_len, int qh, int D) {
    for (int idx = threadIdx.x; idx < rows * D; idx += blockDim.x) {
        int r = idx / D, c = idx % D;
        int i = i0 + r;
        dst[r * pitch + c] = i < q_len ? src[q_index(b, i, h, q_len, qh, D) + c] : 0.0f;
    }
}

template <int DJ>
__device__ void attn_forward(const float* q, const float* k, const float* v, float* out,
                             float* lse, int q_len, int kv_len, int kv_stride, int qh, int kvn,
                             int D, int q_pos0, float scale) {
    extern __shared__ float smem[];
    float* Qs = smem;                 // QT x D
    float* Ks = Qs + QT * D;          // KT x (D + 1)
    float* Vs = Ks + KT * (D + 1);    // KT x D
    int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * QT;
    int kvh = h / (qh / kvn);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    load_q_tile(Qs, D, QT, q, b, i0, h, q_len, qh, D);

    float m[4], l[4], acc[4][DJ];
#pragma unroll
    for (int r = 0; r < 4; r++) {
        m[r] = -F32_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int dj = 0; dj < DJ; dj++) acc[r][dj] = 0.0f;
    }
    int i_last = min(i0 + QT - 1, q_len - 1);
    int n_keys = min(q_pos0 + i_last + 1, kv_len);
    for (int j0 = 0; j0 < n_keys; j0 += KT) {
        __syncthreads();
        load_kv_tile(Ks, D + 1, k, b, j0, kvh, kv_len, kv_stride, kvn, D);
        load_kv_tile(Vs, D, v, b, j0, kvh, kv_len, kv_stride, kvn, D);
        __syncthreads();
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const float* kr = Ks + lane * (D + 1);
        const float* qr = Qs + (warp * 4) * D;
        for (int c = 0; c < D; c++) {
            float kc = kr[c];
#pragma unroll
            for (int r = 0; r < 4; r++) s[r] = fmaf(qr[r * D + c], kc, s[r]);
        }
        int j = j0 + lane;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int i = i0 + warp * 4 + r;
            bool vis = i < q_len && j < kv_len && j <= q_pos0 + i;
            float sc = vis ? s[r] * scale : -F32_INF;
            float mnew = fmaxf(m[r], warp_max(sc));
            float p = vis ? expf(sc - mnew) : 0.0f;
            float corr = m[r] == -F32_INF ? 0.0f : expf(m[r] - mnew);
            l[r] = l[r] * corr + warp_sum(p);
#pragma unroll
            for (int dj = 0; dj < DJ; dj++) acc[r][dj] *= corr;
            m[r] = mnew;
            s[r] = p;
        }
        for (int jj = 0; jj < KT; jj++) {
            float vj[DJ];
#pragma unroll
            for (int dj = 0; dj < DJ; dj++) {
                int c = lane + 32 * dj;
                vj[dj] = c < D ? Vs[jj * D + c] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < 4; r++) {
                float pj = __shfl_sync(FULL_MASK, s[r], jj);
#pragma unroll
                for (int dj = 0; dj < DJ; dj++) acc[r][dj] = fmaf(pj, vj[dj], acc[r][dj]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; r++) {
        int i = i0 + warp * 4 + r;
        if (i >= q_len) continue;
        i64 o = q_index(b, i, h, q_len, qh, D);
#pragma unroll
        for (int dj = 0; dj < DJ; dj++) {
            int c = lane + 32 * dj;
            if (c < D) out[o + c] = l[r] > 0.0f ? acc[r][dj] / l[r] : 0.0f;
        }
        if (lane == 0)
            lse[((i64)b * qh + h) * q_len + i] = l[r] > 0.0f ? m[r] + logf(l[r]) : -F32_INF;
    }
}

// delta[b, h, i] = sum_c dout * out, one warp per query row.
extern "C" __global__ void attn_delta_f32(const float* out, const float* dout, float* delta,
                                          int batch, int q_len, int qh, int D) {
    i64 rows = (i64)batch * qh * q_len;
    i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    int i = (int)(row % q_len);
    int h = (int)((row / q_len) % qh);
    int b = (int)(row / ((i64)q_len * qh));
    i64 o = q_index(b, i, h, q_len, qh, D);
    float s = 0.0f;
    for (int c = lane; c < D; c += 32) s = fmaf(dout[o + c], out[o + c], s);
    s = warp_sum(s);
    if (lane == 0) delta[row] = s;
}

// dq = scale * sum_j ds_ij k_j with ds = p (dout.v - delta), p = exp(scale q.k - lse).
template <int DJ>
__device__ void attn_backward_dq(const float* q, const float* k, const float* v,
                                 const float* lse, const float* delta, const float* dout,
                                 float* dq, int q_len, int kv_len, int kv_stride, int qh,
                                 int kvn, int D, int q_pos0, float scale) {
    extern __shared__ float smem[];
    float* Qs = smem;                 // QT x D
    float* Os = Qs + QT * D;          // QT x D (dout)
    float* Ks = Os + QT * D;          // KT x (D + 1)
    float* Vs = Ks + KT * (D + 1);    // KT x (D + 1)
    int b = blockIdx.z, h = blockIdx.y, i0 = blockIdx.x * QT;
    int kvh = h / (qh / kvn);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    load_q_tile(Qs, D, QT, q, b, i0, h, q_len, qh, D);
    load_q_tile(Os, D, QT, dout, b, i0, h, q_len, qh, D);
    float lr[4], dr[4], acc[4][DJ];
#pragma unroll
    for (int r = 0; r < 4; r++) {
        int i = i0 + warp * 4 + r;
        i64 li = ((i64)b * qh + h) * q_len + i;
        lr[r] = i < q_len ? lse[li] : 0.0f;
        dr[r] = i < q_len ? delta[li] : 0.0f;
#pragma unroll
        for (int dj = 0; dj < DJ; dj++) acc[r][dj] = 0.0f;
    }
    int i_last = min(i0 + QT - 1, q_len - 1);
    int n_keys = min(q_pos0 + i_last + 1, kv_len);
    for (int j0 = 0; j0 < n_keys; j0 += KT) {
        __syncthreads();
        load_kv_tile(Ks, D + 1, k, b, j0, kvh, kv_len, kv_stride, kvn, D);
        load_kv_tile(Vs, D + 1, v, b, j0, kvh, kv_len, kv_stride, kvn, D);
        __syncthreads();
        float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const float* kr = Ks + lane * (D + 1);
        const float* vr = Vs + lane * (D + 1);
        const float* qr = Qs + (warp * 4) * D;
        const float* orow = Os + (warp * 4) * D;
        for (int c = 0; c < D; c++) {
            float kc = kr[c], vc = vr[c];
#pragma unroll
            for (int r = 0; r < 4; r++) {
                s[r] = fmaf(qr[r * D + c], kc, s[r]);
                dp[r] = fmaf(orow[r * D + c], vc, dp[r]);
            }
        }
        int j = j0 + lane;
#pragma unroll
        for (int r = 0; r < 4; r++) {
            int i = i0 + warp * 4 + r;
            bool vis = i < q_len && j < kv_len && j <= q_pos0 + i;
            float p = vis ? expf(s[r] * scale - lr[r]) : 0.0f;
            s[r] = vis ? p * (dp[r] - dr[r]) * scale : 0.0f;  // ds
        }
        for (int jj = 0; jj < KT; jj++) {
            float kj[DJ];
#pragma unroll
            for (int dj = 0; dj < DJ; dj++) {
                int c = lane + 32 * dj;
                kj[dj] = c < D ? Ks[jj * (D + 1) + c] : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < 4; r++) {
                float dsj = __shfl_sync(FULL_MASK, s[r], jj);
#pragma unroll
                for (int dj = 0; dj < DJ; dj++) acc[r][dj] = fmaf(dsj, kj[dj], acc[r][dj]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < 4; r++) {
        int i = i0 + warp * 4 + r;
        if (i >= q_len) continue;
        i64 o = q_index(b, i, h, q_len, qh, D);
#pragma unroll
        for (int dj = 0; dj < DJ; dj++) {
            int c = lane + 32 * dj;
            if (c < D) dq[o + c] = acc[r][dj];
        }
    }
}

// dv_j = sum_i p_ij dout_i; dk_j = sum_i ds_ij q_i (ds already carries the scale), summed
// over every query head of the KV head's group. Rows j >= kv_len get zeros.
template <int DJ>
__device__ void attn_backward_dkdv(const float* q, const float* k, const float* v,
                                   const float* lse, const float* delta, const float* dout,
                                   float* dk, float* dv, int q_len, int kv_len, int kv_stride,
                                   int qh, int kvn, int D, int q_pos0, float scale) {
    extern __shared__ float smem[];
    float* Ks = smem;                 // KT x D
    float* Vs = Ks + KT * D;          // KT x D
    float* Qs = Vs + KT * D;          // KT x (D + 1)   (KT queries per tile)
    float* Os = Qs + KT * (D + 1);    // KT x (D + 1)
    float* Ls = Os + KT * (D + 1);    // KT
    float* Ds = Ls + KT;              // KT
    int b = blockIdx.z, kvh = blockIdx.y, j0 = blockIdx.x * KT;
    int group = qh / kvn;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    load_kv_tile(Ks, D, k, b, j0, kvh, kv_len, kv_stride, kvn, D);
    load_kv_tile(Vs, D, v, b, j0, kvh, kv_len, kv_stride, kvn, D);
    float dka[KW][DJ], dva[KW][DJ];
#pragma unroll
    for (int kk = 0; kk < KW; kk++)
#pragma unroll
        for (int dj = 0; dj < DJ; dj++) {
            dka[kk][dj] = 0.0f;
            dva[kk][dj] = 0.0f;
        }
    if (j0 < kv_len) {
        // the first query that sees key j0 sits at i = j0 - q_pos0
        int i_first = max(0, j0 - q_pos0);
        i_first -= i_first % KT;
        for (int hh = 0; hh < group; hh++) {
            int h = kvh * group + hh;
            for (int i0 = i_first; i0 < q_len; i0 += KT) {
                __syncthreads();
                load_q_tile(Qs, D + 1, KT, q, b, i0, h, q_len, qh, D);
                load_q_tile(Os, D + 1, KT, dout, b, i0, h, q_len, qh, D);
                if (threadIdx.x < KT) {
                    int i = i0 + threadIdx.x;
                    i64 li = ((i64)b * qh + h) * q_len + i;
                    Ls[threadIdx.x] = i < q_len ? lse[li] : 0.0f;
                    Ds[threadIdx.x] = i < q_len ? delta[li] : 0.0f;
                }
                __syncthreads();
                // lane = query i0 + lane; this warp's keys warp * KW + kk
                float s[KW], dp[KW];
#pragma unroll
                for (int kk = 0; kk < KW; kk++) {
                    s[kk] = 0.0f;
                    dp[kk] = 0.0f;
                }
                const float* qr = Qs + lane * (D + 1);
                const float* orow = Os + lane * (D + 1);
                const float* kb = Ks + (warp * KW) * D;
                const float* vb = Vs + (warp * KW) * D;
                for (int c = 0; c < D; c++) {
                    float qc = qr[c], oc = orow[c];
#pragma unroll
                    for (int kk = 0; kk < KW; kk++) {
                        s[kk] = fmaf(qc, kb[kk * D + c], s[kk]);
                        dp[kk] = fmaf(oc, vb[kk * D + c], dp[kk]);
                    }
                }
                int i = i0 + lane;
                float li = Ls[lane], di = Ds[lane];
#pragma unroll
                for (int kk = 0; kk < KW; kk++) {
                    int j = j0 + warp * KW + kk;
                    bool vis = i < q_len && j < kv_len && j <= q_pos0 + i;
                    float p = vis ? expf(s[kk] * scale - li) : 0.0f;
                    s[kk] = p;
                    dp[kk] = vis ? p * (dp[kk] - di) * scale : 0.0f;  // ds
                }
                for (int qq = 0; qq < KT; qq++) {
                    float oq[DJ], qv[DJ];
#pragma unroll
                    for (int dj = 0; dj < DJ; dj++) {
                        int c = lane + 32 * dj;
                        oq[dj] = c < D ? Os[qq * (D + 1) + c] : 0.0f;
                        qv[dj] = c < D ? Qs[qq * (D + 1) + c] : 0.0f;
                    }
#pragma unroll
                    for (int kk = 0; kk < KW; kk++) {
                        float pq = __shfl_sync(FULL_MASK, s[kk], qq);
                        float dsq = __shfl_sync(FULL_MASK, dp[kk], qq);
#pragma unroll
                        for (int dj = 0; dj < DJ; dj++) {
                            dva[kk][dj] = fmaf(pq, oq[dj], dva[kk][dj]);
                            dka[kk][dj] = fmaf(dsq, qv[dj], dka[kk][dj]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int kk = 0; kk < KW; kk++) {
        int j = j0 + warp * KW + kk;
        if (j >= kv_stride) continue;
        i64 o = kv_index(b, j, kvh, kv_stride, kvn, D);
#pragma unroll
        for (int dj = 0; dj < DJ; dj++) {
            int c = lane + 32 * dj;
            if (c < D) {
                dk[o + c] = dka[kk][dj];
                dv[o + c] = dva[kk][dj];
            }
        }
    }
}

#define ATTN(DJ)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) attn_forward_d##DJ(                    \
        const float* q, const float* k, const float* v, float* out, float* lse, int q_len,   \
        int kv_len, int kv_stride, int qh, int kvn, int D, int q_pos0, float scale) {        \
        attn_forward<DJ>(q, k, v, out, lse, q_len, kv_len, kv_stride, qh, kvn, D, q_pos0,    \
                         scale);                                                             \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) attn_backward_dq_d##DJ(                \
        const float* q, const float* k, const float* v, const float* lse,                    \
        const float* delta, const float* dout, float* dq, int q_len, int kv_len,             \
        int kv_stride, int qh, int kvn, int D, int q_pos0, float scale) {                    \
        attn_backward_dq<DJ>(q, k, v, lse, delta, dout, dq, q_len, kv_len, kv_stride, qh,    \
                             kvn, D, q_pos0, scale);                                         \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(128) attn_backward_dkdv_d##DJ(              \
        const float* q, const float* k, const float* v, const float* lse,                    \
        const float* delta, const float* dout, float* dk, float* dv, int q_len, int kv_len,  \
        int kv_stride, int qh, int kvn, int D, int q_pos0, float scale) {                    \
        attn_backward_dkdv<DJ>(q, k, v, lse, delta, dout, dk, dv, q_len, kv_len, kv_stride,  \
                               qh, kvn, D, q_pos0, scale);                                   \
    }

ATTN(1)
ATTN(2)
ATTN(4)
ATTN(8)
