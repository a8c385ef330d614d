//! `moby.buildkit.v1.frontend.LLBBridge` on the main listener, keyed by the
//! `buildkit-controlapi-buildid` metadata (`control-api.md` §6–7).
//!
//! The same service, bound to one build with [`FrontendScope`], is what a `gateway.v0` frontend
//! container talks to over its stdio ([`crate::frontends`]): there every call is for that build,
//! `Return` hands the result to the frontend's runner instead of `Control.Solve`, and `Inputs`
//! answers the frontend's inputs.
//!
//! `buildctl build` drives every build through here: `Ping` (caps), `Solve` (definition or
//! frontend), `Return` (hands the result to the waiting `Control.Solve`). File access calls
//! (`ReadFile`, `ReadDir`, `StatFile`) read gateway refs inside their root. Containers
//! (`NewContainer`, `ReleaseContainer`, `ExecProcess`) are adapted in [`crate::containers`]. Calls berth does not
//! implement answer `UNIMPLEMENTED` naming the call.

use crate::caps;
use crate::errors::{Error, Result};
use crate::jobs::{BuildResult, Job, Jobs};
use crate::solver::{Backend, SolveCtx};
use protos::moby::buildkit::v1::frontend as gw;
use protos::moby::buildkit::v1::types::WorkerRecord;
use protos::pb;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// Metadata key naming the build of an LLBBridge call.
pub const BUILDID_KEY: &str = "buildkit-controlapi-buildid";
/// How long gateway calls wait for the build to be registered.
pub const JOB_WAIT: Duration = Duration::from_secs(3);

/// The build a frontend container's LLBBridge serves, and where its `Return` goes.
pub struct FrontendScope {
    /// The build.
    pub job: Arc<Job>,
    /// The frontend's inputs (`LLBBridge.Inputs`).
    pub inputs: BTreeMap<String, pb::Definition>,
    /// What the frontend returned (`None` until `Return`).
    pub returned: Mutex<Option<Result<BuildResult>>>,
}

/// The LLBBridge service.
pub struct Gateway {
    /// `Some` for a frontend container's own connection (see the module docs).
    pub scope: Option<Arc<FrontendScope>>,
    /// Jobs.
    pub jobs: Arc<Jobs>,
    /// Solve backend.
    pub backend: Arc<Backend>,
    /// Worker record for `Ping`.
    pub worker: WorkerRecord,
    /// Docker access for image config resolution.
    pub docker: Arc<crate::docker::Docker>,
}

impl Gateway {
    async fn job<T>(&self, req: &Request<T>) -> Result<Arc<Job>> {
        if let Some(scope) = &self.scope {
            return Ok(scope.job.clone());
        }
        let id = req
            .metadata()
            .get(BUILDID_KEY)
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::invalid("no buildid found in context"))?;
        self.jobs.get(id, JOB_WAIT).await
    }

    async fn active_job<T>(&self, req: &Request<T>) -> Result<Arc<Job>> {
        let job = self.job(req).await?;
        if job.ended.is_cancelled() {
            return Err(Error::invalid(format!(
                "build {} has already finished",
                job.id
            )));
        }
        Ok(job)
    }

    async fn solve_inner(&self, req: Request<gw::SolveRequest>) -> Result<gw::SolveResponse> {
        let job = self.active_job(&req).await?;
        let r = req.into_inner();
        if r.definition.as_ref().is_some_and(|d| !d.def.is_empty()) && !r.frontend.is_empty() {
            return Err(Error::invalid(
                "solve request has both a definition and a frontend",
            ));
        }
        if !r.frontend.is_empty() {
            let fe = crate::frontends::Frontends {
                backend: self.backend.clone(),
                docker: self.docker.clone(),
                worker: self.worker.clone(),
            };
            let res = crate::frontends::solve(
                &fe,
                &job,
                &r.frontend,
                r.frontend_opt.clone(),
                r.frontend_inputs.clone(),
            )
            .await?;
            if !res.refs.is_empty() {
                // A multi-platform result (e.g. dockerfile.v0 with several platforms): a ref map.
                let ids: BTreeMap<String, String> = res
                    .refs
                    .into_iter()
                    .map(|(k, fs)| (k, job.add_ref(fs)))
                    .collect();
                for (k, id) in &ids {
                    if let (Some(c), Some(d)) = (res.provenance.get(k), res.defs.get(k)) {
                        job.set_ref_provenance(id, c.clone(), d.clone());
                    }
                }
                #[allow(deprecated)]
                return Ok(gw::SolveResponse {
                    r#ref: String::new(),
                    result: Some(gw::Result {
                        result: Some(if r.allow_result_return || r.allow_result_array_ref {
                            gw::result::Result::Refs(gw::RefMap {
                                refs: ids
                                    .into_iter()
                                    .map(|(k, id)| {
                                        let def = res.defs.get(&k).cloned().map(output_definition);
                                        (k, gw::Ref { id, def })
                                    })
                                    .collect(),
                            })
                        } else {
                            gw::result::Result::RefsDeprecated(gw::RefMapDeprecated { refs: ids })
                        }),
                        metadata: res.metadata,
                        attestations: crate::attestations::to_wire(&job, &res.attestations),
                    }),
                });
            }
            let id = job.add_ref(res.fs.unwrap_or(crate::solver::FsRef::Scratch));
            if let (Some(c), Some(d)) = (res.provenance.get(""), res.defs.get("")) {
                job.set_ref_provenance(&id, c.clone(), d.clone());
            }
            let def = res.defs.get("").cloned().map(output_definition);
            #[allow(deprecated)]
            return Ok(gw::SolveResponse {
                r#ref: id.clone(),
                result: Some(gw::Result {
                    result: Some(if r.allow_result_return || r.allow_result_array_ref {
                        gw::result::Result::Ref(gw::Ref { id, def })
                    } else {
                        gw::result::Result::RefDeprecated(id)
                    }),
                    metadata: res.metadata,
                    attestations: crate::attestations::to_wire(&job, &res.attestations),
                }),
            });
        }
        let mut cache_imports = job.cache_imports.lock().unwrap().clone();
        if !r.cache_imports.is_empty() {
            let entries: Vec<_> = r
                .cache_imports
                .iter()
                .map(|e| {
                    let attrs = e
                        .attrs
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    (e.r#type.clone(), attrs)
                })
                .collect();
            cache_imports.extend(
                crate::cache::resolve_imports(
                    &self.backend,
                    &self.backend.sessions,
                    &job.session_id,
                    &entries,
                )
                .await,
            );
        }
        let ctx = SolveCtx {
            job_id: job.id.clone(),
            session_id: job.session_id.clone(),
            progress: job.progress.clone(),
            cancel: job.cancel.clone(),
            entitlements: job.entitlements.clone(),
            cache_imports,
            cache_export: job.cache_export.load(std::sync::atomic::Ordering::Relaxed),
        };
        let def = r.definition.clone();
        // Without `Evaluate` nothing runs yet: the ref is solved when it is first used (a file
        // call, a container mount, `Return`), so a ref that is never used never runs.
        // Neither waits for the base images' pins: a file call or a container on the ref waits
        // for them (`worker::SolvedRef::wait_for_pins`), and so does an export that reads the
        // result's files (`Control.Solve`).
        let id = if r.evaluate {
            let fs = match self.backend.solve_unread(def, &ctx).await {
                Err(_) if job.cancel.is_cancelled() => return Err(job.cancel_error()),
                Err(e) => {
                    return Err(
                        job.solve_error(r.definition.as_ref().unwrap_or(&Default::default()), e)
                    )
                }
                Ok(fs) => fs,
            };
            job.add_ref(fs)
        } else {
            job.add_lazy_ref(def, ctx)
        };
        let def = r.definition.map(output_definition);
        let result = if r.allow_result_return || r.allow_result_array_ref {
            gw::Result {
                result: Some(gw::result::Result::Ref(gw::Ref {
                    id: id.clone(),
                    def,
                })),
                ..Default::default()
            }
        } else {
            gw::Result {
                result: Some(gw::result::Result::RefDeprecated(id.clone())),
                ..Default::default()
            }
        };
        #[allow(deprecated)]
        Ok(gw::SolveResponse {
            r#ref: id,
            result: Some(result),
        })
    }

    async fn return_inner(&self, req: Request<gw::ReturnRequest>) -> Result<gw::ReturnResponse> {
        let job = self.active_job(&req).await?;
        let r = req.into_inner();
        let res = match r.error {
            Some(err) if err.code != 0 => Err(Error::from_rpc_status(&err)),
            // A result berth cannot take fails the build (the waiting Solve answers with it).
            _ => return_result(&self.backend, &job, r.result).await,
        };
        match &self.scope {
            Some(scope) => {
                let mut slot = scope.returned.lock().unwrap();
                if slot.is_some() {
                    return Err(Error::invalid("gateway return called twice"));
                }
                *slot = Some(res);
            }
            None => job.deliver(res)?,
        }
        Ok(gw::ReturnResponse {})
    }

    async fn view_for(&self, job: &Job, ref_id: &str) -> Result<crate::solver::FsView> {
        let fs = job.get_ref(&self.backend, ref_id).await?;
        self.backend.view(&fs).await
    }
}

/// A solved definition as `Solve` returns it with its ref (`reference.output`), for the client's
/// `Ref.ToState`. Source-map entries without locations are dropped: Go clients send one per op
/// even when empty, prost leaves an empty map value out when encoding, and Go decodes an entry
/// without value as a nil `*Locations` that `llb.NewDefinitionOp` dereferences. The same holds
/// for the definitions nested in the source infos (a source map made from an LLB state), which
/// `NewDefinitionOp` parses too, so they are cleaned the same way.
fn output_definition(mut def: pb::Definition) -> pb::Definition {
    if let Some(src) = def.source.as_mut() {
        src.locations.retain(|_, l| !l.locations.is_empty());
        for info in &mut src.infos {
            if let Some(nested) = info.definition.take() {
                info.definition = Some(output_definition(nested));
            }
        }
    }
    def
}

/// The build result of a `Return`'s result (its refs looked up in the job, and solved if they
/// were lazy).
async fn return_result(
    backend: &Arc<Backend>,
    job: &Job,
    result: Option<gw::Result>,
) -> Result<BuildResult> {
    let Some(res) = result else {
        return Ok(BuildResult {
            fs: None,
            refs: Default::default(),
            defs: Default::default(),
            metadata: Default::default(),
            attestations: Default::default(),
            provenance: Default::default(),
        });
    };
    let attestations = crate::attestations::from_wire(backend, job, res.attestations).await?;
    let mut refs = BTreeMap::new();
    let mut defs = BTreeMap::new();
    let mut provenance = BTreeMap::new();
    // The provenance of a ref a frontend berthd ran made (with its definition, if the client
    // did not send it back).
    let mut captured = |key: &str, id: &str, defs: &mut BTreeMap<String, pb::Definition>| {
        if let Some((c, d)) = job.ref_provenance(id) {
            provenance.insert(key.to_string(), c);
            defs.entry(key.to_string()).or_insert(d);
        }
    };
    let fs = match res.result {
        None => None,
        Some(gw::result::Result::RefDeprecated(id)) => {
            captured("", &id, &mut defs);
            Some(job.get_ref(backend, &id).await?)
        }
        Some(gw::result::Result::Ref(r)) => {
            if let Some(d) = r.def {
                defs.insert(String::new(), d);
            }
            captured("", &r.id, &mut defs);
            Some(job.get_ref(backend, &r.id).await?)
        }
        Some(gw::result::Result::RefsDeprecated(m)) => {
            for (k, id) in m.refs {
                captured(&k, &id, &mut defs);
                refs.insert(k, job.get_ref(backend, &id).await?);
            }
            None
        }
        Some(gw::result::Result::Refs(m)) => {
            for (k, r) in m.refs {
                if let Some(d) = r.def {
                    defs.insert(k.clone(), d);
                }
                captured(&k, &r.id, &mut defs);
                refs.insert(k, job.get_ref(backend, &r.id).await?);
            }
            None
        }
    };
    Ok(BuildResult {
        fs,
        refs,
        defs,
        metadata: res.metadata,
        attestations,
        provenance,
    })
}

impl Gateway {
    async fn resolve_config(
        &self,
        job: &Arc<Job>,
        r: &gw::ResolveImageConfigRequest,
    ) -> Result<(String, Vec<u8>)> {
        resolve_config(&self.backend, &self.docker, job, r).await
    }
}

/// `ResolveImageConfig`: the image in the bound Docker Engine (`ResolveMode` default or
/// `local`), else — or always with `pull` — from its registry through berth's client, with
/// the job's session credentials. Returns the digest the reference resolved to and the
/// config bytes. Also used by the built-in frontends.
pub(crate) async fn resolve_config(
    backend: &Arc<Backend>,
    docker: &crate::docker::Docker,
    job: &Arc<Job>,
    r: &gw::ResolveImageConfigRequest,
) -> Result<(String, Vec<u8>)> {
    if r.resolver_type == RESOLVER_TYPE_OCI_LAYOUT {
        return resolve_config_oci_layout(backend, job, r).await;
    }
    let mode = r.resolve_mode.as_str();
    let mut local_miss = None;
    if mode != "pull" {
        let platform = r
            .platform
            .as_ref()
            .map(|p| (p.os.clone(), p.architecture.clone(), p.variant.clone()));
        match docker.image_config(&r.r#ref, platform).await {
            Ok(v) => return Ok(v),
            Err(e @ Error::NotFound { .. }) if mode != "local" => {
                tracing::debug!(reference = %r.r#ref, error = %e, "image config not in Docker, resolving in the registry");
                local_miss = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    match resolve_config_remote(backend, job, r).await {
        Ok(v) => Ok(v),
        // Not in Docker and not reachable in a registry: say both, as "not found".
        Err(e) => match local_miss {
            Some(Error::NotFound { what }) => Err(Error::NotFound {
                what: format!("{what}; and from its registry: {e}"),
            }),
            _ => Err(e),
        },
    }
}

/// `ResolveImageConfigRequest.ResolverType` of an `oci-layout://` reference (Go
/// `llb.ResolverTypeOCILayout`): the image comes from the client's content store `StoreID`.
pub(crate) const RESOLVER_TYPE_OCI_LAYOUT: i32 = 1;

/// `ResolveImageConfig` of an image in an OCI layout the client serves (content store
/// `oci:<StoreID>` of session `SessionID`, else the job's): the digest is the reference's root
/// digest, the config that of the request's platform.
async fn resolve_config_oci_layout(
    backend: &Arc<Backend>,
    job: &Arc<Job>,
    r: &gw::ResolveImageConfigRequest,
) -> Result<(String, Vec<u8>)> {
    let reference = r.r#ref.strip_prefix("oci-layout://").unwrap_or(&r.r#ref);
    let oref = worker::OciLayoutRef::parse(reference, &r.store_id, Some(&r.session_id))?;
    let platform = r
        .platform
        .as_ref()
        .map(|p| registry::Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        })
        .unwrap_or_else(registry::Platform::native);
    let session =
        crate::session::provider::JobSession::new(backend.sessions.clone(), job.session_id.clone());
    let img = worker::resolve_oci_layout(&session, &oref, &platform).await?;
    Ok((oref.digest, img.config))
}

/// `ResolveImageConfig` from the reference's registry.
async fn resolve_config_remote(
    backend: &Arc<Backend>,
    job: &Arc<Job>,
    r: &gw::ResolveImageConfigRequest,
) -> Result<(String, Vec<u8>)> {
    let reference = registry::Reference::parse(&r.r#ref).map_err(Error::registry)?;
    let platform = r
        .platform
        .as_ref()
        .map(|p| registry::Platform {
            os: p.os.clone(),
            architecture: p.architecture.clone(),
            variant: p.variant.clone(),
        })
        .unwrap_or_else(registry::Platform::native);
    let session_id = if r.session_id.is_empty() {
        job.session_id.clone()
    } else {
        r.session_id.clone()
    };
    let auth = worker::RegistryAuth(Arc::new(crate::session::provider::JobSession::new(
        backend.sessions.clone(),
        session_id,
    )));
    let img = backend
        .registry
        .session(Arc::new(auth))
        .resolve_image(&reference, &platform)
        .await
        .map_err(Error::registry)?;
    Ok((img.digest, img.config.to_vec()))
}

fn unimplemented<T>(call: &str) -> std::result::Result<T, Status> {
    Err(Status::unimplemented(format!(
        "LLBBridge.{call} is not implemented by berthd"
    )))
}

#[tonic::async_trait]
impl gw::llb_bridge_server::LlbBridge for Gateway {
    async fn resolve_image_config(
        &self,
        request: Request<gw::ResolveImageConfigRequest>,
    ) -> std::result::Result<Response<gw::ResolveImageConfigResponse>, Status> {
        let job = self.job(&request).await?;
        let r = request.into_inner();
        let vertex = if r.log_name.is_empty() {
            None
        } else {
            let d = crate::progress::synthetic_digest(&format!(
                "resolve-image-config-{}-{}",
                job.id, r.r#ref
            ));
            job.progress
                .vertex_started(&d, &r.log_name, &[], None, std::time::SystemTime::now());
            Some(d)
        };
        let res = self.resolve_config(&job, &r).await;
        if let Some(d) = &vertex {
            job.progress.vertex_completed(
                d,
                false,
                res.as_ref().err().map(|e| e.to_string()),
                std::time::SystemTime::now(),
            );
        }
        let (digest, config) = res?;
        Ok(Response::new(gw::ResolveImageConfigResponse {
            digest,
            config: config.into(),
            r#ref: r.r#ref,
        }))
    }

    async fn resolve_source_meta(
        &self,
        _: Request<gw::ResolveSourceMetaRequest>,
    ) -> std::result::Result<Response<gw::ResolveSourceMetaResponse>, Status> {
        unimplemented("ResolveSourceMeta")
    }

    async fn solve(
        &self,
        request: Request<gw::SolveRequest>,
    ) -> std::result::Result<Response<gw::SolveResponse>, Status> {
        Ok(Response::new(self.solve_inner(request).await?))
    }

    async fn read_file(
        &self,
        request: Request<gw::ReadFileRequest>,
    ) -> std::result::Result<Response<gw::ReadFileResponse>, Status> {
        let job = self.job(&request).await?;
        let r = request.into_inner();
        let view = self.view_for(&job, &r.r#ref).await?;
        let (off, len) = r.range.map(|g| (g.offset, g.length)).unwrap_or((0, 0));
        let data = crate::fsread::read_file(view.path(), &r.file_path, off, len).await?;
        Ok(Response::new(gw::ReadFileResponse { data: data.into() }))
    }

    async fn read_dir(
        &self,
        request: Request<gw::ReadDirRequest>,
    ) -> std::result::Result<Response<gw::ReadDirResponse>, Status> {
        let job = self.job(&request).await?;
        let r = request.into_inner();
        let view = self.view_for(&job, &r.r#ref).await?;
        let entries = crate::fsread::read_dir(view.path(), &r.dir_path, &r.include_pattern).await?;
        Ok(Response::new(gw::ReadDirResponse { entries }))
    }

    async fn stat_file(
        &self,
        request: Request<gw::StatFileRequest>,
    ) -> std::result::Result<Response<gw::StatFileResponse>, Status> {
        let job = self.job(&request).await?;
        let r = request.into_inner();
        let view = self.view_for(&job, &r.r#ref).await?;
        let stat = crate::fsread::stat(view.path(), &r.path).await?;
        Ok(Response::new(gw::StatFileResponse { stat: Some(stat) }))
    }

    async fn evaluate(
        &self,
        request: Request<gw::EvaluateRequest>,
    ) -> std::result::Result<Response<gw::EvaluateResponse>, Status> {
        let job = self.active_job(&request).await?;
        let r = request.into_inner();
        // A lazy ref (a `Solve` without `Evaluate`) is solved now, failing as that solve fails;
        // an unknown one is the client's error, named as buildkitd names it.
        job.get_ref(&self.backend, &r.r#ref).await?;
        Ok(Response::new(gw::EvaluateResponse {}))
    }

    async fn ping(
        &self,
        request: Request<gw::PingRequest>,
    ) -> std::result::Result<Response<gw::PongResponse>, Status> {
        let _job = self.job(&request).await?;
        Ok(Response::new(gw::PongResponse {
            frontend_api_caps: caps::frontend_caps(),
            llb_caps: caps::llb_caps(),
            workers: vec![self.worker.clone()],
        }))
    }

    async fn r#return(
        &self,
        request: Request<gw::ReturnRequest>,
    ) -> std::result::Result<Response<gw::ReturnResponse>, Status> {
        Ok(Response::new(self.return_inner(request).await?))
    }

    async fn inputs(
        &self,
        request: Request<gw::InputsRequest>,
    ) -> std::result::Result<Response<gw::InputsResponse>, Status> {
        let _job = self.job(&request).await?;
        let definitions = match &self.scope {
            Some(scope) => scope.inputs.clone(),
            None => Default::default(),
        };
        Ok(Response::new(gw::InputsResponse { definitions }))
    }

    async fn new_container(
        &self,
        request: Request<gw::NewContainerRequest>,
    ) -> std::result::Result<Response<gw::NewContainerResponse>, Status> {
        let job = self.active_job(&request).await?;
        crate::containers::new_container(&self.backend, &job, request.into_inner()).await?;
        Ok(Response::new(gw::NewContainerResponse {}))
    }

    async fn release_container(
        &self,
        request: Request<gw::ReleaseContainerRequest>,
    ) -> std::result::Result<Response<gw::ReleaseContainerResponse>, Status> {
        let job = self.job(&request).await?;
        let id = request.into_inner().container_id;
        crate::containers::release_container(&job, &id).await?;
        Ok(Response::new(gw::ReleaseContainerResponse {}))
    }

    async fn exec_process(
        &self,
        request: Request<tonic::Streaming<gw::ExecMessage>>,
    ) -> std::result::Result<Response<tonic::codegen::BoxStream<gw::ExecMessage>>, Status> {
        let job = self.active_job(&request).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(crate::containers::exec_session(
            job,
            request.into_inner(),
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn read_file_container(
        &self,
        _: Request<gw::ReadFileRequest>,
    ) -> std::result::Result<Response<gw::ReadFileResponse>, Status> {
        unimplemented("ReadFileContainer")
    }

    async fn read_dir_container(
        &self,
        _: Request<gw::ReadDirRequest>,
    ) -> std::result::Result<Response<gw::ReadDirResponse>, Status> {
        unimplemented("ReadDirContainer")
    }

    async fn stat_file_container(
        &self,
        _: Request<gw::StatFileRequest>,
    ) -> std::result::Result<Response<gw::StatFileResponse>, Status> {
        unimplemented("StatFileContainer")
    }

    async fn warn(
        &self,
        request: Request<gw::WarnRequest>,
    ) -> std::result::Result<Response<gw::WarnResponse>, Status> {
        let job = self.job(&request).await?;
        let r = request.into_inner();
        job.progress
            .warning(protos::moby::buildkit::v1::VertexWarning {
                vertex: r.digest,
                level: r.level,
                short: r.short,
                detail: r.detail,
                url: r.url,
                info: r.info,
                ranges: r.ranges,
            });
        Ok(Response::new(gw::WarnResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_empty_location(op: &'static [u8], nested: Option<pb::Definition>) -> pb::Definition {
        pb::Definition {
            def: vec![bytes::Bytes::from_static(op)],
            source: Some(pb::Source {
                locations: [
                    ("sha256:empty".to_string(), pb::Locations::default()),
                    (
                        "sha256:used".to_string(),
                        pb::Locations {
                            locations: vec![pb::Location::default()],
                        },
                    ),
                ]
                .into_iter()
                .collect(),
                infos: vec![pb::SourceInfo {
                    filename: "bar".into(),
                    definition: nested,
                    ..Default::default()
                }],
            }),
            ..Default::default()
        }
    }

    /// Go's `llb.NewDefinitionOp` dereferences every location entry, also in the definitions a
    /// source map carries (upstream TestSourceMapFromRef crashed the client on `Ref.ToState`):
    /// empty entries go at every level, used ones stay.
    #[test]
    fn output_definition_drops_empty_locations_at_every_level() {
        let nested = with_empty_location(b"nested", None);
        let out = output_definition(with_empty_location(b"top", Some(nested)));
        let src = out.source.unwrap();
        assert_eq!(
            src.locations.keys().collect::<Vec<_>>(),
            vec!["sha256:used"]
        );
        let inner = src.infos[0].definition.clone().unwrap();
        assert_eq!(inner.def, vec![bytes::Bytes::from_static(b"nested")]);
        let inner_src = inner.source.unwrap();
        assert_eq!(
            inner_src.locations.keys().collect::<Vec<_>>(),
            vec!["sha256:used"]
        );
    }
}
