//! What the store holds, as the rest of hookyard sees it, and the raw rows behind it.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;
use uuid::Uuid;

use super::StoreError;
use crate::keys::{EnvironmentName, IntegrationKey};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Environment {
    pub id: i64,
    pub name: EnvironmentName,
    /// The public id in webhook URLs: `/webhook/{webhook_id}/{integration}`.
    pub webhook_id: Uuid,
    #[serde(skip)]
    pub secret_key: String,
    #[serde(skip)]
    pub webhook_signing_key: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Integration {
    pub id: i64,
    pub environment_id: i64,
    pub environment: EnvironmentName,
    pub unique_key: IntegrationKey,
    pub provider: String,
    #[serde(skip)]
    pub webhook_secret: Option<String>,
    pub settings: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct NewIntegration {
    pub unique_key: IntegrationKey,
    pub provider: String,
    pub webhook_secret: Option<String>,
    pub settings: serde_json::Value,
}

#[derive(sqlx::FromRow)]
pub(super) struct EnvironmentRow {
    id: i64,
    name: String,
    webhook_id: String,
    secret_key: String,
    webhook_signing_key: String,
    created_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct IntegrationRow {
    id: i64,
    environment_id: i64,
    environment: String,
    unique_key: String,
    provider: String,
    webhook_secret: Option<String>,
    settings: Json<serde_json::Value>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

impl TryFrom<EnvironmentRow> for Environment {
    type Error = StoreError;
    fn try_from(row: EnvironmentRow) -> Result<Self, StoreError> {
        Ok(Environment {
            id: row.id,
            name: row.name.try_into().map_err(|e| corrupt("environment name", e))?,
            webhook_id: row
                .webhook_id
                .parse()
                .map_err(|e| corrupt("environment webhook_id", e))?,
            secret_key: row.secret_key,
            webhook_signing_key: row.webhook_signing_key,
            created_at: row.created_at,
        })
    }
}

impl TryFrom<IntegrationRow> for Integration {
    type Error = StoreError;
    fn try_from(row: IntegrationRow) -> Result<Self, StoreError> {
        Ok(Integration {
            id: row.id,
            environment_id: row.environment_id,
            environment: row.environment.try_into().map_err(|e| corrupt("environment name", e))?,
            unique_key: row.unique_key.try_into().map_err(|e| corrupt("integration key", e))?,
            provider: row.provider,
            webhook_secret: row.webhook_secret,
            settings: row.settings.0,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}
