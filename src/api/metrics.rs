//! The API's own series for `/metrics`: requests by method, route and status, and their
//! latency. Job-run series come from the workers' [`crate::queue::Metrics`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::queue::metrics::Histogram;

const HTTP_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    duration: Histogram,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Mutex::new(BTreeMap::new()),
            duration: Histogram::new(HTTP_BOUNDS),
        }
    }
}

impl HttpMetrics {
    /// `route` is the matched route template, so ids do not explode the label set.
    pub fn request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
        drop(m);
        self.duration.observe(seconds);
    }

    pub fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP vqclip_http_requests_total HTTP requests by method, route and status.\n",
        );
        out.push_str("# TYPE vqclip_http_requests_total counter\n");
        for ((method, route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "vqclip_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                route.replace('"', "")
            );
        }
        out.push_str("# HELP vqclip_http_request_duration_seconds Time to answer an HTTP request (SSE: to open the stream).\n");
        out.push_str("# TYPE vqclip_http_request_duration_seconds histogram\n");
        self.duration
            .render(out, "vqclip_http_request_duration_seconds", "");
    }
}
