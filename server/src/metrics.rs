//! Prometheus metrics, hand-rolled (a handful of counters and histograms
//! need no dependency): requests and latency per route, method and status;
//! the compute pool's queue; the inputs cache; the models loaded.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

/// Latency bucket bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Everything `/metrics` reports.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    latency: Mutex<BTreeMap<(String, String), Histogram>>,
    /// Compute seconds per (model, route template).
    compute: Mutex<BTreeMap<(String, String), Histogram>>,
    /// `?input=` lookups that found their image.
    pub inputs_hits: AtomicU64,
    /// `?input=` lookups that did not.
    pub inputs_misses: AtomicU64,
}

impl Metrics {
    fn record(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
        drop(r);
        let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        l.entry((route.to_string(), method.to_string()))
            .or_default()
            .observe(seconds);
    }

    fn record_compute(&self, model: &str, route: &str, seconds: f64) {
        let mut c = self.compute.lock().unwrap_or_else(|e| e.into_inner());
        c.entry((model.to_string(), route.to_string()))
            .or_default()
            .observe(seconds);
    }

    /// The text exposition format, version 0.0.4.
    pub fn render(&self, state: &AppState) -> String {
        let mut out = String::new();
        let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str("# HELP convscope_http_requests_total HTTP requests by route template, method and status.\n");
        out.push_str("# TYPE convscope_http_requests_total counter\n");
        for ((route, method, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "convscope_http_requests_total{{route=\"{}\",method=\"{method}\",status=\"{status}\"}} {n}",
                label(route)
            );
        }
        out.push_str("# HELP convscope_http_request_duration_seconds Time from request to response, compute included.\n");
        out.push_str("# TYPE convscope_http_request_duration_seconds histogram\n");
        for ((route, method), h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let l = format!("route=\"{}\",method=\"{method}\"", label(route));
            write_histogram(&mut out, "convscope_http_request_duration_seconds", &l, h);
        }
        out.push_str("# HELP convscope_model_compute_seconds Time spent computing on the compute pool (decode, forward, backward, rendering) per model and route.\n");
        out.push_str("# TYPE convscope_model_compute_seconds histogram\n");
        for ((model, route), h) in self
            .compute
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let l = format!("model=\"{}\",route=\"{}\"", label(model), label(route));
            write_histogram(&mut out, "convscope_model_compute_seconds", &l, h);
        }
        self.render_service(&mut out, state);
        out
    }

    /// The gauges and counters of the compute pool, jobs, models and inputs cache.
    fn render_service(&self, out: &mut String, state: &AppState) {
        let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        gauge(
            out,
            "convscope_compute_queue_depth",
            "Computations waiting for a compute slot.",
            state.compute.waiting() as f64,
        );
        gauge(
            out,
            "convscope_compute_running",
            "Computations running now.",
            state.compute.running() as f64,
        );
        if let Ok(counts) = state.jobs.store.counts() {
            out.push_str(
                "# HELP convscope_jobs Training jobs by state.\n# TYPE convscope_jobs gauge\n",
            );
            for (status, n) in &counts {
                let _ = writeln!(out, "convscope_jobs{{state=\"{}\"}} {n}", status.as_str());
            }
            let queued = counts
                .iter()
                .find(|(s, _)| *s == crate::jobs::store::Status::Queued)
                .map_or(0, |(_, n)| *n);
            gauge(
                out,
                "convscope_job_queue_depth",
                "Training jobs waiting for a worker.",
                queued as f64,
            );
        }
        gauge(
            out,
            "convscope_models_loaded",
            "Models in the store.",
            state.models.names().len() as f64,
        );
        gauge(
            out,
            "convscope_inputs_cache_bytes",
            "Bytes of images in the inputs cache.",
            state.inputs.bytes() as f64,
        );
        counter(
            out,
            "convscope_inputs_cache_hits_total",
            "?input= lookups that found their image.",
            self.inputs_hits.load(Ordering::Relaxed),
        );
        counter(
            out,
            "convscope_inputs_cache_misses_total",
            "?input= lookups that did not.",
            self.inputs_misses.load(Ordering::Relaxed),
        );
    }
}

/// One histogram's buckets, sum and count under labels `l`.
fn write_histogram(out: &mut String, name: &str, l: &str, h: &Histogram) {
    for (bound, count) in BUCKETS.iter().zip(h.counts) {
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
}

/// Times every request and counts it under its route template
/// (`/models/{model}/predict`, not one series per model name).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = req.method().to_string();
    let model = model_of(&route, req.uri().path(), &state);
    let started = Instant::now();
    let (response, compute) = crate::compute::COMPUTE_SECONDS
        .scope(std::cell::Cell::new(0.0), async {
            let response = next.run(req).await;
            (response, crate::compute::COMPUTE_SECONDS.with(|c| c.get()))
        })
        .await;
    if let Some(model) = model.filter(|_| compute > 0.0) {
        state.metrics.record_compute(&model, &route, compute);
    }
    state.metrics.record(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// The model a request is about: the `{model}` segment of its route, or the
/// default model for `/predict`.
fn model_of(route: &str, path: &str, state: &AppState) -> Option<String> {
    if route == "/predict" {
        return Some(state.settings.default_model.clone());
    }
    route
        .split('/')
        .zip(path.split('/'))
        .find(|(template, _)| *template == "{model}")
        .map(|(_, name)| name.to_string())
}

/// Prometheus text format 0.0.4: requests and latency per route and status,
/// compute time per model and route, compute queue, inputs cache, models.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&state),
    )
}
