//! `ctl list`: every page of one listing.
//!
//! Owns: the paging loop (AIP-158: `page_size`, `page_token`,
//! `next_page_token`), `--limit`, and the check that every page comes from
//! the listing's revision. A listing whose snapshot the registry let go
//! between two pages (ABORTED: it pins it for a minute after each page, and
//! only so many at once) is started again from the first page, a few times.

use tonic::Code;
use tonic::transport::Channel;

use executor_registry::client::ChannelOptions;
use executor_registry::proto::{self, registry_client::RegistryClient};

use super::{CtlError, answer};

/// Listings started again after an ABORTED page before giving up.
const ATTEMPTS: u32 = 3;
/// The registry's page size when `page_size` is 0 (AIP-158 default).
const DEFAULT_PAGE_SIZE: u32 = 1_000;

/// What to list.
pub(super) struct Query {
    /// The request's status (UNSPECIFIED: all).
    pub status: proto::ExecutorStatus,
    /// Selectors, ANDed.
    pub selectors: Vec<proto::LabelSelector>,
    /// Stop after this many executors.
    pub limit: Option<u64>,
    /// Executors per page (None: the registry's default).
    pub page_size: Option<u32>,
}

/// One listing: its pages' executors, all at one revision.
#[derive(Debug, Default)]
pub(super) struct Listing {
    /// The executors, sorted by id.
    pub executors: Vec<proto::Executor>,
    /// The revision every page is consistent with.
    pub revision: u64,
    /// Pages read.
    pub pages: u64,
    /// The limit stopped it before the last page.
    pub truncated: bool,
}

/// Every page of `query` (up to its limit), each call bounded by `timeout`.
pub(super) async fn list(
    endpoint: &str,
    timeout: std::time::Duration,
    client: &mut RegistryClient<Channel>,
    options: &ChannelOptions,
    query: &Query,
) -> Result<Listing, CtlError> {
    let mut attempt = 1;
    loop {
        match pages(endpoint, timeout, client, options, query).await? {
            Ok(listing) => return Ok(listing),
            Err(aborted) if attempt < ATTEMPTS => {
                attempt += 1;
                eprintln!(
                    "note: {}; listing again from the first page",
                    aborted.message()
                );
            }
            Err(aborted) => {
                return Err(CtlError::Other(format!(
                    "the registry at {endpoint} let go of the listing's snapshot {ATTEMPTS} times \
                     between two pages ({}); try again, or a larger --page-size",
                    aborted.message()
                )));
            }
        }
    }
}

/// One attempt at the listing: `Ok(Err(status))` when a page after the
/// first was ABORTED.
async fn pages(
    endpoint: &str,
    timeout: std::time::Duration,
    client: &mut RegistryClient<Channel>,
    options: &ChannelOptions,
    query: &Query,
) -> Result<Result<Listing, tonic::Status>, CtlError> {
    let mut listing = Listing::default();
    let mut token = String::new();
    loop {
        let remaining = query
            .limit
            .map(|limit| limit.saturating_sub(listing.executors.len() as u64));
        // With a limit, no page asks for more than what is left of it.
        let page_size = match (query.page_size, remaining) {
            (size, None) => size.unwrap_or(0),
            (size, Some(left)) => {
                let size = size.unwrap_or(DEFAULT_PAGE_SIZE);
                u32::try_from(left).map_or(size, |left| size.min(left))
            }
        };
        let request = proto::ListExecutorsRequest {
            status: query.status as i32,
            selectors: query.selectors.clone(),
            page_size,
            page_token: std::mem::take(&mut token),
        };
        let page = match answer(
            endpoint,
            timeout,
            client.list_executors(options.request(request)),
        )
        .await?
        {
            Ok(page) => page,
            Err(status) if status.code() == Code::Aborted && listing.pages > 0 => {
                return Ok(Err(status));
            }
            Err(status) => return Err(CtlError::from_status(endpoint, &status)),
        };
        if listing.pages == 0 {
            listing.revision = page.revision;
        } else if page.revision != listing.revision {
            return Err(CtlError::Other(format!(
                "the registry at {endpoint} sent a page at revision {} in a listing at revision {}",
                page.revision, listing.revision
            )));
        }
        listing.pages += 1;
        listing.executors.extend(page.executors);
        if let Some(limit) = query.limit
            && listing.executors.len() as u64 >= limit
        {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            listing.truncated = listing.executors.len() > limit || !page.next_page_token.is_empty();
            listing.executors.truncate(limit);
            return Ok(Ok(listing));
        }
        if page.next_page_token.is_empty() {
            return Ok(Ok(listing));
        }
        token = page.next_page_token;
    }
}
