//! flotilla-core's integration tests: one binary, one module per concern.

mod archive;
mod attacks;
mod delta;
mod props;
mod signing;
