//! Component checks of the GPU backend (`moe-dmft gpu selftest`). Each piece runs against its CPU
//! counterpart on small random inputs, so a failure in the whole-model check (`gpu check`) can be traced
//! to a piece in the same device call:
//! - the row-major cuBLAS wrapper, in all four transpose combinations, against ndarray;
//! - routing (top-k, prototypes, both gate kinds, random and index ties, capacity) against
//!   [`crate::routing::route`] with the same random draws.

use ndarray::Array2;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::device::{Gpu, NULL};
use crate::cuda_launch;
use crate::routing::{route, Gate, RoutingConfig, TieBreak};

/// One component check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelfTest {
    pub name: String,
    /// Largest absolute difference (products, gates) or number of mismatches (selections, drops).
    pub error: f64,
    pub passed: bool,
}

fn random(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || {
        let z: f64 = StandardNormal.sample(rng);
        z as f32
    })
}

fn flat(a: &Array2<f32>) -> Vec<f32> {
    a.as_standard_layout().iter().copied().collect()
}

fn gemm_case(gpu: &Gpu, ta: bool, tb: bool, rng: &mut ChaCha8Rng) -> crate::Result<SelfTest> {
    let (m, n, k) = (5, 7, 3);
    let a = if ta { random(k, m, rng) } else { random(m, k, rng) };
    let b = if tb { random(n, k, rng) } else { random(k, n, rng) };
    let c0 = random(m, n, rng);
    let op_a = if ta { a.t().to_owned() } else { a.clone() };
    let op_b = if tb { b.t().to_owned() } else { b.clone() };
    let (alpha, beta) = (0.5f32, 2.0f32);
    let expected = op_a.dot(&op_b) * alpha + &c0 * beta;
    let da = gpu.upload(&flat(&a))?;
    let db = gpu.upload(&flat(&b))?;
    let mut dc = gpu.upload(&flat(&c0))?;
    gpu.gemm(ta, tb, (m, n, k), alpha, &da.slice(..), a.ncols(), &db.slice(..), b.ncols(), beta, &mut dc.slice_mut(..), n)?;
    let got = gpu.download(&dc, m * n)?;
    let error = expected.iter().zip(&got).map(|(e, g)| (e - g).abs() as f64).fold(0.0, f64::max);
    Ok(SelfTest { name: format!("gemm ta={ta} tb={tb}"), error, passed: error < 1e-4 })
}

fn routing_case(gpu: &Gpu, cfg: &RoutingConfig, label: &str, seed: u64) -> crate::Result<Vec<SelfTest>> {
    let (tokens, experts, active) = (37usize, 8usize, 4usize);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Logits on a coarse grid so that exact ties occur; a small random bias shifts selection only.
    let logits: Array2<f32> = Array2::from_shape_simple_fn((tokens, experts), || (rng.gen_range(-3i32..=3) as f32) * 0.5);
    let bias: Vec<f32> = (0..experts).map(|e| if e % 3 == 0 { 0.5 } else { 0.0 }).collect();
    let logits64 = logits.mapv(|v| v as f64);
    let bias64 = ndarray::Array1::from(bias.iter().map(|&b| b as f64).collect::<Vec<_>>());
    let mut cpu_rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let cpu = route(logits64.view(), bias64.view(), active, cfg, &mut cpu_rng)?;

    let mut dev_rng = ChaCha8Rng::seed_from_u64(seed + 1);
    let jitter: Option<Vec<u64>> = match cfg.tie_break {
        TieBreak::Random => Some((0..tokens * experts).map(|_| dev_rng.gen::<u64>()).collect()),
        TieBreak::Index => None,
    };
    let dl = gpu.upload(&flat(&logits))?;
    let db = gpu.upload(&bias)?;
    let mut selected = gpu.zeros::<i32>(tokens * active)?;
    let mut gates = gpu.zeros::<f32>(tokens * active)?;
    let mut sig = gpu.zeros::<f32>(tokens * active)?;
    let mut sig_sum = gpu.zeros::<f32>(tokens)?;
    let gate_kind: i32 = if cfg.gate == Gate::Softmax { 0 } else { 1 };
    let (t_i, m_i, k_i, z_i) = (tokens as i32, experts as i32, active as i32, cfg.prototypes as i32);
    match &jitter {
        Some(j) => {
            let dj = gpu.upload(j)?;
            cuda_launch!(gpu, "route_topk", Gpu::per_item(tokens), &dl, &db, &dj, &t_i, &m_i, &k_i, &z_i, &gate_kind, &mut selected, &mut gates, &mut sig, &mut sig_sum)?
        }
        None => cuda_launch!(gpu, "route_topk", Gpu::per_item(tokens), &dl, &db, &NULL, &t_i, &m_i, &k_i, &z_i, &gate_kind, &mut selected, &mut gates, &mut sig, &mut sig_sum)?,
    }
    let capacity: i32 = cfg.capacity(tokens, experts, active).map(|c| c as i32).unwrap_or(-1);
    let mut kept = gpu.zeros::<i32>(tokens * active)?;
    let mut count_sel = gpu.zeros::<i32>(experts)?;
    let mut count_kept = gpu.zeros::<i32>(experts)?;
    cuda_launch!(gpu, "expert_counts", Gpu::per_item(experts), &selected, &t_i, &k_i, &m_i, &capacity, &mut kept, &mut count_sel, &mut count_kept)?;
    let sel = gpu.download(&selected, tokens * active)?;
    let gts = gpu.download(&gates, tokens * active)?;
    let kp = gpu.download(&kept, tokens * active)?;
    let mut sel_mismatch = 0usize;
    let mut kept_mismatch = 0usize;
    let mut gate_err = 0.0f64;
    for t in 0..tokens {
        for j in 0..active {
            let i = t * active + j;
            sel_mismatch += usize::from(sel[i] as usize != cpu.selected[[t, j]]);
            kept_mismatch += usize::from((kp[i] != 0) != cpu.kept[[t, j]]);
            gate_err = gate_err.max((gts[i] as f64 - cpu.gates[[t, j]]).abs());
        }
    }
    Ok(vec![
        SelfTest { name: format!("routing {label}: selections"), error: sel_mismatch as f64, passed: sel_mismatch == 0 },
        SelfTest { name: format!("routing {label}: capacity drops"), error: kept_mismatch as f64, passed: kept_mismatch == 0 },
        SelfTest { name: format!("routing {label}: gates"), error: gate_err, passed: gate_err < 1e-6 },
    ])
}

/// Runs every component check on `gpu`.
pub fn run(gpu: &Gpu) -> crate::Result<Vec<SelfTest>> {
    let mut out = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        out.push(gemm_case(gpu, ta, tb, &mut rng)?);
    }
    let base = RoutingConfig::default();
    let cases = [
        ("softmax, random ties", base.clone()),
        ("sigmoid, index ties", RoutingConfig { gate: Gate::Sigmoid, tie_break: TieBreak::Index, ..base.clone() }),
        ("2 prototypes, capacity 1.0", RoutingConfig { prototypes: 2, capacity_factor: Some(1.0), ..base.clone() }),
        ("capacity 0.5, index ties", RoutingConfig { capacity_factor: Some(0.5), tie_break: TieBreak::Index, ..base.clone() }),
    ];
    for (i, (label, cfg)) in cases.iter().enumerate() {
        out.extend(routing_case(gpu, cfg, label, 100 + i as u64)?);
    }
    Ok(out)
}
