//! Go-style durations (`100ms`, `1h30m`, `24h`) plus `d` for days, as Istio's env knobs use.
use std::time::Duration;

/// Parses `1h`, `90d`, `1h30m`, `250ms`, `10s`, or a bare number of seconds.
pub fn parse(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {input:?} is missing a unit (ms, s, m, h, d)"))?;
        if digits_end == 0 {
            return Err(format!("duration {input:?} is not of the form 1h30m, 90d, 250ms"));
        }
        let value: f64 = rest[..digits_end]
            .parse()
            .map_err(|_| format!("bad number in duration {input:?}"))?;
        rest = &rest[digits_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => return Err(format!("unknown unit {other:?} in duration {input:?}")),
        };
        rest = &rest[unit_end..];
        total += Duration::from_secs_f64(value * unit_secs);
    }
    Ok(total)
}

/// Formats a duration the way the parser reads it, in the largest whole unit.
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 || secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    if secs.is_multiple_of(86400) {
        format!("{}d", secs / 86400)
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_and_day_units() {
        assert_eq!(parse("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse("90d").unwrap(), Duration::from_secs(90 * 86400));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("100ms").unwrap(), Duration::from_millis(100));
        assert_eq!(parse("30").unwrap(), Duration::from_secs(30));
        assert!(parse("10x").is_err());
        assert!(parse("h").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn formats_in_largest_unit() {
        assert_eq!(format(Duration::from_secs(86400)), "1d");
        assert_eq!(format(Duration::from_secs(7200)), "2h");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    }
}
