//! Prometheus metrics through `prometheus-client`, the Prometheus project's
//! own Rust client: requests and latency per route template, method and
//! status; compute time per model and route; the compute pool's queue; the
//! training queue; the inputs cache; the models loaded; the process (CPU,
//! memory, file descriptors, threads) and the build.
//!
//! Why this library and not `metrics` + `metrics-exporter-prometheus`: its
//! metrics are plain values in a registry the server owns (no global
//! recorder to install), its label sets are typed, and it encodes
//! OpenMetrics, which Prometheus asks for first. `GET /metrics` negotiates:
//! `Accept: application/openmetrics-text` gets the library's OpenMetrics
//! text as it is; anything else gets the classic text format 0.0.4 that
//! the same text becomes with three mechanical changes ([`to_classic`]),
//! so dashboards and scrapers written against the earlier hand-made text
//! see the same names and labels.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::state::AppState;

/// Latency bucket bounds in seconds.
const BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComputeLabels {
    model: String,
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    kernels: String,
    features: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Everything `/metrics` reports, in one registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: HistogramFamily<RouteLabels>,
    compute: HistogramFamily<ComputeLabels>,
    /// `?input=` lookups that found their image.
    pub inputs_hits: Counter,
    /// `?input=` lookups that did not.
    pub inputs_misses: Counter,
    queue_depth: Gauge,
    running: Gauge,
    jobs: Family<JobLabels, Gauge>,
    job_queue_depth: Gauge,
    models_loaded: Gauge,
    inputs_bytes: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "convscope_http_requests",
            "HTTP requests by route template, method and status",
            requests.clone(),
        );
        let latency: HistogramFamily<RouteLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "convscope_http_request_duration_seconds",
            "Time from request to response, compute included",
            latency.clone(),
        );
        let compute: HistogramFamily<ComputeLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "convscope_model_compute_seconds",
            "Time spent computing on the compute pool (decode, forward, backward, rendering) per model and route",
            compute.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let queue_depth = gauge(
            &mut registry,
            "convscope_compute_queue_depth",
            "Computations waiting for a compute slot",
        );
        let running = gauge(
            &mut registry,
            "convscope_compute_running",
            "Computations running now",
        );
        let jobs = Family::<JobLabels, Gauge>::default();
        registry.register("convscope_jobs", "Training jobs by state", jobs.clone());
        let job_queue_depth = gauge(
            &mut registry,
            "convscope_job_queue_depth",
            "Training jobs waiting for a worker",
        );
        let models_loaded = gauge(
            &mut registry,
            "convscope_models_loaded",
            "Models in the store",
        );
        let inputs_bytes = gauge(
            &mut registry,
            "convscope_inputs_cache_bytes",
            "Bytes of images in the inputs cache",
        );
        let inputs_hits = Counter::default();
        registry.register(
            "convscope_inputs_cache_hits",
            "?input= lookups that found their image",
            inputs_hits.clone(),
        );
        let inputs_misses = Counter::default();
        registry.register(
            "convscope_inputs_cache_misses",
            "?input= lookups that did not",
            inputs_misses.clone(),
        );
        let features: Vec<&str> = [
            ("avx512-gemm", cfg!(feature = "avx512-gemm")),
            ("cuda", cfg!(feature = "cuda")),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        registry.register(
            "convscope_build",
            "The running build: version, the kernel tier in use and the compiled features",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                kernels: model_store::kernels::tier::active().name().into(),
                features: features.join(","),
            }),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Self {
            registry,
            requests,
            latency,
            compute,
            inputs_hits,
            inputs_misses,
            queue_depth,
            running,
            jobs,
            job_queue_depth,
            models_loaded,
            inputs_bytes,
        }
    }
}

impl Metrics {
    fn record(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.into(),
                method: method.into(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: route.into(),
                method: method.into(),
            })
            .observe(seconds);
    }

    fn record_compute(&self, model: &str, route: &str, seconds: f64) {
        self.compute
            .get_or_create(&ComputeLabels {
                model: model.into(),
                route: route.into(),
            })
            .observe(seconds);
    }

    /// Reads the service's gauges from `state`, then encodes everything as
    /// OpenMetrics text.
    pub fn render(&self, state: &AppState) -> String {
        self.queue_depth.set(state.compute.waiting() as i64);
        self.running.set(state.compute.running() as i64);
        // A state the store cannot count now is left out, not shown stale.
        self.jobs.clear();
        if let Ok(counts) = state.jobs.store.counts() {
            for (status, n) in &counts {
                self.jobs
                    .get_or_create(&JobLabels {
                        state: status.as_str().into(),
                    })
                    .set(*n as i64);
            }
            let queued = counts
                .iter()
                .find(|(s, _)| *s == crate::jobs::store::Status::Queued)
                .map_or(0, |(_, n)| *n);
            self.job_queue_depth.set(queued as i64);
        }
        self.models_loaded.set(state.models.names().len() as i64);
        self.inputs_bytes.set(state.inputs.bytes() as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The classic text format (0.0.4) of OpenMetrics text as
/// `prometheus-client` writes it: a counter's `# HELP`/`# TYPE` name the
/// `_total` series, an info metric is a gauge named `_info`, the `# EOF`
/// and `# UNIT` lines go, and bucket bounds are written as before
/// (`le="1"`, not OpenMetrics' `le="1.0"`), so a series keeps its identity
/// for a Prometheus that does not normalise them.
pub fn to_classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                other => (name.to_string(), other),
            };
            if let Some(h) = help.take() {
                let text = h.split_once(' ').map_or("", |(_, t)| t);
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(&classic_bucket_bound(line));
        out.push('\n');
    }
    out
}

/// `…{…,le="1.0"} 7` → `…{…,le="1"} 7`: Rust's shortest form of the bound.
fn classic_bucket_bound(line: &str) -> std::borrow::Cow<'_, str> {
    let Some(start) = line.find("le=\"").map(|i| i + 4) else {
        return line.into();
    };
    let Some(len) = line[start..].find('"') else {
        return line.into();
    };
    match line[start..start + len].parse::<f64>() {
        Ok(v) if v.is_finite() => format!("{}{v}{}", &line[..start], &line[start + len..]).into(),
        _ => line.into(),
    }
}

/// The process's own metrics, read from `/proc/self` at each scrape, with
/// the names every Prometheus client library uses. On a system without
/// `/proc` there are none.
#[derive(Debug)]
struct ProcessCollector;

/// Clock ticks per second of `/proc`'s times: `USER_HZ`, 100 on every
/// Linux architecture this builds for.
const USER_HZ: f64 = 100.0;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return Ok(());
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(") ")
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|v| v.parse::<f64>().ok())
            });
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as f64)
            .ok();

        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            let cpu = ConstCounter::new((utime + stime) / USER_HZ);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                cpu.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                kib("VmRSS:").map(|k| k * 1024.0),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                kib("VmSize:").map(|k| k * 1024.0),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                kib("Threads:"),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch in seconds.",
                boot.zip(field(22)).map(|(b, ticks)| b + ticks / USER_HZ),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(v);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
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

/// Whether the scraper takes OpenMetrics (Prometheus asks for it first).
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| {
            accept.split(',').any(|item| {
                let mut parts = item.split(';').map(str::trim);
                parts.next() == Some("application/openmetrics-text")
                    && !parts.any(|p| p == "q=0" || p == "q=0.0")
            })
        })
}

/// Requests and latency per route and status, compute time per model and
/// route, compute and training queues, inputs cache, models, the process
/// and the build; OpenMetrics when asked for, else Prometheus text 0.0.4.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4, or OpenMetrics 1.0 text with `Accept: application/openmetrics-text`.", content(
        (String = "text/plain"), (String = "application/openmetrics-text"))))
)]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    let text = state.metrics.render(&state);
    if wants_openmetrics(&headers) {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            to_classic(&text),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_the_total_series_and_drops_the_eof() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 3\n\
# HELP a_build Build.\n# TYPE a_build info\na_build_info{version=\"1\"} 1\n\
# HELP a_depth Depth.\n# TYPE a_depth gauge\na_depth 2.0\n# EOF\n";
        assert_eq!(
            to_classic(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 3\n\
# HELP a_build_info Build.\n# TYPE a_build_info gauge\na_build_info{version=\"1\"} 1\n\
# HELP a_depth Depth.\n# TYPE a_depth gauge\na_depth 2.0\n"
        );
        assert_eq!(
            to_classic(
                "a_bucket{route=\"/x\",le=\"1.0\"} 3\na_bucket{le=\"0.0025\"} 1\na_bucket{le=\"+Inf\"} 4\n"
            ),
            "a_bucket{route=\"/x\",le=\"1\"} 3\na_bucket{le=\"0.0025\"} 1\na_bucket{le=\"+Inf\"} 4\n"
        );
    }

    #[test]
    fn the_process_collector_reports_this_process() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        if std::path::Path::new("/proc/self/stat").exists() {
            for name in [
                "process_cpu_seconds_total ",
                "process_resident_memory_bytes ",
                "process_open_fds ",
                "process_start_time_seconds ",
            ] {
                assert!(text.contains(name), "{name} missing from {text}");
            }
        }
    }
}
