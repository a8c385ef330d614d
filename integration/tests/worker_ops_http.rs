//! http(s) sources through the worker against a small HTTP/1.1 server started by the test on
//! 127.0.0.1 (ETag, Last-Modified, Content-Disposition, conditional requests). Needs root
//! (the worker mounts overlays to read results).

mod worker_ops_support;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Result;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use worker::ErrorKind;
use worker_ops_support::*;

#[derive(Clone)]
struct Resource {
    body: Vec<u8>,
    etag: Option<String>,
    last_modified: Option<String>,
    disposition: Option<String>,
}

/// One request seen by the server: path, `If-None-Match`, status sent.
type Seen = (String, Option<String>, u16);

#[derive(Clone, Default)]
struct Server {
    resources: Arc<Mutex<HashMap<String, Resource>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    async fn start(&self) -> Result<String> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = l.local_addr()?.to_string();
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut tmp = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut tmp).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let inm = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("if-none-match")
                            .then(|| v.trim().to_string())
                    });
                    let res = me.resources.lock().unwrap().get(&path).cloned();
                    let (status, resp) = match res {
                        None => (404, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()),
                        Some(r) if inm.is_some() && inm == r.etag => (304, format!(
                            "HTTP/1.1 304 Not Modified\r\nETag: {}\r\nConnection: close\r\n\r\n",
                            r.etag.clone().unwrap()
                        ).into_bytes()),
                        Some(r) => {
                            let mut h = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n",
                                r.body.len()
                            );
                            if let Some(e) = &r.etag {
                                h.push_str(&format!("ETag: {e}\r\n"));
                            }
                            if let Some(m) = &r.last_modified {
                                h.push_str(&format!("Last-Modified: {m}\r\n"));
                            }
                            if let Some(d) = &r.disposition {
                                h.push_str(&format!("Content-Disposition: {d}\r\n"));
                            }
                            h.push_str("\r\n");
                            let mut v = h.into_bytes();
                            v.extend_from_slice(&r.body);
                            (200, v)
                        }
                    };
                    me.seen.lock().unwrap().push((path, inm, status));
                    let _ = c.write_all(&resp).await;
                    let _ = c.shutdown().await;
                });
            }
        });
        Ok(addr)
    }

    fn put(&self, path: &str, r: Resource) {
        self.resources.lock().unwrap().insert(path.into(), r);
    }
}

async fn solve_http(w: &TestWorker, url: &str, attrs: &[(&str, &str)]) -> Solve {
    solve_def(
        &w.worker,
        source_def(url, attrs),
        Arc::new(TestSession::default()),
        CancellationToken::new(),
    )
    .await
}

/// Download with defaults (name from the URL, mode 0600, root, mtime = Last-Modified); a
/// rebuild sends If-None-Match, gets 304 and is fully cached; a changed resource is fetched
/// again and gives a new result.
#[tokio::test]
async fn http_download_and_conditional_rebuild() -> Result<()> {
    let w = TestWorker::new()?;
    let srv = Server::default();
    let addr = srv.start().await?;
    srv.put(
        "/files/hello.txt",
        Resource {
            body: b"hello over http\n".to_vec(),
            etag: Some("\"v1\"".into()),
            last_modified: Some("Wed, 21 Oct 2015 07:28:00 GMT".into()),
            disposition: None,
        },
    );
    let url = format!("http://{addr}/files/hello.txt");
    let s = solve_http(&w, &url, &[]).await;
    let r = s.ok();
    let m = r.mount().await?;
    let f = m.path().join("hello.txt");
    assert_eq!(std::fs::read(&f)?, b"hello over http\n");
    let md = std::fs::metadata(&f)?;
    assert_eq!(md.mode() & 0o7777, 0o600);
    assert_eq!((md.uid(), md.gid()), (0, 0));
    assert_eq!(
        md.modified()?.duration_since(UNIX_EPOCH)?,
        Duration::from_secs(1_445_412_480)
    );
    assert_eq!(std::fs::read_dir(m.path())?.count(), 1);
    drop(m);

    let again = solve_http(&w, &url, &[]).await;
    again.ok();
    assert!(
        again.completed().iter().all(|(_, c)| *c),
        "{:?}",
        again.completed()
    );
    let seen = srv.seen.lock().unwrap().clone();
    assert_eq!(
        seen.last().unwrap(),
        &(
            "/files/hello.txt".to_string(),
            Some("\"v1\"".to_string()),
            304
        )
    );

    srv.put(
        "/files/hello.txt",
        Resource {
            body: b"changed\n".to_vec(),
            etag: Some("\"v2\"".into()),
            last_modified: None,
            disposition: None,
        },
    );
    let s3 = solve_http(&w, &url, &[]).await;
    assert_eq!(
        read(s3.ok(), "/hello.txt").await?.as_deref(),
        Some("changed\n")
    );
    assert!(s3.completed().iter().all(|(_, c)| !*c));
    // No Last-Modified: the Unix epoch, as buildkitd.
    let m = s3.ok().mount().await?;
    let md = std::fs::metadata(m.path().join("hello.txt"))?;
    assert_eq!(md.modified()?, UNIX_EPOCH);
    drop(m);

    // A Go server's RFC 850 date with `UTC` (upstream's test server writes these); the date is
    // part of the cache key, so the same content with a new date is a new result.
    for (date, secs) in [
        ("Saturday, 05-Dec-26 22:15:29 UTC", 1_796_508_929),
        ("Sunday, 06-Dec-26 22:15:29 UTC", 1_796_595_329),
    ] {
        srv.put(
            "/files/hello.txt",
            Resource {
                body: b"changed\n".to_vec(),
                etag: None,
                last_modified: Some(date.into()),
                disposition: None,
            },
        );
        let s4 = solve_http(&w, &url, &[]).await;
        let m = s4.ok().mount().await?;
        let md = std::fs::metadata(m.path().join("hello.txt"))?;
        assert_eq!(
            md.modified()?.duration_since(UNIX_EPOCH)?,
            Duration::from_secs(secs),
            "{date}"
        );
    }
    Ok(())
}

/// http.filename/perm/uid/gid, Content-Disposition names, checksum verification, 404.
#[tokio::test]
async fn http_attrs_checksum_and_errors() -> Result<()> {
    let w = TestWorker::new()?;
    let srv = Server::default();
    let addr = srv.start().await?;
    let body = b"#!/bin/sh\necho tool\n".to_vec();
    let sum = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body)));
    srv.put(
        "/dl",
        Resource {
            body: body.clone(),
            etag: None,
            last_modified: None,
            disposition: Some("attachment; filename=\"tool.sh\"".into()),
        },
    );
    let url = format!("http://{addr}/dl");
    // Content-Disposition name.
    let s = solve_http(&w, &url, &[]).await;
    assert_eq!(
        read(s.ok(), "/tool.sh").await?.as_deref(),
        Some("#!/bin/sh\necho tool\n")
    );
    // Explicit name, mode, owner, good checksum.
    let s = solve_http(
        &w,
        &url,
        &[
            ("http.filename", "run"),
            ("http.perm", "0755"),
            ("http.uid", "1000"),
            ("http.gid", "1001"),
            ("http.checksum", &sum),
        ],
    )
    .await;
    let m = s.ok().mount().await?;
    let md = std::fs::metadata(m.path().join("run"))?;
    assert_eq!(md.mode() & 0o7777, 0o755);
    assert_eq!((md.uid(), md.gid()), (1000, 1001));
    drop(m);
    // Wrong checksum.
    let bad = format!("sha256:{}", "0".repeat(64));
    let s = solve_http(&w, &url, &[("http.checksum", &bad)]).await;
    let err = s.result.expect_err("checksum mismatch");
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    // Not found.
    let s = solve_http(&w, &format!("http://{addr}/missing"), &[]).await;
    let err = s.result.expect_err("404");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // Hostile filename attribute is refused.
    let s = solve_http(&w, &url, &[("http.filename", "../escape")]).await;
    let err = s.result.expect_err("bad filename");
    assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
    Ok(())
}
