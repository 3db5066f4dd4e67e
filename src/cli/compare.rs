//! `moe-dmft compare` (being written).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> crate::Result<()> {
    Err(crate::Error::Unavailable { what: "`compare`".into(), reason: "not built yet in this version".into() })
}
