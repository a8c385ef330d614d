//! Content of the generated `/etc/hosts` and `/etc/resolv.conf`.
//!
//! Follows BuildKit's `executor/oci/hosts.go` (localhost lines naming the sandbox hostname,
//! then one `IP<TAB>host` line per extra host) and `resolvconf.go`
//! (<https://github.com/moby/buildkit/blob/v0.11.6/executor/oci/hosts.go>).
//!
//! Deviation: BuildKit shares one hosts file per state dir when there are no extra hosts and
//! filters loopback name servers out of `resolv.conf` (its sandbox network cannot reach the
//! host's loopback). berth writes both files per run into the bundle directory (a few hundred
//! bytes; no cross-run cache to invalidate), and copies the host's `resolv.conf` verbatim,
//! because berth's only networks are the host's own namespace (where a loopback resolver works)
//! and `none` (where DNS is moot).

use std::fmt::Write as _;

use crate::types::HostIp;

/// The `/etc/hosts` content for `hostname` (already defaulted) plus `extra`.
pub(crate) fn hosts_file(hostname: &str, extra: &[HostIp]) -> String {
    let mut s =
        format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for h in extra {
        let _ = writeln!(s, "{}\t{}", h.ip, h.host);
    }
    s
}

/// The host's resolver configuration, or an empty file when the host has none.
pub(crate) fn resolv_conf(host_path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(host_path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_table() {
        let cases: Vec<(&str, Vec<HostIp>, &str)> = vec![
            (
                "buildkitsandbox",
                vec![],
                "127.0.0.1\tlocalhost buildkitsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            ),
            (
                "box",
                vec![
                    HostIp {
                        host: "db".into(),
                        ip: "10.0.0.5".parse().unwrap(),
                    },
                    HostIp {
                        host: "v6".into(),
                        ip: "fd00::1".parse().unwrap(),
                    },
                ],
                "127.0.0.1\tlocalhost box\n::1\tlocalhost ip6-localhost ip6-loopback\n\
                 10.0.0.5\tdb\nfd00::1\tv6\n",
            ),
        ];
        for (hostname, extra, want) in cases {
            assert_eq!(hosts_file(hostname, &extra), want);
        }
    }

    #[test]
    fn missing_resolv_conf_is_empty() {
        let d = tempfile::tempdir().unwrap();
        assert!(resolv_conf(&d.path().join("nope")).unwrap().is_empty());
        std::fs::write(d.path().join("r"), "nameserver 1.1.1.1\n").unwrap();
        assert_eq!(
            resolv_conf(&d.path().join("r")).unwrap(),
            b"nameserver 1.1.1.1\n"
        );
    }
}
