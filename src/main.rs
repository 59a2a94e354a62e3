//! The `vqclip` command line: the service, its workers and the model tools.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vqclip",
    version,
    about = "VQGAN+CLIP image generation service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API and the workers in one process.
    Serve(cli::serve::ServeArgs),
    /// Run only the workers, against the configured database.
    Worker(cli::serve::WorkerArgs),
    /// Run the database migrations and exit.
    Migrate(cli::serve::MigrateArgs),
    /// Render one job from the command line.
    Render(cli::render::RenderArgs),
    /// Benchmark the render step on random weights of the real architectures.
    Bench(cli::bench::BenchArgs),
    /// List, download and convert models.
    #[command(subcommand)]
    Models(cli::models::ModelsCommand),
    /// Exit 0 when the server answers /healthz, non-zero otherwise (container HEALTHCHECK).
    Healthcheck(cli::healthcheck::HealthcheckArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(cli::keys::KeysCommand),
    /// Print the CLIP token ids of a text.
    Tokenize(cli::tools::TokenizeArgs),
    /// Print L2-normalised CLIP embeddings of texts and images.
    Embed(cli::tools::EmbedArgs),
    /// Print cosine similarities between an image and prompts.
    Score(cli::tools::ScoreArgs),
    /// Encode, quantize and decode an image with the VQGAN.
    Reconstruct(cli::tools::ReconstructArgs),
}

fn main() -> anyhow::Result<()> {
    vqclip::models::cpu::retain_freed_memory();
    let cli = Cli::parse();
    cli::init_tracing(cli::log_format());
    match cli.command {
        Command::Serve(a) => cli::serve::serve(a),
        Command::Worker(a) => cli::serve::worker(a),
        Command::Migrate(a) => cli::serve::migrate(a),
        Command::Render(a) => cli::render::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Models(c) => cli::models::run(c),
        Command::Keys(c) => cli::keys::run(c),
        Command::Healthcheck(a) => cli::healthcheck::run(a),
        Command::Tokenize(a) => cli::tools::tokenize(a),
        Command::Embed(a) => cli::tools::embed(a),
        Command::Score(a) => cli::tools::score(a),
        Command::Reconstruct(a) => cli::tools::reconstruct(a),
    }
}
