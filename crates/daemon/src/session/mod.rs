//! Client sessions: the `Control.Session` byte tunnel and the calls berthd makes back into it.
//!
//! A client opens `Control.Session` and serves gRPC *inside* it; berthd is the HTTP/2 client
//! (`session.md` §1). [`tunnel`] turns the `BytesMessage` streams into a byte stream, runs a
//! hyper HTTP/2 client connection over it and registers the [`Session`] in the
//! [`SessionManager`]. [`calls`] holds the typed calls (FileSync, FileSend, Auth, Secrets, SSH,
//! Health) made through a session.
//!
//! Lifetime: a session exists from its registration until its tunnel ends (client EOF, client
//! cancel, HTTP/2 error, failed health checks, or daemon shutdown). Its `closed` token fires then;
//! jobs watching it are canceled with `Unavailable`.

pub mod calls;
pub mod channel;
pub mod content;
pub mod provider;
pub mod tunnel;

use crate::errors::{Error, Result};
use channel::SessionChannel;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long a lookup waits for a session that has not connected yet (buildkitd: 5 s).
pub const SESSION_WAIT: Duration = Duration::from_secs(5);

/// One connected client session.
pub struct Session {
    /// Session id (`x-docker-expose-session-uuid`).
    pub id: String,
    /// Human name (`x-docker-expose-session-name`), may be empty.
    pub name: String,
    /// Shared key (`x-docker-expose-session-sharedkey`), may be empty.
    pub shared_key: String,
    /// Methods the client serves, lowercased (`/pkg.Service/Method`).
    methods: HashSet<String>,
    /// HTTP/2 channel into the tunnel.
    pub channel: SessionChannel,
    /// Fires when the session ends.
    pub closed: CancellationToken,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("methods", &self.methods)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Whether the client serves `method` (`/pkg.Service/Method`, case-insensitive).
    pub fn supports(&self, method: &str) -> bool {
        self.methods.contains(&method.to_ascii_lowercase())
    }
}

/// All live sessions, by id.
#[derive(Default)]
pub struct SessionManager {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    changed: Notify,
    shutdown: CancellationToken,
}

impl SessionManager {
    /// An empty manager.
    pub fn new() -> Arc<Self> {
        Arc::new(SessionManager::default())
    }

    fn insert(&self, s: Arc<Session>) {
        self.sessions.lock().unwrap().insert(s.id.clone(), s);
        self.changed.notify_waiters();
    }

    fn remove(&self, id: &str, s: &Arc<Session>) {
        let mut map = self.sessions.lock().unwrap();
        if map.get(id).is_some_and(|cur| Arc::ptr_eq(cur, s)) {
            map.remove(id);
        }
    }

    /// Finds a session, waiting up to [`SESSION_WAIT`] for it to connect. `name:ID` forms use
    /// the part after the first `:`.
    pub async fn get(&self, id: &str) -> Result<Arc<Session>> {
        let id = match id.split_once(':') {
            Some((_, rest)) => rest,
            None => id,
        };
        if id.is_empty() {
            return Err(Error::invalid("no session id given"));
        }
        let deadline = tokio::time::Instant::now() + SESSION_WAIT;
        loop {
            let notified = self.changed.notified();
            if let Some(s) = self.sessions.lock().unwrap().get(id) {
                if !s.closed.is_cancelled() {
                    return Ok(s.clone());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Error::unavailable(format!(
                    "no active session for {id}: context deadline exceeded"
                )));
            }
        }
    }

    /// Connected sessions: (id, name), sorted by id.
    pub fn list(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self
            .sessions
            .lock()
            .unwrap()
            .values()
            .filter(|s| !s.closed.is_cancelled())
            .map(|s| (s.id.clone(), s.name.clone()))
            .collect();
        v.sort();
        v
    }

    /// Whether a session is connected now.
    pub fn is_connected(&self, id: &str) -> bool {
        self.sessions
            .lock()
            .unwrap()
            .get(id)
            .is_some_and(|s| !s.closed.is_cancelled())
    }

    /// Closes every session (daemon shutdown).
    pub fn close_all(&self) {
        self.shutdown.cancel();
        for s in self.sessions.lock().unwrap().values() {
            s.closed.cancel();
        }
    }
}
