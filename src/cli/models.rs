//! `vqclip models`. Owned by the model catalogue work; replaced as it lands.

#[derive(clap::Subcommand)]
pub enum ModelsCommand {
    /// List the catalogue.
    List,
}

pub fn run(_c: ModelsCommand) -> anyhow::Result<()> {
    anyhow::bail!("`vqclip models` is not built yet")
}
