// mimalloc keeps large freed blocks for reuse; glibc returns every block over its mmap threshold
// (<= 32 MiB) to the kernel, so each training step's GB-sized gradient arrays came back as fresh,
// page-faulted memory (22 million faults and more system than user time in a 1-seed `compare`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    std::process::exit(moe_dmft::cli::main());
}
