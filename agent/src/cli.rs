//! The agent's command line: its flags and how they become [`Settings`].

use std::path::{Path, PathBuf};

use clap::Parser;
use labvisor_agent::agent::Settings;
use labvisor_agent::mqtt::{LinkOptions, UrlError};
use labvisor_protocol::config::{self, Allow, Problem, SutConfig};
use labvisor_protocol::topics::{TopicError, Topics};

/// The labvisor agent: wraps a SUT's device process, tees its output to stdout, a rotating log
/// file and MQTT, writes heartbeats for the Docker healthcheck, and (later) runs jobs.
///
/// Exit status: 0 stopped cleanly; 1 internal error; 2 bad config or usage; 3 the device process
/// had to be killed after the grace period; 4 the device process exited under
/// `on_child_exit = "exit"`.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// The SUT's config file (`<sut>.toml`); its `files` sit beside it.
    #[arg(long, env = "LABVISOR_CONFIG")]
    config: Option<PathBuf>,
    /// The SUT file's contents, when the supervisor passes them inline instead of copying the
    /// file in (SUTs without `files`). `--config` still names it (its stem is the SUT name).
    #[arg(long, env = "LABVISOR_CONFIG_TOML", hide_env_values = true)]
    config_toml: Option<String>,
    /// MQTT broker URL (`mqtt://host:1883`, `mqtts://host:8883`). Without it the agent runs
    /// without MQTT: output still reaches stdout and the log file.
    #[arg(long, env = "LABVISOR_BROKER")]
    broker: Option<String>,
    /// MQTT username.
    #[arg(long, env = "LABVISOR_MQTT_USERNAME")]
    username: Option<String>,
    /// MQTT password.
    #[arg(long, env = "LABVISOR_MQTT_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// A file holding the MQTT password (its contents without a trailing newline), e.g. a
    /// Docker secret under `/run/secrets/`. Not together with --password.
    #[arg(long, env = PASSWORD_FILE_ENV)]
    password_file: Option<PathBuf>,
    /// CA certificate (PEM) for `mqtts://`.
    #[arg(long, env = "LABVISOR_MQTT_CA")]
    ca_file: Option<PathBuf>,
    /// CA certificate (PEM text, not a path) for `mqtts://`: how `labvisor supervise` hands
    /// its agents the CA of their broker. Takes precedence over --ca-file.
    #[arg(long, env = "LABVISOR_MQTT_CA_PEM", allow_hyphen_values = true)]
    ca_pem: Option<String>,
    /// Global topic prefix, so two labs can share a broker.
    #[arg(long, env = "LABVISOR_TOPIC_PREFIX")]
    topic_prefix: Option<String>,
    /// The SUT's volume: log files and the job queue.
    #[arg(long, env = "LABVISOR_DATA_DIR", default_value = "/labvisor/data")]
    data_dir: PathBuf,
    /// Where the heartbeat file is written (read by labvisor-healthcheck).
    #[arg(long, env = "LABVISOR_HEARTBEAT_FILE", default_value = labvisor_protocol::heartbeat::DEFAULT_PATH)]
    heartbeat_file: PathBuf,
    /// Grace period between TERM and KILL when stopping; keep it under Docker's stop timeout.
    #[arg(long, env = "LABVISOR_GRACE", default_value = "8s")]
    grace: humantime::Duration,
    /// Messages the MQTT link queues while the broker is slow or gone; beyond it the oldest
    /// output batch is dropped (and counted). Acknowledgements and statuses are never dropped:
    /// while this many wait, the agent takes no more submissions (the broker holds them).
    #[arg(long, env = "LABVISOR_MQTT_QUEUE", default_value_t = 1024)]
    mqtt_queue: usize,
    /// Do not copy output to stdout.
    #[arg(long)]
    no_stdout: bool,
    /// Run one command against the running agent instead of being the agent.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The variable of `--password-file`, as its errors name it.
const PASSWORD_FILE_ENV: &str = "LABVISOR_MQTT_PASSWORD_FILE";

/// Commands for a running agent (run with `docker exec`).
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Ask the running agent to drain the device process: with `device.drain_signal`, it sends
    /// that signal once and does not restart the process after it exits. Leaves a request file
    /// beside the heartbeat file, which the agent looks at every 250 ms.
    Drain {
        /// Lift the request instead: the device process is started again.
        #[arg(long)]
        lift: bool,
    },
}

/// What is wrong with the command line or the config (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// No `--config`.
    #[error("no config: pass --config FILE or set LABVISOR_CONFIG")]
    NoConfig,
    /// The SUT file is invalid.
    #[error("invalid config {}{}:{}", path.display(), if *.inline { " (inline, from LABVISOR_CONFIG_TOML)" } else { "" }, problems.iter().map(|p| format!("\n  {p}")).collect::<String>())]
    Config {
        /// The file.
        path: PathBuf,
        /// Its contents came from `LABVISOR_CONFIG_TOML`.
        inline: bool,
        /// What is wrong.
        problems: Vec<Problem>,
    },
    /// The password file cannot be read or holds no password.
    #[error("{PASSWORD_FILE_ENV} (--password-file) {}: {why}", path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why it gives no password.
        why: String,
    },
    /// Both a password and a password file.
    #[error("both LABVISOR_MQTT_PASSWORD (--password) and {PASSWORD_FILE_ENV} (--password-file) are set: give the password one way")]
    PasswordTwice,
    /// The topic prefix is invalid.
    #[error(transparent)]
    Topics(#[from] TopicError),
    /// The broker URL is invalid.
    #[error("--broker {url:?}: {source}")]
    Broker {
        /// The URL.
        url: String,
        /// Why.
        source: UrlError,
    },
}

impl Args {
    /// Runs a [`Command`]: leaves or lifts the drain request for the agent whose heartbeat
    /// file is `--heartbeat-file`.
    pub fn run_command(&self, command: &Command) -> std::io::Result<()> {
        match command {
            Command::Drain { lift } => {
                let path = labvisor_agent::device_work::request_path(&self.heartbeat_file);
                labvisor_agent::device_work::request(&path, *lift)
            }
        }
    }

    /// The agent's settings: the SUT file loaded and validated, the broker's link options.
    pub fn settings(mut self) -> Result<Settings, UsageError> {
        if let Some(path) = &self.password_file {
            if self.password.is_some() {
                return Err(UsageError::PasswordTwice);
            }
            self.password = Some(read_password_file(path)?);
        }
        let config = self.config()?;
        let topics = Topics::with_prefix(self.topic_prefix.as_deref())?;
        let broker = self.broker(&topics, &config)?;
        Ok(Settings {
            config,
            broker,
            topics,
            data_dir: self.data_dir,
            heartbeat_file: self.heartbeat_file,
            grace: self.grace.into(),
            stdout: !self.no_stdout,
        })
    }

    fn config(&self) -> Result<SutConfig, UsageError> {
        let path = self.config.clone().ok_or(UsageError::NoConfig)?;
        // The supervisor already enforced its allow flags (and built the image); the agent runs
        // what it was given.
        let loaded = match &self.config_toml {
            Some(text) => config::load_delivered_str(&path, text, &Allow::all()),
            None => config::load_delivered_file(&path, &Allow::all()),
        };
        loaded.map_err(|problems| UsageError::Config {
            path,
            inline: self.config_toml.is_some(),
            problems,
        })
    }

    fn broker(
        &self,
        topics: &Topics,
        config: &SutConfig,
    ) -> Result<Option<LinkOptions>, UsageError> {
        let Some(url) = &self.broker else {
            return Ok(None);
        };
        let prefix = topics.prefix().replace('/', "-");
        let client_id = if prefix.is_empty() {
            format!("labvisor-agent-{}", config.name)
        } else {
            format!("labvisor-agent-{prefix}-{}", config.name)
        };
        let mut o = LinkOptions::from_url(url, client_id).map_err(|source| UsageError::Broker {
            url: url.clone(),
            source,
        })?;
        if self.username.is_some() {
            o.username = self.username.clone();
        }
        if self.password.is_some() {
            o.password = self.password.clone();
        }
        o.queue_capacity = self.mqtt_queue.max(1);
        if self.ca_file.is_some() {
            o.ca_file = self.ca_file.clone();
        }
        o.ca_pem = self.ca_pem.clone();
        Ok(Some(o))
    }
}

/// The password in `path`: its contents without one trailing newline (`\n` or `\r\n`); an
/// unreadable, non-UTF-8 or empty file is an error naming the variable and the path.
fn read_password_file(path: &Path) -> Result<String, UsageError> {
    let fail = |why: String| UsageError::PasswordFile {
        path: path.to_owned(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
    let mut text = String::from_utf8(bytes).map_err(|_| fail("it is not UTF-8 text".into()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(fail("it is empty: it must hold the password".into()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path, extra: &[&str]) -> Result<Settings, UsageError> {
        let config = dir.join("pw-1.toml");
        let mut argv = vec![
            "labvisor-agent".to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
            "--config-toml".to_owned(),
            "image = \"x\"\n".to_owned(),
            "--broker".to_owned(),
            "mqtt://127.0.0.1:1883".to_owned(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        Args::try_parse_from(argv).unwrap().settings()
    }

    #[test]
    fn the_password_file_gives_the_password_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        for (content, want) in [
            ("s3cret\n", "s3cret"),
            ("s3cret", "s3cret"),
            ("s3cret\r\n", "s3cret"),
            (" two words \n\n", " two words \n"),
        ] {
            std::fs::write(&file, content).unwrap();
            let s = settings(dir.path(), &["--password-file", file.to_str().unwrap()])
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                s.broker.unwrap().password.as_deref(),
                Some(want),
                "{content:?}"
            );
        }
        let s = settings(dir.path(), &["--password", "inline"]).unwrap();
        assert_eq!(s.broker.unwrap().password.as_deref(), Some("inline"));
    }

    #[test]
    fn a_bad_password_file_names_the_variable_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        let err = |extra: &[&str]| settings(dir.path(), extra).err().unwrap().to_string();
        let missing = err(&["--password-file", file.to_str().unwrap()]);
        assert!(
            missing.starts_with(&format!(
                "LABVISOR_MQTT_PASSWORD_FILE (--password-file) {}: cannot read it: ",
                file.display()
            )),
            "{missing}"
        );
        std::fs::write(&file, "\n").unwrap();
        assert_eq!(
            err(&["--password-file", file.to_str().unwrap()]),
            format!(
                "LABVISOR_MQTT_PASSWORD_FILE (--password-file) {}: it is empty: it must hold the password",
                file.display()
            )
        );
        std::fs::write(&file, "pw\n").unwrap();
        assert_eq!(
            err(&["--password-file", file.to_str().unwrap(), "--password", "pw"]),
            "both LABVISOR_MQTT_PASSWORD (--password) and LABVISOR_MQTT_PASSWORD_FILE (--password-file) are set: give the password one way"
        );
    }
}
