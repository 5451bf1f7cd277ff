//! SUT config loading: the bad-file corpus, allow flags, symlinks, shipped files, hashing and
//! robustness against arbitrary input.

use std::fs;
use std::path::{Path, PathBuf};

use labvisor_protocol::config::{
    is_sut_file, load_file, load_str, scan_dir, Allow, HealthInterval, Network, Problem, Runtime,
    SutConfig,
};
use proptest::prelude::*;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn corpus_dir() -> PathBuf {
    manifest_dir().join("tests/corpus/bad")
}

fn workspace_dir() -> PathBuf {
    manifest_dir().join("..")
}

/// One `# expect:` line: `KEY: SUBSTRING`, or `syntax@LINE: SUBSTRING` for a syntax error.
#[derive(Debug)]
struct Expect {
    key: String,
    line: Option<usize>,
    substring: String,
}

fn expectations(path: &Path, text: &str) -> Vec<Expect> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# expect: ") else {
            continue;
        };
        // Keys may contain quoted parts with dots but never ": ".
        let (key, substring) = rest
            .split_once(": ")
            .unwrap_or_else(|| panic!("{}: malformed expect line {line:?}", path.display()));
        let (key, line) = match key.strip_prefix("syntax@") {
            Some(n) => (String::new(), Some(n.parse().expect("line number"))),
            None => (key.to_owned(), None),
        };
        out.push(Expect {
            key,
            line,
            substring: substring.to_owned(),
        });
    }
    assert!(
        text.starts_with("# expect: "),
        "{}: the first line must be an expect line",
        path.display()
    );
    out
}

fn corpus_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(corpus_dir())
        .expect("corpus dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p} (line {:?})\n", p.line))
        .collect()
}

#[test]
fn every_bad_file_reports_exactly_its_expected_problems() {
    let files = corpus_files();
    assert!(files.len() >= 22, "only {} corpus files", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let text = fs::read_to_string(path).expect("read corpus file");
        let expects = expectations(path, &text);
        let problems = match load_file(path, &Allow::default()) {
            Ok(_) => {
                failures.push(format!("{}: loaded without problems", path.display()));
                continue;
            }
            Err(p) => p,
        };
        for e in &expects {
            let found = problems.iter().any(|p| {
                p.key == e.key
                    && p.message.contains(&e.substring)
                    && (e.line.is_none() || p.line == e.line)
                    && p.file == path.display().to_string()
            });
            if !found {
                failures.push(format!(
                    "{}: expected {e:?}, got:\n{}",
                    path.display(),
                    render(&problems)
                ));
            }
        }
        if problems.len() != expects.len() {
            failures.push(format!(
                "{}: expected {} problem(s), got {}:\n{}",
                path.display(),
                expects.len(),
                problems.len(),
                render(&problems)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn syntax_errors_are_displayed_with_their_line() {
    let path = corpus_dir().join("syntax-error.toml");
    let problems = load_file(&path, &Allow::default()).unwrap_err();
    assert_eq!(problems.len(), 1);
    let shown = problems[0].to_string();
    assert!(
        shown.starts_with(&format!("{}:3: ", path.display())),
        "{shown}"
    );
}

#[test]
fn serde_problems_carry_their_line() {
    let problems = load_file(
        &corpus_dir().join("unknown-health-key.toml"),
        &Allow::default(),
    )
    .unwrap_err();
    assert_eq!(problems[0].line, Some(4));
    let problems =
        load_file(&corpus_dir().join("zero-retries.toml"), &Allow::default()).unwrap_err();
    assert_eq!(problems[0].line, Some(4));
}

/// Each allow flag lifts exactly its refusal: the corpus file becomes valid.
#[test]
fn allow_flags_permit_what_they_name() {
    let cases: [(&str, Allow); 7] = [
        (
            "network-named.toml",
            Allow {
                network: true,
                ..Allow::default()
            },
        ),
        (
            "cap-add.toml",
            Allow {
                caps: true,
                ..Allow::default()
            },
        ),
        (
            "new-privileges.toml",
            Allow {
                new_privileges: true,
                ..Allow::default()
            },
        ),
        (
            "privileged.toml",
            Allow {
                privileged: true,
                ..Allow::default()
            },
        ),
        (
            "host-network.toml",
            Allow {
                host_network: true,
                ..Allow::default()
            },
        ),
        (
            "host-mount.toml",
            Allow {
                host_mounts: true,
                ..Allow::default()
            },
        ),
        (
            "devices.toml",
            Allow {
                devices: true,
                ..Allow::default()
            },
        ),
    ];
    for (file, allow) in cases {
        let path = corpus_dir().join(file);
        let cfg = load_file(&path, &allow)
            .unwrap_or_else(|p| panic!("{file} with {allow:?}:\n{}", render(&p)));
        match file {
            "privileged.toml" => assert!(cfg.privileged),
            "host-network.toml" => assert_eq!(cfg.network, Network::Host),
            "host-mount.toml" => {
                assert_eq!(cfg.mounts.len(), 1);
                assert_eq!(cfg.mounts[0].source, "/srv/lab");
                assert!(cfg.mounts[0].read_only);
            }
            "devices.toml" => assert_eq!(cfg.devices, ["/dev/ttyUSB0"]),
            "network-named.toml" => {
                assert_eq!(cfg.network, Network::Named("other-net".into()))
            }
            "cap-add.toml" => assert_eq!(cfg.cap_add, ["NET_RAW", "SYS_PTRACE"]),
            "new-privileges.toml" => assert!(!cfg.no_new_privileges),
            _ => unreachable!(),
        }
        // A different flag does not help.
        let wrong = Allow {
            privileged: !allow.privileged,
            host_mounts: !allow.host_mounts,
            host_network: !allow.host_network,
            devices: !allow.devices,
            network: !allow.network,
            caps: !allow.caps,
            new_privileges: !allow.new_privileges,
            runtime: Runtime::Docker,
        };
        assert!(load_file(&path, &wrong).is_err(), "{file} with {wrong:?}");
    }
    // The shape of a mount is still checked when mounts are allowed.
    let problems = load_file(
        &corpus_dir().join("mount-relative.toml"),
        &Allow {
            host_mounts: true,
            ..Allow::default()
        },
    )
    .unwrap_err();
    assert_eq!(problems.len(), 1, "{}", render(&problems));
    assert_eq!(problems[0].key, "mounts[0].source");
}

#[test]
fn several_semantic_problems_are_all_reported() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
image = "x y"
files = ["../x", "/etc/passwd", "nope"]
privileged = true
network = "none"
tail = ["relative/*.log"]

[env]
LABVISOR_X = "1"

[labels]
"io.labvisor.sut" = "x"

[health]
heartbeat = "2s"
max_age = "1s"
interval = "often"

[job]
command = ["sh", "{bad}"]
template = "t.yaml"
queue_limit = 0

[restart]
backoff_min = "1m"
backoff_max = "1s"

[resources]
memory = -1
cpus = 0.0
"#;
    let problems = load_str("many.toml", text, dir.path(), &Allow::default()).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    let expected = [
        "image",
        "files[0]",
        "files[1]",
        "files[2]",
        "privileged",
        "network",
        "tail[0]",
        "env.LABVISOR_X",
        "labels.\"io.labvisor.sut\"",
        "health.max_age",
        "health.interval",
        "job.command[1]",
        "job.template",
        "job.queue_limit",
        "restart.backoff_max",
        "resources.memory",
        "resources.cpus",
    ];
    for k in expected {
        assert!(keys.contains(&k), "missing {k}:\n{}", render(&problems));
    }
    assert_eq!(problems.len(), expected.len(), "{}", render(&problems));
    // Semantic problems know their line too.
    let memory = problems
        .iter()
        .find(|p| p.key == "resources.memory")
        .unwrap();
    assert_eq!(memory.line, Some(29));
    assert!(problems.iter().all(|p| p.file == "many.toml"));
}

#[test]
fn a_bad_name_and_bad_contents_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let problems =
        load_str("Bad.toml", "image = \"\"\n", dir.path(), &Allow::default()).unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["name", "image"]);
}

/// A root supervisor must not read a SUT file that links out of its directory (to
/// /etc/shadow, say) and publish its parse errors: refused before a byte is read. A link to a
/// file inside the directory still works.
#[cfg(unix)]
#[test]
fn sut_files_may_not_be_symlinks_out_of_the_sut_dir() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let sut = root.path().join("sut");
    fs::create_dir(&sut).unwrap();
    // Outside: a "secret" whose parse errors would tell its line count and contents.
    let secret = root.path().join("shadow");
    fs::write(&secret, "root:$6$salt$hash:19000:0:99999:7:::\nuser:x:1\n").unwrap();
    symlink(&secret, sut.join("x.toml")).unwrap();
    symlink("../shadow", sut.join("rel.toml")).unwrap();
    fs::create_dir(sut.join("real")).unwrap();
    fs::write(sut.join("real/good.toml"), "image = \"x\"\n").unwrap();
    symlink("real/good.toml", sut.join("good.toml")).unwrap();

    let scan = scan_dir(&sut, &Allow::default()).unwrap();
    assert_eq!(
        scan.valid.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["good"],
        "a link inside the directory is fine"
    );
    assert_eq!(scan.invalid.len(), 2, "{:?}", scan.invalid);
    for (path, problems) in &scan.invalid {
        assert_eq!(problems.len(), 1, "{}", render(problems));
        let p = &problems[0];
        assert_eq!((p.key.as_str(), p.line), ("", None), "{p}");
        assert!(
            p.message.starts_with("refused: the file resolves to ")
                && p.message.contains("outside the sut directory"),
            "{}: {p}",
            path.display()
        );
        assert!(
            !p.message.contains("root:") && !p.message.contains("syntax"),
            "{p}"
        );
    }
    let p = load_file(&sut.join("x.toml"), &Allow::default()).unwrap_err();
    assert!(p[0].message.starts_with("refused: "), "{}", p[0]);
    // The reader itself, used by the supervisor right before a create.
    let e = labvisor_protocol::config::read_sut_file(&sut.join("rel.toml")).unwrap_err();
    assert!(
        matches!(e, labvisor_protocol::config::ReadError::Outside { .. }),
        "{e}"
    );
}

#[cfg(unix)]
#[test]
fn files_may_not_escape_the_sut_dir_through_a_symlink() {
    use std::os::unix::fs::symlink;
    let root = tempfile::tempdir().unwrap();
    let sut = root.path().join("sut");
    fs::create_dir(&sut).unwrap();
    fs::write(root.path().join("secret.txt"), "outside").unwrap();
    fs::create_dir(sut.join("shared")).unwrap();
    fs::write(sut.join("shared/real.yaml"), "inside").unwrap();
    symlink(root.path().join("secret.txt"), sut.join("escape.txt")).unwrap();
    symlink(sut.join("shared/real.yaml"), sut.join("inside.yaml")).unwrap();
    // A relative link that climbs out and back in stays inside.
    symlink("../sut/shared/real.yaml", sut.join("roundtrip.yaml")).unwrap();

    let bad = "image = \"x\"\nfiles = [\"escape.txt\"]\n";
    let problems = load_str("dev.toml", bad, &sut, &Allow::default()).unwrap_err();
    assert_eq!(problems.len(), 1, "{}", render(&problems));
    assert_eq!(problems[0].key, "files[0]");
    assert!(
        problems[0].message.contains("symlink escape refused"),
        "{}",
        problems[0]
    );

    let good =
        "image = \"x\"\nfiles = [\"inside.yaml\", \"roundtrip.yaml\", \"./shared/real.yaml\"]\n";
    let cfg = load_str("dev.toml", good, &sut, &Allow::default())
        .unwrap_or_else(|p| panic!("{}", render(&p)));
    let names: Vec<&str> = cfg.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["inside.yaml", "roundtrip.yaml", "shared/real.yaml"]);
    assert!(cfg.files.iter().all(|f| f.content == b"inside"));
    assert_eq!(
        cfg.files[2].container_path(),
        "/labvisor/sut/shared/real.yaml"
    );
}

#[test]
fn files_larger_than_one_mib_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("big.bin"), vec![0u8; 1024 * 1024 + 1]).unwrap();
    fs::write(dir.path().join("ok.bin"), vec![0u8; 1024 * 1024]).unwrap();
    let problems = load_str(
        "dev.toml",
        "image = \"x\"\nfiles = [\"big.bin\", \"ok.bin\"]\n",
        dir.path(),
        &Allow::default(),
    )
    .unwrap_err();
    assert_eq!(problems.len(), 1, "{}", render(&problems));
    assert_eq!(problems[0].key, "files[0]");
    assert!(problems[0].message.contains("larger than"));
}

#[test]
fn defaults_are_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load_str("min.toml", "image = \"x\"\n", dir.path(), &Allow::default()).unwrap();
    let json = serde_json::to_value(&cfg).unwrap();
    let expected = serde_json::json!({
        "name": "min",
        "image": "x",
        "command": null,
        "env": {},
        "files": [],
        "tail": [],
        "network": "labvisor",
        "labels": {},
        "privileged": false,
        "cap_add": [],
        "no_new_privileges": true,
        "devices": [],
        "mounts": [],
        "health": {
            "heartbeat": "5s", "max_age": "30s", "interval": "auto", "timeout": "5s",
            "retries": 3, "start_period": "30s"
        },
        "job": {
            "command": ["/bin/sh", "{job_file}"], "template": null, "timeout": "4h",
            "output_timeout": "15m", "queue_limit": 100, "max_payload": 65536,
            "requeue_lost": false
        },
        "restart": {
            "on_unhealthy": "restart", "backoff_min": "1s", "backoff_max": "5m",
            "on_child_exit": "restart", "crash_loop_after": 5
        },
        "resources": { "memory": null, "cpus": null, "pids": 4096 },
        "log": { "max_size": 10485760, "keep": 5 },
        "probe": null
    });
    assert_eq!(json, expected);
    assert_eq!(cfg.health.interval, HealthInterval::Auto);
    assert_eq!(
        cfg.health
            .detection_time(std::time::Duration::from_secs(10)),
        std::time::Duration::from_secs(60)
    );
}

#[test]
fn sizes_accept_bytes_and_units() {
    let dir = tempfile::tempdir().unwrap();
    let text = "image = \"x\"\n[job]\nmax_payload = 1000\n[resources]\nmemory = \"2GiB\"\ncpus = 2\n[log]\nmax_size = \"5MB\"\n";
    let cfg = load_str("s.toml", text, dir.path(), &Allow::default()).unwrap();
    assert_eq!(cfg.job.max_payload.get(), 1000);
    assert_eq!(cfg.resources.memory.map(|m| m.get()), Some(2 << 30));
    assert_eq!(cfg.resources.cpus, Some(2.0));
    assert_eq!(cfg.log.max_size.get(), 5_000_000);
}

fn shipped_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["sut", "examples/testflinger"] {
        for e in fs::read_dir(workspace_dir().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|e| e == "toml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn every_shipped_sut_file_is_valid() {
    let files = shipped_files();
    assert!(files.len() >= 3, "{files:?}");
    for path in files {
        assert!(is_sut_file(&path), "{}", path.display());
        if let Err(p) = load_file(&path, &Allow::default()) {
            panic!("{}:\n{}", path.display(), render(&p));
        }
    }
    let scan = scan_dir(&workspace_dir().join("sut"), &Allow::default()).unwrap();
    assert!(scan.invalid.is_empty(), "{:?}", scan.invalid);
    let names: Vec<&str> = scan.valid.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["demo-01", "demo-02"]);
}

#[test]
fn the_testflinger_example_carries_its_triplet() {
    let path = workspace_dir().join("examples/testflinger/tf-rpi4-01.toml");
    let cfg = load_file(&path, &Allow::default()).unwrap();
    let names: Vec<&str> = cfg.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "tf-rpi4-01.conf",
            "tf-rpi4-01.yaml",
            "tf-rpi4-01_snappy.yaml",
            "tf-job",
            "tf-rpi4-01.token",
        ]
    );
    assert_eq!(cfg.job.template.as_deref(), Some("tf-rpi4-01.yaml"));
    assert_eq!(
        cfg.job.command.args(),
        ["python3", "/labvisor/sut/tf-job", "{job_file}"]
    );
}

fn hash_of(dir: &Path, text: &str) -> String {
    load_str("dev.toml", text, dir, &Allow::default())
        .unwrap_or_else(|p| panic!("{}", render(&p)))
        .hash()
}

/// `health.interval` is `auto` unless written; an explicit one may be longer than `max_age`
/// (the supervisor, not Docker, acts on a stale heartbeat); `auto` and an explicit interval
/// hash differently, so writing `"10s"` into a file of an `auto` container recreates it with
/// that interval.
#[test]
fn the_health_interval_is_auto_unless_written_and_may_exceed_max_age() {
    let dir = tempfile::tempdir().unwrap();
    let load = |health: &str| {
        load_str(
            "dev.toml",
            &format!("image = \"x\"\n[health]\n{health}"),
            dir.path(),
            &Allow::default(),
        )
        .unwrap_or_else(|p| panic!("{}", render(&p)))
    };
    let s = std::time::Duration::from_secs;
    assert_eq!(load("").health.interval, HealthInterval::Auto);
    assert_eq!(
        load("interval = \"auto\"\n").health.interval,
        HealthInterval::Auto
    );
    let long = load("heartbeat = \"1s\"\nmax_age = \"4s\"\ninterval = \"10m\"\ntimeout = \"9m\"\n");
    assert_eq!(long.health.interval, HealthInterval::Every(s(600)));
    assert_eq!(long.health.interval.shortest(), s(600));
    assert_eq!(HealthInterval::Auto.shortest(), s(10));
    assert_eq!(
        load("timeout = \"9s\"\n").health.timeout,
        s(9),
        "below the auto floor"
    );
    let hash = |health: &str| hash_of(dir.path(), &format!("image = \"x\"\n[health]\n{health}"));
    assert_eq!(hash(""), hash("interval = \"auto\"\n"));
    assert_ne!(
        hash(""),
        hash("interval = \"10s\"\n"),
        "an explicit interval is a change"
    );
    assert_ne!(hash(""), hash("interval = \"20s\"\n"));
}

#[test]
fn hash_ignores_comments_and_formatting_but_not_content() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("agent.conf"), "a: 1\n").unwrap();
    let text = "image = \"x\"\nfiles = [\"agent.conf\"]\n[health]\nretries = 4\n";
    let h1 = hash_of(dir.path(), text);
    assert_eq!(h1.len(), 64);
    assert!(h1.chars().all(|c| c.is_ascii_hexdigit()));

    let commented = "# a comment\nimage   =   \"x\" # the image\n\nfiles = [ \"agent.conf\", ]\n[health] # timings\nretries = 4\n";
    assert_eq!(hash_of(dir.path(), commented), h1);
    // Spelling a default explicitly is the same config.
    let explicit = format!("{text}heartbeat = \"5s\"\n");
    assert_eq!(hash_of(dir.path(), &explicit), h1);

    fs::write(dir.path().join("agent.conf"), "a: 2\n").unwrap();
    let h2 = hash_of(dir.path(), text);
    assert_ne!(h2, h1, "a changed file content must change the hash");

    let h3 = hash_of(
        dir.path(),
        "image = \"x\"\nfiles = [\"agent.conf\"]\n[health]\nretries = 5\n",
    );
    assert_ne!(h3, h2);
}

/// `extra_hosts` is in the hash; a config without it keeps the hash it had before the key
/// existed (the key is left out of the serialisation when empty).
#[test]
fn extra_hosts_are_hashed_and_absent_ones_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plain = load_str("a.toml", "image = \"x\"\n", dir.path(), &Allow::default()).unwrap();
    assert!(plain.extra_hosts.is_empty());
    assert!(!serde_json::to_string(&plain)
        .unwrap()
        .contains("extra_hosts"));
    let h0 = hash_of(dir.path(), "image = \"x\"\n");
    assert_eq!(hash_of(dir.path(), "image = \"x\"\nextra_hosts = []\n"), h0);
    let h1 = hash_of(
        dir.path(),
        "image = \"x\"\nextra_hosts = [\"tfserver:host-gateway\"]\n",
    );
    assert_ne!(h1, h0);
    let h2 = hash_of(
        dir.path(),
        "image = \"x\"\nextra_hosts = [\"tfserver:10.0.0.1\"]\n",
    );
    assert_ne!(h2, h1, "the address is in the hash");
    let c = load_str(
        "a.toml",
        "image = \"x\"\nextra_hosts = [\"tfserver:host-gateway\", \"dut:10.0.0.5\"]\n",
        dir.path(),
        &Allow::default(),
    )
    .unwrap();
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(
        json["extra_hosts"],
        serde_json::json!(["tfserver:host-gateway", "dut:10.0.0.5"])
    );
}

/// A URL probe serialises (and so hashes) exactly as before exec probes existed; an exec probe
/// is `command`, its argv as given.
#[test]
fn a_url_probe_keeps_its_serialisation_and_a_command_probe_is_its_argv() {
    let dir = tempfile::tempdir().unwrap();
    let load = |t: &str| load_str("a.toml", t, dir.path(), &Allow::default()).unwrap();
    let c = load("image = \"x\"\n[probe]\nurl = \"tcp://dut:22\"\n");
    assert_eq!(
        serde_json::to_string(&c.probe).unwrap(),
        r#"{"url":"tcp://dut:22","interval":"1m","timeout":"10s"}"#
    );
    let c = load("image = \"x\"\n[probe]\ncommand = [\"sh\", \"-c\", \"exit 0\"]\ninterval = \"5s\"\ntimeout = \"2s\"\n");
    assert_eq!(
        serde_json::to_string(&c.probe).unwrap(),
        r#"{"command":["sh","-c","exit 0"],"interval":"5s","timeout":"2s"}"#
    );
    assert_eq!(
        c.probe.unwrap().check,
        labvisor_protocol::config::ProbeCheck::Command(vec![
            "sh".into(),
            "-c".into(),
            "exit 0".into()
        ])
    );
}

#[test]
fn scan_skips_editor_files_and_reports_invalid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("good.toml"), "image = \"x\"\n").unwrap();
    fs::write(d.join("bad.toml"), "image = 3\n").unwrap();
    for junk in [
        ".good.toml.swp",
        "good.toml~",
        ".#good.toml",
        "4913",
        "notes.txt",
    ] {
        fs::write(d.join(junk), "garbage [[[").unwrap();
    }
    let scan = scan_dir(d, &Allow::default()).unwrap();
    assert_eq!(scan.valid.len(), 1);
    assert!(scan.valid.keys().any(|n| n.as_str() == "good"));
    assert_eq!(
        scan.invalid.keys().collect::<Vec<_>>(),
        [&d.join("bad.toml")]
    );
    assert!(scan_dir(&d.join("missing"), &Allow::default()).is_err());
}

/// Entries named like SUT files that cannot be one are reported, never silently skipped: a bad
/// name, a directory, a dangling symlink, and a name that is not UTF-8.
#[test]
fn scan_reports_what_looks_like_a_sut_file_but_cannot_be_one() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::write(d.join("good.toml"), "image = \"x\"\n").unwrap();
    fs::write(d.join("Bad_Name.toml"), "image = \"x\"\n").unwrap();
    fs::create_dir(d.join("dir.toml")).unwrap();
    std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling.toml")).unwrap();
    let latin1 = d.join(std::ffi::OsStr::from_bytes(b"caf\xe9.toml"));
    fs::write(&latin1, "image = \"x\"\n").unwrap();
    // Not meant as SUT files at all: still ignored.
    fs::write(d.join(std::ffi::OsStr::from_bytes(b"caf\xe9.txt")), "x").unwrap();
    fs::create_dir(d.join("shared")).unwrap();

    let scan = scan_dir(d, &Allow::default()).unwrap();
    assert_eq!(scan.valid.len(), 1);
    let mut want = vec![
        d.join("Bad_Name.toml"),
        d.join("dangling.toml"),
        d.join("dir.toml"),
        latin1.clone(),
    ];
    want.sort();
    assert_eq!(scan.invalid.keys().cloned().collect::<Vec<_>>(), want);
    let one = |p: &std::path::Path| {
        let probs = &scan.invalid[p];
        assert_eq!(probs.len(), 1, "{probs:?}");
        probs[0].clone()
    };
    assert_eq!(one(&d.join("Bad_Name.toml")).key, "name");
    let dir_problem = one(&d.join("dir.toml"));
    assert!(
        dir_problem.message.contains("is a directory"),
        "{dir_problem}"
    );
    assert!(one(&d.join("dangling.toml"))
        .message
        .starts_with("cannot read the file"));
    let name = one(&latin1);
    assert_eq!(name.key, "name");
    assert!(name.message.contains("not valid UTF-8"), "{name}");
    assert_eq!(name.file, latin1.display().to_string());
}

/// Keys, each with a strategy for a plausible (often wrong) value.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"5s\"".to_owned()),
        Just("\"0s\"".to_owned()),
        Just("\"64KiB\"".to_owned()),
        Just("\"x\"".to_owned()),
        Just("\"\"".to_owned()),
        Just("\"host\"".to_owned()),
        Just("\"../x\"".to_owned()),
        Just("\"{job_file}\"".to_owned()),
        Just("true".to_owned()),
        Just("[]".to_owned()),
        Just("[\"/bin/sh\", \"{nope}\"]".to_owned()),
        Just("[\"/dev/ttyUSB0\"]".to_owned()),
        Just("{ a = \"b\" }".to_owned()),
        Just("[{ source = \"/a\", target = \"b\" }]".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "[ -~]{0,12}".prop_map(|s| format!("{s:?}")),
    ]
}

const TOP: &[&str] = &[
    "image",
    "command",
    "env",
    "files",
    "tail",
    "network",
    "labels",
    "privileged",
    "devices",
    "mounts",
    "bogus",
];
const TABLES: &[(&str, &[&str])] = &[
    (
        "health",
        &[
            "heartbeat",
            "max_age",
            "interval",
            "timeout",
            "retries",
            "start_period",
        ],
    ),
    (
        "job",
        &[
            "command",
            "template",
            "timeout",
            "output_timeout",
            "queue_limit",
            "max_payload",
            "requeue_lost",
        ],
    ),
    (
        "restart",
        &[
            "on_unhealthy",
            "backoff_min",
            "backoff_max",
            "on_child_exit",
            "crash_loop_after",
        ],
    ),
    ("resources", &["memory", "cpus"]),
    ("log", &["max_size", "keep"]),
    ("probe", &["url", "command", "interval", "timeout"]),
];

fn document() -> impl Strategy<Value = String> {
    let top = prop::collection::vec((prop::sample::select(TOP), value()), 0..6);
    let tables = prop::collection::vec(
        (0..TABLES.len()).prop_flat_map(|t| {
            let (name, keys) = TABLES[t];
            prop::collection::vec((prop::sample::select(keys), value()), 0..5)
                .prop_map(move |kv| (name, kv))
        }),
        0..4,
    );
    (top, tables).prop_map(|(top, tables)| {
        let mut doc = String::new();
        for (k, v) in top {
            doc.push_str(&format!("{k} = {v}\n"));
        }
        for (name, kv) in tables {
            doc.push_str(&format!("[{name}]\n"));
            for (k, v) in kv {
                doc.push_str(&format!("{k} = {v}\n"));
            }
        }
        doc
    })
}

fn check_outcome(result: Result<SutConfig, Vec<Problem>>, text: &str) {
    match result {
        Ok(cfg) => {
            // A valid config's invariants hold.
            assert!(!cfg.image.is_empty());
            assert!(cfg.health.max_age > cfg.health.heartbeat);
            assert!(cfg.health.timeout < cfg.health.interval.shortest());
            assert!(cfg.restart.backoff_max >= cfg.restart.backoff_min);
            let _ = cfg.hash();
        }
        Err(problems) => {
            assert!(!problems.is_empty());
            let lines = text.lines().count().max(1);
            for p in problems {
                assert!(!p.message.is_empty());
                if let Some(l) = p.line {
                    assert!(l >= 1 && l <= lines + 1, "line {l} of {lines}: {p}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let dir = tempfile::tempdir().unwrap();
        check_outcome(load_str("fuzz.toml", &text, dir.path(), &Allow::default()), &text);
    }

    #[test]
    fn arbitrary_documents_never_panic(text in document(), allow_all in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let allow = if allow_all { Allow::all() } else { Allow::default() };
        check_outcome(load_str("fuzz.toml", &text, dir.path(), &allow), &text);
    }
}

#[test]
fn job_template_matches_files_by_normalised_path() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("job.yaml"), "job_queue: x\n").unwrap();
    let text = "image = \"x\"\nfiles = [\"./job.yaml\"]\n[job]\ntemplate = \"job.yaml\"\n";
    let cfg = load_str("t.toml", text, dir.path(), &Allow::default())
        .unwrap_or_else(|p| panic!("{}", render(&p)));
    assert_eq!(cfg.job.template.as_deref(), Some("job.yaml"));
    assert_eq!(cfg.files[0].name, "job.yaml");
}

fn build_dir() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().unwrap();
    let sut = t.path().join("sut");
    fs::create_dir_all(sut.join("img")).unwrap();
    fs::write(sut.join("img/Dockerfile"), "FROM scratch\nCOPY a /a\n").unwrap();
    fs::write(sut.join("img/a"), "1").unwrap();
    (t, sut)
}

#[test]
fn build_context_is_hashed_into_the_config_hash() {
    let (_t, sut) = build_dir();
    let text = "image = \"x:built\"\n[build]\ncontext = \"./img/\"\nargs = { A = \"1\" }\n";
    let load = || load_str("a.toml", text, &sut, &Allow::default()).unwrap();
    let c1 = load();
    let b = c1.build.as_ref().unwrap();
    assert_eq!(b.context, "img");
    assert_eq!(b.dockerfile, "Dockerfile");
    assert_eq!(b.context_dir, sut.join("img").canonicalize().unwrap());
    assert_eq!(load().hash(), c1.hash(), "stable");
    fs::write(sut.join("img/a"), "2").unwrap();
    let c2 = load();
    assert_ne!(c2.hash(), c1.hash(), "a context file changed");
    assert_ne!(c2.build.as_ref().unwrap().hash(), b.hash());
    fs::write(sut.join("img/new"), "").unwrap();
    assert_ne!(load().hash(), c2.hash(), "a file was added");
    // Configs without [build] keep the hash they had before [build] existed.
    let plain = load_str("a.toml", "image = \"x\"\n", &sut, &Allow::default()).unwrap();
    assert!(!serde_json::to_string(&plain).unwrap().contains("build"));
}

#[test]
fn build_context_and_dockerfile_symlink_escapes_are_refused() {
    let (t, sut) = build_dir();
    let outside = t.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("Dockerfile"), "FROM scratch\n").unwrap();
    std::os::unix::fs::symlink(&outside, sut.join("escape")).unwrap();
    let p = load_str(
        "a.toml",
        "image = \"x\"\n[build]\ncontext = \"escape\"\n",
        &sut,
        &Allow::default(),
    )
    .unwrap_err();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "build.context");
    assert!(p[0].message.contains("symlink escape refused"), "{p:?}");

    std::os::unix::fs::symlink(outside.join("Dockerfile"), sut.join("img/Outside")).unwrap();
    let p = load_str(
        "a.toml",
        "image = \"x\"\n[build]\ncontext = \"img\"\ndockerfile = \"Outside\"\n",
        &sut,
        &Allow::default(),
    )
    .unwrap_err();
    assert_eq!(p[0].key, "build.dockerfile");
    assert!(p[0].message.contains("outside the build context"), "{p:?}");

    // The agent's view: [build] parsed but not checked (the context is not in the container).
    fs::write(
        sut.join("b.toml"),
        "image = \"x\"\n[build]\ncontext = \"gone\"\n",
    )
    .unwrap();
    assert!(load_file(&sut.join("b.toml"), &Allow::default()).is_err());
    let c = labvisor_protocol::config::load_delivered_file(&sut.join("b.toml"), &Allow::default())
        .unwrap();
    assert!(c.build.is_none());

    // The same, inline (the supervisor's LABVISOR_CONFIG_TOML): no file at that path; the name
    // comes from the path's stem, and problems name the path.
    let inline = sut.join("inline-1.toml");
    let c = labvisor_protocol::config::load_delivered_str(
        &inline,
        "image = \"x\"\n[build]\ncontext = \"gone\"\n",
        &Allow::default(),
    )
    .unwrap();
    assert_eq!(c.name.as_str(), "inline-1");
    assert!(c.build.is_none());
    let p = labvisor_protocol::config::load_delivered_str(&inline, "imag = 1\n", &Allow::default())
        .unwrap_err();
    assert!(
        p.iter().all(|p| p.file == inline.display().to_string()),
        "{p:?}"
    );
    assert!(p.iter().any(|p| p.key == "imag"), "{p:?}");
}

/// README.md's config reference is the schema's own table (the `//!` doc of
/// `labvisor_protocol::config`), row for row: a key added to the schema is documented for users.
#[test]
fn readme_config_reference_matches_the_schema_doc() {
    let schema = std::fs::read_to_string(manifest_dir().join("src/config/mod.rs")).unwrap();
    let readme = std::fs::read_to_string(workspace_dir().join("README.md")).unwrap();
    let rows: Vec<&str> = schema
        .lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .filter(|l| l.starts_with("| `"))
        .collect();
    assert!(rows.len() > 30, "the schema doc has its table");
    let readme_rows: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
    let missing: Vec<&&str> = rows.iter().filter(|r| !readme_rows.contains(r)).collect();
    assert!(
        missing.is_empty(),
        "README.md lacks or differs in these config reference rows (copy them from protocol/src/config/mod.rs):\n{}",
        missing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n")
    );
}

/// `[device]`: the globs and the drain signal are kept as checked values (a signal given as
/// `usr1` is `SIGUSR1`); a config without the section, or with an empty one, keeps the hash it
/// had before `[device]` existed, and each key changes the hash.
#[test]
fn device_section_is_checked_and_hashed_only_when_set() {
    use labvisor_protocol::config::DrainSignal;
    let dir = tempfile::tempdir().unwrap();
    let base = "image = \"x\"\ncommand = [\"testflinger-agent\"]\n";
    let cfg = load_str(
        "dev.toml",
        &format!("{base}[device]\nbusy_glob = [\"/tmp/testflinger/run/*/testflinger.json\"]\ndrain_signal = \"usr1\"\n"),
        dir.path(),
        &Allow::default(),
    )
    .unwrap_or_else(|p| panic!("{}", render(&p)));
    let globs: Vec<&str> = cfg.device.busy_glob.iter().map(|g| g.as_str()).collect();
    assert_eq!(globs, ["/tmp/testflinger/run/*/testflinger.json"]);
    assert_eq!(cfg.device.drain_signal, Some(DrainSignal::Usr1));
    assert_eq!(cfg.device.drain_signal.unwrap().to_string(), "SIGUSR1");

    let plain = hash_of(dir.path(), base);
    let plain_cfg = load_str("dev.toml", base, dir.path(), &Allow::default()).unwrap();
    assert!(!serde_json::to_string(&plain_cfg)
        .unwrap()
        .contains("busy_glob"));
    assert_eq!(hash_of(dir.path(), &format!("{base}[device]\n")), plain);
    let globbed = hash_of(
        dir.path(),
        &format!("{base}[device]\nbusy_glob = [\"/tmp/x/*\"]\n"),
    );
    assert_ne!(globbed, plain);
    let drained = hash_of(
        dir.path(),
        &format!("{base}[device]\nbusy_glob = [\"/tmp/x/*\"]\ndrain_signal = \"SIGUSR1\"\n"),
    );
    assert_ne!(drained, globbed);
}

/// `[placement]`: the host and each constraint are checked (problems at `placement.host` and
/// `placement.constraints[i]`, with the line), kept in Swarm's form with the host first, and in
/// the hash only when set.
#[test]
fn placement_is_checked_normalised_and_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let base = "image = \"x\"\n";
    let text = format!(
        "{base}[placement]\nhost = \"rack3-agent-host\"\nconstraints = [\"node.labels.rack == 3\", \"node.role != manager\"]\n"
    );
    let cfg = load_str("dev.toml", &text, dir.path(), &Allow::default())
        .unwrap_or_else(|p| panic!("{}", render(&p)));
    assert_eq!(cfg.placement.host(), Some("rack3-agent-host"));
    assert_eq!(
        cfg.placement.swarm_constraints(),
        [
            "node.hostname==rack3-agent-host",
            "node.labels.rack==3",
            "node.role!=manager"
        ]
    );

    let plain = hash_of(dir.path(), base);
    assert_eq!(hash_of(dir.path(), &format!("{base}[placement]\n")), plain);
    let placed = hash_of(dir.path(), &text);
    assert_ne!(placed, plain);
    let moved = hash_of(dir.path(), &text.replace("rack3", "rack4"));
    assert_ne!(
        moved, placed,
        "moving a SUT to another host changes its hash"
    );
    let spaced = hash_of(dir.path(), &text.replace(" == 3", "==3"));
    assert_eq!(spaced, placed, "the normalised form is hashed");

    let bad = format!(
        "{base}[placement]\nhost = \"rack_3\"\nconstraints = [\n  \"node.labels.rack == 3\",\n  \"node.lables.rack == 3\",\n  \"node.role == boss\",\n  \"rack = 3\",\n]\n"
    );
    let problems = load_str("dev.toml", &bad, dir.path(), &Allow::default()).unwrap_err();
    let got: Vec<(String, Option<usize>)> =
        problems.iter().map(|p| (p.key.clone(), p.line)).collect();
    assert_eq!(
        got,
        [
            ("placement.host".to_owned(), Some(3)),
            ("placement.constraints[1]".to_owned(), Some(6)),
            ("placement.constraints[2]".to_owned(), Some(7)),
            ("placement.constraints[3]".to_owned(), Some(8)),
        ],
        "{}",
        render(&problems)
    );
    let shown = problems[1].to_string();
    assert_eq!(
        shown,
        "dev.toml: placement.constraints[1]: \"node.lables.rack == 3\": \"node.lables.rack\" is not a Swarm constraint key; use node.id, node.hostname, node.role, node.platform.os, node.platform.arch, node.labels.<name> or engine.labels.<name>"
    );
    assert!(problems[0]
        .message
        .contains("\"rack_3\" is not a host name"));
    assert!(problems[2].message.contains("\"manager\" or \"worker\""));
    assert!(problems[3].message.contains("is not `<key> == <value>`"));

    let unknown = load_str(
        "dev.toml",
        &format!("{base}[placement]\nnode = \"a\"\n"),
        dir.path(),
        &Allow::default(),
    )
    .unwrap_err();
    assert_eq!(unknown[0].key, "placement.node", "{}", render(&unknown));
}

/// Under `--runtime swarm`, `devices`, `privileged = true` and `[build]` are refused whatever
/// the flags say, each at its key with why and what to do instead; what the local runtime
/// refuses without a flag stays refused; the local runtime with the flags accepts them.
#[test]
fn swarm_refuses_what_a_service_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("ctx")).unwrap();
    fs::write(dir.path().join("ctx/Dockerfile"), "FROM scratch\n").unwrap();
    let text = "image = \"x\"\nprivileged = true\ndevices = [\"/dev/ttyUSB0\"]\n[build]\ncontext = \"ctx\"\n";
    load_str("dev.toml", text, dir.path(), &Allow::all())
        .unwrap_or_else(|p| panic!("{}", render(&p)));

    let swarm = Allow::all().on(Runtime::Swarm);
    let problems = load_str("dev.toml", text, dir.path(), &swarm).unwrap_err();
    let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        shown,
        [
            "dev.toml: privileged: refused under --runtime swarm: Swarm services on Engine 20.10 \
             cannot be privileged; run this SUT under a supervisor with the local runtime on its \
             host (`labvisor supervise --runtime docker --allow-privileged`)",
            "dev.toml: devices: refused under --runtime swarm: Swarm services cannot pass host \
             devices (moby/swarmkit#1244); run this SUT under a supervisor with the local runtime \
             on the device's host (`labvisor supervise --runtime docker --allow-devices`), or \
             reach the device over the network",
            "dev.toml: build: refused under --runtime swarm: Swarm nodes cannot get an image built \
             by the supervisor; build it on each node, or push it to your registry, name it in \
             `image` and drop [build]",
        ]
    );
    let lines: Vec<Option<usize>> = problems.iter().map(|p| p.line).collect();
    assert_eq!(lines, [Some(2), Some(3), Some(4)]);

    // Without the flags: one refusal each (the flag would not help), no double report.
    let bare = load_str(
        "dev.toml",
        text,
        dir.path(),
        &Allow::default().on(Runtime::Swarm),
    )
    .unwrap_err();
    assert_eq!(bare.len(), 3, "{}", render(&bare));
    assert!(bare
        .iter()
        .all(|p| p.message.starts_with("refused under --runtime swarm")));

    // What the local runtime refuses without a flag stays refused under Swarm.
    let mounts = "image = \"x\"\nmounts = [{ source = \"/a\", target = \"/b\" }]\n";
    let refused = load_str(
        "dev.toml",
        mounts,
        dir.path(),
        &Allow::default().on(Runtime::Swarm),
    )
    .unwrap_err();
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0].message.contains("--allow-host-mounts"),
        "{}",
        render(&refused)
    );

    // A plain file is valid under both, with the same hash.
    let plain = "image = \"x\"\n";
    let a = load_str("dev.toml", plain, dir.path(), &Allow::default()).unwrap();
    let b = load_str("dev.toml", plain, dir.path(), &swarm).unwrap();
    assert_eq!(a.hash(), b.hash());
}
