//! # labvisor (supervisor and CLI)
