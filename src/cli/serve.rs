//! `vqclip serve | worker | migrate`. Owned by the service work; replaced as it lands.

#[derive(clap::Args)]
pub struct ServeArgs {}
#[derive(clap::Args)]
pub struct WorkerArgs {}
#[derive(clap::Args)]
pub struct MigrateArgs {}

pub fn serve(_a: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vqclip serve` is not built yet")
}
pub fn worker(_a: WorkerArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vqclip worker` is not built yet")
}
pub fn migrate(_a: MigrateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`vqclip migrate` is not built yet")
}
