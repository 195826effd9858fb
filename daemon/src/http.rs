//! The HTTP endpoint: `/metrics` (Prometheus text format), `/healthz`, the live page at `/` with its assets
//! ([`crate::page`]) and the history it reads under `/api/v1/` ([`crate::history::api`]). It serves the body
//! that [`ScrapeCache`] renders and knows nothing about the sources that fill the registry.
//!
//! Limits, so that slow or hostile clients cannot take the endpoint away from Prometheus: a client must send
//! its request head within the header-read timeout; open connections are capped (at the cap the oldest one
//! without a request in progress is closed); at most `max_concurrent_scrapes` `/metrics` requests are served
//! at once and the others get 503, like node_exporter's `--web.max-requests`.
//!
//! With a web config file ([`crate::web`]) every route asks for basic auth, and a TLS port completes the
//! handshake within the same header-read timeout; a client that speaks plain HTTP to it gets a 400.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::history::{api, rules::Rules, History};
use crate::admission::{accept_loop, BusyGuard, ConnectionTable, Peer, Slot};
use crate::scrape::ScrapeCache;
use crate::selfmetrics::SelfMetrics;
use crate::web::{Web, PLAIN_HTTP_ANSWER, TLS_HANDSHAKE_RECORD};

pub(crate) struct Http {
    pub cache: ScrapeCache,
    pub healthy: Arc<AtomicBool>,
    pub metrics: SelfMetrics,
    pub scrapes: Arc<Semaphore>,
    pub connections: Arc<ConnectionTable>,
    pub header_read_timeout: Duration,
    pub web: Web,
    pub history: Arc<History>,
}

/// A response body that keeps its connection marked busy, and its scrape permit taken, until it is sent.
pub(crate) struct Reply {
    inner: Full<Bytes>,
    _busy: Option<BusyGuard>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Reply {
    fn new(body: impl Into<Bytes>) -> Self {
        Reply { inner: Full::new(body.into()), _busy: None, _permit: None }
    }
}

impl hyper::body::Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Reply) -> Response<Reply> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    r
}

fn json_reply(body: Result<serde_json::Value, api::ApiError>) -> Response<Reply> {
    match body {
        Ok(v) => {
            let mut r = reply(StatusCode::OK, "application/json", Reply::new(serde_json::to_vec(&v).unwrap_or_default()));
            r.headers_mut().insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
            reply(status, "application/json", Reply::new(serde_json::to_vec(&serde_json::json!({"error": e.message})).unwrap_or_default()))
        }
    }
}

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the request's `Accept-Encoding` lists gzip with a non-zero weight.
fn accepts_gzip(req: &Request<Incoming>) -> bool {
    req.headers().get_all(hyper::header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).any(|v| {
        v.split(',').any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or_default();
            let q = parts.find_map(|p| p.strip_prefix("q=")).map_or(Some(1.0), |q| q.parse::<f64>().ok());
            name.eq_ignore_ascii_case("gzip") && q.is_some_and(|q| q > 0.0)
        })
    })
}

impl Http {
    async fn respond(&self, req: Request<Incoming>, slot: &Slot) -> Response<Reply> {
        let busy = slot.busy_guard();
        let authorization = req.headers().get(hyper::header::AUTHORIZATION).map(|v| v.as_bytes());
        if !self.web.auth.allows(authorization).await {
            self.metrics.http_refused("unauthorized");
            let mut r = reply(StatusCode::UNAUTHORIZED, "text/plain", Reply::new("Unauthorized\n"));
            r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, hyper::header::HeaderValue::from_static("Basic"));
            return r;
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", Reply::new("only GET\n"));
        }
        match req.uri().path() {
            "/metrics" => {
                let Ok(permit) = Arc::clone(&self.scrapes).try_acquire_owned() else {
                    self.metrics.http_refused("too_many_scrapes");
                    return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", Reply::new("too many concurrent scrapes\n"));
                };
                let gzipped = accepts_gzip(&req);
                let Some(body) = self.cache.body(gzipped).await else {
                    return reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", Reply::new("rendering failed; see the log\n"));
                };
                let body = Reply { inner: Full::new(body), _busy: Some(busy), _permit: Some(permit) };
                let mut r = reply(StatusCode::OK, TEXT_FORMAT, body);
                r.headers_mut().insert(hyper::header::VARY, hyper::header::HeaderValue::from_static("Accept-Encoding"));
                if gzipped {
                    r.headers_mut().insert(hyper::header::CONTENT_ENCODING, hyper::header::HeaderValue::from_static("gzip"));
                }
                r
            }
            "/healthz" if self.healthy.load(Ordering::Relaxed) => reply(StatusCode::OK, "text/plain", Reply::new("ok\n")),
            "/healthz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", Reply::new("the run table stopped\n")),
            "/api/v1/overview" => json_reply(Ok(api::overview(&self.history, Rules::builtin()))),
            "/api/v1/run" => json_reply(api::run(&self.history, Rules::builtin(), req.uri().query().unwrap_or(""))),
            "/api/v1/gpus" => json_reply(api::gpus(&self.history, req.uri().query().unwrap_or(""))),
            path => match crate::page::asset(path) {
                Some((content_type, body)) => {
                    let mut r = reply(StatusCode::OK, content_type, Reply::new(Bytes::from_static(body)));
                    r.headers_mut().insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-cache"));
                    r
                }
                None => reply(StatusCode::NOT_FOUND, "text/plain", Reply::new("not found\n")),
            },
        }
    }

    async fn connection(self: Arc<Self>, stream: tokio::net::TcpStream, slot: Slot) {
        let slot = Arc::new(slot);
        let Some(acceptor) = self.web.tls.clone() else { return self.serve_http(stream, slot).await };
        let handshake = async {
            let mut first = [0u8; 1];
            match stream.peek(&mut first).await {
                Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => acceptor.accept(stream).await.map_err(|_| "tls_handshake_failed"),
                Ok(1) => {
                    answer_plain_http(stream).await;
                    Err("plain_http")
                }
                _ => Err("tls_handshake_failed"),
            }
        };
        let tls = tokio::select! {
            r = tokio::time::timeout(self.header_read_timeout, handshake) => r.unwrap_or(Err("tls_handshake_failed")),
            () = slot.evicted() => Err("evicted"),
        };
        match tls {
            Ok(stream) => self.serve_http(stream, slot).await,
            Err(reason) => self.metrics.http_refused(reason),
        }
    }

    async fn serve_http<S>(self: Arc<Self>, stream: S, slot: Arc<Slot>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let http = Arc::clone(&self);
        let for_service = Arc::clone(&slot);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (http, slot) = (Arc::clone(&http), Arc::clone(&for_service));
            async move {
                let mut r = http.respond(req, &slot).await;
                for (name, value) in &http.web.headers {
                    r.headers_mut().insert(name.clone(), value.clone());
                }
                Ok::<_, Infallible>(r)
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::select! {
            _ = conn => {}
            () = slot.evicted() => self.metrics.http_refused("evicted"),
        }
    }
}

/// Answers 400 and closes. The request is read (up to 64 KiB, for at most a second) before closing, so that
/// unread bytes do not make the kernel reset the connection before the client reads the answer.
async fn answer_plain_http(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.write_all(PLAIN_HTTP_ANSWER).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut total = 0;
        while total < 64 << 10 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, http: Arc<Http>) {
    accept_loop(listener, "metrics endpoint", move |(stream, peer): (tokio::net::TcpStream, std::net::SocketAddr)| {
        match http.connections.admit(Peer::Addr(peer.ip())) {
            Ok(slot) => {
                tokio::spawn(Arc::clone(&http).connection(stream, slot));
            }
            // Dropping the stream closes it at once, so the descriptor is not held.
            Err(_) => http.metrics.http_refused("too_many_connections"),
        }
    })
    .await
}
