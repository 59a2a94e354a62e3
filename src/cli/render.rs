//! `vqclip render`. Owned by the render work; replaced as it lands.

#[derive(clap::Args)]
pub struct RenderArgs {}

pub fn run(_args: RenderArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vqclip render` is not built yet")
}
