//! Causal multi-head self-attention of the MoE-Transformer: fused query/key/value projection (group
//! `attn_qkv`, 3N x N), output projection (group `attn_out`, N x N), logits scaled by
//! `logit_multiplier / d_head` (muP: query-key products of aligned O(1) vectors grow like d_head, so
//! 1/d_head keeps them Theta(1) as width grows, where 1/sqrt(d_head) would not).
//!
//! Work is split over (sequence, head) pairs with rayon; each pair writes its own slice, so the result
//! does not depend on the thread count. The large projections use [`par_matmul`], which splits output
//! rows over threads (no reductions across threads).

use ndarray::linalg::general_mat_mul;
use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use super::Real;

/// Shape of the attention: heads and the base factor of the logit scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    pub n_head: usize,
    /// Logits are `logit_multiplier * q . k / d_head`.
    pub logit_multiplier: f64,
}

/// Weights and forward multipliers of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionWeights<'a, F> {
    /// Fused projection (3N x N): rows `0..N` queries, `N..2N` keys, `2N..3N` values.
    pub qkv: ArrayView2<'a, F>,
    /// Output projection (N x N).
    pub out: ArrayView2<'a, F>,
    pub qkv_multiplier: f64,
    pub out_multiplier: f64,
}

/// What the backward pass needs.
#[derive(Debug, Clone)]
pub struct AttentionCache<F> {
    batch: usize,
    seq: usize,
    /// Input tokens (B*T x N).
    input: Array2<F>,
    /// Projected queries, keys, values, multiplier included (B*T x 3N).
    qkv: Array2<F>,
    /// Attention probabilities per (sequence, head) pair, index `b * n_head + h` (T x T, causal).
    probs: Vec<Array2<F>>,
    /// Concatenated head outputs before the output projection (B*T x N).
    context: Array2<F>,
}

impl<F: Real> AttentionCache<F> {
    /// Head outputs before the output projection (B*T x N), for diagnostics.
    pub fn context(&self) -> ArrayView2<'_, F> {
        self.context.view()
    }
}

/// Gradients of one attention layer.
#[derive(Debug, Clone)]
pub struct AttentionGrads<F> {
    pub qkv: Array2<F>,
    pub out: Array2<F>,
}

/// `a @ b` with the output rows split over the rayon pool: every output row comes from one BLAS call
/// over the full inner dimension, so no sum crosses threads.
pub fn par_matmul<F: Real>(a: ArrayView2<F>, b: ArrayView2<F>) -> Array2<F> {
    par_matmul_scaled(1.0, a, b)
}

/// `alpha * a @ b` like [`par_matmul`]; the factor rides on the GEMM instead of a second pass.
pub fn par_matmul_scaled<F: Real>(alpha: f64, a: ArrayView2<F>, b: ArrayView2<F>) -> Array2<F> {
    let (rows, cols) = (a.nrows(), b.ncols());
    let alpha = F::of(alpha);
    let mut c = Array2::<F>::zeros((rows, cols));
    let threads = rayon::current_num_threads().max(1);
    // Small products are not worth the fork.
    if threads == 1 || rows * cols * a.ncols() < 1 << 16 {
        general_mat_mul(alpha, &a, &b, F::zero(), &mut c);
        return c;
    }
    let chunk = rows.div_ceil(threads).max(1);
    c.axis_chunks_iter_mut(Axis(0), chunk)
        .into_par_iter()
        .zip(a.axis_chunks_iter(Axis(0), chunk).into_par_iter())
        .for_each(|(mut c_rows, a_rows)| general_mat_mul(alpha, &a_rows, &b, F::zero(), &mut c_rows));
    c
}

fn check_shapes<F>(w: &AttentionWeights<F>, cfg: &AttentionConfig, width: usize) {
    assert_eq!(w.qkv.dim(), (3 * width, width), "attn_qkv must be 3N x N");
    assert_eq!(w.out.dim(), (width, width), "attn_out must be N x N");
    assert!(
        cfg.n_head > 0 && width % cfg.n_head == 0,
        "n_head must divide the width"
    );
}

/// Causal softmax of `scores` (T x T) in place; entries above the diagonal become 0.
fn causal_softmax<F: Real>(scores: &mut Array2<F>) {
    for (i, mut row) in scores.rows_mut().into_iter().enumerate() {
        let max = row.slice(s![..=i]).fold(F::neg_infinity(), |m, &v| m.max(v));
        let mut total = F::zero();
        for v in row.slice_mut(s![..=i]).iter_mut() {
            *v = (*v - max).exp();
            total = total + *v;
        }
        let inv = total.recip();
        row.slice_mut(s![..=i]).mapv_inplace(|v| v * inv);
        row.slice_mut(s![i + 1..]).fill(F::zero());
    }
}

/// Forward pass on `x` (B x T x N). Returns the layer output (B x T x N) and the cache.
pub fn attention_forward<F: Real>(
    w: &AttentionWeights<F>,
    cfg: &AttentionConfig,
    x: ArrayView3<F>,
) -> (Array3<F>, AttentionCache<F>) {
    let (batch, seq, width) = x.dim();
    check_shapes(w, cfg, width);
    let (n_head, d_head) = (cfg.n_head, width / cfg.n_head);
    let scale = F::of(cfg.logit_multiplier / d_head as f64);
    let input = x
        .to_shape((batch * seq, width))
        .expect("contiguous tokens")
        .into_owned();
    let qkv = par_matmul_scaled(w.qkv_multiplier, input.view(), w.qkv.t());

    let pairs: Vec<(Array2<F>, Array2<F>)> = (0..batch * n_head)
        .into_par_iter()
        .map(|pair| {
            let (b, h) = (pair / n_head, pair % n_head);
            let rows = b * seq..(b + 1) * seq;
            let q = qkv.slice(s![rows.clone(), h * d_head..(h + 1) * d_head]);
            let k = qkv.slice(s![rows.clone(), width + h * d_head..width + (h + 1) * d_head]);
            let v = qkv.slice(s![rows, 2 * width + h * d_head..2 * width + (h + 1) * d_head]);
            let mut probs = Array2::<F>::zeros((seq, seq));
            general_mat_mul(scale, &q, &k.t(), F::zero(), &mut probs);
            causal_softmax(&mut probs);
            let head_out = probs.dot(&v);
            (probs, head_out)
        })
        .collect();

    let mut context = Array2::<F>::zeros((batch * seq, width));
    let mut probs = Vec::with_capacity(pairs.len());
    for (pair, (p, head_out)) in pairs.into_iter().enumerate() {
        let (b, h) = (pair / n_head, pair % n_head);
        context
            .slice_mut(s![b * seq..(b + 1) * seq, h * d_head..(h + 1) * d_head])
            .assign(&head_out);
        probs.push(p);
    }
    let out = par_matmul_scaled(w.out_multiplier, context.view(), w.out.t());
    let out = out.into_shape_with_order((batch, seq, width)).expect("standard layout");
    (
        out,
        AttentionCache {
            batch,
            seq,
            input,
            qkv,
            probs,
            context,
        },
    )
}

/// Backward pass: returns `dL/dx` (B x T x N) and the weight gradients.
pub fn attention_backward<F: Real>(
    w: &AttentionWeights<F>,
    cfg: &AttentionConfig,
    cache: &AttentionCache<F>,
    grad_y: ArrayView3<F>,
) -> (Array3<F>, AttentionGrads<F>) {
    let (batch, seq) = (cache.batch, cache.seq);
    let width = cache.input.ncols();
    let (n_head, d_head) = (cfg.n_head, width / cfg.n_head);
    let scale = F::of(cfg.logit_multiplier / d_head as f64);
    let grad_y = grad_y.to_shape((batch * seq, width)).expect("contiguous tokens");

    let grad_out_w = par_matmul_scaled(w.out_multiplier, grad_y.t(), cache.context.view());
    let grad_context = par_matmul_scaled(w.out_multiplier, grad_y.view(), w.out);

    let pairs: Vec<(Array2<F>, Array2<F>, Array2<F>)> = (0..batch * n_head)
        .into_par_iter()
        .map(|pair| {
            let (b, h) = (pair / n_head, pair % n_head);
            let rows = b * seq..(b + 1) * seq;
            let q = cache.qkv.slice(s![rows.clone(), h * d_head..(h + 1) * d_head]);
            let k = cache
                .qkv
                .slice(s![rows.clone(), width + h * d_head..width + (h + 1) * d_head]);
            let v = cache
                .qkv
                .slice(s![rows.clone(), 2 * width + h * d_head..2 * width + (h + 1) * d_head]);
            let d_head_out = grad_context.slice(s![rows, h * d_head..(h + 1) * d_head]);
            let probs = &cache.probs[pair];
            let dv = probs.t().dot(&d_head_out);
            let mut dscores = d_head_out.dot(&v.t());
            // Softmax backward row by row: dS = P * (dP - sum_j dP_j P_j); masked entries have P = 0.
            for (mut d_row, p_row) in dscores.rows_mut().into_iter().zip(probs.rows()) {
                let inner = d_row
                    .iter()
                    .zip(p_row.iter())
                    .fold(F::zero(), |acc, (&d, &p)| acc + d * p);
                d_row.zip_mut_with(&p_row, |d, &p| *d = p * (*d - inner) * scale);
            }
            let dq = dscores.dot(&k);
            let dk = dscores.t().dot(&q);
            (dq, dk, dv)
        })
        .collect();

    let mut grad_qkv = Array2::<F>::zeros((batch * seq, 3 * width));
    for (pair, (dq, dk, dv)) in pairs.into_iter().enumerate() {
        let (b, h) = (pair / n_head, pair % n_head);
        let rows = b * seq..(b + 1) * seq;
        grad_qkv
            .slice_mut(s![rows.clone(), h * d_head..(h + 1) * d_head])
            .assign(&dq);
        grad_qkv
            .slice_mut(s![rows.clone(), width + h * d_head..width + (h + 1) * d_head])
            .assign(&dk);
        grad_qkv
            .slice_mut(s![rows, 2 * width + h * d_head..2 * width + (h + 1) * d_head])
            .assign(&dv);
    }
    let grad_qkv_w = par_matmul_scaled(w.qkv_multiplier, grad_qkv.t(), cache.input.view());
    let grad_x = par_matmul_scaled(w.qkv_multiplier, grad_qkv.view(), w.qkv);
    let grad_x = grad_x
        .into_shape_with_order((batch, seq, width))
        .expect("standard layout");
    (
        grad_x,
        AttentionGrads {
            qkv: grad_qkv_w,
            out: grad_out_w,
        },
    )
}
