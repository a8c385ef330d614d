//! Flattens a `FileDescriptorSet` into one line per wire-relevant fact, so two
//! schemas can be compared as sets of lines (test support only).
//!
//! Lines, tab-separated:
//! * `message <message>` for every message except map entries;
//! * `field <message> <number> <name> <label> <type> <oneof>`, where `<type>` is
//!   a scalar kind, a `.full.Name` for messages and enums, or `map<K,V>`
//!   (map entry messages are folded into the field and not listed);
//! * `enum <enum> <number> <value name>`;
//! * `method <service> <name> <in-stream> <input> <out-stream> <output>`.
//!
//! `google.protobuf.*` files are skipped: they are prost-types' business.

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};
use std::collections::{BTreeMap, BTreeSet};

/// Every listing line of `fds`, sorted.
pub(crate) fn listing(fds: &FileDescriptorSet) -> BTreeSet<String> {
    let files: Vec<_> = fds
        .file
        .iter()
        .filter(|f| !f.package().starts_with("google.protobuf"))
        .collect();
    // Full name -> message, to resolve map entries.
    let mut messages = BTreeMap::new();
    for f in &files {
        for m in &f.message_type {
            index(&format!(".{}", f.package()), m, &mut messages);
        }
    }
    let mut out = BTreeSet::new();
    for f in &files {
        let pkg = format!(".{}", f.package());
        for m in &f.message_type {
            message_lines(&pkg, m, &messages, &mut out);
        }
        for e in &f.enum_type {
            enum_lines(&pkg, e, &mut out);
        }
        for s in &f.service {
            for m in &s.method {
                out.insert(format!(
                    "method\t{pkg}.{}\t{}\t{}\t{}\t{}\t{}",
                    s.name(),
                    m.name(),
                    m.client_streaming(),
                    m.input_type(),
                    m.server_streaming(),
                    m.output_type()
                ));
            }
        }
    }
    out
}

fn index<'a>(
    prefix: &str,
    m: &'a DescriptorProto,
    messages: &mut BTreeMap<String, &'a DescriptorProto>,
) {
    let name = format!("{prefix}.{}", m.name());
    for n in &m.nested_type {
        index(&name, n, messages);
    }
    messages.insert(name, m);
}

fn is_map_entry(m: &DescriptorProto) -> bool {
    m.options.as_ref().is_some_and(|o| o.map_entry())
}

fn type_of(
    fd: &prost_types::FieldDescriptorProto,
    messages: &BTreeMap<String, &DescriptorProto>,
) -> String {
    match fd.r#type() {
        Type::Message | Type::Enum | Type::Group => {
            if let Some(entry) = messages.get(fd.type_name()).filter(|m| is_map_entry(m)) {
                let kv: Vec<String> = entry.field.iter().map(|f| type_of(f, messages)).collect();
                format!("map<{}>", kv.join(","))
            } else {
                fd.type_name().to_string()
            }
        }
        scalar => format!("{scalar:?}"),
    }
}

fn message_lines(
    prefix: &str,
    m: &DescriptorProto,
    messages: &BTreeMap<String, &DescriptorProto>,
    out: &mut BTreeSet<String>,
) {
    if is_map_entry(m) {
        return;
    }
    let name = format!("{prefix}.{}", m.name());
    out.insert(format!("message\t{name}"));
    for fd in &m.field {
        let ty = type_of(fd, messages);
        let label = if ty.starts_with("map<") {
            "map".to_string()
        } else {
            format!("{:?}", fd.label.map_or(Label::Optional, |_| fd.label()))
        };
        let oneof = fd
            .oneof_index
            .and_then(|i| m.oneof_decl.get(i as usize))
            .map_or("", |o| o.name());
        out.insert(format!(
            "field\t{name}\t{}\t{}\t{label}\t{ty}\t{oneof}",
            fd.number(),
            fd.name()
        ));
    }
    for n in &m.nested_type {
        message_lines(&name, n, messages, out);
    }
    for e in &m.enum_type {
        enum_lines(&name, e, out);
    }
}

fn enum_lines(prefix: &str, e: &EnumDescriptorProto, out: &mut BTreeSet<String>) {
    for v in &e.value {
        out.insert(format!(
            "enum\t{prefix}.{}\t{}\t{}",
            e.name(),
            v.number(),
            v.name()
        ));
    }
}
