//! End-to-end tests of the `flotilla` CLI against a real `flotilla-coordinator` process, on
//! SQLite and on PostgreSQL (`FLOTILLA_TEST_PG_URL`, set by `scripts/test.sh`).

mod bad_input;
mod deltas;
mod flow;
mod replicas;
mod support;
