//! A real headless Chromium driven through WebDriver ([`Browser`]), for tests of web pages.
//!
//! [`Browser::start`] runs Debian's `chromedriver` on a free loopback port in a process group of
//! its own and opens a session with a headless `chromium` that has a fresh profile and a `HOME`
//! of its own in a temporary directory (nothing is written to the user's). Every call
//! is synchronous: the browser owns a current-thread tokio runtime and blocks on the
//! [`fantoccini`] client, so it is for plain `#[test]`s, not for use inside another runtime.
//! Failures panic with what went wrong, like the rest of the kit. On drop
//! the session is closed, the whole process group (chromedriver and every chromium process it
//! started) is killed and chromedriver reaped, and chromium's crash handlers (which leave the
//! group) are killed too; the temporary directory is removed.
//!
//! Console messages are kept: [`Browser::console_errors`] returns the page's `console.error`
//! calls, its uncaught exceptions and its failed loads since the last call, so a test can assert
//! that a page ran cleanly.

use crate::{find_program, free_port, wait_until};
use fantoccini::error::CmdError;
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::fs::File;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long chromedriver may take to listen and chromium to open a session.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long closing the session may take on drop before the processes are killed anyway.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);
/// How long an action on an element is tried again while the page keeps replacing it.
const STALE_LIMIT: Duration = Duration::from_secs(10);
/// Chromium's command line: headless, usable as root in a container, a fixed window size.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
];
/// What [`Browser::start`] panics with when the browser is not installed.
const NOT_INSTALLED: &str = "needs chromium and chromium-driver: tools/test.sh installs them";

/// A headless Chromium session, closed on drop with every process it started.
pub struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium session with a fresh
    /// profile. Panics if chromium or chromium-driver is not installed, or if no session opens
    /// within 30 s.
    pub fn start() -> Self {
        let (chromedriver, chromium) =
            match (find_program("chromedriver"), find_program("chromium")) {
                (Some(d), Some(c)) => (d, c),
                _ => panic!("{NOT_INSTALLED}"),
            };
        let dir = tempfile::Builder::new()
            .prefix("labvisor-browser-")
            .tempdir()
            .expect("tempdir for the browser");
        let profile = dir.path().join("profile");
        let home = dir.path().join("home");
        let log_path = dir.path().join("chromedriver.log");
        let log = File::create(&log_path).expect("create chromedriver's log");
        let port = free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            // Chromium's files outside the profile (crash reports, caches) go there too.
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            // Its own process group: drop kills chromedriver and every chromium under it at once.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the browser");
        // Built now so that a panic below still kills chromedriver (Drop).
        let mut browser = Browser {
            rt,
            client: None,
            driver,
            dir,
        };
        wait_until("chromedriver to listen", START_LIMIT, || {
            if let Ok(Some(status)) = browser.driver.try_wait() {
                panic!(
                    "chromedriver exited with {status}: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": chromium, "args": args },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let Value::Object(caps) = caps else {
            unreachable!("capabilities are an object")
        };
        let url = format!("http://127.0.0.1:{port}");
        let mut builder =
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps);
        let client = browser
            .rt
            .block_on(async { tokio::time::timeout(START_LIMIT, builder.connect(&url)).await });
        let client = match client {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!(
                "no Chromium session from chromedriver: {e}\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
            Err(_) => panic!("no Chromium session from chromedriver within {START_LIMIT:?}"),
        };
        browser.client = Some(client);
        browser
    }

    /// The process group of chromedriver and every chromium process it started (chromedriver's
    /// pid); drop leaves no process in it.
    pub fn process_group(&self) -> u32 {
        self.driver.id()
    }

    /// The browser's own directory, removed on drop: its profile (`--user-data-dir`), the
    /// `HOME` chromedriver and chromium run with, and chromedriver's log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    fn block<T>(&self, what: &str, f: impl std::future::Future<Output = Result<T, CmdError>>) -> T {
        self.rt
            .block_on(f)
            .unwrap_or_else(|e| panic!("browser: {what}: {e}"))
    }

    /// Loads `url` and waits until the page has loaded.
    pub fn goto(&self, url: &str) {
        self.block(&format!("go to {url}"), self.client().goto(url));
    }

    /// Runs `f` (which finds its element itself) again while it fails because the element it
    /// found was replaced before it was used ("stale element reference": a page that redraws,
    /// such as a live table), up to [`STALE_LIMIT`].
    fn fresh<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, CmdError>>,
    {
        let deadline = std::time::Instant::now() + STALE_LIMIT;
        loop {
            match self.rt.block_on(f()) {
                Ok(v) => return v,
                Err(e)
                    if e.is_stale_element_reference() && std::time::Instant::now() < deadline =>
                {
                    continue
                }
                Err(e) => panic!("browser: {what}: {e}"),
            }
        }
    }

    /// The rendered text of the first element matching `css`, or `None` if none matches.
    pub fn find_text(&self, css: &str) -> Option<String> {
        self.fresh(&format!("text of {css:?}"), || async {
            match self.client().find(Locator::Css(css)).await {
                Ok(e) => e.text().await.map(Some),
                Err(e) if e.is_no_such_element() => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    /// The rendered text of the first element matching `css`; panics if none matches.
    pub fn text(&self, css: &str) -> String {
        self.find_text(css)
            .unwrap_or_else(|| panic!("browser: no element matches {css:?}"))
    }

    /// How many elements match `css`.
    pub fn count(&self, css: &str) -> usize {
        self.block(
            &format!("find {css:?}"),
            self.client().find_all(Locator::Css(css)),
        )
        .len()
    }

    /// Clicks the first element matching `css`; panics if none matches.
    pub fn click(&self, css: &str) {
        self.fresh(&format!("click {css:?}"), || async {
            self.client().find(Locator::Css(css)).await?.click().await
        });
    }

    /// Clears the first input matching `css` and types `text` into it; panics if none matches.
    pub fn fill(&self, css: &str, text: &str) {
        self.fresh(&format!("fill {css:?}"), || async {
            let e = self.client().find(Locator::Css(css)).await?;
            e.clear().await?;
            e.send_keys(text).await
        });
    }

    /// Runs `js` in the page as the body of a function and returns what it returns
    /// (`return document.title`); `Value::Null` when it returns nothing.
    pub fn eval(&self, js: &str) -> Value {
        self.block(&format!("run {js:?}"), self.client().execute(js, vec![]))
    }

    /// Waits until an element matches `css`, or panics after `limit` naming `what`.
    pub fn wait_for(&self, what: &str, limit: Duration, css: &str) {
        wait_until(what, limit, || (self.count(css) > 0).then_some(()));
    }

    /// Waits until `js` (a function body, as for [`Browser::eval`]) returns `true`, or panics
    /// after `limit` naming `what`.
    pub fn wait_until_js(&self, what: &str, limit: Duration, js: &str) {
        wait_until(what, limit, || {
            (self.eval(js) == Value::Bool(true)).then_some(())
        });
    }

    /// Every console message of level SEVERE since the last call: `console.error`, uncaught
    /// exceptions, and resources that failed to load (a 404 too). Each is chromedriver's text,
    /// which starts with the source URL and position.
    pub fn console_errors(&self) -> Vec<String> {
        let log = self.block("read the console log", self.client().issue_cmd(BrowserLog));
        let Value::Array(entries) = log else {
            panic!("browser: the console log is not a list: {log}")
        };
        entries
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Writes a PNG screenshot of the window to `path`.
    pub fn screenshot(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        let png = self.block("take a screenshot", self.client().screenshot());
        std::fs::write(path, png)
            .unwrap_or_else(|e| panic!("browser: write screenshot {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Chromium quits with its session; errors only mean it is gone already.
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(CLOSE_LIMIT, client.close()).await });
        }
        let _ = killpg(Pid::from_raw(self.driver.id() as i32), Signal::SIGKILL);
        let _ = self.driver.wait();
        // Chromium's crash handlers start sessions of their own, outside the group; their
        // command line names their database under this browser's HOME, so they are found there.
        if let Ok(out) = Command::new("pgrep")
            .arg("-f")
            .arg(self.dir.path())
            .stderr(Stdio::null())
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// chromedriver's own log endpoint (not in the W3C protocol): the browser log's entries since
/// the last read, as `{level, message, source, timestamp}` objects.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({"type": "browser"}).to_string()),
        )
    }
}
