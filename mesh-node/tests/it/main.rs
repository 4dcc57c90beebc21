//! Mesh tests with real processes.
