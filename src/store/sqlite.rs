//! The default durable store: one SQLite database, `<data-dir>/registry.db`.
//!
//! Owns: the connection to that file, its schema, and the data directory's
//! lock (`<data-dir>/registry.lock`, see [`LOCK_FILE_NAME`]). The file is in WAL mode
//! with `synchronous=FULL`, so a commit that returned `Ok` has been fsynced
//! and survives `kill -9` and power loss. A batch is one `BEGIN IMMEDIATE` …
//! `COMMIT`: all of it is durable or none of it.
//!
//! Invariants:
//! - One process at a time: `open` takes an exclusive advisory lock on the
//!   lock file before it touches the database, and the store holds it until
//!   it is dropped (the kernel releases it when the process dies, `kill -9`
//!   included). A second registry on the same directory is refused at start
//!   instead of sharing the file, where both would hand out membership and
//!   delete each other's rows.
//! - The connection is never left inside a transaction between calls: a
//!   failed commit is rolled back before it returns, so the store works
//!   again as soon as the cause (full disk, lock, I/O error) goes away.
//! - What `commit` accepts, `load_all` can read back: labels are checked
//!   against the encoding's rules before they are written.
//! - The schema version lives in `PRAGMA user_version`; [`MIGRATIONS`] takes
//!   it forward, and a file from a newer binary is refused, never touched.
//!
//! Rows are keyed by `seq`, an `INTEGER PRIMARY KEY` in insertion order, and
//! the table has no index on `id`. Ids are random (`name-<random hex>`): an
//! index on them puts every insert on a random page, so a commit of N
//! registrations wrote ~N pages to the WAL (and checkpoints wrote them
//! again), while inserts in `seq` order share the last pages. With the index,
//! a batch of 256 into 200,000 rows took 3.6 ms; without, 0.5 ms (schema
//! version 2). Deletes find their row through [`RowIndex`], a map in memory
//! from a hash of the id to its `seq`, built at the first load; uniqueness
//! of ids, which the index used to enforce, is checked there.
//!
//! Labels are stored in one TEXT column as `key=value` lines joined by `\n`,
//! in ascending key order (`""` when there are none). Keys never contain `=`
//! and neither part contains `\n`; label rules (`[-.a-zA-Z0-9]`, non-empty)
//! are stricter still, and the table stays readable with the `sqlite3` shell.

use std::collections::HashMap;
use std::collections::hash_map::{DefaultHasher, Entry};
use std::fmt::Display;
use std::fs::{File, OpenOptions, TryLockError};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior, params};

use crate::registry::{Batch, MembershipStore, StoreError, StoredExecutor};

/// The database file's name inside the data directory.
pub const DB_FILE_NAME: &str = "registry.db";

/// The lock file's name inside the data directory.
pub const LOCK_FILE_NAME: &str = "registry.lock";

/// How long a statement waits for a lock held by another connection (an
/// operator's `sqlite3` shell, a backup) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// WAL pages written before SQLite checkpoints them into the database.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 10_000;
/// Size the WAL file is truncated back to after a checkpoint.
const JOURNAL_SIZE_LIMIT_BYTES: i64 = 64 << 20;
/// Page cache bound while large batches are written (a registration storm,
/// the load at start); negative means KiB (64 MiB): a batch of thousands of
/// rows at random places in the id index does not spill dirty pages to the
/// WAL mid-transaction.
const BATCH_CACHE_KIB: i64 = -65_536;
/// Page cache bound otherwise (8 MiB). Steady churn writes a few rows per
/// commit; a page it misses is read back from the OS's file cache. Without
/// this bound the cache grows towards the file's size as churn touches page
/// after page, and the process's memory with it, whatever the live set.
const STEADY_CACHE_KIB: i64 = -8_192;
/// A batch of at least this many rows (inserts + deletes) is large.
const LARGE_BATCH_ROWS: usize = 1_024;

/// Schema migrations, in order: entry `i` takes the schema from version `i`
/// to `i + 1`. Append only; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the executors table.
    "CREATE TABLE executors (
        id                 TEXT    NOT NULL PRIMARY KEY,
        name               TEXT    NOT NULL,
        address            TEXT    NOT NULL,
        labels             TEXT    NOT NULL,
        registered_unix_ms INTEGER NOT NULL
    ) STRICT;",
    // 2: rows in insertion order, no index on the random ids (see the
    // module header). Existing rows are renumbered in id order.
    "CREATE TABLE executors_v2 (
        seq                INTEGER PRIMARY KEY,
        id                 TEXT    NOT NULL,
        name               TEXT    NOT NULL,
        address            TEXT    NOT NULL,
        labels             TEXT    NOT NULL,
        registered_unix_ms INTEGER NOT NULL
    ) STRICT;
    INSERT INTO executors_v2 (id, name, address, labels, registered_unix_ms)
        SELECT id, name, address, labels, registered_unix_ms FROM executors ORDER BY id;
    DROP TABLE executors;
    ALTER TABLE executors_v2 RENAME TO executors;",
    // 3: the identity that registered each executor (NULL: unowned, as
    // every row written by an older binary is).
    "ALTER TABLE executors ADD COLUMN owner TEXT;",
    // 4: small named values; `revision_floor` is above every revision the
    // registry assigned on this file (absent: 0).
    "CREATE TABLE meta (
        key   TEXT    NOT NULL PRIMARY KEY,
        value INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID;",
];

const INSERT: &str = "INSERT INTO executors (id, name, address, labels, registered_unix_ms, owner) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
/// By row, and only if the row is that id's: a hash collision in the
/// [`RowIndex`] can never delete another executor.
const DELETE: &str = "DELETE FROM executors WHERE seq = ?1 AND id = ?2";
const SELECT_ID: &str = "SELECT id FROM executors WHERE seq = ?1";
const SELECT_IDS: &str = "SELECT seq, id FROM executors";
const SELECT_ALL: &str =
    "SELECT seq, id, name, address, labels, registered_unix_ms, owner FROM executors";
const SELECT_REVISION_FLOOR: &str = "SELECT value FROM meta WHERE key = 'revision_floor'";
const UPSERT_REVISION_FLOOR: &str = "INSERT INTO meta (key, value) VALUES ('revision_floor', ?1) \
                                     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// The hash of an id the [`RowIndex`] keys on.
fn id_hash(id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    id.hash(&mut hasher);
    hasher.finish()
}

/// Where each stored id's row is: `seq` by a 64-bit hash of the id, 16
/// bytes an executor plus the map's slack (under 40 MB at a million), where
/// keeping the ids themselves would double that at least. The few ids whose hash another stored id already has are kept by
/// id in `colliding`. A lookup may answer another id's row (a collision):
/// callers check the row's id in SQL.
#[derive(Debug, Default)]
struct RowIndex {
    by_hash: HashMap<u64, i64>,
    colliding: HashMap<String, i64>,
}

impl RowIndex {
    /// The row `id` is probably in.
    fn get(&self, id: &str) -> Option<i64> {
        self.colliding
            .get(id)
            .or_else(|| self.by_hash.get(&id_hash(id)))
            .copied()
    }

    fn insert(&mut self, id: &str, seq: i64) {
        match self.by_hash.entry(id_hash(id)) {
            Entry::Vacant(slot) => {
                slot.insert(seq);
            }
            Entry::Occupied(_) => {
                self.colliding.insert(id.to_owned(), seq);
            }
        }
    }

    fn remove(&mut self, id: &str, seq: i64) {
        if self.colliding.remove(id).is_some() {
            return;
        }
        if let Entry::Occupied(slot) = self.by_hash.entry(id_hash(id))
            && *slot.get() == seq
        {
            slot.remove();
        }
    }
}

/// [`MembershipStore`] on an embedded SQLite database.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    /// The database file, for error messages.
    path: PathBuf,
    /// Rows by id; built by the first `load_all` (or commit).
    index: Option<RowIndex>,
    /// The page cache bound in force (`PRAGMA cache_size`).
    cache_kib: i64,
    /// The data directory's lock, held while the store lives. Declared after
    /// `conn` so it is released only once the connection is closed.
    _lock: File,
}

impl SqliteStore {
    /// Opens (or creates) `<data_dir>/registry.db`, creating `data_dir` if
    /// missing, and brings its schema up to date.
    ///
    /// Fails, naming the file, when it cannot be read and written, is not a
    /// SQLite database, is corrupt, or has a schema newer than this binary;
    /// and, naming the directory, when another process holds its lock.
    pub fn open(data_dir: &Path) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Failed(format!("create data directory {}: {e}", data_dir.display()))
        })?;
        let path = data_dir.join(DB_FILE_NAME);
        let lock = lock_data_dir(data_dir, &path)?;
        let fail = |what: &str, e: &dyn Display| {
            StoreError::Failed(format!("open {}: {what}: {e}", path.display()))
        };

        // SQLite would silently fall back to read-only on a write-protected
        // file; we want to know now, not at the first registration.
        match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => {
                return Err(fail("not a regular file", &"refusing to use it"));
            }
            Ok(_) => {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(|e| fail("cannot read and write the file", &e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail("cannot inspect the file", &e)),
        }

        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        // SQLite reads the file lazily: garbage, a truncated file or another
        // program's data fail at the first pragma, not here.
        let sql = |what: &str, e: rusqlite::Error| match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => fail(
                "not a usable registry database",
                &format!(
                    "{} (restore it from a backup, or move it away to start empty)",
                    explain(&e)
                ),
            ),
            Some(ErrorCode::CannotOpen | ErrorCode::ReadOnly) => fail(
                what,
                &format!(
                    "{} (the file and its directory must be writable: SQLite creates \
                     {DB_FILE_NAME}-wal and {DB_FILE_NAME}-shm beside it)",
                    explain(&e)
                ),
            ),
            _ => fail(what, &explain(&e)),
        };
        let mut conn = Connection::open_with_flags(&path, flags).map_err(|e| sql("sqlite", e))?;
        if conn.is_readonly("main").map_err(|e| sql("sqlite", e))? {
            return Err(fail(
                "opened read-only",
                &"the file or its directory is not writable",
            ));
        }
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| sql("set busy timeout", e))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
            .map_err(|e| sql("enable WAL", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(fail(
                "cannot enable WAL",
                &format!("journal mode is {mode:?}"),
            ));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| sql("set synchronous=FULL", e))?;
        let synchronous: i64 = conn
            .pragma_query_value(None, "synchronous", |row| row.get(0))
            .map_err(|e| sql("read synchronous", e))?;
        if synchronous != 2 {
            return Err(fail(
                "cannot set synchronous=FULL",
                &format!("it is {synchronous}"),
            ));
        }

        // With the registry's ids (`name-<random hex>`) each insert dirties
        // an index page of its own, and with the default (1,000 pages) a
        // checkpoint ran every few batches and cost more than the fsyncs:
        // 10,000 pages (~40 MiB of WAL) about doubled durable registrations
        // per second at 300 a batch. The size limit truncates the WAL back
        // after a checkpoint; the page cache (64 MiB at most while large
        // batches come, grown on demand, 8 MiB once the store is idle: see
        // `BATCH_CACHE_KIB`) keeps a batch from spilling pages
        // mid-transaction.
        for (pragma, value) in [
            ("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES),
            ("journal_size_limit", JOURNAL_SIZE_LIMIT_BYTES),
            ("cache_size", BATCH_CACHE_KIB),
        ] {
            conn.pragma_update(None, pragma, value)
                .map_err(|e| sql(&format!("set {pragma}"), e))?;
        }

        // Reads every page once: a corrupt file is refused at start, not
        // discovered by a registration later.
        let check: String = conn
            .pragma_query_value(None, "quick_check", |row| row.get(0))
            .map_err(|e| sql("integrity check", e))?;
        if check != "ok" {
            return Err(fail(
                "not a usable registry database",
                &format!(
                    "integrity check failed: {check} (restore it from a backup, or move it \
                     away to start empty)"
                ),
            ));
        }

        migrate(&mut conn, MIGRATIONS).map_err(|e| fail("schema", &e))?;
        Ok(SqliteStore {
            conn,
            path,
            index: None,
            cache_kib: BATCH_CACHE_KIB,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the page cache bound; lowering it frees the pages over it at
    /// once. A failure only costs memory or speed: logged, not returned.
    fn set_cache(&mut self, kib: i64) {
        if self.cache_kib == kib {
            return;
        }
        match self.conn.pragma_update(None, "cache_size", kib) {
            Ok(()) => self.cache_kib = kib,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "set the page cache size")
            }
        }
    }

    fn error(&self, op: &str, e: &rusqlite::Error) -> StoreError {
        classify(e, format!("{op} {}: {}", self.path.display(), explain(e)))
    }

    /// The row index, read from the table the first time it is needed.
    fn index(&mut self) -> Result<&mut RowIndex, StoreError> {
        if self.index.is_none() {
            let mut index = RowIndex::default();
            let mut select = self
                .conn
                .prepare_cached(SELECT_IDS)
                .map_err(|e| self.error("load from", &e))?;
            let rows = select
                .query_map([], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
                })
                .map_err(|e| self.error("load from", &e))?;
            for row in rows {
                let (seq, id) = row.map_err(|e| self.error("load from", &e))?;
                index.insert(&id, seq);
            }
            self.index = Some(index);
        }
        Ok(self.index.as_mut().expect("the index was just built"))
    }

    /// Writes `batch` in one transaction, then brings the index up to date.
    fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.index()?;
        let path = self.path.display();
        let fail = |what: String| StoreError::Failed(format!("commit to {path}: {what}"));
        let sql = |what: &str, e: &rusqlite::Error| {
            classify(e, format!("commit to {path}: {what}: {}", explain(e)))
        };
        let index = self.index.as_ref().expect("built above");
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| sql("begin", &e))?;
        // Rows this batch inserts, by id (also catches an id twice in it).
        let mut added: HashMap<&str, i64> = HashMap::with_capacity(batch.inserts.len());
        let mut removed: Vec<(&str, i64)> = Vec::with_capacity(batch.deletes.len());
        {
            let mut insert = tx
                .prepare_cached(INSERT)
                .map_err(|e| sql("prepare insert", &e))?;
            let mut select_id = tx
                .prepare_cached(SELECT_ID)
                .map_err(|e| sql("prepare select", &e))?;
            let mut labels = String::new();
            for row in &batch.inserts {
                let duplicate = || fail(format!("insert {:?}: the id is already stored", row.id));
                if added.contains_key(row.id.as_str()) {
                    return Err(duplicate());
                }
                if let Some(seq) = index.get(&row.id) {
                    let stored: Option<String> = select_id
                        .query_row([seq], |r| r.get(0))
                        .map(Some)
                        .or_else(|e| match e {
                            rusqlite::Error::QueryReturnedNoRows => Ok(None),
                            e => Err(e),
                        })
                        .map_err(|e| sql(&format!("insert {:?}", row.id), &e))?;
                    if stored.as_deref() == Some(row.id.as_str()) {
                        return Err(duplicate());
                    }
                }
                encode_labels(&row.labels, &mut labels)
                    .map_err(|why| fail(format!("insert {:?}: {why}", row.id)))?;
                let registered = i64::try_from(row.registered_unix_ms).map_err(|_| {
                    fail(format!(
                        "insert {:?}: registered_unix_ms {} does not fit in an INTEGER",
                        row.id, row.registered_unix_ms
                    ))
                })?;
                insert
                    .execute(params![
                        row.id,
                        row.name,
                        row.address,
                        labels,
                        registered,
                        row.owner
                    ])
                    .map_err(|e| sql(&format!("insert {:?}", row.id), &e))?;
                added.insert(&row.id, tx.last_insert_rowid());
            }
            let mut delete = tx
                .prepare_cached(DELETE)
                .map_err(|e| sql("prepare delete", &e))?;
            if let Some(floor) = batch.revision_floor {
                let floor = i64::try_from(floor).map_err(|_| {
                    fail(format!("revision floor {floor} does not fit in an INTEGER"))
                })?;
                tx.execute(UPSERT_REVISION_FLOOR, [floor])
                    .map_err(|e| sql("store the revision floor", &e))?;
            }
            for id in &batch.deletes {
                let candidates = [added.get(id.as_str()).copied(), index.get(id)];
                for seq in candidates.into_iter().flatten() {
                    let deleted = delete
                        .execute(params![seq, id])
                        .map_err(|e| sql(&format!("delete {id:?}"), &e))?;
                    if deleted > 0 {
                        removed.push((id, seq));
                        break;
                    }
                }
            }
        }
        if let Err(e) = tx.commit() {
            // A failed COMMIT may still have reached the WAL (a write that
            // went through, then a failed fsync): read the index afresh
            // next time rather than trust it.
            self.index = None;
            return Err(sql("commit", &e));
        }
        let index = self.index.as_mut().expect("built above");
        for (id, seq) in added {
            index.insert(id, seq);
        }
        for (id, seq) in removed {
            index.remove(id, seq);
        }
        Ok(())
    }
}

impl MembershipStore for SqliteStore {
    /// Every stored executor, sorted by id; also (re)builds the row index.
    /// An id stored twice (only a hand-edited file can have one) is an error
    /// naming it.
    fn load_all(&mut self) -> Result<Vec<StoredExecutor>, StoreError> {
        let mut select = self
            .conn
            .prepare_cached(SELECT_ALL)
            .map_err(|e| self.error("load from", &e))?;
        let mut rows = select.query([]).map_err(|e| self.error("load from", &e))?;
        let mut out = Vec::new();
        let mut seqs = Vec::new();
        let path = self.path.display();
        loop {
            let row = match rows.next() {
                Ok(Some(row)) => row,
                Ok(None) => break,
                Err(e) => {
                    return Err(StoreError::Failed(format!(
                        "load from {path}: {}",
                        explain(&e)
                    )));
                }
            };
            let seq: i64 = row.get(0).map_err(|e| {
                StoreError::Failed(format!(
                    "load from {path}: row {} has a bad seq: {e}",
                    out.len()
                ))
            })?;
            let id: String = row.get(1).map_err(|e| {
                StoreError::Failed(format!("load from {path}: row {seq} has a bad id: {e}"))
            })?;
            let bad = |what: &str, e: &dyn Display| {
                StoreError::Failed(format!(
                    "load from {path}: executor {id:?}: bad {what}: {e}"
                ))
            };
            let name: String = row.get(2).map_err(|e| bad("name", &e))?;
            let address: String = row.get(3).map_err(|e| bad("address", &e))?;
            let labels: String = row.get(4).map_err(|e| bad("labels", &e))?;
            let labels = decode_labels(&labels).map_err(|e| bad("labels", &e))?;
            let registered: i64 = row.get(5).map_err(|e| bad("registered_unix_ms", &e))?;
            let registered_unix_ms = u64::try_from(registered)
                .map_err(|_| bad("registered_unix_ms", &format!("{registered} is negative")))?;
            let owner: Option<String> = row.get(6).map_err(|e| bad("owner", &e))?;
            seqs.push(seq);
            out.push(StoredExecutor {
                id,
                name,
                address,
                labels,
                registered_unix_ms,
                owner,
                ttl: None,
            });
        }
        let mut index = RowIndex::default();
        for (row, seq) in out.iter().zip(seqs) {
            index.insert(&row.id, seq);
        }
        out.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        if let Some(twice) = out.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(StoreError::Failed(format!(
                "load from {path}: executor {:?} is stored twice",
                twice[0].id
            )));
        }
        self.index = Some(index);
        Ok(out)
    }

    fn revision_floor(&mut self) -> Result<u64, StoreError> {
        let floor: Option<i64> = self
            .conn
            .query_row(SELECT_REVISION_FLOOR, [], |r| r.get(0))
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(|e| self.error("read the revision floor from", &e))?;
        u64::try_from(floor.unwrap_or(0)).map_err(|_| {
            StoreError::Failed(format!(
                "read the revision floor from {}: {floor:?} is negative",
                self.path.display()
            ))
        })
    }

    /// Back to the steady page cache once large batches stopped coming.
    fn idle(&mut self) {
        self.set_cache(STEADY_CACHE_KIB);
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch.inserts.len() + batch.deletes.len() >= LARGE_BATCH_ROWS {
            self.set_cache(BATCH_CACHE_KIB);
        }
        let result = self.write(batch);
        // The transaction's drop rolls back; if SQLite refused even that,
        // try again so the next batch does not start inside this one.
        if result.is_err()
            && !self.conn.is_autocommit()
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::error!(path = %self.path.display(), error = %e, "rollback after a failed commit failed");
        }
        result
    }
}

/// How long an open waits for a data dir's lock before refusing.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

/// Takes the exclusive lock of `data_dir` (an advisory `flock` on
/// [`LOCK_FILE_NAME`]), waiting at most [`LOCK_PATIENCE`], and writes this process's id into
/// the file so that a refused opener can say who holds it. `db` is named in
/// errors other than "in use".
#[allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a blocking open, off the runtime, waiting on a real file lock for a real second"
)]
fn lock_data_dir(data_dir: &Path, db: &Path) -> Result<File, StoreError> {
    let lock_path = data_dir.join(LOCK_FILE_NAME);
    let fail = |what: &str, e: &dyn Display| {
        StoreError::Failed(format!(
            "open {}: {what} {}: {e}",
            db.display(),
            lock_path.display()
        ))
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| fail("cannot open the lock file", &e))?;
    // A holder that is going away (a store of this process being dropped on
    // its worker thread, or a child process between fork and exec that
    // inherited the descriptor) lets go within moments: retry briefly before
    // calling the data dir taken.
    let patience = std::time::Instant::now() + LOCK_PATIENCE;
    let mut locked = file.try_lock();
    while matches!(locked, Err(TryLockError::WouldBlock)) && std::time::Instant::now() < patience {
        std::thread::sleep(std::time::Duration::from_millis(20));
        locked = file.try_lock();
    }
    match locked {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&lock_path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" ({pid})"),
            };
            return Err(StoreError::Failed(format!(
                "data dir {} is in use by another registry{holder}: {} is locked; stop that \
                 one first, or give this one another --data-dir",
                data_dir.display(),
                lock_path.display()
            )));
        }
        Err(TryLockError::Error(e)) => return Err(fail("cannot lock", &e)),
    }
    // Only a diagnostic: the lock is what counts, so a failure here is not one.
    let pid = format!("pid {}\n", std::process::id());
    if let Err(e) = file
        .set_len(0)
        .and_then(|()| file.write_all(pid.as_bytes()))
    {
        tracing::debug!(path = %lock_path.display(), error = %e, "cannot write the pid into the lock file");
    }
    Ok(file)
}

/// A SQLite error with its extended result code, which tells a full disk
/// (13), a failed write (778) and a failed fsync (1034) apart where the
/// message alone ("disk I/O error") does not.
/// The store error of a SQLite failure: a full disk is
/// [`StoreError::Full`], anything else [`StoreError::Failed`].
fn classify(e: &rusqlite::Error, message: String) -> StoreError {
    if e.sqlite_error_code() == Some(ErrorCode::DiskFull) {
        StoreError::Full(message)
    } else {
        StoreError::Failed(message)
    }
}

fn explain(e: &rusqlite::Error) -> String {
    match e.sqlite_extended_error_code() {
        Some(code) => format!("{e} (SQLite code {code})"),
        None => e.to_string(),
    }
}

/// Brings `conn` from its `user_version` to `migrations.len()` in one
/// transaction; refuses a version it does not know.
fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), String> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| format!("begin: {}", explain(&e)))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| format!("read user_version: {}", explain(&e)))?;
    let known = migrations.len();
    let from = usize::try_from(version).map_err(|_| format!("bad schema version {version}"))?;
    if from > known {
        return Err(format!(
            "schema version {version} is newer than this binary knows ({known}); \
             refusing to open it (written by a newer executor-registry?)"
        ));
    }
    if from == known {
        return Ok(());
    }
    for (i, sql) in migrations.iter().enumerate().skip(from) {
        tx.execute_batch(sql)
            .map_err(|e| format!("migrate to version {}: {}", i + 1, explain(&e)))?;
    }
    tx.pragma_update(None, "user_version", known as i64)
        .map_err(|e| format!("set user_version: {}", explain(&e)))?;
    tx.commit()
        .map_err(|e| format!("commit migration to version {known}: {}", explain(&e)))
}

/// Writes `labels` into `out` as `key=value` lines; refuses what
/// [`decode_labels`] would not read back identically.
fn encode_labels(labels: &[(String, String)], out: &mut String) -> Result<(), String> {
    out.clear();
    let mut previous: Option<&str> = None;
    for (key, value) in labels {
        if key.is_empty() || key.contains(['=', '\n']) {
            return Err(format!(
                "label key {key:?} is empty or contains '=' or a newline"
            ));
        }
        if value.is_empty() || value.contains('\n') {
            return Err(format!(
                "value of label {key:?} is empty or contains a newline"
            ));
        }
        if previous.is_some_and(|p| p >= key.as_str()) {
            return Err(format!(
                "labels are not sorted by key with no repeats at {key:?}"
            ));
        }
        previous = Some(key);
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(key);
        out.push('=');
        out.push_str(value);
    }
    Ok(())
}

/// Reads what [`encode_labels`] wrote; anything else is an error.
fn decode_labels(text: &str) -> Result<Vec<(String, String)>, String> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut labels: Vec<(String, String)> = Vec::new();
    for (n, line) in text.split('\n').enumerate() {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {} ({line:?}) has no '='", n + 1))?;
        if key.is_empty() || value.is_empty() {
            return Err(format!(
                "line {} ({line:?}) has an empty key or value",
                n + 1
            ));
        }
        if labels.last().is_some_and(|(p, _)| p.as_str() >= key) {
            return Err(format!("key {key:?} is out of order or repeated"));
        }
        labels.push((key.to_owned(), value.to_owned()));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::Instant;

    use super::*;

    fn executor(id: &str) -> StoredExecutor {
        StoredExecutor {
            id: id.to_owned(),
            name: format!("name-{id}"),
            address: "10.0.0.7:9000".to_owned(),
            labels: vec![
                ("rack".to_owned(), "r-1.2".to_owned()),
                ("zone".to_owned(), "eu-west-1a".to_owned()),
            ],
            registered_unix_ms: 1_700_000_000_123,
            owner: Some(format!("spiffe://fleet/{id}")),
            ttl: None,
        }
    }

    fn inserts(ids: &[&str]) -> Batch {
        Batch {
            inserts: ids.iter().map(|id| executor(id)).collect(),
            deletes: Vec::new(),
            revision_floor: None,
            ttls: Vec::new(),
        }
    }

    fn deletes(ids: &[&str]) -> Batch {
        Batch {
            inserts: Vec::new(),
            deletes: ids.iter().map(|id| id.to_string()).collect(),
            revision_floor: None,
            ttls: Vec::new(),
        }
    }

    fn ids(store: &mut SqliteStore) -> Vec<String> {
        store
            .load_all()
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    fn db_path(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join(DB_FILE_NAME)
    }

    /// Asserts `open` fails with an error that names the database file.
    fn assert_open_fails_naming(dir: &Path, path: &Path) -> String {
        let err = SqliteStore::open(dir)
            .expect_err("open must fail")
            .to_string();
        assert!(
            err.contains(&path.display().to_string()),
            "error does not name {}: {err}",
            path.display()
        );
        err
    }

    /// Makes `path` unwritable for this process with a real filesystem
    /// fault: `chmod a-w` for an ordinary user; for root, whom permissions do
    /// not stop, the immutable attribute (`chattr +i`, which also stops
    /// writes through descriptors already open). Undone on drop. `None` when
    /// neither works here (no `chattr`, or a filesystem without attributes).
    struct Unwritable {
        path: PathBuf,
        immutable: bool,
        mode: u32,
    }

    impl Unwritable {
        fn make(path: &Path) -> Option<Unwritable> {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            let is_dir = path.is_dir();
            let refused = || {
                if is_dir {
                    std::fs::write(path.join("probe"), b"x")
                        .map(|()| std::fs::remove_file(path.join("probe")).unwrap())
                        .is_err()
                } else {
                    OpenOptions::new().append(true).open(path).is_err()
                }
            };
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o222)).unwrap();
            if refused() {
                return Some(Unwritable {
                    path: path.to_owned(),
                    immutable: false,
                    mode,
                });
            }
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
            let chattr = Command::new("chattr").arg("+i").arg(path).output();
            if !chattr.is_ok_and(|out| out.status.success()) {
                return None;
            }
            let guard = Unwritable {
                path: path.to_owned(),
                immutable: true,
                mode,
            };
            refused().then_some(guard)
        }
    }

    impl Drop for Unwritable {
        fn drop(&mut self) {
            use std::os::unix::fs::PermissionsExt;
            if self.immutable {
                let _ = Command::new("chattr").arg("-i").arg(&self.path).status();
            } else {
                let _ = std::fs::set_permissions(
                    &self.path,
                    std::fs::Permissions::from_mode(self.mode),
                );
            }
        }
    }

    #[test]
    fn the_page_cache_is_large_only_while_large_batches_come() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let bound = |store: &SqliteStore| -> i64 {
            store
                .conn
                .pragma_query_value(None, "cache_size", |r| r.get(0))
                .unwrap()
        };
        assert_eq!(bound(&store), BATCH_CACHE_KIB, "large for the load");
        store.idle();
        assert_eq!(bound(&store), STEADY_CACHE_KIB);
        for round in 0..3 {
            let batch = Batch {
                inserts: (round * LARGE_BATCH_ROWS..(round + 1) * LARGE_BATCH_ROWS)
                    .map(|i| executor(&format!("big-{i:05}")))
                    .collect(),
                deletes: Vec::new(),
                revision_floor: None,
                ttls: Vec::new(),
            };
            store.commit(&batch).unwrap();
            assert_eq!(bound(&store), BATCH_CACHE_KIB, "large during a storm");
        }
        // A small batch does not shrink it (a storm may go on)...
        store.commit(&inserts(&["small"])).unwrap();
        assert_eq!(bound(&store), BATCH_CACHE_KIB);
        // ...a quiet spell does (SQLite frees the pages over a lowered
        // bound at once).
        store.idle();
        assert_eq!(bound(&store), STEADY_CACHE_KIB);
        store.commit(&inserts(&["small-2"])).unwrap();
        assert_eq!(bound(&store), STEADY_CACHE_KIB);
        // Nothing was lost with the pages.
        assert_eq!(store.load_all().unwrap().len(), 3 * LARGE_BATCH_ROWS + 2);
    }

    #[test]
    fn inserted_rows_load_back_in_id_order_and_deletes_remove_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        assert!(store.load_all().unwrap().is_empty());

        store.commit(&inserts(&["c", "a", "b"])).unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded, vec![executor("a"), executor("b"), executor("c")]);

        store.commit(&deletes(&["b", "never-stored"])).unwrap();
        assert_eq!(ids(&mut store), ["a", "c"]);
    }

    #[test]
    fn a_batch_inserts_then_deletes_so_register_and_deregister_together_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let batch = Batch {
            inserts: vec![executor("a"), executor("b")],
            deletes: vec!["a".to_owned()],
            revision_floor: None,
            ttls: Vec::new(),
        };
        store.commit(&batch).unwrap();
        assert_eq!(ids(&mut store), ["b"]);
    }

    #[test]
    fn executors_without_labels_and_with_many_labels_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let mut bare = executor("bare");
        bare.labels.clear();
        let mut many = executor("many");
        many.labels = (0..64)
            .map(|i| (format!("k{i:02}"), format!("v.{i}-x")))
            .collect();
        many.registered_unix_ms = i64::MAX as u64;
        store
            .commit(&Batch {
                inserts: vec![bare.clone(), many.clone()],
                deletes: vec![],
                revision_floor: None,
                ttls: Vec::new(),
            })
            .unwrap();
        assert_eq!(store.load_all().unwrap(), vec![bare, many]);
    }

    #[test]
    fn an_id_collision_fails_the_whole_batch_and_nothing_of_it_is_visible() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["b"])).unwrap();

        let batch = Batch {
            inserts: vec![executor("a"), executor("b"), executor("c")],
            deletes: vec!["b".to_owned()],
            revision_floor: None,
            ttls: Vec::new(),
        };
        let err = store.commit(&batch).unwrap_err().to_string();
        assert!(err.contains("\"b\""), "error names the colliding id: {err}");
        assert!(err.contains(&db_path(&dir).display().to_string()), "{err}");
        assert_eq!(ids(&mut store), ["b"]);

        // The connection is not stuck in the failed transaction.
        store.commit(&inserts(&["a", "c"])).unwrap();
        assert_eq!(ids(&mut store), ["a", "b", "c"]);
        drop(store);
        assert_eq!(
            ids(&mut SqliteStore::open(dir.path()).unwrap()),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn labels_that_would_not_read_back_are_refused_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let bad = [
            vec![("k=x".to_owned(), "v".to_owned())],
            vec![("k".to_owned(), "v\nw".to_owned())],
            vec![("".to_owned(), "v".to_owned())],
            vec![("k".to_owned(), "".to_owned())],
            vec![
                ("b".to_owned(), "1".to_owned()),
                ("a".to_owned(), "2".to_owned()),
            ],
            vec![
                ("a".to_owned(), "1".to_owned()),
                ("a".to_owned(), "2".to_owned()),
            ],
        ];
        for labels in bad {
            let mut row = executor("x");
            row.labels = labels.clone();
            let batch = Batch {
                inserts: vec![executor("ok"), row],
                deletes: vec![],
                revision_floor: None,
                ttls: Vec::new(),
            };
            let err = store.commit(&batch).unwrap_err().to_string();
            assert!(err.contains("\"x\""), "{labels:?}: {err}");
        }
        assert!(store.load_all().unwrap().is_empty());
    }

    #[test]
    fn label_encoding_round_trips_and_is_readable() {
        let labels = vec![
            ("a".to_owned(), "x=y".to_owned()),
            ("zone".to_owned(), "eu-1".to_owned()),
        ];
        let mut text = String::new();
        encode_labels(&labels, &mut text).unwrap();
        assert_eq!(text, "a=x=y\nzone=eu-1");
        assert_eq!(decode_labels(&text).unwrap(), labels);
        encode_labels(&[], &mut text).unwrap();
        assert_eq!(text, "");
        assert_eq!(decode_labels("").unwrap(), vec![]);
    }

    #[test]
    fn malformed_labels_in_the_file_are_an_error_naming_the_executor() {
        for text in ["novalue", "=v", "k=", "b=1\na=2", "a=1\na=2", "a=1\n", "\n"] {
            assert!(decode_labels(text).is_err(), "{text:?} decoded");
            let dir = tempfile::tempdir().unwrap();
            let mut store = SqliteStore::open(dir.path()).unwrap();
            store.commit(&inserts(&["good", "bad-one"])).unwrap();
            store
                .conn
                .execute(
                    "UPDATE executors SET labels = ?1 WHERE id = 'bad-one'",
                    [text],
                )
                .unwrap();
            let err = store.load_all().unwrap_err().to_string();
            assert!(
                err.contains("\"bad-one\"") && err.contains("labels"),
                "{err}"
            );
            assert!(err.contains(&db_path(&dir).display().to_string()), "{err}");
        }
    }

    #[test]
    fn a_negative_registration_time_in_the_file_is_an_error_naming_the_executor() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["a"])).unwrap();
        store
            .conn
            .execute("UPDATE executors SET registered_unix_ms = -1", [])
            .unwrap();
        let err = store.load_all().unwrap_err().to_string();
        assert!(
            err.contains("\"a\"") && err.contains("registered_unix_ms"),
            "{err}"
        );
    }

    #[test]
    fn a_registration_time_beyond_i64_is_refused_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let mut row = executor("a");
        row.registered_unix_ms = u64::MAX;
        let batch = Batch {
            inserts: vec![row],
            deletes: vec![],
            revision_floor: None,
            ttls: Vec::new(),
        };
        assert!(
            store
                .commit(&batch)
                .unwrap_err()
                .to_string()
                .contains("\"a\"")
        );
    }

    #[test]
    fn rows_survive_closing_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["a", "b"])).unwrap();
        store.commit(&deletes(&["a"])).unwrap();
        drop(store);
        let mut store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.load_all().unwrap(), vec![executor("b")]);
    }

    #[test]
    fn open_creates_missing_data_directories() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        let store = SqliteStore::open(&nested).unwrap();
        assert_eq!(store.path(), nested.join(DB_FILE_NAME));
        assert!(nested.join(DB_FILE_NAME).is_file());
    }

    #[test]
    fn the_database_is_in_wal_mode_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).unwrap();
        let mode: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = store
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL");
        let checkpoint: i64 = store
            .conn
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .unwrap();
        assert_eq!(checkpoint, WAL_AUTOCHECKPOINT_PAGES);
        drop(store);
        // WAL mode is persistent: another connection sees it in the file.
        let other = Connection::open(db_path(&dir)).unwrap();
        let mode: String = other
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn the_schema_version_is_recorded_in_user_version() {
        let dir = tempfile::tempdir().unwrap();
        drop(SqliteStore::open(dir.path()).unwrap());
        let conn = Connection::open(db_path(&dir)).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        assert_eq!(version, 4);
    }

    #[test]
    fn the_revision_floor_is_stored_with_a_batch_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.revision_floor().unwrap(), 0, "a new store");
        store
            .commit(&Batch {
                revision_floor: Some(1 << 32),
                ..inserts(&["a"])
            })
            .unwrap();
        assert_eq!(store.revision_floor().unwrap(), 1 << 32);
        store
            .commit(&Batch {
                revision_floor: Some(2 << 32),
                ..Batch::default()
            })
            .unwrap();
        drop(store);
        let mut store = SqliteStore::open(dir.path()).unwrap();
        assert_eq!(store.revision_floor().unwrap(), 2 << 32);
        assert_eq!(ids(&mut store), ["a"]);
        // A batch without a floor leaves it.
        store.commit(&deletes(&["a"])).unwrap();
        assert_eq!(store.revision_floor().unwrap(), 2 << 32);
    }

    #[test]
    fn a_database_from_a_newer_binary_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["a"])).unwrap();
        drop(store);
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 7)
            .unwrap();

        let err = assert_open_fails_naming(dir.path(), &path);
        assert!(err.contains("schema version 7 is newer"), "{err}");

        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 7);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM executors", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[test]
    fn a_version_0_database_without_the_table_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        {
            // A real, non-empty SQLite file at version 0.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("CREATE TABLE unrelated (x); INSERT INTO unrelated VALUES (1);")
                .unwrap();
            let version: i64 = conn
                .pragma_query_value(None, "user_version", |r| r.get(0))
                .unwrap();
            assert_eq!(version, 0);
        }
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 4);
        store.commit(&inserts(&["a"])).unwrap();
        assert_eq!(ids(&mut store), ["a"]);
    }

    #[test]
    fn migrations_run_from_the_stored_version_and_keep_the_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["a"])).unwrap();

        let next = [MIGRATIONS, &["ALTER TABLE executors ADD COLUMN note TEXT"]].concat();
        migrate(&mut store.conn, &next).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64 + 1);
        assert_eq!(store.load_all().unwrap(), vec![executor("a")]);
        // Idempotent once there.
        migrate(&mut store.conn, &next).unwrap();
    }

    #[test]
    fn a_failing_migration_leaves_the_database_at_its_old_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let broken = [
            MIGRATIONS,
            &["CREATE TABLE t2 (x); ALTER TABLE no_such_table ADD COLUMN y"],
        ]
        .concat();
        let err = migrate(&mut store.conn, &broken).unwrap_err();
        let next = MIGRATIONS.len() + 1;
        assert!(err.contains(&format!("migrate to version {next}")), "{err}");
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let t2: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 't2'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(t2, 0, "the half-applied migration was rolled back");
        store.commit(&inserts(&["a"])).unwrap();
    }

    #[test]
    fn a_version_2_database_opens_with_its_rows_unowned_and_owners_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        {
            // What a version-2 binary left: no owner column.
            let mut conn = Connection::open(&path).unwrap();
            migrate(&mut conn, &MIGRATIONS[..2]).unwrap();
            conn.execute(
                "INSERT INTO executors (id, name, address, labels, registered_unix_ms) \
                 VALUES ('old', 'n', '10.0.0.1:1', 'zone=a', 7)",
                [],
            )
            .unwrap();
        }
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let loaded = store.load_all().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(
            (loaded[0].id.as_str(), loaded[0].owner.as_deref()),
            ("old", None)
        );
        let mut unowned = executor("new-unowned");
        unowned.owner = None;
        store
            .commit(&Batch {
                inserts: vec![executor("new-owned"), unowned],
                deletes: Vec::new(),
                revision_floor: None,
                ttls: Vec::new(),
            })
            .unwrap();
        drop(store);
        let owners: Vec<(String, Option<String>)> = SqliteStore::open(dir.path())
            .unwrap()
            .load_all()
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.owner))
            .collect();
        assert_eq!(
            owners,
            [
                ("new-owned".into(), Some("spiffe://fleet/new-owned".into())),
                ("new-unowned".into(), None),
                ("old".into(), None),
            ]
        );
    }

    #[test]
    fn a_version_1_database_is_migrated_to_rows_in_insertion_order_without_an_id_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        {
            // What a version-1 binary left: the id is the primary key.
            let mut conn = Connection::open(&path).unwrap();
            migrate(&mut conn, &MIGRATIONS[..1]).unwrap();
            for (id, labels) in [("c", "zone=a"), ("a", ""), ("b", "rack=r1\nzone=b")] {
                conn.execute(
                    "INSERT INTO executors VALUES (?1, 'n', '10.0.0.1:1', ?2, 7)",
                    [id, labels],
                )
                .unwrap();
            }
        }
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let version: i64 = store
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, 4);
        let loaded = store.load_all().unwrap();
        assert_eq!(
            loaded
                .iter()
                .map(|e| (e.id.as_str(), e.labels.len()))
                .collect::<Vec<_>>(),
            [("a", 0), ("b", 2), ("c", 1)]
        );
        let rows: Vec<(i64, String)> = store
            .conn
            .prepare("SELECT seq, id FROM executors ORDER BY seq")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, [(1, "a".into()), (2, "b".into()), (3, "c".into())]);
        let indexes: i64 = store
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE type = 'index'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0, "no index on the random ids");

        // New rows go after the old ones; deletes find old and new.
        store.commit(&inserts(&["0-new"])).unwrap();
        store.commit(&deletes(&["b", "0-new"])).unwrap();
        assert_eq!(ids(&mut store), ["a", "c"]);
        drop(store);
        assert_eq!(ids(&mut SqliteStore::open(dir.path()).unwrap()), ["a", "c"]);
    }

    #[test]
    fn an_id_stored_twice_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["a", "b"])).unwrap();
        store
            .conn
            .execute_batch(
                "INSERT INTO executors (id, name, address, labels, registered_unix_ms) \
                 SELECT id, name, address, labels, registered_unix_ms FROM executors \
                 WHERE id = 'b'",
            )
            .unwrap();
        let err = store.load_all().unwrap_err().to_string();
        assert!(err.contains("executor \"b\" is stored twice"), "{err}");
        assert!(err.contains(&db_path(&dir).display().to_string()), "{err}");
    }

    #[test]
    fn an_id_twice_in_one_batch_fails_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let err = store
            .commit(&inserts(&["a", "b", "a"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"a\": the id is already stored"), "{err}");
        assert!(ids(&mut store).is_empty());
        store.commit(&inserts(&["a", "b"])).unwrap();
        assert_eq!(ids(&mut store), ["a", "b"]);
    }

    /// Two ids with one hash cannot be found by content, so the index is
    /// told that `y` and `z` hash like `x` (a stored row): that is what a
    /// collision looks like from inside.
    #[test]
    fn a_hash_collision_in_the_row_index_never_refuses_or_deletes_another_executor() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["x"])).unwrap();
        let x_seq = store.index().unwrap().get("x").unwrap();
        for fake in ["y", "z"] {
            store
                .index
                .as_mut()
                .unwrap()
                .by_hash
                .insert(id_hash(fake), x_seq);
        }

        // `z` is not stored: deleting it leaves `x`, whose row its hash names.
        store.commit(&deletes(&["z"])).unwrap();
        assert_eq!(ids(&mut store), ["x"]);
        for fake in ["y", "z"] {
            store
                .index
                .as_mut()
                .unwrap()
                .by_hash
                .insert(id_hash(fake), x_seq);
        }
        // `y` is new, though its hash finds a row: stored, and on its own row.
        store.commit(&inserts(&["y"])).unwrap();
        assert!(store.index().unwrap().colliding.contains_key("y"));
        assert_eq!(ids(&mut store), ["x", "y"]);
        for fake in ["y", "z"] {
            store
                .index
                .as_mut()
                .unwrap()
                .by_hash
                .insert(id_hash(fake), x_seq);
        }
        store
            .index
            .as_mut()
            .unwrap()
            .colliding
            .insert("y".into(), x_seq + 1);
        // Deleting `y` deletes `y`, then `x` goes too.
        store.commit(&deletes(&["y"])).unwrap();
        assert_eq!(ids(&mut store), ["x"]);
        store.commit(&deletes(&["x"])).unwrap();
        assert!(ids(&mut store).is_empty());
    }

    #[test]
    fn a_second_open_of_a_locked_data_dir_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = SqliteStore::open(dir.path()).unwrap();
        first.commit(&inserts(&["a"])).unwrap();

        let err = SqliteStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another registry"), "{err}");
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "names the holder: {err}"
        );
        // The refused opener touched nothing: the first one carries on.
        first.commit(&inserts(&["b"])).unwrap();
        assert_eq!(ids(&mut first), ["a", "b"]);

        drop(first);
        assert_eq!(ids(&mut SqliteStore::open(dir.path()).unwrap()), ["a", "b"]);
    }

    #[test]
    fn a_garbage_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let garbage: Vec<u8> = (0..10_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let err = assert_open_fails_naming(dir.path(), &path);
        assert!(err.contains("not a database"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), garbage, "left untouched");
    }

    #[test]
    fn a_truncated_database_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let mut store = SqliteStore::open(dir.path()).unwrap();
        let many: Vec<String> = (0..2000).map(|i| format!("id-{i:05}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        store.commit(&inserts(&many)).unwrap();
        drop(store);
        assert!(
            !dir.path().join("registry.db-wal").exists(),
            "checkpointed on close"
        );

        let len = std::fs::metadata(&path).unwrap().len();
        for keep in [100, 4096, len / 2] {
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len(keep).unwrap();
            drop(file);
            let err = assert_open_fails_naming(dir.path(), &path);
            assert!(
                err.contains("not a usable registry database"),
                "{keep}: {err}"
            );
        }
    }

    #[test]
    fn a_directory_where_the_file_should_be_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        std::fs::create_dir(&path).unwrap();
        let err = assert_open_fails_naming(dir.path(), &path);
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_data_directory_that_is_a_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("data");
        std::fs::write(&not_a_dir, b"x").unwrap();
        let err = SqliteStore::open(&not_a_dir).unwrap_err().to_string();
        assert!(err.contains(&not_a_dir.display().to_string()), "{err}");
    }

    #[test]
    fn a_write_protected_database_file_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["a"])).unwrap();
        drop(store);

        let Some(guard) = Unwritable::make(&path) else {
            eprintln!("skipped: cannot make a file unwritable here (root without chattr?)");
            return;
        };
        let err = assert_open_fails_naming(dir.path(), &path);
        assert!(err.contains("cannot read and write"), "{err}");
        drop(guard);
        assert_eq!(ids(&mut SqliteStore::open(dir.path()).unwrap()), ["a"]);
    }

    #[test]
    fn a_write_protected_data_directory_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let path = data.join(DB_FILE_NAME);
        let mut store = SqliteStore::open(&data).unwrap();
        store.commit(&inserts(&["a"])).unwrap();
        drop(store);

        // The file is writable, but the WAL and shared-memory files beside it
        // cannot be created.
        let Some(guard) = Unwritable::make(&data) else {
            eprintln!("skipped: cannot make a directory unwritable here");
            return;
        };
        let err = assert_open_fails_naming(&data, &path);
        drop(guard);
        eprintln!("read-only directory: {err}");
        assert_eq!(ids(&mut SqliteStore::open(&data).unwrap()), ["a"]);
    }

    #[test]
    fn a_commit_that_hits_a_write_protected_wal_fails_and_the_next_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("registry.db-wal");
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.commit(&inserts(&["a"])).unwrap();
        assert!(wal.is_file());

        // Permission bits do not stop writes through an open descriptor, so
        // only the immutable attribute (root) makes this a real fault.
        let guard = match Unwritable::make(&wal) {
            Some(guard) if guard.immutable => guard,
            _ => {
                eprintln!("skipped: needs root and chattr to fault an open file");
                return;
            }
        };
        let err = store.commit(&inserts(&["b", "c"])).unwrap_err().to_string();
        eprintln!("write-protected WAL: {err}");
        assert!(err.contains(&db_path(&dir).display().to_string()), "{err}");
        assert!(
            store.conn.is_autocommit(),
            "not left inside the transaction"
        );
        drop(guard);

        store.commit(&inserts(&["b", "d"])).unwrap();
        assert_eq!(ids(&mut store), ["a", "b", "d"]);
        drop(store);
        assert_eq!(
            ids(&mut SqliteStore::open(dir.path()).unwrap()),
            ["a", "b", "d"]
        );
    }

    #[test]
    fn a_commit_blocked_by_another_writer_fails_and_the_next_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        store.conn.busy_timeout(Duration::from_millis(50)).unwrap();
        store.commit(&inserts(&["a"])).unwrap();

        // Another process (a `sqlite3` shell, a backup) holding the write lock.
        let other = Connection::open(db_path(&dir)).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let err = store.commit(&inserts(&["b"])).unwrap_err().to_string();
        assert!(err.contains("locked"), "{err}");
        assert!(err.contains(&db_path(&dir).display().to_string()), "{err}");
        other.execute_batch("ROLLBACK").unwrap();

        store.commit(&inserts(&["b"])).unwrap();
        assert_eq!(ids(&mut store), ["a", "b"]);
    }

    /// Durable registrations per second, by batch size, on the disk under
    /// `$TMPDIR` (default `/tmp`), into a table that already holds 100,000
    /// executors, with ids shaped like the registry's (`name-<random hex>`:
    /// with an index on id, inserts would land all over it). Run it in release:
    /// `cargo test --release --lib sqlite_commit_rate -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a test"]
    fn sqlite_commit_rate() {
        fn rows(n: usize) -> Vec<StoredExecutor> {
            (0..n)
                .map(|i| {
                    let name = ["gpu-worker", "cpu-worker", "batch"][i % 3];
                    let mut row = executor(&format!("{name}-{:016x}", rand::random::<u64>()));
                    row.name = name.to_owned();
                    row.labels.push(("pool".into(), format!("p{}", i % 7)));
                    row.labels.sort();
                    row
                })
                .collect()
        }
        let dir = tempfile::tempdir().unwrap();
        let mut store = SqliteStore::open(dir.path()).unwrap();
        for _ in 0..10 {
            store
                .commit(&Batch {
                    inserts: rows(10_000),
                    deletes: vec![],
                    revision_floor: None,
                    ttls: Vec::new(),
                })
                .unwrap();
        }
        for batch_size in [1usize, 10, 100, 300, 1000] {
            let commits = (20_000 / batch_size).clamp(200, 2_000);
            let batches: Vec<Batch> = (0..commits)
                .map(|_| Batch {
                    inserts: rows(batch_size),
                    deletes: vec![],
                    revision_floor: None,
                    ttls: Vec::new(),
                })
                .collect();
            let started = Instant::now();
            for batch in &batches {
                store.commit(batch).unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            let total = commits * batch_size;
            println!(
                "batch {batch_size:>5}: {total:>7} registrations in {secs:5.2} s = \
                 {:>7.0}/s, {:5.2} ms/commit",
                total as f64 / secs,
                secs * 1000.0 / commits as f64
            );
        }
    }

    /// Real time and a real SQLite file: the store fails (immutable WAL) while
    /// an expired executor's delete is pending, long enough for its tombstone to
    /// be forgotten. Its row is still in the file, so a new registration that
    /// drew the same id would collide with it at insert and fail the whole batch.
    #[tokio::test]
    async fn a_new_id_skips_a_stored_id_whose_delete_has_not_landed() {
        use crate::registry::{
            FORCED_ID_SUFFIXES, NoopObserver, Registration, Registry, RegistryConfig, RegistryError,
        };

        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = dir.path().join("registry.db-wal");
        let stale = "worker-000000000000000a";
        let mut store = SqliteStore::open(dir.path()).expect("opens");
        store
            .commit(&Batch {
                inserts: vec![StoredExecutor {
                    id: stale.into(),
                    name: "worker".into(),
                    address: "10.0.3.1:9000".into(),
                    labels: Vec::new(),
                    registered_unix_ms: 1,
                    owner: None,
                    ttl: None,
                }],
                deletes: Vec::new(),
                revision_floor: None,
                ttls: Vec::new(),
            })
            .expect("commits");
        let rows_in_file = || {
            let conn = rusqlite::Connection::open_with_flags(
                dir.path().join("registry.db"),
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .expect("open read-only");
            let mut select = conn
                .prepare("SELECT id, address FROM executors ORDER BY id")
                .expect("prepare");
            select
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .expect("query")
                .collect::<Result<Vec<_>, _>>()
                .expect("rows")
        };
        let config = RegistryConfig {
            init_ttl: Duration::from_millis(200),
            tombstone_retention: Duration::from_millis(1),
            ..RegistryConfig::default()
        };
        let (registry, _task) =
            Registry::start(config, Box::new(store), std::sync::Arc::new(NoopObserver))
                .expect("loads");
        let fault = match Unwritable::make(&wal) {
            Some(fault) if fault.immutable => fault,
            _ => {
                eprintln!("skipped: needs root and chattr to make the WAL immutable");
                return;
            }
        };

        // It expires; its delete fails; its tombstone is forgotten.
        let mut watch = registry.watch();
        let event = watch.next().await.expect("the watch goes on");
        assert_eq!(event.entry.id().as_str(), stale);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while registry.heartbeat(stale, None) != Err(RegistryError::NotFound(stale.into())) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the tombstone was never forgotten"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            rows_in_file(),
            [(stale.to_owned(), "10.0.3.1:9000".to_owned())]
        );

        // The store works again. Nothing awaits between here and the
        // registration, so on this single-threaded runtime the loop sees the
        // registration and the delete retry in one turn.
        drop(fault);
        FORCED_ID_SUFFIXES.with_borrow_mut(|q| q.extend([0xa, 0xe]));
        let new = registry
            .register(Registration {
                name: "worker".into(),
                address: "10.0.3.2:9000".into(),
                ..Default::default()
            })
            .await
            .expect("not refused by a collision with the stale row");
        eprintln!("registered as {}", new.id().as_str());
        registry
            .heartbeat(new.id().as_str(), Some(Duration::from_secs(600)))
            .expect("kept alive");

        // The stale row is deleted, the new one stored under its own id.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while rows_in_file().len() != 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the delete never landed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            rows_in_file(),
            [(new.id().as_str().to_owned(), "10.0.3.2:9000".to_owned())]
        );
    }
}

#[cfg(test)]
mod disk_full {
    use std::process::Command;

    use super::*;

    /// A 512 KiB tmpfs of our own on a fresh directory, unmounted on drop.
    struct SmallFs {
        dir: tempfile::TempDir,
    }

    impl SmallFs {
        /// `None` where mounting is not allowed (not root, a container).
        fn mount() -> Option<SmallFs> {
            let dir = tempfile::tempdir().ok()?;
            let mounted = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=512k", "tmpfs"])
                .arg(dir.path())
                .output()
                .is_ok_and(|out| out.status.success());
            mounted.then_some(SmallFs { dir })
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let unmounted = Command::new("umount")
                .arg(self.dir.path())
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                // Busy (a file still open): detach it now, gone when closed.
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(self.dir.path())
                    .status();
            }
        }
    }

    /// A really full filesystem: `REGISTRY_FULL_FS` names a small one
    /// mounted by hand, or else (as root) the test mounts a tmpfs of its own
    /// and unmounts it after; skipped where neither is possible. Ignored in a
    /// bare `cargo test` because it mounts; `scripts/test.sh` runs it.
    #[test]
    #[ignore = "mounts a small filesystem (as root); scripts/test.sh runs it"]
    fn a_commit_on_a_full_disk_fails_and_works_again_once_space_is_freed() {
        let mut _mounted = None;
        let root = match std::env::var("REGISTRY_FULL_FS") {
            Ok(root) => PathBuf::from(root),
            Err(_) => match SmallFs::mount() {
                Some(fs) => _mounted.insert(fs).dir.path().to_owned(),
                None => {
                    eprintln!("skipped: cannot mount a small filesystem here (not root?)");
                    return;
                }
            },
        };
        let data = root.join("data");
        let filler = root.join("filler");
        let _ = std::fs::remove_dir_all(&data);
        let _ = std::fs::remove_file(&filler);
        let row = |i: usize| StoredExecutor {
            id: format!(
                "worker-{:016x}",
                (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ),
            name: "worker".into(),
            address: "10.0.0.7:9000".into(),
            labels: vec![("zone".into(), "a".into())],
            registered_unix_ms: 1,
            owner: None,
            ttl: None,
        };
        let batch = |range: std::ops::Range<usize>| Batch {
            inserts: range.map(row).collect(),
            deletes: vec![],
            revision_floor: None,
            ttls: Vec::new(),
        };

        let mut store = SqliteStore::open(&data).unwrap();
        store.commit(&batch(0..100)).unwrap();

        // Fill the filesystem, leaving nothing.
        let fill = || {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            let chunk = vec![0u8; 4096];
            while f.write_all(&chunk).is_ok() {}
            let _ = f.write_all(&[0u8; 1]);
            let _ = f.sync_all();
            println!(
                "filler: {} bytes",
                std::fs::metadata(&filler).unwrap().len()
            );
        };
        fill();

        let mut failures = 0;
        for i in 1..=5 {
            match store.commit(&batch(i * 1000..i * 1000 + 300)) {
                Ok(()) => println!("commit {i} on the full disk: ok (fit in the WAL's free space)"),
                Err(e) => {
                    failures += 1;
                    println!("commit {i} on the full disk: {e}");
                    assert!(store.conn.is_autocommit());
                }
            }
        }
        assert!(failures > 0, "the disk never got full");
        let after_failures = store.load_all().unwrap().len();
        println!("rows visible after the failures: {after_failures}");

        std::fs::remove_file(&filler).unwrap();
        store.commit(&batch(10_000..10_300)).unwrap();
        let rows = store.load_all().unwrap().len();
        println!("after freeing space: commit ok, {rows} rows");
        assert_eq!(rows, after_failures + 300);
        drop(store);
        assert_eq!(
            SqliteStore::open(&data).unwrap().load_all().unwrap().len(),
            rows
        );
        println!("reopened: {rows} rows");

        // Starting on a full disk: the WAL cannot be created.
        fill();
        match SqliteStore::open(&data) {
            Ok(mut store) => println!(
                "open on the full disk: ok; commit: {:?}",
                store.commit(&batch(20_000..20_300))
            ),
            Err(e) => println!("open on the full disk: {e}"),
        }
        std::fs::remove_file(&filler).unwrap();
        assert_eq!(
            SqliteStore::open(&data).unwrap().load_all().unwrap().len(),
            rows
        );
        println!("after freeing space: opened with {rows} rows");
    }
}
