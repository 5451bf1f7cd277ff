//! The shipped broker config (`mosquitto/mosquitto.conf`, `mosquitto/acl`) and password script
//! (`mosquitto/passwd.sh`), proven against a real mosquitto.
//!
//! The broker runs the shipped config with only its `listener`, `persistence_location`,
//! `password_file` and `acl_file` lines pointed at this test's files; the ACL is the shipped file
//! itself. Refused publishes are silently dropped by mosquitto (MQTT 3.1.1 has no way to say
//! no), so every "never arrives" check is followed by a positive control message on the same
//! path that must arrive: once it is seen, the refused one had its chance. No sleeps.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use labvisor_protocol::config::MAX_PAYLOAD_LIMIT;
use labvisor_protocol::MAX_PACKET_SIZE;
use labvisor_tests::{
    free_port, run, run_ok, unique_id, wait_until, workspace_root, Mosquitto, Subscriber,
};

const LIMIT: Duration = Duration::from_secs(20);

/// A user and its password.
type User = (&'static str, &'static str);

/// Users of every role, with known passwords: `(user, password)`.
const SUPERVISOR: User = ("labvisor.supervisor", "pw-supervisor");
const SUBMIT: User = ("labvisor.submit", "pw-submit");
const READER: User = ("labvisor.reader", "pw-reader");
const AGENT_A: User = ("rpi4-01", "pw-rpi4-01");
const AGENT_B: User = ("rpi4-02", "pw-rpi4-02");
/// A login named like the control plane's namespace, as a SUT `labvisor` would get. passwd.sh
/// refuses it; the test adds it with mosquitto_passwd, as someone could by hand.
const RESERVED: User = ("labvisor", "pw-labvisor");

/// A broker running the shipped config, and the files it was given.
struct Broker {
    mosquitto: Mosquitto,
    /// The port of the shipped TLS listener, on 127.0.0.1.
    tls_port: u16,
    /// The CA made by certs.sh, which clients trust.
    ca: PathBuf,
    files: tempfile::TempDir,
}

/// The shipped `mosquitto.conf` with only its machine-specific lines rewritten: the plain
/// listener is dropped (the test kit puts `listener <free port> 127.0.0.1` first), the TLS
/// listener moves to `tls_port` on 127.0.0.1, and the files are this test's.
fn adapted_config(files: &Path, tls_port: u16) -> String {
    let shipped = std::fs::read_to_string(workspace_root().join("mosquitto/mosquitto.conf"))
        .expect("read mosquitto/mosquitto.conf");
    let acl = workspace_root().join("mosquitto/acl");
    let f = |name: &str| files.join(name).display().to_string();
    let keys = [
        "listener 1883",
        "listener 8883",
        "persistence_location",
        "password_file",
        "acl_file",
        "cafile",
        "certfile",
        "keyfile",
    ];
    let mut seen = [0usize; 8];
    let mut out = String::new();
    for line in shipped.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        let replaced = match key {
            "listener" => match line.split_whitespace().nth(1) {
                Some("1883") => {
                    seen[0] += 1;
                    Some(String::new())
                }
                Some("8883") => {
                    seen[1] += 1;
                    Some(format!("listener {tls_port} 127.0.0.1"))
                }
                _ => panic!("mosquitto.conf: unexpected listener `{line}`"),
            },
            "persistence_location" => Some(format!("persistence_location {}/", f("data"))),
            "password_file" => Some(format!("password_file {}", f("passwd"))),
            "acl_file" => Some(format!("acl_file {}", acl.display())),
            "cafile" => Some(format!("cafile {}", f("certs/ca.crt"))),
            "certfile" => Some(format!("certfile {}", f("certs/server.crt"))),
            "keyfile" => Some(format!("keyfile {}", f("certs/server.key"))),
            _ => None,
        };
        if let Some(i) = keys[2..].iter().position(|k| *k == key) {
            seen[i + 2] += 1;
        }
        out.push_str(replaced.as_deref().unwrap_or(line));
        out.push('\n');
    }
    assert_eq!(
        seen, [1; 8],
        "mosquitto.conf must have exactly one of each of {keys:?}"
    );
    for must in [
        "allow_anonymous false",
        "persistence true",
        "per_listener_settings false",
    ] {
        assert!(
            shipped.lines().any(|l| l.trim() == must),
            "mosquitto.conf lacks `{must}`"
        );
    }
    out
}

/// The value of `key` in the shipped mosquitto.conf (its only line starting with `key `).
fn shipped_value(key: &str) -> String {
    let shipped = std::fs::read_to_string(workspace_root().join("mosquitto/mosquitto.conf"))
        .expect("read mosquitto/mosquitto.conf");
    let values: Vec<&str> = shipped
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key} ")))
        .collect();
    assert_eq!(
        values.len(),
        1,
        "mosquitto.conf: one `{key}` line: {values:?}"
    );
    values[0].trim().to_owned()
}

fn passwd_sh() -> PathBuf {
    workspace_root().join("mosquitto/passwd.sh")
}

fn start_broker() -> Broker {
    let files = tempfile::Builder::new()
        .prefix("labvisor-acl-")
        .tempdir()
        .expect("tempdir");
    // mosquitto started as root drops to the `mosquitto` user: let it write its database.
    let data = files.path().join("data");
    std::fs::create_dir(&data).unwrap();
    set_mode(&data, 0o777);
    set_mode(files.path(), 0o755);
    let passwd = files.path().join("passwd");
    run_ok(
        Command::new("mosquitto_passwd")
            .args(["-c", "-b"])
            .arg(&passwd)
            .args([RESERVED.0, RESERVED.1]),
    );
    let users: Vec<String> = [SUPERVISOR, SUBMIT, READER, AGENT_A, AGENT_B]
        .iter()
        .map(|(u, p)| format!("{u}:{p}"))
        .collect();
    let mut cmd = Command::new("bash");
    cmd.arg(passwd_sh())
        .arg("--file")
        .arg(&passwd)
        .arg("--secrets")
        .arg(files.path().join("secrets"))
        .args(&users);
    // mosquitto started as root reads the password file and its TLS key as the `mosquitto`
    // user it drops to.
    let owner = (run_ok(Command::new("id").arg("-u")).trim() == "0"
        && run(Command::new("id").arg("mosquitto")).status.success())
    .then(|| "mosquitto".to_owned());
    if let Some(o) = &owner {
        cmd.args(["--owner", o]);
    }
    let out = run_ok(&mut cmd);
    for (_, p) in [SUPERVISOR, SUBMIT, READER, AGENT_A, AGENT_B] {
        assert!(
            !out.contains(p),
            "passwd.sh printed a given password: {out}"
        );
    }
    let mode = std::fs::metadata(&passwd).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "the password file must be 0600"
    );
    // The TLS listener's certificates, made by the shipped script.
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("mosquitto/certs.sh"))
        .arg("--dir")
        .arg(files.path().join("certs"))
        .arg("--ca-dir")
        .arg(files.path().join("ca"));
    if let Some(o) = &owner {
        cmd.args(["--owner", o]);
    }
    run_ok(&mut cmd);
    let tls_port = free_port();
    let mosquitto = Mosquitto::start_with(&adapted_config(files.path(), tls_port));
    Broker {
        mosquitto,
        tls_port,
        ca: files.path().join("certs/ca.crt"),
        files,
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn creds(user: User) -> [&'static str; 4] {
    ["-u", user.0, "-P", user.1]
}

impl Broker {
    /// Publishes the contents of `file` at QoS 1 as `user` (payloads beyond the argument size
    /// limit); returns mosquitto_pub's output, success or not.
    fn publish_file(&self, user: User, topic: &str, file: &Path) -> std::process::Output {
        run(Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.mosquitto.port().to_string()])
            .args(creds(user))
            .args(["-q", "1", "-t", topic, "-f"])
            .arg(file))
    }

    /// `mosquitto_pub` at QoS 1 to the TLS listener at `host`, with `args` (credentials, TLS
    /// options); returns its output, success or not.
    fn publish_tls(
        &self,
        host: &str,
        args: &[&str],
        topic: &str,
        payload: &str,
    ) -> std::process::Output {
        run(Command::new("mosquitto_pub")
            .args(["-h", host, "-p", &self.tls_port.to_string()])
            .args(args)
            .args(["-q", "1", "-t", topic, "-m", payload]))
    }

    /// Publishes at QoS 1 as `user`: mosquitto_pub returns once the broker acknowledged it,
    /// which it also does for a publish it refused.
    fn publish(&self, user: User, topic: &str, payload: &str) {
        let mut args = creds(user).to_vec();
        args.extend(["-q", "1"]);
        let out = self.mosquitto.publish(topic, payload, &args);
        assert!(
            out.status.success(),
            "{} could not publish to {topic}: {}{}",
            user.0,
            String::from_utf8_lossy(&out.stderr),
            self.mosquitto.log()
        );
    }

    /// Subscribes as `user` to `topics` (QoS 1) and returns once the subscription provably
    /// works: a probe published by `prober` on `probe_topic` (which the subscription must
    /// match) has arrived.
    fn subscribe(
        &self,
        user: User,
        topics: &[&str],
        prober: User,
        probe_topic: &str,
    ) -> Subscriber {
        let mut args = creds(user).to_vec();
        args.extend(["-q", "1"]);
        for t in &topics[1..] {
            args.extend(["-t", t]);
        }
        let sub = self.mosquitto.subscribe(topics[0], &args);
        let probe = unique_id("probe");
        let expected = format!("{probe_topic} {probe}");
        wait_until(
            &format!("{}'s subscription to {topics:?} to work", user.0),
            LIMIT,
            || {
                // Each try publishes a fresh copy: the first may precede the subscription.
                self.publish(prober, probe_topic, &probe);
                sub.lines().contains(&expected).then_some(())
            },
        );
        sub
    }

    /// Asserts that `refused` (a publish already acknowledged by the broker) never reached
    /// `sub`, after the control publish (`who`, `topic`, payload) did.
    fn assert_dropped(&self, sub: &Subscriber, refused: &str, control: (User, &str)) {
        let payload = unique_id("control");
        self.publish(control.0, control.1, &payload);
        let expected = format!("{} {payload}", control.1);
        sub.wait_for(&format!("control message {expected}"), LIMIT, |l| {
            l == expected
        });
        let lines = sub.lines();
        assert!(
            !lines.iter().any(|l| l.ends_with(refused)),
            "a refused publish ({refused}) was delivered: {lines:?}"
        );
    }
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn anonymous_and_unknown_clients_are_refused() {
    let b = start_broker();
    let port = b.mosquitto.port().to_string();
    for extra in [
        vec![],
        vec!["-u", "rpi4-01", "-P", "wrong"],
        vec!["-u", "nobody.here", "-P", "pw-reader"],
    ] {
        let out = run(Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-t",
                "rpi4-01/submit",
                "-m",
                "x",
            ])
            .args(&extra));
        assert!(
            !out.status.success(),
            "mosquitto_pub {extra:?} was accepted"
        );
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains("not authori"), "{extra:?}: {err}");
    }
    // A valid user gets in: the refusals above were about credentials, not the broker.
    b.publish(READER, "labvisor/ping", "x");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn agent_writes_and_reads_only_its_own_sut() {
    let b = start_broker();
    let all = b.subscribe(SUPERVISOR, &["#"], SUPERVISOR, "labvisor/sync");

    // Its own topics: they arrive.
    for topic in ["rpi4-01/agent", "rpi4-01/output", "rpi4-01/jobs/j1/output"] {
        let payload = unique_id("own");
        b.publish(AGENT_A, topic, &payload);
        let expected = format!("{topic} {payload}");
        all.wait_for(&expected, LIMIT, |l| l == expected);
    }

    // Its reply space (acks to a submitter's reply_to): they arrive.
    for topic in [
        "labvisor/replies/rpi4-01",
        "labvisor/replies/rpi4-01/ci/acks",
    ] {
        let payload = unique_id("reply");
        b.publish(AGENT_A, topic, &payload);
        let expected = format!("{topic} {payload}");
        all.wait_for(&expected, LIMIT, |l| l == expected);
    }

    // Another SUT's topics, another SUT's reply space and the rest of the control plane:
    // dropped.
    for topic in [
        "rpi4-02/agent",
        "rpi4-02/output",
        "rpi4-02/submit",
        "labvisor/supervisors/labvisor/status",
        "labvisor/supervisors/rpi4-01/status",
        "labvisor/replies/rpi4-02/acks",
        "labvisor/replies",
        "labvisor/rpi4-01",
        "labvisor",
    ] {
        let forged = unique_id("forged");
        b.publish(AGENT_A, topic, &forged);
        b.assert_dropped(&all, &forged, (AGENT_A, "rpi4-01/output"));
    }

    // Reading: the agent gets its own submissions but not another SUT's.
    let agent = b.subscribe(
        AGENT_A,
        &["rpi4-01/#", "rpi4-02/#"],
        SUPERVISOR,
        "rpi4-01/sync",
    );
    let secret = unique_id("other-sut-job");
    b.publish(SUBMIT, "rpi4-02/submit", &secret);
    b.assert_dropped(&agent, &secret, (SUBMIT, "rpi4-01/submit"));
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn a_login_named_labvisor_cannot_touch_the_control_plane() {
    let b = start_broker();
    let all = b.subscribe(SUPERVISOR, &["#"], SUPERVISOR, "labvisor/sync");
    // The pattern `%u/#` would give it labvisor/#, and `labvisor/replies/%u/#` a reply space.
    for topic in [
        "labvisor/supervisors/labvisor/status",
        "labvisor/supervisors/other/status",
        "labvisor/replies/labvisor/acks",
        "labvisor/replies/rpi4-01/acks",
        "labvisor/anything",
        "rpi4-01/submit",
    ] {
        let forged = unique_id("forged");
        b.publish(RESERVED, topic, &forged);
        b.assert_dropped(&all, &forged, (SUPERVISOR, "labvisor/sync"));
    }
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn passwd_sh_refuses_the_reserved_name() {
    let files = tempfile::tempdir().unwrap();
    let sut = files.path().join("sut");
    std::fs::create_dir(&sut).unwrap();
    for name in ["labvisor", "rpi4-09"] {
        std::fs::write(sut.join(format!("{name}.toml")), "image = \"x\"\n").unwrap();
    }
    let passwd = files.path().join("passwd");
    let secrets = files.path().join("secrets");
    let base = |cmd: &mut Command| {
        cmd.arg(passwd_sh())
            .arg("--file")
            .arg(&passwd)
            .arg("--secrets")
            .arg(&secrets)
            .arg("--sut-dir")
            .arg(&sut);
    };

    // Named explicitly: refused with a reason, exit 1, the other users still made.
    let mut cmd = Command::new("bash");
    base(&mut cmd);
    let out = run(cmd.args(["labvisor", "labvisor:given", "rpi4-08"]));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("labvisor is reserved"), "{err}");
    // From the SUT directory: skipped with a warning.
    let mut cmd = Command::new("bash");
    base(&mut cmd);
    let out = run(&mut cmd);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("labvisor.toml: labvisor is reserved"), "{err}");

    let users: Vec<String> = std::fs::read_to_string(&passwd)
        .unwrap()
        .lines()
        .filter_map(|l| l.split(':').next().map(str::to_owned))
        .collect();
    assert_eq!(
        users,
        [
            "rpi4-08",
            "labvisor.supervisor",
            "labvisor.submit",
            "labvisor.reader",
            "rpi4-09"
        ]
    );
    assert!(!secrets.join("labvisor").exists());
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn reader_reads_but_cannot_submit() {
    let b = start_broker();
    let all = b.subscribe(SUPERVISOR, &["#"], SUPERVISOR, "labvisor/sync");
    let reader = b.subscribe(READER, &["#"], AGENT_A, "rpi4-01/agent");

    for topic in [
        "rpi4-01/submit",
        "rpi4-01/cancel",
        "rpi4-01/agent",
        "labvisor/supervisors/labvisor/status",
        "labvisor/replies/rpi4-01/acks",
        // What the agents' patterns would give the login `labvisor.reader`.
        "labvisor.reader/x",
        "labvisor/replies/labvisor.reader/x",
    ] {
        let refused = unique_id("reader");
        b.publish(READER, topic, &refused);
        b.assert_dropped(&all, &refused, (AGENT_A, "rpi4-01/output"));
    }
    // Reading everything works: the controls above reached the reader too.
    reader.wait_for("the agent's output at the reader", LIMIT, |l| {
        l.starts_with("rpi4-01/output control-")
    });
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn submitter_submits_and_cancels_but_cannot_forge_agent_topics() {
    let b = start_broker();
    let all = b.subscribe(SUPERVISOR, &["#"], SUPERVISOR, "labvisor/sync");
    let agent = b.subscribe(AGENT_A, &["rpi4-01/#"], AGENT_A, "rpi4-01/sync");

    for topic in ["rpi4-01/submit", "rpi4-01/cancel"] {
        let payload = unique_id("job");
        b.publish(SUBMIT, topic, &payload);
        let expected = format!("{topic} {payload}");
        agent.wait_for(&format!("{expected} at the agent"), LIMIT, |l| {
            l == expected
        });
        all.wait_for(&expected, LIMIT, |l| l == expected);
    }
    for topic in [
        "rpi4-01/agent",
        "rpi4-01/submit_status",
        "rpi4-01/last_job",
        "rpi4-01/jobs/j1",
        "rpi4-01/jobs/j1/submit",
        "labvisor/supervisors/labvisor/status",
        "labvisor/replies/rpi4-01/acks",
        // What the agents' patterns would give the login `labvisor.submit`.
        "labvisor.submit/x",
        "labvisor/replies/labvisor.submit/x",
    ] {
        let forged = unique_id("forged");
        b.publish(SUBMIT, topic, &forged);
        b.assert_dropped(&all, &forged, (SUBMIT, "rpi4-02/submit"));
    }
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn packet_limit_is_the_largest_job_plus_headroom() {
    assert_eq!(
        shipped_value("max_packet_size"),
        MAX_PACKET_SIZE.to_string(),
        "mosquitto.conf max_packet_size must be labvisor_protocol::MAX_PACKET_SIZE"
    );
    let autosave: u64 = shipped_value("autosave_interval")
        .parse()
        .expect("autosave_interval is a number of seconds");
    assert!(
        (1..=300).contains(&autosave),
        "autosave_interval {autosave}: persist at least every 5 minutes"
    );

    let b = start_broker();
    // Payload lengths, not payloads: `topic length` per message.
    let sub = b.mosquitto.subscribe(
        "rpi4-01/#",
        &[
            "-u",
            SUPERVISOR.0,
            "-P",
            SUPERVISOR.1,
            "-q",
            "1",
            "-F",
            "%t %l",
        ],
    );
    wait_until("the supervisor's subscription to work", LIMIT, || {
        b.publish(SUBMIT, "rpi4-01/cancel", "probe");
        sub.lines()
            .contains(&"rpi4-01/cancel 5".to_owned())
            .then_some(())
    });

    let files = tempfile::tempdir().unwrap();
    let payload = |name: &str, len: usize| {
        let p = files.path().join(name);
        std::fs::write(&p, vec![b'a'; len]).unwrap();
        p
    };
    // The largest job a SUT may accept goes through.
    let largest = MAX_PAYLOAD_LIMIT as usize;
    let out = b.publish_file(SUBMIT, "rpi4-01/submit", &payload("largest", largest));
    assert!(
        out.status.success(),
        "an {largest}-byte job was refused: {}{}",
        String::from_utf8_lossy(&out.stderr),
        b.mosquitto.log()
    );
    let expected = format!("rpi4-01/submit {largest}");
    sub.wait_for(&expected, LIMIT, |l| l == expected);

    // A packet over the limit is refused and its sender disconnected.
    let out = b.publish_file(SUBMIT, "rpi4-01/submit", &payload("over", MAX_PACKET_SIZE));
    assert!(
        !out.status.success(),
        "a {MAX_PACKET_SIZE}-byte payload was accepted"
    );
    wait_until("mosquitto to log the oversize packet", LIMIT, || {
        b.mosquitto.log().contains("oversize packet").then_some(())
    });
    b.publish(SUBMIT, "rpi4-01/cancel", "control");
    sub.wait_for("the control message", LIMIT, |l| l == "rpi4-01/cancel 7");
    let over = format!("rpi4-01/submit {MAX_PACKET_SIZE}");
    assert!(!sub.lines().contains(&over), "{over} was delivered");
}

#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn tls_listener_serves_clients_that_trust_the_generated_ca() {
    let b = start_broker();
    let all = b.subscribe(SUPERVISOR, &["#"], SUPERVISOR, "labvisor/sync");
    let ca = b.ca.display().to_string();
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_lowercase();

    // A client that trusts the generated CA, by address and by name: its job arrives.
    for host in ["127.0.0.1", "localhost"] {
        let payload = unique_id("tls-job");
        let mut args = creds(SUBMIT).to_vec();
        args.extend(["--cafile", &ca]);
        let out = b.publish_tls(host, &args, "rpi4-01/submit", &payload);
        assert!(
            out.status.success(),
            "TLS publish to {host}: {}{}",
            stderr(&out),
            b.mosquitto.log()
        );
        let expected = format!("rpi4-01/submit {payload}");
        all.wait_for(&expected, LIMIT, |l| l == expected);
    }

    // The same users and ACL as on the plain listener: a reader's job is dropped...
    let refused = unique_id("tls-reader");
    let mut args = creds(READER).to_vec();
    args.extend(["--cafile", &ca]);
    let out = b.publish_tls("127.0.0.1", &args, "rpi4-01/submit", &refused);
    assert!(out.status.success(), "{}", stderr(&out));
    b.assert_dropped(&all, &refused, (SUBMIT, "rpi4-01/submit"));
    // ...and an anonymous client is refused.
    let out = b.publish_tls("127.0.0.1", &["--cafile", &ca], "rpi4-01/submit", "anon");
    assert!(!out.status.success(), "anonymous TLS client accepted");
    assert!(stderr(&out).contains("not authori"), "{}", stderr(&out));

    // A client that trusts only the system's CAs does not accept the broker.
    let mut args = creds(SUBMIT).to_vec();
    args.push("--tls-use-os-certs");
    let out = b.publish_tls("127.0.0.1", &args, "rpi4-01/submit", "untrusted");
    assert!(
        !out.status.success(),
        "the broker's certificate passed the system CAs"
    );
    assert!(stderr(&out).contains("tls error"), "{}", stderr(&out));
    // Plain MQTT on the TLS port gets nowhere.
    let out = b.publish_tls("127.0.0.1", &creds(SUBMIT), "rpi4-01/submit", "plain");
    assert!(!out.status.success(), "plain MQTT accepted on the TLS port");

    // What certs.sh made: the broker's key is private, the CA's key is not beside it.
    let certs = b.files.path().join("certs");
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&certs.join("server.key")), 0o600);
    let names: std::collections::BTreeSet<String> = std::fs::read_dir(&certs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["ca.crt", "server.crt", "server.key"]
            .map(String::from)
            .into(),
        "what mosquitto gets"
    );
    assert_eq!(mode(&b.files.path().join("ca/ca.key")), 0o600);
}

/// Admin commands (`labvisor offline`, `online`, `maintenance` on `<sut>/admin`): a submitter's
/// reach the agent; a reader's and another SUT's agent's are dropped.
#[test]
#[ignore = "needs mosquitto: tools/test.sh runs it"]
fn only_submitters_send_admin_commands() {
    let b = start_broker();
    let agent = b.subscribe(AGENT_A, &["rpi4-01/#"], AGENT_A, "rpi4-01/sync");

    let payload = unique_id("offline");
    b.publish(SUBMIT, "rpi4-01/admin", &payload);
    let expected = format!("rpi4-01/admin {payload}");
    agent.wait_for(&format!("{expected} at the agent"), LIMIT, |l| {
        l == expected
    });
    for who in [READER, AGENT_B] {
        let forged = unique_id("forged-admin");
        b.publish(who, "rpi4-01/admin", &forged);
        b.assert_dropped(&agent, &forged, (SUBMIT, "rpi4-01/admin"));
    }
}
