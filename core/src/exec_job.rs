//! An exec job: one run of a sync's `exec` for one connection, as the reconciler queues
//! it on `HOOKS_EXEC` and the worker runs it.

use serde::{Deserialize, Serialize};

use crate::keys::{EnvironmentName, IntegrationKey};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecReason {
    /// Its frequency came round.
    Schedule,
    /// `POST /sync/trigger`.
    Trigger,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecJob {
    pub environment: EnvironmentName,
    pub integration: IntegrationKey,
    pub sync: String,
    pub connection_id: String,
    pub reason: ExecReason,
    /// The schedule slot (schedule runs): slot `n` starts at `offset + n × frequency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<i64>,
    /// Forget the checkpoint first (a full run).
    #[serde(default)]
    pub reset: bool,
    /// Remove the sync's records for the connection first.
    #[serde(default)]
    pub empty_cache: bool,
}

impl ExecJob {
    /// The JetStream message id: one per slot, or per trigger `token`, so that the copies
    /// several reconciler replicas queue are stored once.
    pub fn message_id(&self, token: &str) -> String {
        let sync = format!("{}/{}/{}", self.environment, self.integration, self.sync);
        match (self.reason, self.slot) {
            (ExecReason::Schedule, Some(slot)) => format!("{sync}:{}:{slot}", self.connection_id),
            _ => format!("{sync}:{}:trigger-{token}", self.connection_id),
        }
    }
}
