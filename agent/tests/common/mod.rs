//! Shared helpers for the agent's integration tests: the agent as a real process, its heartbeat
//! file, and an MQTT collector built on `MqttLink`.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use labvisor_mqtt::{LinkOptions, MqttLink, QoS};
use labvisor_protocol::payloads::OutputMeta;
use labvisor_tests::{unique_id, wait_until};

/// The agent under test, as a plain process.
pub struct AgentProc {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub sut: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    broker: Option<String>,
    extra: Vec<String>,
}

impl AgentProc {
    /// Writes `sut/<name>.toml` with `toml` and starts the agent on it.
    pub fn start(name: &str, toml: &str, broker: Option<&str>, extra: &[&str]) -> Self {
        Self::start_with_files(name, toml, &[], broker, extra)
    }

    /// As [`AgentProc::start`], with `files` (name, content) written next to the SUT file.
    pub fn start_with_files(
        name: &str,
        toml: &str,
        files: &[(&str, &str)],
        broker: Option<&str>,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sut")).unwrap();
        for (file, content) in files {
            std::fs::write(dir.path().join("sut").join(file), content).unwrap();
        }
        let cfg = dir.path().join("sut").join(format!("{name}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let child = Self::spawn(dir.path(), name, broker, extra, &stdout);
        AgentProc {
            child,
            dir,
            sut: name.to_owned(),
            stdout,
            broker: broker.map(str::to_owned),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn spawn(
        dir: &Path,
        name: &str,
        broker: Option<&str>,
        extra: &[&str],
        stdout: &Arc<Mutex<Vec<u8>>>,
    ) -> Child {
        let cfg = dir.join("sut").join(format!("{name}.toml"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_labvisor-agent"));
        cmd.arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--heartbeat-file")
            .arg(dir.join("run/heartbeat"))
            .args(extra)
            .env_remove("LABVISOR_BROKER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("stderr"))
                    .unwrap(),
            );
        if let Some(b) = broker {
            cmd.arg("--broker").arg(b);
        }
        let mut child = cmd.spawn().expect("start labvisor-agent");
        let mut out = child.stdout.take().unwrap();
        let s2 = stdout.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s2.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        child
    }

    /// Kills the agent if it still runs, then starts it again on the same config, volume and
    /// heartbeat file (a container restart).
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        self.child = Self::spawn(
            self.dir.path(),
            &self.sut,
            self.broker.as_deref(),
            &extra,
            &self.stdout,
        );
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn log_path(&self) -> PathBuf {
        self.path(&format!("data/log/{}.log", self.sut))
    }

    pub fn log(&self) -> Vec<u8> {
        std::fs::read(self.log_path()).unwrap_or_default()
    }

    pub fn stdout(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.path("stderr")).unwrap_or_default()
    }

    /// The heartbeat file's fields, if it exists.
    pub fn heartbeat(&self) -> Option<Vec<(String, String)>> {
        let text = std::fs::read_to_string(self.path("run/heartbeat")).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    pub fn hb(&self, key: &str) -> Option<String> {
        self.heartbeat()?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Waits for a heartbeat field to satisfy `pred`.
    pub fn wait_hb(&self, key: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        wait_until(&format!("heartbeat {key}"), limit, || {
            self.hb(key).filter(|v| pred(v))
        })
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Kills the process groups of jobs and device processes still running from this agent's
    /// directory: what an agent killed with SIGKILL leaves behind (in a container, Docker would
    /// kill them with it).
    pub fn kill_orphans(&self) {
        let dir = self.dir.path().display().to_string();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if pid != self.pid() && String::from_utf8_lossy(&cmd).contains(&dir) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Waits for the agent to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        wait_until("the agent to exit", limit, || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for AgentProc {
    /// Stops the agent the way Docker does (TERM: it stops its device process and job groups),
    /// and only if that fails kills it and the device process's group, so no test leaves
    /// processes behind.
    fn drop(&mut self) {
        use nix::sys::signal::{kill, killpg, Signal};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.pid());
        let child_group = self.hb("child_pid").and_then(|p| p.parse::<i32>().ok());
        let _ = kill(pid, Signal::SIGCONT);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(g) = child_group {
            let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        }
    }
}

/// Runs `labvisor-healthcheck` (the static build) on a heartbeat file.
pub fn healthcheck(file: &Path) -> (i32, String) {
    let out = Command::new(labvisor_tests::static_bin("labvisor-healthcheck"))
        .arg("--file")
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

/// One output message seen on MQTT.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub text: String,
    pub meta: Option<OutputMeta>,
    pub retain: bool,
}

/// Collects every message on `filter` through an `MqttLink`, on its own runtime thread.
pub struct Collector {
    pub seen: Arc<Mutex<Vec<Seen>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Collector {
    pub fn start(port: u16, filters: &[&str]) -> Self {
        Self::start_with(port, filters, None, false)
    }

    /// As [`Collector::start`], logged in as `login` (user, password); the user must be allowed
    /// to write `labvisor-test/#` (the collector's probe).
    pub fn start_as(port: u16, filters: &[&str], login: Option<(&str, &str)>) -> Self {
        Self::start_with(port, filters, login, false)
    }

    /// A collector with a persistent session (clean start off, a session expiry), so that a
    /// broker with persistence keeps its subscriptions and queues its messages across a restart.
    pub fn start_persistent(port: u16, filters: &[&str]) -> Self {
        Self::start_with(port, filters, None, true)
    }

    fn start_with(
        port: u16,
        filters: &[&str],
        login: Option<(&str, &str)>,
        persistent: bool,
    ) -> Self {
        let login = login.map(|(u, p)| (u.to_owned(), p.to_owned()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let probe = format!("labvisor-test/{}", unique_id("probe"));
        let probe2 = probe.clone();
        rt.spawn(async move {
            let mut opts = LinkOptions::new(unique_id("collector"), "127.0.0.1", port);
            opts.backoff_max = Duration::from_millis(500);
            if let Some((u, p)) = login {
                opts.username = Some(u);
                opts.password = Some(p);
            }
            if persistent {
                opts.clean_start = false;
                opts.session_expiry = Some(Duration::from_secs(3600));
                opts.keep_alive = Duration::from_secs(120);
            }
            let (link, mut rx) = MqttLink::start(opts).unwrap();
            for f in &filters {
                link.subscribe(f.clone(), QoS::AtLeastOnce).unwrap();
            }
            link.subscribe(probe2.clone(), QoS::AtLeastOnce).unwrap();
            let _ = link.publish(labvisor_mqtt::Message::event(probe2, "probe"));
            while let Some(r) = rx.recv().await {
                let props = r.user_properties();
                s2.lock().unwrap().push(Seen {
                    topic: r.topic.clone(),
                    text: String::from_utf8_lossy(&r.payload).into_owned(),
                    meta: OutputMeta::from_properties(&props),
                    retain: r.retain,
                });
            }
        });
        let c = Collector { seen, rt: Some(rt) };
        // Subscriptions are live once our own probe comes back.
        wait_until("collector subscribed", Duration::from_secs(10), || {
            c.all().iter().any(|s| s.topic == probe).then_some(())
        });
        c
    }

    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn on(&self, topic: &str) -> Vec<Seen> {
        self.all()
            .into_iter()
            .filter(|s| s.topic == topic)
            .collect()
    }

    /// Waits until a message on `topic` satisfies `pred`.
    pub fn wait(&self, topic: &str, limit: Duration, pred: impl Fn(&Seen) -> bool) -> Seen {
        wait_until(&format!("a matching message on {topic}"), limit, || {
            self.on(topic).into_iter().find(|s| pred(s))
        })
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A minimal SUT file with fast health timings; `extra` is appended.
pub fn sut_toml(command: Option<&str>, extra: &str) -> String {
    let cmd = command
        .map(|c| format!("command = [\"/bin/sh\", \"-c\", {c:?}]\n"))
        .unwrap_or_default();
    format!(
        "image = \"labvisor/busybox:local\"\n{cmd}{extra}\n[health]\nheartbeat = \"200ms\"\nmax_age = \"2s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\nretries = 1\nstart_period = \"0s\"\n"
    )
}
