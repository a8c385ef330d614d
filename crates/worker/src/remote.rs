//! Build cache shared between nodes: what a solve evaluated ([`SolveTrace`], for
//! `--export-cache`) and caches imported from elsewhere ([`CacheSource`], `--import-cache`).
//!
//! The worker knows no cache format or transport: the `remotecache` crate turns a trace into
//! BuildKit's cache config and reads one back into a [`CacheSource`]. Keys are the worker's own
//! cache keys (see `solver::output_key`); they do not depend on the node (a base image's key is
//! its image ID, not where Docker keeps its layers), so two berthd on different Docker hosts
//! derive the same keys for the same definition and inputs.
//!
//! An imported result is a chain of compressed layer blobs. When a vertex's key matches one, the
//! worker builds the result's snapshot from what the node already has and downloads only the
//! rest: a layer whose diffID berth already holds is reused, a prefix of the chain that the bound
//! Docker Engine has (same chainIDs) is used in place, and every other blob is fetched from the
//! source, checked against its digest and diffID while it is applied. The result is then recorded
//! in the local cache.
//!
//! Fetching is lazy: the solver computes a step's key from its inputs' keys whenever the key
//! reads no input content (`Op::key_from_input_keys`), and builds (or loads, or fetches) an
//! input's result only when a step using it must run or must checksum it. So when the final step
//! of an imported build matches, only its layers are fetched, and steps whose records carry no
//! result (`mode=min`) are CACHED without running.

use std::io::Read;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::result::SolvedRef;

/// One compressed layer of an imported result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// `sha256:…` of the blob.
    pub digest: String,
    /// Its media type (gzip, zstd or uncompressed layer types).
    pub media_type: String,
    /// Blob size.
    pub size: u64,
    /// `sha256:…` of the uncompressed tar (`containerd.io/uncompressed`).
    pub diff_id: String,
    /// When the exporting node created the layer (`buildkit/createdat`, or the image history
    /// for an inline cache). The applied layer keeps it, so an image rebuilt from the cache has
    /// the exporter's history times and so its digest, as with BuildKit.
    pub created_at: Option<std::time::SystemTime>,
}

/// A cache imported for one build.
#[async_trait]
pub trait CacheSource: Send + Sync {
    /// Names the cache in logs and errors (e.g. `registry localhost:5000/cache:latest`).
    fn describe(&self) -> String;
    /// What the source is, in front of [`CacheSource::describe`] in errors and snapshot
    /// descriptions (`layer sha256:… of imported cache registry …`).
    fn noun(&self) -> &'static str {
        "imported cache"
    }
    /// The layer chain (bottom first) recorded for cache key `key` (one output's key), if any.
    fn lookup(&self, key: &str) -> Option<Vec<RemoteLayer>>;
    /// The vertex key recorded for alias key `alias` (see [`TracedVertex::alias`]), if any.
    fn alias(&self, _alias: &str) -> Option<String> {
        None
    }
    /// Opens a layer blob for reading (compressed bytes; read on a blocking thread).
    async fn open(&self, layer: &RemoteLayer) -> Result<Box<dyn Read + Send>, BoxError>;
}

/// Shared handle to a [`CacheSource`].
pub type CacheSourceRef = Arc<dyn CacheSource>;

/// What a solve evaluated: every vertex whose outputs the target needed, with each output's cache
/// key and result, and its inputs (indices into `vertices`). Vertices the build did not evaluate
/// are `None`.
#[derive(Debug, Clone)]
pub struct SolveTrace {
    /// By vertex index.
    pub vertices: Vec<Option<TracedVertex>>,
    /// `(vertex, output)` of the build's result.
    pub target: Option<(usize, usize)>,
}

/// One evaluated vertex of a [`SolveTrace`].
#[derive(Debug, Clone)]
pub struct TracedVertex {
    /// LLB op digest.
    pub digest: String,
    /// The vertex's cache key (its outputs' keys derive from it).
    pub key: String,
    /// For a vertex keyed by input content: the key of its definition and its inputs' keys
    /// (`Op::alias_key`). An export records that `alias` leads to `key`, so an importing build
    /// finds the vertex without checksumming its inputs.
    pub alias: Option<String>,
    /// `(vertex, output)` per input, in op order.
    pub inputs: Vec<(usize, usize)>,
    /// Per output: its cache key and result.
    pub outputs: Vec<TracedOutput>,
    /// The vertex's results must not be reused (`ignore_cache`): left out of exports.
    pub ignore_cache: bool,
    /// The vertex's records in BuildKit v0.11.6's own keys, when berth computed them (the op
    /// and every input have them): an export writes them next to berth's, so that stock
    /// buildkitd importing the cache finds its steps.
    pub stock: Option<StockVertex>,
}

/// A vertex's records in stock BuildKit v0.11.6's keys: a record per output whose digest is
/// `sha256("<cache map>@<output>")`, linked per input to the records of that input (or to a
/// content record), as stock's own exports link them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockVertex {
    /// Per output: its record digest.
    pub records: Vec<String>,
    /// Per input, in op order: what its link points to.
    pub inputs: Vec<StockLink>,
}

/// The link of one input of a [`StockVertex`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockLink {
    /// To the stock records of the input's output, with this selector (empty: none).
    Input(String),
    /// To the content record with this digest (a record without links), with no selector:
    /// the op reads the input by content (copies), as stock links a content-keyed input.
    Content(String),
}

/// One output of a [`TracedVertex`].
#[derive(Debug, Clone)]
pub struct TracedOutput {
    /// Cache key of the output.
    pub key: String,
    /// Its result; `None` when the build did not need it (a step using it was cached).
    pub result: Option<SolvedRef>,
}
