//! The `labvisor` commands other than `supervise`: one file per command.
//!
//! | command | file |
//! |---|---|
//! | `status` | [`status`] (grouping and the summary line: [`triage`]) |
//! | `logs -f` | [`logs`] |
//! | `submit` | [`submit`] |
//! | `jobs` | [`jobs`] |
//! | `cancel` | [`cancel`] |
//! | `restart --when-idle` | [`restart`] |
//! | `offline`, `online`, `maintenance` | [`admin`] |
//! | `healthz` (HTTP) | [`healthz`] |
//! | `check` (no network) | [`check`] |
//! | `import` (no network) | [`import`] |
//!
//! Shared: [`session`] (the broker flags and the MQTT session), [`error`] (failures and their
//! exit statuses), `show` (tables, ages, JSON), and [`run_client`] (the runtime a command runs
//! on, errors to exit statuses).
//!
//! The MQTT commands speak MQTT only, and are built from the retained topics the agents and
//! supervisors publish, so they work from any machine that reaches the broker, with any of the
//! roles in the shipped ACL (a reader can run `status`, `jobs` and `logs`; `submit`, `cancel`,
//! `offline`, `online` and `maintenance` need a submitter). Every command has `--json`.
//!
//! Reading "everything retained" needs an end marker, which MQTT lacks. The broker (mosquitto)
//! handles a client's packets in order and sends the retained messages of a subscription as it
//! handles it, so what comes after them marks their end: the client subscribes, then publishes a
//! probe on a private topic and stops when its own probe comes back. `status` subscribes at
//! QoS 0 ([`Session::snapshot`]) and stops at the SUBACK of its last subscription, which needs
//! no right to publish (at QoS 1 the broker holds messages back for acknowledgements and sends
//! them after it, and drops those beyond its queue). Without a marker (the ACL refuses the probe
//! of a QoS 1 command), a command stops after 500 ms without a retained message; live messages
//! do not count, so a busy lab does not keep it waiting.

use std::future::Future;
use std::process::ExitCode;

pub mod admin;
pub mod cancel;
pub mod check;
pub mod error;
pub mod healthz;
pub mod import;
pub mod jobs;
pub mod logs;
pub mod restart;
pub mod session;
mod show;
pub mod status;
pub mod submit;
pub mod triage;

pub use error::ClientError;
pub use session::{BrokerArgs, Session};

/// Runs the MQTT command `name` on a small runtime and maps its result to the exit status:
/// the command's own, or [`ClientError::exit_code`] after saying why on stderr.
pub fn run_client<F>(name: &str, f: impl FnOnce() -> F) -> ExitCode
where
    F: Future<Output = Result<u8, ClientError>>,
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("labvisor {name}: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f()) {
        Ok(code) => ExitCode::from(code),
        // The reader of our output is gone (`labvisor jobs x | head`): nothing to say, and
        // nobody to say it to.
        Err(e) if e.is_broken_pipe() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labvisor {name}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
