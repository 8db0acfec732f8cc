//! Sealing every stored secret again under the current encryption key, once the
//! services open with both keys (`hookyard reseal`; deploy/README.md, "Changing the
//! encryption key").

use super::{Pool, Store, StoreError};
use crate::secrets::Purpose;

/// A column of sealed values.
struct SealedColumn {
    table: &'static str,
    column: &'static str,
    purpose: Purpose,
    /// The table's integer key, to page and update by; without one (a small table) a
    /// row is found by its sealed value, unique by its random nonce.
    id: Option<&'static str>,
}

const SEALED: [SealedColumn; 7] = [
    SealedColumn {
        table: "environments",
        column: "secret_key",
        purpose: Purpose::EnvironmentSecretKey,
        id: Some("id"),
    },
    SealedColumn {
        table: "environments",
        column: "webhook_signing_key",
        purpose: Purpose::EnvironmentSigningKey,
        id: Some("id"),
    },
    SealedColumn {
        table: "integrations",
        column: "webhook_secret",
        purpose: Purpose::WebhookSecret,
        id: Some("id"),
    },
    SealedColumn {
        table: "integrations",
        column: "oauth_client_secret",
        purpose: Purpose::OAuthClientSecret,
        id: Some("id"),
    },
    SealedColumn {
        table: "connections",
        column: "credentials",
        purpose: Purpose::Credentials,
        id: Some("id"),
    },
    SealedColumn {
        table: "forwarding",
        column: "signing_key",
        purpose: Purpose::ForwardSigningKey,
        id: None,
    },
    SealedColumn {
        table: "environment_variables",
        column: "value",
        purpose: Purpose::EnvironmentVariable,
        id: None,
    },
];

/// Rows read and re-sealed per transaction.
const BATCH: i64 = 500;

/// What became of one column's secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resealed {
    /// `table.column`.
    pub column: String,
    /// Secrets in the column.
    pub total: u64,
    /// Sealed again under the current key (with `dry_run`: that would be).
    pub resealed: u64,
    /// Under the current key already.
    pub current: u64,
    /// Changed by someone else between the read and the write: sealed by a service,
    /// which seals under the current key.
    pub changed: u64,
    /// Opened by no key given.
    pub unreadable: u64,
    /// Their rows' ids (none for a table without one).
    pub unreadable_ids: Vec<i64>,
}

impl Store {
    /// Seals every secret that is under one of the keys the store's cipher only opens
    /// with again under its own key, column by column; `progress` hears each column's
    /// count as it goes. Safe while services run: a row written meanwhile is left as
    /// they wrote it. With `dry_run`, reads and counts only.
    pub async fn reseal(
        &self,
        dry_run: bool,
        mut progress: impl FnMut(&Resealed),
    ) -> Result<Vec<Resealed>, StoreError> {
        let mut report = Vec::new();
        for sealed in &SEALED {
            let mut counts = Resealed {
                column: format!("{}.{}", sealed.table, sealed.column),
                ..Resealed::default()
            };
            let total: i64 = on_pool!(self, |pool| sqlx::query_scalar(&format!(
                "SELECT COUNT(*) FROM {} WHERE {} IS NOT NULL",
                sealed.table, sealed.column
            ))
            .fetch_one(pool)
            .await)?;
            counts.total = total as u64;
            progress(&counts);
            let mut after = i64::MIN;
            loop {
                let rows = self.sealed_rows(sealed, after).await?;
                let Some(&(last, _)) = rows.last() else { break };
                after = last;
                let mut stale = Vec::new();
                for (id, value) in rows {
                    match self.cipher.open_telling(sealed.purpose, &value) {
                        Ok((_, true)) => counts.current += 1,
                        Ok((plain, false)) => stale.push((id, value, plain)),
                        Err(_) => {
                            counts.unreadable += 1;
                            counts.unreadable_ids.extend(sealed.id.map(|_| id));
                        }
                    }
                }
                if dry_run {
                    counts.resealed += stale.len() as u64;
                } else {
                    let written = self.write_resealed(sealed, stale).await?;
                    counts.resealed += written.0;
                    counts.changed += written.1;
                }
                progress(&counts);
                if sealed.id.is_none() {
                    break;
                }
            }
            report.push(counts);
        }
        Ok(report)
    }

    /// A page of `(id, sealed value)` after `after`; a table without an id in one page
    /// (ids 0).
    async fn sealed_rows(&self, sealed: &SealedColumn, after: i64) -> Result<Vec<(i64, String)>, StoreError> {
        let (table, column) = (sealed.table, sealed.column);
        Ok(match sealed.id {
            Some(id) => {
                let query = format!(
                    "SELECT {id}, {column} FROM {table} WHERE {column} IS NOT NULL AND {id} > $1 ORDER BY {id} LIMIT {BATCH}"
                );
                on_pool!(self, |pool| sqlx::query_as(&query).bind(after).fetch_all(pool).await)
            }
            None => {
                let query = format!("SELECT CAST(0 AS BIGINT), {column} FROM {table} WHERE {column} IS NOT NULL");
                on_pool!(self, |pool| sqlx::query_as(&query).fetch_all(pool).await)
            }
        }?)
    }

    /// Writes the re-sealed values of one page in one transaction, each only where the
    /// row still holds the value that was read: `(written, changed meanwhile)`.
    async fn write_resealed(
        &self,
        sealed: &SealedColumn,
        rows: Vec<(i64, String, String)>,
    ) -> Result<(u64, u64), StoreError> {
        let (table, column) = (sealed.table, sealed.column);
        let query = match sealed.id {
            Some(id) => format!("UPDATE {table} SET {column} = $1 WHERE {column} = $2 AND {id} = $3"),
            None => format!("UPDATE {table} SET {column} = $1 WHERE {column} = $2"),
        };
        let mut counts = (0, 0);
        if rows.is_empty() {
            return Ok(counts);
        }
        in_transaction!(self, |tx| {
            for (id, old, plain) in &rows {
                let update = sqlx::query(&query)
                    .bind(self.cipher.seal(sealed.purpose, plain))
                    .bind(old);
                let update = if sealed.id.is_some() { update.bind(id) } else { update };
                let updated = update.execute(&mut *tx).await?.rows_affected();
                if updated == 1 {
                    counts.0 += 1;
                } else {
                    counts.1 += 1;
                }
            }
            Ok::<(), StoreError>(())
        })?;
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_secret_has_its_column() {
        // A new kind of secret stops this compiling until it is listed here, and the
        // assertion until its column is in SEALED: `reseal` must not leave it behind.
        let all = [
            Purpose::EnvironmentSecretKey,
            Purpose::EnvironmentSigningKey,
            Purpose::WebhookSecret,
            Purpose::OAuthClientSecret,
            Purpose::Credentials,
            Purpose::ForwardSigningKey,
            Purpose::EnvironmentVariable,
        ];
        for purpose in all {
            match purpose {
                Purpose::EnvironmentSecretKey
                | Purpose::EnvironmentSigningKey
                | Purpose::WebhookSecret
                | Purpose::OAuthClientSecret
                | Purpose::Credentials
                | Purpose::ForwardSigningKey
                | Purpose::EnvironmentVariable => {}
            }
            let named = format!("{purpose:?}");
            assert!(
                SEALED.iter().any(|column| format!("{:?}", column.purpose) == named),
                "{named} has no column in SEALED"
            );
        }
    }
}
