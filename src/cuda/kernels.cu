// Device kernels of the moe-dmft GPU backend, compiled at run time with NVRTC (src/cuda/mod.rs).
//
// Written to be obviously correct rather than fast: matrix products go to cuBLAS; these kernels do the
// routing (top-k, gates, capacity), the gather/scatter of tokens to experts, activations, RMS norm, the
// routing losses and the optimizer updates. Every reduction runs in a fixed order (one thread or one
// warp per output, warp shuffles in a fixed tree), so results do not depend on scheduling.
//

#define MAX_ACTIVE 64
#define FULL_MASK 0xffffffffu
// NVRTC has no <cfloat>: the largest finite float, as the starting value of running maxima.
#define FLT_MAX_VALUE 3.402823466e+38f

__device__ __forceinline__ float warp_sum_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    return __shfl_sync(FULL_MASK, v, 0);
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL_MASK, v, o);
    return __shfl_sync(FULL_MASK, v, 0);
}

// Activation kinds, in the order of model::Activation: relu, tanh, gelu (tanh form), linear.
__device__ __forceinline__ float act_apply(float x, int kind) {
    if (kind == 0) return x > 0.0f ? x : 0.0f;
    if (kind == 1) return tanhf(x);
    if (kind == 2) {
        float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(inner));
    }
    return x;
}

__device__ __forceinline__ float act_derivative(float x, int kind) {
    if (kind == 0) return x > 0.0f ? 1.0f : 0.0f;
    if (kind == 1) { float t = tanhf(x); return 1.0f - t * t; }
    if (kind == 2) {
        const float c = 0.7978845608028654f;
        float inner = c * (x + 0.044715f * x * x * x);
        float t = tanhf(inner);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
    }
    return 1.0f;
}

extern "C" {

// h = phi(u), elementwise.
__global__ void act_forward(const float* u, float* h, long long n, int kind) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) h[i] = act_apply(u[i], kind);
}

// du *= phi'(u), elementwise.
__global__ void act_backward(const float* u, float* du, long long n, int kind) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) du[i] *= act_derivative(u[i], kind);
}

// x *= alpha.
__global__ void scale_inplace(float* x, float alpha, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= alpha;
}

// y += alpha * x.
__global__ void axpy(float* y, const float* x, float alpha, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += alpha * x[i];
}

// dst[i, :] = scale[i] * src[idx[i], :] (scale may be NULL: 1).
__global__ void gather_rows(const float* src, const int* idx, const float* scale, float* dst, int rows, int width) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * width) return;
    int r = (int)(i / width);
    int c = (int)(i % width);
    float s = scale ? scale[r] : 1.0f;
    dst[i] = s * src[(long long)idx[r] * width + c];
}

// out[t, c] (+)= sum over slots j with pos[t,j] >= 0 of w[t,j] * z[pos[t,j], c] (w may be NULL: 1).
// Slots are summed in slot order; dropped assignments (pos < 0) contribute nothing.
__global__ void combine(const float* z, const int* pos, const float* w, float* out, int tokens, int active,
                        int width, int accumulate) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * width) return;
    int t = (int)(i / width);
    int c = (int)(i % width);
    float acc = 0.0f;
    for (int j = 0; j < active; ++j) {
        int p = pos[t * active + j];
        if (p >= 0) acc += (w ? w[t * active + j] : 1.0f) * z[(long long)p * width + c];
    }
    out[i] = accumulate ? out[i] + acc : acc;
}

// d_gate[t, j] = <dm[t, :], z[pos[t, j], :]>, 0 for dropped assignments. One warp per (t, j).
__global__ void gate_grad(const float* dm, const float* z, const int* pos, float* d_gate, int tokens, int active,
                          int width) {
    int warps_per_block = blockDim.x / 32;
    long long item = (long long)blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (item >= (long long)tokens * active) return;
    int t = (int)(item / active);
    int p = pos[item];
    if (p < 0) {
        if (lane == 0) d_gate[item] = 0.0f;
        return;
    }
    double acc = 0.0;
    for (int c = lane; c < width; c += 32) acc += (double)dm[(long long)t * width + c] * (double)z[(long long)p * width + c];
    acc = warp_sum_d(acc);
    if (lane == 0) d_gate[item] = (float)acc;
}

// true when expert a ranks before expert b for one token (the order of routing::route):
// higher score first; equal scores by higher jitter (random tie-break) then lower index.
__device__ __forceinline__ bool ranks_before(int a, int b, const float* logits_row, const float* bias,
                                             const unsigned long long* jitter_row) {
    double sa = (double)logits_row[a] + (double)bias[a];
    double sb = (double)logits_row[b] + (double)bias[b];
    if (sa > sb) return true;
    if (sa < sb) return false;
    if (jitter_row) {
        if (jitter_row[a] > jitter_row[b]) return true;
        if (jitter_row[a] < jitter_row[b]) return false;
    }
    return a < b;
}

// Top-k selection and gates, one thread per token. Selection inside each of `groups` contiguous groups
// of experts (prototyping; groups = 1 is plain top-k), the union sorted by rank. Gates are renormalized
// over the selected set, computed in double: softmax (gate_kind 0) or sigmoid (1); for sigmoid the
// selected sigmoids and their sum are kept for the backward pass.
__global__ void route_topk(const float* logits, const float* bias, const unsigned long long* jitter, int tokens,
                           int experts, int active, int groups, int gate_kind, int* selected, float* gates,
                           float* sig, float* sig_sum) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* row = logits + (long long)t * experts;
    const unsigned long long* jrow = jitter ? jitter + (long long)t * experts : 0;
    int sel[MAX_ACTIVE];
    int count = 0;
    int group = experts / groups;
    int per_group = active / groups;
    for (int g = 0; g < groups; ++g) {
        for (int s = 0; s < per_group; ++s) {
            int best = -1;
            for (int e = g * group; e < (g + 1) * group; ++e) {
                bool taken = false;
                for (int q = 0; q < count; ++q) taken = taken || (sel[q] == e);
                if (taken) continue;
                if (best < 0 || ranks_before(e, best, row, bias, jrow)) best = e;
            }
            sel[count++] = best;
        }
    }
    // Insertion sort of the union by rank (already sorted when groups = 1).
    for (int i = 1; i < count; ++i) {
        int v = sel[i];
        int j = i - 1;
        while (j >= 0 && ranks_before(v, sel[j], row, bias, jrow)) { sel[j + 1] = sel[j]; --j; }
        sel[j + 1] = v;
    }
    double mx = -1.0e300, total = 0.0;
    for (int j = 0; j < count; ++j) mx = fmax(mx, (double)row[sel[j]]);
    for (int j = 0; j < count; ++j) {
        double r = (double)row[sel[j]];
        double v;
        if (gate_kind == 0) {
            v = exp(r - mx);
        } else {
            v = r >= 0.0 ? 1.0 / (1.0 + exp(-r)) : exp(r) / (1.0 + exp(r));
            sig[t * active + j] = (float)v;
        }
        total += v;
    }
    for (int j = 0; j < count; ++j) {
        double r = (double)row[sel[j]];
        double v = gate_kind == 0 ? exp(r - mx) : (r >= 0.0 ? 1.0 / (1.0 + exp(-r)) : exp(r) / (1.0 + exp(r)));
        selected[t * active + j] = sel[j];
        gates[t * active + j] = (float)(v / total);
    }
    if (gate_kind != 0) sig_sum[t] = (float)total;
}

// Capacity and counts, one thread per expert. Assignments are visited slot-major (every token's first
// slot in token order, then every token's second slot, ...): the drop order of routing::route. An
// assignment is kept while its expert has taken fewer than `capacity` (capacity < 0: unlimited).
__global__ void expert_counts(const int* selected, int tokens, int active, int experts, int capacity, int* kept,
                              int* count_selected, int* count_kept) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= experts) return;
    int filled = 0, seen = 0;
    for (int j = 0; j < active; ++j) {
        for (int t = 0; t < tokens; ++t) {
            int i = t * active + j;
            if (selected[i] != e) continue;
            ++seen;
            if (capacity < 0 || filled < capacity) { ++filled; kept[i] = 1; } else { kept[i] = 0; }
        }
    }
    count_selected[e] = seen;
    count_kept[e] = filled;
}

// Gather lists, one thread per expert: the kept assignments of expert e in token order at
// offsets[e].., with their token, gate, and, per (t, j), the row `pos` in the gathered buffers (-1 when
// dropped).
__global__ void expert_lists(const int* selected, const int* kept, const float* gates, const int* offsets,
                             int tokens, int active, int experts, int* list_token, float* list_gate, int* pos) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= experts) return;
    int p = offsets[e];
    for (int t = 0; t < tokens; ++t) {
        for (int j = 0; j < active; ++j) {
            int i = t * active + j;
            if (selected[i] != e) continue;
            if (kept[i]) {
                list_token[p] = t;
                list_gate[p] = gates[i];
                pos[i] = p;
                ++p;
            } else {
                pos[i] = -1;
            }
        }
    }
}

// d_logits[t, :] = mult * (gate backward + aux_grad[t, :]), one thread per token (routing::Routing::
// gates_backward). aux_grad may be NULL.
__global__ void gates_backward(const float* gates, const float* sig, const float* sig_sum, const int* selected,
                               const float* d_gate, const float* aux_grad, float* d_logits, int tokens, int experts,
                               int active, int gate_kind, float mult) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    float* out = d_logits + (long long)t * experts;
    for (int e = 0; e < experts; ++e) out[e] = aux_grad ? aux_grad[(long long)t * experts + e] : 0.0f;
    double dot = 0.0;
    for (int j = 0; j < active; ++j) dot += (double)gates[t * active + j] * (double)d_gate[t * active + j];
    for (int j = 0; j < active; ++j) {
        int i = t * active + j;
        double centred = (double)d_gate[i] - dot;
        double v;
        if (gate_kind == 0) {
            v = (double)gates[i] * centred;
        } else {
            double s = (double)sig[i];
            v = centred / (double)sig_sum[t] * s * (1.0 - s);
        }
        out[selected[i]] = (float)((double)out[selected[i]] + v);
    }
    for (int e = 0; e < experts; ++e) out[e] *= mult;
}

// Full softmax p of each logits row and its log-sum-exp, one thread per token (for the aux losses).
__global__ void softmax_rows(const float* logits, float* p, double* lse, int tokens, int experts) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* row = logits + (long long)t * experts;
    double mx = -1.0e300, s = 0.0;
    for (int e = 0; e < experts; ++e) mx = fmax(mx, (double)row[e]);
    for (int e = 0; e < experts; ++e) s += exp((double)row[e] - mx);
    for (int e = 0; e < experts; ++e) p[(long long)t * experts + e] = (float)(exp((double)row[e] - mx) / s);
    lse[t] = mx + log(s);
}

// Gradient of the weighted aux losses on the logits (routing::aux_losses), one thread per token:
// balance: bal_scale * p * (f_e - sum_e f_e p_e); z-loss: z_scale * lse * p. f: selection fractions.
__global__ void aux_grad(const float* p, const double* lse, const double* f, float* grad, int tokens, int experts,
                         double bal_scale, double z_scale) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= tokens) return;
    const float* row = p + (long long)t * experts;
    double fp = 0.0;
    for (int e = 0; e < experts; ++e) fp += f[e] * (double)row[e];
    for (int e = 0; e < experts; ++e) {
        double v = bal_scale * (double)row[e] * (f[e] - fp) + z_scale * lse[t] * (double)row[e];
        grad[(long long)t * experts + e] = (float)v;
    }
}

// out[c] = sum over rows r of a[r, c] * (b ? b[r, c] : 1), one thread per column, rows in order,
// accumulated in double.
__global__ void column_dot(const float* a, const float* b, float* out, int rows, int width) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    double acc = 0.0;
    for (int r = 0; r < rows; ++r) {
        long long i = (long long)r * width + c;
        acc += (double)a[i] * (b ? (double)b[i] : 1.0);
    }
    out[c] = (float)acc;
}

// Sum of squares of every row, one warp per row (diagnostics: RMS of activations).
__global__ void row_sumsq(const float* x, double* out, int rows, int width) {
    int warps_per_block = blockDim.x / 32;
    int r = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    double acc = 0.0;
    for (int c = lane; c < width; c += 32) { double v = x[(long long)r * width + c]; acc += v * v; }
    acc = warp_sum_d(acc);
    if (lane == 0) out[r] = acc;
}

// Sums of squares of x (has_y = 0) or of x - y (has_y = 1) over consecutive chunks of `chunk` entries, one
// warp per chunk, into out[c] (training records: parameter, gradient and update norms per tensor, reduced
// on the host in chunk order, so the same inputs give the same sums).
__global__ void chunk_sumsq(const float* x, const float* y, int has_y, double* out, long long n, int chunk) {
    int warps_per_block = blockDim.x / 32;
    long long c = (long long)blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    long long start = c * chunk;
    if (start >= n) return;
    long long end = start + chunk < n ? start + chunk : n;
    double acc = 0.0;
    for (long long i = start + lane; i < end; i += 32) {
        double v = has_y ? (double)x[i] - (double)y[i] : (double)x[i];
        acc += v * v;
    }
    acc = warp_sum_d(acc);
    if (lane == 0) out[c] = acc;
}

// RMS norm with gain, one warp per row: xhat = x / sqrt(mean(x^2) + eps), y = mult * gain * xhat.
__global__ void rms_norm_forward(const float* x, const float* gain, float* y, float* xhat, float* inv_rms, int rows,
                                 int width, float eps, float mult) {
    int warps_per_block = blockDim.x / 32;
    int r = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float* xr = x + (long long)r * width;
    float acc = 0.0f;
    for (int c = lane; c < width; c += 32) acc += xr[c] * xr[c];
    acc = warp_sum_f(acc);
    float inv = 1.0f / sqrtf(acc / (float)width + eps);
    for (int c = lane; c < width; c += 32) {
        float v = xr[c] * inv;
        xhat[(long long)r * width + c] = v;
        y[(long long)r * width + c] = mult * (v * gain[c]);
    }
    if (lane == 0) inv_rms[r] = inv;
}

// RMS norm backward into the residual gradient, one warp per row: d = dy * gain,
// dx += inv_rms * (d - xhat * mean(d * xhat)).
__global__ void rms_norm_backward(const float* dy, const float* gain, const float* xhat, const float* inv_rms,
                                  float* dx, int rows, int width) {
    int warps_per_block = blockDim.x / 32;
    int r = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    long long base = (long long)r * width;
    float acc = 0.0f;
    for (int c = lane; c < width; c += 32) acc += dy[base + c] * gain[c] * xhat[base + c];
    float proj = warp_sum_f(acc) / (float)width;
    float inv = inv_rms[r];
    for (int c = lane; c < width; c += 32) dx[base + c] += inv * (dy[base + c] * gain[c] - xhat[base + c] * proj);
}

// AdamW with bias corrections folded into step_size and inv_sqrt_bc2 (train::optim::AdamW).
__global__ void adamw(float* w, const float* g, float* m, float* v, long long n, float b1, float b2, float decay,
                      float step_size, float inv_sqrt_bc2, float eps) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gr = g[i];
    float mi = b1 * m[i] + (1.0f - b1) * gr;
    float vi = b2 * v[i] + (1.0f - b2) * gr * gr;
    m[i] = mi;
    v[i] = vi;
    w[i] = w[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
}

// SGD with decoupled weight decay: w = decay * w - lr * g.
__global__ void sgd(float* w, const float* g, long long n, float decay, float lr) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) w[i] = w[i] * decay - lr * g[i];
}

// ---- MoE-Transformer ----

// h[t, c] = alpha * (emb[ids[t], c] + pos[t % seq, c]).
__global__ void embed_forward(const float* emb, const float* pos, const int* ids, float* h, int tokens, int seq,
                              int width, float alpha) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)tokens * width) return;
    int t = (int)(i / width);
    int c = (int)(i % width);
    h[i] = alpha * (emb[(long long)ids[t] * width + c] + pos[(long long)(t % seq) * width + c]);
}

// out[g, c] (+)= alpha * sum over r in list[starts[g] .. starts[g+1]] of x[r, c], in list order; one
// thread per (g, c). With the token indices of each id listed in token order this is the CPU's scatter
// of the embedding gradient, summed in the same order, without atomics.
__global__ void sum_rows_by_list(const float* x, const int* list, const int* starts, float* out, int groups,
                                 int width, float alpha, int accumulate) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)groups * width) return;
    int g = (int)(i / width);
    int c = (int)(i % width);
    float acc = 0.0f;
    for (int q = starts[g]; q < starts[g + 1]; ++q) acc += x[(long long)list[q] * width + c];
    out[i] = accumulate ? out[i] + alpha * acc : alpha * acc;
}

// Between token-major rows (B*S x parts*N, parts 1: context, 3: fused q|k|v) and head-major blocks
// (parts x B*H x S x d_head). to_heads = 1 copies rows into heads, 0 copies back.
__global__ void split_heads(float* rows, float* heads, int batch, int seq, int n_head, int d_head, int parts,
                            int to_heads) {
    long long width = (long long)n_head * d_head;
    long long total = (long long)batch * seq * parts * width;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    long long t = i / (parts * width);
    long long col = i % (parts * width);
    long long part = col / width;
    long long h = (col % width) / d_head;
    long long d = col % d_head;
    long long b = t / seq;
    long long s = t % seq;
    long long j = (((part * batch + b) * n_head + h) * seq + s) * d_head + d;
    if (to_heads) heads[j] = rows[i]; else rows[i] = heads[j];
}

// Causal softmax of every S x S score matrix in place, one warp per row (rows = B*H*S; row i of its
// matrix keeps columns 0..=i). Entries above the diagonal become 0.
__global__ void causal_softmax(float* scores, int rows, int seq) {
    int warps_per_block = blockDim.x / 32;
    int r = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    int i = r % seq;
    float* row = scores + (long long)r * seq;
    float mx = -FLT_MAX_VALUE;
    for (int j = lane; j <= i; j += 32) mx = fmaxf(mx, row[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_down_sync(FULL_MASK, mx, o));
    mx = __shfl_sync(FULL_MASK, mx, 0);
    float total = 0.0f;
    for (int j = lane; j <= i; j += 32) { float e = expf(row[j] - mx); row[j] = e; total += e; }
    total = warp_sum_f(total);
    float inv = 1.0f / total;
    for (int j = lane; j < seq; j += 32) row[j] = j <= i ? row[j] * inv : 0.0f;
}

// Softmax backward in place on dp, one warp per row: ds = scale * p * (dp - sum_j dp_j p_j).
__global__ void causal_softmax_backward(const float* p, float* dp, int rows, int seq, float scale) {
    int warps_per_block = blockDim.x / 32;
    int r = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const float* pr = p + (long long)r * seq;
    float* dr = dp + (long long)r * seq;
    float inner = 0.0f;
    for (int j = lane; j < seq; j += 32) inner += dr[j] * pr[j];
    inner = warp_sum_f(inner);
    for (int j = lane; j < seq; j += 32) dr[j] = pr[j] * (dr[j] - inner) * scale;
}

// Next-token cross-entropy, one warp per token: loss[t] = logsumexp(logits[t]) - logits[t, y] in double,
// and d_logits[t] = (softmax(logits[t]) - onehot(y)) * inv_tokens in float.
__global__ void cross_entropy(const float* logits, const int* targets, double* loss, float* d_logits, int tokens,
                              int vocab, float inv_tokens) {
    int warps_per_block = blockDim.x / 32;
    int t = blockIdx.x * warps_per_block + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (t >= tokens) return;
    const float* row = logits + (long long)t * vocab;
    float* drow = d_logits + (long long)t * vocab;
    float mx = -FLT_MAX_VALUE;
    for (int j = lane; j < vocab; j += 32) mx = fmaxf(mx, row[j]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_down_sync(FULL_MASK, mx, o));
    mx = __shfl_sync(FULL_MASK, mx, 0);
    double sd = 0.0;
    float sf = 0.0f;
    for (int j = lane; j < vocab; j += 32) {
        sd += exp((double)row[j] - (double)mx);
        float e = expf(row[j] - mx);
        drow[j] = e;
        sf += e;
    }
    sd = warp_sum_d(sd);
    sf = warp_sum_f(sf);
    int y = targets[t];
    for (int j = lane; j < vocab; j += 32) drow[j] = drow[j] / sf * inv_tokens - (j == y ? inv_tokens : 0.0f);
    if (lane == 0) loss[t] = (double)mx + log(sd) - (double)row[y];
}

}  // extern "C"
