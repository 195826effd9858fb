//! The HTTP endpoint: `/metrics` (Prometheus text format) and `/healthz`. It gathers the registry and knows
//! nothing about the sources that fill it.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::proto::MetricType;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::selfmetrics::SelfMetrics;

pub(crate) struct Exporter {
    pub registry: Registry,
    /// Holds only `gainguard_exported_series`, which is set from the main registry's size before encoding.
    pub meta: Registry,
    pub metrics: SelfMetrics,
    pub healthy: Arc<AtomicBool>,
}

impl Exporter {
    pub fn render(&self) -> Vec<u8> {
        let mut families = self.registry.gather();
        let samples: usize = families
            .iter()
            .map(|f| match f.get_field_type() {
                MetricType::HISTOGRAM => {
                    f.get_metric().iter().map(|m| m.get_histogram().get_bucket().len() + 3).sum::<usize>()
                }
                _ => f.get_metric().len(),
            })
            .sum();
        self.metrics.exported_series.set(samples as i64);
        families.extend(self.meta.gather());
        let mut body = Vec::with_capacity(samples * 128);
        let encoder = TextEncoder::new();
        // gainguard_singular_value_quantile is kept as gauges but exposed as a summary: a `quantile` label is
        // only legal on summaries (promtool), and this family is exactly a summary's quantiles of the
        // singular values, without _sum and _count (which the text format allows).
        let (quantiles, rest): (Vec<_>, Vec<_>) =
            families.into_iter().partition(|f| f.name() == crate::sources::spectra::QUANTILE_FAMILY);
        encoder.encode(&rest, &mut body).expect("text encoding into a Vec cannot fail");
        if !quantiles.is_empty() {
            let mut q = Vec::new();
            encoder.encode(&quantiles, &mut q).expect("text encoding into a Vec cannot fail");
            let gauge = format!("# TYPE {} gauge\n", crate::sources::spectra::QUANTILE_FAMILY);
            let summary = format!("# TYPE {} summary\n", crate::sources::spectra::QUANTILE_FAMILY);
            body.extend_from_slice(String::from_utf8_lossy(&q).replacen(&gauge, &summary, 1).as_bytes());
        }
        body
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, content_type: &str, body: Vec<u8>| {
            Response::builder()
                .status(status)
                .header("content-type", content_type)
                .body(Full::new(Bytes::from(body)))
                .expect("static response parts are valid")
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", b"only GET\n".to_vec());
        }
        match req.uri().path() {
            "/metrics" => reply(StatusCode::OK, TextEncoder::new().format_type(), self.render()),
            "/healthz" if self.healthy.load(Ordering::Relaxed) => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            "/" => reply(
                StatusCode::OK,
                "text/html",
                b"<html><body><h1>gainguardd</h1><a href=\"/metrics\">/metrics</a> <a href=\"/healthz\">/healthz</a></body></html>\n"
                    .to_vec(),
            ),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
        }
    }
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, exporter: Arc<Exporter>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let exporter = Arc::clone(&exporter);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let exporter = Arc::clone(&exporter);
                async move { Ok::<_, Infallible>(exporter.respond(&req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
