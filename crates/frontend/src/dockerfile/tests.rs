//! Converter tables: image configs and history as upstream writes them, the LLB ops of
//! common instructions, stage pruning and errors with lines.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prost::Message as _;

use super::*;

/// A resolver with fixed configs that records what was asked.
#[derive(Debug)]
struct Fixed {
    configs: BTreeMap<String, String>,
    /// Named contexts by familiar name: `docker-image://REF`, `scratch` or `local:NAME`.
    contexts: BTreeMap<String, String>,
    asked: Mutex<Vec<String>>,
}

impl Fixed {
    fn new() -> Self {
        let mut configs = BTreeMap::new();
        configs.insert(
            "docker.io/library/busybox:latest".into(),
            r#"{"architecture":"amd64","os":"linux","created":"2020-01-01T00:00:00Z","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:aaaa"]},"history":[{"created":"2020-01-01T00:00:00Z","created_by":"ADD rootfs"}]}"#.into(),
        );
        configs.insert(
            "docker.io/library/onb:latest".into(),
            r#"{"architecture":"amd64","os":"linux","config":{"WorkingDir":"/w","User":"nobody","OnBuild":["RUN echo triggered"]},"rootfs":{"type":"layers","diff_ids":["sha256:bbbb"]}}"#.into(),
        );
        configs.insert(
            "docker.io/library/alpine:latest".into(),
            r#"{"architecture":"amd64","os":"linux","created":"2021-01-01T00:00:00Z","config":{"Env":["PATH=/bin","ALPINE=1"],"WorkingDir":"/a"},"rootfs":{"type":"layers","diff_ids":["sha256:cccc"]},"history":[{"created":"2021-01-01T00:00:00Z","created_by":"ADD alpine"}]}"#.into(),
        );
        Fixed {
            configs,
            contexts: BTreeMap::new(),
            asked: Mutex::new(vec![]),
        }
    }
}

impl MetaResolver for Fixed {
    async fn resolve_image_config(
        &self,
        reference: &str,
        _platform: &Platform,
        _mode: &str,
        _log: &str,
    ) -> Result<(String, Vec<u8>), Error> {
        self.asked.lock().unwrap().push(reference.to_string());
        match self.configs.get(reference) {
            Some(c) => Ok((String::new(), c.clone().into_bytes())),
            None => Err(Error::bridge(
                "",
                format!("docker.io/library/{reference}: not found").into(),
            )),
        }
    }

    async fn context_by_name(
        &self,
        name: &str,
        _mode: &str,
        platform: &Platform,
    ) -> Result<Option<named::NamedContext>, Error> {
        let Some(spec) = self.contexts.get(&named::familiar(name)?) else {
            return Ok(None);
        };
        self.asked.lock().unwrap().push(format!("context:{name}"));
        if spec == "scratch" {
            return Ok(Some(named::NamedContext {
                state: llb::scratch(),
                image: None,
            }));
        }
        if let Some(l) = spec.strip_prefix("local:") {
            return Ok(Some(named::NamedContext {
                state: llb::local(l).state(),
                image: None,
            }));
        }
        let r = spec.strip_prefix("docker-image://").unwrap();
        let img: Image = serde_json::from_str(&self.configs[&llb::normalize_ref(r)]).unwrap();
        let st = llb::image(r).platform(platform.to_llb()).state();
        Ok(Some(named::NamedContext {
            state: named::with_image_config(st, &img),
            image: Some(img),
        }))
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    // the fixed resolver never waits: one poll finishes
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("fixed resolver future pending"),
    }
}

fn convert(df: &str, opt: ConvertOpt) -> Result<(Converted, Fixed), Error> {
    let r = Fixed::new();
    let c = block_on(dockerfile_to_llb(df.as_bytes(), &opt, &r))?;
    Ok((c, r))
}

fn config_json(c: &Converted) -> serde_json::Value {
    serde_json::from_slice(&c.image.to_go_json()).unwrap()
}

fn ops(c: &Converted) -> Vec<llb::pb::Op> {
    let def = c.state.marshal().unwrap();
    def.def
        .iter()
        .map(|b| llb::pb::Op::decode(b.as_ref()).unwrap())
        .collect()
}

fn execs(c: &Converted) -> Vec<llb::pb::ExecOp> {
    ops(c)
        .into_iter()
        .filter_map(|o| match o.op {
            Some(llb::pb::op::Op::Exec(e)) => Some(e),
            _ => None,
        })
        .collect()
}

fn history(c: &Converted) -> Vec<(String, bool)> {
    c.image
        .history
        .iter()
        .map(|h| (h.created_by.clone(), h.empty_layer))
        .collect()
}

#[test]
fn config_and_history_like_upstream() {
    let df = r#"FROM busybox
LABEL a=b "c d"="e f"
ENV X=1 Y="two words"
ARG V=3
WORKDIR /app
USER 1000:1000
RUN echo $X $V
EXPOSE 80 53/udp
VOLUME /data
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --retries=3 CMD wget -q localhost
SHELL ["/bin/ash", "-c"]
ENTRYPOINT ["/bin/echo"]
CMD echo <hi> && done
MAINTAINER someone
ONBUILD RUN echo later
"#;
    let (c, _) = convert(df, ConvertOpt::default()).unwrap();
    let h = history(&c);
    let want: Vec<(&str, bool)> = vec![
        ("ADD rootfs", false),
        ("LABEL a=b c d=e f", true),
        ("ENV X=1 Y=two words", true),
        ("ARG V=3", true),
        ("WORKDIR /app", false),
        ("USER 1000:1000", true),
        ("RUN |1 V=3 /bin/sh -c echo $X $V # buildkit", false),
        ("EXPOSE map[53/udp:{} 80/tcp:{}]", true),
        ("VOLUME [/data]", true),
        ("STOPSIGNAL SIGTERM", true),
        (
            r#"HEALTHCHECK &{["CMD-SHELL" "wget -q localhost"] "5s" "0s" "0s" '\x03'}"#,
            true,
        ),
        ("SHELL [/bin/ash -c]", true),
        (r#"ENTRYPOINT ["/bin/echo"]"#, true),
        (r#"CMD ["/bin/ash" "-c" "echo <hi> && done"]"#, true),
        ("MAINTAINER someone", true),
    ];
    let got: Vec<(&str, bool)> = h.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    assert_eq!(got, want);
    assert!(c.image.history[1..]
        .iter()
        .all(|h| h.comment == "buildkit.dockerfile.v0" && h.created.is_none()));
    let j = config_json(&c);
    let cfg = &j["config"];
    assert_eq!(
        cfg["Env"],
        serde_json::json!([
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "X=1",
            "Y=two words"
        ])
    );
    assert_eq!(cfg["User"], "1000:1000");
    assert_eq!(cfg["WorkingDir"], "/app");
    assert_eq!(cfg["Labels"], serde_json::json!({"a":"b","c d":"e f"}));
    assert_eq!(
        cfg["ExposedPorts"],
        serde_json::json!({"53/udp":{},"80/tcp":{}})
    );
    assert_eq!(cfg["Volumes"], serde_json::json!({"/data":{}}));
    assert_eq!(
        cfg["Healthcheck"],
        serde_json::json!({"Test":["CMD-SHELL","wget -q localhost"],"Interval":5000000000u64,"Retries":3})
    );
    assert_eq!(cfg["OnBuild"], serde_json::json!(["RUN echo later"]));
    assert_eq!(cfg["ArgsEscaped"], true);
    assert_eq!(j["author"], "someone");
    assert!(j.get("created").is_none());
    // Go's HTML-safe escaping in the bytes
    let raw = String::from_utf8(c.image.to_go_json()).unwrap();
    assert!(
        raw.contains(r#""echo \u003chi\u003e \u0026\u0026 done""#),
        "{raw}"
    );
    // the RUN: shell form, env from image + ENV + ARG, cwd and user
    let e = &execs(&c)[0];
    let meta = e.meta.as_ref().unwrap();
    assert_eq!(meta.args, vec!["/bin/sh", "-c", "echo $X $V"]);
    assert_eq!(meta.cwd, "/app");
    assert_eq!(meta.user, "1000:1000");
    assert!(meta.env.contains(&"V=3".to_string()));
    assert!(meta.env.contains(&"Y=two words".to_string()));
}

#[test]
fn stage_pruning_target_and_copy_from() {
    let df = "FROM busybox AS build\nRUN echo build > /out\n\nFROM nope AS unused\nRUN false\n\nFROM scratch\nCOPY --from=build /out /out\n";
    let (c, r) = convert(df, ConvertOpt::default()).unwrap();
    // the unused stage's image is never resolved
    assert_eq!(
        *r.asked.lock().unwrap(),
        vec!["docker.io/library/busybox:latest"]
    );
    let ex = execs(&c);
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].meta.as_ref().unwrap().args[2], "echo build > /out");
    let j = config_json(&c);
    assert_eq!(j["config"]["WorkingDir"], "/");
    assert_eq!(
        history(&c),
        vec![("COPY /out /out # buildkit".to_string(), false)]
    );
    // --target picks a stage
    let (c, _) = convert(
        df,
        ConvertOpt {
            target: "build".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(config_json(&c)["config"]["Cmd"], serde_json::json!(["sh"]));
    let e = convert(
        df,
        ConvertOpt {
            target: "nosuch".into(),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "target stage nosuch could not be found");
}

#[test]
fn progress_names_and_context_paths() {
    let df = "FROM busybox\nCOPY a b/ /dst/\nRUN --mount=type=bind,source=c,target=/c cat /c\n";
    let (c, _) = convert(df, ConvertOpt::default()).unwrap();
    let def = c.state.marshal().unwrap();
    let names: Vec<String> = def
        .metadata
        .values()
        .filter_map(|m| m.description.get("llb.customname").cloned())
        .collect();
    for want in [
        // a RUN --mount adds an (unnamed) scratch state, so the stage keeps its name, as
        // upstream's does
        "[stage-0 1/3] FROM docker.io/library/busybox:latest",
        "[stage-0 2/3] COPY a b/ /dst/",
        "[stage-0 3/3] RUN --mount=type=bind,source=c,target=/c cat /c",
        "[internal] load build context",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let local = ops(&c)
        .into_iter()
        .find_map(|o| match o.op {
            Some(llb::pb::op::Op::Source(s)) if s.identifier == "local://context" => Some(s),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        local.attrs.get("local.followpaths").unwrap(),
        r#"["a","b","c"]"#
    );
}

#[test]
fn onbuild_triggers_workdir_and_user_of_base() {
    let (c, _) = convert("FROM onb\nRUN id\n", ConvertOpt::default()).unwrap();
    let ex = execs(&c);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].meta.as_ref().unwrap().args[2], "echo triggered");
    assert_eq!(ex[1].meta.as_ref().unwrap().cwd, "/w");
    assert_eq!(ex[1].meta.as_ref().unwrap().user, "nobody");
    assert_eq!(
        config_json(&c)["config"]["OnBuild"],
        serde_json::Value::Null
    );
}

#[test]
fn heredocs_and_mounts() {
    let df = "FROM busybox\nRUN <<EOF\necho one\necho two\nEOF\nCOPY <<f.txt /f.txt\nhello\nf.txt\nRUN --mount=type=cache,target=/var/cache,id=c1,sharing=locked --mount=type=secret,id=tok --mount=type=tmpfs,target=/t,size=1m true\n";
    let (c, _) = convert(df, ConvertOpt::default()).unwrap();
    let ex = execs(&c);
    assert_eq!(
        ex[0].meta.as_ref().unwrap().args,
        vec!["/bin/sh", "-c", "echo one\necho two\n"]
    );
    let m = &ex[1].mounts;
    let cache = m.iter().find(|m| m.dest == "/var/cache").unwrap();
    assert_eq!(cache.cache_opt.as_ref().unwrap().id, "/c1");
    assert_eq!(
        cache.cache_opt.as_ref().unwrap().sharing,
        llb::pb::CacheSharingOpt::Locked as i32
    );
    let secret = m.iter().find(|m| m.dest == "/run/secrets/tok").unwrap();
    assert!(secret.secret_opt.as_ref().unwrap().optional);
    let tmp = m.iter().find(|m| m.dest == "/t").unwrap();
    assert_eq!(tmp.tmpfs_opt.as_ref().unwrap().size, 1 << 20);
    assert_eq!(
        history(&c)[2].0,
        "COPY <<f.txt /f.txt # buildkit".to_string()
    );
}

#[test]
fn copy_link_is_a_merge() {
    let (c, _) = convert("FROM busybox\nCOPY --link a /a\n", ConvertOpt::default()).unwrap();
    assert!(ops(&c)
        .iter()
        .any(|o| matches!(o.op, Some(llb::pb::op::Op::Merge(_)))));
}

/// The `local.followpaths` of the build context (`None`: no such attribute).
fn follow_paths(c: &Converted) -> Option<String> {
    let local = ops(c)
        .into_iter()
        .find_map(|o| match o.op {
            Some(llb::pb::op::Op::Source(s)) if s.identifier == "local://context" => Some(s),
            _ => None,
        })
        .unwrap();
    local.attrs.get("local.followpaths").cloned()
}

#[test]
fn context_paths_of_every_kind() {
    // The paths-only first pass must find exactly what a full dispatch uses: sources expanded
    // with the environment (also one inherited from the base stage), ONBUILD triggers run in a
    // child stage, ADD without URLs, RUN bind mounts from the context; not COPY --from, cache,
    // secret and ssh mounts, mounts from a stage, or stages the target does not reach.
    let df = "FROM busybox AS base\n\
              ENV SRC=fromenv\n\
              ONBUILD COPY onb /onb\n\
              COPY ${SRC} /x\n\
              FROM base AS child\n\
              ADD http://example.com/f /f\n\
              ADD addsrc /a\n\
              COPY --from=base /x /y\n\
              RUN --mount=type=cache,target=/c --mount=type=secret,id=s \\\n  \
              --mount=type=ssh --mount=type=bind,from=base,source=b,target=/b \\\n  \
              --mount=type=bind,source=${SRC}/bind,target=/m true\n\
              FROM busybox AS unused\n\
              COPY unusedsrc /u\n\
              FROM child\n";
    let (c, _) = convert(df, ConvertOpt::default()).unwrap();
    assert_eq!(
        follow_paths(&c).as_deref(),
        Some(r#"["addsrc","fromenv","fromenv/bind","onb"]"#)
    );
    // A mount of the whole context (here a tmpfs mount, which counts its empty source) means
    // every path: no followpaths.
    let df = "FROM busybox\nCOPY a /a\nRUN --mount=type=tmpfs,target=/t true\n";
    let (c, _) = convert(df, ConvertOpt::default()).unwrap();
    assert_eq!(follow_paths(&c), None);
}

#[test]
fn first_error_wins_over_later_ones() {
    // The first pass skips the mount checks of RUN; a later expansion error must not be
    // reported in place of the first error a full dispatch meets.
    let e = convert(
        "FROM busybox\nRUN --mount=type=bind,target=/ true\nENV A=${B:?boom}\n",
        ConvertOpt::default(),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "invalid mount target \"/\"");
    assert_eq!(e.location().unwrap().ranges, crate::parser::to_ranges(2, 2));
    let e = convert(
        "FROM busybox\nENV A=${B:?boom}\nRUN --mount=type=bind,target=/ true\n",
        ConvertOpt::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("B: boom"), "{e}");
    assert_eq!(e.location().unwrap().ranges, crate::parser::to_ranges(2, 2));
}

#[test]
fn errors_name_lines() {
    let e = convert(
        "FROM busybox\nRUN --mount=type=bind,target=/ true\n",
        ConvertOpt::default(),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "invalid mount target \"/\"");
    assert_eq!(e.location().unwrap().ranges, crate::parser::to_ranges(2, 2));
    let e = convert("FROM busybox\nFOO bar\n", ConvertOpt::default()).unwrap_err();
    assert!(e.to_string().contains("unknown instruction: FOO"), "{e}");
    assert_eq!(e.location().unwrap().ranges, crate::parser::to_ranges(2, 2));
    let e = convert("FROM nosuchimage\n", ConvertOpt::default()).unwrap_err();
    assert!(e.to_string().starts_with("nosuchimage: "), "{e}");
    assert_eq!(e.location().unwrap().ranges, crate::parser::to_ranges(1, 1));
    let e = convert("", ConvertOpt::default()).unwrap_err();
    assert_eq!(e.to_string(), "the Dockerfile cannot be empty");
}

#[test]
fn build_args_and_platform_args() {
    let df = "ARG BASE=busybox\nFROM $BASE\nARG TARGETARCH\nARG A\nRUN echo $TARGETARCH $A\n";
    let mut opt = ConvertOpt::default();
    opt.build_args.insert("A".into(), "x".into());
    let (c, _) = convert(df, opt).unwrap();
    let meta = execs(&c)[0].meta.clone().unwrap();
    assert!(meta
        .env
        .contains(&format!("TARGETARCH={}", Platform::host().architecture)));
    assert!(meta.env.contains(&"A=x".to_string()));
    assert_eq!(
        history(&c).last().unwrap().0,
        format!(
            "RUN |2 TARGETARCH={} A=x /bin/sh -c echo $TARGETARCH $A # buildkit",
            Platform::host().architecture
        )
    );
}

#[test]
fn builtin_syntax_names() {
    assert!(is_builtin_syntax("docker/dockerfile:1"));
    assert!(is_builtin_syntax("docker/dockerfile:1.5.2"));
    assert!(is_builtin_syntax("docker.io/docker/dockerfile:1.4"));
    assert!(!is_builtin_syntax("docker/dockerfile:1.6"));
    assert!(!is_builtin_syntax("docker/dockerfile-upstream:master"));
    assert!(!is_builtin_syntax("example.com/frontend:1"));
}

#[test]
fn epoch_times() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
}

#[test]
fn frontend_options_reach_run() {
    let bo = BuildOpts {
        opts: [
            ("cgroup-parent", "foocgroup"),
            ("shm-size", "134217728"),
            ("ulimit", "nofile=1062:1062"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..Default::default()
    };
    let opt = parse_opts(&bo).unwrap();
    let (c, _) = convert("FROM busybox\nRUN true\n", opt).unwrap();
    let ex = execs(&c);
    let meta = ex[0].meta.as_ref().unwrap();
    assert_eq!(meta.cgroup_parent, "foocgroup");
    assert_eq!(meta.ulimit[0].name, "nofile");
    assert_eq!((meta.ulimit[0].soft, meta.ulimit[0].hard), (1062, 1062));
    let shm = ex[0].mounts.iter().find(|m| m.dest == "/dev/shm").unwrap();
    assert_eq!(shm.tmpfs_opt.as_ref().unwrap().size, 134_217_728);
}

fn sources(c: &Converted) -> Vec<String> {
    ops(c)
        .into_iter()
        .filter_map(|o| match o.op {
            Some(llb::pb::op::Op::Source(s)) => Some(s.identifier),
            _ => None,
        })
        .collect()
}

#[test]
fn named_contexts_replace_stages_images_and_copy_sources() {
    let mut r = Fixed::new();
    r.contexts
        .insert("busybox".into(), "docker-image://alpine".into());
    r.contexts.insert("base".into(), "local:basedir".into());
    r.contexts.insert("extra".into(), "scratch".into());
    // `busybox` (an image) comes from alpine; the `base` stage is replaced by a client
    // directory and none of its instructions run; `--from=extra` is nothing.
    let df = "FROM busybox AS base\nRUN exit 1\nFROM busybox\nCOPY --from=base /o* /\nCOPY --from=extra / /e\nRUN cat /etc/alpine-release\n";
    let c = block_on(dockerfile_to_llb(df.as_bytes(), &ConvertOpt::default(), &r)).unwrap();
    let src = sources(&c);
    assert!(
        src.contains(&"docker-image://docker.io/library/alpine:latest".to_string()),
        "{src:?}"
    );
    assert!(src.contains(&"local://basedir".to_string()), "{src:?}");
    assert!(!src.iter().any(|s| s.contains("busybox")), "{src:?}");
    let ex = execs(&c);
    assert_eq!(ex.len(), 1, "the replaced stage's RUN is gone");
    assert_eq!(
        ex[0].meta.as_ref().unwrap().args,
        vec!["/bin/sh", "-c", "cat /etc/alpine-release"]
    );
    // the image config is alpine's (env, workdir), and no registry lookup of busybox happened
    let cfg = config_json(&c);
    assert_eq!(
        cfg["config"]["Env"],
        serde_json::json!(["PATH=/bin", "ALPINE=1"])
    );
    assert_eq!(cfg["config"]["WorkingDir"], "/a");
    let asked = r.asked.lock().unwrap().clone();
    assert!(
        !asked
            .iter()
            .any(|a| a == "docker.io/library/busybox:latest"),
        "{asked:?}"
    );
}

#[test]
fn epoch_clamps_times_of_named_stage_images() {
    let mut img: Image = serde_json::from_str(
        r#"{"created":"2030-01-01T00:00:00.5+01:00","history":[{"created":"2001-01-01T00:00:00Z"},{"created":"2031-01-01T00:00:00Z"},{}]}"#,
    )
    .unwrap();
    convert::clamp_times(&mut img, Some("2020-01-01T00:00:00Z"));
    assert_eq!(img.created.as_deref(), Some("2020-01-01T00:00:00Z"));
    let h: Vec<Option<&str>> = img.history.iter().map(|h| h.created.as_deref()).collect();
    assert_eq!(
        h,
        vec![
            Some("2001-01-01T00:00:00Z"),
            Some("2020-01-01T00:00:00Z"),
            Some("2020-01-01T00:00:00Z")
        ]
    );
}

#[test]
fn windows_targets_get_cmd_as_shell_and_windows_path() {
    // TestDefaultShellAndPath: the default shell and PATH follow the target's OS.
    let df = "FROM scratch\nENTRYPOINT foo bar\n";
    let opt = ConvertOpt {
        target_platform: Some(Platform {
            os: "windows".into(),
            architecture: "amd64".into(),
            variant: String::new(),
        }),
        ..Default::default()
    };
    let (c, _) = convert(df, opt).unwrap();
    let cfg = config_json(&c);
    assert_eq!(
        cfg["config"]["Entrypoint"],
        serde_json::json!(["cmd", "/S", "/C", "foo bar"])
    );
    assert_eq!(
        cfg["config"]["Env"],
        serde_json::json!(["PATH=c:\\Windows\\System32;c:\\Windows"])
    );
    let (c, _) = convert(df, ConvertOpt::default()).unwrap();
    let cfg = config_json(&c);
    assert_eq!(
        cfg["config"]["Entrypoint"],
        serde_json::json!(["/bin/sh", "-c", "foo bar"])
    );
    assert_eq!(
        cfg["config"]["Env"],
        serde_json::json!([format!("PATH={}", super::image::DEFAULT_PATH)])
    );
}
