//! Every script in `tools/` answers `--help` and `-h` with its usage text (the comment block at
//! its top) and nothing else: no script code, no side effects, exit status 0.
//!
//! The scripts run with a `PATH` of only the few programs printing a usage needs (no docker,
//! cargo, apt-get or sudo), so a script that ignored `--help` and went on with its work fails
//! at once instead of doing anything.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use labvisor_tests::workspace_root;

/// The usage text: the comment lines after the shebang, up to the first line that is not a
/// comment, without their `# ` (or `#`).
fn header(script: &Path) -> String {
    let text = std::fs::read_to_string(script).unwrap();
    let mut out = String::new();
    for line in text.lines().skip(1) {
        let Some(rest) = line.strip_prefix('#') else {
            break;
        };
        out.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        out.push('\n');
    }
    out
}

/// A directory of symlinks to the only programs the scripts may use here.
fn minimal_path() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for prog in ["bash", "sh", "awk", "sed", "dirname", "basename", "cat"] {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(prog))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{prog} is not installed"));
        std::os::unix::fs::symlink(found, bin.join(prog)).unwrap();
    }
    (dir, bin)
}

/// Runs `bash script arg` with `path` as PATH; kills it after 10 s. Returns (status, stdout,
/// stderr).
fn run_help(script: &Path, arg: &str, path: &Path) -> (Option<i32>, String, String) {
    let mut child = Command::new("/bin/bash")
        .arg(script)
        .arg(arg)
        .env_clear()
        .env("PATH", path)
        .env("HOME", path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_tool_prints_its_usage_on_help() {
    let tools = workspace_root().join("tools");
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(&tools)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        // Sourced by the others, never run.
        .filter(|p| p.file_name().is_some_and(|n| n != "lib.sh"))
        .collect();
    scripts.sort();
    assert_eq!(scripts.len(), 11, "{scripts:?}");
    let (_dir, path) = minimal_path();
    for script in &scripts {
        let want = header(script);
        assert!(
            want.lines().count() >= 3,
            "{}: no usage text",
            script.display()
        );
        for arg in ["--help", "-h"] {
            let (code, stdout, stderr) = run_help(script, arg, &path);
            let name = format!("{} {arg}", script.display());
            assert_eq!(code, Some(0), "{name}: {stderr}");
            assert_eq!(stdout, want, "{name}");
            assert_eq!(stderr, "", "{name}");
        }
    }
}
