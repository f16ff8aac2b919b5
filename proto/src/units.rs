//! Sizes and rates as operators write them: `512MiB`, `10G`, `100mbit`.

/// A size or rate that does not parse; the message says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UnitError(pub String);

/// Parses a rate into bytes per second: bits as `tc` writes them
/// (`100mbit`, `1gbit`, `800kbit`, decimal), or bytes a second as a size
/// ([`parse_size`], with an optional `/s`: `50MB`, `12MiB/s`).
pub fn parse_rate(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    if let Some(num) = lower.strip_suffix("bit") {
        let (num, mult) = match num.char_indices().last() {
            Some((i, 'k')) => (&num[..i], 1e3),
            Some((i, 'm')) => (&num[..i], 1e6),
            Some((i, 'g')) => (&num[..i], 1e9),
            _ => (num, 1.0),
        };
        let n: f64 = num
            .trim()
            .parse()
            .map_err(|_| UnitError(format!("{s:?} is not a rate (e.g. 100mbit, 1gbit, 50MB)")))?;
        let bytes = n * mult / 8.0;
        if !(1.0..1.8e19).contains(&bytes) {
            return Err(UnitError(format!("{s:?} is out of range")));
        }
        return Ok(bytes as u64);
    }
    parse_size(t.strip_suffix("/s").unwrap_or(t))
        .map_err(|e| UnitError(format!("{} (a rate: e.g. 100mbit, 1gbit, 50MB)", e.0)))
}

/// Parses `1073741824`, `10G`, `512MiB`, `1.5T`.
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        UnitError(format!(
            "{s:?} is not a size (e.g. 10737418240, 10G, 512MiB)"
        ))
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(UnitError(format!(
                "{s:?}: unknown size unit {other:?} (use K, M, G, T, KiB, MiB, GiB, TiB)"
            )))
        }
    };
    let v = n * mult as f64;
    if !(1.0..1.8e19).contains(&v) {
        return Err(UnitError(format!("{s:?} is out of range")));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("16MiB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 1_500_000_000);
        assert_eq!(parse_rate("100mbit").unwrap(), 12_500_000);
        assert_eq!(parse_rate("10gbit").unwrap(), 1_250_000_000);
        assert_eq!(parse_rate("12MiB/s").unwrap(), 12 << 20);
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .0
            .contains("unknown size unit"));
        assert!(parse_rate("fastbit").unwrap_err().0.contains("not a rate"));
        assert!(parse_size("0").unwrap_err().0.contains("out of range"));
    }
}
