//! Exporters: turn a solved result into an image in the Docker Engine berthd is bound to, or into
//! a stream for the client.
//!
//! Modules:
//! - [`image`]: the image config (and so the image ID) built from the result and its layers.
//! - `archive`: a streaming docker-archive writer that carries only the layers Docker lacks.
//! - `layers`: diffIDs, sizes and exact tars for berth's and Docker's layers of a result.
//! - `containerd`: export into a containerd image store through containerd's API.
//! - `docker_image`: the `image` exporter: picks thin load, offline write or containerd.
//! - `docker_load`: export into a live classic-store Docker Engine by a thin `POST /images/load`.
//! - `docker_archive`: the docker-archive streamed to the client (`type=docker`), thin or whole.
//! - `oci`: the OCI image layout tar streamed to the client (`type=oci`), compressed layers, or
//!   its blobs written into a content store ([`BlobSink`], `tar=false`).
//! - `push`: an exported image pushed to registries with berth's registry client.
//! - [`attestation`]: in-toto statements and attestation manifests of a result's attestations.
#![forbid(unsafe_code)]

mod archive;
pub mod attestation;
mod containerd;
mod docker_archive;
mod docker_image;
mod docker_load;
mod error;
pub mod image;
mod layers;
mod oci;
mod push;

pub use archive::{write_docker_archive, ArchiveStats, ExportLayer, LayerSource, OciLayout};
pub use containerd::{
    oci_manifest, ContainerdLayer, ContainerdReport, ContainerdStore, LayerFiles,
};
pub use docker_archive::{write_docker_client_archive, DockerPresence};
pub use docker_image::{
    ImageExportRequest, ImageExportResult, ImageTarget, TargetOptions, DOCKER_MANIFEST_MEDIA_TYPE,
};
pub use docker_load::{split_tag, DockerEngine, LoadReport};
pub use error::{Error, Result};
pub use layers::{
    berth_layer_dir, docker_layerdb_dir, export_layer_tars, export_layers, layer_created,
};
pub use oci::{
    familiar_name, normalize_name, write_docker_image_blobs, write_docker_index_archive,
    write_oci_image_archive, write_oci_image_blobs, write_oci_index_archive, write_oci_index_blobs,
    BlobSink, Compression, OciIndexRequest, OciOptions, OciProgress,
};
pub use push::{
    push_image, push_index, PlatformImage, PushEvent, PushOptions, PushProgress, PushedImage,
};
