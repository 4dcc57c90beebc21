//! End-to-end tests of `flotilla-agent` with real processes: the coordinator binary, the
//! `flotilla` CLI publishing releases, and the agent installing them into `file` and `dir`
//! slots.

mod bad_input;
mod block;
mod delta;
mod e2e;
mod power_cut;
mod probation;
mod rollback;
mod rotation;
mod support;
mod tls;
