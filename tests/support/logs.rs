//! Log capture for the tests that check what reaches the logs (and that no secret does).

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// Collects, in memory, everything a subscriber made by [`LogCapture::subscriber`] writes.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A second dispatcher, never interested and never dropped, registered before any capture's.
///
/// tracing caches each callsite's interest for the whole process. While only one dispatcher is
/// registered, a callsite first reached on another thread (a test running beside this one, with
/// no subscriber) has its interest computed from that thread's default, `NoSubscriber`: "never",
/// and a capture installed with `set_default` on this thread would then miss those events. With
/// two dispatchers registered, interest is the union of every live one, so the capture's own
/// interest counts wherever the callsite is first reached.
fn anchor() {
    static ANCHOR: OnceLock<tracing::Dispatch> = OnceLock::new();
    ANCHOR.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
}

impl LogCapture {
    /// A subscriber of every level down to `trace`, without colours, writing into this capture.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        anchor();
        let writer = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish()
    }

    /// Like [`LogCapture::subscriber`], in JSON lines with each event's fields at the top level,
    /// as `tokenbroker run --log-json` writes them.
    pub fn json_subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        anchor();
        let writer = self.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish()
    }

    /// The JSON lines logged so far whose `target` is `target`.
    pub fn json_lines(&self, target: &str) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
            })
            .filter(|l| l["target"] == target)
            .collect()
    }

    /// What has been logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}
