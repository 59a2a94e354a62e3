//! Job-run timings observed by workers and read by `/metrics`: a small hand-written
//! registry in the Prometheus text format. It sits beside the job store because both the
//! API and the workers already depend on it; the API's own HTTP series live in
//! `api::metrics` and reuse [`Histogram`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// A cumulative histogram with fixed upper bounds, in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramCounts>,
}

#[derive(Debug, Default, Clone)]
struct HistogramCounts {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            inner: Mutex::new(HistogramCounts {
                buckets: vec![0; bounds.len()],
                ..Default::default()
            }),
        }
    }

    pub fn observe(&self, seconds: f64) {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if seconds <= *b {
                c.buckets[i] += 1;
            }
        }
        c.sum += seconds;
        c.count += 1;
    }

    /// Writes `name_bucket`, `name_sum` and `name_count` lines; `labels` is `k="v",...` or empty.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let c = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, n) in self.bounds.iter().zip(&c.buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", c.count);
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", c.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", c.count);
    }
}

const STEP_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const JOB_BOUNDS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// What this process's workers measure of the jobs they run.
#[derive(Debug)]
pub struct Metrics {
    pub step_duration: Histogram,
    pub job_duration: Histogram,
    finished: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            step_duration: Histogram::new(STEP_BOUNDS),
            job_duration: Histogram::new(JOB_BOUNDS),
            finished: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    /// A job run by this process's workers ended in `state`.
    pub fn job_finished(&self, state: &'static str, seconds: f64) {
        *self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(state)
            .or_default() += 1;
        self.job_duration.observe(seconds);
    }

    /// The process-local series; the caller adds the gauges it reads from the store.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP vqclip_step_duration_seconds Time of one optimisation step.\n");
        out.push_str("# TYPE vqclip_step_duration_seconds histogram\n");
        self.step_duration
            .render(out, "vqclip_step_duration_seconds", "");
        out.push_str(
            "# HELP vqclip_job_duration_seconds Time from claim to the end of a job's run.\n",
        );
        out.push_str("# TYPE vqclip_job_duration_seconds histogram\n");
        self.job_duration
            .render(out, "vqclip_job_duration_seconds", "");
        out.push_str("# HELP vqclip_jobs_finished_total Job runs ended by this process's workers, by outcome.\n");
        out.push_str("# TYPE vqclip_jobs_finished_total counter\n");
        for (state, n) in self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "vqclip_jobs_finished_total{{state=\"{state}\"}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.5);
        h.observe(9.0);
        let mut out = String::new();
        h.render(&mut out, "x", "");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_sum 11\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }
}
