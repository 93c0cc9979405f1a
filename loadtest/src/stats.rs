//! Latency summaries (HDR histograms in microseconds) and error tallies.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest value a latency histogram records: 10 minutes, in µs.
const MAX_US: u64 = 600_000_000;

/// A histogram of microseconds, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("1 µs..10 min at 3 figures is a valid range")
}

/// Records `us`, clamped into the histogram's range.
pub fn record(hist: &mut Histogram<u64>, us: u64) {
    hist.saturating_record(us.clamp(1, MAX_US));
}

/// Percentiles of a latency histogram, in µs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Values recorded.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    /// Summarises `hist`.
    pub fn of(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return Self::default();
        }
        Self {
            count: hist.len(),
            p50_us: hist.value_at_quantile(0.50),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
        }
    }
}

/// Counts by name (gRPC code or per-item status), sorted for stable output.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(transparent)]
pub struct Tally(pub BTreeMap<String, u64>);

impl Tally {
    /// Adds `n` to `name`.
    pub fn add(&mut self, name: &str, n: u64) {
        if let Some(v) = self.0.get_mut(name) {
            *v += n;
        } else {
            self.0.insert(name.to_owned(), n);
        }
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Tally) {
        for (k, v) in &other.0 {
            self.add(k, *v);
        }
    }

    /// Sum of all counts.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// `name=count, …`, or `none`.
    pub fn summary(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The tally key of a gRPC error: `<what>:<Code>`.
pub fn code_key(what: &str, status: &tonic::Status) -> String {
    format!("{what}:{:?}", status.code())
}

/// The median of `values` (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn latency_of_an_empty_histogram_is_zero() {
        assert_eq!(Latency::of(&histogram()).count, 0);
    }

    #[test]
    fn tally_merges_and_totals() {
        let mut a = Tally::default();
        a.add("x", 2);
        let mut b = Tally::default();
        b.add("x", 1);
        b.add("y", 5);
        a.merge(&b);
        assert_eq!(a.total(), 8);
        assert_eq!(a.summary(), "x=3, y=5");
    }
}
