//! The pump: a thread reading a process's pipe into the sinks, and the idle flusher that
//! writes lines held too long.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use labvisor_protocol::payloads::now_ms;

use super::{Sinks, Source, PARTIAL_IDLE, READ_CHUNK};

/// How far a pump got: bytes so far and when the last ones arrived (for `output_timeout`).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes read so far.
    pub bytes: AtomicU64,
    /// ms since the epoch of the last read.
    pub last_ms: AtomicU64,
}

/// Reads `reader` to EOF on the calling thread, writing every chunk to `sinks` as `source`, and
/// ends `source` at EOF. Returns the number of bytes read.
pub fn pump(mut reader: impl Read, sinks: &Sinks, source: &Source, progress: &Progress) -> u64 {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        total += n as u64;
        progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
        progress.last_ms.store(now_ms(), Ordering::Relaxed);
        sinks.write(source, &buf[..n]);
    }
    sinks.end(source);
    total
}

/// Runs [`Sinks::flush_idle`] every `PARTIAL_IDLE / 2` on its own thread until `stop` is set.
pub fn spawn_idle_flusher(
    sinks: Arc<Sinks>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("output-idle".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(PARTIAL_IDLE / 2);
                sinks.flush_idle(PARTIAL_IDLE);
            }
        })
}
