//! Output: from the device process, jobs, tailed files and the agent itself to three sinks.
//!
//! ```text
//!  device pipe ─► pump thread ─┐                 ┌─► container stdout + rotating log file
//!  job pipe    ─► pump thread ─┼─► Sinks (mux) ──┤   (complete: every byte, whole lines)
//!  tail files  ─► tail thread ─┤   whole lines,  │
//!  agent lines ────────────────┘   headers       └─► Tap (4 MiB, log.mqtt_rate) ─► batcher ─► MqttLink
//!                                                    full or over rate: lines       (publish.rs)
//!                                                    dropped, counted, in order
//! ```
//!
//! **Whole lines.** Several sources share the sinks, and a pipe read or a file read ends
//! anywhere, so the mux keeps each source's incomplete last line until its newline arrives: the
//! log file, stdout and MQTT only ever get whole lines from one source at a time, never one
//! source's half line spliced into another's. A line that waits longer than [`PARTIAL_IDLE`]
//! (a prompt) or grows past [`HOLD_MAX`] is written anyway and stays *open*: that source's next
//! bytes continue it, and if another source writes first, a newline closes it. So the file holds
//! every byte each source printed, in order, plus at most a newline where an open line was
//! interrupted.
//!
//! **Headers.** When the output switches to a followed file, a `==> path <==` line marks it (as
//! `tail -f` does); when it switches back to the device's own output (device process, jobs, the
//! agent's lines), [`OUTPUT_HEADER`] marks that. The same headers go to stdout, the file and
//! `<sut>/output`.
//!
//! **MQTT lines.** The tap gets whole lines of (lossy) UTF-8 text, each at most [`LINE_MAX`]
//! bytes: a longer line, or a line that had to be written before its end, is cut into pieces
//! that end with [`SPLIT_MARKER`]. A chunk goes to `<sut>/output` and, for a job's lines, to
//! `<sut>/jobs/<id>/output` as well.
//!
//! **Drops.** The tap is a queue bounded in bytes where a writer never waits (consecutive chunks
//! for the same target merge while the batcher is behind), with a token bucket of
//! `log.mqtt_rate` bytes per second (a burst of one second's worth). A chunk over either limit is
//! dropped whole (so only whole lines are dropped) and replaced in the queue by a record of how
//! many lines were lost at that point, so the batcher can show the loss as a `seq` jump exactly
//! where it happened. The pump threads write straight to stdout and the file, so the only
//! back-pressure a child can feel is from those two sinks, which must be complete anyway.
//!
//! The sinks also record when a write started: a write blocked for long (disk full, nobody
//! draining stdout) makes the agent report `stalled`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use labvisor_protocol::payloads::now_ms;
use labvisor_protocol::topics::JobId;

use crate::logfile::RotatingFile;
use crate::tap::Tap;

mod lines;
mod pump;

use lines::{count_lines, long_pieces, push_lines};
pub use lines::{push_line, push_line_within};
pub use pump::{pump, spawn_idle_flusher, Progress};

/// Size of one read from a pipe.
pub const READ_CHUNK: usize = 64 * 1024;

/// Largest line piece handed to MQTT, in bytes, newline and marker included (the batch size).
pub const LINE_MAX: usize = 16 * 1024;

/// An incomplete line held longer than this is written anyway (and left open).
pub const PARTIAL_IDLE: Duration = Duration::from_millis(200);

/// An incomplete line longer than this is written anyway (and left open).
pub const HOLD_MAX: usize = READ_CHUNK;

/// Ends a piece of a line on MQTT whose rest follows in the next piece: a line longer than
/// [`LINE_MAX`], or a line written before its end (after [`PARTIAL_IDLE`]).
pub const SPLIT_MARKER: &str = " [labvisor: line continues]";

/// The header that marks the switch from a followed file back to the device's own output.
pub const OUTPUT_HEADER: &str = "==> (output) <==";

/// Where output comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Source {
    /// The device process.
    Device,
    /// The agent's own lines (`[labvisor-agent] ...`).
    Agent,
    /// A job's process group.
    Job(JobId),
    /// A file followed through a `tail` glob.
    File(PathBuf),
}

impl Source {
    /// Where its lines go on MQTT.
    pub fn target(&self) -> Target {
        match self {
            Source::Job(id) => Target::Job(id.clone()),
            _ => Target::Sut,
        }
    }

    /// The followed file, if it is one (headers mark the switches between files and the rest).
    fn file(&self) -> Option<&Path> {
        match self {
            Source::File(p) => Some(p),
            _ => None,
        }
    }
}

/// Where a chunk of output belongs on MQTT.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `<sut>/output` only.
    Sut,
    /// `<sut>/output` and `<sut>/jobs/<id>/output`.
    Job(JobId),
}

/// Whole lines of text on their way to MQTT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where they go.
    pub target: Target,
    /// Whole lines, each ending with a newline, each at most [`LINE_MAX`] bytes.
    pub text: String,
    /// How many lines.
    pub lines: u64,
}

/// The header line for output from `file` (`None`: the device's own output).
fn header(file: Option<&Path>) -> String {
    match file {
        Some(p) => format!("==> {} <==\n", p.display()),
        None => format!("{OUTPUT_HEADER}\n"),
    }
}

/// One source's bytes that were not written yet.
#[derive(Default)]
struct Held {
    /// Not yet written to stdout and the file (an incomplete line).
    sink: Vec<u8>,
    /// Not yet handed to the tap (an incomplete line).
    tap: Vec<u8>,
    /// When its last bytes arrived.
    at: Option<Instant>,
}

/// The mux: what each source still holds and what the sinks last saw.
#[derive(Default)]
struct Mux {
    held: HashMap<Source, Held>,
    /// The source whose line is open (written without its newline yet) in stdout and the file.
    open: Option<Source>,
    /// The followed file the sinks' output last came from (`None`: the device's own output).
    sink_file: Option<PathBuf>,
    /// The same for the tap.
    tap_file: Option<PathBuf>,
}

/// Container stdout, the rotating log file and the MQTT tap, fed whole lines by a mux.
pub struct Sinks {
    mux: Mutex<Mux>,
    inner: Mutex<SinkInner>,
    tap: Tap,
    /// ms since the epoch when the current write started; 0 when no write is under way.
    write_since_ms: AtomicU64,
    bytes: AtomicU64,
}

struct SinkInner {
    stdout: bool,
    file: Option<RotatingFile>,
    file_error: Option<String>,
}

impl Sinks {
    /// Sinks writing to stdout (when `stdout`), to `file`, and to MQTT through `tap`.
    pub fn new(stdout: bool, file: Option<RotatingFile>, tap: Tap) -> Self {
        Sinks {
            mux: Mutex::new(Mux::default()),
            inner: Mutex::new(SinkInner {
                stdout,
                file,
                file_error: None,
            }),
            tap,
            write_since_ms: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// The MQTT tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Writes a line from the agent itself (`[labvisor-agent] ...`) into the output.
    pub fn agent_line(&self, text: &str) {
        let line = format!("[labvisor-agent] {text}\n");
        self.write(&Source::Agent, line.as_bytes());
    }

    /// Takes `data` from `source`: its whole lines go to every sink now, an incomplete last line
    /// waits for its end (see the module documentation).
    pub fn write(&self, source: &Source, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut mux = self.mux.lock().unwrap_or_else(|p| p.into_inner());
        let m = &mut *mux;
        m.held.entry(source.clone()).or_default().at = Some(Instant::now());
        let mut out = Vec::new();
        let direct = sink_part(m, source, data, &mut out);
        let chunks = self.tap_part(m, source, data);
        self.emit(mux, &out, direct, chunks);
    }

    /// What of `data` goes to the tap now, as chunks: the held bytes and `data` up to its last
    /// newline (held bytes never contain a newline), and the full pieces of a line longer than
    /// [`LINE_MAX`]; the rest is held.
    fn tap_part(&self, m: &mut Mux, source: &Source, data: &[u8]) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        let held = m.held.get_mut(source).expect("inserted by write");
        let last_nl = memchr::memrchr(b'\n', data);
        let mut text = String::new();
        let mut lines = 0;
        let mut handled = false;
        if let Some(p) = last_nl {
            let complete = &data[..=p];
            let raw_len = held.tap.len() + complete.len();
            // Dropped anyway (over the rate, or the queue full even for the raw bytes): count
            // the lines without building their text. Only without a header to send first.
            if m.tap_file.as_deref() == source.file() {
                let head = std::mem::take(&mut held.tap);
                let tail = data[p + 1..].to_vec();
                handled = self
                    .tap
                    .drop_if_over(source.target(), raw_len, || count_lines(&head, complete));
                held.tap = if handled { tail } else { head };
            }
            if !handled {
                let mut rest = complete;
                if !held.tap.is_empty() {
                    let f = memchr::memchr(b'\n', complete).expect("complete ends with a newline");
                    held.tap.extend_from_slice(&complete[..f]);
                    let line = String::from_utf8_lossy(&held.tap);
                    lines += push_line(&mut text, &line, false);
                    held.tap.clear();
                    rest = &complete[f + 1..];
                }
                lines += push_lines(&mut text, rest);
                held.tap.extend_from_slice(&data[p + 1..]);
            }
        } else {
            held.tap.extend_from_slice(data);
        }
        if held.tap.len() >= LINE_MAX {
            // A line longer than a piece: its full pieces go now, the rest waits.
            let (long, n) = long_pieces(&mut held.tap);
            if handled {
                tap_lines(m, source, long, n, &mut chunks);
            } else {
                text.push_str(&long);
                lines += n;
            }
        }
        if !handled {
            tap_lines(m, source, text, lines, &mut chunks);
        }
        chunks
    }

    /// Writes what each source has held for at least `idle`: an incomplete line goes to stdout
    /// and the file as it is (left open), and to MQTT as a piece ending with [`SPLIT_MARKER`].
    pub fn flush_idle(&self, idle: Duration) {
        let mut mux = self.mux.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let m = &mut *mux;
        let due: Vec<Source> = m
            .held
            .iter()
            .filter(|(_, h)| {
                (!h.sink.is_empty() || !h.tap.is_empty())
                    && h.at.is_some_and(|t| now.duration_since(t) >= idle)
            })
            .map(|(s, _)| s.clone())
            .collect();
        let mut out = Vec::new();
        let mut chunks = Vec::new();
        for source in due {
            self.release_all(m, &source, true, &mut out, &mut chunks);
        }
        self.emit(mux, &out, &[], chunks);
    }

    /// `source` ended (EOF): what it held is written, and a job's MQTT stream is closed.
    pub fn end(&self, source: &Source) {
        let mut mux = self.mux.lock().unwrap_or_else(|p| p.into_inner());
        let m = &mut *mux;
        let mut out = Vec::new();
        let mut chunks = Vec::new();
        self.release_all(m, source, false, &mut out, &mut chunks);
        m.held.remove(source);
        self.emit(mux, &out, &[], chunks);
        if let Source::Job(id) = source {
            self.tap.end(Target::Job(id.clone()));
        }
    }

    fn release_all(
        &self,
        m: &mut Mux,
        source: &Source,
        continued: bool,
        out: &mut Vec<u8>,
        chunks: &mut Vec<Chunk>,
    ) {
        let Some(held) = m.held.get_mut(source) else {
            return;
        };
        let sink = std::mem::take(&mut held.sink);
        let tap = std::mem::take(&mut held.tap);
        if !sink.is_empty() {
            release_sink(m, source, &sink, out);
        }
        if !tap.is_empty() {
            let mut text = String::new();
            let lines = push_line(&mut text, &String::from_utf8_lossy(&tap), continued);
            tap_lines(m, source, text, lines, chunks);
        }
    }

    /// Writes `out` to stdout and the file and hands `chunks` to the tap, in the mux's order,
    /// then lets the mux go.
    fn emit(
        &self,
        mux: std::sync::MutexGuard<'_, Mux>,
        out: &[u8],
        direct: &[u8],
        chunks: Vec<Chunk>,
    ) {
        if !out.is_empty() || !direct.is_empty() {
            self.write_raw(out, direct);
        }
        for c in chunks {
            self.tap.send(c);
        }
        drop(mux);
    }

    /// Writes `bytes` to stdout and the file as they are. A failing sink is reported (see
    /// [`Sinks::error`]) and the others still get the bytes.
    fn write_raw(&self, bytes: &[u8], more: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.write_since_ms
            .store(now_ms().max(1), Ordering::Relaxed);
        if inner.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out
                .write_all(bytes)
                .and_then(|_| out.write_all(more))
                .and_then(|_| out.flush());
        }
        let mut failed = None;
        if let Some(f) = inner.file.as_mut() {
            if let Err(e) = f.write_all(bytes).and_then(|_| f.write_all(more)) {
                failed = Some(format!("cannot write {}: {e}", f.path().display()));
            }
        }
        if failed.is_some() {
            inner.file_error = failed;
        }
        self.write_since_ms.store(0, Ordering::Relaxed);
        self.bytes
            .fetch_add((bytes.len() + more.len()) as u64, Ordering::Relaxed);
    }

    /// How long the write under way has been blocked, if one is.
    pub fn blocked_for(&self) -> Option<Duration> {
        match self.write_since_ms.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Duration::from_millis(now_ms().saturating_sub(t))),
        }
    }

    /// Bytes written to stdout and the file so far (headers included).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The last file error, if the log file cannot be written.
    pub fn error(&self) -> Option<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .file_error
            .clone()
    }

    /// Flushes and fsyncs the log file.
    pub fn sync(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = inner.file.as_mut() {
            let _ = f.sync();
        }
    }
}

/// Appends `bytes` of `source` to `out` (for stdout and the file): closes another source's open
/// line first, adds a header when the output switches between a file and the rest, and leaves
/// the line open when `bytes` does not end with a newline.
fn release_sink(m: &mut Mux, source: &Source, bytes: &[u8], out: &mut Vec<u8>) {
    sink_prefix(m, source, out);
    out.extend_from_slice(bytes);
    if !bytes.ends_with(b"\n") {
        m.open = Some(source.clone());
    }
}

/// What of `data` goes to stdout and the file now: `out` gets what comes first (a closing
/// newline, a header, the held bytes), and the slice of `data` to write as it is is returned.
/// An incomplete last line is held (see the module documentation).
fn sink_part<'d>(m: &mut Mux, source: &Source, data: &'d [u8], out: &mut Vec<u8>) -> &'d [u8] {
    if m.open.as_ref() == Some(source) {
        if data.ends_with(b"\n") {
            m.open = None;
        }
        return data;
    }
    let held = m.held.get_mut(source).expect("inserted by write");
    let cut = if held.sink.len() + data.len() > HOLD_MAX {
        Some(data.len())
    } else {
        memchr::memrchr(b'\n', data).map(|p| p + 1)
    };
    let Some(cut) = cut else {
        held.sink.extend_from_slice(data);
        return &[];
    };
    let held_bytes = std::mem::take(&mut held.sink);
    held.sink.extend_from_slice(&data[cut..]);
    let direct = &data[..cut];
    sink_prefix(m, source, out);
    out.extend_from_slice(&held_bytes);
    if !direct.ends_with(b"\n") {
        m.open = Some(source.clone());
    }
    direct
}

/// What goes before bytes of `source` in stdout and the file: a newline closing another
/// source's open line, and a header when the output switches between a file and the rest.
fn sink_prefix(m: &mut Mux, source: &Source, out: &mut Vec<u8>) {
    if m.open.as_ref().is_some_and(|o| o != source) {
        out.push(b'\n');
        m.open = None;
    }
    if m.open.is_none() && m.sink_file.as_deref() != source.file() {
        out.extend_from_slice(header(source.file()).as_bytes());
        m.sink_file = source.file().map(Path::to_path_buf);
    }
}

/// Queues `text` (`lines` whole lines of `source`) for the tap, after a header when the output
/// switches between a file and the rest.
fn tap_lines(m: &mut Mux, source: &Source, text: String, lines: u64, chunks: &mut Vec<Chunk>) {
    if lines == 0 {
        return;
    }
    if m.tap_file.as_deref() != source.file() {
        chunks.push(Chunk {
            target: Target::Sut,
            text: header(source.file()),
            lines: 1,
        });
        m.tap_file = source.file().map(Path::to_path_buf);
    }
    chunks.push(Chunk {
        target: source.target(),
        text,
        lines,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tap::{TapItem, TapReceiver};

    fn sinks(d: &Path, cap: usize) -> (Sinks, TapReceiver) {
        let (tap, rx) = Tap::new(cap);
        let file = RotatingFile::open(&d.join("s.log"), 1 << 30, 2).unwrap();
        (Sinks::new(false, Some(file), tap), rx)
    }

    fn file(d: &Path, s: &Sinks) -> String {
        s.sync();
        std::fs::read_to_string(d.join("s.log")).unwrap()
    }

    /// Everything the tap holds, as (target, text) and lost lines.
    fn drain(rx: &mut TapReceiver) -> (String, String, u64) {
        let (mut sut, mut job, mut lost) = (String::new(), String::new(), 0);
        while let Some(item) = rx.try_recv() {
            match item {
                TapItem::Lines(c) => {
                    assert!(c.text.ends_with('\n'));
                    assert_eq!(c.lines, c.text.matches('\n').count() as u64);
                    sut.push_str(&c.text);
                    if let Target::Job(_) = c.target {
                        job.push_str(&c.text);
                    }
                }
                TapItem::Lost { lines, .. } => lost += lines,
                TapItem::End(_) => {}
            }
        }
        (sut, job, lost)
    }

    fn job() -> Source {
        Source::Job(JobId::new("j1").unwrap())
    }

    #[test]
    fn sources_interleave_whole_lines_only() {
        let d = tempfile::tempdir().unwrap();
        let (s, mut rx) = sinks(d.path(), 1 << 20);
        s.write(&Source::Device, b"dev one\ndev tw");
        s.write(&job(), b"job o");
        s.write(&Source::Agent, b"[labvisor-agent] hello\n");
        s.write(&job(), b"ne\njob two\n");
        s.write(&Source::Device, b"o\n");
        assert_eq!(
            file(d.path(), &s),
            "dev one\n[labvisor-agent] hello\njob one\njob two\ndev two\n"
        );
        let (sut, job, lost) = drain(&mut rx);
        assert_eq!(
            sut,
            "dev one\n[labvisor-agent] hello\njob one\njob two\ndev two\n"
        );
        assert_eq!(job, "job one\njob two\n");
        assert_eq!(lost, 0);
    }

    #[test]
    fn an_idle_partial_line_is_written_open_and_closed_by_another_source() {
        let d = tempfile::tempdir().unwrap();
        let (s, mut rx) = sinks(d.path(), 1 << 20);
        s.write(&Source::Device, b"login: ");
        s.flush_idle(Duration::ZERO);
        assert_eq!(file(d.path(), &s), "login: ");
        // The same source continues its open line as it is.
        s.write(&Source::Device, b"root");
        assert_eq!(file(d.path(), &s), "login: root");
        // Another source's line starts on a line of its own.
        s.write(&Source::Agent, b"[labvisor-agent] x\n");
        s.write(&Source::Device, b"\nPassword: ");
        s.end(&Source::Device);
        assert_eq!(
            file(d.path(), &s),
            "login: root\n[labvisor-agent] x\n\nPassword: "
        );
        let (sut, _, _) = drain(&mut rx);
        let m = SPLIT_MARKER;
        assert_eq!(
            sut,
            format!("login: {m}\n[labvisor-agent] x\nroot\nPassword: \n")
        );
    }

    #[test]
    fn a_switch_to_a_file_and_back_gets_a_header_everywhere() {
        let d = tempfile::tempdir().unwrap();
        let (s, mut rx) = sinks(d.path(), 1 << 20);
        let f = Source::File("/run/x/setup.log".into());
        s.write(&Source::Device, b"d1\n");
        s.write(&f, b"f1\nf");
        s.write(&Source::Device, b"d2\n");
        s.write(&f, b"2\n");
        let want = "d1\n==> /run/x/setup.log <==\nf1\n==> (output) <==\nd2\n==> /run/x/setup.log <==\nf2\n";
        assert_eq!(file(d.path(), &s), want);
        assert_eq!(drain(&mut rx).0, want);
    }

    #[test]
    fn a_long_line_is_complete_in_the_file_and_split_with_a_marker_on_mqtt() {
        let d = tempfile::tempdir().unwrap();
        let (s, mut rx) = sinks(d.path(), 1 << 20);
        let long = "é".repeat(20_000); // 40000 bytes
        s.write(&Source::Device, long.as_bytes());
        s.write(&Source::Device, b"\nshort\n");
        assert_eq!(file(d.path(), &s), format!("{long}\nshort\n"));
        let (sut, _, _) = drain(&mut rx);
        let lines: Vec<&str> = sut.lines().collect();
        assert_eq!(
            lines.len(),
            4,
            "{:?}",
            lines.iter().map(|l| l.len()).collect::<Vec<_>>()
        );
        let mut joined = String::new();
        for l in &lines[..2] {
            assert!(l.len() < LINE_MAX);
            joined.push_str(l.strip_suffix(SPLIT_MARKER).expect("marked"));
        }
        joined.push_str(lines[2]);
        assert_eq!(joined, long);
        assert_eq!(lines[3], "short");
    }

    #[test]
    fn pump_writes_everything_to_the_file_and_a_full_tap_drops_whole_lines_counted() {
        let d = tempfile::tempdir().unwrap();
        let (s, mut rx) = sinks(d.path(), 2 * READ_CHUNK);
        let mut data = Vec::new();
        for i in 0..100_000 {
            data.extend_from_slice(format!("L{i} {}\n", i * 7 % 1000).as_bytes());
        }
        let n = pump(&data[..], &s, &Source::Device, &Progress::default());
        assert_eq!(n, data.len() as u64);
        assert_eq!(file(d.path(), &s).as_bytes(), &data[..]);
        assert_eq!(s.bytes(), data.len() as u64);
        // Nothing drained the tap: what it kept and what it dropped add up to every line, and
        // what it kept are whole lines, the first ones, in order.
        let (sut, _, lost) = drain(&mut rx);
        let kept = sut.lines().count() as u64;
        assert!(kept > 0 && lost > 0);
        assert_eq!(kept + lost, 100_000);
        for (i, l) in sut.lines().enumerate() {
            assert_eq!(l, format!("L{i} {}", i * 7 % 1000));
        }
        assert_eq!(s.tap().dropped(), lost);
        assert_eq!(s.blocked_for(), None);
    }

    #[test]
    fn a_flood_over_the_rate_is_dropped_at_the_tap_and_the_file_gets_all() {
        let d = tempfile::tempdir().unwrap();
        let (tap, mut rx) = Tap::with_rate(64 << 20, Some(100 * 1024));
        let p = d.path().join("s.log");
        let s = Sinks::new(
            false,
            Some(RotatingFile::open(&p, 1 << 30, 2).unwrap()),
            tap,
        );
        let line = format!("{}\n", "x".repeat(99));
        let data = line.repeat(160_000); // 16 MB
        let t0 = Instant::now();
        pump(data.as_bytes(), &s, &Source::Device, &Progress::default());
        let refill = (t0.elapsed().as_secs_f64() * 100.0 * 1024.0) as usize;
        s.sync();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), data.len() as u64);
        let (sut, _, lost) = drain(&mut rx);
        assert!(
            (100 * 1024..=100 * 1024 + refill + 2 * READ_CHUNK).contains(&sut.len()),
            "one second's worth passes (and what the rate refilled meanwhile), not {}",
            sut.len()
        );
        assert_eq!(sut.lines().count() as u64 + lost, 160_000);
    }

    #[test]
    fn lines_dropped_over_the_rate_are_counted_as_the_tap_would_have_made_them() {
        // Short lines, a line held across writes, lines longer than LINE_MAX (split on MQTT),
        // invalid UTF-8 that grows when made lossy, all in uneven writes.
        let mut data = Vec::new();
        for i in 0..300u32 {
            data.extend_from_slice(format!("line {i}\n").as_bytes());
            if i % 50 == 7 {
                data.extend(std::iter::repeat_n(b'y', LINE_MAX * 2 + 13));
                data.push(b'\n');
            }
            if i % 60 == 3 {
                data.extend(std::iter::repeat_n(0xFFu8, LINE_MAX / 2));
                data.extend_from_slice("é\n".as_bytes());
            }
        }
        let run = |rate: Option<u64>| {
            let (tap, mut rx) = Tap::with_rate(64 << 20, rate);
            let s = Sinks::new(false, None, tap);
            for piece in data.chunks(7919) {
                s.write(&Source::Device, piece);
            }
            s.end(&Source::Device);
            let (sut, _, lost) = drain(&mut rx);
            (sut.lines().count() as u64, lost)
        };
        let (all, none_lost) = run(None);
        assert_eq!(none_lost, 0);
        let (passed, lost) = run(Some(1));
        assert!(lost > 0 && passed < all, "{passed} passed, {lost} lost");
        assert_eq!(passed + lost, all);
    }
}
