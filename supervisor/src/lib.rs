//! # labvisor (supervisor and CLI)
//!
//! The library behind the `labvisor` binary.
//!
//! - [`check`]: `labvisor check <dir>`, validating SUT files without Docker, and the shared
//!   `--allow-*` flags ([`check::AllowArgs`]).
//! - [`import`]: `labvisor import <dir>`, converting testflinger-docker triplets to SUT files.

pub mod check;
pub mod import;
