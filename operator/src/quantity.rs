//! Kubernetes resource quantities (`2Ti`, `400Mi`, `1.5G`, `1000`) as whole numbers.

/// The value of a quantity string, rounded down; None if it is not a valid
/// non-negative quantity.
pub fn to_u64(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let mult: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "m" => 1e-3,
        _ => return None,
    };
    if num.is_empty() {
        return None;
    }
    // Integers stay exact; only fractional values go through floating point.
    if let Ok(n) = num.parse::<u64>()
        && mult >= 1.0
    {
        return n.checked_mul(mult as u64);
    }
    let v: f64 = num.parse().ok()?;
    let r = (v * mult).floor();
    (r.is_finite() && r >= 0.0 && r < u64::MAX as f64).then_some(r as u64)
}

#[cfg(test)]
mod tests {
    use super::to_u64;

    #[test]
    fn binary_decimal_and_fractional_suffixes() {
        assert_eq!(to_u64("2Ti"), Some(2 * 1024u64.pow(4)));
        assert_eq!(to_u64("400Mi"), Some(400 * 1024 * 1024));
        assert_eq!(to_u64("1.5G"), Some(1_500_000_000));
        assert_eq!(to_u64("1000"), Some(1000));
        assert_eq!(to_u64("1500m"), Some(1));
        assert_eq!(to_u64("-1Gi"), None);
        assert_eq!(to_u64("12XB"), None);
        assert_eq!(to_u64(""), None);
    }
}
