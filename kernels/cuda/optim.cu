// Optimizers over f32 master weights, element by element with PyTorch's rounding (the
// per-step scalars are computed on the host exactly as the CPU backend computes them;
// fmaf where ATen fuses, plain operations elsewhere, --fmad=false keeps the rest unfused).

// torch.optim.AdamW single-tensor step.
extern "C" __global__ void adamw_f32(float* param, const float* grad, float* m, float* v,
                                     int has_decay, float decay, float lerp_w, float beta2,
                                     float one_minus_beta2, float neg_step_size,
                                     float bias_correction2_sqrt, float eps, u64 n) {
    GRID_STRIDE(i, n) {
        float p = param[i], g = grad[i], mi = m[i], vi = v[i];
        if (has_decay) p = p * decay;
        mi = fabsf(lerp_w) < 0.5f ? fmaf(lerp_w, g - mi, mi) : fmaf(lerp_w - 1.0f, g - mi, g);
        vi = fmaf(one_minus_beta2 * g, g, vi * beta2);
        float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
        p = p + neg_step_size * mi / denom;
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
    }
}

// torch.optim.SGD single-tensor step (weight decay, momentum, dampening, nesterov).
extern "C" __global__ void sgd_f32(float* param, const float* grad, float* buf, int has_decay,
                                   float weight_decay, int has_momentum, float momentum,
                                   float one_minus_dampening, int nesterov, float neg_lr,
                                   int first, u64 n) {
    GRID_STRIDE(i, n) {
        float p = param[i];
        float g = grad[i];
        if (has_decay) g = fmaf(p, weight_decay, g);
        if (has_momentum) {
            float b = first ? g : fmaf(g, one_minus_dampening, buf[i] * momentum);
            buf[i] = b;
            g = nesterov ? fmaf(b, momentum, g) : b;
        }
        param[i] = fmaf(g, neg_lr, p);
    }
}
