//! [`Shared`]: the half of the metrics the HTTP server reads: the registry, and the reconcile
//! loop's liveness behind `/healthz`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;

/// Why `/healthz` fails (its one-line answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unhealthy {
    /// No reconcile pass ended yet.
    #[error("no reconcile pass yet")]
    NoPass,
    /// The last pass is older than the limit.
    #[error("the last reconcile pass was {}s ago (limit {}s)", .age.as_secs(), .limit.as_secs())]
    Stale {
        /// Since the last pass ended.
        age: Duration,
        /// Twice the resync period.
        limit: Duration,
    },
    /// The last pass could not list the containers.
    #[error("docker is unreachable")]
    DockerUnreachable,
    /// The managed broker is down.
    #[error("the managed broker is down (being restarted)")]
    BrokerDown,
}

/// What the server reads: the registry and the loop's liveness.
#[derive(Debug)]
pub struct Shared {
    registry: Registry,
    /// When the last pass ended, ms since `started`; `u64::MAX`: none yet.
    last_pass_ms: AtomicU64,
    docker_reachable: AtomicBool,
    /// The managed broker is down (being restarted).
    broker_down: AtomicBool,
    started: Instant,
    /// A pass older than this makes `/healthz` fail.
    stale_after: Duration,
}

impl Shared {
    /// Nothing seen yet; `/healthz` fails when no pass ended within `stale_after`.
    pub(super) fn new(registry: Registry, stale_after: Duration) -> Self {
        Shared {
            registry,
            last_pass_ms: AtomicU64::new(u64::MAX),
            docker_reachable: AtomicBool::new(false),
            broker_down: AtomicBool::new(false),
            started: Instant::now(),
            stale_after,
        }
    }

    /// The registry, while nobody else holds this half.
    pub(super) fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// A pass ended now, with Docker `reachable` or not.
    pub(super) fn on_pass(&self, reachable: bool) {
        self.docker_reachable.store(reachable, Ordering::Relaxed);
        self.last_pass_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The managed broker is up or down.
    pub(super) fn on_broker(&self, up: bool) {
        self.broker_down.store(!up, Ordering::Relaxed);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// `Ok(())` when the loop is live and Docker reachable, else why not (one line).
    pub fn health(&self) -> Result<(), Unhealthy> {
        let last = self.last_pass_ms.load(Ordering::Relaxed);
        if last == u64::MAX {
            return Err(Unhealthy::NoPass);
        }
        let age = self
            .started
            .elapsed()
            .saturating_sub(Duration::from_millis(last));
        if age > self.stale_after {
            return Err(Unhealthy::Stale {
                age,
                limit: self.stale_after,
            });
        }
        if !self.docker_reachable.load(Ordering::Relaxed) {
            return Err(Unhealthy::DockerUnreachable);
        }
        if self.broker_down.load(Ordering::Relaxed) {
            return Err(Unhealthy::BrokerDown);
        }
        Ok(())
    }
}
