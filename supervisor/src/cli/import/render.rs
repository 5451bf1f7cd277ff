//! The SUT file `labvisor import` writes, built with `toml_edit` (keys in order, with the
//! comments that explain where each value came from).

use std::collections::BTreeMap;

use labvisor_protocol::config::CONTAINER_FILES_DIR;
use labvisor_protocol::SutName;
use toml_edit::{value, Array, DocumentMut, Item, Table};

use super::WRAPPER;

/// The environment variable testflinger-cli reads its server from.
pub(super) const SERVER_ENV: &str = "TESTFLINGER_SERVER";

/// What goes into one SUT file.
pub(super) struct RenderInput<'a> {
    pub sut: &'a SutName,
    pub image: &'a str,
    /// The triplet: agent config, job template, device-connector config.
    pub files: [&'a str; 3],
    /// The agent's credential file (`--token-file`).
    pub token: &'a str,
    /// The server the agent config names, for testflinger-cli (`TESTFLINGER_SERVER`).
    pub server: Option<&'a str>,
    pub basedir: &'a str,
    /// Where the agent's log is, for the exec probe (none: no probe).
    pub log_dir: Option<&'a str>,
    pub env: &'a BTreeMap<String, String>,
    pub timeout: Option<String>,
    pub output_timeout: Option<String>,
}

/// The SUT file's text.
pub(super) fn render(r: &RenderInput<'_>) -> String {
    let [conf, template, snappy] = r.files;
    let tail = if r.basedir == "/" {
        "/*/*.log".to_owned()
    } else {
        format!("{}/*/*.log", r.basedir)
    };
    let mut doc = DocumentMut::new();
    let header = format!(
        "# {sut}: imported by `labvisor import` from the testflinger-docker files\n\
         # {conf}, {template} and {snappy}, copied next to this file.\n\
         # Check it with `labvisor check <dir>`.\n\n",
        sut = r.sut
    );
    let top = doc.as_table_mut();
    let image_note =
        "# An image with testflinger-agent, testflinger-cli and the device connectors.";
    put(
        top,
        "image",
        value(r.image),
        &format!("{header}{image_note}"),
    );
    let command = array([
        "testflinger-agent",
        "-c",
        &format!("{CONTAINER_FILES_DIR}/{conf}"),
        "--token-file",
        &format!("{CONTAINER_FILES_DIR}/{}", r.token),
    ]);
    let command_note = format!(
        "\n# The device's long-running process: the testflinger agent, polling for jobs, with its\n\
         # credential: put the refresh token the server gave this agent into {}.",
        r.token
    );
    put(top, "command", command, &command_note);
    let files_note = format!(
        "\n# Delivered into the container under {CONTAINER_FILES_DIR}/; {WRAPPER} is the job wrapper."
    );
    let files = array([conf, template, snappy, WRAPPER, r.token]);
    put(top, "files", files, &files_note);
    let tail_note =
        "\n# testflinger writes phase output only to <execution_basedir>/<job_id>/<phase>.log.";
    put(top, "tail", array([tail.as_str()]), tail_note);
    if !r.env.is_empty() || r.server.is_some() {
        let mut env = Table::new();
        env.decor_mut()
            .set_prefix(format!("\n# From {snappy}'s env.\n"));
        for (k, v) in r.env {
            env.insert(k, value(v));
        }
        if let Some(server) = r.server {
            put(
                &mut env,
                SERVER_ENV,
                value(server),
                &format!("# The server of {conf}, for testflinger-cli in {WRAPPER}."),
            );
        }
        top.insert("env", Item::Table(env));
    }
    top.insert("job", Item::Table(job(r, conf, template)));
    if let Some(dir) = r.log_dir {
        top.insert("probe", Item::Table(probe(dir)));
    }
    top.insert("device", Item::Table(device(r.basedir)));
    doc.to_string()
}

/// The `[device]` table: a job the agent took from its own server is busy (a recreation or
/// removal waits for it), and testflinger's safe restart drains it (as the example's).
fn device(basedir: &str) -> Table {
    let mut device = Table::new();
    device.decor_mut().set_prefix("\n");
    let job_file = if basedir == "/" {
        "/*/testflinger.json".to_owned()
    } else {
        format!("{basedir}/*/testflinger.json")
    };
    put(
        &mut device,
        "busy_glob",
        array([job_file.as_str()]),
        "# testflinger keeps <execution_basedir>/<job_id>/testflinger.json while it runs a job\n\
         # from its own server: a recreation or removal waits for that job.",
    );
    put(
        &mut device,
        "drain_signal",
        value("SIGUSR1"),
        "# testflinger's safe restart: exit after the current job, so no new one is taken.",
    );
    device
}

/// The `[probe]` table: the exec probe that finds an agent the server refuses or cannot reach
/// in its log (as the example's).
fn probe(log_dir: &str) -> Table {
    let mut probe = Table::new();
    probe.decor_mut().set_prefix("\n");
    let check =
        format!("! tail -n 4 {log_dir}/testflinger-agent.log | grep -E '403|Unable to reach'");
    put(
        &mut probe,
        "command",
        array(["sh", "-c", &check]),
        "# Unhealthy while the agent's latest log lines say the server refuses it (403) or\n\
         # cannot be reached, with those lines as the reason.",
    );
    probe.insert("interval", value("30s"));
    probe.insert("timeout", value("5s"));
    probe
}

/// The `[job]` table.
fn job(r: &RenderInput<'_>, conf: &str, template: &str) -> Table {
    let mut job = Table::new();
    job.decor_mut().set_prefix("\n");
    let wrapper = format!("{CONTAINER_FILES_DIR}/{WRAPPER}");
    let command = array(["python3", &wrapper, "{job_file}"]);
    put(
        &mut job,
        "command",
        command,
        &format!(
            "# {WRAPPER} submits the job to the server and writes its verdict (failed when a phase\n\
             # failed); cancel and the timeout cancel the server job too."
        ),
    );
    put(
        &mut job,
        "template",
        value(template),
        "# A complete testflinger job (YAML with job_queue) is submitted as it is; a plain\n\
         # script is placed into this template as test_data.test_cmds.",
    );
    for (key, v, source) in [
        ("timeout", &r.timeout, "global_timeout"),
        ("output_timeout", &r.output_timeout, "output_timeout"),
    ] {
        if let Some(t) = v {
            let mut item = value(t);
            if let Some(v) = item.as_value_mut() {
                v.decor_mut().set_suffix(format!("  # {source} of {conf}"));
            }
            job.insert(key, item);
        }
    }
    job
}

/// Inserts `key = item` with the comment lines `note` above it.
fn put(table: &mut Table, key: &str, item: Item, note: &str) {
    table.insert(key, item);
    if let Some(mut k) = table.key_mut(key) {
        k.leaf_decor_mut().set_prefix(format!("{note}\n"));
    }
}

fn array<'a>(items: impl IntoIterator<Item = &'a str>) -> Item {
    value(items.into_iter().collect::<Array>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(sut: &'a SutName, env: &'a BTreeMap<String, String>) -> RenderInput<'a> {
        RenderInput {
            sut,
            image: "lab/img:1 \"quoted\" \\ back",
            files: ["d.conf", "d.yaml", "d_snappy.yaml"],
            token: "d.token",
            server: Some("http://tf.lab:8000"),
            basedir: "/srv/tf",
            log_dir: Some("/srv/tf/logs"),
            env,
            timeout: Some("3600s".into()),
            output_timeout: None,
        }
    }

    #[test]
    fn the_file_keeps_its_order_and_comments() {
        let sut = SutName::new("d").unwrap();
        let env = BTreeMap::from([("DEVICE_IP".to_owned(), "10.0.0.1\t\u{1}".to_owned())]);
        let text = render(&input(&sut, &env));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[..4],
            [
                "# d: imported by `labvisor import` from the testflinger-docker files",
                "# d.conf, d.yaml and d_snappy.yaml, copied next to this file.",
                "# Check it with `labvisor check <dir>`.",
                "",
            ]
        );
        let keys: Vec<&str> = lines
            .iter()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split([' ', '=']).next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "image",
                "command",
                "files",
                "tail",
                "[env]",
                "DEVICE_IP",
                "TESTFLINGER_SERVER",
                "[job]",
                "command",
                "template",
                "timeout",
                "[probe]",
                "command",
                "interval",
                "timeout",
            ]
        );
        assert!(
            text.contains("timeout = \"3600s\"  # global_timeout of d.conf\n"),
            "{text}"
        );
        assert!(
            text.contains("\n# From d_snappy.yaml's env.\n[env]\n"),
            "{text}"
        );
        assert!(
            text.contains("\n\n[job]\n# tf-job submits the job"),
            "{text}"
        );
        // Escaping is toml_edit's: the values come back as they went in.
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["image"].as_str(), Some("lab/img:1 \"quoted\" \\ back"));
        assert_eq!(v["env"]["DEVICE_IP"].as_str(), Some("10.0.0.1\t\u{1}"));
        assert_eq!(v["tail"][0].as_str(), Some("/srv/tf/*/*.log"));
        assert_eq!(v["job"]["template"].as_str(), Some("d.yaml"));
        assert_eq!(
            v["env"]["TESTFLINGER_SERVER"].as_str(),
            Some("http://tf.lab:8000")
        );
        let cmd = |k: &str| -> Vec<String> {
            let a = if k == "job" {
                &v["job"]["command"]
            } else {
                &v["command"]
            };
            a.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(
            cmd("agent"),
            [
                "testflinger-agent",
                "-c",
                "/labvisor/sut/d.conf",
                "--token-file",
                "/labvisor/sut/d.token"
            ]
        );
        assert_eq!(
            cmd("job"),
            ["python3", "/labvisor/sut/tf-job", "{job_file}"]
        );
    }

    /// A value with a line break may come out as a multi-line string: another form, the same
    /// value.
    #[test]
    fn line_breaks_survive() {
        let sut = SutName::new("d").unwrap();
        let env = BTreeMap::from([("X".to_owned(), "a\nb\r\n\"\"\"c".to_owned())]);
        let text = render(&input(&sut, &env));
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["env"]["X"].as_str(), Some("a\nb\r\n\"\"\"c"), "{text}");
    }
}
