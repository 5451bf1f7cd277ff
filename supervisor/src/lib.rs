//! # labvisor (supervisor and CLI)
//!
//! The library behind the `labvisor` binary.
//!
//! - [`check`]: `labvisor check <dir>`, validating SUT files without Docker, and the shared
//!   `--allow-*` flags ([`check::AllowArgs`]).
//! - [`client`]: `labvisor status`, `logs -f`, `submit`, `jobs` and `cancel`, built from the
//!   retained MQTT topics.

pub mod check;
pub mod client;
