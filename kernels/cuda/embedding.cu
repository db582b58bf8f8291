// Token embedding: out[t, :] = table[ids[t], :] (table frozen, any dtype); backward
// dtable[ids[t], :] += dout[t, :] with f32 atomics (ids were checked on the host).

template <typename TW>
__device__ void embedding_forward(const TW* table, const int* ids, float* out, int tokens,
                                  int dim) {
    GRID_STRIDE(idx, (i64)tokens * dim) {
        i64 t = idx / dim;
        int c = (int)(idx % dim);
        out[idx] = ld_f32(table, (i64)ids[t] * dim + c);
    }
}

extern "C" __global__ void embedding_forward_f32(const float* table, const int* ids, float* out,
                                                 int tokens, int dim) {
    embedding_forward<float>(table, ids, out, tokens, dim);
}
extern "C" __global__ void embedding_forward_f16(const __half* table, const int* ids, float* out,
                                                 int tokens, int dim) {
    embedding_forward<__half>(table, ids, out, tokens, dim);
}
extern "C" __global__ void embedding_forward_bf16(const __nv_bfloat16* table, const int* ids,
                                                  float* out, int tokens, int dim) {
    embedding_forward<__nv_bfloat16>(table, ids, out, tokens, dim);
}

extern "C" __global__ void embedding_backward_f32(const int* ids, const float* dout,
                                                  float* dtable, int tokens, int dim) {
    GRID_STRIDE(idx, (i64)tokens * dim) {
        i64 t = idx / dim;
        int c = (int)(idx % dim);
        atomicAdd(&dtable[(i64)ids[t] * dim + c], dout[idx]);
    }
}
