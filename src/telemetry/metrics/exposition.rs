//! The two text formats a scrape is served in: OpenMetrics (what Prometheus servers ask for)
//! and the Prometheus text format 0.0.4 (`curl`, `promtool check metrics`).

use std::collections::HashMap;

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format (what a scraper that does not ask for
/// OpenMetrics, `curl` or `promtool check metrics` reads).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (Prometheus servers do); anything else is
/// served the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| {
        a.split(',').any(|part| {
            let mut fields = part.split(';').map(str::trim);
            let is_openmetrics = fields
                .next()
                .is_some_and(|t| t.eq_ignore_ascii_case("application/openmetrics-text"));
            // `q=0` refuses the type.
            is_openmetrics && !fields.any(|f| f.replace(' ', "") == "q=0")
        })
    })
}

/// An OpenMetrics scrape in the Prometheus text format (0.0.4): a counter family is named with
/// its `_total` suffix, an info family becomes a gauge named with its `_info` suffix, `unknown`
/// is `untyped`, and `# UNIT` and `# EOF` are left out. Samples are the same lines.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut renamed: HashMap<&str, (String, &str)> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (suffix, kind) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "unknown" => ("", "untyped"),
                other => ("", other),
            };
            renamed.insert(name, (format!("{name}{suffix}"), kind));
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let header = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match header {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let (new_name, kind) = renamed
                    .get(name)
                    .map_or((name, tail), |(n, k)| (n.as_str(), *k));
                let tail = if prefix == "# TYPE " { kind } else { tail };
                out.push_str(prefix);
                out.push_str(new_name);
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_asked_for_is_served() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        for other in [
            None,
            Some("*/*"),
            Some("text/plain;version=0.0.4"),
            Some("application/openmetrics-text; q=0, text/plain"),
        ] {
            assert!(!wants_openmetrics(other), "{other:?}");
        }
        let open = "# HELP a_requests Calls.\n# TYPE a_requests counter\na_requests_total{m=\"x\"} 2\n\
                    # HELP b Build.\n# TYPE b info\nb_info{v=\"1\"} 1\n\
                    # HELP c Seconds.\n# TYPE c gauge\n# UNIT c seconds\nc 0.5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(open),
            "# HELP a_requests_total Calls.\n# TYPE a_requests_total counter\na_requests_total{m=\"x\"} 2\n\
             # HELP b_info Build.\n# TYPE b_info gauge\nb_info{v=\"1\"} 1\n\
             # HELP c Seconds.\n# TYPE c gauge\nc 0.5\n"
        );
    }
}
