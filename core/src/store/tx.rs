//! A transaction on whichever back end is configured, so that several store operations
//! (a worker's record writes, metadata writes and idempotency markers) can share one.

use super::{Pool, Store, StoreError};

pub enum Tx {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

/// Runs `$body` with `$conn` bound to the transaction's connection (`&mut *$conn` is an
/// executor), once per back end.
macro_rules! on_tx {
    ($tx:expr, |$conn:ident| $body:expr) => {
        match $tx {
            $crate::store::tx::Tx::Postgres(tx) => {
                let $conn = &mut **tx;
                $body
            }
            $crate::store::tx::Tx::Sqlite(tx) => {
                let $conn = &mut **tx;
                $body
            }
        }
    };
}
pub(crate) use on_tx;

impl Store {
    pub(crate) async fn begin(&self) -> Result<Tx, StoreError> {
        Ok(match &self.pool {
            Pool::Postgres(pool) => Tx::Postgres(pool.begin().await?),
            // Every transaction here writes: taking the write lock at BEGIN waits for the
            // busy timeout, where a read lock upgraded later fails at once ("database is
            // locked") when another writer got in first.
            Pool::Sqlite(pool) => Tx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?),
        })
    }
}

/// Rows per statement of [`Tx::insert_json_rows`].
const ROWS_PER_STATEMENT: usize = 1000;

impl Tx {
    /// Runs `insert`, whose one parameter is a JSON array of rows, for `rows` in chunks
    /// of [`ROWS_PER_STATEMENT`]. One statement text whatever the count: a multi-row
    /// `VALUES` list would be a prepared statement per row count, and a statement per
    /// row a round trip each.
    pub(crate) async fn insert_json_rows<R: serde::Serialize>(
        &mut self,
        insert: &str,
        rows: &[R],
    ) -> Result<(), StoreError> {
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            on_tx!(self, |conn| sqlx::query(insert)
                .bind(sqlx::types::Json(chunk))
                .execute(&mut *conn)
                .await
                .map(|_| ()))?;
        }
        Ok(())
    }

    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Postgres(tx) => tx.commit().await?,
            Tx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }
}
