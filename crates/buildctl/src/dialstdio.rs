//! `buildctl dial-stdio`: proxies stdin and stdout to one connection to the daemon.
//!
//! This is how buildx's `docker-container://` helper and envd's `docker-container` builder reach
//! buildkitd inside its container (`docker exec -i NAME buildctl dial-stdio`). Stock buildctl
//! v0.11.6's semantics are kept: stdin's end half-closes the connection and the command then
//! waits for the daemon to finish; the daemon's end returns at once, without waiting for stdin
//! (which never ends on a tty).

use crate::connect::Target;
use anyhow::Context;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};

/// Copy buffer size each way.
const BUF: usize = 64 << 10;

/// Runs the proxy until the daemon closes its side.
pub async fn run(target: &Target) -> anyhow::Result<()> {
    let conn = target.raw_stream().await?;
    let (conn_r, mut conn_w) = tokio::io::split(conn);
    let up = async {
        let mut stdin = BufReader::with_capacity(BUF, tokio::io::stdin());
        tokio::io::copy_buf(&mut stdin, &mut conn_w)
            .await
            .context("error while Copy (stdin to stream)")?;
        conn_w
            .shutdown()
            .await
            .context("error while CloseWrite (stdin to stream)")
    };
    let down = async {
        let mut conn_r = BufReader::with_capacity(BUF, conn_r);
        let mut stdout = BufWriter::with_capacity(BUF, tokio::io::stdout());
        // Flush after every read: the peer waits for each gRPC frame.
        loop {
            let n = {
                let buf = tokio::io::AsyncBufReadExt::fill_buf(&mut conn_r)
                    .await
                    .context("error while Copy (stream to stdout)")?;
                if buf.is_empty() {
                    break;
                }
                stdout
                    .write_all(buf)
                    .await
                    .context("error while Copy (stream to stdout)")?;
                buf.len()
            };
            tokio::io::AsyncBufReadExt::consume(&mut conn_r, n);
            stdout
                .flush()
                .await
                .context("error while Copy (stream to stdout)")?;
        }
        stdout
            .shutdown()
            .await
            .context("error while CloseWrite (stream to stdout)")
    };
    tokio::pin!(up, down);
    tokio::select! {
        r = &mut up => {
            r?;
            down.await
        }
        r = &mut down => r,
    }
}
