//! Theory vs experiment: exponent fits, coordinate checks along the four axes (with the router-init
//! ablation), and finite-network vs DMFT comparisons. This module owns the measurements and their fits;
//! the CLI subcommands `coord-check`, `compare` and `figures` are thin layers over it.

pub mod fit;
pub mod coord;
pub mod run;
pub mod run_transformer;
pub mod compare;
pub mod control;
