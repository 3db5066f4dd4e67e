//! The Monte Carlo solver of the limit (docs/theory.md §4–§6): deterministic residual-level coordinates,
//! sampled expert single sites, sampled neuron single sites inside each expert site, explicit
//! discrete-time gradient descent. Experts interact only through the global quantities computed here
//! (errors, thresholds `q_mu`, gate normalizers, MoE-output and backward coordinates).

use ndarray::{s, Array1, Array2, Array3, Array4, ArrayView1, ArrayView2, Axis};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use super::config::{SolveConfig, TieJitter};
use crate::data::Task;
use crate::model::Activation;
use crate::routing::{Gate, TieBreak};
use crate::Error;

/// Quantile levels of the expert-load summary (`load_quantiles`).
pub const LOAD_QUANTILES: [f64; 7] = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0];

/// Reported to the observer after every step of every repeat.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub repeat: usize,
    pub repeats: usize,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
}

/// The trajectory of one repeat (one independent set of sampled sites).
#[derive(Debug, Clone)]
pub struct Trace {
    /// (T+1): loss `0.5 * mean_mu sum_o (f - y)^2` at each step.
    pub loss: Vec<f64>,
    /// (T+1, P, O): predictions f_mu(t).
    pub predictions: Array3<f64>,
    /// (T+1, L+1, P, P): residual-stream kernels Phi^l_{mu nu}(t) = <h^l_mu, h^l_nu>/N, l = 0 (input layer) .. L.
    pub kernels: Array4<f64>,
    /// (T+1, L, P, P): MoE-output kernels <m^l_mu, m^l_nu>/N.
    pub moe_kernels: Array4<f64>,
    /// (T+1, L+1, P, K): residual-stream coordinates H^l_mu(t) in the orthonormal frame, so that
    /// two-time kernels are `Phi^l(t, s) = H^l(t) H^l(s)^T`.
    pub coordinates: Array4<f64>,
    /// (T, L+1, P, K): backward coordinates Delta^l_mu(t) (`N dL/dh^l_mu` in the frame; l = 0 is the
    /// input layer), whose inner products are the gradient kernels.
    pub backward_coordinates: Array4<f64>,
    /// (T+1, L, P): routing thresholds q^l_mu(t).
    pub thresholds: Array3<f64>,
    /// (T+1, L, 7): quantiles (levels [`LOAD_QUANTILES`]) over experts of the relative load
    /// `load_e / kappa`, where `load_e` is the fraction of samples routed to (and kept by) expert e
    /// (mean 1 without capacity drops).
    pub load_quantiles: Array3<f64>,
    /// (T+1, L): coefficient of variation over experts of the load.
    pub load_cv: Array2<f64>,
    /// (T+1, L): fraction of (sample, expert) assignments dropped by capacity.
    pub dropped: Array2<f64>,
}

/// One expert single site: its neuron sites (coordinates in the orthonormal frame of the span) and its
/// router coordinates.
struct Site {
    /// n_s x K: projections of the initial up-projection weights on the frame, N(0, I).
    chi: Array2<f64>,
    /// n_s x K: learned up-projection coordinates.
    up: Array2<f64>,
    /// n_s x K: learned down-projection coordinates.
    down: Array2<f64>,
    /// K: learned router coordinates (zero router at t = 0).
    router: Array1<f64>,
    /// n_s x K: projections of the initial down-projection columns on the frame, N(0, I); they enter
    /// only the subleading router field below.
    xi: Array2<f64>,
    /// K: coordinates of the subleading router field (logits of order (N n)^(-1/2) learned from the
    /// random initial down-projection). It orders experts whose leading logits tie exactly (all of
    /// them at t = 1), as the tiny logits of a finite network do.
    router_fluct: Array1<f64>,
    /// Balancing bias (selection only).
    bias: f64,
    /// Fixed per-expert draw that plays the expert index under `TieBreak::Index`.
    index_jitter: f64,
    /// P: fixed per-(sample, expert) draws for `TieJitter::Fixed`.
    fixed_jitter: Array1<f64>,
}

/// What routing decided for one block at one step (all E x P).
struct Routed {
    /// Normalized gate k * g_e (0 when inactive), before capacity drops.
    gate: Array2<f64>,
    /// 1 for kept assignments, 0 for inactive or dropped ones.
    keep: Array2<f64>,
    /// d(gate)/d(logit) factor: 1 (softmax) or 1 - sigmoid(r) (sigmoid).
    slope: Array2<f64>,
    active: Array2<bool>,
    threshold: Array1<f64>,
}

/// Deterministic parts of the problem shared by every repeat.
struct Problem<'a> {
    cfg: &'a SolveConfig,
    /// P x r: factor of Kx = x x^T / D (the inputs' coordinates in the frame).
    xc: Array2<f64>,
    kx: Array2<f64>,
    y: ArrayView2<'a, f64>,
    outputs: usize,
    /// Frame dimension K = outputs + r.
    dim: usize,
    active_sites: usize,
}

/// Solves one repeat. `repeat` selects an independent stream of random numbers.
pub(crate) fn solve_repeat(
    cfg: &SolveConfig,
    task: &Task,
    repeat: usize,
    observer: &mut Option<&mut (dyn FnMut(&Progress) + Send)>,
) -> crate::Result<Trace> {
    let problem = Problem::new(cfg, task)?;
    problem.run(repeat, observer)
}

/// A P x r factor of x x^T / D: x / sqrt(D) itself when D <= P, else from the eigendecomposition of the
/// P x P Gram (keeps the frame dimension at most P + outputs).
pub(crate) fn input_factor(x: ArrayView2<f64>) -> Array2<f64> {
    let (p, d) = x.dim();
    let scaled = x.mapv(|v| v / (d as f64).sqrt());
    if d <= p {
        return scaled;
    }
    let gram = scaled.dot(&scaled.t());
    let m = nalgebra::DMatrix::from_fn(p, p, |i, j| gram[[i, j]]);
    let eig = m.symmetric_eigen();
    Array2::from_shape_fn((p, p), |(i, j)| {
        eig.eigenvectors[(i, j)] * eig.eigenvalues[j].max(0.0).sqrt()
    })
}

fn stream_id(repeat: usize, block: usize, site: usize) -> u64 {
    ((repeat as u64) << 40) | ((block as u64) << 24) | site as u64
}

impl<'a> Problem<'a> {
    fn new(cfg: &'a SolveConfig, task: &'a Task) -> crate::Result<Self> {
        cfg.validate()?;
        let (p, _d) = task.x.dim();
        if task.y.nrows() != p {
            return Err(Error::invalid(
                "task.y",
                format!("has {} rows, expected {p} (one per point)", task.y.nrows()),
            ));
        }
        if p == 0 || task.y.ncols() == 0 {
            return Err(Error::invalid(
                "task",
                "needs at least one point and one output",
            ));
        }
        if !task.x.iter().chain(task.y.iter()).all(|v| v.is_finite()) {
            return Err(Error::invalid("task", "inputs and targets must be finite"));
        }
        let xc = input_factor(task.x.view());
        let kx = xc.dot(&xc.t());
        let outputs = task.y.ncols();
        let dim = outputs + xc.ncols();
        let active_sites = (cfg.kappa * cfg.resolution.expert_samples as f64).round() as usize;
        Ok(Problem {
            cfg,
            xc,
            kx,
            y: task.y.view(),
            outputs,
            dim,
            active_sites,
        })
    }

    fn new_sites(&self, repeat: usize, block: usize) -> Vec<Site> {
        let (ns, k, p) = (
            self.cfg.resolution.neuron_samples,
            self.dim,
            self.xc.nrows(),
        );
        (0..self.cfg.resolution.expert_samples)
            .into_par_iter()
            .map(|e| {
                let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed);
                rng.set_stream(stream_id(repeat, block, e));
                let chi =
                    Array2::from_shape_simple_fn((ns, k), || rng.sample::<f64, _>(StandardNormal));
                let xi =
                    Array2::from_shape_simple_fn((ns, k), || rng.sample::<f64, _>(StandardNormal));
                let index_jitter: f64 = rng.gen();
                let fixed_jitter = Array1::from_shape_simple_fn(p, || rng.gen::<f64>());
                Site {
                    chi,
                    up: Array2::zeros((ns, k)),
                    down: Array2::zeros((ns, k)),
                    router: Array1::zeros(k),
                    xi,
                    router_fluct: Array1::zeros(k),
                    bias: 0.0,
                    index_jitter,
                    fixed_jitter,
                }
            })
            .collect()
    }

    /// Expert-level forward of every site: router logits (P) and MoE-output coordinates zeta_e (P x K).
    fn forward_sites(
        &self,
        sites: &[Site],
        hin: &Array2<f64>,
    ) -> Vec<(Array1<f64>, Array2<f64>, Array1<f64>)> {
        let act = self.cfg.activation;
        let ns = self.cfg.resolution.neuron_samples as f64;
        sites
            .par_iter()
            .map(|site| {
                let r = hin.dot(&site.router);
                let pre = &site.chi + &site.up;
                let phi = pre.dot(&hin.t()).mapv_into(|v| act.apply(v));
                let zeta = phi.t().dot(&site.down) / ns;
                (r, zeta, hin.dot(&site.router_fluct))
            })
            .collect()
    }

    /// Top-k as a sampled quantile, ties broken by the jitter, capacity drops, gates.
    fn route(
        &self,
        sites: &[Site],
        logits: &[Array1<f64>],
        fluct: &[Array1<f64>],
        jitter: &Array2<f64>,
    ) -> Routed {
        let cfg = self.cfg;
        let (e_n, p) = (sites.len(), self.xc.nrows());
        let ks = self.active_sites;
        let mut active = Array2::from_elem((e_n, p), false);
        let mut rank = Array2::<usize>::zeros((e_n, p));
        let mut threshold = Array1::zeros(p);
        let score = |e: usize, mu: usize| logits[e][mu] + sites[e].bias;
        // Each sample's ranking is independent: sort in parallel, fill in sample order.
        let orders: Vec<Vec<usize>> = (0..p)
            .into_par_iter()
            .map(|mu| {
                let tie = |e: usize| match cfg.routing.tie_break {
                    TieBreak::Index => sites[e].index_jitter,
                    TieBreak::Random => jitter[[e, mu]],
                };
                let mut order: Vec<usize> = (0..e_n).collect();
                order.sort_by(|&a, &b| {
                    score(b, mu)
                        .partial_cmp(&score(a, mu))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then(
                            fluct[b][mu]
                                .partial_cmp(&fluct[a][mu])
                                .unwrap_or(std::cmp::Ordering::Equal),
                        )
                        .then(
                            tie(b)
                                .partial_cmp(&tie(a))
                                .unwrap_or(std::cmp::Ordering::Equal),
                        )
                        .then(a.cmp(&b))
                });
                order
            })
            .collect();
        for (mu, order) in orders.iter().enumerate() {
            for (pos, &e) in order.iter().enumerate() {
                rank[[e, mu]] = pos;
                active[[e, mu]] = pos < ks;
            }
            threshold[mu] = if ks < e_n {
                0.5 * (score(order[ks - 1], mu) + score(order[ks], mu))
            } else {
                score(order[e_n - 1], mu)
            };
        }
        // Capacity is per expert: the single site drops its own excess assignments, slot-major (by rank
        // among the sample's active experts, then by sample index), as routing::route does.
        let mut keep = active.mapv(|a| if a { 1.0 } else { 0.0 });
        if let Some(c) = cfg.routing.capacity_factor {
            let cap = (c * p as f64 * cfg.kappa).ceil() as usize;
            for e in 0..e_n {
                let mut mine: Vec<usize> = (0..p).filter(|&mu| active[[e, mu]]).collect();
                if mine.len() > cap {
                    mine.sort_by_key(|&mu| (rank[[e, mu]], mu));
                    for &mu in &mine[cap..] {
                        keep[[e, mu]] = 0.0;
                    }
                }
            }
        }
        let mut gate = Array2::zeros((e_n, p));
        let mut slope = Array2::zeros((e_n, p));
        for mu in 0..p {
            let weight = |r: f64, shift: f64| match cfg.routing.gate {
                Gate::Softmax => (r - shift).exp(),
                Gate::Sigmoid => 1.0 / (1.0 + (-r).exp()),
            };
            let shift = (0..e_n)
                .filter(|&e| active[[e, mu]])
                .map(|e| logits[e][mu])
                .fold(f64::NEG_INFINITY, f64::max);
            // Normalizer of the gates: an expectation over experts, estimated on the sampled sites.
            let norm: f64 = (0..e_n)
                .filter(|&e| active[[e, mu]])
                .map(|e| weight(logits[e][mu], shift))
                .sum::<f64>()
                / e_n as f64;
            for e in 0..e_n {
                if active[[e, mu]] {
                    let r = logits[e][mu];
                    gate[[e, mu]] = cfg.kappa * weight(r, shift) / norm;
                    slope[[e, mu]] = match cfg.routing.gate {
                        Gate::Softmax => 1.0,
                        Gate::Sigmoid => 1.0 - 1.0 / (1.0 + (-r).exp()),
                    };
                }
            }
        }
        Routed {
            gate,
            keep,
            slope,
            active,
            threshold,
        }
    }

    fn run(
        &self,
        repeat: usize,
        observer: &mut Option<&mut (dyn FnMut(&Progress) + Send)>,
    ) -> crate::Result<Trace> {
        let cfg = self.cfg;
        let (p, o, k, l_n, t_n) = (
            self.xc.nrows(),
            self.outputs,
            self.dim,
            cfg.depth,
            cfg.steps,
        );
        let e_n = cfg.resolution.expert_samples;
        let ns = cfg.resolution.neuron_samples as f64;
        let branch = 1.0 / l_n as f64;
        let lr = cfg.eta0 * cfg.gamma0 * cfg.gamma0;
        let sc = &cfg.lr_scale;

        let mut blocks: Vec<Vec<Site>> = (0..l_n).map(|l| self.new_sites(repeat, l)).collect();
        let mut jitter_rng: Vec<ChaCha8Rng> = (0..l_n)
            .map(|l| {
                let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xD1B5_4A32_D192_ED03);
                rng.set_stream(stream_id(repeat, l, (1 << 24) - 1));
                rng
            })
            .collect();
        // Readout coordinates omega (O x K) and input-layer coordinates H^0 (P x K) in the frame
        // {w_1(0), .., w_O(0), W e_1, ..} whose Gram matrix is the identity in the limit.
        let mut omega = Array2::zeros((o, k));
        for i in 0..o {
            omega[[i, i]] = 1.0;
        }
        let mut h0 = Array2::zeros((p, k));
        h0.slice_mut(s![.., o..]).assign(&self.xc);

        let mut tr = Trace {
            loss: Vec::with_capacity(t_n + 1),
            predictions: Array3::zeros((t_n + 1, p, o)),
            kernels: Array4::zeros((t_n + 1, l_n + 1, p, p)),
            moe_kernels: Array4::zeros((t_n + 1, l_n, p, p)),
            coordinates: Array4::zeros((t_n + 1, l_n + 1, p, k)),
            backward_coordinates: Array4::zeros((t_n, l_n + 1, p, k)),
            thresholds: Array3::zeros((t_n + 1, l_n, p)),
            load_quantiles: Array3::zeros((t_n + 1, l_n, LOAD_QUANTILES.len())),
            load_cv: Array2::zeros((t_n + 1, l_n)),
            dropped: Array2::zeros((t_n + 1, l_n)),
        };

        for t in 0..=t_n {
            // ---- forward: residual level is deterministic, experts are sampled sites
            let mut hs: Vec<Array2<f64>> = vec![h0.clone()];
            let mut per_block = Vec::with_capacity(l_n);
            for l in 0..l_n {
                let hin = hs[l].clone();
                let fwd = self.forward_sites(&blocks[l], &hin);
                let logits: Vec<Array1<f64>> = fwd.iter().map(|(r, _, _)| r.clone()).collect();
                let fluct: Vec<Array1<f64>> = fwd.iter().map(|(_, _, r1)| r1.clone()).collect();
                let jitter = match cfg.tie_jitter {
                    TieJitter::PerStep => {
                        let rng = &mut jitter_rng[l];
                        Array2::from_shape_simple_fn((e_n, p), || rng.gen::<f64>())
                    }
                    TieJitter::Fixed => {
                        Array2::from_shape_fn((e_n, p), |(e, mu)| blocks[l][e].fixed_jitter[mu])
                    }
                };
                let routed = self.route(&blocks[l], &logits, &fluct, &jitter);
                let mut moe = Array2::<f64>::zeros((p, k));
                for (e, (_, zeta, _)) in fwd.iter().enumerate() {
                    let w = &routed.gate.row(e) * &routed.keep.row(e);
                    moe += &(zeta * &w.insert_axis(Axis(1)));
                }
                moe /= cfg.kappa * e_n as f64;
                hs.push(&hin + &(&moe * branch));
                self.record_block(&mut tr, t, l, &routed, &moe);
                per_block.push((fwd, routed, moe));
            }
            let hl = &hs[l_n];
            let f = hl.dot(&omega.t()) / cfg.gamma0;
            let err = &f - &self.y;
            let loss = 0.5 * err.iter().map(|v| v * v).sum::<f64>() / p as f64;
            tr.loss.push(loss);
            tr.predictions.slice_mut(s![t, .., ..]).assign(&f);
            for (l, h) in hs.iter().enumerate() {
                tr.kernels
                    .slice_mut(s![t, l, .., ..])
                    .assign(&h.dot(&h.t()));
                tr.coordinates.slice_mut(s![t, l, .., ..]).assign(h);
            }
            if let Some(obs) = observer.as_mut() {
                obs(&Progress {
                    repeat,
                    repeats: cfg.resolution.repeats,
                    step: t,
                    steps: t_n,
                    loss,
                });
            }
            if !loss.is_finite() {
                return Err(Error::Diverged {
                    step: t,
                    reason: format!("loss is {loss} (repeat {repeat})"),
                });
            }
            if t == t_n {
                break;
            }

            // ---- backward: coordinates of dL/dh^l times N, from the readout down
            let gf = &err / p as f64;
            let mut delta = gf.dot(&omega) / cfg.gamma0;
            tr.backward_coordinates
                .slice_mut(s![t, l_n, .., ..])
                .assign(&delta);
            for l in (0..l_n).rev() {
                let (fwd, routed, moe) = &per_block[l];
                let hin = &hs[l];
                let switch = (cfg.routing.balance_loss != 0.0).then(|| {
                    let logits: Vec<Array1<f64>> = fwd.iter().map(|(r, _, _)| r.clone()).collect();
                    switch_logit_grad(&logits, &routed.active, cfg.kappa, cfg.routing.balance_loss / (branch * p as f64))
                });
                let contribs: Vec<Array2<f64>> = blocks[l]
                    .par_iter_mut()
                    .enumerate()
                    .map(|(e, site)| {
                        self.site_backward(
                            site,
                            hin,
                            &delta,
                            fwd[e].1.view(),
                            moe.view(),
                            routed.gate.row(e),
                            routed.keep.row(e),
                            routed.slope.row(e),
                            switch.as_ref().map(|g| g.row(e)),
                            [lr * sc.router, lr * sc.expert_up, lr * sc.expert_down],
                            ns,
                        )
                    })
                    .collect();
                let mut total = Array2::<f64>::zeros((p, k));
                for c in &contribs {
                    total += c;
                }
                // Balancing bias: each site compares its own kept load with the mean kept load (kappa
                // without capacity drops), as routing::update_bias does.
                if cfg.routing.bias_update_rate > 0.0 {
                    let loads: Vec<f64> = (0..e_n)
                        .map(|e| routed.keep.row(e).sum() / p as f64)
                        .collect();
                    let target = loads.iter().sum::<f64>() / e_n as f64;
                    for (site, load) in blocks[l].iter_mut().zip(&loads) {
                        let d = target - load;
                        if d != 0.0 {
                            site.bias += cfg.routing.bias_update_rate * d.signum();
                        }
                    }
                }
                delta = &delta + &(total * (branch / (cfg.kappa * e_n as f64)));
                tr.backward_coordinates
                    .slice_mut(s![t, l, .., ..])
                    .assign(&delta);
            }
            // Input layer: h^0_nu += -lr sum_mu Kx_{mu nu} Gamma_mu; readout: omega += -eta0 gamma0 gf^T h^L.
            let dh0 = self.kx.dot(&delta) * (lr * sc.embedding);
            let domega = gf.t().dot(hl) * (cfg.eta0 * cfg.gamma0 * sc.readout);
            h0 -= &dh0;
            omega -= &domega;
        }
        Ok(tr)
    }

    /// Backward pass and SGD update of one expert site; returns its contribution (P x K, before the
    /// 1/(kappa E) average) to the backward coordinates of the block's input.
    #[allow(clippy::too_many_arguments)]
    fn site_backward(
        &self,
        site: &mut Site,
        hin: &Array2<f64>,
        delta: &Array2<f64>,
        zeta: ArrayView2<f64>,
        moe: ArrayView2<f64>,
        gate: ArrayView1<f64>,
        keep: ArrayView1<f64>,
        slope: ArrayView1<f64>,
        switch: Option<ArrayView1<f64>>,
        [lr_router, lr_up, lr_down]: [f64; 3],
        ns: f64,
    ) -> Array2<f64> {
        let act: Activation = self.cfg.activation;
        let p = hin.nrows();
        let geff = &gate * &keep;
        let pre = &site.chi + &site.up;
        let u = pre.dot(&hin.t());
        let phi = u.mapv(|v| act.apply(v));
        // Backward field of each neuron: beta_{i mu} = nu_i . delta_mu, gated.
        let mut grad_u = site.down.dot(&delta.t());
        ndarray::Zip::from(&mut grad_u)
            .and(&u)
            .for_each(|g, &uu| *g *= act.derivative(uu));
        grad_u *= &geff.view().insert_axis(Axis(0));
        let mut contrib = grad_u.t().dot(&pre) / ns;
        // Router: d m / d r_e = g_e * slope * (keep z_e - m).
        let mut eps = Array1::<f64>::zeros(p);
        for mu in 0..p {
            if gate[mu] != 0.0 {
                let diff = &zeta.row(mu) * keep[mu] - &moe.row(mu);
                eps[mu] = gate[mu] * slope[mu] * diff.dot(&delta.row(mu));
            }
        }
        if let Some(g) = switch {
            eps += &g;
        }
        for mu in 0..p {
            if eps[mu] != 0.0 {
                contrib.row_mut(mu).scaled_add(eps[mu], &site.router);
            }
        }
        let phi_gated = phi * &geff.view().insert_axis(Axis(0));
        let d_down = phi_gated.dot(delta);
        let d_up = grad_u.dot(hin);
        let d_router = hin.t().dot(&eps);
        if lr_router != 0.0 {
            // Subleading router field: the same gradient with z_e replaced by its random part
            // V_e(0) phi / n, whose projection on delta_mu is (Nn)^(-1/2) sum_i phi_i (xi_i . delta_mu).
            let mut field = site.xi.dot(&delta.t());
            field *= &phi_gated;
            let g1 = field.sum_axis(Axis(0)) / ns.sqrt();
            let eps1 = &g1 * &slope;
            site.router_fluct
                .scaled_add(-lr_router, &hin.t().dot(&eps1));
        }
        site.down.scaled_add(-lr_down, &d_down);
        site.up.scaled_add(-lr_up, &d_up);
        site.router.scaled_add(-lr_router, &d_router);
        contrib
    }

    fn record_block(&self, tr: &mut Trace, t: usize, l: usize, routed: &Routed, moe: &Array2<f64>) {
        let (e_n, p) = routed.active.dim();
        let kappa = self.cfg.kappa;
        tr.thresholds
            .slice_mut(s![t, l, ..])
            .assign(&routed.threshold);
        tr.moe_kernels
            .slice_mut(s![t, l, .., ..])
            .assign(&moe.dot(&moe.t()));
        // Loads count kept assignments, like routing::LoadStats.
        let mut rel: Vec<f64> = (0..e_n)
            .map(|e| routed.keep.row(e).sum() / p as f64 / kappa)
            .collect();
        rel.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        for (i, &lev) in LOAD_QUANTILES.iter().enumerate() {
            tr.load_quantiles[[t, l, i]] = quantile_sorted(&rel, lev);
        }
        let mean = rel.iter().sum::<f64>() / e_n as f64;
        let var = rel.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / e_n as f64;
        tr.load_cv[[t, l]] = if mean > 0.0 { var.sqrt() / mean } else { 0.0 };
        let assigned = routed.active.iter().filter(|&&a| a).count() as f64;
        let kept = routed.keep.sum();
        tr.dropped[[t, l]] = if assigned > 0.0 {
            (assigned - kept) / assigned
        } else {
            0.0
        };
    }
}

/// Gradient of the Switch balance loss `alpha M sum_e f_e P_e` on the router logits, in the units of the
/// sites' router gradient (`kappa M / beta` times the finite network's dL/dr_e,mu; docs/theory.md §6,
/// `switch_logit_grad`): `scale * kappa * pi_e,mu (l_e - E_e'[l_e' pi_e',mu])`, with `l_e` the selected
/// load over kappa (f_e M), `pi_e,mu = exp(r_e,mu) / E_e'[exp(r_e',mu)]` the softmax over all experts
/// times M, and `scale = alpha / (beta P)`. Returns E x P.
pub(crate) fn switch_logit_grad(logits: &[Array1<f64>], active: &Array2<bool>, kappa: f64, scale: f64) -> Array2<f64> {
    let (e_n, p) = active.dim();
    let load: Vec<f64> =
        (0..e_n).map(|e| active.row(e).iter().filter(|&&a| a).count() as f64 / (p as f64 * kappa)).collect();
    let mut out = Array2::zeros((e_n, p));
    for mu in 0..p {
        let mx = (0..e_n).map(|e| logits[e][mu]).fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = (0..e_n).map(|e| (logits[e][mu] - mx).exp()).collect();
        let z = w.iter().sum::<f64>() / e_n as f64;
        let pi: Vec<f64> = w.iter().map(|v| v / z).collect();
        let mean_lpi = (0..e_n).map(|e| load[e] * pi[e]).sum::<f64>() / e_n as f64;
        for e in 0..e_n {
            out[[e, mu]] = scale * kappa * pi[e] * (load[e] - mean_lpi);
        }
    }
    out
}

/// Linear-interpolation quantile of sorted data.
pub(crate) fn quantile_sorted(sorted: &[f64], level: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = level * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{aux_losses, route, RoutingConfig};

    /// The solver's Switch-loss logit gradient is the finite network's (`routing::aux_losses`) in the
    /// sites' units: `kappa M / beta` times dL/dr, here with beta = 1.
    #[test]
    fn switch_gradient_matches_the_finite_layer() {
        let (m, p, k, alpha) = (32, 12, 8, 0.3);
        let kappa = k as f64 / m as f64;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let logits = Array2::from_shape_fn((p, m), |_| 0.7 * rng.sample::<f64, _>(StandardNormal));
        let cfg = RoutingConfig { balance_loss: alpha, ..RoutingConfig::default() };
        let routing = route(logits.view(), Array1::zeros(m).view(), k, &cfg, &mut rng).unwrap();
        let (_, finite) = aux_losses(logits.view(), &routing, &cfg);
        let mut active = Array2::from_elem((m, p), false);
        for t in 0..p {
            for j in 0..k {
                active[[routing.selected[[t, j]], t]] = true;
            }
        }
        let per_expert: Vec<Array1<f64>> = (0..m).map(|e| logits.column(e).to_owned()).collect();
        let sites = switch_logit_grad(&per_expert, &active, kappa, alpha / p as f64);
        for e in 0..m {
            for t in 0..p {
                let want = kappa * m as f64 * finite[[t, e]];
                assert!((sites[[e, t]] - want).abs() < 1e-12 * (1.0 + want.abs()), "e {e} t {t}: {} vs {want}", sites[[e, t]]);
            }
        }
        assert!(sites.iter().any(|v| v.abs() > 1e-3), "a non-trivial gradient");
    }
}
