//! The NVRTC side of the GPU backend without a GPU: compiling `kernels.cu` needs only libnvrtc (pip's
//! `nvidia-cuda-nvrtc` provides it), so the kernels' syntax and signatures are checked on any machine
//! that has it. Skipped, with a message, where libnvrtc cannot be loaded.
#![cfg(feature = "cuda")]

use moe_dmft::cuda::device::{KERNELS, KERNEL_NAMES};

fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

#[test]
fn kernels_compile_with_nvrtc_and_export_every_entry_point() {
    if !nvrtc_present() {
        eprintln!("skipped: libnvrtc not found (add its folder to LD_LIBRARY_PATH to run this test)");
        return;
    }
    let ptx = cudarc::nvrtc::compile_ptx(KERNELS).expect("kernels.cu compiles with NVRTC");
    let text = ptx.to_src();
    for name in KERNEL_NAMES {
        assert!(text.contains(&format!(".entry {name}(")), "kernel `{name}` missing from the PTX");
    }
}

#[test]
fn probe_never_panics_and_names_what_is_missing() {
    let r = std::panic::catch_unwind(moe_dmft::cuda::probe).expect("probe must not panic");
    if let Err(e) = r {
        assert_eq!(e.exit_code(), 2, "{e}");
        assert!(e.to_string().contains("not available"), "{e}");
    }
}
