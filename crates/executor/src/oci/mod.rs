//! OCI runtime-spec generation and the files that go with it: the counterpart of BuildKit's
//! `executor/oci` package (`spec.go`, `spec_unix.go`, `mounts.go`, `user.go`, `hosts.go`,
//! `resolvconf.go`). Pure functions, unit-tested without root; the executor does the I/O.

pub(crate) mod hosts;
pub(crate) mod spec;
pub(crate) mod user;
