//! The built boot binary (`cargo static-boot`) joins real parts and executes them: a program
//! split into parts runs with the boot binary's arguments (its own name included) and its
//! environment, from a memory file named after the boot binary; the parts are found next to the
//! binary as `<its path>.parts` (or where `LABVISOR_BOOT_PARTS` says); each failure is one line
//! and exit status 125.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The static boot binary, under `$CARGO_TARGET_DIR` when set, else the workspace's `target/`.
fn boot_bin() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let p = target.join("x86_64-unknown-linux-gnu/release/labvisor-boot");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo static-boot` (tools/build-static.sh does)",
        p.display()
    );
    p
}

/// Splits `program` into parts of `chunk` bytes in `dir`, with its manifest; returns the count.
fn split(program: &Path, dir: &Path, chunk: usize) -> usize {
    let bytes = std::fs::read(program).unwrap();
    let parts: Vec<&[u8]> = bytes.chunks(chunk).collect();
    for (i, part) in parts.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:03}")), part).unwrap();
    }
    std::fs::write(
        dir.join("manifest"),
        format!("parts={}\nsize={}\n", parts.len(), bytes.len()),
    )
    .unwrap();
    parts.len()
}

fn boot(dir: &Path, args: &[&str]) -> Output {
    Command::new(boot_bin())
        .args(args)
        .env("LABVISOR_BOOT_PARTS", dir)
        .env("BOOT_TEST_VAR", "from the environment")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[ignore = "needs the static binaries: tools/test.sh builds them"]
fn a_split_program_runs_from_memory_with_its_arguments_and_environment() {
    let dir = tempfile::tempdir().unwrap();
    let sh = std::fs::canonicalize("/bin/sh").unwrap();
    assert!(split(&sh, dir.path(), 16 * 1024) > 3, "several parts");
    let script =
        "tr '\\0' ' ' < /proc/$$/cmdline; echo; echo \"$BOOT_TEST_VAR\"; readlink /proc/$$/exe";
    let out = boot(dir.path(), &["-c", script, "x", "two words"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            format!("{} -c {script} x two words ", boot_bin().display()),
            "from the environment".to_owned(),
            "/memfd:labvisor-boot (deleted)".to_owned(),
        ]
    );

    // Installed as /x/labvisor-agent with its parts in /x/labvisor-agent.parts, as the Swarm
    // runtime mounts it: found without the variable, named after itself.
    let root = tempfile::tempdir().unwrap();
    let installed = root.path().join("labvisor-agent");
    std::fs::copy(boot_bin(), &installed).unwrap();
    let parts = root.path().join("labvisor-agent.parts");
    std::fs::create_dir(&parts).unwrap();
    split(&sh, &parts, 16 * 1024);
    let out = Command::new(&installed)
        .args(["-c", "readlink /proc/$$/exe; echo \"$0\""])
        .env_remove("LABVISOR_BOOT_PARTS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("/memfd:labvisor-agent (deleted)\n{}\n", installed.display())
    );

    // The static healthcheck (what the agent is: a static program) prints its usage.
    let hc = boot_bin().with_file_name("labvisor-healthcheck");
    let dir = tempfile::tempdir().unwrap();
    split(&hc, dir.path(), 100 * 1024);
    let out = boot(dir.path(), &["--help"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("usage: labvisor-healthcheck"),
        "{out:?}"
    );
}

#[test]
#[ignore = "needs the static binaries: tools/test.sh builds them"]
fn each_failure_is_one_line_and_exit_125() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shown = d.display();
    let gone = d.join("gone");
    let fails = |dir: &Path| {
        let out = boot(dir, &[]);
        assert_eq!(out.status.code(), Some(125), "{out:?}");
        assert!(out.stdout.is_empty());
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{err}");
        err.trim_end().to_owned()
    };
    assert_eq!(
        fails(&gone),
        format!(
            "labvisor-boot: {}: no parts directory (no such file or directory (ENOENT)); deliver the parts at <this binary's path>.parts or set LABVISOR_BOOT_PARTS",
            gone.display()
        )
    );
    assert_eq!(
        fails(d),
        format!(
            "labvisor-boot: {shown}: cannot read its manifest: no such file or directory (ENOENT)"
        )
    );
    let sh = std::fs::canonicalize("/bin/sh").unwrap();
    let n = split(&sh, d, 16 * 1024);
    std::fs::remove_file(d.join("001")).unwrap();
    assert_eq!(
        fails(d),
        format!(
            "labvisor-boot: {shown}: missing agent part 001: no such file or directory (ENOENT)"
        )
    );
    std::fs::write(d.join("001"), "short").unwrap();
    let size = std::fs::metadata(&sh).unwrap().len();
    let held = size - 16 * 1024 + 5;
    assert_eq!(
        fails(d),
        format!("labvisor-boot: {shown}: size mismatch: the parts hold {held} bytes, the manifest says {size}")
    );
    for i in 0..n {
        std::fs::remove_file(d.join(format!("{i:03}"))).unwrap();
    }
    std::fs::write(d.join("000"), "not a program").unwrap();
    std::fs::write(d.join("manifest"), "parts=1\nsize=13\n").unwrap();
    assert_eq!(
        fails(d),
        format!("labvisor-boot: {shown}: cannot execute the agent: exec format error (ENOEXEC)")
    );
    std::fs::write(d.join("manifest"), "parts=1\nsize=13\nsha256=00\n").unwrap();
    assert_eq!(
        fails(d),
        format!("labvisor-boot: {shown}: bad manifest: line 3: unknown key (parts, size)")
    );
}
