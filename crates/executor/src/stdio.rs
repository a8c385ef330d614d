//! The standard streams of one runc process: pipes, or a pseudo-terminal.
//!
//! Follows `callWithIO` of BuildKit's `executor/runcexecutor/executor_linux.go` (v0.11.6):
//! without a terminal runc's own stdin/stdout/stderr are handed to the container process
//! (runc passes them through in the foreground); with one, the executor opens a pty pair, gives
//! runc the slave as all three streams (runc makes the container's terminal itself and copies
//! between the two, resizing the inner one from the slave on `SIGWINCH`) and copies between the
//! caller's channels and the master. Signals go to the runc process, which forwards them.
//!
//! The master is read and written through [`AsyncFd`] (non-blocking, no thread parked in a
//! read); it reports `EIO` once every slave descriptor is closed, i.e. when runc has exited,
//! which ends the output copy.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::types::{ProcessIo, WinSize};

/// Chunk size of output reads.
const CHUNK: usize = 32 * 1024;
/// Terminal size until the caller's first resize.
const DEFAULT_SIZE: WinSize = WinSize { rows: 24, cols: 80 };

/// The streams chosen for a runc command, before it is spawned.
pub(crate) enum Streams {
    /// Pipes (stdin only when the caller gives input).
    Pipes,
    /// A pseudo-terminal; runc holds the slave.
    Tty(Arc<AsyncFd<OwnedFd>>),
}

/// The copying tasks of a started process.
pub(crate) struct Running {
    /// Output copies; they end at end of file (runc and the process gone).
    pub outputs: Vec<JoinHandle<()>>,
    /// Input copy and the resize/signal task: aborted once the process has exited.
    pub background: Vec<JoinHandle<()>>,
}

fn term_err(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |e| Error::Terminal {
        op,
        source: e.into(),
    }
}

impl Streams {
    /// Sets the standard streams of `cmd` for `io`; with `io.tty` opens the pty pair. The
    /// caller drops `cmd` right after spawning it, which closes the daemon's copies of the slave.
    pub(crate) fn attach(cmd: &mut Command, io: &ProcessIo) -> Result<Streams, Error> {
        if !io.tty {
            cmd.stdin(if io.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            return Ok(Streams::Pipes);
        }
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
            .map_err(term_err("open pseudo-terminal master"))?;
        grantpt(&master).map_err(term_err("grantpt"))?;
        unlockpt(&master).map_err(term_err("unlockpt"))?;
        let name = ptsname(&master, Vec::new()).map_err(term_err("ptsname"))?;
        let slave = rustix::fs::open(
            name.as_c_str(),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(term_err("open pseudo-terminal slave"))?;
        resize(&master, DEFAULT_SIZE).map_err(term_err("set terminal size"))?;
        rustix::io::ioctl_fionbio(&master, true).map_err(term_err("set non-blocking"))?;
        let dup = |fd: &OwnedFd| {
            fd.try_clone().map_err(|source| Error::Terminal {
                op: "duplicate pseudo-terminal slave",
                source,
            })
        };
        cmd.stdin(Stdio::from(dup(&slave)?))
            .stdout(Stdio::from(dup(&slave)?))
            .stderr(Stdio::from(slave));
        // `AsyncFd::new` is deprecated because an arbitrary `T: AsRawFd` may close its fd while
        // registered; an `OwnedFd` moved into the `AsyncFd` cannot, and the safe replacement
        // (`register`) is an `unsafe fn`, which this crate forbids.
        #[allow(deprecated)]
        let master = AsyncFd::new(master).map_err(|source| Error::Terminal {
            op: "register pseudo-terminal master",
            source,
        })?;
        Ok(Streams::Tty(Arc::new(master)))
    }

    /// Starts copying between the spawned `child` and the caller's channels, and the task that
    /// forwards resizes and signals to runc (pid `child.id()`).
    pub(crate) fn start(self, child: &mut Child, io: &mut ProcessIo) -> Running {
        let pid = child.id();
        let mut background = Vec::new();
        let mut outputs = Vec::new();
        let master = match self {
            Streams::Pipes => {
                outputs.push(tokio::spawn(pump(child.stdout.take(), io.stdout.take())));
                outputs.push(tokio::spawn(pump(child.stderr.take(), io.stderr.take())));
                if let (Some(mut w), Some(mut rx)) = (child.stdin.take(), io.stdin.take()) {
                    background.push(tokio::spawn(async move {
                        while let Some(b) = rx.recv().await {
                            if w.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                        // end of input: `w` is dropped, the process reads end of file
                    }));
                }
                None
            }
            Streams::Tty(m) => {
                outputs.push(tokio::spawn(pump_master(m.clone(), io.stdout.take())));
                io.stderr.take();
                if let Some(mut rx) = io.stdin.take() {
                    let m = m.clone();
                    background.push(tokio::spawn(async move {
                        while let Some(b) = rx.recv().await {
                            if write_master(&m, &b).await.is_err() {
                                return;
                            }
                        }
                    }));
                }
                Some(m)
            }
        };
        let resize_rx = io.resize.take();
        let signal_rx = io.signal.take();
        if resize_rx.is_some() || signal_rx.is_some() {
            background.push(tokio::spawn(control(pid, master, resize_rx, signal_rx)));
        }
        Running {
            outputs,
            background,
        }
    }
}

fn resize(master: &OwnedFd, size: WinSize) -> rustix::io::Result<()> {
    rustix::termios::tcsetwinsize(
        master,
        rustix::termios::Winsize {
            ws_row: u16::try_from(size.rows).unwrap_or(u16::MAX),
            ws_col: u16::try_from(size.cols).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
}

fn send_signal(pid: Option<u32>, sig: i32) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let Ok(sig) = nix::sys::signal::Signal::try_from(sig) else {
        tracing::warn!(signal = sig, "unknown signal not sent");
        return;
    };
    if let Err(e) = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig) {
        tracing::debug!(error = %e, signal = %sig, "signalling runc failed");
    }
}

/// Forwards resizes (terminal size, then `SIGWINCH` to runc) and signals until both channels
/// are closed or the task is aborted.
async fn control(
    pid: Option<u32>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
    mut resize_rx: Option<mpsc::Receiver<WinSize>>,
    mut signal_rx: Option<mpsc::Receiver<i32>>,
) {
    loop {
        tokio::select! {
            r = async { resize_rx.as_mut().unwrap().recv().await }, if resize_rx.is_some() => match r {
                Some(size) => {
                    if let Some(m) = &master {
                        if let Err(e) = resize(m.get_ref(), size) {
                            tracing::warn!(error = %e, "resizing the terminal failed");
                        }
                        send_signal(pid, nix::sys::signal::Signal::SIGWINCH as i32);
                    }
                }
                None => resize_rx = None,
            },
            s = async { signal_rx.as_mut().unwrap().recv().await }, if signal_rx.is_some() => match s {
                Some(sig) => send_signal(pid, sig),
                None => signal_rx = None,
            },
            else => return,
        }
    }
}

/// Copies `r` to `tx` in chunks; keeps draining (discarding) if the receiver is gone.
pub(crate) async fn pump(r: Option<impl AsyncRead + Unpin>, mut tx: Option<mpsc::Sender<Bytes>>) {
    let Some(mut r) = r else { return };
    let mut buf = vec![0u8; CHUNK];
    loop {
        match r.read(&mut buf).await {
            Ok(0) => return,
            Ok(n) => {
                if let Some(t) = &tx {
                    if t.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        tx = None;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading process output failed");
                return;
            }
        }
    }
}

/// Copies the terminal's output to `tx` until `EIO` (no slave left open) or end of file.
async fn pump_master(m: Arc<AsyncFd<OwnedFd>>, mut tx: Option<mpsc::Sender<Bytes>>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut guard = match m.readable().await {
            Ok(g) => g,
            Err(_) => return,
        };
        match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut buf).map_err(Into::into)) {
            Err(_would_block) => continue,
            Ok(Ok(0)) => return,
            Ok(Ok(n)) => {
                if let Some(t) = &tx {
                    if t.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        tx = None;
                    }
                }
            }
            // EIO: every slave descriptor is closed (runc exited)
            Ok(Err(_)) => return,
        }
    }
}

async fn write_master(m: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = m.writable().await?;
        match guard.try_io(|fd| rustix::io::write(fd.get_ref(), data).map_err(Into::into)) {
            Err(_would_block) => continue,
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(())
}
