//! The records cache: Nango's `batchSave` / `batchUpdate` / `batchDelete` semantics,
//! with a version on every write so that stale writes are ignored.
//!
//! A write call runs in one transaction: it first takes the scope's row lock (and the
//! block of change sequence numbers it may use), reads the stored state of the ids it
//! touches, decides each record's outcome in Rust ([`decide`], written once for both back
//! ends), then applies all changes in one statement. Holding the scope lock from the
//! first statement means writers of one scope commit in `seq` order, so a reader paging
//! by `seq` never skips a change that commits late.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::types::Json;

use std::collections::{BTreeMap, HashMap};

use super::notices::{add_to_held, HeldNotice};
use super::tx::{on_tx, Tx};
use super::{Pool, Store, StoreError};
use crate::keys::IntegrationKey;

/// Whose records: the key prefix of every record.
#[derive(Debug, Clone)]
pub struct RecordScope {
    pub environment_id: i64,
    pub integration: IntegrationKey,
    pub connection_id: String,
    pub model: String,
}

impl RecordScope {
    /// The four key columns as one unambiguous value (a JSON array), for the paging index.
    fn key(&self) -> String {
        scope_key(
            self.environment_id,
            self.integration.as_str(),
            &self.connection_id,
            &self.model,
        )
    }
}

fn scope_key(environment_id: i64, integration: &str, connection_id: &str, model: &str) -> String {
    serde_json::to_string(&(environment_id, integration, connection_id, model)).expect("strings and integers serialise")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Upsert; a record whose content did not change is not rewritten.
    Save,
    /// Deep-merge into an existing, non-deleted record (objects merge, arrays replace);
    /// unknown or deleted ids are ignored.
    Update,
    /// Soft delete keeping the last payload; an unknown id leaves a tombstone.
    Delete,
}

/// What a write call did, record by record.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WriteCounts {
    pub added: u64,
    pub updated: u64,
    pub deleted: u64,
    pub unchanged: u64,
    /// Writes older than the stored version, ignored.
    pub skipped_stale: u64,
    /// Updates of ids that do not exist or are deleted.
    pub ignored: u64,
    /// Earlier occurrences of an id repeated in the batch (the last one wins).
    pub duplicates_in_batch: u64,
}

impl WriteCounts {
    pub fn plus(&self, other: &WriteCounts) -> WriteCounts {
        WriteCounts {
            added: self.added + other.added,
            updated: self.updated + other.updated,
            deleted: self.deleted + other.deleted,
            unchanged: self.unchanged + other.unchanged,
            skipped_stale: self.skipped_stale + other.skipped_stale,
            ignored: self.ignored + other.ignored,
            duplicates_in_batch: self.duplicates_in_batch + other.duplicates_in_batch,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum LastAction {
    Added,
    Updated,
    Deleted,
}

impl LastAction {
    fn as_str(self) -> &'static str {
        match self {
            LastAction::Added => "ADDED",
            LastAction::Updated => "UPDATED",
            LastAction::Deleted => "DELETED",
        }
    }

    fn parse(text: &str) -> Result<LastAction, StoreError> {
        match text {
            "ADDED" => Ok(LastAction::Added),
            "UPDATED" => Ok(LastAction::Updated),
            "DELETED" => Ok(LastAction::Deleted),
            other => Err(StoreError::Corrupt(format!("record last_action {other:?}"))),
        }
    }
}

/// The stored state a decision needs.
struct Existing {
    payload: Value,
    hash: String,
    version: i64,
    deleted: bool,
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Stale,
    Ignored,
    Unchanged,
    Write {
        payload: Value,
        hash: String,
        action: LastAction,
    },
}

/// The content hash: canonical JSON (object keys sorted, so their order never counts
/// as a change), SHA-256 cut to 128 bits.
pub fn content_hash(payload: &Value) -> String {
    // serde_json's Map is a BTreeMap (no `preserve_order`), so this is key-sorted;
    // `reordered_keys_hash_alike` guards it.
    let bytes = serde_json::to_vec(payload).expect("a JSON value serialises");
    hex::encode(&Sha256::digest(&bytes)[..16])
}

/// Objects merge recursively; anything else (arrays included) replaces.
pub fn deep_merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                match target.get_mut(&key) {
                    Some(existing) => deep_merge(existing, value),
                    None => {
                        target.insert(key, value);
                    }
                }
            }
        }
        (target, patch) => *target = patch,
    }
}

fn decide(kind: WriteKind, id: &str, input: Value, existing: Option<&Existing>, version: i64) -> Outcome {
    if existing.is_some_and(|e| e.version > version) {
        return Outcome::Stale;
    }
    let write = |payload: Value, action| Outcome::Write {
        hash: content_hash(&payload),
        payload,
        action,
    };
    match (kind, existing) {
        (WriteKind::Save, None) => write(input, LastAction::Added),
        (WriteKind::Save, Some(e)) if e.deleted => write(input, LastAction::Added),
        (WriteKind::Save, Some(e)) if e.hash == content_hash(&input) => Outcome::Unchanged,
        (WriteKind::Save, Some(_)) => write(input, LastAction::Updated),
        (WriteKind::Update, None) => Outcome::Ignored,
        (WriteKind::Update, Some(e)) if e.deleted => Outcome::Ignored,
        (WriteKind::Update, Some(e)) => {
            let mut merged = e.payload.clone();
            deep_merge(&mut merged, input);
            if content_hash(&merged) == e.hash {
                Outcome::Unchanged
            } else {
                write(merged, LastAction::Updated)
            }
        }
        (WriteKind::Delete, None) => write(serde_json::json!({ "id": id }), LastAction::Deleted),
        (WriteKind::Delete, Some(e)) if e.deleted => Outcome::Unchanged,
        (WriteKind::Delete, Some(e)) => write(e.payload.clone(), LastAction::Deleted),
    }
}

/// The action of a row that only moves an unchanged record's version on.
const BUMP: &str = "BUMP";

/// One row to write, as the bulk statement reads it from a JSON array.
#[derive(Serialize)]
struct RowWrite<'a> {
    /// The scope's index in the batch.
    s: usize,
    id: &'a str,
    payload: Value,
    hash: String,
    version: i64,
    seq: i64,
    action: &'static str,
}

#[derive(sqlx::FromRow)]
struct ExistingRow {
    /// Postgres answers by position in the wanted list, SQLite (per scope) by id.
    #[sqlx(default)]
    pos: Option<i64>,
    #[sqlx(default)]
    id: Option<String>,
    payload: Json<Value>,
    hash: String,
    version: i64,
    deleted: bool,
}

/// Reading a page of records.
#[derive(Debug, Clone, Default)]
pub struct RecordQuery {
    /// Exclusive: records after this cursor.
    pub cursor: Option<String>,
    /// Inclusive.
    pub modified_after: Option<DateTime<Utc>>,
    pub limit: u32,
    /// Which last actions to return; empty means all.
    pub filter: Vec<LastAction>,
    /// Only these ids, when given.
    pub ids: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StoredRecord {
    pub id: String,
    pub payload: Value,
    pub last_action: LastAction,
    pub first_seen_at: DateTime<Utc>,
    pub last_modified_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// Opaque: pass it back as `cursor` to continue after this record.
    pub cursor: String,
}

impl StoredRecord {
    /// As Nango's records API gives it: the record's own fields, its `id`, and
    /// `_nango_metadata`.
    pub fn into_nango(self) -> Value {
        let mut object = match self.payload {
            Value::Object(map) => map,
            other => serde_json::Map::from_iter([("value".to_string(), other)]),
        };
        object.insert("id".into(), Value::String(self.id));
        let metadata = serde_json::json!({
            "first_seen_at": self.first_seen_at,
            "last_modified_at": self.last_modified_at,
            "last_action": self.last_action,
            "deleted_at": self.deleted_at,
            "cursor": self.cursor,
        });
        object.insert("_nango_metadata".into(), metadata);
        Value::Object(object)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordPage {
    pub records: Vec<StoredRecord>,
    pub next_cursor: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RecordRow {
    id: String,
    payload: Json<Value>,
    last_action: String,
    first_seen_at: DateTime<Utc>,
    last_modified_at: DateTime<Utc>,
    deleted_at: Option<DateTime<Utc>>,
    seq: i64,
}

const CURSOR_PREFIX: &str = "c1.";

fn encode_cursor(seq: i64) -> String {
    format!("{CURSOR_PREFIX}{seq}")
}

/// The `seq` a cursor stands for; a malformed cursor is an error the caller shows as 400.
pub fn decode_cursor(cursor: &str) -> Result<i64, StoreError> {
    cursor
        .strip_prefix(CURSOR_PREFIX)
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| StoreError::Invalid(format!("cursor {cursor:?} is not one this server handed out")))
}

/// Per-dialect SQL of the write flow; the flow itself is [`Store::apply_writes`]. On
/// Postgres each statement takes the rows of every scope in the batch at once, as a JSON
/// array (one round trip for a whole worker group); on SQLite the lookup and the write
/// run once per scope.
///
/// Lookups by id filter on the key columns, which only the primary key indexes (paging
/// goes through `scope`), so their plan cannot go wrong on a table Postgres has not yet
/// analyzed. Unchanged records only have their version moved on: they travel in the same
/// `INSERT … ON CONFLICT` as `BUMP` rows, whose conflict check goes through the primary key.
struct Dialect {
    reserve: &'static str,
    existing: &'static str,
    apply: &'static str,
    page: &'static str,
}

/// The column list of the bulk write (both dialects).
macro_rules! insert_records {
    () => {
        "INSERT INTO records (environment_id, integration, connection_id, model, id, payload, hash, version, seq,
                              last_action, first_seen_at, last_modified_at, deleted_at, scope) "
    };
}

/// The conflict clause of the bulk write (both dialects): a newer or equal version
/// replaces the row, except that a `BUMP` row moves only the version on.
macro_rules! upsert_newer {
    () => {
        "ON CONFLICT (environment_id, integration, connection_id, model, id) DO UPDATE SET
             version = excluded.version,
             payload = CASE WHEN excluded.last_action = 'BUMP' THEN records.payload ELSE excluded.payload END,
             hash = CASE WHEN excluded.last_action = 'BUMP' THEN records.hash ELSE excluded.hash END,
             seq = CASE WHEN excluded.last_action = 'BUMP' THEN records.seq ELSE excluded.seq END,
             last_modified_at = CASE WHEN excluded.last_action = 'BUMP' THEN records.last_modified_at
                                     ELSE excluded.last_modified_at END,
             deleted_at = CASE WHEN excluded.last_action = 'BUMP' THEN records.deleted_at ELSE excluded.deleted_at END,
             last_action = CASE WHEN excluded.last_action = 'BUMP' THEN records.last_action ELSE excluded.last_action END
         WHERE records.version <= excluded.version"
    };
}

/// Takes the scopes' row locks (in key order, so two batches never wait on each other
/// in a cycle), reserves a block of change sequence numbers in each and raises its
/// highest version written (the raw clock's witness, `Store::raw_sequence_recorded`).
/// `$greatest` is the dialect's two-argument maximum.
macro_rules! reserve_scopes {
    ($select:expr, $greatest:literal) => {
        concat!(
            "INSERT INTO record_scopes (environment_id, integration, connection_id, model, last_seq, max_version) ",
            $select,
            " ON CONFLICT (environment_id, integration, connection_id, model)
             DO UPDATE SET last_seq = record_scopes.last_seq + excluded.last_seq,
                           max_version = ",
            $greatest,
            "(record_scopes.max_version, excluded.max_version)
             RETURNING environment_id, integration, connection_id, model, last_seq"
        )
    };
}

const POSTGRES: Dialect = Dialect {
    reserve: reserve_scopes!(
        "SELECT s.e, s.i, s.c, s.m, s.n, s.v
         FROM jsonb_to_recordset($1::jsonb) AS s(pos bigint, e bigint, i text, c text, m text, n bigint, v bigint)
         ORDER BY s.pos",
        "GREATEST"
    ),
    // One primary-key probe per wanted id: `LIMIT 1` keeps the planner from flattening
    // the subquery into a join that scans the scope (as it does with `= ANY(…)` on a
    // table it has not analyzed: O(scope × batch)).
    existing: "SELECT w.pos, r.payload, r.hash, r.version, r.deleted
         FROM jsonb_to_recordset($1::jsonb) AS w(s int, pos bigint, id text)
         JOIN jsonb_to_recordset($2::jsonb) AS sc(s int, e bigint, i text, c text, m text) ON sc.s = w.s
         CROSS JOIN LATERAL (
             SELECT payload, hash, version, deleted_at IS NOT NULL AS deleted FROM records
             WHERE environment_id = sc.e AND integration = sc.i AND connection_id = sc.c AND model = sc.m
               AND id = w.id
             LIMIT 1) AS r",
    apply: concat!(
        insert_records!(),
        "SELECT sc.e, sc.i, sc.c, sc.m, r.id, r.payload, r.hash, r.version, r.seq, r.action, $1, $1,
                CASE WHEN r.action = 'DELETED' THEN $1::timestamptz END, sc.scope
         FROM jsonb_to_recordset($2::jsonb) AS r(s int, id text, payload jsonb, hash text, version bigint, seq bigint,
                                                 action text)
         JOIN jsonb_to_recordset($3::jsonb) AS sc(s int, e bigint, i text, c text, m text, scope text) ON sc.s = r.s ",
        upsert_newer!()
    ),
    page: "SELECT id, payload, last_action, first_seen_at, last_modified_at, deleted_at, seq FROM records
         WHERE scope = $1 AND seq > $2
           AND ($3::timestamptz IS NULL OR last_modified_at >= $3)
           AND (($4 & 1 <> 0 AND last_action = 'ADDED') OR ($4 & 2 <> 0 AND last_action = 'UPDATED')
                OR ($4 & 4 <> 0 AND last_action = 'DELETED'))
           AND ($5::jsonb IS NULL OR id = ANY(ARRAY(SELECT jsonb_array_elements_text($5::jsonb))))
         ORDER BY seq LIMIT $6",
};

const SQLITE: Dialect = Dialect {
    reserve: reserve_scopes!(
        "SELECT s.value ->> '$.e', s.value ->> '$.i', s.value ->> '$.c', s.value ->> '$.m', s.value ->> '$.n',
                s.value ->> '$.v'
         FROM json_each($1) AS s WHERE true ORDER BY s.key",
        "MAX"
    ),
    // Per scope (SQLite is in-process: a statement costs no round trip), with the scope
    // bound as parameters: every `->>` re-reads its JSON object, so rows carry only
    // what differs between them.
    existing: "SELECT id, payload, hash, version, deleted_at IS NOT NULL AS deleted FROM records
         WHERE environment_id = $1 AND integration = $2 AND connection_id = $3 AND model = $4
           AND id IN (SELECT value FROM json_each($5))",
    apply: concat!(
        insert_records!(),
        "SELECT $1, $2, $3, $4, r.value ->> '$.id', r.value -> '$.payload', r.value ->> '$.hash',
                r.value ->> '$.version', r.value ->> '$.seq', r.value ->> '$.action', $5, $5,
                CASE WHEN r.value ->> '$.action' = 'DELETED' THEN $5 END, $6
         FROM json_each($7) AS r WHERE true ",
        upsert_newer!()
    ),
    page: "SELECT id, payload, last_action, first_seen_at, last_modified_at, deleted_at, seq FROM records
         WHERE scope = $1 AND seq > $2
           AND ($3 IS NULL OR last_modified_at >= $3)
           AND (($4 & 1 <> 0 AND last_action = 'ADDED') OR ($4 & 2 <> 0 AND last_action = 'UPDATED')
                OR ($4 & 4 <> 0 AND last_action = 'DELETED'))
           AND ($5 IS NULL OR id IN (SELECT value FROM json_each($5)))
         ORDER BY seq LIMIT $6",
};

/// A scope's live records written at a version or before.
const UNSEEN: &str = "SELECT id FROM records WHERE scope = $1 AND deleted_at IS NULL AND version <= $2";

/// Record writes of one or more calls (`batchSave`, `batchUpdate`, `batchDelete`), over
/// any number of scopes, to apply in one transaction.
#[derive(Default)]
pub struct WriteBatch {
    scopes: Vec<RecordScope>,
    scope_index: HashMap<String, usize>,
    entries: Vec<Entry>,
    calls: usize,
}

struct Entry {
    scope: usize,
    kind: WriteKind,
    id: String,
    payload: Value,
    version: i64,
    call: usize,
}

impl WriteBatch {
    /// Adds one call's writes and returns its number: the index of its counts in what
    /// [`Store::commit`] or [`Store::write_records`] report.
    pub fn add(&mut self, scope: &RecordScope, kind: WriteKind, records: Vec<(String, Value)>, version: i64) -> usize {
        let call = self.calls;
        self.calls += 1;
        let key = scope.key();
        let scope = match self.scope_index.get(&key) {
            Some(index) => *index,
            None => {
                self.scopes.push(scope.clone());
                self.scope_index.insert(key, self.scopes.len() - 1);
                self.scopes.len() - 1
            }
        };
        self.entries.extend(records.into_iter().map(|(id, payload)| Entry {
            scope,
            kind,
            id,
            payload,
            version,
            call,
        }));
        call
    }

    pub fn calls(&self) -> usize {
        self.calls
    }
}

/// A scope with its reservation, as the reserve statement reads it.
#[derive(Serialize)]
struct ScopeRow<'a> {
    /// Its index in the batch: rows refer to their scope by it.
    s: usize,
    pos: usize,
    e: i64,
    i: &'a str,
    c: &'a str,
    m: &'a str,
    n: i64,
    /// The highest version among the scope's writes.
    v: i64,
    scope: &'a str,
}

/// A stored record wanted, as the lookup statement reads it (its scope by index).
#[derive(Serialize)]
struct WantedRow<'a> {
    s: usize,
    pos: usize,
    id: &'a str,
}

type ReservedRow = (i64, String, String, String, i64);

/// `$query` (any sqlx query builder) with the scope bound as `$1..$4` and the given
/// values after it.
macro_rules! bind_scope {
    ($query:expr, $scope:expr $(, $value:expr)*) => {
        $query
            .bind($scope.environment_id)
            .bind($scope.integration.as_str())
            .bind(&$scope.connection_id)
            .bind(&$scope.model)
            $(.bind($value))*
    };
}

impl Store {
    fn dialect(&self) -> &'static Dialect {
        match self.pool {
            Pool::Postgres(_) => &POSTGRES,
            Pool::Sqlite(_) => &SQLITE,
        }
    }

    /// Applies one batch of `kind` writes at `version`, all in one transaction, and adds
    /// what it did to the `held` notice of the run that writes, if any.
    pub async fn write_records(
        &self,
        scope: &RecordScope,
        kind: WriteKind,
        records: Vec<(String, Value)>,
        version: i64,
        held: Option<&HeldNotice>,
    ) -> Result<WriteCounts, StoreError> {
        let mut batch = WriteBatch::default();
        batch.add(scope, kind, records, version);
        let tx = self.begin().await?;
        self.commit_call(tx, batch, &scope.model, held).await
    }

    /// Applies `batch` (one call, on `model`) in `tx`, adds what it did to `held`, and
    /// commits.
    async fn commit_call(
        &self,
        mut tx: Tx,
        batch: WriteBatch,
        model: &str,
        held: Option<&HeldNotice>,
    ) -> Result<WriteCounts, StoreError> {
        let counts = self.apply_writes(&mut tx, batch).await?[0];
        if let Some(held) = held {
            add_to_held(&mut tx, held, model, &counts).await?;
        }
        tx.commit().await?;
        Ok(counts)
    }

    /// Applies `batch` inside `tx`, returning each call's counts.
    ///
    /// Within one call the last occurrence of an id wins. Writes of one record by several
    /// calls are applied in version order (ties in call order), each deciding against the
    /// state the previous one left, and only the outcome is written.
    pub(crate) async fn apply_writes(&self, tx: &mut Tx, batch: WriteBatch) -> Result<Vec<WriteCounts>, StoreError> {
        let WriteBatch {
            scopes,
            mut entries,
            calls,
            ..
        } = batch;
        // Payloads apart, so that they can be moved out while the ids stay borrowed.
        let mut payloads: Vec<Value> = entries.iter_mut().map(|e| std::mem::take(&mut e.payload)).collect();
        let mut counts = vec![WriteCounts::default(); calls];
        // The last occurrence of an id within a call wins.
        let mut last: HashMap<(usize, usize, &str), usize> = HashMap::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            if last.insert((entry.call, entry.scope, &entry.id), index).is_some() {
                counts[entry.call].duplicates_in_batch += 1;
            }
        }
        let mut kept: Vec<usize> = last.into_values().collect();
        kept.sort_unstable();
        // Per record, the writes in version order.
        let mut records: BTreeMap<(usize, &str), Vec<usize>> = BTreeMap::new();
        for index in kept {
            let entry = &entries[index];
            records.entry((entry.scope, entry.id.as_str())).or_default().push(index);
        }
        for writes in records.values_mut() {
            writes.sort_by_key(|index| (entries[*index].version, *index));
        }
        if records.is_empty() {
            return Ok(counts);
        }
        let dialect = self.dialect();

        // First statement: the scopes' row locks, held to commit.
        let mut per_scope = vec![0i64; scopes.len()];
        let mut max_version = vec![0i64; scopes.len()];
        for ((scope, _), writes) in &records {
            per_scope[*scope] += 1;
            // Sorted by version: the last is the highest.
            let last = writes.last().map_or(0, |index| entries[*index].version);
            max_version[*scope] = max_version[*scope].max(last);
        }
        let mut order: Vec<usize> = (0..scopes.len()).filter(|s| per_scope[*s] > 0).collect();
        let keys: Vec<String> = scopes.iter().map(RecordScope::key).collect();
        order.sort_by(|a, b| keys[*a].cmp(&keys[*b]));
        let scope_rows: Vec<ScopeRow> = order
            .iter()
            .enumerate()
            .map(|(pos, s)| {
                let scope = &scopes[*s];
                ScopeRow {
                    s: *s,
                    pos,
                    e: scope.environment_id,
                    i: scope.integration.as_str(),
                    c: &scope.connection_id,
                    m: &scope.model,
                    n: per_scope[*s],
                    v: max_version[*s],
                    scope: &keys[*s],
                }
            })
            .collect();
        let reserved: Vec<ReservedRow> = on_tx!(tx, |conn| {
            sqlx::query_as::<_, ReservedRow>(dialect.reserve)
                .bind(Json(&scope_rows))
                .fetch_all(&mut *conn)
                .await
        })?;
        let mut next_seq = vec![0i64; scopes.len()];
        let by_key: HashMap<&str, usize> = order.iter().map(|s| (keys[*s].as_str(), *s)).collect();
        for (e, i, c, m, last_seq) in reserved {
            let key = scope_key(e, &i, &c, &m);
            let scope = *by_key
                .get(key.as_str())
                .ok_or_else(|| StoreError::Corrupt(format!("record scope {key} was reserved but not asked for")))?;
            next_seq[scope] = last_seq - per_scope[scope];
        }

        let wanted: Vec<WantedRow> = records
            .keys()
            .enumerate()
            .map(|(pos, (s, id))| WantedRow { s: *s, pos, id })
            .collect();
        let existing_of = |row: ExistingRow| Existing {
            payload: row.payload.0,
            hash: row.hash,
            version: row.version,
            deleted: row.deleted,
        };
        let mut existing: HashMap<usize, Existing> = HashMap::with_capacity(wanted.len());
        match tx {
            Tx::Postgres(conn) => {
                let found = sqlx::query_as::<_, ExistingRow>(dialect.existing)
                    .bind(Json(&wanted))
                    .bind(Json(&scope_rows))
                    .fetch_all(&mut **conn)
                    .await?;
                existing.extend(
                    found
                        .into_iter()
                        .map(|row| (row.pos.unwrap_or(-1) as usize, existing_of(row))),
                );
            }
            Tx::Sqlite(conn) => {
                for s in &order {
                    let scope = &scopes[*s];
                    let in_scope: HashMap<&str, usize> =
                        wanted.iter().filter(|w| w.s == *s).map(|w| (w.id, w.pos)).collect();
                    let ids: Vec<&str> = in_scope.keys().copied().collect();
                    let found = bind_scope!(sqlx::query_as::<_, ExistingRow>(dialect.existing), scope, Json(&ids))
                        .fetch_all(&mut **conn)
                        .await?;
                    for row in found {
                        if let Some(pos) = row.id.as_deref().and_then(|id| in_scope.get(id)) {
                            existing.insert(*pos, existing_of(row));
                        }
                    }
                }
            }
        }

        let mut rows: Vec<RowWrite<'_>> = Vec::new();
        for (pos, ((s, id), writes)) in records.iter().enumerate() {
            let mut state = existing.remove(&pos);
            let mut first_action = None;
            let mut last_action = None;
            let mut bumped = false;
            for index in writes {
                let Entry {
                    kind, version, call, ..
                } = entries[*index];
                let payload = std::mem::take(&mut payloads[*index]);
                let counts = &mut counts[call];
                match decide(kind, id, payload, state.as_ref(), version) {
                    Outcome::Stale => counts.skipped_stale += 1,
                    Outcome::Ignored => counts.ignored += 1,
                    Outcome::Unchanged => {
                        counts.unchanged += 1;
                        // Not rewritten, but the version moves on, so an older write that
                        // arrives later is still recognised as stale.
                        if let Some(state) = &mut state {
                            state.version = version;
                        }
                        bumped = true;
                    }
                    Outcome::Write { payload, hash, action } => {
                        match action {
                            LastAction::Added => counts.added += 1,
                            LastAction::Updated => counts.updated += 1,
                            LastAction::Deleted => counts.deleted += 1,
                        }
                        first_action.get_or_insert(action);
                        last_action = Some(action);
                        state = Some(Existing {
                            payload,
                            hash,
                            version,
                            deleted: action == LastAction::Deleted,
                        });
                    }
                }
            }
            let Some(state) = state else { continue };
            let row = |payload, hash, seq, action| RowWrite {
                s: *s,
                id,
                payload,
                hash,
                version: state.version,
                seq,
                action,
            };
            match last_action {
                Some(action) => {
                    // Added then updated within the batch is, to a reader, added.
                    let action = match (first_action, action) {
                        (Some(LastAction::Added), LastAction::Updated) => LastAction::Added,
                        _ => action,
                    };
                    next_seq[*s] += 1;
                    rows.push(row(state.payload, state.hash, next_seq[*s], action.as_str()));
                }
                // `{}`: the bulk row must pass NOT NULL before the conflict is seen.
                None if bumped => rows.push(row(Value::Object(Default::default()), String::new(), 0, BUMP)),
                None => {}
            }
        }
        if !rows.is_empty() {
            let now = Utc::now();
            match tx {
                Tx::Postgres(conn) => {
                    sqlx::query(dialect.apply)
                        .bind(now)
                        .bind(Json(&rows))
                        .bind(Json(&scope_rows))
                        .execute(&mut **conn)
                        .await?;
                }
                Tx::Sqlite(conn) => {
                    for s in &order {
                        let in_scope: Vec<&RowWrite<'_>> = rows.iter().filter(|r| r.s == *s).collect();
                        if in_scope.is_empty() {
                            continue;
                        }
                        let scope = &scopes[*s];
                        bind_scope!(sqlx::query(dialect.apply), scope, now, &keys[*s], Json(&in_scope))
                            .execute(&mut **conn)
                            .await?;
                    }
                }
            }
        }
        Ok(counts)
    }

    /// The ids of the scope's live records not in `seen` and written at `version` or
    /// before: what an exec run's delete tracking deletes (what it did not see is gone at
    /// the provider, unless a webhook wrote it after the run began).
    pub async fn unseen_records(
        &self,
        scope: &RecordScope,
        seen: &std::collections::HashSet<String>,
        version: i64,
    ) -> Result<Vec<String>, StoreError> {
        let key = scope.key();
        let live: Vec<(String,)> = on_pool!(self, |pool| sqlx::query_as(UNSEEN)
            .bind(&key)
            .bind(version)
            .fetch_all(pool)
            .await)?;
        Ok(live
            .into_iter()
            .map(|(id,)| id)
            .filter(|id| !seen.contains(id))
            .collect())
    }

    /// Soft-deletes, at `version`, what [`Store::unseen_records`] lists, in one
    /// transaction (so a webhook's write in between is decided against, not lost), and
    /// adds what it did to the `held` notice of the run, if any.
    pub async fn delete_unseen(
        &self,
        scope: &RecordScope,
        seen: &std::collections::HashSet<String>,
        version: i64,
        held: Option<&HeldNotice>,
    ) -> Result<WriteCounts, StoreError> {
        let mut tx = self.begin().await?;
        let key = scope.key();
        let live: Vec<(String,)> = on_tx!(&mut tx, |conn| {
            sqlx::query_as(UNSEEN)
                .bind(&key)
                .bind(version)
                .fetch_all(&mut *conn)
                .await
        })?;
        let gone: Vec<(String, Value)> = live
            .into_iter()
            .filter(|(id,)| !seen.contains(id))
            .map(|(id,)| {
                let payload = serde_json::json!({ "id": id });
                (id, payload)
            })
            .collect();
        let mut batch = WriteBatch::default();
        batch.add(scope, WriteKind::Delete, gone, version);
        self.commit_call(tx, batch, &scope.model, held).await
    }

    /// Removes every record of the scope for good (a trigger with `emptyCache`).
    pub async fn empty_records(&self, scope: &RecordScope) -> Result<u64, StoreError> {
        let key = scope.key();
        let removed = on_pool!(self, |pool| sqlx::query("DELETE FROM records WHERE scope = $1")
            .bind(&key)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(removed)
    }

    /// One page of a scope's records in change order.
    pub async fn list_records(&self, scope: &RecordScope, query: &RecordQuery) -> Result<RecordPage, StoreError> {
        let after = query.cursor.as_deref().map(decode_cursor).transpose()?.unwrap_or(0);
        let filter: i64 = if query.filter.is_empty() {
            7
        } else {
            query.filter.iter().fold(0, |bits, action| {
                bits | match action {
                    LastAction::Added => 1,
                    LastAction::Updated => 2,
                    LastAction::Deleted => 4,
                }
            })
        };
        let limit = i64::from(query.limit.clamp(1, 10_000));
        let ids = query.ids.as_ref().map(Json);
        let key = scope.key();
        let rows: Vec<RecordRow> = on_pool!(self, |pool| {
            sqlx::query_as::<_, RecordRow>(self.dialect().page)
                .bind(&key)
                .bind(after)
                .bind(query.modified_after)
                .bind(filter)
                .bind(ids)
                .bind(limit + 1)
                .fetch_all(pool)
                .await
        })?;
        let more = rows.len() as i64 > limit;
        let records = rows
            .into_iter()
            .take(limit as usize)
            .map(|row| {
                Ok(StoredRecord {
                    last_action: LastAction::parse(&row.last_action)?,
                    id: row.id,
                    payload: row.payload.0,
                    first_seen_at: row.first_seen_at,
                    last_modified_at: row.last_modified_at,
                    deleted_at: row.deleted_at,
                    cursor: encode_cursor(row.seq),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next_cursor = if more {
            records.last().map(|r| r.cursor.clone())
        } else {
            None
        };
        Ok(RecordPage { records, next_cursor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn existing(payload: Value, version: i64, deleted: bool) -> Existing {
        Existing {
            hash: content_hash(&payload),
            payload,
            version,
            deleted,
        }
    }

    #[test]
    fn reordered_keys_hash_alike() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"x":[1,2],"y":null}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"y":null,"x":[1,2]},"a":1}"#).unwrap();
        assert_eq!(content_hash(&a), content_hash(&b));
        let c: Value = serde_json::from_str(r#"{"b":{"y":null,"x":[2,1]},"a":1}"#).unwrap();
        assert_ne!(content_hash(&a), content_hash(&c), "array order does count");
    }

    #[test]
    fn deep_merge_merges_objects_and_replaces_the_rest() {
        let mut target = json!({"id": "1", "name": {"first": "Ada", "last": "L"}, "tags": [1, 2], "n": 1});
        deep_merge(
            &mut target,
            json!({"name": {"last": "Lovelace"}, "tags": [3], "n": {"k": 1}, "new": true}),
        );
        assert_eq!(
            target,
            json!({"id": "1", "name": {"first": "Ada", "last": "Lovelace"}, "tags": [3], "n": {"k": 1}, "new": true})
        );
    }

    #[test]
    fn decisions() {
        let stored = existing(json!({"id": "1", "a": 1}), 10, false);
        let tomb = existing(json!({"id": "1", "a": 1}), 10, true);
        let save = |input: Value, e: Option<&Existing>, v| decide(WriteKind::Save, "1", input, e, v);
        assert!(matches!(
            save(json!({"a": 1}), None, 1),
            Outcome::Write {
                action: LastAction::Added,
                ..
            }
        ));
        assert_eq!(save(json!({"a": 1, "id": "1"}), Some(&stored), 11), Outcome::Unchanged);
        assert!(matches!(
            save(json!({"a": 2}), Some(&stored), 10),
            Outcome::Write {
                action: LastAction::Updated,
                ..
            }
        ));
        assert_eq!(save(json!({"a": 2}), Some(&stored), 9), Outcome::Stale);
        assert_eq!(
            save(json!({"a": 2}), Some(&tomb), 9),
            Outcome::Stale,
            "a stale save does not resurrect"
        );
        assert!(matches!(
            save(json!({"a": 2}), Some(&tomb), 11),
            Outcome::Write {
                action: LastAction::Added,
                ..
            }
        ));
        let update = |input: Value, e: Option<&Existing>| decide(WriteKind::Update, "1", input, e, 11);
        assert_eq!(update(json!({"a": 5}), None), Outcome::Ignored);
        assert_eq!(update(json!({"a": 5}), Some(&tomb)), Outcome::Ignored);
        assert_eq!(update(json!({"a": 1}), Some(&stored)), Outcome::Unchanged);
        let delete = |e: Option<&Existing>| decide(WriteKind::Delete, "9", Value::Null, e, 11);
        assert!(
            matches!(delete(None), Outcome::Write { action: LastAction::Deleted, ref payload, .. } if payload == &json!({"id": "9"}))
        );
        assert!(
            matches!(delete(Some(&stored)), Outcome::Write { action: LastAction::Deleted, ref payload, .. } if payload == &json!({"id": "1", "a": 1}))
        );
        assert_eq!(delete(Some(&tomb)), Outcome::Unchanged);
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(42)).unwrap(), 42);
        for bad in ["", "42", "c1.", "c1.-3", "c1.x", "c2.4"] {
            assert!(matches!(decode_cursor(bad), Err(StoreError::Invalid(_))), "{bad}");
        }
    }
}
