//! Connections: a customer's account at a provider, under an integration. Deleting one
//! is soft: the row stays (with `deleted_at`) but no read, list or route sees it again.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::types::Json;

use super::connection_events::{bind_key, OwedEvent, OWE};
use super::model::ConnectionRow;
use super::refresh::refresh_check_after;
use super::tx::{on_tx, Tx};
use super::{
    conflict_on_unique, Connection, ConnectionQuery, Credentials, Environment, NewConnection, Pool, Store, StoreError,
};
use crate::keys::IntegrationKey;
use crate::secrets::Purpose;

const SELECT: &str = "SELECT c.id, c.environment_id, i.unique_key AS integration, i.provider, c.connection_id,
        c.connection_config, c.metadata, c.tags, c.credentials, c.created_at, c.updated_at,
        c.refresh_failed_at, c.refresh_error, c.rate_limited_until
    FROM connections c JOIN integrations i ON i.id = c.integration_id";

/// Moves an integration's `connections_version` on (see migration 0004).
const BUMP_BY_ID: &str = "UPDATE integrations SET connections_version = connections_version + 1 WHERE id = $1";
const VERSION: &str = "SELECT connections_version FROM integrations WHERE id = $1";
const BUMP_BY_KEY: &str =
    "UPDATE integrations SET connections_version = connections_version + 1 WHERE environment_id = $1 AND unique_key = $2";

/// Stores sealed credentials `$4` at `$5` on the live connection (`$1` environment id,
/// `$2` connection id, `$3` integration key), with their keep-alive check `$6`, ending
/// any refresh lease and failure.
const STORE_CREDENTIALS: &str = concat!(
    "UPDATE connections SET credentials = $4, updated_at = $5, refresh_check_at = $6,
            refresh_holder = NULL, refresh_until = NULL,
            refresh_failed_at = NULL, refresh_error = NULL, refresh_failure_notified_at = NULL
     WHERE ",
    live_connection!()
);

/// What `POST /connections` changes on a connection that exists: the fields given.
#[derive(Debug, Clone, Default)]
pub struct ConnectionChanges {
    pub connection_config: Option<Value>,
    pub metadata: Option<Value>,
    pub tags: Option<Value>,
    pub credentials: Option<Credentials>,
}

/// How `set_connection_metadata` treats the stored metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataWrite {
    /// The new object replaces the stored one.
    Replace,
    /// Top-level keys of the new object overwrite the stored ones; others stay.
    Merge,
}

impl Store {
    pub async fn create_connection(
        &self,
        environment: &Environment,
        new: &NewConnection,
    ) -> Result<Connection, StoreError> {
        self.insert_connection(environment, new, None).await
    }

    /// [`Store::create_connection`], and in the same transaction `event` owed to it,
    /// claimed by the caller until `claimed_until` (see [`super::connection_events`]).
    pub async fn create_connection_owing(
        &self,
        environment: &Environment,
        new: &NewConnection,
        event: &str,
        claimed_until: DateTime<Utc>,
    ) -> Result<(Connection, OwedEvent), StoreError> {
        let owed = OwedEvent {
            environment: environment.name.clone(),
            integration: new.integration.clone(),
            connection_id: new.connection_id.clone(),
            event: event.to_string(),
        };
        let connection = self
            .insert_connection(environment, new, Some((&owed, claimed_until)))
            .await?;
        Ok((connection, owed))
    }

    async fn insert_connection(
        &self,
        environment: &Environment,
        new: &NewConnection,
        owed: Option<(&OwedEvent, DateTime<Utc>)>,
    ) -> Result<Connection, StoreError> {
        let integration = self.existing_integration(environment.id, &new.integration).await?;
        let credentials = new.credentials.as_ref().map(|c| self.seal_credentials(c)).transpose()?;
        let now = Utc::now();
        in_transaction!(self, |tx| {
            let inserted = sqlx::query(
                "INSERT INTO connections (environment_id, integration_id, connection_id, connection_config, metadata,
                                          tags, credentials, created_at, updated_at, refresh_check_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)",
            )
            .bind(environment.id)
            .bind(integration.id)
            .bind(&new.connection_id)
            .bind(Json(&new.connection_config))
            .bind(Json(&new.metadata))
            .bind(Json(&new.tags))
            .bind(&credentials)
            .bind(now)
            .bind(refresh_check_after(new.credentials.as_ref(), now))
            .execute(&mut *tx)
            .await
            .map(|_| ());
            conflict_on_unique(inserted, || {
                format!("connection {} of integration {}", new.connection_id, new.integration)
            })?;
            sqlx::query(BUMP_BY_ID).bind(integration.id).execute(&mut *tx).await?;
            if let Some((owed, claimed_until)) = owed {
                bind_key!(sqlx::query(OWE), owed)
                    .bind(claimed_until)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok::<(), StoreError>(())
        })?;
        self.existing_connection(environment.id, &new.integration, &new.connection_id)
            .await
    }

    /// The live connection `connection_id` of the integration, if any.
    pub async fn connection(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
    ) -> Result<Option<Connection>, StoreError> {
        let query = format!(
            "{SELECT} WHERE c.environment_id = $1 AND i.unique_key = $2 AND c.connection_id = $3
                        AND c.deleted_at IS NULL"
        );
        let row: Option<ConnectionRow> = on_pool!(self, |pool| sqlx::query_as(&query)
            .bind(environment_id)
            .bind(integration.as_str())
            .bind(connection_id)
            .fetch_optional(pool)
            .await)?;
        row.map(|row| row.open(&self.cipher)).transpose()
    }

    /// Records that the provider's rate limit holds the live connection's calls until
    /// `until` (a later time already recorded stays), for the other processes to read
    /// with the connection.
    pub async fn rate_limit_connection(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
        until: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        const LIMIT: &str = concat!(
            "UPDATE connections SET rate_limited_until = $4 WHERE ",
            live_connection!(),
            " AND (rate_limited_until IS NULL OR rate_limited_until < $4)"
        );
        on_pool!(self, |pool| sqlx::query(LIMIT)
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .bind(until)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// The live connections among `connection_ids` of the integration (missing ones are
    /// left out), in one query.
    pub async fn connections_named(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_ids: &[&str],
    ) -> Result<Vec<Connection>, StoreError> {
        let wanted = match self.pool {
            Pool::Postgres(_) => "SELECT jsonb_array_elements_text($3::jsonb)",
            Pool::Sqlite(_) => "SELECT value FROM json_each($3)",
        };
        let query = format!(
            "{SELECT} WHERE c.environment_id = $1 AND i.unique_key = $2 AND c.deleted_at IS NULL
                        AND c.connection_id IN ({wanted})"
        );
        let rows: Vec<ConnectionRow> = on_pool!(self, |pool| sqlx::query_as(&query)
            .bind(environment_id)
            .bind(integration.as_str())
            .bind(Json(connection_ids))
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(|row| row.open(&self.cipher)).collect()
    }

    /// The live connection, or `NotFound` naming it.
    pub async fn existing_connection(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
    ) -> Result<Connection, StoreError> {
        self.connection(environment_id, integration, connection_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("connection {connection_id} of integration {integration}")))
    }

    /// Live connections of the environment matching `query`, oldest first.
    pub async fn connections(
        &self,
        environment_id: i64,
        query: &ConnectionQuery,
    ) -> Result<Vec<Connection>, StoreError> {
        let sql = format!(
            "{SELECT} WHERE c.environment_id = $1 AND c.deleted_at IS NULL
                 AND ($2 IS NULL OR i.unique_key = $2)
                 AND ($3 IS NULL OR c.connection_id = $3)
                 AND ($4 IS NULL OR LOWER(c.connection_id) LIKE $4 ESCAPE '\\')
             ORDER BY c.id LIMIT $5 OFFSET $6"
        );
        let pattern = query.search.as_deref().map(like_pattern);
        let rows: Vec<ConnectionRow> = on_pool!(self, |pool| sqlx::query_as(&sql)
            .bind(environment_id)
            .bind(query.integration.as_ref().map(IntegrationKey::as_str))
            .bind(&query.connection_id)
            .bind(&pattern)
            .bind(i64::from(query.limit))
            .bind(i64::try_from(query.offset).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(|row| row.open(&self.cipher)).collect()
    }

    /// Replaces a live connection's credentials (a refreshed OAuth2 token), ending any
    /// refresh lease on it and any refresh failure it had; false when the connection is
    /// gone.
    pub async fn update_credentials(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
        credentials: &Credentials,
    ) -> Result<bool, StoreError> {
        let sealed = self.seal_credentials(credentials)?;
        let now = Utc::now();
        let updated = on_pool!(self, |pool| sqlx::query(STORE_CREDENTIALS)
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .bind(&sealed)
            .bind(now)
            .bind(refresh_check_after(Some(credentials), now))
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        Ok(updated == 1)
    }

    /// Changes a live connection as `POST /connections` does for one that exists (Nango's
    /// import is an upsert): each field given replaces the stored one; new credentials
    /// end a refresh failure. `None` when there is no such connection.
    pub async fn update_connection(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
        changes: &ConnectionChanges,
    ) -> Result<Option<Connection>, StoreError> {
        let sealed = changes
            .credentials
            .as_ref()
            .map(|c| self.seal_credentials(c))
            .transpose()?;
        let now = Utc::now();
        let updated = in_transaction!(self, |tx| {
            let updated = sqlx::query(concat!(
                "UPDATE connections SET connection_config = COALESCE($4, connection_config),
                        metadata = COALESCE($5, metadata), tags = COALESCE($6, tags), updated_at = $7
                 WHERE ",
                live_connection!()
            ))
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .bind(changes.connection_config.as_ref().map(Json))
            .bind(changes.metadata.as_ref().map(Json))
            .bind(changes.tags.as_ref().map(Json))
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
                == 1;
            if updated {
                if let Some(sealed) = &sealed {
                    sqlx::query(STORE_CREDENTIALS)
                        .bind(environment_id)
                        .bind(connection_id)
                        .bind(integration.as_str())
                        .bind(sealed)
                        .bind(now)
                        .bind(refresh_check_after(changes.credentials.as_ref(), now))
                        .execute(&mut *tx)
                        .await?;
                }
                // Routing matches on both: its caches must see the change.
                if changes.connection_config.is_some() || changes.metadata.is_some() {
                    sqlx::query(BUMP_BY_KEY)
                        .bind(environment_id)
                        .bind(integration.as_str())
                        .execute(&mut *tx)
                        .await?;
                }
            }
            Ok::<bool, StoreError>(updated)
        })?;
        if !updated {
            return Ok(None);
        }
        self.existing_connection(environment_id, integration, connection_id)
            .await
            .map(Some)
    }

    fn seal_credentials(&self, credentials: &Credentials) -> Result<String, StoreError> {
        let json = serde_json::to_string(credentials).map_err(|e| StoreError::Invalid(e.to_string()))?;
        Ok(self.cipher.seal(Purpose::Credentials, &json))
    }

    /// The ids of an integration's live connections, oldest first.
    pub async fn live_connection_ids(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
    ) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = on_pool!(self, |pool| sqlx::query_as(
            "SELECT c.connection_id FROM connections c JOIN integrations i ON i.id = c.integration_id
             WHERE c.environment_id = $1 AND i.unique_key = $2 AND c.deleted_at IS NULL ORDER BY c.id"
        )
        .bind(environment_id)
        .bind(integration.as_str())
        .fetch_all(pool)
        .await)?;
        Ok(rows.into_iter().map(|(id,)| id).collect())
    }

    /// The integration's `connections_version`: it moves on whenever one of its
    /// connections is created, deleted or has its metadata written.
    pub async fn connections_version(&self, integration_id: i64) -> Result<i64, StoreError> {
        let version: Option<i64> = on_pool!(self, |pool| sqlx::query_scalar(VERSION)
            .bind(integration_id)
            .fetch_optional(pool)
            .await)?;
        version.ok_or_else(|| StoreError::NotFound(format!("integration #{integration_id}")))
    }

    /// Every integration's connections version, by integration id: any connection
    /// created or deleted anywhere changes this.
    pub async fn connections_versions(&self) -> Result<Vec<(i64, i64)>, StoreError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(
            "SELECT id, connections_version FROM integrations ORDER BY id"
        )
        .fetch_all(pool)
        .await)?)
    }

    /// Every live connection of an integration, with the version they were read at.
    pub async fn routing_connections(&self, integration_id: i64) -> Result<(i64, Vec<Connection>), StoreError> {
        let query = format!("{SELECT} WHERE c.integration_id = $1 AND c.deleted_at IS NULL ORDER BY c.id");
        in_transaction!(self, |tx| {
            let version: i64 = sqlx::query_scalar(VERSION)
                .bind(integration_id)
                .fetch_one(&mut *tx)
                .await?;
            let rows: Vec<ConnectionRow> = sqlx::query_as(&query).bind(integration_id).fetch_all(&mut *tx).await?;
            let connections = rows
                .into_iter()
                .map(|row| row.open(&self.cipher))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, StoreError>((version, connections))
        })
    }

    /// Soft-deletes the connection; false when there was no live one.
    pub async fn delete_connection(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_id: &str,
    ) -> Result<bool, StoreError> {
        let done = in_transaction!(self, |tx| {
            let done = sqlx::query(
                "UPDATE connections SET deleted_at = $1, updated_at = $1
                 WHERE environment_id = $2 AND connection_id = $3 AND deleted_at IS NULL
                   AND integration_id = (SELECT id FROM integrations WHERE environment_id = $2 AND unique_key = $4)",
            )
            .bind(Utc::now())
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query(BUMP_BY_KEY)
                .bind(environment_id)
                .bind(integration.as_str())
                .execute(&mut *tx)
                .await?;
            done
        });
        Ok(done > 0)
    }

    /// Writes `metadata` to every connection in `connection_ids`, all or none: when one
    /// of them does not exist, nothing is written and `NotFound` names it.
    pub async fn set_connection_metadata(
        &self,
        environment_id: i64,
        integration: &IntegrationKey,
        connection_ids: &[String],
        metadata: &Map<String, Value>,
        how: MetadataWrite,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        write_metadata(&mut tx, environment_id, integration, connection_ids, metadata, how).await?;
        tx.commit().await
    }
}

/// [`Store::set_connection_metadata`] inside a transaction the caller commits.
pub(crate) async fn write_metadata(
    tx: &mut Tx,
    environment_id: i64,
    integration: &IntegrationKey,
    connection_ids: &[String],
    metadata: &Map<String, Value>,
    how: MetadataWrite,
) -> Result<(), StoreError> {
    let now = Utc::now();
    for connection_id in connection_ids {
        // Writing first takes the row lock (the database's write lock on SQLite), so a
        // concurrent merge cannot slip between this read and the write.
        let stored: Option<(i64, Json<Value>)> = on_tx!(tx, |conn| {
            sqlx::query_as(
                "UPDATE connections SET updated_at = $1
                 WHERE environment_id = $2 AND connection_id = $3 AND deleted_at IS NULL
                   AND integration_id = (SELECT id FROM integrations WHERE environment_id = $2 AND unique_key = $4)
                 RETURNING id, metadata",
            )
            .bind(now)
            .bind(environment_id)
            .bind(connection_id)
            .bind(integration.as_str())
            .fetch_optional(&mut *conn)
            .await
        })?;
        let Some((row_id, Json(current))) = stored else {
            return Err(StoreError::NotFound(format!(
                "connection {connection_id} of integration {integration}"
            )));
        };
        let mut next = match (how, current) {
            (MetadataWrite::Merge, Value::Object(current)) => current,
            _ => Map::new(),
        };
        next.extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        on_tx!(tx, |conn| {
            sqlx::query("UPDATE connections SET metadata = $1 WHERE id = $2")
                .bind(Json(Value::Object(next)))
                .bind(row_id)
                .execute(&mut *conn)
                .await
                .map(|_| ())
        })?;
    }
    on_tx!(tx, |conn| {
        sqlx::query(BUMP_BY_KEY)
            .bind(environment_id)
            .bind(integration.as_str())
            .execute(&mut *conn)
            .await
            .map(|_| ())
    })?;
    Ok(())
}

/// A LIKE pattern matching `text` anywhere, lower-cased, with `%`, `_` and `\` escaped.
fn like_pattern(text: &str) -> String {
    let mut pattern = String::from("%");
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[cfg(test)]
mod tests {
    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(super::like_pattern("A_b%"), "%a\\_b\\%%");
    }
}
