//! `labvisor check`: exit codes, the exact text lines, and the JSON report.

use std::fs;
use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn labvisor() -> Command {
    Command::cargo_bin("labvisor").expect("labvisor binary")
}

fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn stdout_of(output: &std::process::Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("UTF-8 stdout")
}

/// A sut dir with one valid file and two invalid ones.
fn bad_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("good.toml"), "image = \"x\"\n").unwrap();
    fs::write(
        d.join("bad.toml"),
        "image = \"\"\nprivileged = true\n[health]\ntimeout = \"10s\"\n",
    )
    .unwrap();
    fs::write(d.join("broken.toml"), "image = \"x\"\n[job\n").unwrap();
    fs::write(d.join("notes.txt"), "not a SUT file").unwrap();
    dir
}

fn file(d: &Path, name: &str) -> String {
    d.join(name).display().to_string()
}

#[test]
fn shipped_sut_dir_is_valid() {
    let output = labvisor()
        .arg("check")
        .arg(workspace_dir().join("sut"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stdout_of(&output));
    assert_eq!(stdout_of(&output), "2 files checked, 0 invalid\n");

    let output = labvisor()
        .arg("check")
        .arg(workspace_dir().join("examples/testflinger"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stdout_of(&output));
}

#[test]
fn bad_dir_prints_every_problem_and_exits_1() {
    let dir = bad_dir();
    let d = dir.path();
    let output = labvisor().arg("check").arg(d).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let expected = [
        format!("{}: image: must not be empty", file(d, "bad.toml")),
        format!(
            "{}: privileged: refused: privileged mode makes the container root on the host; \
             start the supervisor with --allow-privileged to permit it",
            file(d, "bad.toml")
        ),
        format!(
            "{}: health.timeout: is 10s, but must be shorter than health.interval (10s), the shortest an \"auto\" interval gets",
            file(d, "bad.toml")
        ),
        format!(
            "{}:2: TOML syntax error: unclosed table, expected `]`",
            file(d, "broken.toml")
        ),
        "3 files checked, 2 invalid".to_owned(),
    ];
    let stdout = stdout_of(&output);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, expected, "{stdout}");
}

#[test]
fn allow_flag_lifts_its_refusal() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("rig.toml"),
        "image = \"x\"\nprivileged = true\nnetwork = \"host\"\ndevices = [\"/dev/ttyUSB0\"]\n\
         [[mounts]]\nsource = \"/srv\"\ntarget = \"/srv\"\n",
    )
    .unwrap();
    let output = labvisor().arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout_of(&output).lines().count(), 5);
    let output = labvisor()
        .arg("check")
        .arg(dir.path())
        .args([
            "--allow-privileged",
            "--allow-host-network",
            "--allow-devices",
            "--allow-host-mounts",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stdout_of(&output));
}

#[test]
fn json_report_has_the_documented_fields() {
    let dir = bad_dir();
    let d = dir.path();
    let output = labvisor()
        .arg("check")
        .arg("--json")
        .arg(d)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    assert_eq!(v["valid"], 1);
    assert_eq!(v["invalid"], 2);
    let files = v["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["file"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            file(d, "bad.toml"),
            file(d, "broken.toml"),
            file(d, "good.toml")
        ]
    );

    let bad = &files[0];
    assert_eq!(bad["sut"], "bad");
    assert_eq!(bad["valid"], false);
    assert!(bad["hash"].is_null());
    let problems = bad["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 3);
    assert_eq!(problems[0]["file"], file(d, "bad.toml"));
    assert_eq!(problems[0]["key"], "image");
    assert_eq!(problems[0]["line"], 1);
    assert_eq!(problems[0]["message"], "must not be empty");

    let broken = &files[1];
    assert_eq!(broken["problems"][0]["key"], "");
    assert_eq!(broken["problems"][0]["line"], 2);

    let good = &files[2];
    assert_eq!(good["sut"], "good");
    assert_eq!(good["valid"], true);
    let hash = good["hash"].as_str().unwrap();
    assert_eq!(hash.len(), 64);
    assert!(good["problems"].as_array().unwrap().is_empty());
}

#[test]
fn unreadable_dir_and_usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let output = labvisor()
        .arg("check")
        .arg(dir.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read the SUT directory"), "{stderr}");

    let output = labvisor().arg("check").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let output = labvisor()
        .args(["check", "--allow-everything", "."])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn empty_dir_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let output = labvisor().arg("check").arg(dir.path()).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout_of(&output), "0 files checked, 0 invalid\n");
}

/// Values that cannot be meant are refused, each with its reason naming file and key; another
/// Docker network, capabilities and new privileges need their flags.
#[test]
fn lower_bounds_and_posture_relaxations_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = [
        (
            "heartbeat.toml",
            "image = \"x\"\n[health]\nheartbeat = \"1ms\"\n",
        ),
        (
            "interval.toml",
            "image = \"x\"\n[health]\ninterval = \"2ms\"\ntimeout = \"1ms\"\n",
        ),
        ("cpus.toml", "image = \"x\"\n[resources]\ncpus = 1e-10\n"),
        (
            "memory.toml",
            "image = \"x\"\n[resources]\nmemory = \"4MiB\"\n",
        ),
        ("pids.toml", "image = \"x\"\n[resources]\npids = 8\n"),
        (
            "net.toml",
            "image = \"x\"\nnetwork = \"another-supervisors-net\"\n",
        ),
        ("caps.toml", "image = \"x\"\ncap_add = [\"NET_RAW\"]\n"),
        ("nnp.toml", "image = \"x\"\nno_new_privileges = false\n"),
    ];
    for (name, text) in files {
        fs::write(d.join(name), text).unwrap();
    }
    let output = labvisor().arg("check").arg(d).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let expected = [
        format!("{}: cap_add: refused: adding capabilities gives jobs powers the default posture takes away (NET_RAW: sniffing and spoofing other containers' traffic); start the supervisor with --allow-caps to permit it", file(d, "caps.toml")),
        format!("{}: resources.cpus: is 0.0000000001, less than the 0.01 CPUs accepted: Docker would treat it as no limit at all", file(d, "cpus.toml")),
        format!("{}: health.heartbeat: is 1ms, shorter than the 100ms accepted: each beat writes the heartbeat file and publishes the agent's status on the broker", file(d, "heartbeat.toml")),
        format!("{}: health.interval: is 2ms, shorter than the 1s accepted: each Docker health probe is an exec into the container, work for dockerd", file(d, "interval.toml")),
        format!("{}: resources.memory: is 4194304 bytes, less than the 6291456 bytes (6 MiB) accepted: Docker refuses a smaller limit, and an agent cannot run in it", file(d, "memory.toml")),
        format!("{}: network: refused: the Docker network \"another-supervisors-net\" is not labvisor's own (\"labvisor\"): the agent would reach whatever else is on it; start the supervisor with --allow-network to permit it", file(d, "net.toml")),
        format!("{}: no_new_privileges: refused: turning no-new-privileges off lets a job's process gain privileges through setuid and file-capability binaries; start the supervisor with --allow-new-privileges to permit it", file(d, "nnp.toml")),
        format!("{}: resources.pids: is 8; give from 16 (the agent, a shell and a job need that many) to 65536 processes", file(d, "pids.toml")),
        "8 files checked, 8 invalid".to_owned(),
    ];
    let stdout = stdout_of(&output);
    assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{stdout}");

    // The flags lift the three refusals, not the bounds.
    let output = labvisor()
        .arg("check")
        .arg(d)
        .args(["--allow-network", "--allow-caps", "--allow-new-privileges"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stdout_of(&output).ends_with("8 files checked, 5 invalid\n"),
        "{}",
        stdout_of(&output)
    );
}

/// A SUT file that is a symlink out of the directory (to /etc/shadow, say) is refused before
/// it is read; nothing of its contents is printed.
#[cfg(unix)]
#[test]
fn a_sut_file_linking_out_of_the_directory_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("sut");
    fs::create_dir(&d).unwrap();
    let secret = root.path().join("shadow");
    fs::write(&secret, "root:$6$secret:19000::::::\n").unwrap();
    std::os::unix::fs::symlink(&secret, d.join("x.toml")).unwrap();
    let output = labvisor().arg("check").arg(&d).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let resolved = secret.canonicalize().unwrap();
    let dir = d.canonicalize().unwrap();
    assert_eq!(
        stdout_of(&output),
        format!(
            "{}: refused: the file resolves to {}, outside the sut directory {} (a SUT file may be a symlink only to a file inside it)\n1 file checked, 1 invalid\n",
            file(&d, "x.toml"),
            resolved.display(),
            dir.display()
        )
    );
}

/// `labvisor/...` is the control plane: a SUT named `labvisor` would get it as its own space.
#[test]
fn the_reserved_sut_name_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("labvisor.toml"), "image = \"x\"\n").unwrap();
    fs::write(d.join("labvisor-1.toml"), "image = \"x\"\n").unwrap();
    let output = labvisor().arg("check").arg(d).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stdout = stdout_of(&output);
    let lines: Vec<&str> = stdout.lines().collect();
    let expected = [
        format!(
            "{}: name: the file name gives SUT name \"labvisor\", which is reserved: \
             labvisor/... is the control plane's topic space (supervisor status, reply spaces), \
             which a SUT's login would be given; rename the file",
            file(d, "labvisor.toml")
        ),
        "2 files checked, 1 invalid".to_owned(),
    ];
    assert_eq!(lines, expected, "{stdout}");
}

/// `check --runtime swarm`: the file the local runtime accepts with its flags is refused at
/// `devices`, `privileged` and `build`, with the reason; `--runtime docker` (the default)
/// accepts it; a bad value is a usage error (exit 2).
#[test]
fn runtime_swarm_refuses_devices_privileged_and_build() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("ctx")).unwrap();
    fs::write(d.join("ctx/Dockerfile"), "FROM scratch\n").unwrap();
    fs::write(
        d.join("rig.toml"),
        "image = \"x\"\nprivileged = true\ndevices = [\"/dev/ttyUSB0\"]\n[build]\ncontext = \"ctx\"\n",
    )
    .unwrap();
    fs::write(
        d.join("net.toml"),
        "image = \"x\"\n[placement]\nhost = \"rack3\"\nconstraints = [\"node.labels.rack == 3\"]\n",
    )
    .unwrap();
    let flags = ["--allow-privileged", "--allow-devices"];
    let output = labvisor().arg("check").arg(d).args(flags).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stdout_of(&output));
    let output = labvisor()
        .arg("check")
        .arg(d)
        .args(flags)
        .args(["--runtime", "docker"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stdout_of(&output));

    let output = labvisor()
        .arg("check")
        .arg(d)
        .args(flags)
        .args(["--runtime", "swarm"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let rig = file(d, "rig.toml");
    let expected = [
        format!(
            "{rig}: privileged: refused under --runtime swarm: Swarm services on Engine 20.10 \
             cannot be privileged; run this SUT under a supervisor with the local runtime on its \
             host (`labvisor supervise --runtime docker --allow-privileged`)"
        ),
        format!(
            "{rig}: devices: refused under --runtime swarm: Swarm services cannot pass host \
             devices (moby/swarmkit#1244); run this SUT under a supervisor with the local runtime \
             on the device's host (`labvisor supervise --runtime docker --allow-devices`), or \
             reach the device over the network"
        ),
        format!(
            "{rig}: build: refused under --runtime swarm: Swarm nodes cannot get an image built \
             by the supervisor; build it on each node, or push it to your registry, name it in \
             `image` and drop [build]"
        ),
        "2 files checked, 1 invalid".to_owned(),
    ];
    let stdout = stdout_of(&output);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines, expected, "{stdout}");

    let output = labvisor()
        .arg("check")
        .arg(d)
        .args(["--runtime", "kubernetes"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}
