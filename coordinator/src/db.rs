//! The database: one code path for SQLite and PostgreSQL through sqlx's `Any` driver.
//!
//! Queries use `$1`-style placeholders, which both engines accept. Times are Unix seconds
//! (`i64`), booleans are integers, ids are lowercase hex text. Migrations are embedded per
//! engine from the repository's `migrations/` folder and run at start-up.

use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor as _};

/// Which engine a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Embedded SQLite (the default).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A connection pool and its engine.
#[derive(Debug, Clone)]
pub struct Db {
    /// The pool.
    pub pool: AnyPool,
    /// The engine.
    pub engine: Engine,
}

impl Db {
    /// Begins a transaction that will write. On SQLite it is `BEGIN IMMEDIATE`, which takes the
    /// write lock at once (waiting up to the busy timeout): a deferred transaction that reads
    /// and then writes fails at once with "database is locked" when another connection wrote
    /// in between, and the busy timeout does not help it. PostgreSQL: a plain `BEGIN`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.engine {
            Engine::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Engine::Postgres => self.pool.begin().await,
        }
    }
}

struct Migration {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sqlite: include_str!("../../migrations/sqlite/0001_initial.sql"),
        postgres: include_str!("../../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "event_ids",
        sqlite: include_str!("../../migrations/sqlite/0002_event_ids.sql"),
        postgres: include_str!("../../migrations/postgres/0002_event_ids.sql"),
    },
    Migration {
        version: 3,
        name: "trust_root_history",
        sqlite: include_str!("../../migrations/sqlite/0003_trust_root_history.sql"),
        postgres: include_str!("../../migrations/postgres/0003_trust_root_history.sql"),
    },
    Migration {
        version: 4,
        name: "device_targets",
        sqlite: include_str!("../../migrations/sqlite/0004_device_targets.sql"),
        postgres: include_str!("../../migrations/postgres/0004_device_targets.sql"),
    },
    Migration {
        version: 5,
        name: "cache_notify",
        sqlite: include_str!("../../migrations/sqlite/0005_cache_notify.sql"),
        postgres: include_str!("../../migrations/postgres/0005_cache_notify.sql"),
    },
];

/// PostgreSQL channel on which the release and product tables announce changes
/// (migration 0005's trigger); replicas listen and reload their cache.
pub const CACHE_CHANNEL: &str = "flotilla_cache";

/// Arbitrary constant naming the migration lock among PostgreSQL advisory locks.
const MIGRATION_LOCK: i64 = 0x466c_6f74_696c_6c61;

/// Database errors.
pub type DbError = sqlx::Error;

impl Db {
    /// Connects and runs pending migrations.
    ///
    /// # Errors
    /// Connection or migration failure.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        install_default_drivers();
        let engine = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Engine::Postgres
        } else if url.starts_with("sqlite:") {
            Engine::Sqlite
        } else {
            return Err(sqlx::Error::Configuration("DATABASE_URL must start with postgres:// or sqlite:".into()));
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if engine == Engine::Sqlite { max_connections.min(8) } else { max_connections })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if engine == Engine::Sqlite {
                        // WAL lets readers run beside the writer; busy_timeout makes a writer
                        // wait for the lock instead of failing at once.
                        conn.execute("PRAGMA journal_mode=WAL; PRAGMA busy_timeout=10000; PRAGMA synchronous=NORMAL;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        let db = Self { pool, engine };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), DbError> {
        let mut conn = self.pool.acquire().await?;
        if self.engine == Engine::Postgres {
            sqlx::query("SELECT pg_advisory_lock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await?;
        }
        let result = async {
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
            )
            .await?;
            for m in MIGRATIONS {
                let done: Option<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations WHERE version = $1")
                    .bind(m.version)
                    .fetch_optional(&mut *conn)
                    .await?;
                if done.is_some() {
                    continue;
                }
                let sql = match self.engine {
                    Engine::Sqlite => m.sqlite,
                    Engine::Postgres => m.postgres,
                };
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                sqlx::raw_sql(sql).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
                    .bind(m.version)
                    .bind(m.name)
                    .bind(now())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                tracing::info!(version = m.version, name = m.name, "migration applied");
            }
            Ok::<(), DbError>(())
        }
        .await;
        if self.engine == Engine::Postgres {
            sqlx::query("SELECT pg_advisory_unlock($1)").bind(MIGRATION_LOCK).execute(&mut *conn).await?;
        }
        result
    }
}

/// Current Unix time in seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Whether an error is a unique-constraint violation (both engines).
pub fn is_unique_violation(e: &DbError) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation()
                || d.message().contains("UNIQUE constraint failed")
                || d.code().as_deref() == Some("23505")
        }
        _ => false,
    }
}
