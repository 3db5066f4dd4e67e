//! `moe-dmft solve` (being written).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> crate::Result<()> {
    Err(crate::Error::Unavailable { what: "`solve`".into(), reason: "not built yet in this version".into() })
}
