//! ingest → router → `HOOKS_CONN` with real NATS and Postgres: batches fan out to
//! their connections, each provider's routing value is found, unroutable events are
//! kept, deleted connections are not matched (also by a burst already in flight),
//! webhooks wait out a Postgres outage, a changed routing rule takes effect,
//! a router that dies mid-batch
//! publishes nothing twice, a webhook that takes longer than `ack_wait` to route is not
//! handed out again meanwhile, a deleted consumer is created again (also one lost with
//! NATS's store, whose loss stops the router if its stream is gone too), a `HOOKS_RAW`
//! behind the store refused until moved past it, a router
//! started while NATS does not answer waits for it,
//! an envelope from a newer ingest waits for a router
//! that reads it, and a header value with a line break, from another NATS client, does
//! not stop it.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use hookyard_core::routed::RoutedEvent;
use hookyard_core::store::{IntegrationChanges, NewConnection, NewIntegration};
use hookyard_core::streams::{CONN_STREAM, RAW_STREAM};
use hookyard_core::Envelope;
use hookyard_router::Router;
use hookyard_testkit::{eventually, PgDatabase};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use common::{start_ingest_with, Running};

async fn start(db: &PgDatabase) -> Running {
    let ingest = start_ingest_with(
        Some(&db.url),
        |_| {},
        ["hubspot", "slack", "gitlab", "github"]
            .iter()
            .map(|p| NewIntegration::new(p.parse().unwrap(), *p))
            .collect(),
    )
    .await;
    for (integration, id, config) in [
        ("hubspot", "portal-a", json!({"portalId": 62515})),
        ("hubspot", "portal-b", json!({"portalId": "77"})),
        ("slack", "team-one", json!({"team_id": "T1DC2JH3J"})),
        ("gitlab", "acme", json!({})),
        ("github", "octo", json!({"installation_id": 957387})),
    ] {
        connect(&ingest, integration, id, config).await;
    }
    ingest
}

async fn connect(ingest: &Running, integration: &str, id: &str, config: serde_json::Value) {
    ingest
        .store
        .create_connection(
            &ingest.environment,
            &NewConnection {
                integration: integration.parse().unwrap(),
                connection_id: id.into(),
                connection_config: config,
                metadata: json!({}),
                tags: json!({}),
                credentials: None,
            },
        )
        .await
        .unwrap();
}

fn start_router(ingest: &Running) -> CancellationToken {
    spawn_router(ingest, &ingest.config).0
}

/// A router on `config` until the token is cancelled, and its task.
fn spawn_router(
    ingest: &Running,
    config: &hookyard_core::Config,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), hookyard_router::RouterError>>,
) {
    let shutdown = CancellationToken::new();
    let router = Arc::new(Router::new(ingest.store.clone(), &ingest.bus, config).unwrap());
    (shutdown.clone(), tokio::spawn(router.run(shutdown)))
}

/// Waits until the router has acked every webhook in `HOOKS_RAW`, then returns every
/// message of `HOOKS_CONN`.
async fn routed(ingest: &Running) -> Vec<RoutedEvent> {
    let raw_last = ingest.raw_count().await;
    eventually("the router to ack every webhook", Duration::from_secs(20), || async {
        hookyard_router::acked_through(&ingest.jetstream, raw_last)
            .await
            .ok()
            .filter(|done| *done)
    })
    .await;
    read_conn(ingest).await
}

async fn read_conn(ingest: &Running) -> Vec<RoutedEvent> {
    let mut stream = ingest.jetstream.get_stream(CONN_STREAM).await.unwrap();
    let total = stream.info().await.unwrap().state.messages as usize;
    if total == 0 {
        return Vec::new();
    }
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap().take(total);
    let mut out = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.unwrap();
        out.push(RoutedEvent::from_message(&message.subject, message.headers.as_ref(), &message.payload).unwrap());
    }
    out
}

async fn post(ingest: &Running, integration: &str, query: &str, headers: &[(&str, &str)], body: &str) {
    let mut request = ingest
        .http
        .post(format!("{}{query}", ingest.webhook_url(integration)))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

fn targets(events: &[RoutedEvent]) -> BTreeMap<(String, u32), Option<String>> {
    events
        .iter()
        .map(|e| ((e.integration.to_string(), e.index), e.connection_id.clone()))
        .collect()
}

#[tokio::test]
async fn webhooks_reach_their_connections() {
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let _router = start_router(&ingest);

    // HubSpot: one body, two portals, two connections; an unknown portal is unrouted.
    post(
        &ingest,
        "hubspot",
        "",
        &[],
        r#"[{"objectId":1,"portalId":62515,"subscriptionType":"contact.creation","occurredAt":1},
            {"objectId":2,"portalId":77,"subscriptionType":"contact.deletion","occurredAt":2},
            {"objectId":3,"portalId":99999,"subscriptionType":"contact.creation","occurredAt":3}]"#,
    )
    .await;
    // Slack: flat team_id (Events API) and nested team.id (interactivity).
    post(
        &ingest,
        "slack",
        "",
        &[],
        r#"{"type":"event_callback","team_id":"T1DC2JH3J","event":{"type":"app_mention"}}"#,
    )
    .await;
    post(
        &ingest,
        "slack",
        "",
        &[],
        r#"{"type":"block_actions","team":{"id":"T1DC2JH3J"}}"#,
    )
    .await;
    // GitLab: the connection id is in the webhook URL's query.
    post(
        &ingest,
        "gitlab",
        "?connection_id=acme",
        &[],
        r#"{"object_kind":"push"}"#,
    )
    .await;
    // GitHub: a repository webhook with no installation is kept as unrouted.
    post(&ingest, "github", "", &[("x-github-event", "ping")], r#"{"zen":"hi"}"#).await;

    let mut events = routed(&ingest).await;
    // Webhooks are routed concurrently; within one webhook, events keep batch order.
    events.sort_by_key(|e| (e.raw_seq, e.index));
    let hubspot: Vec<_> = events.iter().filter(|e| e.integration.as_str() == "hubspot").collect();
    assert_eq!(hubspot.len(), 3);
    assert_eq!(hubspot[0].connection_id.as_deref(), Some("portal-a"));
    assert_eq!(hubspot[0].event_type.as_deref(), Some("contact.creation"));
    assert_eq!(hubspot[0].payload["objectId"], 1);
    assert_eq!(hubspot[1].connection_id.as_deref(), Some("portal-b"));
    assert_eq!(hubspot[2].connection_id, None);
    assert!(
        hubspot[2].unrouted.as_deref().unwrap().contains("99999"),
        "{:?}",
        hubspot[2].unrouted
    );
    assert!(hubspot.iter().all(|e| e.raw_seq == hubspot[0].raw_seq), "one webhook");
    assert!(
        hubspot[0].version() < hubspot[1].version(),
        "batch order is version order"
    );

    let slack: Vec<_> = events.iter().filter(|e| e.integration.as_str() == "slack").collect();
    assert_eq!(slack.len(), 2);
    assert!(slack.iter().all(|e| e.connection_id.as_deref() == Some("team-one")));
    assert_eq!(slack[0].event_type.as_deref(), Some("app_mention"));
    assert_eq!(slack[1].event_type.as_deref(), Some("block_actions"));

    let gitlab: Vec<_> = events.iter().filter(|e| e.integration.as_str() == "gitlab").collect();
    assert_eq!(gitlab.len(), 1);
    assert_eq!(gitlab[0].connection_id.as_deref(), Some("acme"));

    let github: Vec<_> = events.iter().filter(|e| e.integration.as_str() == "github").collect();
    assert_eq!(github.len(), 1);
    assert_eq!(github[0].connection_id, None);
    assert_eq!(github[0].event_type.as_deref(), Some("ping"));
    assert_eq!(
        github[0].payload,
        json!({"zen": "hi"}),
        "the event is kept, not dropped"
    );
}

#[tokio::test]
async fn a_deleted_connection_is_not_matched() {
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let _router = start_router(&ingest);
    let body = r#"{"installation":{"id":957387},"action":"created"}"#;
    post(&ingest, "github", "", &[("x-github-event", "installation")], body).await;
    let first = routed(&ingest).await;
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].connection_id.as_deref(), Some("octo"));

    // The router has the connection cached; deleting it must still take effect at once.
    assert!(ingest
        .store
        .delete_connection(ingest.environment.id, &"github".parse().unwrap(), "octo")
        .await
        .unwrap());
    let body = r#"{"installation":{"id":957387},"action":"deleted"}"#;
    post(&ingest, "github", "", &[("x-github-event", "installation")], body).await;
    let second = routed(&ingest).await;
    assert_eq!(second.len(), 2);
    assert_eq!(second[1].connection_id, None, "{:?}", second[1]);
    assert_eq!(second[1].event_type.as_deref(), Some("installation.deleted"));
}

/// Webhooks in flight share the router's version reads; none may share one that began
/// before it arrived. A connection is deleted while the router is in the middle of a
/// burst: every webhook posted after the delete returned must find it gone.
#[tokio::test]
async fn a_connection_deleted_during_a_burst_is_not_matched_by_later_webhooks() {
    const WEBHOOKS: usize = 600;
    let db = PgDatabase::create().await;
    let ingest = Arc::new(start(&db).await);
    let _router = start_router(&ingest);
    // Sixteen senders posting webhooks `numbers`, each once.
    let send = |numbers: std::ops::Range<usize>| {
        let next = Arc::new(std::sync::Mutex::new(numbers));
        let mut senders = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let (ingest, next) = (ingest.clone(), next.clone());
            senders.spawn(async move {
                loop {
                    let Some(n) = next.lock().unwrap().next() else { break };
                    let body = json!([{"objectId": n, "portalId": 62515, "subscriptionType": "contact.creation", "occurredAt": n}]);
                    post(&ingest, "hubspot", "", &[], &body.to_string()).await;
                }
            });
        }
        senders
    };
    let first_half = send(0..WEBHOOKS / 2);
    // The delete lands mid-burst for the router: a third of all is routed already, and
    // the rest of the first half is on its way.
    eventually("a third of the burst routed", Duration::from_secs(20), || async {
        let mut conn = ingest.jetstream.get_stream(CONN_STREAM).await.ok()?;
        (conn.info().await.ok()?.state.messages >= (WEBHOOKS / 3) as u64).then_some(())
    })
    .await;
    assert!(ingest
        .store
        .delete_connection(ingest.environment.id, &"hubspot".parse().unwrap(), "portal-a")
        .await
        .unwrap());
    let after_delete = WEBHOOKS / 2..WEBHOOKS;
    let second_half = send(after_delete.clone());
    // A sender that panicked (a POST not answered 202) panics here.
    first_half.join_all().await;
    second_half.join_all().await;
    assert!(
        after_delete.len() > WEBHOOKS / 3,
        "only {} posted after the delete",
        after_delete.len()
    );

    let events = routed(&ingest).await;
    let hubspot: BTreeMap<u64, Option<String>> = events
        .iter()
        .filter(|e| e.integration.as_str() == "hubspot")
        .map(|e| (e.payload["objectId"].as_u64().unwrap(), e.connection_id.clone()))
        .collect();
    assert_eq!(hubspot.len(), WEBHOOKS, "each webhook once");
    for n in after_delete {
        assert_eq!(hubspot[&(n as u64)], None, "webhook {n} was posted after the delete");
    }
    let before = hubspot.values().filter(|c| c.is_some()).count();
    assert!(
        before >= WEBHOOKS / 3,
        "the webhooks routed before the delete reached portal-a"
    );
}

/// Postgres away: the router cannot read the connections, so it routes nothing and
/// the webhooks are delivered again; once it is back, each is routed once.
#[tokio::test]
async fn webhooks_wait_out_a_postgres_outage_and_are_routed_once() {
    const WEBHOOKS: u64 = 30;
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let _router = start_router(&ingest);
    let hubspot = |n: u64| {
        json!([{"objectId": n, "portalId": 62515, "subscriptionType": "contact.creation", "occurredAt": n}]).to_string()
    };
    post(&ingest, "hubspot", "", &[], &hubspot(0)).await;
    assert_eq!(routed(&ingest).await.len(), 1);

    db.close_for_now().await;
    // Ingest keeps taking webhooks (no database on its path).
    for n in 1..=WEBHOOKS {
        post(&ingest, "hubspot", "", &[], &hubspot(n)).await;
    }
    let raw = ingest.jetstream.get_stream(RAW_STREAM).await.unwrap();
    eventually("the router to fail and retry", Duration::from_secs(30), || {
        let raw = raw.clone();
        async move {
            let mut consumer = raw.get_consumer::<pull::Config>(hookyard_router::CONSUMER).await.ok()?;
            (consumer.info().await.ok()?.num_redelivered > 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        read_conn(&ingest).await.len(),
        1,
        "nothing is routed without the connections"
    );
    assert!(ingest.store.ping().await.is_err(), "the database is away");

    db.reopen().await;
    let events = routed(&ingest).await;
    let mut objects: Vec<u64> = events.iter().map(|e| e.payload["objectId"].as_u64().unwrap()).collect();
    objects.sort_unstable();
    assert_eq!(objects, (0..=WEBHOOKS).collect::<Vec<_>>(), "each webhook routed once");
    assert!(events.iter().all(|e| e.connection_id.as_deref() == Some("portal-a")));
}

/// A webhook that takes the router longer than `router.ack_wait` to route (here its read
/// of the integration waits 5 s on a lock, against an `ack_wait` of 2 s) stays that
/// router's: it tells JetStream it is still at it, and the webhook is not handed out
/// again meanwhile.
#[tokio::test]
async fn a_webhook_routed_for_longer_than_ack_wait_is_not_handed_out_again() {
    use sqlx::Connection as _;
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut lock = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE integrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    post(
        &ingest,
        "gitlab",
        "?connection_id=acme",
        &[],
        r#"{"object_kind": "push"}"#,
    )
    .await;
    let mut config = ingest.config.clone();
    config.router.ack_wait = Duration::from_secs(2);
    let (stop, routing) = spawn_router(&ingest, &config);
    let raw = ingest.jetstream.get_stream(RAW_STREAM).await.unwrap();
    let consumer = || async {
        let mut consumer = raw.get_consumer::<pull::Config>(hookyard_router::CONSUMER).await.ok()?;
        consumer.info().await.ok().cloned()
    };
    eventually("the router to take the webhook", Duration::from_secs(10), || async {
        consumer().await.filter(|info| info.num_ack_pending == 1)
    })
    .await;
    // Two and a half times `ack_wait` with the router's read held: the time under test, not a
    // wait for an event.
    tokio::time::sleep(Duration::from_secs(5)).await;
    lock.commit().await.unwrap();

    let published = routed(&ingest).await;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].connection_id.as_deref(), Some("acme"));
    let info = consumer().await.unwrap();
    // Each delivery counts: 3 here when the router did not say it was still at it.
    assert_eq!(
        info.delivered.consumer_sequence, 1,
        "handed out again while being routed"
    );
    stop.cancel();
    routing.await.unwrap().unwrap();
}

/// A router on a new Postgres database, once it has routed one webhook (push 1).
async fn routing_after_one_push() -> (
    PgDatabase,
    Running,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), hookyard_router::RouterError>>,
) {
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let (stop, routing) = spawn_router(&ingest, &ingest.config);
    post(&ingest, "gitlab", "?connection_id=acme", &[], &push(1)).await;
    assert_eq!(routed(&ingest).await.len(), 1);
    (db, ingest, stop, routing)
}

/// Push 2 routed after push 1 by a router that is still running; then stops it. (A new
/// consumer starts from the first webhook again: routed again, its events are dropped
/// as duplicates by their message ids.)
async fn push_two_routed_by_the_running_router(
    ingest: &Running,
    stop: CancellationToken,
    routing: tokio::task::JoinHandle<Result<(), hookyard_router::RouterError>>,
) {
    let pushes: Vec<_> = routed(ingest).await.iter().map(|e| e.payload["n"].as_u64()).collect();
    assert_eq!(pushes, [Some(1), Some(2)]);
    assert!(!routing.is_finished(), "the router stopped: {:?}", routing.await);
    stop.cancel();
    routing.await.unwrap().unwrap();
}

/// Push 2 posted until ingest, reconnecting to a restarted NATS, takes it.
async fn push_two_once_nats_is_back(ingest: &Running) {
    let accepted = eventually("ingest to take a webhook again", Duration::from_secs(20), || async {
        let response = ingest
            .http
            .post(format!("{}?connection_id=acme", ingest.webhook_url("gitlab")))
            .body(push(2))
            .send()
            .await
            .unwrap();
        (response.status() == 202).then_some(())
    });
    accepted.await;
}

/// An operator who deletes the router's consumer (to reset it) does not stop routing:
/// the router creates it again, as a restart would, and goes on. (It used to end its
/// consuming quietly, and `hookyard router` to exit 0.)
#[tokio::test]
async fn a_router_whose_consumer_is_deleted_creates_it_again_and_goes_on() {
    let (_db, ingest, stop, routing) = routing_after_one_push().await;
    let raw = ingest.jetstream.get_stream(RAW_STREAM).await.unwrap();
    raw.delete_consumer(hookyard_router::CONSUMER).await.unwrap();
    post(&ingest, "gitlab", "?connection_id=acme", &[], &push(2)).await;
    push_two_routed_by_the_running_router(&ingest, stop, routing).await;
}

/// A NATS server restarted with its store keeps the router's consumer but not its
/// pull request: the router pulls again once reconnected, and a webhook taken after the
/// restart is routed without a restart of the router.
#[tokio::test]
async fn a_router_goes_on_after_a_nats_restart() {
    let (_db, mut ingest, stop, routing) = routing_after_one_push().await;
    ingest.nats.restart();
    push_two_once_nats_is_back(&ingest).await;
    push_two_routed_by_the_running_router(&ingest, stop, routing).await;
}

/// A consumer can go without a word to its clients: deleted while they were
/// disconnected, or lost with the server's store. The router's pulls then meet no
/// consumer; it used to pull into that silence for ever, and now creates its consumer
/// again and goes on.
#[tokio::test]
async fn a_router_whose_consumer_went_without_a_word_creates_it_again_and_goes_on() {
    let (_db, mut ingest, stop, routing) = routing_after_one_push().await;
    ingest
        .nats
        .restart_without_consumer(RAW_STREAM, hookyard_router::CONSUMER);
    push_two_once_nats_is_back(&ingest).await;
    push_two_routed_by_the_running_router(&ingest, stop, routing).await;
}

/// A NATS server that comes back without its store (its volume lost) has no streams
/// either. With no service to set them up again, the router stops with an error naming
/// the stream it lost (its restart sets them up), rather than waiting for ever.
#[tokio::test]
async fn a_router_whose_nats_lost_its_store_stops_naming_the_stream() {
    let (_db, mut ingest, _stop, routing) = routing_after_one_push().await;
    ingest.nats.restart_empty();
    let stopped = tokio::time::timeout(Duration::from_secs(30), routing)
        .await
        .expect("the router still runs 30 s after its consumer and stream were lost")
        .unwrap();
    let error = stopped.expect_err("the router stopped without an error").to_string();
    assert!(error.contains("HOOKS_RAW") && error.contains("not found"), "{error}");
}

/// A `HOOKS_RAW` behind the store (here deleted and created again by hand; a NATS
/// restored from an older backup is the same) would hand out sequences the records
/// already carry. A service refuses to start on it, saying how to move it past them;
/// done as it says, the next webhook gets a sequence past the store's.
#[tokio::test]
async fn a_hooks_raw_behind_the_store_is_refused_until_moved_past_it() {
    let (_db, ingest, stop, routing) = routing_after_one_push().await;
    eventually("the router to log the webhook", Duration::from_secs(20), || async {
        (ingest.store.raw_sequence_recorded().await.unwrap() == 1).then_some(())
    })
    .await;
    stop.cancel();
    routing.await.unwrap().unwrap();
    ingest.jetstream.delete_stream(RAW_STREAM).await.unwrap();
    let by_hand = hookyard_core::streams::raw_stream_config(&ingest.config.streams);
    ingest.jetstream.create_stream(by_hand).await.unwrap();

    let starting = hookyard_ingest::Ingest::start(
        &ingest.config,
        ingest.store.clone(),
        ingest.bus.clone(),
        CancellationToken::new(),
    );
    let refused = match starting.await {
        Ok(_) => panic!("ingest started on a HOOKS_RAW behind the store"),
        Err(error) => error.to_string(),
    };
    assert!(
        refused.contains("ends at sequence 0, but the store has recorded sequences up to 1")
            && refused.contains(r#"$JS.API.STREAM.PURGE.HOOKS_RAW with {"seq": 2}"#),
        "{refused}"
    );

    let raw = ingest.jetstream.get_stream(RAW_STREAM).await.unwrap();
    raw.purge().sequence(2).await.unwrap();
    let never = CancellationToken::new();
    let set_up = ingest.bus.set_up_streams(&ingest.config.streams, &ingest.store, &never);
    assert!(set_up.await.unwrap());
    post(&ingest, "gitlab", "?connection_id=acme", &[], &push(2)).await;
    let mut raw = ingest.jetstream.get_stream(RAW_STREAM).await.unwrap();
    let state = raw.info().await.unwrap().state.clone();
    assert_eq!((state.messages, state.last_sequence), (1, 2), "{state:?}");
}

fn push(n: u32) -> String {
    format!(r#"{{"object_kind": "push", "n": {n}}}"#)
}

/// The router keeps an integration's connections across its periodic reread of the
/// integration (a large one's would be reloaded for nothing), but not across a change
/// of what its routing matches on.
#[tokio::test]
async fn a_changed_routing_rule_applies_to_connections_already_cached() {
    let routing = |by: &str| json!({"routing": {"by": "value", "source": ["body:account"], "match": by}});
    let custom = NewIntegration {
        settings: routing("connection_config.account"),
        ..NewIntegration::new("custom".parse().unwrap(), "my-own")
    };
    let db = PgDatabase::create().await;
    let ingest = start_ingest_with(Some(&db.url), |_| {}, vec![custom]).await;
    ingest
        .store
        .create_connection(
            &ingest.environment,
            &NewConnection {
                integration: "custom".parse().unwrap(),
                connection_id: "acme".into(),
                connection_config: json!({"account": "1"}),
                metadata: json!({"account": "2"}),
                tags: json!({}),
                credentials: None,
            },
        )
        .await
        .unwrap();
    let _router = start_router(&ingest);
    // The connection of the last webhook carrying `n`.
    let route = |n: u32, account: &'static str| {
        let ingest = &ingest;
        async move {
            post(
                ingest,
                "custom",
                "",
                &[],
                &json!({"account": account, "n": n}).to_string(),
            )
            .await;
            let events = routed(ingest).await;
            let event = events.iter().rev().find(|e| e.payload["n"] == n).expect("routed");
            event.connection_id.clone()
        }
    };
    assert_eq!(route(0, "1").await.as_deref(), Some("acme"));

    let changes = IntegrationChanges {
        settings: Some(routing("metadata.account")),
        ..Default::default()
    };
    ingest
        .store
        .update_integration(ingest.environment.id, &"custom".parse().unwrap(), &changes)
        .await
        .unwrap();
    // Seen once the router rereads the integration (every few seconds).
    let mut n = 0;
    eventually("the new rule to route by metadata", Duration::from_secs(20), || {
        n += 1;
        let routed = route(n, "2");
        async move { (routed.await.as_deref() == Some("acme")).then_some(()) }
    })
    .await;
    assert_eq!(route(n + 1, "1").await, None, "the old rule no longer matches");
}

#[tokio::test]
async fn a_router_dying_mid_batch_publishes_each_event_once() {
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    // A 300-event HubSpot batch over both portals.
    let events: Vec<_> = (0..300)
        .map(|i| json!({"objectId": i, "portalId": if i % 2 == 0 { 62515 } else { 77 }, "subscriptionType": "contact.propertyChange", "occurredAt": i}))
        .collect();
    post(&ingest, "hubspot", "", &[], &serde_json::to_string(&events).unwrap()).await;

    // A first router publishes part of the batch and dies before acking the webhook.
    let router = Router::new(ingest.store.clone(), &ingest.bus, &ingest.config).unwrap();
    let stored = ingest
        .jetstream
        .get_stream(RAW_STREAM)
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    let envelope = Envelope::from_message(&stored.subject, Some(&stored.headers), stored.payload).unwrap();
    let all = router.resolve(1, &envelope).await.unwrap();
    assert_eq!(all.len(), 300);
    for event in &all[..120] {
        let (subject, headers, payload) = event.to_message();
        ingest
            .jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert_eq!(read_conn(&ingest).await.len(), 120);

    // A router started afterwards gets the unacked webhook and routes all of it.
    let _router = start_router(&ingest);
    let published = routed(&ingest).await;
    assert_eq!(published.len(), 300, "no event twice, none lost");
    let distinct = targets(&published);
    assert_eq!(distinct.len(), 300);
    assert!(published.iter().all(|e| e.connection_id.is_some()));
}

/// A router starting while NATS does not answer (here frozen; on a new cluster, a
/// replicated consumer is answered once it has elected a leader) waits for it, and
/// stops at once when told to, instead of stopping on "timed out".
#[tokio::test]
async fn a_router_started_while_nats_does_not_answer_waits_for_it() {
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    post(
        &ingest,
        "gitlab",
        "?connection_id=acme",
        &[],
        r#"{"object_kind": "push"}"#,
    )
    .await;
    ingest.nats.pause();
    let (stop_first, mut first) = spawn_router(&ingest, &ingest.config);
    let (stop_second, mut second) = spawn_router(&ingest, &ingest.config);
    // Past the first request's failure: finding the stream timed out after 10 s, and
    // the router used to stop on that.
    let waited = tokio::time::timeout(Duration::from_secs(12), &mut first).await;
    assert!(waited.is_err(), "the router stopped: {waited:?}");
    assert!(!second.is_finished(), "the router stopped: {:?}", (&mut second).await);
    // Told to stop, it does not wait out a request (10 s).
    stop_first.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(5), first).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");

    ingest.nats.resume();
    let published = routed(&ingest).await;
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].connection_id.as_deref(), Some("acme"));
    stop_second.cancel();
    second.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_batch_larger_than_the_ack_permits_does_not_stall_the_router() {
    // 6,000 events in one webhook: more publishes than the JetStream client has ack
    // permits (5,000), which stalls a router that awaits its acks only at the end.
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let events: Vec<_> = (0..6000)
        .map(|i| json!({"objectId": i, "portalId": 62515, "subscriptionType": "contact.propertyChange", "occurredAt": i}))
        .collect();
    post(&ingest, "hubspot", "", &[], &serde_json::to_string(&events).unwrap()).await;
    let _router = start_router(&ingest);
    let published = routed(&ingest).await;
    assert_eq!(published.len(), 6000);
    assert!(
        published.windows(2).all(|w| w[0].index < w[1].index),
        "batch order kept"
    );
}

#[tokio::test]
async fn one_trace_follows_a_webhook_from_ingest_through_the_router() {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    // This test process exports traces (to nowhere): spans get real trace ids.
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let _router = start_router(&ingest);
    post(
        &ingest,
        "gitlab",
        "?connection_id=acme",
        &[],
        r#"{"object_kind":"push"}"#,
    )
    .await;
    let envelope = ingest.raw_envelope(1).await;
    let sent = envelope.traceparent.expect("ingest writes its trace context");
    let routed = routed(&ingest).await;
    let received = routed[0].traceparent.as_deref().expect("the router writes its own");
    assert_eq!(received[3..35], sent[3..35], "one trace id from ingest to HOOKS_CONN");
    assert_ne!(received[36..52], sent[36..52], "the router's own span");
}

/// The envelope ingest would store for a GitHub delivery of `event` with `body`.
fn github_envelope(ingest: &Running, delivery_id: &str, event: &str, body: &str) -> Envelope {
    Envelope {
        environment: ingest.environment.name.clone(),
        integration: "github".parse().unwrap(),
        received_at: chrono::Utc::now(),
        delivery_id: delivery_id.into(),
        method: "POST".into(),
        path: None,
        query: None,
        headers: vec![("x-github-event".into(), event.into())],
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        verification: hookyard_core::providers::Verification::Unsigned,
        traceparent: None,
    }
}

/// In a rolling upgrade ingest may publish an envelope format this router does not
/// read yet: it is handed back for a router that does, not terminated (which would
/// leave it unrouted until someone replays it).
#[tokio::test]
async fn an_envelope_from_a_newer_ingest_waits_for_a_router_that_reads_it() {
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let envelope = github_envelope(&ingest, "from-the-future", "ping", "{}");
    let mut headers = envelope.to_headers();
    headers.insert("Hookyard-Envelope", "99");
    let sequence = ingest
        .jetstream
        .publish_with_headers(envelope.subject(), headers, envelope.body.clone())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;
    let _router = start_router(&ingest);

    let stream = ingest.jetstream.get_stream(RAW_STREAM).await.unwrap();
    let info = eventually(
        "the router to be handed the message again",
        Duration::from_secs(30),
        || async {
            let info = stream.consumer_info(hookyard_router::CONSUMER).await.ok()?;
            (info.num_redelivered >= 1).then_some(info)
        },
    )
    .await;
    assert!(
        info.ack_floor.stream_sequence < sequence,
        "the message was acked or terminated: {:?}",
        info.ack_floor
    );
}

/// Another NATS client may put a bare CR in a header value, which async-nats 0.51 could
/// not parse: the panic took the connection's task, and the process with it heard
/// nothing more. The router routes such a message and the webhooks after it.
#[tokio::test]
async fn a_line_break_in_a_header_from_another_client_does_not_stop_the_router() {
    let db = PgDatabase::create().await;
    let ingest = start(&db).await;
    let _router = start_router(&ingest);
    let body = r#"{"installation":{"id":957387},"action":"created"}"#;
    let envelope = github_envelope(&ingest, "from-another-client", "installation", body);
    let mut block = b"NATS/1.0\r\n".to_vec();
    for (name, values) in envelope.to_headers().iter() {
        for value in values {
            block.extend_from_slice(format!("{name}: {}\r\n", value.as_str()).as_bytes());
        }
    }
    block.extend_from_slice(b"X-Note: a\rb\r\n\r\n");
    ingest
        .nats
        .publish_raw(&envelope.subject(), &block, body.as_bytes())
        .await;
    post(&ingest, "github", "", &[("x-github-event", "installation")], body).await;

    let events = routed(&ingest).await;
    let octo: Vec<_> = events
        .iter()
        .filter(|e| e.connection_id.as_deref() == Some("octo"))
        .collect();
    assert_eq!(octo.len(), 2, "both webhooks routed to octo: {events:?}");
    assert!(octo.iter().any(|e| e.delivery_id == "from-another-client"), "{octo:?}");
}
