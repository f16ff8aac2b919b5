//! Parsing of the Prometheus / OpenMetrics text exposition format.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// All samples of a text exposition, in order. Comment lines (`# HELP`, `# TYPE`, `# EOF`)
/// are skipped; exemplars (` # {...}` after the value) and timestamps are ignored.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_line(line).map_err(|e| anyhow!("metrics line {}: {e}: {line:?}", i + 1))?);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| anyhow!("no value"))?;
    let name = line[..name_end].to_string();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let consumed = loop {
            // skip separators
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some(&(i, '}')) => break i + 1,
                None => bail!("unterminated label set"),
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            match chars.next() {
                Some((_, '"')) => {}
                _ => bail!("label {key} value is not quoted"),
            }
            let mut val = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, c)) => val.push(c),
                        None => bail!("bad escape"),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => val.push(c),
                    None => bail!("unterminated label value"),
                }
            }
            labels.insert(key.trim().to_string(), val);
        };
        rest = &r[consumed..];
    }
    let rest = rest.split(" # ").next().unwrap_or("");
    let value_str = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    let value = match value_str {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse::<f64>()
            .map_err(|e| anyhow!("bad value {v:?}: {e}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Sum of the samples named `name` whose labels include all of `labels`
/// (0 when there is none: counters that never moved may be absent).
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_and_openmetrics_text() {
        let text = r#"# HELP shoal_origin_bytes Bytes.
# TYPE shoal_origin_bytes counter
shoal_origin_bytes_total{kind="blob"} 1234
shoal_origin_bytes_total{kind="manifest",origin="127.0.0.1:5000"} 5.5e2
shoal_origin_bytes_total{kind="manifest",origin="b"} 50 # {trace_id="x"} 1
shoal_transfers_active 2
weird{a="x\"y,z}",b="2"} +Inf 1700000000
# EOF
"#;
        let s = parse(text).unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(
            value(&s, "shoal_origin_bytes_total", &[("kind", "blob")]),
            1234.0
        );
        assert_eq!(
            value(&s, "shoal_origin_bytes_total", &[("kind", "manifest")]),
            600.0
        );
        assert_eq!(value(&s, "shoal_origin_bytes_total", &[]), 1834.0);
        assert_eq!(value(&s, "shoal_transfers_active", &[]), 2.0);
        assert_eq!(value(&s, "missing_total", &[]), 0.0);
        assert_eq!(s[4].labels["a"], "x\"y,z}");
        assert!(s[4].value.is_infinite());
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("foo{a=b} 1").is_err());
        assert!(parse("foo bar").is_err());
    }
}
