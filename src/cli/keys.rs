//! `vqclip keys create | list | revoke`: API keys in the configured database.

use anyhow::Context;
use std::path::PathBuf;
use vqclip::auth::{ApiKey, KeyStore, LimitOverrides, NewKey};
use vqclip::config::{Config, Overrides};

#[derive(clap::Args, Debug)]
pub struct DbArgs {
    /// Configuration file (the server's), for its database.
    #[arg(long, env = "VQCLIP_CONFIG")]
    config: Option<PathBuf>,
    /// The database holding the keys; overrides the configuration.
    #[arg(long)]
    database_url: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it once on stdout (only its hash is stored).
    Create {
        /// A unique name, e.g. the app that will use the key.
        #[arg(long)]
        name: String,
        /// Admin keys see every job.
        #[arg(long)]
        admin: bool,
        /// Requests per second for this key (default: auth.limits).
        #[arg(long)]
        rps: Option<f64>,
        /// Burst of requests for this key.
        #[arg(long)]
        burst: Option<u32>,
        /// Queued jobs this key may have (0: no bound).
        #[arg(long)]
        max_queued: Option<u32>,
        /// Jobs of this key that may run at once (0: no bound).
        #[arg(long)]
        max_running: Option<u32>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List API keys.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Revoke a key by id or name; requests with it then get 401.
    Revoke {
        id_or_name: String,
        #[command(flatten)]
        db: DbArgs,
    },
}

pub fn run(c: KeysCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(c))
}

async fn open(db: &DbArgs) -> anyhow::Result<KeyStore> {
    let overrides = Overrides {
        database_url: db.database_url.clone(),
        ..Overrides::default()
    };
    let config = Config::load(db.config.as_deref(), &overrides)?;
    // The server's own store: keys live beside the jobs, on SQLite or PostgreSQL.
    let store = super::serve::open_store(&config).await?;
    Ok(KeyStore::new(store.keys()))
}

async fn run_async(c: KeysCommand) -> anyhow::Result<()> {
    match c {
        KeysCommand::Create {
            name,
            admin,
            rps,
            burst,
            max_queued,
            max_running,
            db,
        } => {
            let store = open(&db).await?;
            let new = NewKey {
                name,
                admin,
                limits: LimitOverrides {
                    requests_per_second: rps,
                    burst,
                    max_queued,
                    max_running,
                },
            };
            let (key, secret) = store.create(&new).await?;
            eprintln!(
                "created {} key `{}` ({}); it is shown only now:",
                if key.admin { "admin" } else { "a" },
                key.name,
                key.id
            );
            println!("{secret}");
        }
        KeysCommand::List { json, db } => {
            let keys = open(&db).await?.list().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                print_table(&keys);
            }
        }
        KeysCommand::Revoke { id_or_name, db } => {
            let key = open(&db)
                .await?
                .revoke(&id_or_name)
                .await
                .with_context(|| format!("could not revoke `{id_or_name}`"))?;
            eprintln!("revoked `{}` ({})", key.name, key.id);
        }
    }
    Ok(())
}

fn print_table(keys: &[ApiKey]) {
    if keys.is_empty() {
        eprintln!("no API keys: the server accepts requests without one");
        return;
    }
    println!(
        "{:<17} {:<20} {:<11} {:<5} {:<20} {:<20} LIMITS",
        "ID", "NAME", "PREFIX", "ADMIN", "CREATED", "REVOKED"
    );
    let time = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    for k in keys {
        let l = &k.limits;
        let mut limits = Vec::new();
        if let Some(v) = l.requests_per_second {
            limits.push(format!("rps={v}"));
        }
        if let Some(v) = l.burst {
            limits.push(format!("burst={v}"));
        }
        if let Some(v) = l.max_queued {
            limits.push(format!("max_queued={v}"));
        }
        if let Some(v) = l.max_running {
            limits.push(format!("max_running={v}"));
        }
        println!(
            "{:<17} {:<20} {:<11} {:<5} {:<20} {:<20} {}",
            k.id,
            k.name,
            format!("{}…", k.prefix),
            if k.admin { "yes" } else { "no" },
            time(k.created_at),
            k.revoked_at.map(time).unwrap_or_else(|| "-".into()),
            if limits.is_empty() {
                "defaults".to_string()
            } else {
                limits.join(" ")
            }
        );
    }
}
