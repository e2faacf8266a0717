//! The `/metrics` figures as OTLP metrics: read back from the Prometheus text ncps renders
//! anyway, so the two can never disagree and no figure is counted twice. A pure function,
//! tested with text.
//!
//! counter -> a cumulative monotonic Sum; gauge -> Gauge; histogram (`_bucket{le}`, `_sum`,
//! `_count`) -> a cumulative Histogram with the same bounds. Values are doubles (Prometheus
//! text has no integer type either).

/// One series' value, with its labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// For histograms only: per-bucket (not cumulative) counts, bounds, count and sum.
    pub bucket_counts: Vec<u64>,
    pub bounds: Vec<f64>,
    pub count: u64,
    pub sum: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum MetricData {
    Gauge(Vec<Point>),
    Counter(Vec<Point>),
    Histogram(Vec<Point>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: String,
    pub help: String,
    pub data: MetricData,
}

type Labels = Vec<(String, String)>;

/// Splits `name{a="b",c="d"} value` into its parts; `None` for a line that is not a sample.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series, Vec::new(), value));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut v = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                '"' => break,
                c => v.push(c),
            }
        }
        labels.push((key, v));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name, labels, value))
}

fn point(labels: Vec<(String, String)>, value: f64) -> Point {
    Point { labels, value, bucket_counts: Vec::new(), bounds: Vec::new(), count: 0, sum: 0.0 }
}

/// Reads the Prometheus text exposition ncps renders into OTLP metric data.
pub fn from_prometheus(text: &str) -> Vec<Metric> {
    let mut out: Vec<Metric> = Vec::new();
    let mut help = String::new();
    let mut family = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').map_or("", |(_, h)| h).replace("\\n", "\n").replace("\\\\", "\\");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, k) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            family = name.to_string();
            let data = match k {
                "counter" => MetricData::Counter(Vec::new()),
                "histogram" => MetricData::Histogram(Vec::new()),
                _ => MetricData::Gauge(Vec::new()),
            };
            out.push(Metric { name: family.clone(), help: std::mem::take(&mut help), data });
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((name, mut labels, value)) = sample(line) else { continue };
        let Some(metric) = out.last_mut().filter(|m| name.starts_with(m.name.as_str())) else { continue };
        match &mut metric.data {
            MetricData::Gauge(points) | MetricData::Counter(points) if name == family => points.push(point(labels, value)),
            MetricData::Histogram(points) => {
                let suffix = &name[family.len()..];
                let le = labels.iter().position(|(k, _)| k == "le").map(|i| labels.remove(i).1);
                let p = match points.iter_mut().position(|p| p.labels == labels) {
                    Some(i) => &mut points[i],
                    None => {
                        points.push(point(labels, 0.0));
                        points.last_mut().expect("just pushed")
                    }
                };
                match (suffix, le) {
                    ("_bucket", Some(le)) => {
                        // Cumulative in the text; per bucket in OTLP. +Inf is the last bucket,
                        // which has no bound.
                        let before: u64 = p.bucket_counts.iter().sum();
                        p.bucket_counts.push((value as u64).saturating_sub(before));
                        if le != "+Inf" {
                            p.bounds.push(le.parse().unwrap_or(f64::INFINITY));
                        }
                    }
                    ("_sum", None) => p.sum = value,
                    ("_count", None) => p.count = value as u64,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_families_become_otlp_sums_gauges_and_histograms() {
        let text = "# HELP ncps_a_total Things.\n# TYPE ncps_a_total counter\n\
                    ncps_a_total{result=\"hit\",status=\"success\"} 3\n\
                    # HELP g A gauge.\n# TYPE g gauge\ng 0.5\n\
                    # HELP h_seconds Lat.\n# TYPE h_seconds histogram\n\
                    h_seconds_bucket{upstream_hostname=\"u\",le=\"0.1\"} 2\n\
                    h_seconds_bucket{upstream_hostname=\"u\",le=\"1\"} 5\n\
                    h_seconds_bucket{upstream_hostname=\"u\",le=\"+Inf\"} 6\n\
                    h_seconds_sum{upstream_hostname=\"u\"} 2.5\n\
                    h_seconds_count{upstream_hostname=\"u\"} 6\n";
        let m = from_prometheus(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].name, "ncps_a_total");
        assert_eq!(m[0].help, "Things.");
        let MetricData::Counter(p) = &m[0].data else { panic!("{:?}", m[0]) };
        assert_eq!(p[0].labels, vec![("result".into(), "hit".into()), ("status".into(), "success".into())]);
        assert_eq!(p[0].value, 3.0);
        let MetricData::Gauge(p) = &m[1].data else { panic!() };
        assert_eq!(p[0].value, 0.5);
        let MetricData::Histogram(p) = &m[2].data else { panic!() };
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].labels, vec![("upstream_hostname".into(), "u".into())]);
        assert_eq!(p[0].bucket_counts, vec![2, 3, 1]);
        assert_eq!(p[0].bounds, vec![0.1, 1.0]);
        assert_eq!((p[0].count, p[0].sum), (6, 2.5));
    }

    #[test]
    fn escaped_label_values_are_read_back() {
        let m = from_prometheus("# TYPE x gauge\nx{why=\"a \\\"b\\\" \\\\ c\"} 1\n");
        let MetricData::Gauge(p) = &m[0].data else { panic!() };
        assert_eq!(p[0].labels[0].1, "a \"b\" \\ c");
    }
}
