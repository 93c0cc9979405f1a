//! Paged listings (Google's AIP-158) and snapshot chunks: how much of a
//! snapshot goes in one message, and the snapshots a listing pins.
//!
//! Owns: the page token format, and the pinned snapshots. Every page of one
//! listing comes from the snapshot of its first page's revision: the first
//! page pins it, and each page keeps it pinned for [`PIN_FOR`] more (so a
//! listing that keeps paging is never cut off, and one abandoned lets go a
//! minute later). A token whose snapshot is no longer pinned is ABORTED
//! (list again); a malformed one, or one used with other filters, is
//! INVALID_ARGUMENT. At most [`MAX_PINS`] snapshots are pinned; past that
//! the one idle longest is let go first.
//!
//! Message size: a page or a chunk stops before its encoded size would pass
//! [`MAX_MESSAGE_BYTES`], whatever `page_size` asked, so no message the
//! registry sends exceeds gRPC's default 4 MiB receive limit.
//!
//! Must not touch: registry state (it only holds snapshots it was given).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message;
use tokio::time::Instant;

use crate::proto;
use crate::registry::{Entry, RegistryError, Snapshot, Status};

/// `page_size` 0 means this many.
pub const DEFAULT_PAGE_SIZE: usize = 1_000;
/// A larger `page_size` is treated as this.
pub const MAX_PAGE_SIZE: usize = 10_000;
/// How long a page keeps its listing's snapshot pinned.
pub const PIN_FOR: Duration = Duration::from_secs(60);
/// Most snapshots pinned at once.
pub const MAX_PINS: usize = 256;
/// Largest message the registry sends: gRPC's default receive limit.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// What a page or chunk may fill, leaving room for the message around the
/// executors.
pub(super) const BUDGET_BYTES: usize = MAX_MESSAGE_BYTES - (64 << 10);
/// A snapshot chunk's target size: small, so that the chunks in flight to
/// many watchers at once hold little memory (64 watchers of a 1M fleet:
/// +16 % RSS at 256 KiB, +6 % at 64 KiB, measured at 300,000) and a
/// heartbeat queued on a runtime worker behind a chunk's building and
/// encoding waits a fraction of a millisecond.
pub const CHUNK_BYTES: usize = 64 << 10;

/// Bytes an executor adds to a repeated field of a message.
fn framed_len(executor: &proto::Executor) -> usize {
    let len = executor.encoded_len();
    // Tag (1 byte) and the length's varint.
    1 + prost::length_delimiter_len(len) + len
}

/// Fills a page from `members`: executors until `max_items`, or
/// until the next would take the encoded size past `max_bytes` (always at
/// least one). Returns them, the id of the last, and whether `members` has
/// more.
pub fn fill<'a>(
    members: impl Iterator<Item = (&'a Arc<Entry>, Status)>,
    max_items: usize,
    max_bytes: usize,
    mut convert: impl FnMut(&Entry, Status) -> proto::Executor,
) -> (Vec<proto::Executor>, Option<String>, bool) {
    let max_bytes = max_bytes.min(BUDGET_BYTES);
    let mut members = members.peekable();
    let (mut out, mut bytes, mut last) = (Vec::new(), 0, None);
    while let Some(&(entry, status)) = members.peek() {
        if out.len() >= max_items {
            break;
        }
        let executor = convert(entry, status);
        let len = framed_len(&executor);
        if !out.is_empty() && bytes + len > max_bytes {
            break;
        }
        bytes += len;
        last = Some(entry.id().as_str().to_owned());
        out.push(executor);
        members.next();
    }
    let more = members.peek().is_some();
    (out, last, more)
}

/// The page size a request asks for, per AIP-158.
pub fn page_size(requested: u32) -> usize {
    match requested as usize {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// A page token: the listing's revision, its filter, and the last id sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The revision of the snapshot every page comes from.
    pub revision: u64,
    /// [`filter_key`] of the listing's status and selectors.
    pub filter: u64,
    /// The id of the last executor sent: the next page starts after it.
    pub after: String,
}

impl Token {
    /// The opaque form sent to clients.
    pub fn encode(&self) -> String {
        let after: String = self.after.bytes().map(|b| format!("{b:02x}")).collect();
        format!("v1.{:x}.{:016x}.{after}", self.revision, self.filter)
    }

    /// Parses [`Token::encode`]'s output; anything else is INVALID_ARGUMENT.
    pub fn decode(token: &str) -> Result<Token, RegistryError> {
        let malformed =
            || RegistryError::invalid("page_token", "is not a token this registry issued");
        let mut parts = token.split('.');
        let (Some("v1"), Some(revision), Some(filter), Some(after), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed());
        };
        let revision = u64::from_str_radix(revision, 16).map_err(|_| malformed())?;
        let filter = u64::from_str_radix(filter, 16).map_err(|_| malformed())?;
        if after.is_empty() || after.len() % 2 != 0 {
            return Err(malformed());
        }
        let bytes = (0..after.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&after[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| malformed())?;
        let after = String::from_utf8(bytes).map_err(|_| malformed())?;
        Ok(Token {
            revision,
            filter,
            after,
        })
    }
}

/// A stable key of a listing's filter (the request's status and selectors
/// as sent), so that a token cannot be reused with another.
pub fn filter_key(status: i32, selectors: &[proto::LabelSelector]) -> u64 {
    // SipHash with fixed keys: the same on every call of this process.
    let mut hasher = std::hash::DefaultHasher::new();
    status.hash(&mut hasher);
    for s in selectors {
        (&s.label, &s.target, s.op).hash(&mut hasher);
    }
    hasher.finish()
}

/// The snapshots listings pin, by revision.
#[derive(Debug, Default)]
pub struct Pins {
    pinned: Mutex<HashMap<u64, (Arc<Snapshot>, Instant)>>,
}

impl Pins {
    /// Pins `snapshot` (a first page), or refreshes its pin.
    pub fn pin(&self, snapshot: &Arc<Snapshot>) {
        let now = Instant::now();
        let mut pinned = self.pinned.lock().unwrap_or_else(PoisonError::into_inner);
        pinned.retain(|_, (_, until)| *until > now);
        if pinned.len() >= MAX_PINS && !pinned.contains_key(&snapshot.revision()) {
            let oldest = pinned
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(r, _)| *r);
            if let Some(oldest) = oldest {
                pinned.remove(&oldest);
            }
        }
        pinned.insert(snapshot.revision(), (snapshot.clone(), now + PIN_FOR));
    }

    /// The snapshot pinned at `revision`, pinned for [`PIN_FOR`] more; None
    /// once let go.
    pub fn get(&self, revision: u64) -> Option<Arc<Snapshot>> {
        let now = Instant::now();
        let mut pinned = self.pinned.lock().unwrap_or_else(PoisonError::into_inner);
        let (snapshot, until) = pinned.get_mut(&revision)?;
        if *until <= now {
            pinned.remove(&revision);
            return None;
        }
        *until = now + PIN_FOR;
        Some(snapshot.clone())
    }

    /// Snapshots pinned now.
    pub fn len(&self) -> usize {
        self.pinned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True when none is pinned.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_anything_else_is_invalid_naming_page_token() {
        let token = Token {
            revision: 1 << 40,
            filter: 0xdead_beef,
            after: "name.with.dots-00000000000000ff".into(),
        };
        assert_eq!(Token::decode(&token.encode()), Ok(token.clone()));
        for bad in [
            "",
            "v1",
            "v2.1.2.61",
            "v1.zz.2.61",
            "v1.1.2.",
            "v1.1.2.6",
            "v1.1.2.ff",
            "v1.1.2.61.62",
            &token.encode().replace("v1.", "v1.."),
        ] {
            let e = Token::decode(bad).unwrap_err();
            assert!(
                matches!(
                    &e,
                    RegistryError::InvalidArgument {
                        field: "page_token",
                        ..
                    }
                ),
                "{bad:?}: {e:?}"
            );
        }
    }

    #[test]
    fn page_sizes_follow_aip_158() {
        assert_eq!(page_size(0), 1_000);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(10_000), 10_000);
        assert_eq!(page_size(u32::MAX), 10_000);
    }

    #[test]
    fn the_filter_key_tells_filters_apart() {
        let zone = |v: &str| proto::LabelSelector {
            label: "zone".into(),
            target: v.into(),
            op: proto::SelectorOp::Eq as i32,
        };
        assert_eq!(filter_key(0, &[zone("a")]), filter_key(0, &[zone("a")]));
        assert_ne!(filter_key(0, &[zone("a")]), filter_key(0, &[zone("b")]));
        assert_ne!(filter_key(0, &[zone("a")]), filter_key(2, &[zone("a")]));
        assert_ne!(filter_key(0, &[]), filter_key(0, &[zone("a")]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pin_lasts_a_minute_past_its_last_use_and_the_idlest_goes_first() {
        let pins = Pins::default();
        let snapshot = |r| Arc::new(Snapshot::new(r, Default::default(), 0));
        pins.pin(&snapshot(5));
        tokio::time::advance(PIN_FOR - Duration::from_secs(1)).await;
        assert!(
            pins.get(5).is_some(),
            "used within the minute: kept a minute more"
        );
        tokio::time::advance(PIN_FOR - Duration::from_secs(1)).await;
        assert!(pins.get(5).is_some());
        tokio::time::advance(PIN_FOR).await;
        assert!(pins.get(5).is_none(), "let go a minute after its last use");
        for r in 0..MAX_PINS as u64 {
            pins.pin(&snapshot(100 + r));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        pins.get(100);
        pins.pin(&snapshot(999));
        assert_eq!(pins.len(), MAX_PINS);
        assert!(pins.get(100).is_some(), "just used");
        assert!(pins.get(101).is_none(), "idle longest: let go");
    }
}
