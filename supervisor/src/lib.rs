//! # labvisor (supervisor and CLI)
//!
//! The library behind the `labvisor` binary.
//!
//! - [`broker`]: the managed mosquitto `supervise` runs when no `--broker` is given.
//! - [`cli`]: every command but `supervise`, one file each: `status`, `logs -f`, `submit`,
//!   `jobs` and `cancel` (built from the retained MQTT topics), `healthz` (an HTTP probe),
//!   `check` (SUT files without Docker, and the shared `--allow-*` flags,
//!   [`cli::check::AllowArgs`]) and `import` (testflinger-docker triplets to SUT files).
//! - [`plan`]: the pure reconcile plan (desired SUT files vs. actual containers → actions).
//! - [`spec`]: what an agent container looks like (create request, labels, injected files).
//! - [`runtime`]: the [`runtime::ContainerRuntime`] trait, its local-Docker implementation and
//!   (for tests, `fake-runtime` feature) an in-memory fake; [`runtime::image`] makes sure of a
//!   SUT's image before create (present, pulled or built), with progress on the log and
//!   `<sut>/build`.
//! - [`supervise`]: `labvisor supervise`, the reconcile loop (watching, healing, status).
//! - [`metrics`]: its Prometheus metrics, and the server of `/metrics` and `/healthz`.

pub mod broker;
pub mod cli;
pub mod metrics;
pub mod plan;
pub mod runtime;
pub mod spec;
pub mod supervise;
pub mod web;
