//! # labvisor-agent
