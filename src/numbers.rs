//! Integers as clients send them. JSON has one number type, and `2` and `2.0` are the same
//! number (JSON Schema calls both an integer), so request fields that hold integers accept
//! a whole number written with a fraction part; `2.5` is still refused.

use serde::{Deserialize, Deserializer};

/// A JSON number that is a whole number, as `i64`.
fn whole(n: &serde_json::Number) -> Option<i64> {
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    let f = n.as_f64()?;
    // 2^63 is the first float outside i64.
    (f.fract() == 0.0 && f >= -(2f64.powi(63)) && f < 2f64.powi(63)).then_some(f as i64)
}

/// `Option<i64>` that also takes `2.0`.
pub fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => whole(&n)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a whole number"))),
    }
}

/// `Option<u64>` that also takes `2.0`.
pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<serde_json::Number>::deserialize(d)? {
        None => Ok(None),
        Some(n) => n
            .as_u64()
            .or_else(|| whole(&n).and_then(|i| u64::try_from(i).ok()))
            .map(Some)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("{n} is not a non-negative whole number"))
            }),
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "super::opt_i64")]
        i: Option<i64>,
        #[serde(default, deserialize_with = "super::opt_u64")]
        u: Option<u64>,
    }

    fn parse(s: &str) -> Result<Body, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn whole_numbers_with_a_fraction_part_are_integers() {
        let b = parse(r#"{"i": -2.0, "u": 9.0}"#).unwrap();

        assert_eq!((b.i, b.u), (Some(-2), Some(9)));
    }

    #[test]
    fn fractions_negatives_and_absent_fields_are_told_apart() {
        assert!(parse(r#"{"i": 2.5}"#).is_err());
        assert!(parse(r#"{"u": -1}"#).is_err());
        assert!(parse(r#"{"u": 1e300}"#).is_err());
        let b = parse(r#"{"i": null}"#).unwrap();
        assert_eq!((b.i, b.u), (None, None));
    }
}
