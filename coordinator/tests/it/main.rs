//! The coordinator's integration tests: a real server on a loopback port, on SQLite and on a
//! real PostgreSQL (`FLOTILLA_TEST_PG_URL`, started by scripts/test.sh), driven over HTTP.

mod support;

mod auth_matrix;
mod bad_input;
mod binary;
mod flow;
mod openapi;
mod replicas;
mod rollouts;
mod s3;
mod tls;

/// Runs an `async fn(Engine)` test on both engines.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name($crate::support::Engine::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name($crate::support::Engine::Postgres).await
                }
            }
        )*
    };
}
