//! Progress events emitted while solving, in plain Rust types.
//!
//! The daemon converts them into `moby.buildkit.v1.StatusResponse` messages
//! (`control-api.md` §8). The worker guarantees, per build:
//! * a [`ProgressEvent::VertexStarted`] precedes any status/log for that vertex;
//! * every started vertex is followed by exactly one [`ProgressEvent::VertexCompleted`]
//!   (cached, failed, canceled — `error = "context canceled"` — or done).

use std::sync::Arc;
use std::time::SystemTime;

/// Output stream of a [`ProgressEvent::VertexLog`] (values are the wire numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// Standard output (1).
    Stdout = 1,
    /// Standard error (2).
    Stderr = 2,
}

/// A progress group (`pb.ProgressGroup`): vertices sharing `id` are shown as one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressGroup {
    /// Group id.
    pub id: String,
    /// Display name of the group row.
    pub name: String,
    /// A weak member does not make the row visible on its own.
    pub weak: bool,
}

/// One progress update.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ProgressEvent {
    /// A vertex started an execution interval (cache lookup or execution).
    VertexStarted {
        /// Vertex digest (the LLB op digest).
        digest: String,
        /// Display name (`llb.customname` or derived, `llb.md` §9).
        name: String,
        /// Digests of the vertex's inputs.
        inputs: Vec<String>,
        /// Progress group from the op metadata, if any.
        progress_group: Option<ProgressGroup>,
        /// Start of the interval.
        started: SystemTime,
    },
    /// A vertex finished its interval.
    VertexCompleted {
        /// Vertex digest.
        digest: String,
        /// Display name (repeated so that a consumer can build a full snapshot).
        name: String,
        /// Digests of the vertex's inputs (repeated, as above).
        inputs: Vec<String>,
        /// Start of the interval (same as in the matching `VertexStarted`).
        started: SystemTime,
        /// End of the interval.
        completed: SystemTime,
        /// The result came from the cache; nothing was executed.
        cached: bool,
        /// The error message if the vertex failed (`"context canceled"` when canceled).
        error: Option<String>,
    },
    /// A sub-status of a vertex (e.g. `transferring context:` with a byte count).
    VertexStatus {
        /// Vertex digest.
        vertex: String,
        /// Status ID, shown as text.
        id: String,
        /// Action name (`transferring`, `extracting`...).
        name: String,
        /// Current amount.
        current: i64,
        /// Total amount, 0 if unknown.
        total: i64,
        /// When this update was made.
        timestamp: SystemTime,
        /// When the status started.
        started: Option<SystemTime>,
        /// When the status completed, if it did.
        completed: Option<SystemTime>,
    },
    /// Output of a process run by a vertex.
    VertexLog {
        /// Vertex digest.
        vertex: String,
        /// Which stream.
        stream: LogStream,
        /// Raw bytes (possibly partial lines).
        data: Vec<u8>,
        /// When the bytes were read.
        timestamp: SystemTime,
    },
}

/// Where progress goes: a cheap-to-clone handle around a callback.
#[derive(Clone)]
pub struct ProgressSink {
    f: Arc<dyn Fn(ProgressEvent) + Send + Sync>,
}

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressSink")
    }
}

impl ProgressSink {
    /// A sink that calls `f` for every event (it must not block).
    pub fn from_fn(f: impl Fn(ProgressEvent) + Send + Sync + 'static) -> Self {
        ProgressSink { f: Arc::new(f) }
    }

    /// A sink feeding an unbounded channel, and the receiving end.
    pub fn channel() -> (Self, tokio::sync::mpsc::UnboundedReceiver<ProgressEvent>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            ProgressSink::from_fn(move |ev| {
                // The receiver may have gone away (client detached): progress is best effort.
                let _ = tx.send(ev);
            }),
            rx,
        )
    }

    /// A sink that drops everything.
    pub fn discard() -> Self {
        ProgressSink::from_fn(|_| {})
    }

    /// Sends one event.
    pub fn send(&self, ev: ProgressEvent) {
        (self.f)(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_delivers_in_order() {
        let (sink, mut rx) = ProgressSink::channel();
        let s2 = sink.clone();
        for i in 0..3 {
            s2.send(ProgressEvent::VertexLog {
                vertex: "v".into(),
                stream: LogStream::Stdout,
                data: vec![i],
                timestamp: SystemTime::now(),
            });
        }
        drop(sink);
        drop(s2);
        let mut got = vec![];
        while let Ok(ev) = rx.try_recv() {
            if let ProgressEvent::VertexLog { data, .. } = ev {
                got.push(data[0]);
            }
        }
        assert_eq!(got, vec![0, 1, 2]);
    }
}
