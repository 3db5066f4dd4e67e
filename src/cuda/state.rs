//! Device copies of a model's parameters, their gradients and the optimizer's moments, aligned with the
//! host [`ParamStore`], and the optimizer update on the device (SGD or AdamW with every group's
//! hyperparameters, the same arithmetic as [`crate::train::optim`]).

use std::sync::{Mutex, MutexGuard};

use cudarc::driver::{CudaSlice, CudaViewMut};
use ndarray::{ArrayD, IxDyn};

use super::device::{cu, Gpu};
use crate::cuda_launch;
use crate::model::{Grads, Model, ParamStore};
use crate::param::{Optimizer, Resolved};
use crate::routing::LoadStats;
use crate::train::optim::{param_hps, ParamHp};
use crate::Error;

/// Where tensor `name` sits in `store`.
pub fn position(store: &ParamStore<f32>, name: &str) -> crate::Result<usize> {
    store.index_of(name).ok_or_else(|| Error::Internal(format!("cuda: tensor `{name}` missing from the store")))
}

/// The device state behind a model's lock (the [`crate::model::Model`] methods take `&self`).
pub fn lock(state: &Mutex<DeviceParams>) -> crate::Result<MutexGuard<'_, DeviceParams>> {
    state.lock().map_err(|_| Error::Internal("cuda: device state poisoned by an earlier failure".into()))
}

/// The device state of a model held mutably.
pub fn get_mut(state: &mut Mutex<DeviceParams>) -> crate::Result<&mut DeviceParams> {
    state.get_mut().map_err(|_| Error::Internal("cuda: device state poisoned by an earlier failure".into()))
}

/// Before the host store of a device model is edited (the host optimizer, the balancing biases): brings it
/// up to date if the device is ahead, and has the next [`DeviceParams::upload`] copy it. `store_mut` cannot
/// fail, so a failed download is reported on stderr; the edit then applies to the last copy.
pub fn before_host_edit(state: &mut Mutex<DeviceParams>, g: &Gpu, store: &mut ParamStore<f32>) {
    match get_mut(state) {
        Ok(st) => {
            if st.device_ahead {
                if let Err(e) = st.download_into(g, store) {
                    eprintln!("warning: {e}");
                }
            }
            st.host_ahead = true;
        }
        Err(e) => eprintln!("warning: {e}"),
    }
}

/// The update half of a device step, shared by the GPU models: the optimizer on the device gradients
/// ([`DeviceParams::optimizer_step`]), then the balancing biases at `bias_ids` (empty without
/// bias balancing), which the host model's `after_step` moves on the host and which are copied up.
#[allow(clippy::too_many_arguments)]
pub fn update(
    state: &mut Mutex<DeviceParams>,
    g: &Gpu,
    host: &mut dyn Model<f32>,
    hp: &Resolved,
    (lr_factor, betas, grad_scale): (f64, (f64, f64), f64),
    measure: bool,
    load: &[LoadStats],
    bias_ids: &[usize],
) -> crate::Result<Vec<f64>> {
    let st = get_mut(state)?;
    let update_sq = st.optimizer_step(g, host.store(), hp, lr_factor, betas, grad_scale, measure)?;
    if !bias_ids.is_empty() {
        host.after_step(load);
        for &i in bias_ids {
            st.upload_one(g, host.store(), i)?;
        }
    }
    g.sync()?;
    Ok(update_sq)
}

/// Row-major entries of a tensor.
pub fn flat(a: &ArrayD<f32>) -> Vec<f32> {
    a.as_standard_layout().iter().copied().collect()
}

/// Adam's first and second moments on the device, aligned with the parameters.
type Moments = (Vec<CudaSlice<f32>>, Vec<CudaSlice<f32>>);

/// Entries per partial sum of [`DeviceParams::sums_of_squares`] (one warp each).
const CHUNK: usize = 4096;

/// Parameters, gradients and (once [`Self::optimizer_step`] has run with Adam) moments on the device.
///
/// Which copy is current: after a device update ([`Self::optimizer_step`]) the device is ahead of the host
/// store until [`Self::download_into`]; after a host edit (the model's `store_mut`) the host is ahead until
/// [`Self::upload`]. Never both, except after a failed download in [`before_host_edit`], when the host's
/// copy wins at the next upload.
pub struct DeviceParams {
    pub params: Vec<CudaSlice<f32>>,
    pub grads: Vec<CudaSlice<f32>>,
    moments: Option<Moments>,
    adam_steps: u64,
    host_ahead: bool,
    device_ahead: bool,
    /// A parameter before its update (for the update's norm), as long as the largest tensor.
    scratch: Option<CudaSlice<f32>>,
}

impl DeviceParams {
    /// Uploads every tensor of `store`, with zeroed gradients.
    pub fn new(g: &Gpu, store: &ParamStore<f32>) -> crate::Result<Self> {
        let mut params = Vec::with_capacity(store.params.len());
        let mut grads = Vec::with_capacity(store.params.len());
        for p in &store.params {
            params.push(g.upload(&flat(&p.value))?);
            grads.push(g.zeros::<f32>(p.value.len())?);
        }
        Ok(DeviceParams { params, grads, moments: None, adam_steps: 0, host_ahead: false, device_ahead: false, scratch: None })
    }

    /// Copies every host tensor to the device if the host store was edited since the last copy.
    pub fn upload(&mut self, g: &Gpu, store: &ParamStore<f32>) -> crate::Result<()> {
        if !self.host_ahead {
            return Ok(());
        }
        for (p, d) in store.params.iter().zip(self.params.iter_mut()) {
            g.upload_into(&flat(&p.value), d)?;
        }
        (self.host_ahead, self.device_ahead) = (false, false);
        Ok(())
    }

    /// Copies tensor `i` of `store` to the device (the balancing biases after a host update).
    pub fn upload_one(&mut self, g: &Gpu, store: &ParamStore<f32>, i: usize) -> crate::Result<()> {
        g.upload_into(&flat(&store.params[i].value), &mut self.params[i])
    }

    /// Copies the device parameters into `store`.
    pub fn download_into(&mut self, g: &Gpu, store: &mut ParamStore<f32>) -> crate::Result<()> {
        for (p, d) in store.params.iter_mut().zip(self.params.iter()) {
            let v = g.download(d, p.value.len())?;
            p.value = ArrayD::from_shape_vec(IxDyn(p.value.shape()), v)
                .map_err(|e| Error::Internal(format!("cuda: parameter shape: {e}")))?;
        }
        self.device_ahead = false;
        Ok(())
    }

    /// Sum of squares of every gradient and of every parameter, in store order: chunks of [`CHUNK`]
    /// entries summed on the device, the chunks in f64 on the host (one download for all).
    pub fn sums_of_squares(&self, g: &Gpu) -> crate::Result<(Vec<f64>, Vec<f64>)> {
        let lens: Vec<usize> = self.params.iter().map(|p| p.len()).collect();
        let total = chunk_offsets(&lens);
        let n = total[lens.len()];
        let mut partial = g.zeros::<f64>(2 * n)?;
        for (i, &len) in lens.iter().enumerate() {
            chunk_sumsq(g, &self.grads[i], None, &mut partial.slice_mut(total[i]..total[i + 1]), len)?;
            chunk_sumsq(g, &self.params[i], None, &mut partial.slice_mut(n + total[i]..n + total[i + 1]), len)?;
        }
        let host = g.download(&partial, 2 * n)?;
        Ok((tensor_sums(&host[..n], &total), tensor_sums(&host[n..], &total)))
    }

    /// The device gradients as host tensors shaped like `store`'s.
    pub fn grads_to_host(&self, g: &Gpu, store: &ParamStore<f32>) -> crate::Result<Grads<f32>> {
        let mut grads: Grads<f32> = Vec::with_capacity(self.grads.len());
        for (p, d) in store.params.iter().zip(self.grads.iter()) {
            let v = g.download(d, p.value.len())?;
            grads.push(
                ArrayD::from_shape_vec(IxDyn(p.value.shape()), v)
                    .map_err(|e| Error::Internal(format!("cuda: gradient shape: {e}")))?,
            );
        }
        Ok(grads)
    }

    /// One SGD or AdamW update (by `hp`'s optimizer) of every unfrozen tensor with its group's lr times
    /// `lr_factor`, from the device gradients times `grad_scale`. With `measure`, returns each tensor's sum
    /// of squared update in store order (zero for frozen ones); without, an empty list.
    #[allow(clippy::too_many_arguments)]
    pub fn optimizer_step(
        &mut self,
        g: &Gpu,
        store: &ParamStore<f32>,
        hp: &Resolved,
        lr_factor: f64,
        (beta1, beta2): (f64, f64),
        grad_scale: f64,
        measure: bool,
    ) -> crate::Result<Vec<f64>> {
        let hps: Vec<ParamHp> = param_hps(store, hp)?;
        let sizes: Vec<usize> = store.params.iter().map(|p| p.value.len()).collect();
        let adam = hp.optimizer == Optimizer::Adam;
        if adam && self.moments.is_none() {
            let mut mm = Vec::with_capacity(sizes.len());
            let mut vv = Vec::with_capacity(sizes.len());
            for &len in &sizes {
                mm.push(g.zeros::<f32>(len)?);
                vv.push(g.zeros::<f32>(len)?);
            }
            self.moments = Some((mm, vv));
        }
        if adam {
            self.adam_steps += 1;
        }
        let t = self.adam_steps as i32;
        let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let offsets = chunk_offsets(&sizes);
        let mut partial = if measure { Some(g.zeros::<f64>(offsets[sizes.len()])?) } else { None };
        if measure && self.scratch.is_none() {
            self.scratch = Some(g.zeros::<f32>(sizes.iter().copied().max().unwrap_or(1))?);
        }
        self.device_ahead = true;
        let DeviceParams { params, grads, moments, scratch, .. } = self;
        for i in 0..params.len() {
            let hp = hps[i];
            if hp.frozen || sizes[i] == 0 {
                continue;
            }
            if let (Some(_), Some(old)) = (&partial, scratch.as_mut()) {
                cu(g.stream.memcpy_dtod(&params[i], old), "copy")?;
            }
            if grad_scale != 1.0 {
                let (alpha, len) = (grad_scale as f32, sizes[i] as i64);
                cuda_launch!(g, "scale_inplace", Gpu::per_item(sizes[i]), &mut grads[i], &alpha, &len)?;
            }
            let lr = hp.lr * lr_factor;
            let decay = (1.0 - lr * hp.weight_decay) as f32;
            let len = sizes[i] as i64;
            match moments {
                Some((mm, vv)) => {
                    let (b1, b2) = (beta1 as f32, beta2 as f32);
                    let (step, inv, eps) = ((lr / bc1) as f32, (1.0 / bc2.sqrt()) as f32, hp.adam_eps as f32);
                    cuda_launch!(g, "adamw", Gpu::per_item(sizes[i]), &mut params[i], &grads[i], &mut mm[i], &mut vv[i], &len, &b1, &b2, &decay, &step, &inv, &eps)?;
                }
                None => {
                    let lr32 = lr as f32;
                    cuda_launch!(g, "sgd", Gpu::per_item(sizes[i]), &mut params[i], &grads[i], &len, &decay, &lr32)?;
                }
            }
            if let (Some(partial), Some(old)) = (partial.as_mut(), scratch.as_ref()) {
                let mut out = partial.slice_mut(offsets[i]..offsets[i + 1]);
                chunk_sumsq(g, &params[i], Some(old), &mut out, sizes[i])?;
            }
        }
        let Some(partial) = partial else { return Ok(Vec::new()) };
        Ok(tensor_sums(&g.download(&partial, offsets[sizes.len()])?, &offsets))
    }
}

/// Where each tensor's partial sums start in a buffer of [`CHUNK`]-entry chunks; the last entry is the total.
fn chunk_offsets(lens: &[usize]) -> Vec<usize> {
    let mut offsets = vec![0];
    for &len in lens {
        offsets.push(offsets.last().copied().unwrap_or(0) + len.div_ceil(CHUNK));
    }
    offsets
}

/// Each tensor's total of its chunks' partial sums, added in chunk order.
fn tensor_sums(partials: &[f64], offsets: &[usize]) -> Vec<f64> {
    offsets.windows(2).map(|w| partials[w[0]..w[1]].iter().sum()).collect()
}

/// Partial sums of squares of the first `len` entries of `x` (or of `x - y`), one per chunk, into `out`.
fn chunk_sumsq(g: &Gpu, x: &CudaSlice<f32>, y: Option<&CudaSlice<f32>>, out: &mut CudaViewMut<'_, f64>, len: usize) -> crate::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (has_y, n, chunk) = (i32::from(y.is_some()), len as i64, CHUNK as i32);
    cuda_launch!(g, "chunk_sumsq", Gpu::per_warp(len.div_ceil(CHUNK)), x, y.unwrap_or(x), &has_y, out, &n, &chunk)
}
