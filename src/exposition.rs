//! Content negotiation for `/metrics`, shared by the controller and the agent: prometheus-client
//! encodes OpenMetrics (one codec); a scraper that does not ask for it gets the Prometheus
//! text format 0.0.4 derived from that encoding.
//!
//! Owns: choosing the format from `Accept`, and the OpenMetrics → text 0.0.4 rewrite.
//! Must not: encode metrics itself (prometheus-client does).
//!
//! Why: Prometheus asks for OpenMetrics (and keeps the exemplars), but `promtool check
//! metrics` and other text-format readers treat an OpenMetrics counter (`# TYPE x counter`,
//! sample `x_total`) as an undocumented metric `x_total`. The rewrite names counter
//! families by their sample (`x_total`), drops `# UNIT`, `# EOF` and exemplars, and leaves
//! every sample line as it is.

/// `Content-Type` of OpenMetrics.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of the Prometheus text format.
pub const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request with this `Accept` header gets OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The body and its content type for a scraper sending `accept`, from OpenMetrics text.
pub fn negotiate(openmetrics: String, accept: Option<&str>) -> (&'static str, String) {
    if wants_openmetrics(accept) {
        (OPENMETRICS, openmetrics)
    } else {
        (TEXT, to_text_format(&openmetrics))
    }
}

/// OpenMetrics text (as prometheus-client writes it) as Prometheus text format 0.0.4.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut counters = std::collections::BTreeSet::new();
    for l in openmetrics.lines() {
        if let Some(name) = l
            .strip_prefix("# TYPE ")
            .and_then(|r| r.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for l in openmetrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (*p, rest)));
        if let Some((prefix, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                out.push_str(&format!("{prefix}{name}_total {tail}\n"));
                continue;
            }
        }
        // Exemplars (` # {trace_id="…"} v`) exist only in OpenMetrics.
        let sample = match l.starts_with('#') {
            true => l,
            false => l.split(" # {").next().unwrap_or(l),
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_sample_and_openmetrics_only_lines_go() {
        let om = "# HELP fl_clients_failed Failed replies.\n# TYPE fl_clients_failed counter\n\
                  fl_clients_failed_total{run_id=\"1\"} 2\n\
                  # HELP d Duration.\n# TYPE d histogram\n# UNIT d seconds\n\
                  d_bucket{le=\"1.0\"} 1 # {trace_id=\"ab\"} 0.5\nd_sum 0.5\nd_count 1\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP fl_clients_failed_total Failed replies.\n# TYPE fl_clients_failed_total counter\n\
             fl_clients_failed_total{run_id=\"1\"} 2\n\
             # HELP d Duration.\n# TYPE d histogram\n\
             d_bucket{le=\"1.0\"} 1\nd_sum 0.5\nd_count 1\n"
        );
        let prom = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(negotiate(om.into(), Some(prom)).0, OPENMETRICS);
        assert_eq!(negotiate(om.into(), None).0, TEXT);
        assert_eq!(negotiate(om.into(), Some("*/*")).0, TEXT);
    }
}
