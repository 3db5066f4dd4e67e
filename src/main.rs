fn main() {
    std::process::exit(moe_dmft::cli::main());
}
