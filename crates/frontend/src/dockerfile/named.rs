//! Named contexts (`context:NAME=…` options, `dockerfile/builder/build.go`'s `contextByName` at
//! v0.11.6): a stage name, a `FROM` image or a `COPY --from`/`--mount from=` name that the
//! client mapped to another image (`docker-image://`), an image of an OCI layout the client
//! serves (`oci-layout://STORE@sha256:…`), a client directory (`local:`), a frontend input
//! (`input:`) or nothing (`docker-image://scratch`).

use super::image::Image;
use super::support::Platform;
use super::{invalid, Bridge, Error, SolveRequest};

/// A state a name resolved to, with its image config when it is an image.
pub struct NamedContext {
    /// The state.
    pub state: llb::State,
    /// The image config (image contexts only).
    pub image: Option<Image>,
}

/// Go `reference.FamiliarString` of a normalized name without `:latest`.
pub(crate) fn familiar(name: &str) -> Result<String, Error> {
    if name.is_empty()
        || name
            .chars()
            .any(|c| c.is_ascii_uppercase() || c.is_whitespace())
    {
        return Err(invalid(format!("invalid context name {name}")));
    }
    let full = llb::normalize_ref(name);
    let short = full
        .strip_prefix("docker.io/library/")
        .filter(|r| !r.contains('/'))
        .or_else(|| full.strip_prefix("docker.io/"))
        .unwrap_or(&full);
    Ok(short.strip_suffix(":latest").unwrap_or(short).to_string())
}

/// `State.WithImageConfig`: the config's env, working directory and platform.
pub(crate) fn with_image_config(mut st: llb::State, img: &Image) -> llb::State {
    for e in &img.config.env {
        let (k, v) = e.split_once('=').unwrap_or((e.as_str(), ""));
        if !k.is_empty() {
            st = st.env(k, v);
        }
    }
    if !img.config.working_dir.is_empty() {
        st = st.dir(img.config.working_dir.clone());
    }
    if !img.architecture.is_empty() && !img.os.is_empty() {
        st = st.with_platform(llb::Platform {
            os: img.os.clone(),
            architecture: img.architecture.clone(),
            variant: img.variant.clone(),
        });
    }
    st
}

/// What `name` (a stage name or a normalized image name) is mapped to for `platform`, if the
/// client mapped it.
pub(crate) async fn context_by_name<B: Bridge>(
    b: &B,
    name: &str,
    resolve_mode: &str,
    platform: &Platform,
) -> Result<Option<NamedContext>, Error> {
    if name.eq_ignore_ascii_case("scratch") || name.eq_ignore_ascii_case("context") {
        return Ok(None);
    }
    let name = familiar(name)?;
    let pname = format!("{name}::{}", platform.format());
    if let Some(c) = by_key(b, &name, &pname, resolve_mode, platform).await? {
        return Ok(Some(c));
    }
    by_key(b, &name, &name, resolve_mode, platform).await
}

async fn by_key<B: Bridge>(
    b: &B,
    name: &str,
    pname: &str,
    resolve_mode: &str,
    platform: &Platform,
) -> Result<Option<NamedContext>, Error> {
    let bo = b.build_opts();
    let Some(v) = bo.opts.get(&format!("context:{pname}")) else {
        return Ok(None);
    };
    let Some((kind, rest)) = v.split_once(':') else {
        return Err(invalid(format!(
            "invalid context specifier {v} for {pname}"
        )));
    };
    let kind = if kind.starts_with("git@") {
        "git"
    } else {
        kind
    };
    match kind {
        "docker-image" => {
            let reference = rest.strip_prefix("//").unwrap_or(rest);
            if reference == "scratch" {
                return Ok(Some(NamedContext {
                    state: llb::scratch(),
                    image: None,
                }));
            }
            let named = llb::normalize_ref(reference);
            let log_name = format!("[context {pname}] load metadata for {reference}");
            let (_, config) = b
                .resolve_image_config(&named, platform, resolve_mode, &log_name)
                .await
                .map_err(|e| Error::bridge("", e))?;
            let mut img: Image = serde_json::from_slice(&config).map_err(|e| {
                invalid(format!("failed to parse image config of {reference}: {e}"))
            })?;
            img.created = None;
            let st = llb::image(reference)
                .platform(platform.to_llb())
                .state()
                .custom_name(format!("[context {pname}] {reference}"));
            Ok(Some(NamedContext {
                state: with_image_config(st, &img),
                image: Some(img),
            }))
        }
        "local" => {
            let probe = llb::local(rest)
                .session_id(bo.session_id.clone())
                .follow_paths([".dockerignore"])
                .shared_key_hint(format!("context:{pname}-.dockerignore"))
                .differ("none", false)
                .state()
                .custom_name(format!("[context {pname}] load .dockerignore"));
            let def = probe
                .marshal()
                .map_err(|e| invalid(format!("failed to marshal local source: {e}")))?;
            let res = b
                .solve(SolveRequest {
                    definition: Some(def),
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::bridge("", e))?;
            let mut excludes = vec![];
            if let Some(r) = res.r#ref {
                if let Ok(dt) = b.read_file(&r, ".dockerignore").await {
                    excludes = super::support::read_dockerignore(&dt);
                }
            }
            let st = llb::local(rest)
                .session_id(bo.session_id.clone())
                .shared_key_hint(format!("context:{pname}"))
                .exclude(excludes)
                .state()
                .custom_name(format!("[context {pname}] load from client"));
            Ok(Some(NamedContext {
                state: st,
                image: None,
            }))
        }
        "input" => {
            let def = bo
                .inputs
                .get(rest)
                .ok_or_else(|| invalid(format!("invalid input {rest} for {pname}")))?;
            let mut st = llb::State::from_definition(def).map_err(|e| invalid(e.to_string()))?;
            let Some(md) = bo.opts.get(&format!("input-metadata:{rest}")) else {
                return Ok(Some(NamedContext {
                    state: st,
                    image: None,
                }));
            };
            let m: std::collections::BTreeMap<String, String> = serde_json::from_str(md)
                .map_err(|e| invalid(format!("failed to parse input metadata {md}: {e}")))?;
            let mut image = None;
            if let Some(c) = m.get("containerimage.config") {
                use base64::Engine as _;
                let dt = base64::engine::general_purpose::STANDARD
                    .decode(c)
                    .map_err(|e| invalid(format!("failed to parse input metadata {md}: {e}")))?;
                let img: Image = serde_json::from_slice(&dt).map_err(|e| {
                    invalid(format!("failed to parse image config for {pname}: {e}"))
                })?;
                st = with_image_config(st, &img);
                image = Some(img);
            }
            Ok(Some(NamedContext { state: st, image }))
        }
        "oci-layout" => oci_layout(b, name, pname, rest, platform).await.map(Some),
        "git" | "http" | "https" => Err(invalid(format!(
            "{kind} named contexts ({name}={v}) are not supported by berthd yet"
        ))),
        _ => Err(invalid(format!(
            "unsupported context source {kind} for {pname}"
        ))),
    }
}

/// `context:NAME=oci-layout://STORE@sha256:…`: the image `sha256:…` of the OCI layout the
/// client serves as content store `oci:STORE`, named `NAME@sha256:…` in progress and errors.
async fn oci_layout<B: Bridge>(
    b: &B,
    name: &str,
    pname: &str,
    rest: &str,
    platform: &Platform,
) -> Result<NamedContext, Error> {
    let spec = rest.strip_prefix("//").unwrap_or(rest);
    let Some((store, digest)) = spec.split_once('@') else {
        return Err(invalid(format!(
            "oci-layout reference {spec:?} has no digest"
        )));
    };
    let store = store.split(':').next().unwrap_or_default();
    if store.is_empty()
        || store
            .chars()
            .any(|c| c.is_ascii_uppercase() || c.is_whitespace() || c.is_control())
    {
        return Err(invalid(format!(
            "could not parse oci-layout reference {spec:?}: invalid store name"
        )));
    }
    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() != 64 || !hex.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(invalid(format!(
            "could not parse oci-layout reference {spec:?}: invalid digest {digest:?}"
        )));
    }
    // The name shown for the image: the context's name with the layout's digest.
    let dummy = llb::normalize_ref(&format!("{name}@{digest}"));
    let bo = b.build_opts();
    let log_name = format!("[context {pname}] load metadata for {dummy}");
    let (_, config) = b
        .resolve_oci_layout_config(&dummy, platform, &bo.session_id, store, &log_name)
        .await
        .map_err(|e| Error::bridge("", e))?;
    let img: Image = serde_json::from_slice(&config)
        .map_err(|e| invalid(format!("could not parse oci-layout image config: {e}")))?;
    let st = llb::oci_layout(dummy)
        .store(bo.session_id.clone(), store)
        .platform(platform.to_llb())
        .state()
        .custom_name(format!("[context {pname}] OCI load from client"));
    Ok(NamedContext {
        state: with_image_config(st, &img),
        image: Some(img),
    })
}
