//! `vqclip tokenize | embed | score | reconstruct`. Owned by the model tools work; replaced as it lands.

#[derive(clap::Args)]
pub struct TokenizeArgs {}
#[derive(clap::Args)]
pub struct EmbedArgs {}
#[derive(clap::Args)]
pub struct ScoreArgs {}
#[derive(clap::Args)]
pub struct ReconstructArgs {}

pub fn tokenize(_a: TokenizeArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn embed(_a: EmbedArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn score(_a: ScoreArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
pub fn reconstruct(_a: ReconstructArgs) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
