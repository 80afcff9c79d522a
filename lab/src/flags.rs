//! Value parsers shared by the lab tools' flags: numbers that must be finite and in range, so
//! that a bad value is a usage error from clap rather than a failed run.

pub(crate) fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

pub(crate) fn at_least_one(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 1.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number ≥ 1")),
    }
}

pub(crate) fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a number ≥ 0")),
    }
}
