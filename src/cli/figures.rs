//! `moe-dmft figures` (being written).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> crate::Result<()> {
    Err(crate::Error::Unavailable { what: "`figures`".into(), reason: "not built yet in this version".into() })
}
