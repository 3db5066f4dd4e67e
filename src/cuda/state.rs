//! Device copies of a model's parameters, their gradients and the optimizer's moments, aligned with the
//! host [`ParamStore`], and the optimizer update on the device (SGD or AdamW with every group's
//! hyperparameters, the same arithmetic as [`crate::train::optim`]).

use std::sync::{Mutex, MutexGuard};

use cudarc::driver::CudaSlice;
use ndarray::{ArrayD, IxDyn};

use super::device::Gpu;
use crate::cuda_launch;
use crate::model::{Grads, ParamStore};
use crate::param::{Optimizer, Resolved};
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

/// Row-major entries of a tensor.
pub fn flat(a: &ArrayD<f32>) -> Vec<f32> {
    a.as_standard_layout().iter().copied().collect()
}

/// Adam's first and second moments on the device, aligned with the parameters.
type Moments = (Vec<CudaSlice<f32>>, Vec<CudaSlice<f32>>);

/// Parameters, gradients and (once [`Self::optimizer_step`] has run with Adam) moments on the device.
pub struct DeviceParams {
    pub params: Vec<CudaSlice<f32>>,
    pub grads: Vec<CudaSlice<f32>>,
    moments: Option<Moments>,
    adam_steps: u64,
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
        Ok(DeviceParams { params, grads, moments: None, adam_steps: 0 })
    }

    /// Copies every host tensor to the device.
    pub fn upload(&mut self, g: &Gpu, store: &ParamStore<f32>) -> crate::Result<()> {
        for (p, d) in store.params.iter().zip(self.params.iter_mut()) {
            g.upload_into(&flat(&p.value), d)?;
        }
        Ok(())
    }

    /// Copies tensor `i` of `store` to the device (the balancing biases after a host update).
    pub fn upload_one(&mut self, g: &Gpu, store: &ParamStore<f32>, i: usize) -> crate::Result<()> {
        g.upload_into(&flat(&store.params[i].value), &mut self.params[i])
    }

    /// Copies the device parameters into `store`.
    pub fn download_into(&self, g: &Gpu, store: &mut ParamStore<f32>) -> crate::Result<()> {
        for (p, d) in store.params.iter_mut().zip(self.params.iter()) {
            let v = g.download(d, p.value.len())?;
            p.value = ArrayD::from_shape_vec(IxDyn(p.value.shape()), v)
                .map_err(|e| Error::Internal(format!("cuda: parameter shape: {e}")))?;
        }
        Ok(())
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
    /// `lr_factor`, from the device gradients.
    pub fn optimizer_step(
        &mut self,
        g: &Gpu,
        store: &ParamStore<f32>,
        hp: &Resolved,
        lr_factor: f64,
        (beta1, beta2): (f64, f64),
    ) -> crate::Result<()> {
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
        let DeviceParams { params, grads, moments, .. } = self;
        for i in 0..params.len() {
            let hp = hps[i];
            if hp.frozen || sizes[i] == 0 {
                continue;
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
        }
        Ok(())
    }
}
