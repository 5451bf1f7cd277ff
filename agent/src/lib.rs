//! # labvisor-agent
pub mod logfile;
pub mod output;
