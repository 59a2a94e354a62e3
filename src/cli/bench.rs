//! `vqclip bench`. Owned by the bench work; replaced as it lands.

#[derive(clap::Args)]
pub struct BenchArgs {}

pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vqclip bench` is not built yet")
}
