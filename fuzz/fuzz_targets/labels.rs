//! Label validation, selectors and their matching, on arbitrary strings.
//!
//! Input: bytes split on 0xFF into fields; fields are taken as label pairs
//! (key, value) and one selector (label, target, op byte). Checked: no
//! panic, `Labels::new` accepts exactly what `check_label_part` accepts for
//! every part (at most `MAX_LABELS` pairs, keys unique), an accepted set
//! answers `get` with what was given, and a compiled selector agrees with a
//! direct evaluation of EQ and NEQ.
#![no_main]

use std::collections::HashMap;

use executor_registry::registry::{Labels, MAX_LABELS, Selector, SelectorOp, check_label_part};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut fields: Vec<String> = data
        .split(|&b| b == 0xFF)
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    let op = fields.pop().and_then(|f| f.bytes().next()).unwrap_or(0);
    let target = fields.pop().unwrap_or_default();
    let label = fields.pop().unwrap_or_default();
    let pairs: Vec<(String, String)> = fields
        .chunks(2)
        .map(|c| (c[0].clone(), c.get(1).cloned().unwrap_or_default()))
        .collect();

    let parts_ok = pairs
        .iter()
        .all(|(k, v)| check_label_part(k).is_ok() && check_label_part(v).is_ok());
    let mut unique = HashMap::new();
    let keys_unique = pairs
        .iter()
        .all(|(k, v)| unique.insert(k.as_str(), v.as_str()).is_none());
    let labels = Labels::new(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    match &labels {
        Ok(l) => {
            assert!(
                parts_ok && pairs.len() <= MAX_LABELS,
                "accepted invalid labels {pairs:?}"
            );
            assert_eq!(l.len(), pairs.len());
            for (k, v) in &pairs {
                assert_eq!(l.get(k), Some(v.as_str()));
            }
            let mut sorted: Vec<&str> = l.iter().map(|(k, _)| k).collect();
            let before = sorted.clone();
            sorted.sort_unstable();
            assert_eq!(before, sorted, "labels are sorted by key");
        }
        Err(e) => {
            // Duplicate keys may be refused; anything else must be invalid.
            assert!(
                !(parts_ok && pairs.len() <= MAX_LABELS && keys_unique),
                "refused valid labels {pairs:?}: {e}"
            );
            assert!(
                e.to_string().contains("labels"),
                "error names the field: {e}"
            );
        }
    }

    let op = match op % 4 {
        0 => None,
        1 => Some(SelectorOp::Eq),
        2 => Some(SelectorOp::Neq),
        _ => Some(SelectorOp::Regex),
    };
    let selector = Selector::new(&label, &target, op);
    if check_label_part(&label).is_err() || op.is_none() {
        assert!(
            selector.is_err(),
            "accepted selector on {label:?} with {op:?}"
        );
    }
    if let (Ok(selector), Ok(labels)) = (selector, labels) {
        let matched = selector.matches(&labels);
        let value = labels.get(&label);
        match op {
            Some(SelectorOp::Eq) => assert_eq!(matched, value == Some(target.as_str())),
            Some(SelectorOp::Neq) => assert_eq!(matched, value != Some(target.as_str())),
            _ => {
                if value.is_none() {
                    assert!(!matched);
                }
            }
        }
    }
});
