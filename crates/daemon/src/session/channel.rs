//! A tonic-compatible channel over one hyper HTTP/2 client connection inside a session tunnel.
//!
//! tonic's own `Channel` reconnects on failure; a session tunnel cannot be re-dialled, so the
//! generated clients are driven through this thin `tower::Service` around hyper's
//! `SendRequest` instead. Requests get the origin `http://localhost`, as buildkitd dials.

use futures::future::BoxFuture;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use std::task::{Context, Poll};
use tonic::body::Body;

/// The channel; cheap to clone (all clones share the one HTTP/2 connection).
#[derive(Clone)]
pub struct SessionChannel {
    sender: hyper::client::conn::http2::SendRequest<Body>,
}

impl SessionChannel {
    /// Wraps a connected HTTP/2 sender.
    pub fn new(sender: hyper::client::conn::http2::SendRequest<Body>) -> Self {
        SessionChannel { sender }
    }

    /// The origin to give generated clients (`XClient::with_origin(ch, SessionChannel::origin())`).
    pub fn origin() -> Uri {
        Uri::from_static("http://localhost")
    }
}

impl tower::Service<Request<Body>> for SessionChannel {
    type Response = Response<Incoming>;
    type Error = hyper::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.sender.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let fut = self.sender.send_request(req);
        Box::pin(fut)
    }
}
