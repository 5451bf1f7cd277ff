//! labvisor-healthcheck
fn main() {}
