//! Reading a cache back (see the crate docs): the index names the config blob
//! (`application/vnd.buildkit.cacheconfig.v0`) and every layer blob with its diffID annotation;
//! an index without a config, or an image manifest, is read as an image whose config may carry
//! inline cache (`moby.buildkit.cache.v0`), its layers in image order. Only the index and the
//! config are read here; layer blobs are opened when the worker builds a matching result.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use registry::{BlockingBlob, Reference, Session};
use serde::Deserialize;
use worker::{CacheSource, RemoteLayer};

use crate::config::{
    CacheConfig, CacheLayer, ALIAS_SELECTOR, ANNOTATION_CREATED_AT, ANNOTATION_UNCOMPRESSED,
    CACHE_CONFIG_MEDIA_TYPE,
};
use crate::store::{read_all, ContentStore};
use crate::{Error, Result};

/// Largest index or config accepted (buildkitd refuses blobs over 1 MiB here).
const MAX_SMALL_BLOB: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
struct Desc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct IndexOrManifest {
    #[serde(default)]
    manifests: Option<Vec<Desc>>,
    #[serde(default)]
    config: Option<Desc>,
    #[serde(default)]
    layers: Option<Vec<Desc>>,
}

#[derive(Debug, Deserialize)]
struct ImageConfig {
    #[serde(default)]
    rootfs: Option<RootFs>,
    #[serde(rename = "moby.buildkit.cache.v0", default)]
    cache: Option<String>,
    #[serde(default)]
    history: Vec<History>,
}

#[derive(Debug, Deserialize)]
struct History {
    #[serde(default)]
    created: Option<DateTime<Utc>>,
    #[serde(default)]
    empty_layer: bool,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

enum Fetch {
    Registry {
        session: Session,
        reference: Reference,
    },
    Store(Arc<dyn ContentStore>),
    S3(Arc<crate::s3::S3Client>),
}

/// An imported cache: cache key → layer chain, and where its blobs are.
pub struct RemoteCache {
    describe: String,
    keys: HashMap<String, Vec<RemoteLayer>>,
    /// Alias key → vertex key ([`aliases`]).
    aliases: HashMap<String, String>,
    fetch: Fetch,
}

impl std::fmt::Debug for RemoteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteCache")
            .field("describe", &self.describe)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// Cache keys with results in `config`, each with its layer chain (results whose layers `descs`
/// does not describe with a diffID are left out).
pub fn results_by_key(
    config: &CacheConfig,
    descs: &HashMap<String, RemoteLayer>,
) -> HashMap<String, Vec<RemoteLayer>> {
    let mut out = HashMap::new();
    let layer = |i: usize| {
        config
            .layers
            .get(i)
            .and_then(|l| descs.get(&l.blob))
            .cloned()
    };
    let mut found = Vec::new();
    for (idx, r) in config.records.iter().enumerate() {
        // Several records may share a digest (stock's records of one op on different inputs):
        // each is found by its stock ids below, the first by the digest.
        if r.digest.is_empty() {
            continue;
        }
        let mut chains: Vec<Vec<usize>> = r
            .results
            .iter()
            .filter_map(|res| config.chain(res.layer_index).ok())
            .collect();
        chains.extend(r.chained_results.iter().filter_map(|c| {
            c.layer_indexes
                .iter()
                .map(|&i| usize::try_from(i).ok())
                .collect::<Option<Vec<usize>>>()
        }));
        for ch in chains {
            if let Some(ls) = ch.into_iter().map(layer).collect::<Option<Vec<_>>>() {
                found.push((idx, ls.clone()));
                out.entry(r.digest.clone()).or_insert(ls);
                break;
            }
        }
    }
    // Records written by stock buildkitd: also by their ids with their inputs.
    let ids = stock_ids(config);
    for (idx, ls) in found {
        for id in &ids[idx] {
            out.entry(id.clone()).or_insert_with(|| ls.clone());
        }
    }
    out
}

/// Most ids one record gets (one per combination of its slots' alternatives; stock writes at
/// most a few links per slot).
const MAX_STOCK_IDS: usize = 16;

/// The stock record ids (`worker::stock_record_id`) of each record of `config`, by record
/// index: a record without inputs is its digest; otherwise its digest with, per input slot, one
/// link's selector and one id of the linked record, for each combination (at most
/// [`MAX_STOCK_IDS`]). A record on a link cycle, or one whose slot has no usable link, has none.
pub fn stock_ids(config: &CacheConfig) -> Vec<Vec<String>> {
    #[derive(Clone)]
    enum State {
        New,
        Visiting,
        Done(Vec<String>),
    }
    fn visit(config: &CacheConfig, i: usize, st: &mut Vec<State>) -> Vec<String> {
        match &st[i] {
            State::Done(ids) => return ids.clone(),
            State::Visiting => return vec![],
            State::New => {}
        }
        st[i] = State::Visiting;
        let r = &config.records[i];
        let mut combos: Vec<Vec<(String, String)>> = vec![vec![]];
        for slot in &r.inputs {
            let mut alts = Vec::new();
            for link in slot {
                if link.selector == ALIAS_SELECTOR {
                    continue;
                }
                let Some(j) = usize::try_from(link.link_index)
                    .ok()
                    .filter(|&j| j < config.records.len())
                else {
                    continue;
                };
                for id in visit(config, j, st) {
                    alts.push((link.selector.clone(), id));
                }
            }
            combos = combos
                .iter()
                .flat_map(|c| {
                    alts.iter().map(move |a| {
                        let mut c = c.clone();
                        c.push(a.clone());
                        c
                    })
                })
                .take(MAX_STOCK_IDS)
                .collect();
        }
        let ids: Vec<String> = if r.digest.is_empty() {
            vec![]
        } else {
            combos
                .iter()
                .map(|c| {
                    let slots: Vec<(&str, &str)> =
                        c.iter().map(|(s, i)| (s.as_str(), i.as_str())).collect();
                    worker::stock_record_id(&r.digest, &slots)
                })
                .collect()
        };
        st[i] = State::Done(ids.clone());
        ids
    }
    let mut st = vec![State::New; config.records.len()];
    (0..config.records.len())
        .map(|i| visit(config, i, &mut st))
        .collect()
}

/// The vertex keys recorded for alias keys in `config`: a record linking with
/// [`ALIAS_SELECTOR`] to another record names the vertex key (its digest) of that record's
/// alias key (see `worker::TracedVertex::alias`).
pub fn aliases(config: &CacheConfig) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for r in &config.records {
        for link in r.inputs.iter().flatten() {
            if link.selector != ALIAS_SELECTOR {
                continue;
            }
            let Some(a) = usize::try_from(link.link_index)
                .ok()
                .and_then(|i| config.records.get(i))
            else {
                continue;
            };
            if !a.digest.is_empty() && !r.digest.is_empty() {
                out.entry(a.digest.clone())
                    .or_insert_with(|| r.digest.clone());
            }
        }
    }
    out
}

/// Cache keys with results and alias keys of a cache.
pub(crate) type Parsed = (HashMap<String, Vec<RemoteLayer>>, HashMap<String, String>);

/// The layer `d` of a cache; `diff_id` and `created` (from an image config) override the
/// descriptor's annotations.
fn remote_layer(
    d: &Desc,
    diff_id: Option<&str>,
    created: Option<DateTime<Utc>>,
) -> Option<RemoteLayer> {
    let diff_id = diff_id
        .map(str::to_string)
        .or_else(|| d.annotations.get(ANNOTATION_UNCOMPRESSED).cloned())?;
    let created = created.or_else(|| {
        d.annotations
            .get(ANNOTATION_CREATED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    });
    Some(RemoteLayer {
        digest: d.digest.clone(),
        media_type: d.media_type.clone(),
        size: d.size,
        diff_id,
        created_at: created.map(SystemTime::from),
    })
}

/// Reads the blobs of one place (registry reference or content store).
#[async_trait]
trait Reader: Send + Sync {
    async fn small(&self, d: &Desc) -> Result<Vec<u8>>;
    /// A manifest an index names (a content store holds it as a blob).
    async fn manifest(&self, d: &Desc) -> Result<Vec<u8>> {
        self.small(d).await
    }
}

struct RegistryReader<'a>(&'a Session, &'a Reference);

#[async_trait]
impl Reader for RegistryReader<'_> {
    async fn small(&self, d: &Desc) -> Result<Vec<u8>> {
        if d.size > MAX_SMALL_BLOB {
            return Err(Error::invalid(format!(
                "blob {} is too large ({} > {MAX_SMALL_BLOB})",
                d.digest, d.size
            )));
        }
        let desc = registry_desc(&d.digest, &d.media_type, d.size);
        let reg = |source| Error::Registry {
            what: format!("import cache {}: blob {}", self.1, d.digest),
            source: Box::new(source),
        };
        let mut s = self
            .0
            .open_blob(&[], self.1, &desc, None)
            .await
            .map_err(reg)?;
        let mut out = vec![];
        while let Some(c) = s.next_chunk().await.map_err(reg)? {
            out.extend_from_slice(&c);
        }
        Ok(out)
    }

    async fn manifest(&self, d: &Desc) -> Result<Vec<u8>> {
        if d.size > MAX_SMALL_BLOB {
            return Err(Error::invalid(format!(
                "manifest {} is too large ({} > {MAX_SMALL_BLOB})",
                d.digest, d.size
            )));
        }
        let r = self.1.with_digest(&d.digest);
        let m = self.0.resolve(&r).await.map_err(|source| Error::Registry {
            what: format!("import cache {}: manifest {}", self.1, d.digest),
            source: Box::new(source),
        })?;
        Ok(m.bytes.to_vec())
    }
}

struct StoreReader<'a>(&'a dyn ContentStore);

#[async_trait]
impl Reader for StoreReader<'_> {
    async fn small(&self, d: &Desc) -> Result<Vec<u8>> {
        read_all(self.0, &d.digest, MAX_SMALL_BLOB).await
    }
}

fn registry_desc(digest: &str, media_type: &str, size: u64) -> registry::Descriptor {
    registry::Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size,
        urls: vec![],
        platform: None,
    }
}

/// Keys from an index or manifest `top` (see the module docs).
async fn parse(describe: &str, top: &[u8], reader: &dyn Reader) -> Result<Parsed> {
    let bad = |m: String| Error::invalid(format!("import cache {describe}: {m}"));
    let top: IndexOrManifest =
        serde_json::from_slice(top).map_err(|e| bad(format!("invalid index: {e}")))?;
    if let Some(ms) = &top.manifests {
        if let Some(cfg) = ms.iter().find(|m| m.media_type == CACHE_CONFIG_MEDIA_TYPE) {
            let dt = reader.small(cfg).await?;
            let config: CacheConfig = serde_json::from_slice(&dt)
                .map_err(|e| bad(format!("invalid cache config {}: {e}", cfg.digest)))?;
            let descs: HashMap<String, RemoteLayer> = ms
                .iter()
                .filter(|m| m.media_type != CACHE_CONFIG_MEDIA_TYPE)
                .filter_map(|m| remote_layer(m, None, None).map(|l| (m.digest.clone(), l)))
                .collect();
            return Ok((results_by_key(&config, &descs), aliases(&config)));
        }
        // An image index: inline cache of each image (a manifest is read from the registry's
        // manifest endpoint: registries serve no manifest as a blob).
        let (mut out, mut al) = (HashMap::new(), HashMap::new());
        for m in ms.iter().take(16) {
            let dt = reader.manifest(m).await?;
            let sub: IndexOrManifest = serde_json::from_slice(&dt)
                .map_err(|e| bad(format!("invalid manifest {}: {e}", m.digest)))?;
            let (keys, aliases) = inline(describe, &sub, reader).await?;
            for (k, v) in keys {
                out.entry(k).or_insert(v);
            }
            for (k, v) in aliases {
                al.entry(k).or_insert(v);
            }
        }
        return Ok((out, al));
    }
    inline(describe, &top, reader).await
}

/// Keys of the inline cache in an image manifest's config.
async fn inline(describe: &str, m: &IndexOrManifest, reader: &dyn Reader) -> Result<Parsed> {
    let (Some(cfg), Some(layers)) = (&m.config, &m.layers) else {
        return Ok(Default::default());
    };
    if layers.is_empty() {
        return Ok(Default::default());
    }
    let dt = reader.small(cfg).await?;
    let img: ImageConfig = serde_json::from_slice(&dt).map_err(|e| {
        Error::invalid(format!(
            "import cache {describe}: invalid image config: {e}"
        ))
    })?;
    let Some(cache) = img.cache else {
        return Ok(Default::default());
    };
    let diff_ids = img.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != layers.len() {
        tracing::warn!(
            cache = describe,
            "invalid image with mismatching manifest and config"
        );
        return Ok(Default::default());
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(cache.as_bytes())
        .map_err(|e| Error::invalid(format!("import cache {describe}: inline cache: {e}")))?;
    let records = serde_json::from_slice(&raw)
        .map_err(|e| Error::invalid(format!("import cache {describe}: inline cache: {e}")))?;
    let mut config = CacheConfig {
        layers: vec![],
        records,
    };
    // The creation time of each layer is its history entry's (entries of empty layers skipped),
    // as BuildKit reads an inline cache; a history that does not cover the layers gives none.
    let mut created: Vec<Option<DateTime<Utc>>> = img
        .history
        .iter()
        .filter(|h| !h.empty_layer)
        .map(|h| h.created)
        .collect();
    if created.len() != layers.len() {
        created = vec![None; layers.len()];
    }
    let mut descs = HashMap::new();
    for (i, ((l, d), c)) in layers.iter().zip(&diff_ids).zip(created).enumerate() {
        config.layers.push(CacheLayer {
            blob: l.digest.clone(),
            parent_index: i as i64 - 1,
            annotations: None,
        });
        if let Some(rl) = remote_layer(l, Some(d), c) {
            descs.insert(l.digest.clone(), rl);
        }
    }
    Ok((results_by_key(&config, &descs), aliases(&config)))
}

impl RemoteCache {
    /// The cache (or image with inline cache) at `reference`.
    pub async fn from_registry(session: Session, reference: &str) -> Result<RemoteCache> {
        let r = Reference::parse(reference).map_err(|source| Error::Registry {
            what: format!("import cache {reference}"),
            source: Box::new(source),
        })?;
        let top = session
            .resolve(&r)
            .await
            .map_err(|source| Error::Registry {
                what: format!("import cache {reference}"),
                source: Box::new(source),
            })?;
        let describe = format!("registry {r}");
        let (keys, aliases) = parse(&describe, &top.bytes, &RegistryReader(&session, &r)).await?;
        tracing::info!(cache = %describe, results = keys.len(), aliases = aliases.len(), "cache imported");
        Ok(RemoteCache {
            describe,
            keys,
            aliases,
            fetch: Fetch::Registry {
                session,
                reference: r,
            },
        })
    }

    /// The cache whose index is `digest` in `store`.
    pub async fn from_store(store: Arc<dyn ContentStore>, digest: &str) -> Result<RemoteCache> {
        let describe = format!("local {}", store.describe());
        let top = read_all(store.as_ref(), digest, MAX_SMALL_BLOB).await?;
        let (keys, aliases) = parse(&describe, &top, &StoreReader(store.as_ref())).await?;
        tracing::info!(cache = %describe, results = keys.len(), aliases = aliases.len(), "cache imported");
        Ok(RemoteCache {
            describe,
            keys,
            aliases,
            fetch: Fetch::Store(store),
        })
    }

    /// The cache in the bucket of `client` (empty when it holds no config under the first
    /// name, as with buildkitd).
    pub async fn from_s3(client: crate::s3::S3Client) -> Result<RemoteCache> {
        let describe = format!("s3 {}", client.config().describe());
        let (keys, aliases) = crate::s3::load(&client).await.map_err(|e| match e {
            Error::Invalid(m) => Error::invalid(format!("import cache {describe}: {m}")),
            other => other,
        })?;
        tracing::info!(cache = %describe, results = keys.len(), aliases = aliases.len(), "cache imported");
        Ok(RemoteCache {
            describe,
            keys,
            aliases,
            fetch: Fetch::S3(Arc::new(client)),
        })
    }

    /// Number of cache keys with results.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key has a result.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[async_trait]
impl CacheSource for RemoteCache {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn lookup(&self, key: &str) -> Option<Vec<RemoteLayer>> {
        self.keys.get(key).cloned()
    }

    fn alias(&self, alias: &str) -> Option<String> {
        self.aliases.get(alias).cloned()
    }

    async fn open(
        &self,
        layer: &RemoteLayer,
    ) -> std::result::Result<Box<dyn Read + Send>, worker::BoxError> {
        match &self.fetch {
            Fetch::Registry { session, reference } => {
                let d = registry_desc(&layer.digest, &layer.media_type, layer.size);
                let s = session.open_blob(&[], reference, &d, None).await?;
                Ok(Box::new(BlockingBlob::new(
                    s,
                    tokio::runtime::Handle::current(),
                )))
            }
            Fetch::Store(s) => Ok(s.open(&layer.digest).await?),
            Fetch::S3(c) => Ok(Box::new(crate::s3::open_blob(c, &layer.digest).await?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheRecord, CacheResult, ChainedResult};

    fn rl(d: &str) -> RemoteLayer {
        RemoteLayer {
            digest: d.into(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            size: 1,
            diff_id: format!("diff-{d}"),
            created_at: None,
        }
    }

    #[test]
    fn keys_follow_parents_and_chains() {
        let config = CacheConfig {
            layers: vec![
                CacheLayer {
                    blob: "a".into(),
                    parent_index: -1,
                    annotations: None,
                },
                CacheLayer {
                    blob: "b".into(),
                    parent_index: 0,
                    annotations: None,
                },
                CacheLayer {
                    blob: "missing".into(),
                    parent_index: 1,
                    annotations: None,
                },
            ],
            records: vec![
                CacheRecord {
                    digest: "k1".into(),
                    results: vec![CacheResult {
                        layer_index: 1,
                        created_at: None,
                    }],
                    ..Default::default()
                },
                CacheRecord {
                    digest: "k2".into(),
                    chained_results: vec![ChainedResult {
                        layer_indexes: vec![1, 0],
                        created_at: None,
                    }],
                    ..Default::default()
                },
                CacheRecord {
                    digest: "k3".into(),
                    results: vec![CacheResult {
                        layer_index: 2,
                        created_at: None,
                    }],
                    ..Default::default()
                },
            ],
        };
        let descs: HashMap<String, RemoteLayer> = [("a", rl("a")), ("b", rl("b"))]
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect();
        let keys = results_by_key(&config, &descs);
        assert_eq!(keys["k1"], vec![rl("a"), rl("b")]);
        assert_eq!(keys["k2"], vec![rl("b"), rl("a")]);
        assert!(
            !keys.contains_key("k3"),
            "a layer without descriptor drops the result"
        );
    }

    /// The cache config a stock buildkitd v0.11.6 exported for `FROM` + two `RUN` + `COPY
    /// Dockerfile` (commands and record digests in `worker`'s `bkkeys` tests): each record with
    /// a result is found by the id a berth vertex computes from its stock record digest and
    /// its inputs' ids.
    #[test]
    fn stock_records_found_by_their_ids_with_inputs() {
        let config: CacheConfig =
            serde_json::from_str(include_str!("../testdata/stock-v0.11.6-cacheconfig.json"))
                .unwrap();
        // Record digests (worker::bkkeys tests reproduce each from the Dockerfile).
        let by_config = "sha256:46aef56ca724ae4f4ffad53284525f512fe75ae8bc6638a84861144bcef78e56";
        let by_manifest = "sha256:47d425c3a51eed124700d97146c0b54071c8b73495eae05714b3fa950ee7db48";
        let run1 = "sha256:64e6ee8fbdefdb27a56653894df4fa506d14068dc32cf5b713fd29b2c6ebf45b";
        let run2 = "sha256:294a35e4fbfd1744611325ef5402c1bce4ec386bf0c194e7e58db44e76872ebd";
        let content = "sha256:9fcafc423f99ff9fb0877f5ff70d29e0cf7d79b222e455dcde1e48edf49128ee";
        let copy = "sha256:c3683cc92effcfcc5db999181ced1d8dbb770872159f6ffd5373c24a86f88457";
        let id = worker::stock_record_id;
        let descs: HashMap<String, RemoteLayer> = config
            .layers
            .iter()
            .map(|l| (l.blob.clone(), rl(&l.blob)))
            .collect();
        let keys = results_by_key(&config, &descs);
        let layers = |idxs: &[usize]| -> Vec<RemoteLayer> {
            idxs.iter().map(|&i| rl(&config.layers[i].blob)).collect()
        };
        // RUN 1 through either image-source record.
        let run1_id = id(run1, &[("", by_config)]);
        assert_eq!(keys[&run1_id], layers(&[0, 3]));
        assert_eq!(keys[&id(run1, &[("", by_manifest)])], layers(&[0, 3]));
        let run2_id = id(run2, &[("", &run1_id)]);
        assert_eq!(keys[&run2_id], layers(&[0, 3, 1]));
        // COPY: slot 0 its base, slot 1 the content record of the copied file.
        let copy_id = id(copy, &[("", &run2_id), ("", content)]);
        assert_eq!(keys[&copy_id], layers(&[0, 3, 1, 2]));
        // Another input gives another id: nothing found.
        assert!(!keys.contains_key(&id(run2, &[("", by_config)])));
    }
}
