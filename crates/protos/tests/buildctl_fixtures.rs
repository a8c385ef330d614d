//! Decodes bytes that stock `buildctl` / `buildkitd` v0.11.6 really exchanged
//! (captured fixtures, see `tests/fixtures/README.md`) with berth's own wire
//! types, and checks every field berth relies on.
//!
//! Two generic checks run on every captured message:
//! * **schema coverage**: the raw bytes are walked with our compiled
//!   descriptor set ([`protos::FILE_DESCRIPTOR_SET`]); any field number on the
//!   wire that our `.proto` files do not declare fails the test (prost would
//!   silently drop it);
//! * **round trip**: decoding and re-encoding with prost gives the original
//!   bytes. Where Go's encoder and prost legitimately differ (prost skips a
//!   default-valued map value that gogo writes), the test requires both
//!   encodings to be equal after normalising exactly that difference, and
//!   counts such messages so a new kind of difference cannot hide.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use protos::moby::buildkit::v1 as control;
use protos::moby::buildkit::v1::frontend as gw;
use protos::pb;
use protos::prost::Message;
use protos::prost_types::field_descriptor_proto::Type as FieldType;
use protos::prost_types::{DescriptorProto, FileDescriptorSet};

// ---------------------------------------------------------------------------
// Fixture access

fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(rel: &str) -> Vec<u8> {
    let p = fixtures_dir().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("fixture {} missing: {e}", p.display()))
}

fn fixture_text(rel: &str) -> String {
    String::from_utf8(fixture(rel)).expect("fixture text is utf-8")
}

/// `<scenario>/<call>.<dir>.<n>.bin` for n = 0.. until the first gap.
fn chunks(scenario: &str, call: &str, dir: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let p = fixtures_dir().join(format!("wire/{scenario}/{call}.{dir}.{}.bin", out.len()));
        match std::fs::read(&p) {
            Ok(b) => out.push(b),
            Err(_) => break,
        }
    }
    assert!(!out.is_empty(), "no {call}.{dir}.*.bin in wire/{scenario}");
    out
}

/// Parses a `key: value` metadata dump (one line per value).
fn metadata(rel: &str) -> Vec<(String, String)> {
    fixture_text(rel)
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap_or_else(|| {
                l.strip_suffix(':')
                    .map(|k| (k, ""))
                    .unwrap_or_else(|| panic!("bad metadata line {l:?} in {rel}"))
            });
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn md_values<'a>(md: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    md.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn md_one<'a>(md: &'a [(String, String)], key: &str) -> &'a str {
    let v = md_values(md, key);
    assert_eq!(v.len(), 1, "header {key} must appear once, got {v:?}");
    v[0]
}

/// `sha256:<hex>` of `data` (an op digest).
fn digest_of(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

// ---------------------------------------------------------------------------
// Schema walk over raw protobuf bytes

struct Schema {
    messages: HashMap<String, DescriptorProto>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone)]
enum Canon {
    Scalar(u8, Vec<u8>),
    Msg(Vec<(u64, Canon)>),
}

fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).expect("truncated varint");
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return v;
        }
    }
    panic!("varint too long");
}

/// Splits one message into `(field number, wire type, raw value)`.
fn wire_fields(buf: &[u8]) -> Vec<(u64, u8, Vec<u8>)> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos);
        let (field, wt) = (key >> 3, (key & 7) as u8);
        let start = pos;
        let value = match wt {
            0 => {
                read_varint(buf, &mut pos);
                buf[start..pos].to_vec()
            }
            1 => {
                pos += 8;
                buf[start..pos].to_vec()
            }
            2 => {
                let len = read_varint(buf, &mut pos) as usize;
                let v = buf[pos..pos + len].to_vec();
                pos += len;
                v
            }
            5 => {
                pos += 4;
                buf[start..pos].to_vec()
            }
            other => panic!("unsupported wire type {other} (field {field})"),
        };
        assert!(pos <= buf.len(), "field {field} runs past the end");
        out.push((field, wt, value));
    }
    out
}

impl Schema {
    fn load() -> Self {
        let fds = FileDescriptorSet::decode(protos::FILE_DESCRIPTOR_SET).expect("descriptor set");
        let mut messages = HashMap::new();
        fn add(prefix: &str, d: &DescriptorProto, into: &mut HashMap<String, DescriptorProto>) {
            let name = format!("{prefix}.{}", d.name());
            for n in &d.nested_type {
                add(&name, n, into);
            }
            into.insert(name, d.clone());
        }
        for f in &fds.file {
            let prefix = if f.package().is_empty() {
                String::new()
            } else {
                format!(".{}", f.package())
            };
            for m in &f.message_type {
                add(&prefix, m, &mut messages);
            }
        }
        Schema { messages }
    }

    fn message(&self, type_name: &str) -> &DescriptorProto {
        self.messages
            .get(type_name)
            .unwrap_or_else(|| panic!("type {type_name} not in our descriptor set"))
    }

    /// Every field on the wire that `type_name` (recursively) does not declare.
    fn unknown_fields(&self, type_name: &str, buf: &[u8], path: &str, out: &mut Vec<String>) {
        let desc = self.message(type_name);
        for (num, wt, value) in wire_fields(buf) {
            match desc.field.iter().find(|f| f.number() as u64 == num) {
                None => out.push(format!("{path}{type_name}#{num} (wire type {wt})")),
                Some(f) if f.r#type() == FieldType::Message && wt == 2 => {
                    let p = format!("{path}{type_name}.{}/", f.name());
                    self.unknown_fields(f.type_name(), &value, &p, out);
                }
                Some(_) => {}
            }
        }
    }

    /// A normal form of the message: fields stably sorted by number and
    /// nested messages normalised; with `sort_maps`, the entries of each map
    /// field are sorted; with `drop_map_defaults`, default-valued (empty)
    /// keys/values inside map entries are dropped. These are the two places
    /// where Go and prost legitimately encode the same message differently.
    fn canon(
        &self,
        type_name: &str,
        buf: &[u8],
        sort_maps: bool,
        drop_map_defaults: bool,
    ) -> Canon {
        let desc = self.message(type_name);
        let map_entry = desc.options.as_ref().is_some_and(|o| o.map_entry());
        let mut fields = Vec::new();
        let mut map_fields = BTreeSet::new();
        for (num, wt, value) in wire_fields(buf) {
            let f = desc.field.iter().find(|f| f.number() as u64 == num);
            let c = match f {
                Some(f) if f.r#type() == FieldType::Message && wt == 2 => {
                    if self
                        .message(f.type_name())
                        .options
                        .as_ref()
                        .is_some_and(|o| o.map_entry())
                    {
                        map_fields.insert(num);
                    }
                    self.canon(f.type_name(), &value, sort_maps, drop_map_defaults)
                }
                _ => Canon::Scalar(wt, value),
            };
            let is_default = match &c {
                Canon::Scalar(0, v) => v == &[0],
                Canon::Scalar(2, v) => v.is_empty(),
                Canon::Msg(m) => m.is_empty(),
                _ => false,
            };
            if map_entry && drop_map_defaults && is_default {
                continue;
            }
            fields.push((num, c));
        }
        fields.sort_by_key(|(n, _)| *n);
        if sort_maps {
            let mut i = 0;
            while i < fields.len() {
                let n = fields[i].0;
                let j = i + fields[i..].iter().take_while(|(m, _)| *m == n).count();
                if map_fields.contains(&n) {
                    fields[i..j].sort();
                }
                i = j;
            }
        }
        Canon::Msg(fields)
    }

    /// How prost's re-encoding `again` relates to the captured `original`.
    fn compare(&self, type_name: &str, original: &[u8], again: &[u8]) -> Option<Diff> {
        if again == original {
            Some(Diff::Exact)
        } else if self.canon(type_name, again, true, false)
            == self.canon(type_name, original, true, false)
        {
            Some(Diff::MapOrder)
        } else if self.canon(type_name, again, true, true)
            == self.canon(type_name, original, true, true)
        {
            Some(Diff::MapDefaults)
        } else {
            None
        }
    }
}

/// How a re-encoded message compares with the captured bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Diff {
    /// Byte for byte the same.
    Exact,
    /// Same entries, but Go wrote a map in random order (gogo's default
    /// marshaler iterates Go maps; only LLB ops use a stable marshaler),
    /// while prost writes its `BTreeMap`s sorted.
    MapOrder,
    /// Go writes an explicit empty value inside a map entry (e.g. the empty
    /// `Locations` per op in `Definition.Source.locations`); prost omits it.
    MapDefaults,
}

/// Round-trip outcomes collected over one test.
#[derive(Default, Debug)]
struct RoundTrips {
    results: Vec<(String, Diff)>,
}

impl RoundTrips {
    /// Decodes `bytes` as `M` (proto type `type_name`), requires that our
    /// schema knows every field on the wire, and that prost re-encodes the
    /// same message (exactly, or up to one of the [`Diff`] cases).
    fn check<M: Message + Default>(
        &mut self,
        schema: &Schema,
        type_name: &str,
        what: &str,
        bytes: &[u8],
    ) -> M {
        let msg = M::decode(bytes).unwrap_or_else(|e| panic!("{what}: decode as {type_name}: {e}"));
        self.record(schema, type_name, what, bytes, &msg.encode_to_vec());
        msg
    }

    fn record(
        &mut self,
        schema: &Schema,
        type_name: &str,
        what: &str,
        original: &[u8],
        again: &[u8],
    ) {
        let mut unknown = Vec::new();
        schema.unknown_fields(type_name, original, "", &mut unknown);
        assert!(
            unknown.is_empty(),
            "{what}: fields missing from our protos: {unknown:?}"
        );
        let diff = schema.compare(type_name, original, again).unwrap_or_else(|| {
            panic!(
                "{what}: prost re-encoding differs from the captured bytes beyond map order/defaults ({} vs {} bytes)",
                again.len(),
                original.len()
            )
        });
        self.results.push((what.to_string(), diff));
    }

    fn of(&self, what: &str) -> Diff {
        self.results
            .iter()
            .find(|(w, _)| w == what)
            .unwrap_or_else(|| panic!("{what} not checked"))
            .1
    }

    /// Asserts every recorded outcome is in `allowed`.
    fn only(&self, allowed: &[Diff]) {
        for (w, d) in &self.results {
            assert!(
                allowed.contains(d),
                "{w}: re-encoding is {d:?}, allowed {allowed:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// LLB definitions

const LLB_OP: &str = ".pb.Op";

/// Decodes every op of a definition, checks digests against metadata keys and
/// returns the ops keyed by digest plus the terminal op's digest.
fn decode_definition(
    schema: &Schema,
    rt: &mut RoundTrips,
    what: &str,
    def: &pb::Definition,
) -> (BTreeMap<String, pb::Op>, String) {
    assert!(!def.def.is_empty(), "{what}: empty definition");
    let mut ops = BTreeMap::new();
    let mut order = Vec::new();
    for (i, raw) in def.def.iter().enumerate() {
        let op_what = format!("{what} op {i}");
        let op: pb::Op = rt.check(schema, LLB_OP, &op_what, raw);
        // Go marshals ops with a stable marshaler; prost must produce the very
        // same bytes, or a berth-built op would get a different digest.
        assert_eq!(
            rt.of(&op_what),
            Diff::Exact,
            "{op_what} must re-encode byte-exactly"
        );
        let dgst = digest_of(raw);
        assert!(
            def.metadata.contains_key(&dgst),
            "{what}: op {i} digest {dgst} has no metadata entry"
        );
        order.push(dgst.clone());
        ops.insert(dgst, op);
    }
    assert_eq!(ops.len(), def.def.len(), "{what}: duplicate ops");
    let keys: BTreeSet<_> = def.metadata.keys().cloned().collect();
    let digests: BTreeSet<_> = ops.keys().cloned().collect();
    assert_eq!(
        keys, digests,
        "{what}: metadata keys are exactly the op digests"
    );

    // Inputs refer only to earlier ops (Go's marshaller emits dependencies first).
    for (i, d) in order.iter().enumerate() {
        for inp in &ops[d].inputs {
            let pos = order.iter().position(|o| o == &inp.digest);
            assert!(
                pos.is_some_and(|p| p < i),
                "{what}: op {i} input {} is not an earlier op",
                inp.digest
            );
        }
    }

    // Terminal op: last, no `op`, exactly one input, carries constraints+platform caps.
    let last = order.last().unwrap().clone();
    let term = &ops[&last];
    assert!(term.op.is_none(), "{what}: terminal op has an op body");
    assert_eq!(term.inputs.len(), 1, "{what}: terminal op has one input");
    let caps = &def.metadata[&last].caps;
    for c in ["constraints", "platform"] {
        assert_eq!(
            caps.get(c),
            Some(&true),
            "{what}: terminal op lacks cap {c}"
        );
    }
    (ops, last)
}

fn source(op: &pb::Op) -> Option<&pb::SourceOp> {
    match &op.op {
        Some(pb::op::Op::Source(s)) => Some(s),
        _ => None,
    }
}

fn custom_name(def: &pb::Definition, d: &str) -> Option<String> {
    def.metadata[d].description.get("llb.customname").cloned()
}

fn by_name<'a>(
    def: &pb::Definition,
    ops: &'a BTreeMap<String, pb::Op>,
    name: &str,
) -> (String, &'a pb::Op) {
    let hits: Vec<_> = ops
        .iter()
        .filter(|(d, _)| custom_name(def, d).as_deref() == Some(name))
        .collect();
    assert_eq!(hits.len(), 1, "exactly one op named {name:?}");
    (hits[0].0.clone(), hits[0].1)
}

fn json_list(s: &str) -> Vec<String> {
    // The Go client stores pattern lists as compact JSON arrays of strings.
    let inner = s
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .expect("JSON array");
    if inner.is_empty() {
        return Vec::new();
    }
    inner
        .split(',')
        .map(|p| {
            p.strip_prefix('"')
                .and_then(|p| p.strip_suffix('"'))
                .expect("JSON string")
                .to_string()
        })
        .collect()
}

fn owner_ids(o: &Option<pb::ChownOpt>) -> (Option<u32>, Option<u32>) {
    let id = |u: &Option<pb::UserOpt>| match u.as_ref().and_then(|u| u.user.as_ref()) {
        Some(pb::user_opt::User::ById(id)) => Some(*id),
        _ => None,
    };
    let o = o.as_ref().expect("owner set");
    (id(&o.user), id(&o.group))
}

#[test]
fn definition_full_decodes_with_every_op_kind() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let def: pb::Definition = rt.check(
        &schema,
        ".pb.Definition",
        "definition_full.pb",
        &fixture("definition_full.pb"),
    );
    let (ops, term) = decode_definition(&schema, &mut rt, "definition_full", &def);
    assert_eq!(ops.len(), 8);

    // Sources.
    let (ctx_d, ctx) = by_name(&def, &ops, "[internal] load build context");
    let ctx_src = source(ctx).expect("context is a source op");
    assert_eq!(ctx_src.identifier, "local://context");
    let a = &ctx_src.attrs;
    assert_eq!(json_list(&a["local.includepattern"]), ["src/**", "go.mod"]);
    assert_eq!(
        json_list(&a["local.excludepatterns"]),
        ["**/*.tmp", "!src/keep.tmp"]
    );
    assert_eq!(json_list(&a["local.followpaths"]), ["src", "go.mod"]);
    assert_eq!(a["local.sharedkeyhint"], "berth-fixture-context");
    assert_eq!(a["local.unique"], "berth-fixture-unique");
    assert!(
        ctx.platform.is_none(),
        "local sources are platform independent"
    );
    let ctx_caps: BTreeSet<_> = def.metadata[&ctx_d]
        .caps
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        ctx_caps,
        BTreeSet::from([
            "source.local",
            "source.local.excludepatterns",
            "source.local.followpaths",
            "source.local.includepatterns",
            "source.local.sharedkeyhint",
            "source.local.unique",
        ])
    );

    let (img_d, img) = by_name(&def, &ops, "base image busybox");
    let img_src = source(img).expect("image is a source op");
    assert_eq!(
        img_src.identifier,
        "docker-image://docker.io/library/busybox:latest"
    );
    let p = img.platform.as_ref().expect("image op has a platform");
    assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "amd64"));
    assert_eq!(def.metadata[&img_d].caps.get("source.image"), Some(&true));

    // Exec.
    let (run_d, run) = by_name(&def, &ops, "RUN list sources");
    let Some(pb::op::Op::Exec(exec)) = &run.op else {
        panic!("RUN is an exec op")
    };
    assert_eq!(run.inputs.len(), 2);
    assert_eq!(run.inputs[0].digest, img_d);
    assert_eq!(run.inputs[1].digest, ctx_d);
    let meta = exec.meta.as_ref().expect("exec meta");
    assert_eq!(meta.args[..2], ["sh", "-c"]);
    assert!(meta.args[2].starts_with("ls /src > /out/list"));
    assert!(meta.env.contains(&"FOO=bar".to_string()));
    assert!(meta
        .env
        .contains(&"SSH_AUTH_SOCK=/run/ssh.sock".to_string()));
    assert_eq!(meta.cwd, "/work");
    assert_eq!(meta.user, "root");
    assert_eq!(meta.cgroup_parent, "berth-fixture");
    assert!(meta.remove_mount_stubs_recursive);
    assert_eq!(meta.extra_hosts.len(), 1);
    assert_eq!(
        (
            meta.extra_hosts[0].host.as_str(),
            meta.extra_hosts[0].ip.as_str()
        ),
        ("registry.berth.test", "10.0.0.5")
    );
    assert_eq!(meta.ulimit.len(), 1);
    assert_eq!(
        (
            meta.ulimit[0].name.as_str(),
            meta.ulimit[0].soft,
            meta.ulimit[0].hard
        ),
        ("nofile", 1024, 2048)
    );
    assert_eq!(exec.network, pb::NetMode::None as i32);
    assert_eq!(exec.security, pb::SecurityMode::Insecure as i32);

    let m: BTreeMap<&str, &pb::Mount> = exec.mounts.iter().map(|m| (m.dest.as_str(), m)).collect();
    assert_eq!(exec.mounts.len(), 8);
    let root = m["/"];
    assert_eq!(
        (root.input, root.output, root.mount_type),
        (0, 0, pb::MountType::Bind as i32)
    );
    let src = m["/src"];
    assert_eq!(
        (src.input, src.output, src.readonly, src.selector.as_str()),
        (1, -1, true, "/src")
    );
    let out = m["/out"];
    assert_eq!(
        (out.input, out.output, out.mount_type),
        (-1, 1, pb::MountType::Bind as i32)
    );
    let cache = m["/root/.cache"];
    assert_eq!(cache.mount_type, pb::MountType::Cache as i32);
    let co = cache.cache_opt.as_ref().expect("cache opt");
    assert_eq!(
        (co.id.as_str(), co.sharing),
        ("berth-cache", pb::CacheSharingOpt::Shared as i32)
    );
    let locked = m["/locked"].cache_opt.as_ref().expect("cache opt");
    assert_eq!(
        (locked.id.as_str(), locked.sharing),
        ("berth-locked", pb::CacheSharingOpt::Locked as i32)
    );
    let tmp = m["/tmp"];
    assert_eq!(tmp.mount_type, pb::MountType::Tmpfs as i32);
    assert_eq!(tmp.tmpfs_opt.as_ref().expect("tmpfs opt").size, 64 << 20);
    let secret = m["/run/secrets/token"];
    assert_eq!(secret.mount_type, pb::MountType::Secret as i32);
    let so = secret.secret_opt.as_ref().expect("secret opt");
    assert_eq!(
        (so.id.as_str(), so.uid, so.gid, so.mode, so.optional),
        ("token", 0, 0, 0o400, false)
    );
    let ssh = m["/run/ssh.sock"];
    assert_eq!(ssh.mount_type, pb::MountType::Ssh as i32);
    let sh = ssh.ssh_opt.as_ref().expect("ssh opt");
    assert_eq!((sh.id.as_str(), sh.mode), ("default", 0o600));
    // Bind mounts number their outputs in mount order: root = 0, /out = 1.
    let outputs: Vec<i64> = exec
        .mounts
        .iter()
        .filter(|m| m.mount_type == pb::MountType::Bind as i32)
        .map(|m| m.output)
        .filter(|&o| o >= 0)
        .collect();
    assert_eq!(outputs, [0, 1]);
    // Secret and ssh mounts leave input/output at their zero values (the Go
    // client never sets them), so 0 there must not be read as "input 0" or
    // "output 0": only bind (and cache) mounts carry meaningful indices.
    for dest in ["/run/secrets/token", "/run/ssh.sock"] {
        assert_eq!((m[dest].input, m[dest].output), (0, 0), "{dest}");
    }

    let run_md = &def.metadata[&run_d];
    assert!(run_md.ignore_cache, "IgnoreCache is carried in OpMetadata");
    let run_caps: BTreeSet<_> = run_md.caps.keys().map(String::as_str).collect();
    // Exactly what the v0.11.6 Go client declares. Note: it sets
    // Meta.cgroupParent without declaring "exec.meta.cgroup.parent", and the
    // insecure security mode is declared only as "exec.meta.security".
    assert_eq!(
        run_caps,
        BTreeSet::from([
            "exec.meta.base",
            "exec.meta.network",
            "exec.meta.security",
            "exec.meta.ulimit",
            "exec.mount.bind",
            "exec.mount.cache",
            "exec.mount.cache.sharing",
            "exec.mount.secret",
            "exec.mount.selector",
            "exec.mount.ssh",
            "exec.mount.tmpfs",
            "exec.mount.tmpfs.size",
        ])
    );

    // File ops.
    let (file_d, file) = by_name(&def, &ops, "file ops");
    let Some(pb::op::Op::File(fo)) = &file.op else {
        panic!("file op")
    };
    assert_eq!(file.inputs.len(), 2);
    assert_eq!(file.inputs[0].digest, ctx_d);
    assert_eq!(
        (file.inputs[1].digest.as_str(), file.inputs[1].index),
        (run_d.as_str(), 1)
    );
    assert_eq!(def.metadata[&file_d].caps.get("file.base"), Some(&true));
    let acts = &fo.actions;
    assert_eq!(acts.len(), 6);
    // Chaining: action i reads the previous action's result (index = inputs + i - 1).
    let chain: Vec<(i64, i64, i64)> = acts
        .iter()
        .map(|a| (a.input, a.secondary_input, a.output))
        .collect();
    assert_eq!(
        chain,
        [
            (-1, -1, -1),
            (2, -1, -1),
            (3, -1, -1),
            (4, -1, -1),
            (5, 0, -1),
            (6, 1, 0)
        ]
    );
    use pb::file_action::Action;
    let Some(Action::Mkdir(mk)) = &acts[0].action else {
        panic!("mkdir")
    };
    assert_eq!(
        (mk.path.as_str(), mk.mode, mk.make_parents, mk.timestamp),
        ("/a/b/c", 0o755, true, -1)
    );
    assert_eq!(owner_ids(&mk.owner), (Some(1000), Some(1000)));
    let Some(Action::Mkfile(mf)) = &acts[1].action else {
        panic!("mkfile")
    };
    assert_eq!((mf.path.as_str(), mf.mode), ("/a/b/c/hello.txt", 0o644));
    assert_eq!(&mf.data[..], b"hello from berth\n");
    assert_eq!(
        mf.timestamp, 1_700_000_000_000_000_000,
        "timestamps are unix nanoseconds"
    );
    assert_eq!(owner_ids(&mf.owner), (Some(1000), Some(1000)));
    let Some(Action::Mkfile(junk)) = &acts[2].action else {
        panic!("mkfile")
    };
    assert!(junk.owner.is_none());
    let Some(Action::Rm(rm)) = &acts[3].action else {
        panic!("rm")
    };
    assert_eq!(
        (rm.path.as_str(), rm.allow_not_found, rm.allow_wildcard),
        ("/a/*.tmp", true, true)
    );
    let Some(Action::Copy(cp)) = &acts[4].action else {
        panic!("copy")
    };
    assert_eq!(
        (cp.src.as_str(), cp.dest.as_str()),
        ("/src/*.go", "/a/code/")
    );
    assert_eq!(cp.mode, 0o640);
    assert!(cp.follow_symlink && cp.dir_copy_contents && cp.create_dest_path);
    assert!(
        cp.allow_wildcard && cp.allow_empty_wildcard && !cp.attempt_unpack_docker_compatibility
    );
    assert_eq!(cp.include_patterns, ["*.go"]);
    assert_eq!(cp.exclude_patterns, ["*_test.go"]);
    assert_eq!(cp.timestamp, 1_700_000_000_000_000_000);
    assert_eq!(
        owner_ids(&cp.owner),
        (Some(0), Some(0)),
        "uid 0 is sent as an explicit oneof value"
    );
    let Some(Action::Copy(cp2)) = &acts[5].action else {
        panic!("copy")
    };
    assert_eq!(
        (cp2.src.as_str(), cp2.dest.as_str(), cp2.mode),
        ("/list", "/a/list", -1)
    );
    assert!(cp2.attempt_unpack_docker_compatibility);
    assert_eq!(cp2.timestamp, -1, "no timestamp is -1");

    // Merge and diff.
    let (merge_d, merge) = by_name(&def, &ops, "merge base+files+out");
    let Some(pb::op::Op::Merge(mo)) = &merge.op else {
        panic!("merge")
    };
    assert!(merge.platform.is_none(), "merge is platform independent");
    let ins: Vec<i64> = mo.inputs.iter().map(|i| i.input).collect();
    assert_eq!(ins, [0, 1, 2]);
    let merge_inputs: Vec<(&str, i64)> = merge
        .inputs
        .iter()
        .map(|i| (i.digest.as_str(), i.index))
        .collect();
    assert_eq!(
        merge_inputs,
        [
            (img_d.as_str(), 0),
            (file_d.as_str(), 0),
            (run_d.as_str(), 1)
        ]
    );
    assert_eq!(def.metadata[&merge_d].caps.get("mergeop"), Some(&true));

    let (diff_d, diff) = by_name(&def, &ops, "diff base..run");
    let Some(pb::op::Op::Diff(dop)) = &diff.op else {
        panic!("diff")
    };
    assert!(diff.platform.is_none(), "diff is platform independent");
    assert_eq!(dop.lower.as_ref().expect("lower").input, 0);
    assert_eq!(dop.upper.as_ref().expect("upper").input, 1);
    assert_eq!(diff.inputs[0].digest, img_d);
    assert_eq!(
        (diff.inputs[1].digest.as_str(), diff.inputs[1].index),
        (run_d.as_str(), 0)
    );
    assert_eq!(def.metadata[&diff_d].caps.get("diffop"), Some(&true));

    let (final_d, fin) = by_name(&def, &ops, "final merge");
    let Some(pb::op::Op::Merge(fm)) = &fin.op else {
        panic!("final merge")
    };
    assert_eq!(fm.inputs.len(), 2);
    assert_eq!(fin.inputs[0].digest, merge_d);
    assert_eq!(fin.inputs[1].digest, diff_d);
    assert_eq!(ops[&term].inputs[0].digest, final_d);

    // Terminal caps also carry the metadata features used anywhere in the graph.
    let term_caps: BTreeSet<_> = def.metadata[&term]
        .caps
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        term_caps,
        BTreeSet::from([
            "constraints",
            "meta.description",
            "meta.ignorecache",
            "platform"
        ])
    );

    let all_caps: BTreeSet<&str> = def
        .metadata
        .values()
        .flat_map(|m| m.caps.keys().map(String::as_str))
        .collect();
    for c in [
        "source.local",
        "source.image",
        "file.base",
        "mergeop",
        "diffop",
        "constraints",
        "platform",
    ] {
        assert!(all_caps.contains(c), "definition lacks cap {c}");
    }
    rt.only(&[Diff::Exact, Diff::MapDefaults]);
}

fn local_fileop_definition(schema: &Schema, rt: &mut RoundTrips) -> pb::Definition {
    let def: pb::Definition = rt.check(
        schema,
        ".pb.Definition",
        "definition_local_fileop.pb",
        &fixture("definition_local_fileop.pb"),
    );
    def
}

#[test]
fn definition_local_fileop_decodes() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let def = local_fileop_definition(&schema, &mut rt);
    let (ops, term) = decode_definition(&schema, &mut rt, "definition_local_fileop", &def);
    assert_eq!(ops.len(), 3);
    let srcs: Vec<_> = ops
        .iter()
        .filter_map(|(d, o)| source(o).map(|s| (d, s)))
        .collect();
    assert_eq!(srcs.len(), 1);
    let (src_d, src) = srcs[0];
    assert_eq!(src.identifier, "local://context");
    assert_eq!(src.attrs["local.sharedkeyhint"], "context");
    assert_eq!(
        src.attrs["local.unique"].len(),
        25,
        "llb.Local adds a random 25-char local.unique"
    );
    let (file_d, file) = by_name(&def, &ops, "assemble output");
    assert_eq!(file.inputs.len(), 1);
    assert_eq!(&file.inputs[0].digest, src_d);
    let Some(pb::op::Op::File(fo)) = &file.op else {
        panic!("file op")
    };
    let kinds: Vec<&str> = fo
        .actions
        .iter()
        .map(|a| match &a.action {
            Some(pb::file_action::Action::Mkdir(_)) => "mkdir",
            Some(pb::file_action::Action::Mkfile(_)) => "mkfile",
            Some(pb::file_action::Action::Copy(_)) => "copy",
            Some(pb::file_action::Action::Rm(_)) => "rm",
            other => panic!("unexpected action {other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["mkdir", "mkfile", "copy", "rm"]);
    assert_eq!(
        fo.actions.last().unwrap().output,
        0,
        "only the last action is an output"
    );
    assert_eq!(ops[&term].inputs[0].digest, file_d);
    rt.only(&[Diff::Exact, Diff::MapDefaults]);
}

// ---------------------------------------------------------------------------
// buildctl build (type=local), the main flow

const BUILD_ID_HEADER: &str = "buildkit-controlapi-buildid";

#[test]
fn build_local_control_solve_status_and_gateway() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let s = "build-local";

    let workers: control::ListWorkersResponse = rt.check(
        &schema,
        ".moby.buildkit.v1.ListWorkersResponse",
        "ListWorkers resp",
        &chunks(s, "control.ListWorkers", "resp")[0],
    );
    let lw_req: control::ListWorkersRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.ListWorkersRequest",
        "ListWorkers req",
        &chunks(s, "control.ListWorkers", "req")[0],
    );
    assert!(lw_req.filter.is_empty());
    assert_eq!(workers.record.len(), 1);

    // Control.Solve: the forwarder shape.
    let solve_req = chunks(s, "control.Solve", "req");
    assert_eq!(solve_req.len(), 1);
    let solve: control::SolveRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.SolveRequest",
        "Control.Solve req",
        &solve_req[0],
    );
    assert_eq!(solve.r#ref.len(), 25);
    assert!(
        solve.definition.is_none(),
        "buildctl never puts LLB into Control.Solve"
    );
    assert_eq!(solve.frontend, "");
    assert_eq!(solve.exporter_deprecated, "local");
    assert!(
        solve.exporter_attrs_deprecated.is_empty(),
        "dest is handled client-side and removed"
    );
    assert!(
        solve.exporters.is_empty(),
        "v0.11.6 has no repeated Exporters field"
    );
    assert!(solve.frontend_attrs.is_empty());
    assert!(solve.entitlements.is_empty());
    assert!(solve.frontend_inputs.is_empty());
    assert!(!solve.internal);
    assert!(solve.source_policy.is_none());
    let cache = solve
        .cache
        .as_ref()
        .expect("Go always sends the non-nullable Cache message");
    assert!(cache.exports.is_empty() && cache.imports.is_empty());

    let session_md = metadata(&format!("wire/{s}/control.Session.metadata.txt"));
    assert_eq!(
        md_one(&session_md, "x-docker-expose-session-uuid"),
        solve.session
    );
    assert_eq!(md_one(&session_md, "x-docker-expose-session-sharedkey"), "");
    assert!(!md_one(&session_md, "x-docker-expose-session-name").is_empty());
    let methods = md_values(&session_md, "x-docker-expose-session-grpc-method");
    for m in [
        "/grpc.health.v1.Health/Check",
        "/moby.filesync.v1.FileSync/DiffCopy",
        "/moby.filesync.v1.FileSync/TarStream",
        "/moby.filesync.v1.FileSend/DiffCopy",
        "/moby.filesync.v1.Auth/Credentials",
        "/moby.filesync.v1.Auth/FetchToken",
    ] {
        assert!(
            methods.contains(&m),
            "session does not expose {m}: {methods:?}"
        );
    }

    let solve_resp: control::SolveResponse = rt.check(
        &schema,
        ".moby.buildkit.v1.SolveResponse",
        "Control.Solve resp",
        &chunks(s, "control.Solve", "resp")[0],
    );
    let keys: Vec<&str> = solve_resp
        .exporter_response
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        ["containerimage.buildinfo"],
        "local export still reports (empty) buildinfo"
    );
    assert_eq!(
        solve_resp.exporter_response["containerimage.buildinfo"], "e30=",
        "base64 of {{}}"
    );

    // Status.
    let status_req: control::StatusRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.StatusRequest",
        "Status req",
        &chunks(s, "control.Status", "req")[0],
    );
    assert_eq!(status_req.r#ref, solve.r#ref);
    let status_hdr = metadata(&format!("wire/{s}/control.Status.response-headers.txt"));
    assert!(md_one(&status_hdr, "buildkit-current-timestamp").contains('T'));

    let mut vertices: BTreeMap<String, control::Vertex> = BTreeMap::new();
    let mut statuses = Vec::new();
    for (i, raw) in chunks(s, "control.Status", "resp").iter().enumerate() {
        let r: control::StatusResponse = rt.check(
            &schema,
            ".moby.buildkit.v1.StatusResponse",
            &format!("Status resp {i}"),
            raw,
        );
        assert!(!r.vertexes.is_empty() || !r.statuses.is_empty() || !r.logs.is_empty());
        for v in r.vertexes {
            assert!(v.digest.starts_with("sha256:"));
            vertices.insert(v.digest.clone(), v);
        }
        statuses.extend(r.statuses);
    }
    // The op vertices are the op digests of the definition that went over LLBBridge.
    let def = local_fileop_definition(&schema, &mut rt);
    let (ops, term) = decode_definition(&schema, &mut rt, "local def", &def);
    for (d, op) in &ops {
        if *d == term {
            assert!(
                !vertices.contains_key(d),
                "the terminal op is not shown as a vertex"
            );
            continue;
        }
        let v = vertices
            .get(d)
            .unwrap_or_else(|| panic!("no vertex for op {d}"));
        let inputs: Vec<&str> = op.inputs.iter().map(|i| i.digest.as_str()).collect();
        assert_eq!(v.inputs, inputs, "vertex inputs are op input digests");
        assert!(
            v.completed.is_some() && v.error.is_empty(),
            "final state of {} is completed",
            v.name
        );
    }
    let names: BTreeSet<&str> = vertices.values().map(|v| v.name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "local://context",
            "assemble output",
            "exporting to client directory"
        ])
    );
    let export = vertices
        .values()
        .find(|v| v.name == "exporting to client directory")
        .unwrap();
    assert_eq!(
        export.digest,
        digest_of(format!("{}-export", solve.session).as_bytes())
    );
    let transfer: Vec<_> = statuses
        .iter()
        .filter(|st| st.id == "transferring context:")
        .collect();
    assert!(!transfer.is_empty());
    assert!(transfer
        .iter()
        .all(|st| st.name == "transferring" && st.timestamp.is_some()));
    assert!(transfer.last().unwrap().completed.is_some());
    assert!(statuses
        .iter()
        .any(|st| st.id == "copying files" && st.completed.is_some()));

    // LLBBridge, all tagged with the build id.
    for call in ["llbbridge.Ping", "llbbridge.Solve", "llbbridge.Return"] {
        let md = metadata(&format!("wire/{s}/{call}.metadata.txt"));
        assert_eq!(
            md_one(&md, BUILD_ID_HEADER),
            solve.r#ref,
            "{call} carries the build id"
        );
    }
    for call in [
        "control.Solve",
        "control.Status",
        "control.Session",
        "control.ListWorkers",
    ] {
        let md = metadata(&format!("wire/{s}/{call}.metadata.txt"));
        assert!(
            md_values(&md, BUILD_ID_HEADER).is_empty(),
            "{call} has no build id header"
        );
    }
    let ping = chunks(s, "llbbridge.Ping", "req");
    assert!(ping[0].is_empty(), "PingRequest is empty");
    let _: gw::PingRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.frontend.PingRequest",
        "Ping req",
        &ping[0],
    );

    let gsolve: gw::SolveRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.frontend.SolveRequest",
        "LLBBridge.Solve req",
        &chunks(s, "llbbridge.Solve", "req")[0],
    );
    assert!(gsolve.allow_result_return && gsolve.allow_result_array_ref);
    assert!(!gsolve.r#final && !gsolve.evaluate);
    assert_eq!(gsolve.frontend, "");
    assert!(gsolve.frontend_opt.is_empty() && gsolve.cache_imports.is_empty());
    let sent = gsolve
        .definition
        .as_ref()
        .expect("definition sent over LLBBridge.Solve");
    assert_eq!(
        sent.def, def.def,
        "the stdin definition is forwarded op for op"
    );
    assert_eq!(sent.metadata, def.metadata);
    let src = sent
        .source
        .as_ref()
        .expect("Go adds an empty Source with a locations entry per op");
    assert!(src.locations.values().all(|l| l.locations.is_empty()));
    assert!(src.infos.is_empty());

    let gresp: gw::SolveResponse = rt.check(
        &schema,
        ".moby.buildkit.v1.frontend.SolveResponse",
        "LLBBridge.Solve resp",
        &chunks(s, "llbbridge.Solve", "resp")[0],
    );
    assert_eq!(gresp.r#ref, "");
    let result = gresp.result.as_ref().expect("result");
    let Some(gw::result::Result::Ref(r)) = &result.result else {
        panic!("single ref result")
    };
    assert_eq!(r.id.len(), 25);
    assert_eq!(
        r.def.as_ref().expect("ref def").def,
        def.def,
        "ref def is the solved definition"
    );
    assert!(result.metadata.is_empty());

    let ret: gw::ReturnRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.frontend.ReturnRequest",
        "Return req",
        &chunks(s, "llbbridge.Return", "req")[0],
    );
    assert!(ret.error.is_none());
    let rr = ret.result.as_ref().expect("returned result");
    let Some(gw::result::Result::Ref(rref)) = &rr.result else {
        panic!("Return carries ref")
    };
    assert_eq!(rref.id, r.id, "Return hands back the ref id from Solve");
    let ret_resp = &chunks(s, "llbbridge.Return", "resp")[0];
    assert!(ret_resp.is_empty(), "ReturnResponse is empty");

    rt.only(&[Diff::Exact, Diff::MapOrder, Diff::MapDefaults]);
    for w in [
        "Control.Solve req",
        "Status req",
        "Return req",
        "LLBBridge.Solve req",
    ] {
        assert_ne!(
            rt.of(w),
            Diff::MapOrder,
            "{w}: no Go map with more than one entry"
        );
    }
}

#[test]
fn ping_advertises_the_caps_buildctl_checks() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let pong: gw::PongResponse = rt.check(
        &schema,
        ".moby.buildkit.v1.frontend.PongResponse",
        "Pong",
        &chunks("build-local", "llbbridge.Ping", "resp")[0],
    );
    let enabled = |caps: &[protos::moby::buildkit::v1::apicaps::ApiCap]| -> BTreeSet<String> {
        caps.iter()
            .filter(|c| c.enabled)
            .map(|c| c.id.clone())
            .collect()
    };
    let fe = enabled(&pong.frontend_api_caps);
    for c in [
        "return",
        "proto.refarray",
        "returnmap",
        "solve.base",
        "frontend.caps",
        "gateway.solve.metadata",
        "importcaches",
    ] {
        assert!(fe.contains(c), "frontend caps lack {c}");
    }
    let inline = pong
        .frontend_api_caps
        .iter()
        .find(|c| c.id == "solve.inlinereturn")
        .expect("inlinereturn listed");
    assert!(
        inline.enabled && inline.deprecated,
        "solve.inlinereturn is enabled but deprecated"
    );
    assert_eq!(pong.frontend_api_caps.len(), 22);

    let llb = enabled(&pong.llb_caps);
    assert_eq!(pong.llb_caps.len(), 61);
    for c in [
        "mergeop",
        "diffop",
        "constraints",
        "platform",
        "source.local",
        "source.image",
        "file.base",
        "meta.description",
        "meta.ignorecache",
        "exec.mount.cache.sharing",
        "file.copy.includeexcludepatterns",
        "soruce.http.uidgid",
    ] {
        assert!(llb.contains(c), "LLB caps lack {c}");
    }
    // Every cap used by the captured definitions is advertised.
    let mut rt2 = RoundTrips::default();
    for f in ["definition_full.pb", "definition_local_fileop.pb"] {
        let def: pb::Definition = rt2.check(&schema, ".pb.Definition", f, &fixture(f));
        for md in def.metadata.values() {
            for c in md.caps.keys() {
                assert!(
                    llb.contains(c),
                    "{f} uses cap {c} that stock buildkitd does not advertise"
                );
            }
        }
    }
    assert_eq!(pong.workers.len(), 1, "Pong also lists the workers");
    assert!(!pong.workers[0].platforms.is_empty());
    rt.only(&[Diff::Exact, Diff::MapOrder]);
}

#[test]
fn list_workers_record() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let resp: control::ListWorkersResponse = rt.check(
        &schema,
        ".moby.buildkit.v1.ListWorkersResponse",
        "workers",
        &chunks("workers", "control.ListWorkers", "resp")[0],
    );
    assert_eq!(resp.record.len(), 1);
    let w = &resp.record[0];
    assert_eq!(w.id.len(), 25);
    assert_eq!(w.labels["org.mobyproject.buildkit.worker.executor"], "oci");
    assert_eq!(
        w.labels["org.mobyproject.buildkit.worker.snapshotter"],
        "overlayfs"
    );
    assert_eq!(w.labels["org.mobyproject.buildkit.worker.network"], "host");
    assert_eq!(
        w.labels["org.mobyproject.buildkit.worker.oci.process-mode"],
        "sandbox"
    );
    assert_eq!(
        w.labels["org.mobyproject.buildkit.worker.selinux.enabled"],
        "false"
    );
    assert!(w
        .labels
        .contains_key("org.mobyproject.buildkit.worker.hostname"));
    let p0 = &w.platforms[0];
    assert_eq!(
        (
            p0.os.as_str(),
            p0.architecture.as_str(),
            p0.variant.as_str()
        ),
        ("linux", "amd64", "")
    );
    let variants: Vec<&str> = w.platforms.iter().map(|p| p.variant.as_str()).collect();
    assert_eq!(variants, ["", "v2", "v3", "v4", ""]);
    assert_eq!(w.platforms[4].architecture, "386");
    assert_eq!(w.gc_policy.len(), 4);
    assert_eq!(
        w.gc_policy[0].filters,
        ["type==source.local,type==exec.cachemount,type==source.git.checkout"]
    );
    assert_eq!(w.gc_policy[0].keep_duration, 48 * 3600 * 1_000_000_000);
    assert_eq!(
        w.gc_policy[0].reserved_space, 512_000_000,
        "field 3 (keepBytes in v0.11.6)"
    );
    assert!(w.gc_policy[3].all);
    let v = w.buildkit_version.as_ref().expect("version");
    assert_eq!(
        (v.package.as_str(), v.version.as_str()),
        ("github.com/moby/buildkit", "v0.11.6")
    );
    assert_eq!(v.revision, "2951a28cd7085eb18979b1f710678623d94ed578");
    rt.only(&[Diff::Exact, Diff::MapOrder]);
}

#[test]
fn info_du_and_prune() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let info: control::InfoResponse = rt.check(
        &schema,
        ".moby.buildkit.v1.InfoResponse",
        "info",
        &chunks("info", "control.Info", "resp")[0],
    );
    let _: control::InfoRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.InfoRequest",
        "info req",
        &chunks("info", "control.Info", "req")[0],
    );
    let v = info.buildkit_version.expect("version");
    assert_eq!(v.version, "v0.11.6");
    assert_eq!(v.dockerfile_version, "", "v0.11.6 does not send field 4");

    let du_req: control::DiskUsageRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.DiskUsageRequest",
        "du req",
        &chunks("du", "control.DiskUsage", "req")[0],
    );
    assert!(du_req.filter.is_empty() && du_req.age_limit == 0);
    let du_f: control::DiskUsageRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.DiskUsageRequest",
        "du filter req",
        &chunks("du-filter", "control.DiskUsage", "req")[0],
    );
    assert_eq!(du_f.filter, ["type==source.local"]);
    let du: control::DiskUsageResponse = rt.check(
        &schema,
        ".moby.buildkit.v1.DiskUsageResponse",
        "du resp",
        &chunks("du", "control.DiskUsage", "resp")[0],
    );
    assert!(!du.record.is_empty());
    for r in &du.record {
        assert_eq!(r.id.len(), 25);
        assert!(r.created_at.is_some(), "CreatedAt is always set");
        assert!(r.size > 0);
        assert!(!r.record_type.is_empty() && !r.description.is_empty());
    }
    let types: BTreeSet<&str> = du.record.iter().map(|r| r.record_type.as_str()).collect();
    assert!(
        types.contains("source.local") && types.contains("regular"),
        "{types:?}"
    );
    assert!(du
        .record
        .iter()
        .any(|r| r.description == "local source for context"));

    let prune_req = &chunks("prune", "control.Prune", "req")[0];
    assert!(
        prune_req.is_empty(),
        "plain `buildctl prune` sends an empty PruneRequest"
    );
    let pruned: Vec<control::UsageRecord> = chunks("prune", "control.Prune", "resp")
        .iter()
        .enumerate()
        .map(|(i, b)| {
            rt.check(
                &schema,
                ".moby.buildkit.v1.UsageRecord",
                &format!("prune resp {i}"),
                b,
            )
        })
        .collect();
    assert!(
        !pruned.is_empty(),
        "prune streams one UsageRecord per deleted record"
    );
    assert!(pruned.iter().all(|r| !r.in_use && r.size > 0));

    let pf: control::PruneRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.PruneRequest",
        "prune flags req",
        &chunks("prune-flags", "control.Prune", "req")[0],
    );
    assert_eq!(pf.filter, ["type==regular"]);
    assert!(pf.all);
    assert_eq!(
        pf.keep_duration,
        3600 * 1_000_000_000,
        "--keep-duration 1h in ns"
    );
    assert_eq!(
        pf.reserved_space, 10_000_000,
        "v0.11.6 --keep-storage 10 (MB) fills field 4"
    );
    assert_eq!((pf.max_used_space, pf.min_free_space), (0, 0));
    rt.only(&[Diff::Exact, Diff::MapOrder]);
}

#[test]
fn exporters_tar_docker_image() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let req = |rt: &mut RoundTrips, s: &str| -> control::SolveRequest {
        rt.check(
            &schema,
            ".moby.buildkit.v1.SolveRequest",
            s,
            &chunks(s, "control.Solve", "req")[0],
        )
    };
    let resp = |rt: &mut RoundTrips, s: &str| -> control::SolveResponse {
        rt.check(
            &schema,
            ".moby.buildkit.v1.SolveResponse",
            s,
            &chunks(s, "control.Solve", "resp")[0],
        )
    };

    let tar = req(&mut rt, "build-tar");
    assert_eq!(tar.exporter_deprecated, "tar");
    assert!(tar.exporter_attrs_deprecated.is_empty());
    assert_eq!(resp(&mut rt, "build-tar").exporter_response.len(), 1);

    let docker = req(&mut rt, "build-docker");
    assert_eq!(docker.exporter_deprecated, "docker");
    assert_eq!(
        docker.exporter_attrs_deprecated,
        BTreeMap::from([("name".to_string(), "berth.test/fixture:1".to_string())]),
        "dest is removed, name is kept"
    );
    let image = req(&mut rt, "build-image");
    assert_eq!(image.exporter_deprecated, "image");
    assert_eq!(
        image.exporter_attrs_deprecated["name"],
        "berth.test/fixture:2"
    );
    assert!(
        image.frontend_attrs.is_empty(),
        "--no-cache without a frontend sends no attr"
    );

    for s in ["build-docker", "build-image"] {
        let r = resp(&mut rt, s).exporter_response;
        let keys: BTreeSet<&str> = r.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "containerimage.buildinfo",
                "containerimage.config.digest",
                "containerimage.descriptor",
                "containerimage.digest",
                "image.name",
            ]),
            "{s}"
        );
        assert!(r["containerimage.digest"].starts_with("sha256:"));
        assert!(r["containerimage.config.digest"].starts_with("sha256:"));
        assert_ne!(
            r["containerimage.digest"],
            r["containerimage.config.digest"]
        );
        // base64 of a JSON object starting `{"mediaType":`
        assert!(r["containerimage.descriptor"].starts_with("eyJtZWRpYVR5cGUiOi"));
    }
    // docker (tarball) export sends the response keys as FileSend headers too.
    let tr = fixture_text("wire/build-docker/control.Session.h2-transcript.txt");
    let docker_resp = resp(&mut rt, "build-docker").exporter_response;
    for (k, v) in &docker_resp {
        if k == "containerimage.buildinfo" {
            continue;
        }
        assert!(
            tr.contains(&format!("exporter-md-{k}: {v}")),
            "FileSend header exporter-md-{k}"
        );
    }
    rt.only(&[Diff::Exact, Diff::MapOrder]);
}

#[test]
fn failed_build_error_and_stream_shapes() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let s = "build-fail";
    let solve: control::SolveRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.SolveRequest",
        "solve",
        &chunks(s, "control.Solve", "req")[0],
    );
    assert!(
        !fixtures_dir()
            .join(format!("wire/{s}/control.Solve.resp.0.bin"))
            .exists(),
        "a failed Control.Solve has no response message"
    );
    let st = fixture_text(&format!("wire/{s}/control.Solve.status.txt"));
    assert!(
        st.starts_with("Unknown: failed to load LLB: security.insecure is not allowed"),
        "{st}"
    );
    assert!(st.contains("github.com/moby/buildkit/stack.Stack+json"));
    assert!(
        !fixtures_dir()
            .join(format!("wire/{s}/control.Status.resp.0.bin"))
            .exists(),
        "Status ends OK with no message when the job fails before any vertex"
    );
    let seq = fixture_text(&format!("wire/{s}/sequence.log"));
    assert!(seq.contains("control.Status resp END OK after 0 msgs"));

    let gsolve: gw::SolveRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.frontend.SolveRequest",
        "gw solve",
        &chunks(s, "llbbridge.Solve", "req")[0],
    );
    let full: pb::Definition = rt.check(
        &schema,
        ".pb.Definition",
        "definition_full.pb",
        &fixture("definition_full.pb"),
    );
    assert_eq!(gsolve.definition.as_ref().expect("def").def, full.def);
    // LLBBridge.Solve without evaluate succeeds lazily; the error surfaces in Control.Solve.
    let ret: gw::ReturnRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.frontend.ReturnRequest",
        "return",
        &chunks(s, "llbbridge.Return", "req")[0],
    );
    assert!(ret.error.is_none());
    let md = metadata(&format!("wire/{s}/llbbridge.Return.metadata.txt"));
    assert_eq!(md_one(&md, BUILD_ID_HEADER), solve.r#ref);
    rt.only(&[Diff::Exact, Diff::MapDefaults]);
}

// ---------------------------------------------------------------------------
// The Session tunnel: BytesMessage chunks carrying raw HTTP/2

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// DATA payloads per HTTP/2 stream id, reassembled into gRPC messages.
fn h2_grpc_messages(mut buf: &[u8]) -> BTreeMap<u32, Vec<Vec<u8>>> {
    let mut data: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    while !buf.is_empty() {
        assert!(buf.len() >= 9, "truncated frame header");
        let len = (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
        let (typ, flags) = (buf[3], buf[4]);
        let sid = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
        let mut payload = &buf[9..9 + len];
        if typ == 0 {
            if flags & 0x8 != 0 {
                let pad = usize::from(payload[0]);
                payload = &payload[1..payload.len() - pad];
            }
            data.entry(sid).or_default().extend_from_slice(payload);
        }
        buf = &buf[9 + len..];
    }
    data.into_iter()
        .map(|(sid, d)| {
            let mut msgs = Vec::new();
            let mut p = &d[..];
            while !p.is_empty() {
                assert_eq!(p[0], 0, "uncompressed gRPC frames");
                let n = u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize;
                msgs.push(p[5..5 + n].to_vec());
                p = &p[5 + n..];
            }
            (sid, msgs)
        })
        .collect()
}

fn packets(
    schema: &Schema,
    rt: &mut RoundTrips,
    what: &str,
    msgs: &[Vec<u8>],
) -> Vec<protos::fsutil::types::Packet> {
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            rt.check(
                schema,
                ".fsutil.types.Packet",
                &format!("{what} packet {i}"),
                m,
            )
        })
        .collect()
}

#[test]
fn session_tunnel_carries_http2_with_fsutil_packets() {
    use protos::fsutil::types::packet::PacketType;
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let s = "build-local";
    let join = |dir: &str, rt: &mut RoundTrips| -> Vec<u8> {
        let mut all = Vec::new();
        for (i, c) in chunks(s, "control.Session", dir).iter().enumerate() {
            let m: control::BytesMessage = rt.check(
                &schema,
                ".moby.buildkit.v1.BytesMessage",
                &format!("session {dir} {i}"),
                c,
            );
            all.extend_from_slice(&m.data);
        }
        all
    };
    let from_daemon = join("resp", &mut rt);
    let from_client = join("req", &mut rt);
    assert!(
        from_daemon.starts_with(H2_PREFACE),
        "the daemon is the HTTP/2 client inside Session"
    );
    assert!(!from_client.starts_with(H2_PREFACE));

    let d = h2_grpc_messages(&from_daemon[H2_PREFACE.len()..]);
    let c = h2_grpc_messages(&from_client);
    // Stream 1: FileSync/DiffCopy (daemon pulls the context); stream 3: FileSend/DiffCopy (export).
    let tr = fixture_text(&format!("wire/{s}/control.Session.h2-transcript.txt"));
    assert!(
        tr.contains("HEADERS stream=1")
            && tr.contains(":path: /moby.filesync.v1.FileSync/DiffCopy")
    );
    assert!(tr.contains("dir-name: context"));
    assert!(
        tr.contains("HEADERS stream=3")
            && tr.contains(":path: /moby.filesync.v1.FileSend/DiffCopy")
    );

    const MODE_DIR: u32 = 1 << 31;
    const MODE_SYMLINK: u32 = 1 << 27;

    // Context upload: client sends stats, then data for requested ids.
    let up = packets(&schema, &mut rt, "sync client", &c[&1]);
    let stats: Vec<&protos::fsutil::types::Stat> = up
        .iter()
        .take_while(|p| p.r#type == PacketType::PacketStat as i32 && p.stat.is_some())
        .map(|p| p.stat.as_ref().unwrap())
        .collect();
    let paths: Vec<&str> = stats.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        ["a.txt", "c.skip", "dir", "dir/b.txt", "link"],
        "sorted, relative paths"
    );
    assert_eq!(stats[2].mode & MODE_DIR, MODE_DIR, "Go os.ModeDir bit");
    assert_eq!(stats[2].mode & 0o777, 0o755);
    assert_eq!(
        stats[4].mode & MODE_SYMLINK,
        MODE_SYMLINK,
        "Go os.ModeSymlink bit"
    );
    assert_eq!(stats[4].linkname, "a.txt");
    assert_eq!((stats[0].mode, stats[0].size), (0o644, 14));
    let end = &up[stats.len()];
    assert!(
        end.r#type == PacketType::PacketStat as i32 && end.stat.is_none(),
        "empty STAT ends the listing"
    );
    assert_eq!(up.last().unwrap().r#type, PacketType::PacketFin as i32);

    let reqs = packets(&schema, &mut rt, "sync daemon", &d[&1]);
    let asked: Vec<u32> = reqs
        .iter()
        .filter(|p| p.r#type == PacketType::PacketReq as i32)
        .map(|p| p.id)
        .collect();
    assert_eq!(
        asked,
        [0, 1, 3],
        "regular files are requested by their index in the stat list"
    );
    assert_eq!(reqs.last().unwrap().r#type, PacketType::PacketFin as i32);
    let mut contents: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for p in up
        .iter()
        .filter(|p| p.r#type == PacketType::PacketData as i32)
    {
        contents.entry(p.id).or_default().extend_from_slice(&p.data);
    }
    assert_eq!(contents[&0], b"hello context\n");
    assert_eq!(contents[&3], b"nested\n");

    // Export: the daemon sends the result tree to the client.
    let down = packets(&schema, &mut rt, "send daemon", &d[&3]);
    let out_paths: Vec<&str> = down
        .iter()
        .filter_map(|p| p.stat.as_ref())
        .map(|s| s.path.as_str())
        .collect();
    assert_eq!(
        out_paths,
        [
            "out",
            "out/ctx",
            "out/ctx/a.txt",
            "out/ctx/dir",
            "out/ctx/dir/b.txt",
            "out/ctx/link",
            "out/sub",
            "out/sub/hello.txt"
        ]
    );
    let asked_out: Vec<u32> = packets(&schema, &mut rt, "send client", &c[&3])
        .iter()
        .filter(|p| p.r#type == PacketType::PacketReq as i32)
        .map(|p| p.id)
        .collect();
    assert_eq!(asked_out, [2, 4, 7]);
    let mut sent: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for p in down
        .iter()
        .filter(|p| p.r#type == PacketType::PacketData as i32)
    {
        sent.entry(p.id).or_default().extend_from_slice(&p.data);
    }
    assert_eq!(sent[&7], b"hello from berth fixture\n");
    assert_eq!(sent[&2], b"hello context\n");
    rt.only(&[Diff::Exact, Diff::MapOrder]);
}

/// Every captured `.bin` maps to a known message type, decodes, and passes the
/// schema and round-trip checks; so no fixture sits unchecked.
#[test]
fn every_fixture_message_is_known_to_our_schema() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let types: HashMap<&str, &str> = HashMap::from([
        (
            "control.ListWorkers.req",
            ".moby.buildkit.v1.ListWorkersRequest",
        ),
        (
            "control.ListWorkers.resp",
            ".moby.buildkit.v1.ListWorkersResponse",
        ),
        ("control.Solve.req", ".moby.buildkit.v1.SolveRequest"),
        ("control.Solve.resp", ".moby.buildkit.v1.SolveResponse"),
        ("control.Status.req", ".moby.buildkit.v1.StatusRequest"),
        ("control.Status.resp", ".moby.buildkit.v1.StatusResponse"),
        ("control.Session.req", ".moby.buildkit.v1.BytesMessage"),
        ("control.Session.resp", ".moby.buildkit.v1.BytesMessage"),
        (
            "control.DiskUsage.req",
            ".moby.buildkit.v1.DiskUsageRequest",
        ),
        (
            "control.DiskUsage.resp",
            ".moby.buildkit.v1.DiskUsageResponse",
        ),
        ("control.Prune.req", ".moby.buildkit.v1.PruneRequest"),
        ("control.Prune.resp", ".moby.buildkit.v1.UsageRecord"),
        ("control.Info.req", ".moby.buildkit.v1.InfoRequest"),
        ("control.Info.resp", ".moby.buildkit.v1.InfoResponse"),
        (
            "llbbridge.Ping.req",
            ".moby.buildkit.v1.frontend.PingRequest",
        ),
        (
            "llbbridge.Ping.resp",
            ".moby.buildkit.v1.frontend.PongResponse",
        ),
        (
            "llbbridge.Solve.req",
            ".moby.buildkit.v1.frontend.SolveRequest",
        ),
        (
            "llbbridge.Solve.resp",
            ".moby.buildkit.v1.frontend.SolveResponse",
        ),
        (
            "llbbridge.Return.req",
            ".moby.buildkit.v1.frontend.ReturnRequest",
        ),
        (
            "llbbridge.Return.resp",
            ".moby.buildkit.v1.frontend.ReturnResponse",
        ),
    ]);
    let mut count = 0;
    let wire = fixtures_dir().join("wire");
    let mut scenarios: Vec<_> = std::fs::read_dir(&wire)
        .expect("wire dir")
        .map(|e| e.unwrap().path())
        .collect();
    scenarios.sort();
    for sdir in scenarios {
        let mut files: Vec<_> = std::fs::read_dir(&sdir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            let name = f.file_name().unwrap().to_str().unwrap().to_string();
            let Some(stem) = name.strip_suffix(".bin") else {
                continue;
            };
            let key = stem.rsplit_once('.').expect("<call>.<dir>.<n>").0;
            let ty = types
                .get(key)
                .unwrap_or_else(|| panic!("no type for fixture {name}"));
            let bytes = std::fs::read(&f).unwrap();
            let what = format!("{}/{name}", sdir.file_name().unwrap().to_str().unwrap());
            let again = reencode(ty, &bytes, &what);
            rt.record(&schema, ty, &what, &bytes, &again);
            count += 1;
        }
    }
    assert!(
        count > 150,
        "expected the whole capture, checked {count} messages"
    );
    // Only messages embedding a Definition (its Source.locations map) may need
    // the map-default normalisation; Go map order shows up wherever a map has
    // several entries; everything else is byte-exact.
    for (w, d) in &rt.results {
        if *d == Diff::MapDefaults {
            assert!(
                w.contains("llbbridge.Solve.") || w.contains("llbbridge.Return.req"),
                "{w}: unexpected map-default difference"
            );
        }
    }
    let exact = rt.results.iter().filter(|(_, d)| *d == Diff::Exact).count();
    assert!(exact > 100, "only {exact} messages re-encode byte-exactly");
}

fn reencode(ty: &str, bytes: &[u8], what: &str) -> Vec<u8> {
    fn go<M: Message + Default>(b: &[u8], what: &str) -> Vec<u8> {
        M::decode(b)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .encode_to_vec()
    }
    match ty {
        ".moby.buildkit.v1.ListWorkersRequest" => go::<control::ListWorkersRequest>(bytes, what),
        ".moby.buildkit.v1.ListWorkersResponse" => go::<control::ListWorkersResponse>(bytes, what),
        ".moby.buildkit.v1.SolveRequest" => go::<control::SolveRequest>(bytes, what),
        ".moby.buildkit.v1.SolveResponse" => go::<control::SolveResponse>(bytes, what),
        ".moby.buildkit.v1.StatusRequest" => go::<control::StatusRequest>(bytes, what),
        ".moby.buildkit.v1.StatusResponse" => go::<control::StatusResponse>(bytes, what),
        ".moby.buildkit.v1.BytesMessage" => go::<control::BytesMessage>(bytes, what),
        ".moby.buildkit.v1.DiskUsageRequest" => go::<control::DiskUsageRequest>(bytes, what),
        ".moby.buildkit.v1.DiskUsageResponse" => go::<control::DiskUsageResponse>(bytes, what),
        ".moby.buildkit.v1.PruneRequest" => go::<control::PruneRequest>(bytes, what),
        ".moby.buildkit.v1.UsageRecord" => go::<control::UsageRecord>(bytes, what),
        ".moby.buildkit.v1.InfoRequest" => go::<control::InfoRequest>(bytes, what),
        ".moby.buildkit.v1.InfoResponse" => go::<control::InfoResponse>(bytes, what),
        ".moby.buildkit.v1.frontend.PingRequest" => go::<gw::PingRequest>(bytes, what),
        ".moby.buildkit.v1.frontend.PongResponse" => go::<gw::PongResponse>(bytes, what),
        ".moby.buildkit.v1.frontend.SolveRequest" => go::<gw::SolveRequest>(bytes, what),
        ".moby.buildkit.v1.frontend.SolveResponse" => go::<gw::SolveResponse>(bytes, what),
        ".moby.buildkit.v1.frontend.ReturnRequest" => go::<gw::ReturnRequest>(bytes, what),
        ".moby.buildkit.v1.frontend.ReturnResponse" => go::<gw::ReturnResponse>(bytes, what),
        other => panic!("no Rust type wired for {other}"),
    }
}

// ---------------------------------------------------------------------------
// A newer client (buildctl v0.24.0) against the same v0.11.6 daemon

#[test]
fn newer_buildctl_v0_24_shapes() {
    let schema = Schema::load();
    let mut rt = RoundTrips::default();
    let s = "v0.24.0-build-local";
    let solve: control::SolveRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.SolveRequest",
        "v0.24 solve",
        &chunks(s, "control.Solve", "req")[0],
    );
    // The first output goes both into the deprecated fields 3/4 and into Exporters (13).
    assert_eq!(solve.exporter_deprecated, "local");
    assert_eq!(solve.exporters.len(), 1);
    assert_eq!(solve.exporters[0].r#type, "local");
    assert!(
        solve.exporters[0].attrs.is_empty(),
        "dest stays client-side"
    );
    assert!(!solve.enable_session_exporter);
    assert_eq!(solve.compatibility_version, 0);

    let md = metadata(&format!("wire/{s}/control.Session.metadata.txt"));
    assert!(
        md_values(&md, "x-docker-expose-session-name").is_empty(),
        "newer clients send no session name"
    );
    assert_eq!(md_one(&md, "x-docker-expose-session-uuid"), solve.session);
    assert!(md_values(&md, "x-docker-expose-session-grpc-method")
        .contains(&"/grpc.health.v1.Health/List"));
    assert_eq!(md_one(&md, "grpc-accept-encoding"), "gzip");
    let ping_md = metadata(&format!("wire/{s}/llbbridge.Ping.metadata.txt"));
    assert_eq!(md_one(&ping_md, BUILD_ID_HEADER), solve.r#ref);

    // It reports its spans to the daemon when it exits, after the Session ended.
    let seq = fixture_text(&format!("wire/{s}/sequence.log"));
    let session_end = seq
        .find("control.Session resp END OK")
        .expect("session end");
    let export = seq
        .find("trace.Export start")
        .expect("TraceService/Export call");
    assert!(export > session_end);
    let trace_md = metadata(&format!("wire/{s}/trace.Export.metadata.txt"));
    assert!(md_values(&trace_md, BUILD_ID_HEADER).is_empty());

    let prune: control::PruneRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.PruneRequest",
        "v0.24 prune",
        &chunks("v0.24.0-prune-flags", "control.Prune", "req")[0],
    );
    assert!(prune.all);
    assert_eq!(prune.filter, ["type==regular"]);
    assert_eq!(prune.keep_duration, 3600 * 1_000_000_000);
    assert_eq!(
        prune.reserved_space, 0,
        "newer --keep-storage no longer fills field 4"
    );
    assert_eq!(
        prune.max_used_space, 10_000_000,
        "newer --keep-storage fills field 5"
    );
    let du: control::DiskUsageRequest = rt.check(
        &schema,
        ".moby.buildkit.v1.DiskUsageRequest",
        "v0.24 du",
        &chunks("v0.24.0-du", "control.DiskUsage", "req")[0],
    );
    assert_eq!(du.age_limit, 0);
    rt.only(&[Diff::Exact]);
}
