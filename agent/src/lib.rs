//! # labvisor-agent
//!
//! The entrypoint of every SUT's container: it sits next to the device, 24/7.
//!
//! ## Theory of operation
//!
//! - [`agent::run`] is one loop (a tokio task) that starts the parts below, takes submissions
//!   and cancels ([`runner`], journal in [`jobs`]), forwards signals, reports the status
//!   ([`status`]) and drives shutdown.
//! - The device process is an actor ([`device`], modelled on watchexec's `Job`): a task owns the
//!   child, started in its own process group ([`child`]), restarts it with capped exponential
//!   backoff when it exits, marks it crash-looping after repeated quick failures, forwards
//!   signals to its group, and on stop sends TERM, waits a grace period, then KILLs the whole
//!   group. The loop holds a handle (controls in, a watched state out).
//! - Output ([`output`]): the device process's stdout and stderr share one pipe, read by a pump
//!   thread that writes every byte to the container's stdout and to a size-rotated log file
//!   ([`logfile`]) on the SUT's volume, and hands a copy to the MQTT batcher without ever
//!   blocking. Files matched by `tail` globs ([`tail`]) go the same way. MQTT output is batched
//!   (50 ms or 16 KiB), sequence-numbered, and dropped (counted) when the broker is slow or gone;
//!   the file and stdout stay complete.
//! - Heartbeat: every `heartbeat` interval the same loop writes the heartbeat file (atomically)
//!   and publishes the same status, retained, on `<sut>/agent`. A hung loop means a stale
//!   heartbeat; a blocked output write means `stalled`. `labvisor-healthcheck` reads the file.
//! - MQTT goes through `labvisor_mqtt::MqttLink`, named only in [`mqtt`]: the broker being down
//!   never blocks the device process or the loop. The retained last will says `lost`; a clean
//!   stop publishes `offline`. The batcher ([`publish`]) and the upstream probe ([`probe`]) are
//!   tasks of their own.
//! - As PID 1 (a container without Docker's init) the agent reaps orphaned grandchildren.
//! - Lab operations ([`admin`]): a SUT put offline (or in maintenance, which also holds the
//!   device process) on `<sut>/admin` refuses new jobs with the reason until it is put online;
//!   the state is kept on the SUT's volume.

pub mod admin;
pub mod agent;
pub mod child;
pub mod device;
pub mod jobs;
pub mod logfile;
pub mod mqtt;
pub mod output;
pub mod probe;
pub mod publish;
pub mod runner;
pub mod status;
pub mod tail;
pub mod tap;
