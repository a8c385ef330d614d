//! SBOM attestations of the Dockerfile frontend (`attest:sbom` /
//! `build-arg:BUILDKIT_ATTEST_SBOM`), as v0.11.6's builtin frontend makes them
//! (`frontend/attestations`, `frontend/attestations/sbom`):
//!
//! - [`requested`] reads the `attest:*` options: each a CSV of `key=value`; `sbom`'s
//!   `generator` (default `docker/buildkit-syft-scanner:stable-1`) names the scanner image;
//!   an attestation type other than `sbom` and `provenance` is an error;
//! - [`Scanner::new`] resolves the scanner image's config: its entrypoint + cmd run (none is an
//!   error), with its env and working directory;
//! - [`Scanner::definition`] runs it per platform with the final stage read-only at
//!   `/run/src/core/sbom` (`BUILDKIT_SCAN_SOURCE`), each extra target ([`SbomTargets`]) at
//!   `/run/src/extras/sbom-NAME` (`BUILDKIT_SCAN_SOURCE_EXTRAS`, only when there are extras),
//!   a tmpfs at `/tmp` and an empty `/run/out/` (`BUILDKIT_SCAN_DESTINATION`) whose content is
//!   a bundle attestation (SPDX, `reason=sbom`, `sbom-core=sbom`) of that platform.

use std::collections::BTreeMap;

use super::convert::{normalize_image_name, SbomTargets};
use super::{invalid, Attestation, AttestationKind, Bridge, Error, Platform};

const DEFAULT_GENERATOR: &str = "docker/buildkit-syft-scanner:stable-1";
/// The in-toto predicate type of an SPDX document.
pub const PREDICATE_SPDX: &str = "https://spdx.dev/Document";
const CORE: &str = "sbom";
const SRC: &str = "/run/src/";
const OUT: &str = "/run/out/";

/// The attestations the options ask for, by type (`sbom`, `provenance`), with their attributes
/// (`attestations.Parse`).
pub fn requested(
    opts: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, BTreeMap<String, String>>, Error> {
    let mut attests = BTreeMap::new();
    for (k, v) in opts {
        let key = k
            .strip_prefix("attest:")
            .or_else(|| k.strip_prefix("build-arg:BUILDKIT_ATTEST_"));
        if let Some(key) = key {
            attests.insert(key.to_lowercase(), v.clone());
        }
    }
    let mut out = BTreeMap::new();
    for (k, v) in attests {
        if k != "sbom" && k != "provenance" {
            return Err(invalid(format!("unknown attestation type {k:?}")));
        }
        let mut attrs = BTreeMap::new();
        if k == "sbom" {
            attrs.insert("generator".to_string(), DEFAULT_GENERATOR.to_string());
        }
        for field in csv_fields(&v).map_err(|e| invalid(format!("failed to parse {k}: {e}")))? {
            let (fk, fv) = field.split_once('=').unwrap_or((field.as_str(), ""));
            attrs.insert(fk.to_string(), fv.to_string());
        }
        out.insert(k, attrs);
    }
    Ok(out)
}

/// The fields of one CSV record (Go's `encoding/csv`: `"…"` quotes a field, `""` inside is a
/// quote); an empty value has none.
fn csv_fields(v: &str) -> Result<Vec<String>, String> {
    if v.is_empty() {
        return Ok(vec![]);
    }
    let mut fields = vec![];
    let mut chars = v.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("extraneous or missing \" in quoted-field".into()),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => {}
                Some(_) => return Err("extraneous or missing \" in quoted-field".into()),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => return Err("bare \" in non-quoted-field".into()),
                    Some(c) => field.push(c),
                }
            }
        }
        fields.push(field);
    }
}

/// A resolved scanner image (`CreateSBOMScanner`).
#[derive(Debug, Clone)]
pub struct Scanner {
    image: String,
    args: Vec<String>,
    env: Vec<String>,
    dir: String,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ScannerImage {
    #[serde(default)]
    config: ScannerConfig,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ScannerConfig {
    #[serde(default, rename = "Entrypoint")]
    entrypoint: Option<Vec<String>>,
    #[serde(default, rename = "Cmd")]
    cmd: Option<Vec<String>>,
    #[serde(default, rename = "Env")]
    env: Option<Vec<String>>,
    #[serde(default, rename = "WorkingDir")]
    working_dir: String,
}

impl Scanner {
    /// The scanner `generator` names, its config resolved through `bridge` for `platform`.
    pub async fn new<B: Bridge>(
        bridge: &B,
        generator: &str,
        platform: &Platform,
    ) -> Result<Scanner, Error> {
        let image = normalize_image_name(generator)
            .map_err(|e| invalid(format!("failed to parse sbom scanner {generator}: {e}")))?;
        let (_, config) = bridge
            .resolve_image_config(
                &image,
                platform,
                "",
                &format!("resolve image config for {image}"),
            )
            .await
            .map_err(|e| Error::bridge("", e))?;
        let img: ScannerImage = serde_json::from_slice(&config)
            .map_err(|e| invalid(format!("scanner {image}: image config: {e}")))?;
        let cfg = img.config;
        let mut args = cfg.entrypoint.unwrap_or_default();
        args.extend(cfg.cmd.unwrap_or_default());
        if args.is_empty() {
            return Err(invalid(format!("scanner {image} does not have cmd")));
        }
        Ok(Scanner {
            image,
            args,
            env: cfg.env.unwrap_or_default(),
            dir: cfg.working_dir,
        })
    }

    /// The definition whose result is the SBOM bundle of platform `id`: the scanner run over
    /// `core` and `targets.extras`.
    pub fn definition(
        &self,
        id: &str,
        core: &llb::State,
        targets: &SbomTargets,
    ) -> Result<llb::pb::Definition, Error> {
        let mut st = llb::image(&self.image).state();
        let mut env = self.env.clone();
        env.push(format!("BUILDKIT_SCAN_DESTINATION={OUT}"));
        env.push(format!("BUILDKIT_SCAN_SOURCE={SRC}core/{CORE}"));
        if !targets.extras.is_empty() {
            env.push(format!("BUILDKIT_SCAN_SOURCE_EXTRAS={SRC}extras"));
        }
        if !self.dir.is_empty() {
            st = st.dir(self.dir.clone());
        }
        for e in &env {
            let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
            st = st.env(k, v);
        }
        let mut run = llb::RunOpts::args(self.args.clone())
            .mount(llb::Mount::tmpfs("/tmp", 0))
            .mount(llb::Mount::bind(format!("{SRC}core/{CORE}"), core).readonly());
        for (name, extra) in &targets.extras {
            run =
                run.mount(llb::Mount::bind(format!("{SRC}extras/{CORE}-{name}"), extra).readonly());
        }
        run = run.mount(llb::Mount::bind(OUT, &llb::scratch()));
        let out = st
            .run(run)
            .get_mount(OUT)
            .ok_or_else(|| invalid("sbom scanner: no output mount"))?
            .custom_name(format!("[{id}] generating sbom using {}", self.image));
        let out = if targets.ignore_cache {
            out.ignore_cache()
        } else {
            out
        };
        out.marshal()
            .map_err(|e| invalid(format!("failed to marshal sbom scan: {e}")))
    }
}

/// The attestation of a scan result (`r`: the solved definition of [`Scanner::definition`]).
pub fn attestation<R>(r: Option<R>) -> Attestation<R> {
    Attestation {
        kind: AttestationKind::Bundle,
        r#ref: r,
        path: String::new(),
        metadata: BTreeMap::from([
            ("reason".to_string(), b"sbom".to_vec()),
            ("sbom-core".to_string(), CORE.as_bytes().to_vec()),
        ]),
        predicate_type: PREDICATE_SPDX.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::convert::{dockerfile_to_llb, ConvertOpt, MetaResolver};
    use super::*;

    /// Resolves nothing: the Dockerfiles here use `scratch` only.
    struct NoImages;

    impl MetaResolver for NoImages {
        async fn resolve_image_config(
            &self,
            reference: &str,
            _: &Platform,
            _: &str,
            _: &str,
        ) -> Result<(String, Vec<u8>), Error> {
            Err(invalid(format!("{reference}: no images here")))
        }

        async fn context_by_name(
            &self,
            _: &str,
            _: &str,
            _: &Platform,
        ) -> Result<Option<super::super::named::NamedContext>, Error> {
            Ok(None)
        }
    }

    fn extras(df: &str, build_args: &[(&str, &str)]) -> Vec<String> {
        let opt = ConvertOpt {
            build_args: build_args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let f = dockerfile_to_llb(df.as_bytes(), &opt, &NoImages);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        let std::task::Poll::Ready(c) = std::future::Future::poll(f.as_mut(), &mut cx) else {
            panic!("pending");
        };
        c.unwrap().sbom.extras.into_keys().collect()
    }

    #[test]
    fn scan_targets_follow_the_args() {
        let df = "ARG BUILDKIT_SBOM_SCAN_CONTEXT=true\n\
                  FROM scratch AS file\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY a /file\n\
                  FROM scratch AS base\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nCOPY --from=file /file /foo\n\
                  FROM scratch AS unused\nARG BUILDKIT_SBOM_SCAN_STAGE=true\nRUN x\n\
                  FROM base\nARG BUILDKIT_SBOM_SCAN_STAGE=true\n";
        assert_eq!(extras(df, &[]), ["base", "context", "file"]);
        let off = [
            ("BUILDKIT_SBOM_SCAN_STAGE", "false"),
            ("BUILDKIT_SBOM_SCAN_CONTEXT", "false"),
        ];
        assert!(extras(df, &off).is_empty());
        let plain = "FROM scratch AS base\nCOPY a /foo\nFROM base AS other\nFROM other\n";
        let on = [
            ("BUILDKIT_SBOM_SCAN_STAGE", "true"),
            ("BUILDKIT_SBOM_SCAN_CONTEXT", "true"),
        ];
        assert!(extras(plain, &on).is_empty());
        let list = format!("ARG BUILDKIT_SBOM_SCAN_STAGE=base\n{plain}");
        assert_eq!(extras(&list, &[]), ["base"]);
    }

    #[test]
    fn requested_parses_as_upstream() {
        let opts = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let r = requested(&opts(&[("attest:sbom", "")])).unwrap();
        assert_eq!(r["sbom"]["generator"], DEFAULT_GENERATOR);
        let r = requested(&opts(&[(
            "build-arg:BUILDKIT_ATTEST_SBOM",
            "\"generator=localhost:5000/s:1\",x=y",
        )]))
        .unwrap();
        assert_eq!(r["sbom"]["generator"], "localhost:5000/s:1");
        assert_eq!(r["sbom"]["x"], "y");
        let r = requested(&opts(&[("attest:provenance", "mode=max")])).unwrap();
        assert!(!r.contains_key("sbom"));
        assert!(requested(&opts(&[("attest:foo", "")]))
            .unwrap_err()
            .to_string()
            .contains("unknown attestation type \"foo\""));
        assert!(requested(&opts(&[("attest:sbom", "generator=a\"b")])).is_err());
    }
}
