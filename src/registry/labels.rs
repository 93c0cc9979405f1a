//! Label validation and label selectors.
//!
//! Owns: the rules for label keys and values (the reference's rule:
//! `^[a-zA-Z0-9]([-.a-zA-Z0-9]*[a-zA-Z0-9])?$`, 1–63 bytes, at most
//! [`MAX_LABELS`] pairs) and the selector semantics (EQ, NEQ, whole-value
//! REGEX; all selectors ANDed).
//!
//! Must not touch: any registry state. Everything here is pure.

use std::collections::HashMap;

use super::error::RegistryError;

/// Most label pairs an executor may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_LEN: usize = 63;
/// Compiled-size cap for a selector regex, so a hostile pattern cannot make
/// the registry allocate without bound.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;

/// Checks one label key or value; returns what is wrong with it.
pub fn check_label_part(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    if b.is_empty() {
        return Err("must not be empty".into());
    }
    if b.len() > MAX_LABEL_LEN {
        return Err(format!(
            "is {} bytes, at most {MAX_LABEL_LEN} allowed",
            b.len()
        ));
    }
    let alnum = |c: u8| c.is_ascii_alphanumeric();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err("must start and end with an ASCII letter or digit".into());
    }
    if let Some(c) = b.iter().find(|&&c| !(alnum(c) || c == b'-' || c == b'.')) {
        return Err(format!(
            "contains {:?}; only ASCII letters, digits, '-' and '.' are allowed",
            char::from(*c)
        ));
    }
    Ok(())
}

/// A validated label set, sorted by key.
///
/// One allocation for the whole set (a million executors with two labels
/// each would otherwise hold five allocations apiece): the count, then each
/// pair's key and value lengths, one byte each, then the keys and values
/// back to back. Counts (≤ 64) and lengths (≤ 63) are below 128, so the
/// header is ASCII and the whole buffer a `str`; keys and values are ASCII
/// too, so every slice is on a character boundary. Empty: no allocation.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<str>);

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Labels {
    /// Validates and sorts labels; the error names the offending key.
    pub fn new<I, K, V>(pairs: I) -> Result<Self, RegistryError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut out: Vec<(Box<str>, Box<str>)> = Vec::new();
        for (k, v) in pairs {
            let (k, v) = (k.as_ref(), v.as_ref());
            if out.len() == MAX_LABELS {
                return Err(RegistryError::invalid(
                    "labels",
                    format!("more than {MAX_LABELS} labels"),
                ));
            }
            check_label_part(k).map_err(|why| {
                RegistryError::invalid("labels", format!("key {:?} {why}", truncate(k)))
            })?;
            check_label_part(v).map_err(|why| {
                RegistryError::invalid(
                    "labels",
                    format!("value of {k:?} ({:?}) {why}", truncate(v)),
                )
            })?;
            out.push((k.into(), v.into()));
        }
        out.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = out.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(RegistryError::invalid(
                "labels",
                format!("key {:?} appears twice", w[0].0),
            ));
        }
        if out.is_empty() {
            return Ok(Self::default());
        }
        let data: usize = out.iter().map(|(k, v)| k.len() + v.len()).sum();
        let mut encoded = String::with_capacity(1 + 2 * out.len() + data);
        // Validated above: count ≤ MAX_LABELS and lengths ≤ MAX_LABEL_LEN,
        // all below 128, so each is one ASCII character.
        encoded.push(char::from(out.len() as u8));
        for (k, v) in &out {
            encoded.push(char::from(k.len() as u8));
            encoded.push(char::from(v.len() as u8));
        }
        for (k, v) in &out {
            encoded.push_str(k);
            encoded.push_str(v);
        }
        Ok(Self(encoded.into_boxed_str()))
    }

    /// The labels as an entry keeps them: this encoded form, borrowed.
    pub fn view(&self) -> LabelsRef<'_> {
        LabelsRef(&self.0)
    }

    /// The encoded form (an entry stores it after its name and address;
    /// [`LabelsRef::new`] reads it back).
    pub(crate) fn encoded(&self) -> &str {
        &self.0
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.view().get(key)
    }

    /// Pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.view().iter()
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.view().len()
    }

    /// True when there are no labels.
    pub fn is_empty(&self) -> bool {
        self.view().is_empty()
    }

    /// The labels as an owned map (for the wire format).
    pub fn to_map(&self) -> HashMap<String, String> {
        self.view().to_map()
    }
}

/// Validated labels, borrowed from where they are kept (an entry, a
/// [`Labels`]): the encoded form [`Labels::new`] makes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct LabelsRef<'a>(&'a str);

impl std::fmt::Debug for LabelsRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<'a> LabelsRef<'a> {
    /// Reads back what [`Labels::encoded`] gave (no validation: it was
    /// validated when made).
    pub(crate) fn new(encoded: &'a str) -> Self {
        Self(encoded)
    }

    /// The value of `key`, if present.
    pub fn get(self, key: &str) -> Option<&'a str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// Pairs in key order.
    pub fn iter(self) -> impl Iterator<Item = (&'a str, &'a str)> {
        let text = self.0;
        let bytes = text.as_bytes();
        let n = self.len();
        let mut at = 1 + 2 * n;
        (0..n).map(move |i| {
            let key_len = usize::from(bytes[1 + 2 * i]);
            let value_len = usize::from(bytes[2 + 2 * i]);
            let key = &text[at..at + key_len];
            let value = &text[at + key_len..at + key_len + value_len];
            at += key_len + value_len;
            (key, value)
        })
    }

    /// Number of pairs.
    pub fn len(self) -> usize {
        self.0.as_bytes().first().map_or(0, |&n| usize::from(n))
    }

    /// True when there are no labels.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// The labels as an owned map (for the wire format).
    pub fn to_map(self) -> HashMap<String, String> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// Cuts a hostile value short for an error message.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// How a selector compares a label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorOp {
    /// Label present and equal to the target.
    Eq,
    /// Label absent, or present and different.
    Neq,
    /// Label present and its whole value matches the target regex.
    Regex,
}

/// A compiled label selector.
#[derive(Debug, Clone)]
pub struct Selector {
    label: Box<str>,
    kind: SelectorKind,
}

#[derive(Debug, Clone)]
enum SelectorKind {
    Eq(Box<str>),
    Neq(Box<str>),
    Regex(regex::Regex),
}

impl Selector {
    /// Validates and compiles a selector. `op` = None is the wire's
    /// UNSPECIFIED and is refused.
    pub fn new(label: &str, target: &str, op: Option<SelectorOp>) -> Result<Self, RegistryError> {
        check_label_part(label).map_err(|why| {
            RegistryError::invalid("selectors.label", format!("{:?} {why}", truncate(label)))
        })?;
        let kind = match op {
            None => {
                return Err(RegistryError::invalid(
                    "selectors.op",
                    format!("selector on {label:?} has no op (UNSPECIFIED); use EQ, NEQ or REGEX"),
                ));
            }
            Some(SelectorOp::Eq) => SelectorKind::Eq(target.into()),
            Some(SelectorOp::Neq) => SelectorKind::Neq(target.into()),
            Some(SelectorOp::Regex) => {
                let re = regex::RegexBuilder::new(&format!("^(?:{target})$"))
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| {
                        RegistryError::invalid(
                            "selectors.target",
                            format!("regex {:?} does not compile: {e}", truncate(target)),
                        )
                    })?;
                SelectorKind::Regex(re)
            }
        };
        Ok(Self {
            label: label.into(),
            kind,
        })
    }

    /// Whether `labels` satisfy this selector.
    pub fn matches(&self, labels: LabelsRef<'_>) -> bool {
        let value = labels.get(&self.label);
        match (&self.kind, value) {
            (SelectorKind::Eq(t), Some(v)) => **t == *v,
            (SelectorKind::Eq(_), None) => false,
            (SelectorKind::Neq(t), Some(v)) => **t != *v,
            (SelectorKind::Neq(_), None) => true,
            (SelectorKind::Regex(re), Some(v)) => re.is_match(v),
            (SelectorKind::Regex(_), None) => false,
        }
    }
}

/// Whether `labels` satisfy every selector (an empty list matches all).
pub fn matches_all(selectors: &[Selector], labels: LabelsRef<'_>) -> bool {
    selectors.iter().all(|s| s.matches(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_part_rule_table() {
        let ok = [
            "a",
            "A",
            "0",
            "a-b",
            "a.b",
            "a--b",
            "x1.y2-z3",
            &"a".repeat(63),
        ];
        for s in ok {
            assert!(check_label_part(s).is_ok(), "{s:?} should be valid");
        }
        let bad = [
            "",
            &"a".repeat(64),
            "-a",
            "a-",
            ".a",
            "a.",
            "a_b",
            "_",
            "a b",
            "é",
            "aé",
            "a/b",
            "a\u{0}b",
        ];
        for s in bad {
            assert!(check_label_part(s).is_err(), "{s:?} should be invalid");
        }
    }

    #[test]
    fn labels_are_sorted_and_looked_up() {
        let l = Labels::new([("zone", "b"), ("arch", "x86")]).unwrap();
        assert_eq!(
            l.iter().collect::<Vec<_>>(),
            vec![("arch", "x86"), ("zone", "b")]
        );
        assert_eq!(l.get("zone"), Some("b"));
        assert_eq!(l.get("nope"), None);
    }

    #[test]
    fn labels_errors_name_the_field_and_problem() {
        let e = Labels::new([("a_b", "x")]).unwrap_err();
        assert!(
            e.to_string().contains("labels") && e.to_string().contains("a_b"),
            "{e}"
        );
        let e = Labels::new([("k", "")]).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        let many: Vec<(String, String)> = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(
            Labels::new(many)
                .unwrap_err()
                .to_string()
                .contains("more than 64")
        );
        let max: Vec<(String, String)> = (0..64)
            .map(|i| (format!("k{i:02}"), "v".repeat(63)))
            .collect();
        let labels = Labels::new(max.clone()).unwrap();
        assert_eq!(labels.len(), 64);
        let back: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert_eq!(back, max, "the longest set round-trips");
        assert_eq!(labels.get("k63"), Some(&*"v".repeat(63)));
        let empty = Labels::new(Vec::<(String, String)>::new()).unwrap();
        assert!(empty.is_empty() && empty.iter().next().is_none());
        assert_eq!(empty, Labels::default());
        assert_eq!(empty.get("k"), None);
    }

    #[test]
    fn selector_semantics() {
        let l = Labels::new([("zone", "us-east-1"), ("gpu", "a100")]).unwrap();
        let sel = |label, target, op| Selector::new(label, target, Some(op)).unwrap();
        assert!(sel("zone", "us-east-1", SelectorOp::Eq).matches(l.view()));
        assert!(!sel("zone", "us-east", SelectorOp::Eq).matches(l.view()));
        assert!(!sel("missing", "x", SelectorOp::Eq).matches(l.view()));
        // NEQ on a missing label is true.
        assert!(sel("missing", "x", SelectorOp::Neq).matches(l.view()));
        assert!(sel("zone", "eu", SelectorOp::Neq).matches(l.view()));
        assert!(!sel("zone", "us-east-1", SelectorOp::Neq).matches(l.view()));
        // REGEX matches the whole value, not a substring.
        assert!(sel("zone", "us-.*", SelectorOp::Regex).matches(l.view()));
        assert!(!sel("zone", "east", SelectorOp::Regex).matches(l.view()));
        assert!(!sel("zone", "us|x", SelectorOp::Regex).matches(l.view()));
        assert!(!sel("missing", ".*", SelectorOp::Regex).matches(l.view()));
        // AND of all.
        let both = [
            sel("zone", "us-.*", SelectorOp::Regex),
            sel("gpu", "a100", SelectorOp::Eq),
        ];
        assert!(matches_all(&both, l.view()));
        let one_fails = [
            sel("zone", "us-.*", SelectorOp::Regex),
            sel("gpu", "h100", SelectorOp::Eq),
        ];
        assert!(!matches_all(&one_fails, l.view()));
        assert!(matches_all(&[], l.view()));
    }

    #[test]
    fn invalid_selectors_are_refused_with_the_field_named() {
        let e = Selector::new("bad key", "x", Some(SelectorOp::Eq)).unwrap_err();
        assert!(e.to_string().contains("selectors.label"), "{e}");
        let e = Selector::new("k", "x", None).unwrap_err();
        assert!(e.to_string().contains("selectors.op"), "{e}");
        let e = Selector::new("k", "(", Some(SelectorOp::Regex)).unwrap_err();
        assert!(e.to_string().contains("selectors.target"), "{e}");
        let e = Selector::new("k", "a{100000}{100000}", Some(SelectorOp::Regex)).unwrap_err();
        assert!(e.to_string().contains("selectors.target"), "{e}");
    }
}
