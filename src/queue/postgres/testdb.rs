//! A fresh PostgreSQL database per test, for the library's tests and (included by path) the
//! service tests: created on the server at `VQCLIP_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and dropped after. `VQCLIP_TEST_POSTGRES=skip`
//! skips the tests that need one; without it, a server that cannot be reached fails them.

use sqlx::Connection;
use uuid::Uuid;

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A fresh database, dropped (with any connection still open to it) when this goes.
pub struct TestDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDb {
    /// `None` only when the environment says to skip PostgreSQL.
    pub async fn create() -> Option<TestDb> {
        if std::env::var("VQCLIP_TEST_POSTGRES").as_deref() == Ok("skip") {
            eprintln!("VQCLIP_TEST_POSTGRES=skip: PostgreSQL test skipped");
            return None;
        }
        let admin_url =
            std::env::var("VQCLIP_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        let name = format!("vqclip_test_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot reach PostgreSQL at {admin_url}: {e} \
                 (start it, or set VQCLIP_TEST_POSTGRES=skip to skip these tests)"
                )
            });
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("CREATE DATABASE");
        let _ = admin.close().await;
        let (base, _) = admin_url.rsplit_once('/').expect("a database in the URL");
        let url = format!("{base}/{name}");
        Some(TestDb {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // On a thread of its own: the test's runtime may be shutting down (or be the one
        // that dropped us), and Drop cannot await.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut admin)
                        .await;
                }
            });
        })
        .join();
    }
}
