//! The bench's input, shared with the test that pins its output (tests/convert_pin.rs): a
//! 200-line, three-stage Dockerfile and a resolver serving fixed image configs without I/O.

// Each includer uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;

use frontend::dockerfile::{named, ConvertOpt, Error, MetaResolver, Platform};

/// Image configs by normalized reference, served without I/O.
pub struct Fixed(BTreeMap<&'static str, &'static str>);

impl MetaResolver for Fixed {
    async fn resolve_image_config(
        &self,
        reference: &str,
        _platform: &Platform,
        _mode: &str,
        _log: &str,
    ) -> Result<(String, Vec<u8>), Error> {
        let c = self
            .0
            .get(reference)
            .unwrap_or_else(|| panic!("no config for {reference}"));
        Ok((String::new(), c.as_bytes().to_vec()))
    }

    async fn context_by_name(
        &self,
        _name: &str,
        _mode: &str,
        _platform: &Platform,
    ) -> Result<Option<named::NamedContext>, Error> {
        Ok(None)
    }
}

pub const CONFIG: &str = r#"{"architecture":"amd64","os":"linux","created":"2020-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:aaaa"]},"history":[{"created":"2020-01-01T00:00:00Z","created_by":"ADD rootfs"}]}"#;

/// A 200-line, three-stage Dockerfile.
pub fn dockerfile() -> String {
    let mut d = String::from(
        "# syntax=docker/dockerfile:1.5\n\
         ARG BASE=busybox\n\
         ARG VERSION=1.0\n\
         FROM ${BASE}:latest AS builder\n\
         ARG VERSION\n\
         ENV APP_HOME=/src GOFLAGS=-mod=vendor\n\
         WORKDIR ${APP_HOME}\n\
         COPY go.mod go.sum ./\n\
         RUN --mount=type=cache,target=/root/.cache,id=build-cache,sharing=locked \\\n    \
             --mount=type=secret,id=token,required=false \\\n    \
             --mount=type=tmpfs,target=/tmp \\\n    \
             echo download ${VERSION}\n\
         COPY --link . .\n",
    );
    for i in 0..40 {
        d.push_str(&format!(
            "RUN --mount=type=bind,source=pkg/p{i},target=/mnt/p{i} echo build step {i} ${{VERSION:-dev}} > /out{i}\n"
        ));
        d.push_str(&format!("ENV STEP_{i}=${{APP_HOME}}/step{i}\n"));
    }
    d.push_str(
        "RUN <<EOF\n\
         set -e\n\
         echo heredoc one\n\
         echo heredoc two\n\
         EOF\n\
         FROM alpine:latest AS tools\n\
         ARG TOOLS=\"a b c\"\n\
         RUN --network=none echo ${TOOLS}\n\
         COPY <<EOF /etc/tools.conf\n\
         tools=${TOOLS}\n\
         EOF\n",
    );
    for i in 0..30 {
        d.push_str(&format!(
            "RUN --mount=type=ssh,required=false echo tool {i} && mkdir -p /opt/t{i}\n"
        ));
        d.push_str(&format!("LABEL tool.{i}=\"t{i}\"\n"));
    }
    d.push_str(
        "FROM busybox:latest\n\
         ARG VERSION\n\
         LABEL org.opencontainers.image.version=${VERSION}\n\
         USER 1000:1000\n\
         WORKDIR /app\n\
         COPY --from=builder --chown=1000:1000 --chmod=0755 /out0 /app/bin/\n\
         COPY --from=tools /etc/tools.conf /etc/\n\
         EXPOSE 8080/tcp 9090\n\
         VOLUME [\"/data\"]\n\
         STOPSIGNAL SIGTERM\n\
         HEALTHCHECK --interval=30s --timeout=5s CMD [\"/app/bin/out0\", \"health\"]\n\
         SHELL [\"/bin/sh\", \"-ec\"]\n\
         ONBUILD RUN echo child\n\
         ENTRYPOINT [\"/app/bin/out0\"]\n\
         CMD [\"serve\"]\n",
    );
    let mut lines = d.lines().count();
    let mut i = 0;
    while lines < 200 {
        d.push_str(&format!("ENV FINAL_{i}=${{VERSION}}-{i}\n"));
        lines += 1;
        i += 1;
    }
    d
}

/// The resolver with the bench's two base images.
pub fn resolver() -> Fixed {
    Fixed(BTreeMap::from([
        ("docker.io/library/busybox:latest", CONFIG),
        ("docker.io/library/alpine:latest", CONFIG),
    ]))
}

/// The bench's options for `platform`: one build arg, `platform` as target.
pub fn options(platform: Platform) -> ConvertOpt {
    ConvertOpt {
        build_args: BTreeMap::from([("VERSION".into(), "2.0".into())]),
        target_platform: Some(platform),
        ..Default::default()
    }
}
