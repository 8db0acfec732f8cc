//! The contracts shared by hookyard's pipeline stages: configuration, telemetry,
//! shutdown, the webhook envelope, the JetStream topology and the store.

pub mod config;
pub mod delivery;
pub mod embedded_nats;
pub mod envelope;
pub mod exec_job;
pub mod frequency;
pub mod keys;
pub mod metrics;
pub mod nats_creds;
pub mod oplog;
pub mod outbound;
pub mod providers;
pub mod routed;
pub mod secrets;
pub mod shutdown;
pub mod store;
pub mod streams;
pub mod telemetry;
pub mod trace_context;

pub use config::Config;
pub use envelope::Envelope;
pub use store::Store;
