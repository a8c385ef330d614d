//! Generates the Rust wire types from `proto/` without a system `protoc`.
//!
//! `protox` parses our `.proto` files into a `FileDescriptorSet` (its bundled
//! copies of the well-known `google/protobuf/*.proto` satisfy the imports), and
//! `tonic-prost-build` turns that set into prost messages plus tonic client and
//! server stubs under `OUT_DIR`. The encoded set is also written to
//! `OUT_DIR/berth_descriptor_set.bin` for `protos::FILE_DESCRIPTOR_SET`.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let mut files = Vec::new();
    collect_protos(&root, &root, &mut files)?;
    files.sort();

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", root.display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }

    let fds = protox::compile(&files, [&root])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("berth_descriptor_set.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    let mut builder = tonic_prost_build::configure();
    // BuildKit sends these as JSON inside google.rpc.Status details (see
    // src/details.rs); keys are the proto field names, bytes are base64.
    for (message, rename) in JSON_DETAIL_TYPES {
        builder = builder
            .type_attribute(
                message,
                "#[derive(::serde::Serialize, ::serde::Deserialize)] #[serde(default)]",
            )
            .type_attribute(message, format!("#[serde(rename_all = \"{rename}\")]"));
    }
    builder = builder
        .field_attribute(
            ".pb.SourceInfo.data",
            "#[serde(with = \"crate::details::base64\")]",
        )
        // Go's encoding/json of the gogo structs: `omitempty` pointers are left out, `[]byte`
        // lists are base64 strings, and three fields keep names that are not snake_case.
        .field_attribute(
            ".pb.SourceInfo.definition",
            "#[serde(skip_serializing_if = \"Option::is_none\")]",
        )
        .field_attribute(
            ".pb.SourceInfo.language",
            "#[serde(skip_serializing_if = \"String::is_empty\")]",
        )
        .field_attribute(
            ".pb.Definition.def",
            "#[serde(with = \"crate::details::base64_list\")]",
        )
        .field_attribute(
            ".pb.Definition.Source",
            "#[serde(rename = \"Source\", skip_serializing_if = \"Option::is_none\")]",
        )
        .field_attribute(
            ".pb.Location.sourceIndex",
            "#[serde(rename = \"sourceIndex\")]",
        )
        .field_attribute(".pb.ExportCache.Value", "#[serde(rename = \"Value\")]")
        .field_attribute(
            ".pb.OpMetadata.export_cache",
            "#[serde(skip_serializing_if = \"Option::is_none\")]",
        )
        .field_attribute(
            ".pb.OpMetadata.progress_group",
            "#[serde(skip_serializing_if = \"Option::is_none\")]",
        )
        // newer than v0.11.6 and not needed to read a source back
        .field_attribute(".pb.OpMetadata.linux_resources", "#[serde(skip)]");

    builder
        .build_client(true)
        .build_server(true)
        // Servers may leave RPCs unimplemented; the stub answers UNIMPLEMENTED.
        .generate_default_stubs(true)
        // Sorted maps: deterministic encoding, as Go's stable marshaler (op digests).
        .btree_map(".")
        // `bytes::Bytes` for every bytes field: cheap clones of stream payloads.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}

/// Messages that get serde derives, with the serde `rename_all` rule that
/// turns prost's snake_case field names back into the proto names Go uses
/// as JSON keys.
const JSON_DETAIL_TYPES: &[(&str, &str)] = &[
    (".errdefs.Vertex", "camelCase"),
    (".errdefs.Source", "camelCase"),
    (".errdefs.Frontend", "camelCase"),
    (".errdefs.FrontendCap", "camelCase"),
    (".errdefs.Subrequest", "camelCase"),
    (".errdefs.CompatibilityFeature", "camelCase"),
    (".pb.SourceInfo", "camelCase"),
    (".pb.Definition", "snake_case"),
    (".pb.OpMetadata", "snake_case"),
    (".pb.ExportCache", "snake_case"),
    (".pb.ProgressGroup", "snake_case"),
    (".pb.Source", "snake_case"),
    (".pb.Locations", "snake_case"),
    (".pb.Location", "snake_case"),
    (".pb.Range", "camelCase"),
    (".pb.Position", "camelCase"),
    (".stack.Stack", "camelCase"),
    (".stack.Frame", "PascalCase"),
];

/// Lists every `.proto` under `dir`, as paths relative to `root`.
fn collect_protos(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path.strip_prefix(root).expect("under root").to_path_buf());
        }
    }
    Ok(())
}
