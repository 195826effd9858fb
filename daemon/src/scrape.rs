//! The `/metrics` body: rendered on a blocking thread of the HTTP runtime (never on the threads that read
//! ingest sockets), shared by every scrape that asked for it while it was being rendered or within
//! `metrics_max_age` of it. While a body is still being sent to someone it is also served to newcomers (up
//! to [`MAX_SHARED_AGE`] old), so that slow or many concurrent scrapers keep one body alive, not one per
//! render: memory follows the series cap, not the cap times the scrapers. A body is gzipped, once, when a
//! scraper that accepts gzip (Prometheus does) first asks for it; the compressed copy is shared the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::Encoder;

use crate::exposition::Registry;
use crate::selfmetrics::SelfMetrics;

/// Everything a body is made of.
pub(crate) struct Exposition {
    pub registry: Arc<Registry>,
    pub metrics: SelfMetrics,
}

impl Exposition {
    /// Renders the whole body; `hint` is the previous body's size.
    pub fn render(&self, hint: usize) -> Vec<u8> {
        let mut body = Vec::with_capacity(hint + hint / 8);
        let ours = self.registry.encode_families(&mut body);
        let prometheus = self.registry.prometheus();
        let theirs: usize = prometheus.gather().iter().map(|f| f.get_metric().len()).sum();
        // Every sample but this gauge's own; the small registry is gathered again with it set.
        self.metrics.exported_series.set((ours + theirs).saturating_sub(1) as i64);
        let families = prometheus.gather();
        // Encoding into a Vec cannot fail; an error would leave those families out rather than the body.
        let _ = prometheus::TextEncoder::new().encode(&families, &mut body);
        body
    }
}

/// The oldest body served to a new scrape because an earlier one is still being sent.
pub(crate) const MAX_SHARED_AGE: Duration = Duration::from_secs(10);

struct Rendered {
    started: Instant,
    body: Bytes,
    gzip: Option<Bytes>,
}

impl Rendered {
    /// Still being sent to someone.
    fn in_use(&self) -> bool {
        !self.body.is_unique() || self.gzip.as_ref().is_some_and(|g| !g.is_unique())
    }
}

/// gzip at the fastest level: at 200k series about 12x smaller, at about 250 MB/s of body.
fn gzip(body: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 8), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(body);
    encoder.finish().unwrap_or_default()
}

pub(crate) struct ScrapeCache {
    exposition: Arc<Exposition>,
    max_age: Duration,
    last: tokio::sync::Mutex<Option<Rendered>>,
}

impl ScrapeCache {
    pub fn new(exposition: Exposition, max_age: Duration) -> Self {
        ScrapeCache { exposition: Arc::new(exposition), max_age, last: tokio::sync::Mutex::new(None) }
    }

    /// A body whose rendering started no earlier than `max_age` before this call, gzipped if `gzipped`;
    /// `None` if rendering failed.
    pub async fn body(&self, gzipped: bool) -> Option<Bytes> {
        let asked = Instant::now();
        let mut last = self.last.lock().await;
        let fresh = |r: &&mut Rendered| r.started + self.max_age >= asked;
        let shared = |r: &&mut Rendered| r.in_use() && r.started + MAX_SHARED_AGE >= asked;
        if let Some(r) = last.as_mut().filter(|r| fresh(r) || shared(r)) {
            if !gzipped {
                return Some(r.body.clone());
            }
            if let Some(g) = &r.gzip {
                return Some(g.clone());
            }
            let body = r.body.clone();
            let g = Bytes::from(tokio::task::spawn_blocking(move || gzip(&body)).await.ok()?);
            r.gzip = Some(g.clone());
            return Some(g);
        }
        // Let the old body go before the new one exists: at most one body here, plus those still being sent.
        let hint = last.take().map_or(64 * 1024, |r| r.body.len());
        let started = Instant::now();
        let exposition = Arc::clone(&self.exposition);
        let rendered = tokio::task::spawn_blocking(move || {
            let body = exposition.render(hint);
            let g = gzipped.then(|| gzip(&body));
            (body, g)
        })
        .await;
        let (body, g) = match rendered {
            Ok((b, g)) => (Bytes::from(b), g.map(Bytes::from)),
            Err(e) => {
                tracing::error!("rendering /metrics failed: {e}");
                return None;
            }
        };
        *last = Some(Rendered { started, body: body.clone(), gzip: g.clone() });
        Some(if gzipped { g? } else { body })
    }
}
