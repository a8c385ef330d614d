//! Exporters: turn a solved result into an image in the Docker Engine berthd is bound to, or into
//! a stream for the client.
//!
//! Modules:
//! - [`image`]: the image config (and so the image ID) built from the result and its layers.
//! - `archive`: a streaming docker-archive writer that carries only the layers Docker lacks.
#![forbid(unsafe_code)]

mod error;
pub mod image;

pub use error::{Error, Result};
