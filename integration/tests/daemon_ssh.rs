//! SSH agent forwarding end to end through berthd's gRPC API: the client side of the session
//! serves a real `ssh-agent` via `SSH/CheckAgent` and `SSH/ForwardAgent` (as buildctl
//! `--ssh default=SOCKET` does), and the host's `ssh-add` inside the build container lists the
//! agent's key through the mounted socket. Needs root, runc, busybox-static and openssh-client.

mod ssh_support;

use std::collections::BTreeMap;

use integration::buildkit_client::{Berthd, BuildOptions, Output};
use integration::{busybox_image, require_root, DockerEngine};
use llb::{Mount, RunOpts};
use ssh_support::{tools_dir, Agent, SSH_ADD};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_agent_through_the_session() {
    require_root();
    let engine = DockerEngine::system().unwrap();
    let img = busybox_image(&engine).await.unwrap();
    let agent = Agent::start().unwrap();
    let berthd = Berthd::start(&[]).unwrap();
    let client = berthd.client().await.unwrap();
    let tools = berthd.scratch().join("tools");
    tools_dir(&tools).unwrap();

    // `tag` makes otherwise equal execs distinct (a cached exec needs no agent, as in buildkitd).
    let build = |id: &str, optional: bool, tag: &str| {
        let exec = llb::image(img.reference()).state().run(
            RunOpts::shell(format!(
                "{SSH_ADD} -l > /out/list 2>&1; echo \"rc=$?\" >> /out/list; \
                 echo \"$SSH_AUTH_SOCK\" > /out/sock # {tag}"
            ))
            .mount(Mount::bind("/tools", &llb::local("tools").state()).readonly())
            .mount(Mount::bind("/out", &llb::scratch()))
            .mount(Mount::ssh("", id, optional)),
        );
        exec.get_mount("/out").unwrap().marshal().unwrap()
    };
    let opts = |def, out: &std::path::Path, agents: bool| BuildOptions {
        definition: Some(def),
        locals: [("tools".to_string(), tools.clone())].into(),
        output: Output::Local(out.to_path_buf()),
        ssh_agents: if agents {
            BTreeMap::from([("default".to_string(), agent.sock.clone())])
        } else {
            BTreeMap::new()
        },
        ..Default::default()
    };

    // The default agent, forwarded: the container lists the same key as the host.
    let out = berthd.scratch().join("out");
    let r = client
        .build(opts(build("", false, "a"), &out, true))
        .await
        .unwrap();
    assert!(r.solve.is_ok(), "{:?}\n{}", r.solve, berthd.log_text());
    let list = std::fs::read_to_string(out.join("list")).unwrap();
    assert_eq!(list, format!("{}rc=0\n", agent.listing));
    assert!(list.contains(&agent.comment));

    // The same build again is cached: nothing asks the client for the agent.
    let out_again = berthd.scratch().join("out-again");
    let r = client
        .build(opts(build("", false, "a"), &out_again, false))
        .await
        .unwrap();
    assert!(r.solve.is_ok(), "{:?}\n{}", r.solve, berthd.log_text());
    assert_eq!(
        std::fs::read_to_string(out_again.join("list")).unwrap(),
        format!("{}rc=0\n", agent.listing)
    );
    assert_eq!(
        std::fs::read_to_string(out.join("sock")).unwrap(),
        "/run/buildkit/ssh_agent.0\n"
    );

    // An id the client does not have: the client's answer names it.
    let out2 = berthd.scratch().join("out2");
    let r = client
        .build(opts(build("deploy", false, "b"), &out2, true))
        .await
        .unwrap();
    let e = r.solve.expect_err("unknown ssh id must fail");
    assert!(
        e.message().contains("unset ssh forward key deploy"),
        "{}",
        e.message()
    );

    // No SSH forwarding in the session at all: buildkitd's message.
    let r = client
        .build(opts(build("", false, "c"), &out2, false))
        .await
        .unwrap();
    let e = r.solve.expect_err("missing agent must fail");
    assert!(
        e.message()
            .contains("no SSH key \"default\" forwarded from the client"),
        "{}",
        e.message()
    );

    // Optional: runs without a socket (ssh-add cannot connect).
    let out3 = berthd.scratch().join("out3");
    let r = client
        .build(opts(build("", true, "d"), &out3, false))
        .await
        .unwrap();
    assert!(r.solve.is_ok(), "{:?}\n{}", r.solve, berthd.log_text());
    let list = std::fs::read_to_string(out3.join("list")).unwrap();
    assert!(
        !list.contains(&agent.comment) && !list.ends_with("rc=0\n"),
        "{list}"
    );
}
