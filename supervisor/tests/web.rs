//! The lab's web page in a real browser (Debian's headless Chromium through chromedriver),
//! served by a real `labvisor supervise` whose agents run in real containers and talk to a real
//! mosquitto with logins and an ACL: a submitter `alice`, a reader `rita`, anonymous agents.
//!
//! What it proves: the page loads with no console error; a SUT file dropped into `sut/` is a
//! new row within a second, without a reload; a job submitted from the page runs once and its
//! output streams into the page, line for line; offline with a reason shows the reason; a hung
//! agent turns red; actions need a login (also on loopback) and run as that login, so the
//! broker's ACL keeps a reader's job from the agent; reading from an address other than
//! loopback needs a login; 500 rows render and filter in under a second.

mod common;
mod support {
    #![allow(dead_code)]
    pub mod retained_lab;
}

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    agent_pid, fast_sut, own_network, tmp_sut_dir, wait_healthy, wait_listening, write, Stopped,
    Sup,
};
use labvisor_protocol::topics::Topics;
use labvisor_tests::{
    ensure_busybox_image, free_port, network_gateway, run_ok, Browser, DockerScope, Mosquitto,
    BUSYBOX_IMAGE,
};
use support::retained_lab::{self, Kind, Mix};

const T: Duration = Duration::from_secs(60);

/// A broker on the gateway of the supervisor's own network (agents reach it there) and on
/// loopback: anonymous clients (the agents, the supervisor) may do anything, `alice` (password
/// `alice-pw`) may too, `rita` (`rita-pw`) may only read, `c` (`c-pw`) only its own `c/#`, as
/// an agent's login does.
fn broker(gateway: Option<&str>) -> (Mosquitto, tempfile::TempDir) {
    let files = tempfile::tempdir().unwrap();
    let passwd = files.path().join("passwd");
    for (i, (user, pw)) in [("alice", "alice-pw"), ("rita", "rita-pw"), ("c", "c-pw")]
        .into_iter()
        .enumerate()
    {
        let mut cmd = Command::new("mosquitto_passwd");
        cmd.arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        run_ok(cmd.arg(&passwd).args([user, pw]));
    }
    let acl = files.path().join("acl");
    std::fs::write(
        &acl,
        "topic readwrite #\n\nuser alice\ntopic readwrite #\n\nuser rita\ntopic read #\n\n\
         user c\ntopic readwrite c/#\n",
    )
    .unwrap();
    let listener = gateway
        .map(|g| format!("listener {{port}} {g}\n"))
        .unwrap_or_default();
    let m = Mosquitto::start_with(&format!(
        "allow_anonymous true\npersistence false\npassword_file {}\nacl_file {}\n{listener}",
        passwd.display(),
        acl.display()
    ));
    (m, files)
}

/// Where screenshots go: `target/screenshots/`, and `docs/screenshots/` too when
/// `LABVISOR_UPDATE_SCREENSHOTS` is set (how the ones in the repository are made).
fn screenshot(browser: &Browser, name: &str) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = vec![root.join("target/screenshots")];
    if std::env::var_os("LABVISOR_UPDATE_SCREENSHOTS").is_some() {
        dirs.push(root.join("docs/screenshots"));
    }
    for d in dirs {
        std::fs::create_dir_all(&d).unwrap();
        browser.screenshot(d.join(name));
    }
}

/// The number of times `needle` occurs in the page's live output.
fn output_count(b: &Browser, needle: &str) -> usize {
    // textContent, not WebDriver's text (which trims the last newline).
    let text = b.eval("return document.querySelector('#output').textContent");
    text.as_str().unwrap_or_default().matches(needle).count()
}

fn assert_no_console_errors(b: &Browser, when: &str) {
    let errors = b.console_errors();
    assert!(errors.is_empty(), "console errors {when}: {errors:#?}");
}

/// Logs in through the page's dialog.
fn log_in(b: &Browser, user: &str, password: &str) {
    b.click("#login-open");
    b.fill("#login-user", user);
    b.fill("#login-password", password);
    b.click("#login-submit");
    b.wait_until_js(
        &format!("logged in as {user}"),
        T,
        &format!("return document.querySelector('#user').textContent === '{user}'"),
    );
}

/// A status code of `fetch(path, init)` run in the page.
fn fetch_status(b: &Browser, path: &str, init: &str) -> u64 {
    b.eval(&format!(
        "return fetch('{path}', {init}).then(r => r.status)"
    ))
    .as_u64()
    .expect("a status")
}

const ACTION: &str = "{method: 'POST', headers: {'content-type': 'application/json', \
     'x-labvisor-action': '1'}, body: JSON.stringify({script: 'echo never'})}";

fn the_result(b: &Browser, what: &str, pred: &str) -> String {
    b.wait_until_js(
        what,
        T,
        &format!("const r = document.querySelector('#act-result'); return {pred};"),
    );
    b.text("#act-result")
}

/// A live lab for the page: a network the supervisor adopts, the test broker on its gateway
/// (agents reach it there), the SUT files `suts` (each healthy before this returns), and a
/// supervisor serving its page on a free port of loopback, or of the gateway when
/// `on_loopback` is false. Dropped in field order: the supervisor first, the scope last.
struct WebLab {
    _sup: Sup,
    _suts: tempfile::TempDir,
    dir: PathBuf,
    broker: Mosquitto,
    _broker_files: tempfile::TempDir,
    /// The page's `host:port`.
    listen: String,
    scope: DockerScope,
}

impl WebLab {
    fn start(test: &str, suts: &[&str], on_loopback: bool, extra: &[&str]) -> WebLab {
        ensure_busybox_image();
        let scope = DockerScope::new(test);
        let net = own_network(&scope, "labvisor.net");
        let gateway = network_gateway(&net);
        let (broker, broker_files) = broker(Some(&gateway));
        let (suts_dir, dir) = tmp_sut_dir();
        for sut in suts {
            write(&dir, &format!("{sut}.toml"), &fast_sut(BUSYBOX_IMAGE, ""));
        }
        let host = if on_loopback { "127.0.0.1" } else { &gateway };
        let listen = format!("{host}:{}", free_port());
        let agent_url = format!("mqtt://{gateway}:{}", broker.port());
        let mut args = vec!["--agent-broker", &agent_url, "--metrics-listen", &listen];
        args.extend_from_slice(extra);
        let sup = Sup::start(&scope, &dir, Some(&broker.url()), &args);
        for sut in suts {
            wait_healthy(&scope, sut, T);
        }
        wait_listening(&listen, T);
        WebLab {
            _sup: sup,
            _suts: suts_dir,
            dir,
            broker,
            _broker_files: broker_files,
            listen,
            scope,
        }
    }
}

#[test]
#[ignore = "needs chromium and chromium-driver: tools/test.sh installs them"]
fn the_page_follows_the_lab_live_and_acts_as_its_login() {
    let lab = WebLab::start("web", &["alpha"], true, &["--resync", "1s"]);
    let (scope, dir, listen) = (&lab.scope, &lab.dir, &lab.listen);
    let acks = lab.broker.subscribe("+/submit_status", &[]);
    let url = format!("http://{listen}/");
    let b = Browser::start();
    b.goto(&url);
    b.wait_for(
        "alpha's row, idle and healthy",
        T,
        "tr[data-sut='alpha'].g-healthy",
    );
    assert!(b.text("#summary").starts_with("1 SUTs: 1 healthy"));
    assert_no_console_errors(&b, "on load");

    // A new file is a new row, without a reload.
    write(dir, "bravo.toml", &fast_sut(BUSYBOX_IMAGE, ""));
    let dropped = Instant::now();
    b.wait_for("bravo's row", T, "tr[data-sut='bravo']");
    let took = dropped.elapsed();
    eprintln!("bravo's row after {took:?}");
    assert!(took < Duration::from_secs(1), "bravo's row after {took:?}");
    wait_healthy(scope, "bravo", T);
    b.wait_for("bravo healthy", T, "tr[data-sut='bravo'].g-healthy");

    // A bad file is a problem row naming the file's problem.
    write(dir, "charlie.toml", "imagee = \"typo\"\n");
    b.wait_for(
        "charlie's problem row",
        T,
        "tr[data-sut='charlie'].g-problem",
    );
    let detail = b.text("tr[data-sut='charlie'] td.detail");
    assert!(
        detail.contains("charlie.toml: imagee: unknown field"),
        "{detail}"
    );

    // Filter: one word keeps one row.
    b.fill("#filter", "bravo");
    b.wait_until_js(
        "only bravo shown",
        T,
        "return document.querySelector(\"tr[data-sut='alpha']\").hidden \
         && !document.querySelector(\"tr[data-sut='bravo']\").hidden",
    );
    // WebDriver's clear fires no `input` event: clear it as a person would see it done.
    b.eval(
        "const f = document.querySelector('#filter'); f.value = ''; \
         f.dispatchEvent(new Event('input'));",
    );
    b.wait_until_js(
        "both shown",
        T,
        "return !document.querySelector(\"tr[data-sut='alpha']\").hidden",
    );

    // No action without a login, also on loopback.
    assert_eq!(fetch_status(&b, "/api/sut/alpha/submit", ACTION), 401);
    b.console_errors(); // the 401 above is one

    // The SUT's view; a job from the page runs once and its output streams in.
    b.click("tr[data-sut='alpha'] td");
    b.wait_until_js(
        "alpha's view",
        T,
        "return !document.querySelector('#sut').hidden \
         && document.querySelector('#sut-name').textContent === 'alpha'",
    );
    assert!(
        b.count("#actions[hidden]") == 1,
        "no actions before a login"
    );
    log_in(&b, "alice", "alice-pw");
    b.wait_until_js(
        "actions shown",
        T,
        "return !document.querySelector('#actions').hidden",
    );
    b.fill(
        "#submit-script",
        "for i in 1 2 3; do echo web-line-$i; sleep 0.3; done",
    );
    b.click("#submit-button");
    let answer = the_result(&b, "the job accepted", "r.textContent.includes('accepted')");
    assert!(answer.starts_with("job "), "{answer}");
    b.wait_until_js(
        "the job's last line in the page",
        T,
        "return document.querySelector('#output').textContent.includes('web-line-3')",
    );
    b.wait_for("the job passed", T, "#jobs tbody td.verdict-passed");
    for i in 1..=3 {
        assert_eq!(output_count(&b, &format!("web-line-{i}\n")), 1, "line {i}");
    }
    assert_eq!(b.count("#jobs tbody tr"), 1);
    assert_no_console_errors(&b, "after a job");
    // The page's pointer to the complete log is a command that works.
    let hint = b.text("#log-hint");
    let command = hint
        .split_once("SUT's volume: ")
        .map(|(_, c)| c.to_string())
        .unwrap_or_else(|| panic!("no command in the log hint: {hint}"));
    let log = std::process::Command::new("sh")
        .args(["-c", &command])
        .output()
        .expect("sh");
    assert!(log.status.success(), "{command}: {log:?}");
    let log = String::from_utf8_lossy(&log.stdout);
    for i in 1..=3 {
        assert_eq!(
            log.matches(&format!("web-line-{i}\n")).count(),
            1,
            "{command}: {log}"
        );
    }
    screenshot(&b, "sut.png");

    // Offline with a reason, from the page; the lab shows it.
    b.fill("#admin-reason", "usb hub flaky");
    b.click("#offline-button");
    let answer = the_result(&b, "offline confirmed", "r.classList.contains('good')");
    assert!(answer.contains("usb hub flaky"), "{answer}");
    b.click("header .brand");
    b.wait_for("alpha offline", T, "tr[data-sut='alpha'].g-offline");
    assert!(
        b.text("tr[data-sut='alpha']")
            .contains("offline: usb hub flaky"),
        "{}",
        b.text("tr[data-sut='alpha']")
    );

    // A hung agent turns red.
    let pid = agent_pid(&scope.name("bravo"));
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let _stopped = Stopped(pid);
    b.wait_for("bravo red", T, "tr[data-sut='bravo'].g-problem");
    assert!(b.text("tr[data-sut='bravo']").contains("unhealthy"));
    screenshot(&b, "lab.png");
    assert_no_console_errors(&b, "in the lab view");

    // The job ran once: one acknowledgement on the broker.
    let accepted = acks
        .lines()
        .iter()
        .filter(|l| l.starts_with("alpha/submit_status ") && l.contains("\"accepted\""))
        .count();
    assert_eq!(accepted, 1, "{:#?}", acks.lines());
}

/// A second supervisor that serves its page on the gateway of a network the test made: the
/// browser there is not on loopback, so it must log in to read, and a reader cannot act.
#[test]
#[ignore = "needs chromium and chromium-driver: tools/test.sh installs them"]
fn away_from_loopback_reading_needs_a_login_and_a_reader_cannot_act() {
    let lab = WebLab::start("web-away", &["c", "d"], false, &[]);
    let listen = &lab.listen;
    let submits = lab.broker.subscribe("+/submit", &[]);
    let b = Browser::start();
    b.goto(&format!("http://{listen}/"));
    b.wait_until_js(
        "the login prompt",
        T,
        "return !document.querySelector('#need-login').hidden",
    );
    assert_eq!(b.count("#suts tbody tr"), 0);
    assert_eq!(fetch_status(&b, "/api/lab", "{}"), 401);
    b.console_errors();

    // A wrong password is refused by the broker.
    b.click("#need-login-button");
    b.fill("#login-user", "rita");
    b.fill("#login-password", "wrong");
    b.click("#login-submit");
    b.wait_until_js(
        "the refusal",
        T,
        "return document.querySelector('#login-error').textContent.includes('refused rita')",
    );
    b.console_errors();

    // An agent's login, which the broker confines to its own SUT, may not read the lab
    // through the page.
    b.fill("#login-user", "c");
    b.fill("#login-password", "c-pw");
    b.click("#login-submit");
    b.wait_until_js(
        "the agent login's refusal",
        T,
        "return document.querySelector('#login-error').textContent\
         .includes('c may not read the whole lab: the broker shows it 1 of the 2')",
    );
    assert_eq!(fetch_status(&b, "/api/lab", "{}"), 401);
    b.console_errors();
    b.click("#login-cancel");

    log_in(&b, "rita", "rita-pw");
    b.wait_for("c's row for rita", T, "tr[data-sut='c']");
    b.goto(&format!("http://{listen}/#/sut/c"));
    b.wait_until_js(
        "c's view",
        T,
        "return !document.querySelector('#actions').hidden",
    );
    b.fill("#submit-script", "echo from-rita");
    b.click("#submit-button");
    let answer = the_result(&b, "no acknowledgement", "r.classList.contains('bad')");
    assert!(answer.contains("allowed"), "{answer}");
    assert!(
        !submits.lines().iter().any(|l| l.contains("from-rita")),
        "a reader's job reached the broker's subscribers: {:#?}",
        submits.lines()
    );
    assert_eq!(output_count(&b, "from-rita"), 0);
}

/// 500 SUTs' retained statuses (no containers): the page draws them, problems first, and a
/// filter narrows them, each in well under a second as the page measures it.
#[test]
#[ignore = "needs chromium and chromium-driver: tools/test.sh installs them"]
fn five_hundred_rows_render_and_filter_in_under_a_second() {
    const SUTS: usize = 500;
    let scope = DockerScope::new("web-500");
    let (broker, _files) = broker(None);
    let writer = format!("mqtt://alice:alice-pw@127.0.0.1:{}", broker.port());
    let lab = Mix::typical(SUTS).suts(SUTS);
    let problems: usize = lab
        .iter()
        .filter(|(_, k)| !matches!(k, Kind::Healthy | Kind::Busy | Kind::Offline))
        .count();
    let msgs = retained_lab::messages(&Topics::new(), "lab", &lab);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(retained_lab::publish(
        &writer,
        msgs,
        Duration::from_secs(30),
    ))
    .unwrap();
    let (_t, dir) = tmp_sut_dir();
    let listen = format!("127.0.0.1:{}", free_port());
    let _sup = Sup::start(
        &scope,
        &dir,
        Some(&broker.url()),
        &["--metrics-listen", &listen],
    );
    wait_listening(&listen, T);
    let b = Browser::start();
    let url = format!("http://{listen}/");
    b.goto(&url);
    b.wait_until_js(
        "500 rows",
        T,
        &format!("return document.querySelectorAll('#suts tbody tr').length === {SUTS}"),
    );
    // Measured from a fresh load of the page, now that the supervisor holds the whole lab.
    b.goto(&format!("{url}?again"));
    b.wait_until_js(
        "500 rows drawn",
        T,
        &format!(
            "return performance.getEntriesByName('labvisor-table')\
             .some(m => m.detail.rows === {SUTS})"
        ),
    );
    let drawn = b
        .eval(&format!(
            "return performance.getEntriesByName('labvisor-table')\
             .find(m => m.detail.rows === {SUTS}).startTime"
        ))
        .as_f64()
        .unwrap();
    eprintln!("500 rows drawn {drawn:.0} ms after the navigation started");
    assert!(drawn < 1000.0, "drawn after {drawn} ms");
    let first: Vec<String> = serde_json::from_value(b.eval(&format!(
        "return [...document.querySelectorAll('#suts tbody tr')].slice(0, {problems})\
         .map(tr => tr.className)"
    )))
    .unwrap();
    assert!(
        first.iter().all(|c| c == "g-problem"),
        "problems first: {first:?}"
    );
    let filtered = b.eval(
        "const f = document.querySelector('#filter'); const t0 = performance.now(); \
         f.value = 'sut-01'; f.dispatchEvent(new Event('input')); \
         const shown = [...document.querySelectorAll('#suts tbody tr')].filter(tr => !tr.hidden); \
         return [performance.now() - t0, shown.length];",
    );
    let took = filtered[0].as_f64().unwrap();
    eprintln!("filtering 500 rows took {took:.1} ms");
    assert!(took < 1000.0, "filtering took {took} ms");
    // sut-0100 .. sut-0199 match `sut-01` (names are sut-0001 .. sut-0500).
    assert_eq!(filtered[1].as_u64(), Some(100));
    assert!(b.text("#summary").starts_with("500 SUTs:"));
    assert_no_console_errors(&b, "with 500 rows");
}
