//! `vqclip keys`. Owned by the integration work; replaced as it lands.

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// List API keys.
    List,
}

pub fn run(_c: KeysCommand) -> anyhow::Result<()> {
    anyhow::bail!("`vqclip keys` is not built yet")
}
