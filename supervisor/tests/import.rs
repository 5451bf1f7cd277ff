//! `labvisor import`: the sample testflinger-docker directory, broken and misnamed triplets, and
//! that every written SUT file passes `labvisor check` and `load_file`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use assert_cmd::Command;
use labvisor_protocol::config::{load_file, Allow};

fn labvisor() -> Command {
    Command::cargo_bin("labvisor").expect("labvisor binary")
}

fn sample_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/testflinger-docker")
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn import(dir: &Path, out: &Path, extra: &[&str]) -> Run {
    let o = labvisor()
        .arg("import")
        .arg(dir)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

fn check_dir(dir: &Path) {
    let o = labvisor().arg("check").arg(dir).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "labvisor check {}: {}",
        dir.display(),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// Writes a complete, valid triplet for `name` into `dir`.
fn write_triplet(dir: &Path, name: &str) {
    fs::write(
        dir.join(format!("{name}.conf")),
        format!(
            "agent_id: {name}\nserver_address: http://tf.invalid:8000\njob_queues: [{name}]\n\
             execution_basedir: /srv/tf/{name}/run/\nglobal_timeout: 3600\n"
        ),
    )
    .unwrap();
    fs::write(
        dir.join(format!("{name}.yaml")),
        format!("job_queue: {name}\ntest_data:\n  test_cmds: echo hi\n"),
    )
    .unwrap();
    fs::write(
        dir.join(format!("{name}_snappy.yaml")),
        "device_ip: 10.0.0.9\nenv:\n  DEVICE_IP: 10.0.0.9\n  PORT: 22\n  bad-key: x\n  LABVISOR_X: y\n",
    )
    .unwrap();
}

#[test]
fn sample_directory_imports_the_good_suts_and_names_the_broken_one() {
    let out = tempfile::tempdir().unwrap();
    let r = import(&sample_dir(), out.path(), &[]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("maas-lenovo-03: maas-lenovo-03_snappy.yaml is missing"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("maas-dell-01") && !r.stderr.contains("maas-hp-02"));
    assert!(r.stdout.contains("2 imported, 1 failed"), "{}", r.stdout);
    for sut in ["maas-dell-01", "maas-hp-02"] {
        assert!(
            r.stdout.contains(&format!("imported {sut}: ")),
            "{}",
            r.stdout
        );
    }
    assert!(!out.path().join("maas-lenovo-03.toml").exists());
    assert!(!out.path().join("maas-lenovo-03.conf").exists());
    check_dir(out.path());

    let cfg = load_file(&out.path().join("maas-dell-01.toml"), &Allow::default())
        .expect("a written SUT file loads");
    assert_eq!(cfg.name.as_str(), "maas-dell-01");
    assert_eq!(cfg.image, "testflinger-agent-host:latest");
    assert_eq!(
        cfg.command.as_deref(),
        Some(
            &[
                "testflinger-agent".to_owned(),
                "-c".to_owned(),
                "/labvisor/sut/maas-dell-01.conf".to_owned(),
                "--token-file".to_owned(),
                "/labvisor/sut/maas-dell-01.token".to_owned(),
            ][..]
        )
    );
    let files: Vec<&str> = cfg.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        files,
        [
            "maas-dell-01.conf",
            "maas-dell-01.yaml",
            "maas-dell-01_snappy.yaml",
            "tf-job",
            "maas-dell-01.token",
        ]
    );
    // The copies are byte for byte the originals.
    for f in &cfg.files[..3] {
        assert_eq!(f.content, fs::read(sample_dir().join(&f.name)).unwrap());
    }
    assert_eq!(
        cfg.tail,
        ["/home/ubuntu/testflinger/maas-dell-01/run/*/*.log"]
    );
    assert_eq!(cfg.job.template.as_deref(), Some("maas-dell-01.yaml"));
    assert_eq!(cfg.job.timeout, Duration::from_secs(172_800));
    assert_eq!(cfg.job.output_timeout, Duration::from_secs(43_200));
    assert_eq!(cfg.env["DEVICE_IP"], "10.245.130.51");
    assert!(cfg.env.contains_key("HEXR_DEVICE_SECURE_ID"));
    let job = serde_json::to_value(&cfg.job.command).unwrap();
    assert_eq!(
        job,
        serde_json::json!(["python3", "/labvisor/sut/tf-job", "{job_file}"])
    );
    assert_eq!(cfg.env["TESTFLINGER_SERVER"], "http://10.245.128.10:8000");
    assert!(
        r.stdout.contains(
            "warning: maas-dell-01.token: put the refresh token the testflinger server gave this agent there"
        ),
        "{}",
        r.stdout
    );
}

/// Issue 15, point 5: `labvisor import` writes what `examples/testflinger/` ships: imported from
/// the example's own triplet, the SUT file has the example's agent command (with
/// `--token-file`), files (with the wrapper, the same bytes, and the credential file), job
/// command, template and `TESTFLINGER_SERVER`. A filled-in credential is never overwritten.
#[test]
fn import_writes_the_shape_of_the_shipped_example() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/testflinger");
    let src = tempfile::tempdir().unwrap();
    for f in [
        "tf-rpi4-01.conf",
        "tf-rpi4-01.yaml",
        "tf-rpi4-01_snappy.yaml",
    ] {
        fs::copy(example.join(f), src.path().join(f)).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let r = import(src.path(), out.path(), &[]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    check_dir(out.path());
    let allow = Allow::default();
    let shipped = load_file(&example.join("tf-rpi4-01.toml"), &allow).unwrap();
    let imported = load_file(&out.path().join("tf-rpi4-01.toml"), &allow).unwrap();
    assert_eq!(imported.command, shipped.command);
    assert_eq!(
        serde_json::to_value(&imported.job.command).unwrap(),
        serde_json::to_value(&shipped.job.command).unwrap()
    );
    assert_eq!(imported.job.template, shipped.job.template);
    assert_eq!(
        imported.env.get("TESTFLINGER_SERVER"),
        shipped.env.get("TESTFLINGER_SERVER")
    );
    assert_eq!(imported.tail, shipped.tail);
    assert_eq!(
        serde_json::to_value(&imported.probe).unwrap(),
        serde_json::to_value(&shipped.probe).unwrap()
    );
    // The device's own server jobs are busy, and testflinger's safe restart drains them.
    assert!(!shipped.device.is_empty(), "the example has [device]");
    assert_eq!(imported.device, shipped.device);
    let files = |c: &labvisor_protocol::config::SutConfig| {
        let mut f: Vec<(String, Vec<u8>)> = c
            .files
            .iter()
            .map(|f| (f.name.clone(), f.content.clone()))
            .collect();
        f.sort();
        f
    };
    assert_eq!(
        files(&imported),
        files(&shipped),
        "the same files, byte for byte"
    );

    // The user fills in the credential; a forced import again keeps it.
    fs::write(out.path().join("tf-rpi4-01.token"), "the-real-token").unwrap();
    let r = import(src.path(), out.path(), &["--force"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(
        !r.stdout.contains("warning: tf-rpi4-01.token"),
        "{}",
        r.stdout
    );
    assert_eq!(
        fs::read_to_string(out.path().join("tf-rpi4-01.token")).unwrap(),
        "the-real-token"
    );
}

#[test]
fn complete_directory_exits_0_and_skips_bad_env_keys() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_triplet(src.path(), "rpi4-01");
    fs::write(src.path().join(".reference.yaml"), "job_queue: x\n").unwrap();
    fs::write(src.path().join("notes.txt"), "not a triplet").unwrap();
    let r = import(src.path(), out.path(), &["--image", "lab/tf-agent:1.2"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("1 imported, 0 failed"), "{}", r.stdout);
    assert!(
        r.stdout.contains("env key \"bad-key\" skipped"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("env key \"LABVISOR_X\" skipped"),
        "{}",
        r.stdout
    );
    check_dir(out.path());
    let cfg = load_file(&out.path().join("rpi4-01.toml"), &Allow::default()).unwrap();
    assert_eq!(cfg.image, "lab/tf-agent:1.2");
    assert_eq!(cfg.tail, ["/srv/tf/rpi4-01/run/*/*.log"]);
    assert_eq!(cfg.job.timeout, Duration::from_secs(3600));
    // No output_timeout in the .conf: labvisor's default.
    assert_eq!(cfg.job.output_timeout, Duration::from_secs(15 * 60));
    assert_eq!(
        cfg.env.keys().collect::<Vec<_>>(),
        ["DEVICE_IP", "PORT", "TESTFLINGER_SERVER"],
        "numbers are kept as strings, bad keys dropped, the server added"
    );
    assert_eq!(cfg.env["PORT"], "22");

    // A second run refuses to overwrite, --force overwrites.
    let r = import(src.path(), out.path(), &[]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("rpi4-01.toml exists; pass --force"),
        "{}",
        r.stderr
    );
    let r = import(src.path(), out.path(), &["--force"]);
    assert_eq!(r.code, Some(0), "{}{}", r.stdout, r.stderr);
}

#[test]
fn broken_and_misnamed_triplets_are_named_and_the_rest_imports() {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    write_triplet(src.path(), "good-01");
    // Uppercase: not a SUT name.
    write_triplet(src.path(), "RPI4-02");
    // Broken YAML in the agent config.
    write_triplet(src.path(), "broken-03");
    fs::write(src.path().join("broken-03.conf"), "agent_id: [unclosed\n").unwrap();
    // A job template that is not a mapping, and a config without its required keys.
    write_triplet(src.path(), "odd-04");
    fs::write(src.path().join("odd-04.yaml"), "- just\n- a list\n").unwrap();
    fs::write(src.path().join("odd-04.conf"), "logging_level: INFO\n").unwrap();
    // Only a job template.
    fs::write(src.path().join("lonely-05.yaml"), "job_queue: lonely-05\n").unwrap();

    let r = import(src.path(), out.path(), &[]);
    assert_eq!(r.code, Some(1), "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("imported good-01: "), "{}", r.stdout);
    assert!(r.stdout.contains("1 imported, 4 failed"), "{}", r.stdout);
    for expected in [
        "RPI4-02: \"RPI4-02\" is not a valid SUT name",
        "rename the files to rpi4-02.conf, rpi4-02.yaml and rpi4-02_snappy.yaml",
        "broken-03: broken-03.conf: not valid YAML",
        "odd-04: odd-04.yaml: the job template must be a YAML mapping, found a list",
        "odd-04: odd-04.conf: `agent_id` is missing",
        "odd-04: odd-04.conf: `server_address` is missing",
        "lonely-05: lonely-05.conf is missing",
        "lonely-05: lonely-05_snappy.yaml is missing",
    ] {
        assert!(
            r.stderr.contains(expected),
            "{expected:?} not in:\n{}",
            r.stderr
        );
    }
    let written: Vec<String> = fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    assert_eq!(written, ["good-01.toml"]);
    check_dir(out.path());
}

#[test]
fn unreadable_input_directory_exits_2() {
    let out = tempfile::tempdir().unwrap();
    let r = import(&out.path().join("nope"), out.path(), &[]);
    assert_eq!(r.code, Some(2), "{}{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("cannot read"), "{}", r.stderr);
}
