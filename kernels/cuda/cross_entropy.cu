// Fused softmax cross-entropy, one block per row of logits [rows, vocab], the row's sums in
// f64 as the CPU reference computes them: loss = m + ln sum exp(x - m) - x[target].
// Rows whose target is ignore_index get loss 0 (and a zero gradient row). With has_grad the
// row is replaced by grad_scale * (softmax - onehot). loss64[r] (f64) lets the host sum the
// losses in row order.
extern "C" __global__ void cross_entropy_f32(float* logits, const int* targets, float* row_loss,
                                             double* loss64, int vocab, int ignore_index,
                                             int has_grad, float grad_scale) {
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    i64 r = blockIdx.x;
    float* row = logits + r * vocab;
    int t = targets[r];
    if (t == ignore_index) {
        if (threadIdx.x == 0) {
            row_loss[r] = 0.0f;
            loss64[r] = 0.0;
        }
        if (has_grad)
            for (int j = threadIdx.x; j < vocab; j += blockDim.x) row[j] = 0.0f;
        return;
    }
    float mf = -F32_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mf = fmaxf(mf, row[j]);
    mf = block_max(mf, fscratch);
    double m = (double)mf;
    double s = 0.0;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) s += exp((double)row[j] - m);
    s = block_sum_d(s, dscratch);
    double lse = m + log(s);
    double loss = lse - (double)row[t];
    __syncthreads();  // every thread has read row[t] before the row is overwritten
    if (threadIdx.x == 0) {
        row_loss[r] = (float)loss;
        loss64[r] = loss;
    }
    if (has_grad) {
        double g = (double)grad_scale;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            double p = exp((double)row[j] - lse);
            row[j] = (float)(g * (p - (j == t ? 1.0 : 0.0)));
        }
    }
}
