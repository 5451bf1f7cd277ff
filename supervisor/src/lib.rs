//! # labvisor (supervisor and CLI)
//!
//! The library behind the `labvisor` binary.
//!
//! - [`check`]: `labvisor check <dir>`, validating SUT files without Docker, and the shared
//!   `--allow-*` flags ([`check::AllowArgs`]).
//! - [`plan`]: the pure reconcile plan (desired SUT files vs. actual containers → actions).

pub mod check;
pub mod docker;
pub mod plan;
pub mod spec;
