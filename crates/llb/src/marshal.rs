//! Serialization of a graph into a `pb.Definition` (Go: `State.Marshal`).
//!
//! Ops are emitted inputs-first (depth-first, in input order), each once; the terminal op
//! (`inputs = [result]`, no payload) comes last. Every op gets a metadata entry with its caps;
//! the terminal's caps are `constraints` and `platform` plus `meta.ignorecache`,
//! `meta.description` and `meta.exportcache` when any op uses them.

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message;
use sha2::{Digest, Sha256};

use crate::{pb, Node, Output, Result, State};

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

struct Marshaller {
    def: pb::Definition,
    /// Node pointer → digest.
    done: HashMap<*const Node, String>,
    /// Source maps already in `def.source.infos`, by pointer.
    infos: Vec<*const crate::SourceMap>,
}

impl Marshaller {
    fn visit(&mut self, node: &Arc<Node>) -> Result<String> {
        let key = Arc::as_ptr(node);
        if let Some(d) = self.done.get(&key) {
            return Ok(d.clone());
        }
        let mut inputs = Vec::with_capacity(node.inputs.len());
        for inp in &node.inputs {
            let d = self.visit(&inp.node)?;
            inputs.push(pb::Input {
                digest: d,
                index: inp.index,
            });
        }
        let mut op = node.op.clone();
        op.inputs = inputs;
        let bytes = op.encode_to_vec();
        let dgst = digest(&bytes);
        if !self.def.metadata.contains_key(&dgst) {
            self.def.def.push(bytes.into());
        }
        let m = &node.meta;
        let entry = self.def.metadata.entry(dgst.clone()).or_default();
        entry.ignore_cache |= m.ignore_cache;
        for (k, v) in &m.description {
            entry.description.insert(k.clone(), v.clone());
        }
        for c in &m.caps {
            entry.caps.insert(c.clone(), true);
        }
        if m.progress_group.is_some() {
            entry.progress_group = m.progress_group.clone();
        }
        for (sm, ranges) in &m.locations {
            let ptr = Arc::as_ptr(sm);
            let index = match self.infos.iter().position(|p| *p == ptr) {
                Some(i) => i,
                None => {
                    self.infos.push(ptr);
                    let src = self.def.source.get_or_insert_with(Default::default);
                    src.infos.push(pb::SourceInfo {
                        filename: sm.filename.clone(),
                        data: sm.data.clone().into(),
                        definition: sm.definition.clone(),
                        language: sm.language.clone(),
                    });
                    self.infos.len() - 1
                }
            };
            let src = self.def.source.get_or_insert_with(Default::default);
            let locs = src.locations.entry(dgst.clone()).or_default();
            let loc = pb::Location {
                source_index: index as i32,
                ranges: ranges.clone(),
            };
            if !locs.locations.contains(&loc) {
                locs.locations.push(loc);
            }
        }
        self.done.insert(key, dgst.clone());
        Ok(dgst)
    }
}

pub(crate) fn marshal(state: &State) -> Result<pb::Definition> {
    let Some(out) = &state.output else {
        return Ok(pb::Definition::default());
    };
    let mut m = Marshaller {
        def: pb::Definition::default(),
        done: HashMap::new(),
        infos: Vec::new(),
    };
    let head = m.visit(&out.node)?;
    let terminal = pb::Op {
        inputs: vec![pb::Input {
            digest: head,
            index: out.index,
        }],
        ..Default::default()
    };
    let bytes = terminal.encode_to_vec();
    let tdgst = digest(&bytes);
    let mut caps = std::collections::BTreeMap::new();
    caps.insert("constraints".to_string(), true);
    caps.insert("platform".to_string(), true);
    for md in m.def.metadata.values() {
        if md.ignore_cache {
            caps.insert("meta.ignorecache".into(), true);
        }
        if !md.description.is_empty() {
            caps.insert("meta.description".into(), true);
        }
        if md.export_cache.is_some() {
            caps.insert("meta.exportcache".into(), true);
        }
    }
    m.def.def.push(bytes.into());
    m.def.metadata.entry(tdgst).or_default().caps.extend(caps);
    Ok(m.def)
}

/// Helper for builders: a new state whose output is `index` of a node.
pub(crate) fn node_state(base: &State, node: Node, index: i64) -> State {
    let mut st = base.clone();
    st.output = Some(Output {
        node: Arc::new(node),
        index,
    });
    st
}
