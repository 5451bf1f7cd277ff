//! # labvisor-agent
pub mod child;
pub mod logfile;
pub mod output;
pub mod tail;
