//! One GPU: its context and stream, a cuBLAS handle, the NVRTC-compiled kernels of `kernels.cu` (compiled
//! once per process and cached), row-major matrix products and small launch helpers.
//!
//! All matrices on the device are row-major and contiguous, like ndarray's standard layout, so a tensor
//! of the [`crate::model::ParamStore`] uploads as its flat slice.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::{sys as cublas_sys, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchConfig,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::DeviceInfo;
use crate::Error;

/// Source of every kernel; compiled with NVRTC at run time.
pub const KERNELS: &str = include_str!("kernels.cu");

/// Names of the kernels loaded from [`KERNELS`].
pub const KERNEL_NAMES: [&str; 26] = [
    "act_forward",
    "act_backward",
    "scale_inplace",
    "axpy",
    "gather_rows",
    "combine",
    "gate_grad",
    "route_topk",
    "expert_counts",
    "expert_lists",
    "gates_backward",
    "softmax_rows",
    "aux_grad",
    "column_dot",
    "row_sumsq",
    "chunk_sumsq",
    "rms_norm_forward",
    "rms_norm_backward",
    "adamw",
    "sgd",
    "embed_forward",
    "sum_rows_by_list",
    "split_heads",
    "causal_softmax",
    "causal_softmax_backward",
    "cross_entropy",
];

/// Most experts per token the routing kernel handles (`MAX_ACTIVE` in kernels.cu).
pub const MAX_ACTIVE: usize = 64;

/// Threads per block of the elementwise kernels; 8 warps for the warp-per-row kernels.
const THREADS: u32 = 256;

/// Wraps a cudarc error with what was being done.
pub fn cu<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> crate::Result<T> {
    r.map_err(|e| Error::Internal(format!("cuda: {what}: {e:?}")))
}

fn unavailable(reason: impl Into<String>) -> Error {
    Error::Unavailable { what: "an NVIDIA GPU".into(), reason: reason.into() }
}

/// Which of the shared libraries the backend loads are missing (driver, cuBLAS, NVRTC).
fn missing_libraries() -> Vec<&'static str> {
    let mut missing = Vec::new();
    // SAFETY: these only try to dlopen the library under its usual names; nothing is called.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            missing.push("libcuda.so (the NVIDIA driver)");
        }
        if !cudarc::cublas::sys::is_culib_present() {
            missing.push("libcublas.so (CUDA's cuBLAS)");
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            missing.push("libnvrtc.so (CUDA's run-time compiler)");
        }
    }
    missing
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol, say) into [`Error::Unavailable`].
fn no_panic<T>(what: &str, f: impl FnOnce() -> crate::Result<T>) -> crate::Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic inside cudarc".into());
            Err(unavailable(format!("{what}: {msg}")))
        }
    }
}

/// See [`super::probe`].
pub fn probe() -> crate::Result<DeviceInfo> {
    let missing = missing_libraries();
    if !missing.is_empty() {
        return Err(unavailable(format!(
            "cannot load {} (set LD_LIBRARY_PATH to the folders that hold them)",
            missing.join(", ")
        )));
    }
    no_panic("starting the CUDA driver", || {
        let count = CudaContext::device_count().map_err(|e| unavailable(format!("the driver reports {e:?}")))?;
        if count < 1 {
            return Err(unavailable("the driver sees no device"));
        }
        let ctx = CudaContext::new(0).map_err(|e| unavailable(format!("cannot open device 0: {e:?}")))?;
        Ok(DeviceInfo {
            name: cu(ctx.name(), "device name")?,
            compute_capability: cu(ctx.compute_capability(), "compute capability")?,
            total_memory: cu(ctx.total_mem(), "device memory")?,
            device_count: count,
        })
    })
}

/// The kernels compiled once per process (NVRTC takes a second or two); each [`Gpu`] loads the PTX
/// into its own context.
fn compiled_kernels() -> crate::Result<Ptx> {
    static PTX: OnceLock<Result<Ptx, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let opts = cudarc::nvrtc::CompileOptions { name: Some("moe_dmft_kernels.cu".into()), ..Default::default() };
        cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts).map_err(|e| format!("{e:?}"))
    })
    .clone()
    .map_err(|e| Error::Internal(format!("cuda: NVRTC could not compile kernels.cu: {e}")))
}

/// A device ready to run the backend.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    functions: HashMap<&'static str, CudaFunction>,
    pub info: DeviceInfo,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

impl Gpu {
    /// Opens device `ordinal` after [`probe`]; `tf32` lets cuBLAS use TF32 tensor cores for f32
    /// products (faster, about 1e-3 relative error; off for the CPU-vs-GPU check).
    pub fn new(ordinal: usize, tf32: bool) -> crate::Result<Self> {
        let info = probe()?;
        no_panic("starting the GPU backend", || {
            let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("cannot open device {ordinal}: {e:?}")))?;
            let stream = ctx.default_stream();
            let blas = cu(CudaBlas::new(stream.clone()), "cuBLAS handle")?;
            let mode = if tf32 {
                cublas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            // SAFETY: the handle is live for as long as `blas`.
            let status = unsafe { cublas_sys::cublasSetMathMode(*blas.handle(), mode) };
            if status != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(Error::Internal(format!("cuda: cublasSetMathMode: {status:?}")));
            }
            let module = cu(ctx.load_module(compiled_kernels()?), "loading the kernels")?;
            let mut functions = HashMap::new();
            for name in KERNEL_NAMES {
                functions.insert(name, cu(module.load_function(name), name)?);
            }
            Ok(Gpu { ctx, stream, blas, functions, info })
        })
    }

    pub fn function(&self, name: &str) -> crate::Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::Internal(format!("cuda: no kernel `{name}`")))
    }

    pub fn upload<T: DeviceRepr + ValidAsZeroBits>(&self, host: &[T]) -> crate::Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.zeros(0);
        }
        cu(self.stream.clone_htod(host), "upload")
    }

    /// Copies `host` into the existing buffer `dev` (at least as long).
    pub fn upload_into<T: DeviceRepr>(&self, host: &[T], dev: &mut CudaSlice<T>) -> crate::Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        cu(self.stream.memcpy_htod(host, dev), "upload")
    }

    /// A zeroed buffer of `len` entries (at least one, so that empty buffers are still valid pointers).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> crate::Result<CudaSlice<T>> {
        cu(self.stream.alloc_zeros::<T>(len.max(1)), "alloc")
    }

    pub fn fill_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, dev: &mut CudaSlice<T>) -> crate::Result<()> {
        cu(self.stream.memset_zeros(dev), "memset")
    }

    /// The first `len` entries of `dev`, on the host (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>, len: usize) -> crate::Result<Vec<T>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let mut out = vec![T::default(); len];
        cu(self.stream.memcpy_dtoh(&dev.slice(0..len), &mut out), "download")?;
        self.sync()?;
        Ok(out)
    }

    pub fn sync(&self) -> crate::Result<()> {
        cu(self.stream.synchronize(), "synchronize")
    }

    /// Row-major `C (m x n) = alpha * op(A) op(B) + beta * C`, with `op(A)` m x k and `op(B)` k x n;
    /// `lda`, `ldb`, `ldc` are the row strides of the matrices as stored. cuBLAS is column-major: a
    /// row-major matrix is its transpose there, so this computes `C^T = op(B)^T op(A)^T`.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: &CudaView<f32>,
        lda: usize,
        b: &CudaView<f32>,
        ldb: usize,
        beta: f32,
        c: &mut CudaViewMut<f32>,
        ldc: usize,
    ) -> crate::Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let cfg = gemm_config(ta, tb, (m, n, k), alpha, lda, ldb, beta, ldc)?;
        // SAFETY: the callers pass views at least as long as the matrices the strides describe.
        cu(unsafe { self.blas.gemm(cfg, b, a, c) }, "cublasSgemm")
    }

    /// `count` independent row-major products `C_i = alpha * op(A_i) op(B_i) + beta * C_i` as in
    /// [`Self::gemm`], the i-th matrices starting `stride_a`, `stride_b`, `stride_c` entries after the
    /// (i-1)-th (attention: one product per (sequence, head) pair).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_batched(
        &self,
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        (a, lda, stride_a): (&CudaView<f32>, usize, usize),
        (b, ldb, stride_b): (&CudaView<f32>, usize, usize),
        beta: f32,
        (c, ldc, stride_c): (&mut CudaViewMut<f32>, usize, usize),
        count: usize,
    ) -> crate::Result<()> {
        if m == 0 || n == 0 || count == 0 {
            return Ok(());
        }
        let gemm = gemm_config(ta, tb, (m, n, k), alpha, lda, ldb, beta, ldc)?;
        let cfg = StridedBatchedConfig {
            gemm,
            batch_size: count as i32,
            stride_a: stride_b as i64,
            stride_b: stride_a as i64,
            stride_c: stride_c as i64,
        };
        // SAFETY: the callers pass views long enough for `count` matrices at the given strides.
        cu(unsafe { self.blas.gemm_strided_batched(cfg, b, a, c) }, "cublasSgemmStridedBatched")
    }

    /// Launch shape for one thread per item.
    pub fn per_item(items: usize) -> LaunchConfig {
        let blocks = items.div_ceil(THREADS as usize).max(1) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }

    /// Launch shape for one warp per item (8 warps per block).
    pub fn per_warp(items: usize) -> LaunchConfig {
        let per_block = (THREADS / 32) as usize;
        let blocks = items.div_ceil(per_block).max(1) as u32;
        LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
    }
}

/// cuBLAS's column-major view of the row-major product of [`Gpu::gemm`]: a row-major matrix is its
/// transpose there, so `C^T = op(B)^T op(A)^T`, with A and B (and their strides) swapped.
#[allow(clippy::too_many_arguments)]
fn gemm_config(
    ta: bool,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    lda: usize,
    ldb: usize,
    beta: f32,
    ldc: usize,
) -> crate::Result<GemmConfig<f32>> {
    if k == 0 {
        return Err(Error::Internal("cuda: gemm with an empty inner dimension".into()));
    }
    let op = |t: bool| if t { cublas_sys::cublasOperation_t::CUBLAS_OP_T } else { cublas_sys::cublasOperation_t::CUBLAS_OP_N };
    Ok(GemmConfig {
        transa: op(tb),
        transb: op(ta),
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha,
        lda: ldb as i32,
        ldb: lda as i32,
        beta,
        ldc: ldc as i32,
    })
}

/// A null device pointer for the kernels' optional arguments.
pub const NULL: u64 = 0;

/// Launches kernel `$name` of `$gpu` with launch shape `$cfg` and the listed arguments (each pushed by
/// reference), mapping errors to [`Error::Internal`].
#[macro_export]
macro_rules! cuda_launch {
    ($gpu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use cudarc::driver::PushKernelArg;
        let name: &str = $name;
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        let f = $gpu.function(name)?;
        let mut b = $gpu.stream.launch_builder(f);
        $( b.arg($arg); )+
        // SAFETY: argument lists match the kernel signatures in kernels.cu; sizes are checked by callers.
        $crate::cuda::device::cu(unsafe { b.launch(cfg) }, name).map(|_| ())
    }};
}
