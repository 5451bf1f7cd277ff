//! `labvisor submit` carries a job as large as the SUT's `max_payload` (its MQTT link takes
//! packets up to `MAX_PACKET_SIZE`, like the brokers and the agent), against a real mosquitto
//! configured as shipped and a real agent process.

use std::process::{Command, Stdio};
use std::time::Duration;

use assert_cmd::cargo::CommandCargoExt;
use labvisor_protocol::MAX_PACKET_SIZE;
use labvisor_tests::{static_bin, Mosquitto};

/// The agent process, stopped with TERM (it stops its job groups), then killed.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn submit_carries_a_one_megabyte_script() {
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\nmax_packet_size {MAX_PACKET_SIZE}\n"
    ));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cli-big.toml");
    std::fs::write(
        &cfg,
        "image = \"labvisor/busybox:local\"\n[job]\nmax_payload = \"2MiB\"\n[health]\nheartbeat = \"200ms\"\nmax_age = \"2s\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n",
    )
    .unwrap();
    let _agent = Agent(
        Command::new(static_bin("labvisor-agent"))
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--heartbeat-file")
            .arg(dir.path().join("hb"))
            .arg("--broker")
            .arg(broker.url())
            .args(["--grace", "300ms"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    broker
        .subscribe("cli-big/agent", &[])
        .wait_for("agent idle", Duration::from_secs(15), |l| {
            l.contains("\"state\":\"idle\"")
        });
    let script = dir.path().join("job.sh");
    std::fs::write(
        &script,
        format!("#{}\necho ran the big one\n", "x".repeat(1_000_000)),
    )
    .unwrap();
    let o = Command::cargo_bin("labvisor")
        .unwrap()
        .args(["submit", "cli-big", "--id", "big", "--follow", "--script"])
        .arg(&script)
        .env("LABVISOR_BROKER", broker.url())
        .env_remove("LABVISOR_TOPIC_PREFIX")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "big\nran the big one\n");
}
