//! The container runtime: the few operations the supervisor needs from a container engine,
//! behind [`ContainerRuntime`], and the types they exchange.
//!
//! - [`docker`]: the implementation on the local Docker Engine (bollard).
//! - [`swarm`]: the implementation on a Docker Swarm manager: one service per SUT, on the
//!   nodes its placement allows.
//! - [`image`]: making sure of a SUT's image before create, on any runtime, with the progress
//!   streamed to the log and `<sut>/build`.
//! - `fake` (only under `cfg(test)` or the `fake-runtime` feature): an in-memory engine that
//!   records calls, for tests of the reconcile loop without Docker.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use labvisor_protocol::payloads::Health;

use crate::plan::RunState;
use crate::spec::{ContainerSpec, ImageSpec, Named};

pub mod docker;
#[cfg(any(test, feature = "fake-runtime"))]
pub mod fake;
pub mod image;
pub mod swarm;

pub use docker::DockerRuntime;
pub use swarm::SwarmRuntime;

/// A failed runtime operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    /// The object does not exist (HTTP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// A name is taken or the object is in the wrong state (HTTP 409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The engine refused the request.
    #[error("docker error {status}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// Docker's message.
        message: String,
    },
    /// The engine could not be reached.
    #[error("docker unreachable: {0}")]
    Unreachable(String),
    /// The image is absent and the pull failed (no registry, unknown image, ...).
    #[error("image {image} is not present locally and could not be pulled: {reason}; build it locally (docker build -t {image} ...) or add a [build] section to the SUT file")]
    ImageUnavailable {
        /// The image reference.
        image: String,
        /// Why the pull failed, as the engine said.
        reason: String,
    },
    /// The agent could not say whether it runs a job.
    #[error("the agent gave no answer: {0}")]
    NoAnswer(String),
    /// Building the SUT's image (`[build]`) failed.
    #[error("building image {image} failed: {message}")]
    BuildFailed {
        /// The tag being built.
        image: String,
        /// The engine's error and the last lines of the build output.
        message: String,
    },
}

/// What an agent says of itself through `labvisor-healthcheck --state`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentAnswer {
    /// A job runs, or the device works on its own.
    pub busy: bool,
    /// The device's own work, as `device.busy_glob` matched it.
    pub device_work: Option<String>,
    /// Its device process is drained (`labvisor-agent drain`) until the drain is lifted.
    pub draining: bool,
    /// The healthcheck failed (exit 1): its line, e.g. `heartbeat is 34.0s old (max 30.0s):
    /// the agent's loop is hung or dead`. The agent is then not busy.
    pub unhealthy: Option<String>,
}

/// One container, from the container list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Its id.
    pub id: String,
    /// Its name, without Docker's leading `/`.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its life state.
    pub state: RunState,
    /// Its health.
    pub health: Health,
    /// When it stopped (Docker's `FinishedAt`), ms since the epoch: filled in for our exited
    /// containers only (an inspect each), `None` otherwise or when Docker did not say.
    pub finished_ms: Option<u64>,
    /// Its network mode (`HostConfig.NetworkMode`: a network's name, `host`, `default`…): which
    /// of labvisor's agent networks it is on ([`crate::plan::networks`]).
    pub network: Option<String>,
    /// The host it runs on, when the runtime spans several (Swarm: the node's hostname);
    /// `None` on the local engine.
    pub node: Option<String>,
    /// Why it is down although it should run, when the runtime can say (Swarm: `node rack3 is
    /// down`, `no suitable node: …`); `None` otherwise.
    pub down: Option<String>,
}

/// A container event worth a resync (die, start, health change, destroy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeEvent {
    /// The container.
    pub id: String,
    /// Docker's action, e.g. `die` or `health_status: unhealthy`.
    pub action: String,
    /// The container's `io.labvisor.sut` label.
    pub sut: Option<String>,
}

/// What [`ContainerRuntime::ensure_image`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageOutcome {
    /// The image was present (and, with `[build]`, carried the wanted build hash).
    Present,
    /// The image was pulled.
    Pulled,
    /// The image was built; its id.
    Built(String),
}

/// Receives the progress lines of a build or pull, one line at a time, without line ends.
pub type Progress = dyn Fn(&str) + Send + Sync;

/// A stream of runtime events; it ends (or yields an error) when the engine goes away.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<RuntimeEvent, RuntimeError>> + Send>>;

/// What the supervisor needs from a container engine.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Checks that the engine answers.
    fn ping(&self) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Every container (also stopped and foreign ones: conflicts are judged by the caller).
    fn list(&self) -> impl Future<Output = Result<Vec<ContainerInfo>, RuntimeError>> + Send;
    /// Makes sure of the network and volume, creates the container, uploads its archive and
    /// starts it; returns its id. A container made but not started is removed again on error.
    fn create(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Makes sure the image of `spec` is present: used as is when it is there; with `[build]`,
    /// built when absent or when its build-hash label differs; otherwise pulled when absent
    /// ([`RuntimeError::ImageUnavailable`] when that fails). Build and pull output goes to
    /// `progress` as it streams.
    fn ensure_image(
        &self,
        spec: &ImageSpec,
        progress: &Progress,
    ) -> impl Future<Output = Result<ImageOutcome, RuntimeError>> + Send;
    /// Starts a stopped container.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Stops a container (TERM, then KILL after `timeout`).
    fn stop(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes a container (forced; its named volume is kept).
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Restarts a container (TERM, then KILL after `timeout`).
    fn restart(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes a named volume.
    fn remove_volume(&self, name: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Removes `sut`'s volume of the old naming ([`crate::spec::SpecContext::legacy_volume`])
    /// when it exists and carries its labels; anything else of that name is left alone.
    fn remove_legacy_volume(
        &self,
        legacy: &Named,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        let _ = legacy;
        async { Ok(()) }
    }
    /// Whether the agent in the running container `id` runs a job, or its device process works
    /// on its own (`device.busy_glob`), asked inside the container (`labvisor-healthcheck
    /// --state` through exec): the answer of the agent's own heartbeat, without the broker. A
    /// stale heartbeat (a hung agent) is not busy.
    fn agent_busy(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<AgentAnswer, RuntimeError>> + Send;
    /// Asks the agent in the running container `id` to drain its device process
    /// (`labvisor-agent drain` through exec), or lifts that request (`lift`).
    fn agent_drain(
        &self,
        id: &str,
        lift: bool,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Container events of this supervisor's containers.
    fn events(&self) -> EventStream;
    /// Whether the runtime replaces unhealthy containers itself (Swarm does, from the same
    /// HEALTHCHECK): the supervisor's own healing and hang detection then step back.
    fn heals_itself(&self) -> bool {
        false
    }
    /// Whether [`ContainerRuntime::update`] replaces a container in place; when not, a
    /// recreation stops and removes the old container and creates a new one.
    fn updates_in_place(&self) -> bool {
        false
    }
    /// Replaces the container `id` by one made from `spec` in place (Swarm: a service update),
    /// returning the id that now stands for it. Only called when
    /// [`ContainerRuntime::updates_in_place`] says so.
    fn update(
        &self,
        id: &str,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send {
        let _ = (id, spec);
        async {
            Err(RuntimeError::Unreachable(
                "this runtime does not update in place".into(),
            ))
        }
    }
}
