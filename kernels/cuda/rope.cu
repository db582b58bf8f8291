// HF rotate_half RoPE in place over x [batch, seq, heads, head_dim]; one thread per rotated
// pair (i < head_dim/2). The cos/sin tables are the host's RopeTable (llama3 / linear scaling
// already applied there), uploaded as [positions, head_dim/2]. `inverse` negates the angle.
extern "C" __global__ void rope_f32(float* x, const float* cos_t, const float* sin_t, int batch,
                                    int seq, int heads, int head_dim, int pos0, int inverse) {
    int half = head_dim / 2;
    u64 n = (u64)batch * seq * heads * half;
    GRID_STRIDE(idx, n) {
        int i = (int)(idx % half);
        i64 row = idx / half;  // (b * seq + t) * heads + h
        int t = (int)((row / heads) % seq);
        i64 pos = (i64)pos0 + t;
        float c = cos_t[pos * half + i];
        float s = sin_t[pos * half + i];
        if (inverse) s = -s;
        i64 base = row * head_dim;
        float x1 = x[base + i];
        float x2 = x[base + half + i];
        x[base + i] = x1 * c - x2 * s;
        x[base + half + i] = x2 * c + x1 * s;
    }
}
