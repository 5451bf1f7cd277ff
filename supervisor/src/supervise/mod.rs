//! `labvisor supervise`: keep exactly one healthy agent container per valid file in `sut/`.
//!
//! # Theory of operation
//!
//! One task owns all state and runs *passes*. A pass is level-triggered and idempotent: it
//! rescans the whole SUT directory ([`scan_dir`]), lists the containers, asks the pure
//! [`plan`] what to do, and spawns the actions. What only wakes the loop up:
//!
//! - **Files.** A notify watcher on the *directory* (non-recursive; editors save by rename),
//!   or notify's `PollWatcher` with `--poll` (NFS and similar mounts). The callback only
//!   `try_send`s into a channel of one; the loop waits for a quiet period (trailing debounce,
//!   150 ms) before the pass. Each pass checks the directory's inode and re-adds the watch when
//!   the directory was replaced or reappeared.
//! - **Docker events** (die, start, health_status, destroy, pause, unpause of this supervisor's
//!   containers). The stream is reopened with backoff when the engine goes away, and every
//!   reopening triggers a pass.
//! - **Agent status.** The supervisor subscribes to `+/agent` (retained [`AgentStatus`]); an
//!   agent whose state is `busy` runs a job, and its recreation or removal waits
//!   ([`Action::Defer`]), at most `--busy-wait`, visible as `pending_action` on
//!   `<sut>/supervisor`. A change of an agent's busy state triggers a pass. The broker's view
//!   can be stale or missing (the broker or the agent's link is down, or there is no broker),
//!   so before a recreation or removal of a running container, and while one waits, the
//!   supervisor asks the agent itself: `labvisor-healthcheck --state` through a Docker exec,
//!   which reads the agent's heartbeat. That answer wins; when there is none (exec failed),
//!   the broker's view decides; a hung agent (stale heartbeat) counts as idle.
//! - **The device's own work.** An agent whose `device.busy_glob` matches is `busy` too, and
//!   says what it saw in `device_work` (on MQTT, and as a `device_work=` line of `--state`); the
//!   pending action names it ("recreate waits for the device's own work: PATH"). While such a
//!   wait lasts, the supervisor asks the agent to drain its device process (`labvisor-agent
//!   drain` through a Docker exec: it works without the broker, like the busy probe, and the
//!   agent acts only if the SUT has `device.drain_signal`), so the device takes no new work and
//!   the recreation follows its current job; when nothing waits any more and the container
//!   stays (the file was reverted), `labvisor-agent drain --lift` lets the device run again.
//!   The drains this run asked for are kept in memory only; the agent reports a drain
//!   (`draining` on MQTT, a `draining=true` line of `--state`), and each running container
//!   whose SUT has `device.drain_signal` is asked once on first sight, so a drain left by an
//!   earlier run that nothing needs is lifted too. A SUT still to be restarted by a rolling
//!   restart waits (and stays drained) while the turn is elsewhere.
//! - **A periodic resync** (30 s), finished actions, and retry, healing or hang-check
//!   deadlines (the earliest moment an agent could become suspect).
//! - **Rolling restart requests** (`labvisor restart`) on `labvisor/supervisors/<id>/restart`:
//!   taken up by the next pass, which gives one SUT at a time its recreation behind the busy
//!   gate ([`crate::plan::rolling`]); the progress goes to `.../restart_status` (`rolling`).
//!
//! **Actions** run as tasks, at most `parallelism` at a time (a semaphore), and never two for
//! the same SUT. A failed action is logged and published as `last_error`; that SUT alone is
//! retried with capped exponential backoff (1 s doubling to 60 s), the others go on.
//! The gates (retry, healing, busy wait) are pure code in [`crate::plan::policy`].
//!
//! **Hangs.** The supervisor sees a hung agent itself ([`crate::plan::hang`], this module's
//! `hang`): an agent whose live status stopped on `<sut>/agent` for `health.max_age` (while the
//! supervisor's own link has been up that long) is checked with one `labvisor-healthcheck
//! --state` through `docker exec`; a stale heartbeat, or a fresh status saying `crash-loop` or
//! `stalled`, makes its container `unhealthy` to the plan, with the reason on its view. Docker's
//! own probe, an exec each, can then be slow in a large lab (`health.interval = "auto"`:
//! `clamp(SUTs / --healthcheck-rate, 10 s, 300 s)`, chosen when a container is created).
//!
//! **Healing.** Docker marks a hung agent unhealthy but never restarts it. A running,
//! unhealthy container whose SUT has `restart.on_unhealthy = "restart"` is restarted: the first
//! time at once, then with exponential backoff from `restart.backoff_min` to
//! `restart.backoff_max`; after `restart.crash_loop_after` restarts without a healthy minute in
//! between, the SUT is flagged `crash_loop` (restarts go on at the longest delay). A healthy
//! minute resets both. Restart counts are published on `<sut>/supervisor`.
//!
//! **Adoption and crashes.** Containers are created with their final labels, so a restarted
//! supervisor adopts what it finds: same hash, nothing happens, ids stay. A container left
//! `created` (the supervisor was killed between create and start, so its files may be
//! incomplete) is recreated. An `exited` one was stopped by a person and is left so
//! ([`crate::plan::stopped_by_person`]), also by a restarted supervisor. Unowned containers are
//! never touched; one holding a wanted name is reported as a conflict.
//!
//! # How agents reach the broker
//!
//! The supervisor connects to `--broker`; agents get `--agent-broker` (default: the same URL;
//! `none` runs them without MQTT) as `LABVISOR_BROKER`, because the broker's address as seen
//! from a container is often not the supervisor's:
//!
//! - **Bridge network** (the default `labvisor` network, or a named one): a broker bound to
//!   `127.0.0.1` on the host is unreachable from containers. Either make mosquitto listen on
//!   the bridge gateway (`docker network inspect labvisor` → `Gateway`, e.g.
//!   `listener 1883 172.20.0.1`) and pass `--agent-broker mqtt://172.20.0.1:1883`, or run the
//!   broker as a container on the same network and pass `--agent-broker mqtt://mosquitto:1883`
//!   (Docker's DNS resolves container names on user-defined networks).
//! - **Host network** (`network = "host"`, needs `--allow-host-network`): the agent shares the
//!   host's stack, so `mqtt://127.0.0.1:1883` works as it does for the supervisor.
//!
//! A loopback `--agent-broker` logs a warning at startup.
//!
//! **Metrics.** With `metrics_listen`, [`crate::metrics`] serves `/metrics` and `/healthz`
//! there until shutdown; the loop feeds it through a few hooks (`self.metrics.on_*`,
//! `observe_*`). For job outcomes the supervisor also subscribes to `+/last_job`.
//!
//! **Faults.** Docker unreachable: the pass is retried with backoff, the status says
//! `docker_reachable: false`. An unreadable SUT directory changes nothing. Broker down:
//! reconciling goes on; retained status is republished on reconnect ([`MqttLink`] sticky
//! topics). Shutdown waits briefly for running actions, publishes `offline` and leaves every
//! agent running.
//!
//! # Layout
//!
//! - this module: [`run`] (and [`run_with`], its test seams), [`Settings`], the errors.
//! - `reconciler`: the loop. One task owns all state; its inputs (shutdown, file and Docker
//!   wake-ups, finished actions, broker messages, the managed broker's state, the broker
//!   link's state) are one `select!`.
//! - `timers`: the loop's timers (debounce, pass, retry, healing and hang-check deadlines,
//!   resync) in one struct.
//! - `hang`: the supervisor's own hang detection: what the loop notes of each agent, and the
//!   step of each pass that judges them and confirms a suspect through `docker exec`.
//! - `pass`: one reconcile pass (scan, list, classify, plan, bookkeeping, start actions), in a
//!   `pass` span.
//! - `watchers`: the watchers: notify on the SUT directory (and build contexts), Docker events.
//! - `executor`: runs actions as tasks, `parallelism` at a time, each in an `action` span
//!   (sut, action, container), and asks agents whether they are busy.
//! - `rolling`: the rolling restart's requests, extra action and progress.
//! - `status`: the MQTT side: the supervisor's status, each SUT's view, retained topics of
//!   removed SUTs, the offline status at shutdown.
//!
//! Decisions that need no I/O (which containers are whose, the plan, retry and healing
//! backoff, the busy wait) live in [`crate::plan`] and its submodules.
//!
//! [`scan_dir`]: labvisor_protocol::config::scan_dir
//! [`plan`]: crate::plan::plan
//! [`AgentStatus`]: labvisor_protocol::payloads::AgentStatus
//! [`Action::Defer`]: crate::plan::Action::Defer
//! [`MqttLink`]: labvisor_mqtt::MqttLink

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use labvisor_mqtt::LinkOptions;
use labvisor_protocol::config::Allow;
use labvisor_protocol::payloads::{ManagedBrokerStatus, SutView};
use labvisor_protocol::topics::Topics;
use labvisor_protocol::SutName;
use tokio::sync::{mpsc, watch};

use crate::runtime::{ContainerRuntime, RuntimeError};
use crate::spec::{SpecContext, SpecError};

mod executor;
mod hang;
mod pass;
mod reconciler;
mod rolling;
mod status;
mod timers;
mod watchers;

/// Trailing debounce of file events.
pub const DEBOUNCE: Duration = Duration::from_millis(150);
/// Delay before a pass after a Docker event or an agent status change (coalesces bursts).
const EVENT_DELAY: Duration = Duration::from_millis(50);
/// While actions run, passes (each a directory scan and a container list) come at most this
/// often. A cold start of 50 SUTs would otherwise make one pass per finished action and per
/// start event, each listing every container on an engine that is busy creating them.
/// It grows with the lab by [`BUSY_PASS_PER_CONTAINER`] for each container listed (5 s at 500):
/// the plan's actions are all queued at the first pass, so later passes only report progress,
/// and each one costs the engine a list of every container while it creates them.
const BUSY_PASS_INTERVAL: Duration = Duration::from_secs(1);
/// See [`BUSY_PASS_INTERVAL`].
const BUSY_PASS_PER_CONTAINER: Duration = Duration::from_millis(10);
/// Longest delay between retries of an unreachable engine (passes and the event stream).
const DOCKER_RETRY_MAX: Duration = Duration::from_secs(30);
/// Longest wait for an agent's answer to "do you run a job?" (an exec in its container).
const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything `supervise` needs besides the runtime.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The SUT directory.
    pub sut_dir: PathBuf,
    /// Which host-power settings SUT files may use.
    pub allow: Allow,
    /// How containers are built.
    pub spec: SpecContext,
    /// Topic builder (with the global prefix).
    pub topics: Topics,
    /// The supervisor's own broker connection; `None`: no MQTT at all.
    pub mqtt: Option<LinkOptions>,
    /// Longest wait for a busy agent before recreating or removing it anyway.
    pub busy_wait: Duration,
    /// Period of the full resync.
    pub resync: Duration,
    /// Grace period of `docker stop`/`restart` before KILL.
    pub stop_timeout: Duration,
    /// Actions running at once.
    pub parallelism: usize,
    /// The most agent containers put on one of labvisor's networks (`--network-capacity`, see
    /// [`crate::plan::networks`]).
    pub network_capacity: usize,
    /// Remove a SUT's volume with its container when its file is deleted.
    pub purge_volumes: bool,
    /// Poll the directory at this interval instead of watching it with inotify.
    pub poll: Option<Duration>,
    /// Where `/metrics` and `/healthz` are served; `None`: not at all.
    pub metrics_listen: Option<crate::metrics::Listen>,
    /// The managed broker's per-SUT logins, made before a SUT's container is created (its
    /// password file is then in `spec.agent_credentials`); `None` with an external broker.
    pub logins: Option<std::sync::Arc<crate::broker::AgentLogins>>,
    /// The managed broker's state (it is restarted when it dies), shown in the supervisor's
    /// status, `/metrics` and `/healthz`; `None` with an external broker.
    pub managed_broker: Option<tokio::sync::watch::Receiver<ManagedBrokerStatus>>,
    /// How often the supervisor status is republished when nothing changed (its `time_ms`
    /// then tells readers the supervisor is alive).
    pub status_every: Duration,
    /// `--healthcheck-rate`: Docker health-check execs per second across the lab, from which
    /// an `auto` `health.interval` is chosen when a container is created.
    pub healthcheck_rate: crate::plan::hang::HealthcheckRate,
}

/// A fatal error: the supervisor cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The MQTT link could not be started.
    #[error("cannot start the MQTT link: {0}")]
    Mqtt(#[from] labvisor_mqtt::LinkError),
    /// A topic could not be subscribed.
    #[error("cannot subscribe: {0}")]
    Subscribe(#[from] labvisor_mqtt::PublishError),
    /// The metrics address cannot be bound.
    #[error("cannot serve metrics on {addr}: {error} (pass another --metrics-listen, or none)")]
    MetricsListen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// Why one action failed (the SUT is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The engine failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The SUT file could not be read again, or turned invalid, just before creating.
    #[error("the SUT file changed or became unreadable: {0}")]
    File(String),
    /// The container could not be described.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The SUT's broker login could not be made.
    #[error(transparent)]
    Login(#[from] crate::broker::BrokerError),
}

/// Test seams of [`run_with`]: inputs the loop takes from, and outputs it gives to, the caller
/// instead of notify and MQTT. [`run`] uses none.
#[derive(Debug, Default)]
pub struct Hooks {
    /// Directory change notices (each `()` is "something in the SUT directory changed"), fed
    /// by the caller; no notify watcher is made. They are debounced like notify's.
    pub file_events: Option<mpsc::Receiver<()>>,
    /// Receives every SUT's view (as published on `<sut>/supervisor`, without `time_ms`)
    /// after each pass, also without a broker.
    pub views: Option<watch::Sender<BTreeMap<SutName, SutView>>>,
    /// Rolling restart requests, as if they came on `labvisor/supervisors/<id>/restart`.
    pub restarts: Option<mpsc::Receiver<labvisor_protocol::payloads::RestartRequest>>,
    /// Receives the rolling restart's progress whenever it changes (and rejections), also
    /// without a broker.
    pub restart_status: Option<watch::Sender<Option<labvisor_protocol::payloads::RestartStatus>>>,
    /// Broker messages, as if they arrived on the supervisor's subscriptions (agent statuses
    /// on `<sut>/agent`, live or retained), also without a broker.
    pub messages: Option<mpsc::Receiver<BrokerMessage>>,
    /// The state of the supervisor's broker link, as if from its own link (which it replaces).
    /// With neither, the supervisor's own hang detection is off (it hears no agent).
    pub link_state: Option<watch::Receiver<labvisor_mqtt::LinkState>>,
}

/// A broker message fed through [`Hooks::messages`].
#[derive(Debug, Clone)]
pub struct BrokerMessage {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Sent as a retained message because of the subscription (not live).
    pub retained: bool,
}

/// Runs the supervisor until `shutdown` resolves. Leaves the agents running.
pub async fn run<R: ContainerRuntime>(
    settings: Settings,
    runtime: Arc<R>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SuperviseError> {
    run_with(settings, runtime, Hooks::default(), shutdown).await
}

/// [`run`], with the test seams of `hooks`.
pub async fn run_with<R: ContainerRuntime>(
    settings: Settings,
    runtime: Arc<R>,
    hooks: Hooks,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SuperviseError> {
    reconciler::run(settings, runtime, hooks, shutdown).await
}
