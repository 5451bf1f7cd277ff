//! The kit's headless browser ([`Browser`]) against pages served from a loopback port: console
//! errors are seen (and only those), clicks, typing and text work, screenshots are PNGs, and
//! dropping the browser leaves none of its processes behind.

use labvisor_tests::{run, Browser};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The pages the tests load, by path. The empty icon keeps Chromium from asking for
/// /favicon.ico (a 404 is a console error).
fn page(path: &str) -> Option<String> {
    let body = match path {
        "/clean" => {
            r#"<h1 id="title">Devices</h1>
<ul><li class="device">alpha</li><li class="device">beta</li><li class="device">gamma</li></ul>
<input id="name" value="old">
<button id="add" onclick="document.getElementById('out').textContent =
    'added ' + document.getElementById('name').value">Add</button>
<p id="out"></p>
<script>console.log("fine"); console.warn("only a warning");</script>"#
        }
        "/boom" => r#"<p>boom</p><script>console.error("boom")</script>"#,
        "/throw" => r#"<p>throw</p><script>throw new Error("kaboom")</script>"#,
        "/late" => {
            r#"<p id="state">waiting</p>
<script>setTimeout(() => {
    document.getElementById('state').textContent = 'ready';
    document.body.insertAdjacentHTML('beforeend', '<p id="late">here</p>');
}, 300)</script>"#
        }
        // A live table: the button is replaced every 200 ms, as a page redrawing its rows does.
        "/redraw" => {
            r#"<div id="table"></div>
<script>window.clicks = 0;
let n = 0;
setInterval(() => {
    n += 1;
    document.getElementById('table').innerHTML =
        `<button id="row" onclick="window.clicks += 1">row ${n % 2}</button>`;
}, 200);</script>"#
        }
        _ => return None,
    };
    Some(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{path}</title>\
         <link rel=\"icon\" href=\"data:,\"></head><body>{body}</body></html>"
    ))
}

/// Serves [`page`] over HTTP/1.0 on 127.0.0.1 from a thread; returns the base URL.
fn serve() -> String {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind the page server");
    let base = format!("http://{}", listener.local_addr().expect("its address"));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = BufReader::new(conn);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // The headers are not needed; read them so the client sees a clean close.
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match page(path) {
                Some(b) => ("200 OK", b),
                None => ("404 Not Found", String::from("not found")),
            };
            let mut conn = reader.into_inner();
            let _ = write!(
                conn,
                "HTTP/1.0 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    base
}

#[test]
#[ignore = "needs chromium and chromium-driver: tools/test.sh installs them"]
fn console_errors_are_reported_once_and_a_clean_page_has_none() {
    let base = serve();
    let b = Browser::start();

    b.goto(&format!("{base}/clean"));
    assert_eq!(b.text("#title"), "Devices");
    assert_eq!(
        b.console_errors(),
        Vec::<String>::new(),
        "log and warn are not errors"
    );

    b.goto(&format!("{base}/boom"));
    let errors = b.console_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("boom"), "{errors:?}");
    assert_eq!(
        b.console_errors(),
        Vec::<String>::new(),
        "read once, then gone"
    );

    b.goto(&format!("{base}/throw"));
    let errors = b.console_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("kaboom"), "{errors:?}");

    b.goto(&format!("{base}/missing"));
    let errors = b.console_errors();
    assert!(
        errors.iter().any(|e| e.contains("404")),
        "a page that fails to load is an error: {errors:?}"
    );
}

#[test]
#[ignore = "needs chromium and chromium-driver: tools/test.sh installs them"]
fn click_fill_text_count_eval_and_waits_work() {
    let base = serve();
    let b = Browser::start();
    b.goto(&format!("{base}/clean"));

    assert_eq!(b.count("li.device"), 3);
    assert_eq!(b.count("li.absent"), 0);
    assert_eq!(b.find_text("li.device").as_deref(), Some("alpha"));
    assert_eq!(b.find_text("#absent"), None);

    b.fill("#name", "delta");
    assert_eq!(
        b.eval("return document.getElementById('name').value"),
        "delta"
    );
    b.click("#add");
    assert_eq!(b.text("#out"), "added delta");
    assert_eq!(b.eval("return document.title"), "/clean");
    assert_eq!(b.eval("return 1 + 2"), 3);
    assert_eq!(b.eval("document.title"), serde_json::Value::Null);

    b.goto(&format!("{base}/late"));
    b.wait_for("the late paragraph", Duration::from_secs(10), "#late");
    b.wait_until_js(
        "the page to be ready",
        Duration::from_secs(10),
        "return document.getElementById('state').textContent === 'ready'",
    );
    assert_eq!(b.text("#late"), "here");
    assert_eq!(b.console_errors(), Vec::<String>::new());
}

#[test]
#[ignore = "needs chromium and chromium-driver: tools/test.sh installs them"]
fn a_screenshot_is_a_png() {
    let base = serve();
    let b = Browser::start();
    b.goto(&format!("{base}/clean"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("page.png");
    b.screenshot(&path);
    let png = std::fs::read(&path).expect("read the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {:?}",
        &png[..png.len().min(16)]
    );
    assert!(
        png.len() > 1000,
        "a 1400x1000 page is more than {} bytes",
        png.len()
    );
}

/// The pids of the live (not zombie) processes in process group `pgid`.
fn live_in_group(pgid: u32) -> Vec<String> {
    let out = run(Command::new("ps").args(["-e", "-o", "pid=,pgid=,stat="]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[1] == pgid.to_string() && !f[2].starts_with('Z'))
                .then(|| f[0].to_string())
        })
        .collect()
}

/// The pids of the live processes whose command line names `dir`.
fn naming(dir: &Path) -> Vec<String> {
    let out = run(Command::new("pgrep").arg("-f").arg(dir));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs chromium and chromium-driver: tools/test.sh installs them"]
fn dropping_the_browser_leaves_no_process() {
    let b = Browser::start();
    b.goto("data:text/html,<p>hi</p>");
    let pgid = b.process_group();
    let dir = b.dir().to_path_buf();
    let group = live_in_group(pgid);
    assert!(
        group.len() >= 2,
        "chromedriver and chromium run in group {pgid}: {group:?}"
    );
    // Chromium (--user-data-dir) and its crash handlers (--database, outside the group).
    let named = naming(&dir);
    assert!(
        named.iter().any(|p| !group.contains(p)),
        "a crash handler outside the group names {}: {named:?} {group:?}",
        dir.display()
    );

    drop(b);
    let left = live_in_group(pgid);
    assert!(left.is_empty(), "left in group {pgid}: {left:?}");
    let left = naming(&dir);
    assert!(left.is_empty(), "left naming {}: {left:?}", dir.display());
    assert!(!dir.exists(), "the browser's directory is removed");
}

/// A page that keeps replacing an element (a live table) is clicked and read as a person
/// would: each action finds the element again when the one it found was replaced in between.
#[test]
#[ignore = "needs chromium and chromium-driver: tools/test.sh installs them"]
fn actions_on_a_redrawing_page_find_the_element_again() {
    let base = serve();
    let b = Browser::start();
    b.goto(&format!("{base}/redraw"));
    b.wait_for("the first row", Duration::from_secs(10), "#row");
    for _ in 0..40 {
        b.click("#row");
        assert!(b.text("#row").starts_with("row "));
    }
    b.wait_until_js(
        "40 clicks counted",
        Duration::from_secs(10),
        "return window.clicks === 40",
    );
    assert!(b.console_errors().is_empty());
}
