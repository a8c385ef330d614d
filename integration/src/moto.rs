//! [`MotoS3`]: a real S3 API server for the `type=s3` cache tests: moto's server (`moto[server]`
//! from PyPI, in the venv `.ci/run` makes at `/var/cache/berth/venv`) on a free loopback port,
//! with request authentication on: SigV4 signatures are checked and IAM policies enforced, so a
//! wrong secret is refused as AWS refuses it.
//!
//! Set-up (an IAM user with an allow-all policy and its access key, and one bucket) is done with
//! boto3 (moto depends on it) as the server's first four actions, which it lets through
//! unauthenticated (`INITIAL_NO_AUTH_ACTION_COUNT=4`); every later request must be signed with
//! that key. Listing and reading objects go through boto3 with the same key: an independent S3
//! client to check what berthd wrote.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tempfile::TempDir;

use crate::process::{log_tail, terminate};

/// The venv holding moto and boto3.
pub const VENV: &str = "/var/cache/berth/venv";
const START_TIMEOUT: Duration = Duration::from_secs(60);

const SETUP: &str = r#"
import json, sys, boto3
url, bucket = sys.argv[1], sys.argv[2]
kw = dict(endpoint_url=url, region_name="us-east-1",
          aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="berth")
iam.put_user_policy(UserName="berth", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17",
     "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
k = iam.create_access_key(UserName="berth")["AccessKey"]
boto3.client("s3", **kw).create_bucket(Bucket=bucket)
print(json.dumps({"id": k["AccessKeyId"], "secret": k["SecretAccessKey"]}))
"#;

const CLIENT: &str = r#"
import json, sys, boto3
url, key_id, secret, op, bucket = sys.argv[1:6]
s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                  aws_access_key_id=key_id, aws_secret_access_key=secret)
if op == "list":
    out, token = [], None
    while True:
        kw = {"Bucket": bucket}
        if token:
            kw["ContinuationToken"] = token
        r = s3.list_objects_v2(**kw)
        out += [o["Key"] for o in r.get("Contents", [])]
        token = r.get("NextContinuationToken")
        if not token:
            break
    print(json.dumps(out))
elif op == "get":
    sys.stdout.buffer.write(s3.get_object(Bucket=bucket, Key=sys.argv[6])["Body"].read())
"#;

/// A running moto S3 server, stopped (by PID) on drop.
#[derive(Debug)]
pub struct MotoS3 {
    dir: TempDir,
    child: Option<Child>,
    endpoint: String,
    bucket: String,
    access_key_id: String,
    secret_access_key: String,
}

fn venv_tool(name: &str) -> PathBuf {
    let p = Path::new(VENV).join("bin").join(name);
    if !p.is_file() {
        panic!(
            "{} not found: install moto[server] into {VENV} (`.ci/run` does this)",
            p.display()
        );
    }
    p
}

impl MotoS3 {
    /// Starts the server, makes the IAM user and key and the bucket `bucket`.
    pub fn start(bucket: &str) -> Result<Self> {
        let server = venv_tool("moto_server");
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-moto-{}-", std::process::id()))
            .tempdir()
            .context("creating moto temp dir")?;
        let log = dir.path().join("moto.log");
        let mut last = None;
        // A port picked by binding :0 may be taken before moto binds it: retry on another.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .context("binding 127.0.0.1:0")?
                .local_addr()?
                .port();
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let mut child = Command::new(&server)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("INITIAL_NO_AUTH_ACTION_COUNT", "4")
                .env_remove("AWS_ACCESS_KEY_ID")
                .env_remove("AWS_SECRET_ACCESS_KEY")
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .spawn()
                .context("spawning moto_server")?;
            let deadline = Instant::now() + START_TIMEOUT;
            let up = loop {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break true;
                }
                if child.try_wait()?.is_some() || Instant::now() >= deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            if !up {
                let _ = terminate(&mut child, "moto_server", Duration::from_secs(5));
                last = Some(format!(
                    "moto_server on port {port} did not start; its log:\n{}",
                    log_tail(&log, 8192)
                ));
                continue;
            }
            let endpoint = format!("http://127.0.0.1:{port}");
            let out = Command::new(venv_tool("python"))
                .args(["-c", SETUP, &endpoint, bucket])
                .output()
                .context("running the moto set-up script")?;
            if !out.status.success() {
                let _ = terminate(&mut child, "moto_server", Duration::from_secs(5));
                bail!(
                    "moto set-up failed: {}\nserver log:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    log_tail(&log, 8192)
                );
            }
            let keys: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("moto set-up output")?;
            return Ok(MotoS3 {
                dir,
                child: Some(child),
                endpoint,
                bucket: bucket.to_string(),
                access_key_id: keys["id"].as_str().unwrap_or_default().to_string(),
                secret_access_key: keys["secret"].as_str().unwrap_or_default().to_string(),
            });
        }
        bail!(
            "{}",
            last.unwrap_or_else(|| "moto_server did not start".into())
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket made at start.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The access key id that may do anything.
    pub fn access_key_id(&self) -> &str {
        &self.access_key_id
    }

    /// Its secret.
    pub fn secret_access_key(&self) -> &str {
        &self.secret_access_key
    }

    /// The server's log.
    pub fn log_text(&self) -> String {
        log_tail(&self.dir.path().join("moto.log"), 64 * 1024)
    }

    fn client(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = Command::new(venv_tool("python"))
            .args(["-c", CLIENT, &self.endpoint])
            .args([&self.access_key_id, &self.secret_access_key])
            .args(args)
            .output()
            .context("running boto3")?;
        if !out.status.success() {
            bail!(
                "boto3 {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// Every key in `bucket`.
    pub fn list(&self, bucket: &str) -> Result<Vec<String>> {
        Ok(serde_json::from_slice(&self.client(&["list", bucket])?)?)
    }

    /// The object `key` of `bucket`.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Vec<u8>> {
        self.client(&["get", bucket, key])
    }
}

impl Drop for MotoS3 {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Err(e) = terminate(&mut c, "moto_server", Duration::from_secs(5)) {
                eprintln!("stopping moto_server: {e}");
            }
        }
    }
}
