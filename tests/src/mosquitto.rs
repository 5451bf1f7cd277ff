//! A real mosquitto broker on a free loopback port ([`Mosquitto`]) and a `mosquitto_sub` reader
//! ([`Subscriber`]), both stopped on drop.

use crate::{free_port, require_program, run, unique_id, wait_until};
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A real mosquitto broker on a free loopback port, stopped on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Mosquitto {
    /// Starts an anonymous, non-persistent broker.
    pub fn start() -> Self {
        Self::start_with("allow_anonymous true\npersistence false\n")
    }

    /// Starts a broker with `extra` appended to a generated config that has only a listener.
    /// `extra` may use `{dir}` for the broker's private temporary directory and `{port}` for the
    /// broker's port (for another listener on the same port, on another address).
    pub fn start_with(extra: &str) -> Self {
        let bin = require_program("mosquitto");
        let dir = tempfile::Builder::new()
            .prefix("labvisor-mosquitto-")
            .tempdir()
            .expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        let mut m = Mosquitto {
            child: None,
            port: 0,
            dir,
            conf,
        };
        let mut last_err = String::new();
        for _ in 0..20 {
            m.port = free_port();
            let text = format!(
                "listener {} 127.0.0.1\nlog_dest stderr\n{}\n",
                m.port,
                extra
                    .replace("{dir}", &m.dir.path().display().to_string())
                    .replace("{port}", &m.port.to_string())
            );
            std::fs::write(&m.conf, text).expect("write mosquitto.conf");
            match m.spawn(&bin) {
                Ok(()) => return m,
                Err(e) => last_err = e,
            }
        }
        panic!("mosquitto did not start: {last_err}");
    }

    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log")).expect("log file");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {bin:?}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Err(format!("mosquitto exited with {status}: {}", self.log()));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "mosquitto did not listen within 10 s: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The broker's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's private directory (config, log, password files a test writes).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the broker logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// Kills the broker (SIGKILL), as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The broker's process id (for `kill -STOP`), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the broker again on the same port with the same config.
    pub fn restart(&mut self) {
        self.stop();
        let bin = require_program("mosquitto");
        // The port was ours a moment ago; retry briefly in case the kernel still holds it.
        wait_until(
            "mosquitto to restart on its port",
            Duration::from_secs(10),
            || self.spawn(&bin).ok(),
        );
    }

    /// `mosquitto_pub` with the given extra arguments (for example `-q 1 -r`).
    pub fn publish(&self, topic: &str, payload: &str, extra: &[&str]) -> Output {
        let bin = require_program("mosquitto_pub");
        run(Command::new(bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-t",
                topic,
                "-m",
                payload,
            ])
            .args(extra))
    }

    /// Starts `mosquitto_sub -v` on `topic` in the background; see [`Subscriber`].
    pub fn subscribe(&self, topic: &str, extra: &[&str]) -> Subscriber {
        Subscriber::start(self.port, topic, extra)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A background `mosquitto_sub -v` whose lines (`topic payload`) are collected as they arrive.
pub struct Subscriber {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Subscriber {
    /// `mosquitto_sub -v` on `topic` against the broker on `127.0.0.1:port` (one of this kit's,
    /// or another, such as a container's published port), with `extra` arguments.
    pub fn start(port: u16, topic: &str, extra: &[&str]) -> Self {
        let bin = require_program("mosquitto_sub");
        let id = unique_id("sub");
        let mut child = Command::new(bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-v",
                "-t",
                topic,
                "-i",
                &id,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_sub");
        let mut out = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let s = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
                    l2.lock().unwrap().push(s);
                }
            }
        });
        // mosquitto_sub has no "subscribed" signal on stdout; a retained probe message on a
        // private topic would need the topic filter to match. Tests that need a live
        // subscription before publishing call `wait_subscribed` with a probe topic.
        Subscriber { child, lines }
    }

    /// Lines received so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until at least `n` lines arrived.
    pub fn wait_lines(&self, n: usize, limit: Duration) -> Vec<String> {
        wait_until(&format!("{n} MQTT messages"), limit, || {
            let l = self.lines();
            (l.len() >= n).then_some(l)
        })
    }

    /// Waits until a line satisfies `pred`, and returns it.
    pub fn wait_for(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        wait_until(what, limit, || self.lines().into_iter().find(|l| pred(l)))
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
