//! Counters, gauges and histograms of the server, rendered in the Prometheus
//! text format at `GET /metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bucket upper bounds (seconds) of the latency histograms.
const BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Window of the tokens-per-second gauge.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// Everything `/metrics` reports. Updated by the handlers and the engine thread.
#[derive(Default)]
pub struct Metrics {
    pub loaded: AtomicBool,
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    finished: Mutex<BTreeMap<&'static str, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub slots_in_use: AtomicU64,
    pub slots_free: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub cache_tokens_saved: AtomicU64,
    pub cache_entries: AtomicU64,
    pub cache_bytes: AtomicU64,
    ttft: Mutex<Histogram>,
    itl: Mutex<Histogram>,
    recent: Mutex<VecDeque<(Instant, u64)>>,
}

/// A poisoned lock still holds valid counters: keep using them.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// An HTTP request answered on `endpoint` with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        *lock(&self.requests).entry((endpoint.to_string(), status)).or_default() += 1;
    }

    /// A sequence finished (`stop`, `length`, `cancelled`, `error`).
    pub fn finished(&self, reason: &'static str) {
        *lock(&self.finished).entry(reason).or_default() += 1;
    }

    pub fn time_to_first_token(&self, secs: f64) {
        lock(&self.ttft).observe(secs);
    }

    pub fn inter_token_latency(&self, secs: f64) {
        lock(&self.itl).observe(secs);
    }

    /// `n` tokens generated now.
    pub fn generated(&self, n: u64, now: Instant) {
        if n == 0 {
            return;
        }
        self.generated_tokens.fetch_add(n, Relaxed);
        let mut r = lock(&self.recent);
        r.push_back((now, n));
        while r.front().is_some_and(|&(t, _)| now.duration_since(t) > RATE_WINDOW) {
            r.pop_front();
        }
    }

    /// Generated tokens per second over the last few seconds.
    pub fn tokens_per_second(&self) -> f64 {
        let now = Instant::now();
        let r = lock(&self.recent);
        let n: u64 = r.iter().filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW).map(|(_, n)| n).sum();
        n as f64 / RATE_WINDOW.as_secs_f64()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let g = |a: &AtomicU64| a.load(Relaxed).to_string();
        counter(
            &mut out,
            "mamba_model_loaded",
            "1 once the model is loaded and the server is ready.",
            "gauge",
            u8::from(self.loaded.load(Relaxed)).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP mamba_http_requests_total HTTP requests by endpoint and status code.\n\
             # TYPE mamba_http_requests_total counter"
        );
        for ((endpoint, status), n) in lock(&self.requests).iter() {
            let _ =
                writeln!(out, "mamba_http_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP mamba_sequences_finished_total Generated sequences by finish reason.\n\
             # TYPE mamba_sequences_finished_total counter"
        );
        for (reason, n) in lock(&self.finished).iter() {
            let _ = writeln!(out, "mamba_sequences_finished_total{{reason=\"{reason}\"}} {n}");
        }
        counter(
            &mut out,
            "mamba_prompt_tokens_total",
            "Prompt tokens admitted.",
            "counter",
            g(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "mamba_generation_tokens_total",
            "Tokens generated.",
            "counter",
            g(&self.generated_tokens),
        );
        counter(
            &mut out,
            "mamba_generation_tokens_per_second",
            "Tokens generated per second over the last 10 seconds.",
            "gauge",
            format!("{:.3}", self.tokens_per_second()),
        );
        counter(
            &mut out,
            "mamba_requests_running",
            "Requests holding state slots.",
            "gauge",
            g(&self.running),
        );
        counter(&mut out, "mamba_requests_waiting", "Requests waiting for slots.", "gauge", g(&self.waiting));
        counter(&mut out, "mamba_slots_in_use", "State slots in use.", "gauge", g(&self.slots_in_use));
        counter(&mut out, "mamba_slots_free", "State slots free.", "gauge", g(&self.slots_free));
        counter(
            &mut out,
            "mamba_prefix_cache_hits_total",
            "Requests resumed from a cached prompt-prefix state.",
            "counter",
            g(&self.cache_hits),
        );
        counter(
            &mut out,
            "mamba_prefix_cache_misses_total",
            "Requests that found no cached prefix.",
            "counter",
            g(&self.cache_misses),
        );
        counter(
            &mut out,
            "mamba_prefix_cache_tokens_saved_total",
            "Prompt tokens not prefilled thanks to the prefix cache.",
            "counter",
            g(&self.cache_tokens_saved),
        );
        counter(
            &mut out,
            "mamba_prefix_cache_entries",
            "States in the prefix cache.",
            "gauge",
            g(&self.cache_entries),
        );
        counter(
            &mut out,
            "mamba_prefix_cache_bytes",
            "Bytes held by the prefix cache.",
            "gauge",
            g(&self.cache_bytes),
        );
        lock(&self.ttft).render(
            &mut out,
            "mamba_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        lock(&self.itl).render(
            &mut out,
            "mamba_inter_token_latency_seconds",
            "Between consecutive tokens of one sequence.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_text_names_every_metric() {
        let m = Metrics::default();
        m.time_to_first_token(0.003);
        m.time_to_first_token(0.2);
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 400);
        m.generated(5, Instant::now());
        let t = m.render();
        assert!(t.contains("mamba_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"), "{t}");
        assert!(t.contains("mamba_time_to_first_token_seconds_bucket{le=\"0.25\"} 2"));
        assert!(t.contains("mamba_time_to_first_token_seconds_count 2"));
        assert!(t.contains("mamba_http_requests_total{endpoint=\"/v1/completions\",status=\"400\"} 1"));
        assert!(t.contains("mamba_generation_tokens_total 5"));
        assert!(t.contains("mamba_generation_tokens_per_second 0.5"));
    }
}
