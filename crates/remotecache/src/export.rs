//! From what a solve evaluated to BuildKit's cache layout (see the crate docs).
//!
//! Records: one per output of every evaluated step (steps that ignore the cache are left out),
//! keyed by the output's cache key, with one link per input to the record of the output it
//! consumed. Results: `mode=max` gives every record with a non-empty result its layer chain,
//! `mode=min` only the build result's. Layers are compressed once per (diffID, compression) into
//! berth's blob cache (shared with pushes) and listed as BuildKit lists them: one config layer
//! per (blob, parent) chain position.
//!
//! Next to them, the records of stock BuildKit v0.11.6's keys of every step that has them
//! (`worker::StockVertex`), linked as stock links them and given the same results, so stock
//! buildkitd importing the cache finds its steps (`docs/cache.md`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use layerstore::snapshot::LayerRef;
use registry::{BlobCache, Reference, Session};
use serde_json::json;
use worker::SolveTrace;

use crate::attrs::{CompressionOpts, Mode};
use crate::config::{
    go_time, CacheConfig, CacheInput, CacheLayer, CacheRecord, CacheResult, ChainedResult,
    ALIAS_SELECTOR, ANNOTATION_CREATED_AT, ANNOTATION_UNCOMPRESSED, CACHE_CONFIG_MEDIA_TYPE,
};
use crate::store::ContentStore;
use crate::{Error, Result};

/// One status line of an export: `(id, done)` (e.g. `writing layer sha256:…`).
pub type ExportProgress = Arc<dyn Fn(&str, bool) + Send + Sync>;

/// A layer blob of a built cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Blob digest.
    pub digest: String,
    /// Blob size.
    pub size: u64,
    /// Layer media type.
    pub media_type: String,
    /// diffID.
    pub diff_id: String,
    /// When the layer was made.
    pub created_at: Option<DateTime<Utc>>,
    /// The compressed blob in berth's blob cache.
    pub path: PathBuf,
}

/// A cache ready to be written: the config and the blob of each of its layers.
#[derive(Debug, Clone)]
pub struct Built {
    /// The config (layers and records).
    pub config: CacheConfig,
    /// Blob of each `config.layers[i]`.
    pub blobs: Vec<LayerBlob>,
    /// `oci-mediatypes`.
    pub oci: bool,
    /// `config.records[..berth_records]` are berth's records (the rest are in stock's keys,
    /// linking only among themselves and left out of the inline cache).
    pub berth_records: usize,
}

/// What a written cache left: the index's descriptor (`cache.manifest` in the response).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// Index media type.
    pub media_type: String,
    /// Index digest.
    pub digest: String,
    /// Index size.
    pub size: u64,
    /// Layer bytes sent (blobs the target had are not counted).
    pub bytes_sent: u64,
}

impl Exported {
    /// The descriptor as JSON (buildkitd's `cache.manifest` response value).
    pub fn descriptor_json(&self) -> String {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size}).to_string()
    }
}

fn sha256(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
    )
}

/// Builds the cache of `trace` (blocking work on the blocking pool).
pub async fn build(
    trace: &SolveTrace,
    mode: Mode,
    comp: CompressionOpts,
    oci: bool,
    blobs: &BlobCache,
    progress: &ExportProgress,
) -> Result<Built> {
    // Record index of every exported output, one per key.
    let mut index: HashMap<(usize, usize), usize> = HashMap::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut records: Vec<CacheRecord> = vec![];
    let mut results: Vec<Option<worker::SolvedRef>> = vec![];
    for (vi, v) in trace.vertices.iter().enumerate() {
        let Some(v) = v else { continue };
        if v.ignore_cache {
            continue;
        }
        for (oi, o) in v.outputs.iter().enumerate() {
            let idx = *by_key.entry(o.key.clone()).or_insert_with(|| {
                records.push(CacheRecord {
                    digest: o.key.clone(),
                    ..Default::default()
                });
                results.push(None);
                records.len() - 1
            });
            index.insert((vi, oi), idx);
            let wanted = match mode {
                Mode::Max => true,
                Mode::Min => trace.target == Some((vi, oi)),
            };
            if let Some(r) = o
                .result
                .as_ref()
                .filter(|r| wanted && !r.chain().is_empty())
            {
                results[idx] = Some(r.clone());
            }
        }
    }
    for (vi, v) in trace.vertices.iter().enumerate() {
        let Some(v) = v else { continue };
        for oi in 0..v.outputs.len() {
            let Some(&idx) = index.get(&(vi, oi)) else {
                continue;
            };
            if !records[idx].inputs.is_empty() {
                continue;
            }
            records[idx].inputs = v
                .inputs
                .iter()
                .map(|inp| {
                    index
                        .get(inp)
                        .map(|&l| {
                            vec![CacheInput {
                                selector: String::new(),
                                link_index: l as i64,
                            }]
                        })
                        .unwrap_or_default()
                })
                .collect();
        }
    }
    // Alias links: vertex key → alias key (see `ALIAS_SELECTOR`).
    for v in trace.vertices.iter().flatten() {
        let Some(alias) = v.alias.as_ref().filter(|_| !v.ignore_cache) else {
            continue;
        };
        let mut record = |digest: &str| {
            *by_key.entry(digest.to_string()).or_insert_with(|| {
                records.push(CacheRecord {
                    digest: digest.to_string(),
                    ..Default::default()
                });
                results.push(None);
                records.len() - 1
            })
        };
        let a = record(alias);
        let k = record(&v.key);
        if records[k].inputs.is_empty() {
            records[k].inputs = vec![vec![CacheInput {
                selector: ALIAS_SELECTOR.to_string(),
                link_index: a as i64,
            }]];
        }
    }
    let berth_records = records.len();
    let stock_of = stock_records(trace, &index, &mut records, &mut results);
    let prepare = "preparing build cache for export";
    progress(prepare, false);
    // Layer blobs, once per diffID.
    let mut by_diff: HashMap<String, LayerBlob> = HashMap::new();
    // Config layer per (blob, parent) chain id.
    let mut chains: HashMap<String, usize> = HashMap::new();
    let mut layers: Vec<CacheLayer> = vec![];
    let mut layer_blobs: Vec<LayerBlob> = vec![];
    for (idx, res) in results.iter().enumerate() {
        let Some(res) = res else { continue };
        let store = res.store().clone();
        let chain: Vec<LayerRef> = res.chain().0.clone();
        let st = store.clone();
        let ch = chain.clone();
        let (exported, _) =
            tokio::task::spawn_blocking(move || exporter::export_layer_tars(&st, &ch))
                .await
                .map_err(|e| Error::Other(format!("layer task: {e}")))?
                .map_err(|source| Error::Export {
                    what: "export cache layers".into(),
                    source: Box::new(source),
                })?;
        let mut parent = String::new();
        let mut top = -1i64;
        let mut created = None;
        for (l, lref) in exported.iter().zip(&chain) {
            let blob = match by_diff.get(&l.diff_id) {
                Some(b) => b.clone(),
                None => {
                    let source = l.source.clone().ok_or_else(|| {
                        Error::Other(format!("layer {} has no content to export", l.diff_id))
                    })?;
                    let (c2, diff_id) = (blobs.clone(), l.diff_id.clone());
                    let (cached, _) = tokio::task::spawn_blocking(move || {
                        c2.get_or_compress(
                            &diff_id,
                            comp.compression,
                            comp.level,
                            comp.force,
                            &|w| source.write_tar(w),
                        )
                    })
                    .await
                    .map_err(|e| Error::Other(format!("compress task: {e}")))?
                    .map_err(|source| Error::Registry {
                        what: format!("compress layer {}", l.diff_id),
                        source: Box::new(source),
                    })?;
                    let st = store.clone();
                    let lr = lref.clone();
                    let created_at =
                        tokio::task::spawn_blocking(move || exporter::layer_created(&st, &lr))
                            .await
                            .ok()
                            .flatten();
                    let b = LayerBlob {
                        digest: cached.digest.clone(),
                        size: cached.size,
                        media_type: comp.compression.layer_media_type(oci).to_string(),
                        diff_id: l.diff_id.clone(),
                        created_at,
                        path: cached.path.clone(),
                    };
                    by_diff.insert(l.diff_id.clone(), b.clone());
                    b
                }
            };
            created = blob.created_at;
            let id = format!("{}{}", blob.digest, parent);
            let li = match chains.get(&id) {
                Some(&i) => i,
                None => {
                    layers.push(CacheLayer {
                        blob: blob.digest.clone(),
                        parent_index: top,
                        annotations: None,
                    });
                    layer_blobs.push(blob.clone());
                    chains.insert(id.clone(), layers.len() - 1);
                    layers.len() - 1
                }
            };
            parent = id;
            top = li as i64;
        }
        let result = CacheResult {
            layer_index: top,
            created_at: created,
        };
        for &s in stock_of.get(&idx).into_iter().flatten() {
            records[s].results.push(result.clone());
        }
        records[idx].results.push(result);
    }
    progress(prepare, true);
    Ok(Built {
        config: CacheConfig { layers, records },
        blobs: layer_blobs,
        oci,
        berth_records,
    })
}

/// Adds the records of the trace's vertices in stock BuildKit v0.11.6's keys
/// ([`worker::StockVertex`]) to `records` (and a `None` result slot each to `results`), linked
/// as stock links them: per input to the input's stock records with the op's selector, or to
/// a content record. Records with the same digest and links are written once. Returns, per
/// berth record index (`index` values), the stock records that get the same results.
fn stock_records(
    trace: &SolveTrace,
    index: &HashMap<(usize, usize), usize>,
    records: &mut Vec<CacheRecord>,
    results: &mut Vec<Option<worker::SolvedRef>>,
) -> HashMap<usize, Vec<usize>> {
    struct State<'a> {
        trace: &'a SolveTrace,
        records: &'a mut Vec<CacheRecord>,
        results: &'a mut Vec<Option<worker::SolvedRef>>,
        /// (digest, links) → record index.
        by_id: HashMap<(String, Vec<(String, usize)>), usize>,
        /// (vertex, output) → its stock record, once decided.
        memo: HashMap<(usize, usize), Option<usize>>,
    }
    impl State<'_> {
        fn record(&mut self, digest: &str, links: Vec<(String, usize)>) -> usize {
            let id = (digest.to_string(), links);
            if let Some(&i) = self.by_id.get(&id) {
                return i;
            }
            self.records.push(CacheRecord {
                digest: digest.to_string(),
                inputs: id
                    .1
                    .iter()
                    .map(|(selector, l)| {
                        vec![CacheInput {
                            selector: selector.clone(),
                            link_index: *l as i64,
                        }]
                    })
                    .collect(),
                ..Default::default()
            });
            self.results.push(None);
            self.by_id.insert(id, self.records.len() - 1);
            self.records.len() - 1
        }
        fn output(&mut self, vi: usize, oi: usize) -> Option<usize> {
            if let Some(r) = self.memo.get(&(vi, oi)) {
                return *r;
            }
            // Marked first: a (malformed) cycle ends as "no record".
            self.memo.insert((vi, oi), None);
            let r = self.make(vi, oi);
            self.memo.insert((vi, oi), r);
            r
        }
        fn make(&mut self, vi: usize, oi: usize) -> Option<usize> {
            let trace = self.trace;
            let v = trace.vertices.get(vi)?.as_ref()?;
            if v.ignore_cache {
                return None;
            }
            let sv = v.stock.as_ref()?;
            let digest = sv.records.get(oi)?.clone();
            let mut links = Vec::with_capacity(sv.inputs.len());
            for (j, link) in sv.inputs.iter().enumerate() {
                links.push(match link {
                    worker::StockLink::Content(c) => (String::new(), self.record(c, vec![])),
                    worker::StockLink::Input(selector) => {
                        let &(ivi, ioi) = v.inputs.get(j)?;
                        (selector.clone(), self.output(ivi, ioi)?)
                    }
                });
            }
            Some(self.record(&digest, links))
        }
    }
    let mut st = State {
        trace,
        records,
        results,
        by_id: HashMap::new(),
        memo: HashMap::new(),
    };
    let mut keys: Vec<(usize, usize)> = index.keys().copied().collect();
    keys.sort_unstable();
    let mut out: HashMap<usize, Vec<usize>> = HashMap::new();
    for (vi, oi) in keys {
        if let Some(s) = st.output(vi, oi) {
            let v = out.entry(index[&(vi, oi)]).or_default();
            if !v.contains(&s) {
                v.push(s);
            }
        }
    }
    out
}

impl Built {
    /// The config blob.
    pub fn config_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(&self.config).expect("config serialises"))
    }

    /// The index listing every layer blob and the config blob `config` (`digest`, `size`).
    pub fn index_bytes(&self, config_digest: &str, config_size: u64) -> (String, Bytes) {
        let media_type = if self.oci {
            registry::MEDIA_TYPE_OCI_INDEX
        } else {
            registry::MEDIA_TYPE_DOCKER_LIST
        };
        let mut manifests: Vec<serde_json::Value> = self
            .blobs
            .iter()
            .map(|b| {
                let mut ann = BTreeMap::new();
                if let Some(t) = &b.created_at {
                    ann.insert(ANNOTATION_CREATED_AT, go_time(t));
                }
                ann.insert(ANNOTATION_UNCOMPRESSED, b.diff_id.clone());
                json!({
                    "mediaType": b.media_type,
                    "digest": b.digest,
                    "size": b.size,
                    "annotations": ann,
                })
            })
            .collect();
        manifests.push(json!({
            "mediaType": CACHE_CONFIG_MEDIA_TYPE,
            "digest": config_digest,
            "size": config_size,
        }));
        let index = json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": manifests,
        });
        (
            media_type.to_string(),
            Bytes::from(serde_json::to_vec(&index).expect("index serialises")),
        )
    }

    /// Pushes the cache to `reference` (tag `latest` when it names none): every blob the
    /// registry lacks (HEAD first), the config, then the index under the tag.
    pub async fn push(
        &self,
        session: &Session,
        reference: &str,
        blobs: &BlobCache,
        progress: &ExportProgress,
    ) -> Result<Exported> {
        let r = Reference::parse(reference).map_err(|source| Error::Registry {
            what: format!("export cache to {reference}"),
            source: Box::new(source),
        })?;
        let reg = |what: String| {
            move |source| Error::Registry {
                what,
                source: Box::new(source),
            }
        };
        let mut sent = 0;
        let mut seen = std::collections::HashSet::new();
        for b in &self.blobs {
            if !seen.insert(b.digest.clone()) {
                continue;
            }
            let id = format!("writing layer {}", b.digest);
            progress(&id, false);
            let how = session
                .push_blob(&r, &b.digest, b.size, &b.path, None, None)
                .await
                .map_err(reg(format!(
                    "export cache to {reference}: layer {}",
                    b.digest
                )))?;
            if how == registry::PushedBlob::Uploaded {
                sent += b.size;
            }
            progress(&id, true);
        }
        let config = self.config_bytes();
        let cblob = blobs
            .put_bytes(&config)
            .map_err(reg("store cache config".into()))?;
        let id = format!("writing config {}", cblob.digest);
        progress(&id, false);
        session
            .push_blob(&r, &cblob.digest, cblob.size, &cblob.path, None, None)
            .await
            .map_err(reg(format!("export cache to {reference}: config")))?;
        progress(&id, true);
        let (media_type, index) = self.index_bytes(&cblob.digest, cblob.size);
        let digest = sha256(&index);
        let id = format!("writing manifest {digest}");
        progress(&id, false);
        let tag = r.tag().unwrap_or("latest").to_string();
        session
            .push_manifest(&r, &tag, &media_type, index.clone())
            .await
            .map_err(reg(format!("export cache to {reference}: manifest")))?;
        progress(&id, true);
        Ok(Exported {
            media_type,
            digest,
            size: index.len() as u64,
            bytes_sent: sent,
        })
    }

    /// Writes the cache into `store` (blobs it lacks, the config, the index).
    pub async fn write_to(
        &self,
        store: &dyn ContentStore,
        progress: &ExportProgress,
    ) -> Result<Exported> {
        let mut sent = 0;
        for b in &self.blobs {
            if store.info(&b.digest).await?.is_some() {
                continue;
            }
            let id = format!("writing layer {}", b.digest);
            progress(&id, false);
            store.write_file(&b.digest, b.size, &b.path).await?;
            sent += b.size;
            progress(&id, true);
        }
        let config = self.config_bytes();
        let cdigest = sha256(&config);
        let id = format!("writing config {cdigest}");
        progress(&id, false);
        store.write_bytes(&cdigest, config.clone()).await?;
        progress(&id, true);
        let (media_type, index) = self.index_bytes(&cdigest, config.len() as u64);
        let digest = sha256(&index);
        let id = format!("writing manifest {digest}");
        progress(&id, false);
        store.write_bytes(&digest, index.clone()).await?;
        progress(&id, true);
        Ok(Exported {
            media_type,
            digest,
            size: index.len() as u64,
            bytes_sent: sent,
        })
    }

    /// The inline cache of an image whose layers have `diff_ids` (bottom first): the records,
    /// with results given as indexes into the image's layers (a prefix of the image as its top
    /// layer, otherwise the list of layers; results with a layer the image lacks are dropped).
    /// `None` when no result is in the image.
    ///
    /// Only berth's records: a rebuild from the inline cache that takes a step's key from its
    /// alias does not checksum the copy sources, so it could not write the stock records of
    /// the copies again, and the rebuilt image's config (and digest) would differ from the
    /// first one's (`cache_content_keyed`'s multi-platform test). Stock finds nothing in a
    /// berth inline cache yet.
    pub fn inline_records(&self, diff_ids: &[String]) -> Option<Vec<u8>> {
        let pos: HashMap<&str, usize> = diff_ids
            .iter()
            .enumerate()
            .map(|(i, d)| (d.as_str(), i))
            .collect();
        let mut records = self.config.records[..self.berth_records].to_vec();
        let mut any = false;
        for r in &mut records {
            let results = std::mem::take(&mut r.results);
            for res in results {
                let Ok(chain) = self.config.chain(res.layer_index) else {
                    continue;
                };
                let ids: Vec<&str> = chain
                    .iter()
                    .map(|&i| self.blobs[i].diff_id.as_str())
                    .collect();
                if ids.len() <= diff_ids.len() && ids.iter().zip(diff_ids).all(|(a, b)| *a == b) {
                    r.results.push(CacheResult {
                        layer_index: ids.len() as i64 - 1,
                        created_at: res.created_at,
                    });
                    any = true;
                } else if let Some(idx) = ids
                    .iter()
                    .map(|d| pos.get(d).map(|&i| i as i64))
                    .collect::<Option<Vec<i64>>>()
                {
                    r.chained_results.push(ChainedResult {
                        layer_indexes: idx,
                        created_at: res.created_at,
                    });
                    any = true;
                }
            }
        }
        any.then(|| serde_json::to_vec(&records).expect("records serialise"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use worker::{TracedOutput, TracedVertex};

    fn vertex(key: &str, alias: Option<&str>, inputs: Vec<(usize, usize)>) -> TracedVertex {
        TracedVertex {
            digest: format!("sha256:op-{key}"),
            key: key.into(),
            alias: alias.map(str::to_string),
            inputs,
            outputs: vec![TracedOutput {
                key: format!("{key}@0"),
                result: None,
            }],
            ignore_cache: false,
            stock: None,
        }
    }

    /// A content-keyed step's alias is recorded as a record of its own, linked from a record
    /// named by the step's key with the alias selector; the importer reads it back as alias →
    /// key, through the JSON the config is written as. Steps that ignore the cache give none.
    #[tokio::test]
    async fn aliases_are_recorded_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobCache::open(dir.path()).unwrap();
        let mut ignored = vertex("k2", Some("a2"), vec![(0, 0)]);
        ignored.ignore_cache = true;
        let trace = SolveTrace {
            vertices: vec![
                Some(vertex("k0", None, vec![])),
                Some(vertex("k1", Some("a1"), vec![(0, 0)])),
                Some(ignored),
            ],
            target: Some((1, 0)),
        };
        let quiet: ExportProgress = Arc::new(|_: &str, _: bool| {});
        let built = build(
            &trace,
            Mode::Min,
            CompressionOpts {
                compression: registry::Compression::Gzip,
                level: None,
                force: false,
            },
            true,
            &blobs,
            &quiet,
        )
        .await
        .unwrap();
        let digests: Vec<&str> = built
            .config
            .records
            .iter()
            .map(|r| r.digest.as_str())
            .collect();
        assert_eq!(digests, ["k0@0", "k1@0", "a1", "k1"]);
        assert_eq!(
            built.config.records[3].inputs,
            vec![vec![CacheInput {
                selector: ALIAS_SELECTOR.into(),
                link_index: 2,
            }]]
        );
        // The step's own record still links to its input's record.
        assert_eq!(built.config.records[1].inputs[0][0].link_index, 0);
        let back: CacheConfig = serde_json::from_slice(&built.config_bytes()).unwrap();
        assert_eq!(
            crate::import::aliases(&back),
            HashMap::from([("a1".to_string(), "k1".to_string())])
        );
    }

    /// Stock records: a source, a step reading it, and a copy linking its second input to a
    /// content record; each stock record links to its input's stock record with the op's
    /// selector, a step whose input has no stock record gets none, and records shared by two
    /// outputs are written once.
    #[tokio::test]
    async fn stock_records_are_linked_like_stock() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobCache::open(dir.path()).unwrap();
        let stock = |records: &[&str], inputs: Vec<worker::StockLink>| {
            Some(worker::StockVertex {
                records: records.iter().map(|r| r.to_string()).collect(),
                inputs,
            })
        };
        let mut src = vertex("k0", None, vec![]);
        src.stock = stock(&["s0"], vec![]);
        let mut run = vertex("k1", None, vec![(0, 0)]);
        run.stock = stock(&["s1"], vec![worker::StockLink::Input("sel".into())]);
        // A local source: no stock record.
        let local = vertex("k2", None, vec![]);
        let mut copy = vertex("k3", None, vec![(1, 0), (2, 0)]);
        copy.stock = stock(
            &["s3"],
            vec![
                worker::StockLink::Input(String::new()),
                worker::StockLink::Content("c".into()),
            ],
        );
        // Reads the local source through a link: no stock record.
        let mut orphan = vertex("k4", None, vec![(2, 0)]);
        orphan.stock = stock(&["s4"], vec![worker::StockLink::Input(String::new())]);
        // The same op again (same stock record and links): written once.
        let mut again = vertex("k5", None, vec![(0, 0)]);
        again.stock = stock(&["s1"], vec![worker::StockLink::Input("sel".into())]);
        let trace = SolveTrace {
            vertices: vec![
                Some(src),
                Some(run),
                Some(local),
                Some(copy),
                Some(orphan),
                Some(again),
            ],
            target: Some((3, 0)),
        };
        let quiet: ExportProgress = Arc::new(|_: &str, _: bool| {});
        let built = build(
            &trace,
            Mode::Max,
            CompressionOpts {
                compression: registry::Compression::Gzip,
                level: None,
                force: false,
            },
            true,
            &blobs,
            &quiet,
        )
        .await
        .unwrap();
        let recs = &built.config.records;
        let find = |d: &str| -> Vec<usize> {
            recs.iter()
                .enumerate()
                .filter(|(_, r)| r.digest == d)
                .map(|(i, _)| i)
                .collect()
        };
        let link = |i: usize, slot: usize| -> (&str, &str) {
            let l = &recs[i].inputs[slot][0];
            (
                l.selector.as_str(),
                recs[l.link_index as usize].digest.as_str(),
            )
        };
        let [s0] = find("s0")[..] else {
            panic!("{recs:?}")
        };
        assert!(recs[s0].inputs.is_empty());
        let [s1] = find("s1")[..] else {
            panic!("{recs:?}")
        };
        assert_eq!(link(s1, 0), ("sel", "s0"));
        let [s3] = find("s3")[..] else {
            panic!("{recs:?}")
        };
        assert_eq!(link(s3, 0), ("", "s1"));
        assert_eq!(link(s3, 1), ("", "c"));
        let [c] = find("c")[..] else {
            panic!("{recs:?}")
        };
        assert!(recs[c].inputs.is_empty());
        assert!(find("s4").is_empty(), "{recs:?}");
        // berth's own records are all there.
        for k in ["k0@0", "k1@0", "k2@0", "k3@0", "k4@0", "k5@0"] {
            assert_eq!(find(k).len(), 1, "{k}: {recs:?}");
        }
    }
}
