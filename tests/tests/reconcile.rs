//! Exec runs end to end against the fake CRM: the reconciler queues them (ticked by the
//! test at chosen instants, so slots come round without waiting an hour), the worker
//! runs them with the provider API, and the records cache and `GET /sync/status` show
//! the outcome.

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::pipeline::{harness_with, Harness};
use hookyard_core::store::connection_events::POST_CREATION;
use hookyard_core::store::notices::UNFINISHED;
use hookyard_core::store::syncs::SyncState;
use hookyard_core::store::IntegrationChanges;
use hookyard_core::store::{Credentials, NewConnection};
use hookyard_core::streams::{Share, CONN_STREAM, EXEC_STREAM, FWD_STREAM};
use hookyard_core::Config;
use hookyard_reconciler::Reconciler;
use hookyard_testkit::fake_provider::{FakeCrm, Held, API_KEY, CLIENT_ID, CLIENT_SECRET};
use hookyard_testkit::receiver::Receiver;
use hookyard_testkit::{eventually, raw_execute, raw_texts, PgDatabase};
use reqwest::Method;
use serde_json::{json, Value};

/// Lists contacts in the style the connection's metadata names (cursor, link or offset),
/// tracking deletes; `contact.updated` webhooks save one contact.
const CONTACTS: &str = r#"
import { createSync } from 'nango';
const STYLES = {
  cursor: { endpoint: '/cursor/contacts', params: { limit: 2 },
            paginate: { type: 'cursor', cursor_path_in_response: 'next_cursor', cursor_name_in_request: 'cursor', response_path: 'results' } },
  link:   { endpoint: '/link/contacts', params: { limit: 2 },
            paginate: { type: 'link', response_path: 'data' } },
  offset: { endpoint: '/offset/contacts',
            paginate: { type: 'offset', offset_name_in_request: 'offset', limit_name_in_request: 'limit', limit: 2, response_path: 'items' } },
};
export default createSync({
  frequency: 'every hour',
  autoStart: AUTO_START,
  models: { Contact: {} },
  webhookSubscriptions: ['contact.updated'],
  exec: async (nango) => {
    const meta = await nango.getMetadata();
    const config = { ...STYLES[meta.style || 'cursor'], retries: meta.retries ?? 3 };
    await nango.trackDeletesStart('Contact');
    for await (const page of nango.paginate(config)) {
      await nango.batchSave(page.map((c) => ({ id: c.id, email: c.email })), 'Contact');
    }
    await nango.trackDeletesEnd('Contact');
  },
  onWebhook: async (nango, payload) => {
    await nango.batchSave([{ id: payload.contact.id, email: payload.contact.email }], 'Contact');
  },
});
"#;

struct Setup {
    h: Harness,
    crm: FakeCrm,
    reconciler: Reconciler,
}

/// A connection `id` of `crm`.
fn connection(id: &str, metadata: Value, credentials: Credentials) -> NewConnection {
    NewConnection {
        integration: "crm".parse().unwrap(),
        connection_id: id.into(),
        connection_config: json!({}),
        metadata,
        tags: json!({}),
        credentials: Some(credentials),
    }
}

async fn setup(connections: &[(&str, Value, Credentials)], auto_start: bool) -> Setup {
    setup_on(None, connections, auto_start, |_| {}).await
}

/// The pipeline with the worker running, `crm` pointed at the fake CRM, and one
/// connection per `(id, metadata, credentials)`.
async fn setup_on(
    database_url: Option<&str>,
    connections: &[(&str, Value, Credentials)],
    auto_start: bool,
    tweak: impl FnOnce(&mut Config),
) -> Setup {
    let s = prepare_on(database_url, connections, auto_start, tweak).await;
    s.h.start_all();
    s
}

/// [`setup_on`] without the worker: the test starts its own.
async fn prepare_on(
    database_url: Option<&str>,
    connections: &[(&str, Value, Credentials)],
    auto_start: bool,
    tweak: impl FnOnce(&mut Config),
) -> Setup {
    let h = harness_with(database_url, 0, |config| {
        config.forwarding.allow_loopback = true;
        tweak(config);
    })
    .await;
    let crm = FakeCrm::start().await;
    h.store
        .update_integration(
            h.environment.id,
            &"crm".parse().unwrap(),
            &IntegrationChanges {
                settings: Some(json!({"api": {
                    "base_url": crm.url,
                    "api_key_header": "X-API-Key",
                    "token_url": format!("{}/oauth/token", crm.url),
                    "client_id": CLIENT_ID,
                }})),
                oauth_client_secret: Some(Some(CLIENT_SECRET.into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for (id, metadata, credentials) in connections {
        h.store
            .create_connection(&h.environment, &connection(id, metadata.clone(), credentials.clone()))
            .await
            .unwrap();
    }
    h.deploy(&[(
        "crm/syncs/contacts.js",
        CONTACTS.replace("AUTO_START", &auto_start.to_string()),
    )])
    .await;
    let reconciler = Reconciler::new(h.store.clone(), h.bus.jetstream.clone());
    Setup { h, crm, reconciler }
}

/// The pipeline with connection `c0`, the contacts sync (not started) and `functions`.
async fn setup_with(functions: &[(&str, &str)]) -> Setup {
    setup_configured(functions, |_| {}).await
}

/// [`setup_with`], configured by `tweak`.
async fn setup_configured(functions: &[(&str, &str)], tweak: impl FnOnce(&mut Config)) -> Setup {
    let s = prepare_configured(functions, tweak).await;
    s.h.start_all();
    s
}

/// [`setup_configured`] without the worker: the test starts its own.
async fn prepare_configured(functions: &[(&str, &str)], tweak: impl FnOnce(&mut Config)) -> Setup {
    let s = prepare_on(None, &[("c0", json!({}), api_key())], false, tweak).await;
    let mut files = vec![("crm/syncs/contacts.js", CONTACTS.replace("AUTO_START", "false"))];
    files.extend(functions.iter().map(|(path, source)| (*path, source.to_string())));
    s.h.deploy(&files).await;
    s
}

/// Whether the state's last run ended after `since`, and no run is on.
fn ended_after(state: &SyncState, since: DateTime<Utc>) -> bool {
    !state.running && state.last_ended_at.is_some_and(|at| at > since)
}

fn api_key() -> Credentials {
    Credentials::ApiKey {
        api_key: API_KEY.into(),
    }
}

impl Setup {
    /// Every sync state of the `dev` environment.
    async fn states(&self) -> Vec<SyncState> {
        self.h
            .store
            .sync_states(Some(self.h.environment.id), None)
            .await
            .unwrap()
    }

    async fn state(&self, connection: &str) -> Option<SyncState> {
        self.states()
            .await
            .into_iter()
            .find(|s| s.key.connection_id == connection)
    }

    /// Forwards the environment's events and notifications to `url`.
    async fn forward_to(&self, url: &str) {
        self.put_forwarding(json!({"urls": [url]})).await;
    }

    /// `PUT /forwarding` with `body`; the answer.
    async fn put_forwarding(&self, body: Value) -> Value {
        let response = self
            .h
            .request(Method::PUT, "/forwarding")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// Waits for a run of `connection` that ends after `since`.
    async fn finished_after(&self, connection: &str, since: DateTime<Utc>) -> SyncState {
        eventually("an exec run to finish", Duration::from_secs(30), || async {
            self.state(connection).await.filter(|state| ended_after(state, since))
        })
        .await
    }

    /// Ticks the reconciler at `at` and waits for the runs of `connections` it queued.
    async fn run_at(&self, at: DateTime<Utc>, connections: &[&str]) -> Vec<SyncState> {
        let since = Utc::now();
        let tick = self.reconciler.tick(at).await.unwrap();
        assert_eq!(
            tick.scheduled + tick.triggered,
            connections.len(),
            "runs queued at {at}"
        );
        let mut states = Vec::new();
        for connection in connections {
            states.push(self.finished_after(connection, since).await);
        }
        states
    }

    /// Waits until `count` exec runs are in progress at once, within 5 s: sooner than a
    /// job a worker held unstarted goes to another (the tests' `worker.ack_wait`, 8 s).
    async fn running(&self, count: usize) {
        eventually(&format!("{count} runs in progress"), Duration::from_secs(5), || async {
            let states = self.states().await;
            (states.iter().filter(|state| state.running).count() == count).then_some(())
        })
        .await;
    }

    /// `DELETE /connections/{id}` of `crm`: its status.
    async fn delete_connection(&self, id: &str) -> u16 {
        let response = self
            .h
            .request(Method::DELETE, &format!("/connections/{id}?provider_config_key=crm"))
            .send()
            .await
            .expect("the API answers");
        response.status().as_u16()
    }

    /// The connection's metadata, as the functions left it.
    async fn metadata(&self, connection: &str) -> Value {
        let crm = "crm".parse().unwrap();
        let stored = self.h.store.connection(self.h.environment.id, &crm, connection).await;
        stored.unwrap().expect("the connection exists").metadata
    }

    /// The connection's Contact records: id → (email, last action).
    async fn contacts(&self, connection: &str) -> Vec<(String, Value, String)> {
        let mut records: Vec<(String, Value, String)> = self
            .h
            .records(connection, "Contact")
            .await
            .into_iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["email"].clone(),
                    r["_nango_metadata"]["last_action"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        records.sort_by(|a, b| a.0.cmp(&b.0));
        records
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self.h.request(Method::POST, path).json(&body).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    /// Starts a run of `c0` held on its first page; then, the run having begun, the
    /// provider changes `p1` to `email` and says so by webhook (ingested after the run
    /// began), which the worker applies. The held page, and when the run was queued.
    async fn webhook_during_a_held_run(&self, email: &str) -> (Held, DateTime<Utc>) {
        let held = self.crm.hold_page(0);
        let since = Utc::now();
        assert_eq!(self.reconciler.tick(Utc::now()).await.unwrap().scheduled, 1);
        held.reached().await;
        let contact = json!({"type": "contact.updated", "contact": {"id": "p1", "email": email}});
        let seq = self.raw_sequence().await;
        self.h.publish([(seq, "c0", "contact.updated", contact)]).await;
        eventually("the webhook's write", Duration::from_secs(20), || {
            self.has_contact("c0", "p1", Some(email))
        })
        .await;
        (held, since)
    }

    /// Whether `connection`'s cache holds contact `id` (with `email`, when given): a probe
    /// for `eventually`.
    async fn has_contact(&self, connection: &str, id: &str, email: Option<&str>) -> Option<()> {
        let contacts = self.contacts(connection).await;
        contacts
            .iter()
            .any(|(i, e, _)| i == id && email.is_none_or(|email| *e == email))
            .then_some(())
    }

    /// The integration's `api.rate_limit` as GitHub's provider file has it.
    async fn rate_limits_as_github(&self) {
        let github = json!({
            "statuses": [403],
            "remaining_header": "x-ratelimit-remaining",
            "reset_header": "x-ratelimit-reset",
        });
        self.set_api("rate_limit", github).await;
    }

    /// Sets the `crm` integration's `settings.api.{field}`.
    async fn set_api(&self, field: &str, value: serde_json::Value) {
        let crm: hookyard_core::keys::IntegrationKey = "crm".parse().unwrap();
        let integration = self
            .h
            .store
            .existing_integration(self.h.environment.id, &crm)
            .await
            .unwrap();
        let mut settings = integration.settings.clone();
        settings["api"][field] = value;
        let changes = IntegrationChanges {
            settings: Some(settings),
            ..Default::default()
        };
        self.h
            .store
            .update_integration(self.h.environment.id, &crm, &changes)
            .await
            .unwrap();
    }

    /// Contacts p1 and p2 and a thin event for each: the first's fetch held by the
    /// provider (the hold returned), the second's event sent once it is.
    async fn first_held_second_sent(&self) -> Held {
        self.crm.put_contact("p1", "one@example.com");
        self.crm.put_contact("p2", "two@example.com");
        let held = self.crm.hold_page(0);
        self.thin_event("p1").await;
        tokio::time::timeout(Duration::from_secs(10), held.reached())
            .await
            .expect("the first fetch to reach the provider");
        self.thin_event("p2").await;
        held
    }

    /// Waits for each of `ids` to be in c0's cache.
    async fn stored(&self, ids: &[&str]) {
        for id in ids {
            eventually("the contact stored", Duration::from_secs(10), || {
                self.has_contact("c0", id, None)
            })
            .await;
        }
    }

    /// Contacts p1 and p2 and a thin event for each, the provider limited: the first's
    /// call is refused (`refused` counts the refusals), the second waits its turn, unsent.
    async fn first_refused_second_held(&self, refused: impl Fn() -> usize) {
        self.crm.put_contact("p1", "one@example.com");
        self.crm.put_contact("p2", "two@example.com");
        self.thin_event("p1").await;
        eventually(
            "the provider to refuse the first call",
            Duration::from_secs(10),
            || async { (refused() == 1).then_some(()) },
        )
        .await;
        self.thin_event("p2").await;
        counted("the second event to wait its turn, unsent", &rate_limit_outcome("held")).await;
    }

    /// A thin provider event for `c0` (Nango's HubSpot-style: an id, no data), with a
    /// `HOOKS_RAW` sequence of its own.
    async fn thin_event(&self, contact: &str) {
        self.h.publish([self.thin(contact, "contact.changed").await]).await;
    }

    /// A thin event of `event_type` for `c0` about `contact`, with a `HOOKS_RAW` sequence
    /// of its own, ready to publish.
    async fn thin(&self, contact: &str, event_type: &'static str) -> (u64, &'static str, &'static str, Value) {
        let event = json!({"type": event_type, "objectId": contact});
        (self.raw_sequence().await, "c0", event_type, event)
    }

    /// A `HOOKS_RAW` sequence for an event published straight to the worker, as a
    /// webhook ingested now would have (a message stands in for it).
    async fn raw_sequence(&self) -> u64 {
        let jetstream = &self.h.bus.jetstream;
        let ack = jetstream.publish("hooks.raw.dev.crm", "{}".into()).await.unwrap();
        ack.await.unwrap().sequence
    }

    async fn exec_jobs(&self) -> u64 {
        let mut stream = self.h.bus.jetstream.get_stream(EXEC_STREAM).await.unwrap();
        stream.info().await.unwrap().state.messages
    }
}

fn live(records: &[(String, Value, String)]) -> Vec<&str> {
    records
        .iter()
        .filter(|(_, _, action)| action != "DELETED")
        .map(|(id, _, _)| id.as_str())
        .collect()
}

fn hour_later(at: DateTime<Utc>) -> DateTime<Utc> {
    at + chrono::Duration::hours(1) + chrono::Duration::seconds(1)
}

/// Between full passes a tick reads only due states: a connection created or deleted
/// still counts at once, and a deleted one's state, though due, is never run.
#[tokio::test]
async fn ticks_between_full_passes_see_new_and_deleted_connections() {
    let s = setup(&[("c0", json!({}), api_key())], true).await;
    let now = Utc::now();
    s.run_at(now, &["c0"]).await;
    assert_eq!(s.reconciler.tick(now).await.unwrap().scheduled, 0, "nothing due");

    // Created after the full pass: the next tick takes it up.
    s.h.store
        .create_connection(&s.h.environment, &connection("c1", json!({}), api_key()))
        .await
        .unwrap();
    s.run_at(now, &["c1"]).await;

    // Deleted: neither the tick after it (a full pass) nor one between full passes runs
    // it, though its state is due.
    let crm: hookyard_core::keys::IntegrationKey = "crm".parse().unwrap();
    assert!(s
        .h
        .store
        .delete_connection(s.h.environment.id, &crm, "c0")
        .await
        .unwrap());
    assert_eq!(s.reconciler.tick(now).await.unwrap().scheduled, 0);
    let states = s.states().await;
    let next_run = |id: &str| {
        states
            .iter()
            .find(|state| state.key.connection_id == id)
            .and_then(|state| state.next_run_at)
            .unwrap()
    };
    // Both next slots have come round by then; only c1 runs.
    s.run_at(next_run("c0").max(next_run("c1")), &["c1"]).await;
}

#[tokio::test]
async fn scheduled_exec_fills_the_cache_in_each_pagination_style_and_deletes_what_the_provider_lost() {
    let s = setup(
        &[
            ("c-cursor", json!({"style": "cursor"}), api_key()),
            ("c-link", json!({"style": "link"}), api_key()),
            ("c-offset", json!({"style": "offset"}), api_key()),
        ],
        true,
    )
    .await;
    for n in 1..=5 {
        s.crm.put_contact(&format!("p{n}"), &format!("p{n}@crm.test"));
    }
    let connections = ["c-cursor", "c-link", "c-offset"];
    let now = Utc::now();
    for state in s.run_at(now, &connections).await {
        assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"), "{:?}", state.last_error);
        assert_eq!(state.last_result.unwrap()["Contact"]["added"], 5);
    }
    for connection in connections {
        assert_eq!(
            live(&s.contacts(connection).await),
            ["p1", "p2", "p3", "p4", "p5"],
            "{connection}"
        );
    }
    // Three pages of two in each style.
    let requests = s.crm.requests();
    for style in ["cursor", "link", "offset"] {
        let pages = requests
            .iter()
            .filter(|(path, _)| path.starts_with(&format!("/{style}/")))
            .count();
        assert_eq!(pages, 3, "{style}: {requests:?}");
    }
    // The same slot is not queued again.
    assert_eq!(s.reconciler.tick(now).await.unwrap().scheduled, 0);

    s.crm.remove_contact("p3");
    s.crm.put_contact("p6", "p6@crm.test");
    s.crm.put_contact("p1", "p1-new@crm.test");
    for state in s.run_at(hour_later(now), &connections).await {
        let result = state.last_result.unwrap();
        assert_eq!(
            (
                &result["Contact"]["added"],
                &result["Contact"]["updated"],
                &result["Contact"]["deleted"]
            ),
            (&json!(1), &json!(1), &json!(1)),
            "{result}"
        );
    }
    for connection in connections {
        let contacts = s.contacts(connection).await;
        assert_eq!(live(&contacts), ["p1", "p2", "p4", "p5", "p6"], "{connection}");
        let p3 = contacts
            .iter()
            .find(|(id, _, _)| id == "p3")
            .expect("soft-deleted, still listed");
        assert_eq!(p3.2, "DELETED");
        assert_eq!(contacts[0].1, "p1-new@crm.test");
    }
}

#[tokio::test]
async fn an_exec_that_fails_midway_deletes_nothing_and_reports_its_error() {
    let s = setup(&[("c0", json!({"retries": 0}), api_key())], true).await;
    for n in 1..=5 {
        s.crm.put_contact(&format!("p{n}"), &format!("p{n}@crm.test"));
    }
    let now = Utc::now();
    s.run_at(now, &["c0"]).await;
    assert_eq!(live(&s.contacts("c0").await).len(), 5);

    // p1 is gone at the provider; the run fails on its second (last) page.
    s.crm.remove_contact("p1");
    let held = s.crm.hold_page(0);
    let since = Utc::now();
    assert_eq!(s.reconciler.tick(hour_later(now)).await.unwrap().scheduled, 1);
    held.reached().await;
    s.crm.fail_next(1, 500, None);
    held.release();
    let state = s.finished_after("c0", since).await;
    assert_eq!(state.last_outcome.as_deref(), Some("ERROR"));
    assert!(
        state.last_error.as_deref().unwrap().contains("answered 500"),
        "{:?}",
        state.last_error
    );
    assert_eq!(
        live(&s.contacts("c0").await),
        ["p1", "p2", "p3", "p4", "p5"],
        "a failed run deletes nothing"
    );
    let status =
        s.h.api_get("/sync/status?syncs=contacts&provider_config_key=crm&connection_id=c0")
            .await;
    assert_eq!(status["syncs"][0]["status"], "ERROR", "{status}");
    assert!(status["syncs"][0]["error"].as_str().unwrap().contains("answered 500"));
}

#[tokio::test]
async fn a_webhook_that_lands_while_exec_runs_is_not_overwritten_by_older_data() {
    let s = setup(&[("c0", json!({}), api_key())], true).await;
    s.crm.put_contact("p1", "old@crm.test");
    s.crm.put_contact("p2", "p2@crm.test");
    let (held, since) = s.webhook_during_a_held_run("new@crm.test").await;
    // A run asked for meanwhile is skipped: one run at a time per sync and connection.
    let (status, _) = s
        .post(
            "/sync/trigger",
            json!({"syncs": ["contacts"], "provider_config_key": "crm"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(s.reconciler.tick(Utc::now()).await.unwrap().triggered, 1);
    eventually("the second job to be handled", Duration::from_secs(20), || async {
        let mut consumer =
            s.h.bus
                .jetstream
                .get_stream(EXEC_STREAM)
                .await
                .ok()?
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>("exec")
                .await
                .ok()?;
        let info = consumer.info().await.ok()?;
        (info.delivered.stream_sequence == 2 && info.num_ack_pending == 1 && info.num_pending == 0).then_some(())
    })
    .await;
    held.release();
    let state = s.finished_after("c0", since).await;
    assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"));
    let listings = s
        .crm
        .requests()
        .iter()
        .filter(|(path, _)| path.ends_with("cursor=0"))
        .count();
    assert_eq!(listings, 1, "the second run was skipped, not queued behind the first");
    let contacts = s.contacts("c0").await;
    assert_eq!(contacts[0].0, "p1");
    assert_eq!(
        contacts[0].1, "new@crm.test",
        "the run's older copy does not overwrite the webhook's"
    );
    assert_eq!(live(&contacts), ["p1", "p2"]);
}

#[tokio::test]
async fn oauth2_tokens_are_refreshed_once_when_expired_or_refused_and_stored() {
    let s = setup(&[], true).await;
    for n in 1..=5 {
        s.crm.put_contact(&format!("p{n}"), &format!("p{n}@crm.test"));
    }
    // One token expired by its date, one the provider refuses although its date is fine.
    let (expired, expired_refresh) = s.crm.issue_tokens(true);
    let (revoked, revoked_refresh) = s.crm.issue_tokens(false);
    for (id, access, refresh, expires_in) in [
        ("c-expired", expired, expired_refresh, -60),
        ("c-revoked", revoked, revoked_refresh, 3600),
    ] {
        let credentials = oauth2(&access, &refresh, chrono::Duration::seconds(expires_in));
        s.h.store
            .create_connection(&s.h.environment, &connection(id, json!({}), credentials))
            .await
            .unwrap();
    }
    let states = s.run_at(Utc::now(), &["c-expired", "c-revoked"]).await;
    for state in &states {
        assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"), "{:?}", state.last_error);
    }
    assert_eq!(s.crm.refreshes(), 2, "one refresh per connection, not one per page");
    for id in ["c-expired", "c-revoked"] {
        assert_eq!(live(&s.contacts(id).await).len(), 5);
        let stored =
            s.h.store
                .connection(s.h.environment.id, &"crm".parse().unwrap(), id)
                .await
                .unwrap()
                .unwrap();
        match stored.credentials {
            Some(Credentials::OAuth2 {
                access_token,
                expires_at,
                ..
            }) => {
                assert!(access_token.starts_with("access-"), "{access_token}");
                assert!(expires_at.unwrap() > Utc::now() + chrono::Duration::minutes(30));
            }
            other => panic!("{other:?}"),
        }
    }
    // The refused token was tried once, then the new one was used for every page.
    let refused = s.crm.requests().iter().filter(|(_, status)| *status == 401).count();
    assert_eq!(refused, 1);
}

/// Answers the fake CRM's contact `input.id`.
const FETCH: &str = r#"
import { createAction } from 'nango';
export default createAction({
  exec: async (nango, input) => (await nango.get({ endpoint: `/contacts/${input.id}` })).data,
});
"#;

/// An OAuth2 token that expired a minute ago.
fn expired_oauth2(access_token: &str, refresh_token: &str) -> Credentials {
    oauth2(access_token, refresh_token, -chrono::Duration::seconds(60))
}

/// An OAuth2 token, with its refresh token, that expires `expires_in` from now.
fn oauth2(access_token: &str, refresh_token: &str, expires_in: chrono::Duration) -> Credentials {
    Credentials::OAuth2 {
        access_token: access_token.into(),
        refresh_token: Some(refresh_token.into()),
        expires_at: Some(Utc::now() + expires_in),
        raw: None,
    }
}

/// The pipeline (on `database_url`, configured by `tweak`) with the `fetch` action,
/// contact `p1` at the fake CRM, and connection `c0` holding an expired OAuth2 token:
/// `tokens` (access, refresh), or a pair the fake issued. The credentials stored, and the
/// action's request.
async fn expired_token_setup(
    database_url: Option<&str>,
    tokens: Option<(&str, &str)>,
    tweak: impl FnOnce(&mut Config),
) -> (Setup, Credentials, Value) {
    let s = setup_on(database_url, &[("c0", json!({}), api_key())], false, tweak).await;
    s.h.deploy(&[
        ("crm/syncs/contacts.js", CONTACTS.replace("AUTO_START", "false")),
        ("crm/actions/fetch.js", FETCH.to_string()),
    ])
    .await;
    s.crm.put_contact("p1", "p1@crm.test");
    let issued = s.crm.issue_tokens(true);
    let (access, refresh) = tokens.unwrap_or((&issued.0, &issued.1));
    let expired = expired_oauth2(access, refresh);
    s.store_credentials(&expired).await;
    (s, expired, json!({"action_name": "fetch", "input": {"id": "p1"}}))
}

impl Setup {
    /// Stores `credentials` on connection `c0`, as a refresh does.
    async fn store_credentials(&self, credentials: &Credentials) {
        let stored = self
            .h
            .store
            .update_credentials(self.h.environment.id, &"crm".parse().unwrap(), "c0", credentials)
            .await
            .unwrap();
        assert!(stored, "c0 is there");
    }

    /// Connection `c0`'s credentials as stored.
    async fn stored_credentials(&self) -> Option<Credentials> {
        self.h
            .store
            .existing_connection(self.h.environment.id, &"crm".parse().unwrap(), "c0")
            .await
            .unwrap()
            .credentials
    }
}

#[tokio::test]
async fn runs_of_one_connection_share_one_refresh_of_a_rotating_oauth2_token() {
    one_refresh_at_a_time(None).await;
}

#[tokio::test]
async fn runs_of_one_connection_share_one_refresh_of_a_rotating_oauth2_token_on_postgres() {
    let db = PgDatabase::create().await;
    one_refresh_at_a_time(Some(&db.url)).await;
}

/// The fake CRM rotates refresh tokens (each is good once). Two actions of a connection
/// whose token has expired: the first's refresh is held at the token URL until the
/// second is seen waiting for it, so both found the token expired; the second takes
/// what the first stored.
async fn one_refresh_at_a_time(database_url: Option<&str>) {
    hookyard_core::metrics::install();
    let (s, expired, fetch) = expired_token_setup(database_url, None, |_| {}).await;
    let held = s.crm.hold_token();
    let (first, second) = tokio::join!(s.trigger(fetch.clone(), &[]), async {
        held.reached().await;
        let release = async {
            counted("the second run to wait for the first's refresh", OAUTH2_WAITS).await;
            held.release();
        };
        tokio::join!(s.trigger(fetch.clone(), &[]), release).0
    });
    for (status, body) in [&first, &second] {
        assert_eq!((*status, &body["email"]), (200, &json!("p1@crm.test")), "{body}");
    }
    assert_eq!(s.crm.refreshes(), 1, "the refresh token was used once");
    assert_eq!(metric(&oauth2_refreshes("refreshed")).await, 1.0);
    assert_eq!(metric(&oauth2_refreshes("shared")).await, 1.0);
    let stored = s.stored_credentials().await;
    match stored {
        Some(Credentials::OAuth2 {
            refresh_token,
            expires_at,
            ..
        }) => {
            let Credentials::OAuth2 {
                refresh_token: used, ..
            } = &expired
            else {
                unreachable!()
            };
            assert_ne!(&refresh_token, used, "the rotated refresh token is stored");
            assert!(expires_at.unwrap() > Utc::now());
        }
        other => panic!("{other:?}"),
    }
}

/// The token URL refuses the refresh token: each run fails at once (the next with the
/// first's refusal, without asking the token URL again), the connection shows why, and the forwarding destination gets
/// one `auth` webhook for the failure, however many runs meet it, until credentials are
/// stored again; a later refusal is a failure of its own.
#[tokio::test]
async fn a_refused_refresh_fails_its_runs_shows_on_the_connection_and_is_notified_once() {
    hookyard_core::metrics::install();
    let (s, _, fetch) = expired_token_setup(None, Some(("gone-1", "refresh-revoked")), |config| {
        config.forwarding.notices_resend_after = Duration::from_millis(200);
    })
    .await;
    let receiver = Receiver::start(&[]).await;
    s.forward_to(&receiver.url).await;
    for _ in 0..2 {
        let (status, body) = s.trigger(fetch.clone(), &[]).await;
        assert_eq!(status, 500, "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(
                "the token URL answered 400 Bad Request (invalid_grant); the connection needs to be authorized again"
            ),
            "{body}"
        );
    }
    assert_eq!(metric(&oauth2_refreshes("failed")).await, 2.0);
    assert_eq!(metric(OAUTH2_WAITS).await, 0.0, "nothing waited for the failed refresh");
    assert_eq!(
        s.crm.token_requests(),
        1,
        "the second run failed on the first's refusal"
    );
    let shown = &s.h.api_get("/connections?connectionId=c0").await["connections"][0];
    assert_eq!(shown["errors"][0]["type"], "auth", "{shown}");
    assert_eq!(
        shown["errors"][0]["description"],
        "the token URL answered 400 Bad Request (invalid_grant)"
    );
    let first = receiver.wait_hits(1).await[0].json();
    assert_eq!(
        (&first["type"], &first["operation"], &first["success"]),
        (&json!("auth"), &json!("refresh"), &json!(false))
    );
    assert_eq!(
        (&first["connectionId"], &first["providerConfigKey"]),
        (&json!("c0"), &json!("crm"))
    );
    assert_eq!(first["error"]["type"], "refresh_token_external_error");
    assert_eq!(first["failedAt"], shown["errors"][0]["failed_at"]);

    // New credentials (the connection authorized again, imported through the API) end
    // the failure; the next refusal is another, notified again.
    let (access, refresh) = s.crm.issue_tokens(true);
    let reauthorize = json!({"provider_config_key": "crm", "connection_id": "c0",
                             "credentials": {"type": "OAUTH2", "access_token": access, "refresh_token": refresh}});
    assert_eq!(s.post("/connections", reauthorize).await.0, 200);
    let (status, body) = s.trigger(fetch.clone(), &[]).await;
    assert_eq!(status, 200, "{body}");
    let shown = &s.h.api_get("/connections?connectionId=c0").await["connections"][0];
    assert_eq!(shown["errors"], json!([]));
    s.store_credentials(&expired_oauth2("gone-2", "refresh-revoked")).await;
    assert_eq!(s.trigger(fetch.clone(), &[]).await.0, 500);
    let hits = receiver.wait_hits(2).await;
    assert_eq!(hits.len(), 2, "one webhook per failure");
    assert_ne!(hits[1].json()["failedAt"], first["failedAt"]);
}

/// An environment that turned `auth` webhooks off: a refused refresh is settled without
/// one (still shown on the connection).
#[tokio::test]
async fn auth_webhooks_can_be_turned_off() {
    let (s, _, fetch) = expired_token_setup(None, Some(("gone", "refresh-revoked")), |config| {
        config.forwarding.notices_resend_after = Duration::from_millis(200);
    })
    .await;
    let receiver = Receiver::start(&[]).await;
    let body = s
        .put_forwarding(json!({"urls": [receiver.url], "auth_webhooks": false}))
        .await;
    assert_eq!(body["data"]["auth_webhooks"], false, "{body}");
    assert_eq!(s.trigger(fetch, &[]).await.0, 500);
    eventually("the failure to be settled", Duration::from_secs(10), || async {
        s.h.store
            .owed_refresh_failures(10)
            .await
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    // A webhook is queued before its failure is settled: none was.
    let mut forwards = s.h.bus.jetstream.get_stream(FWD_STREAM).await.unwrap();
    assert_eq!(forwards.info().await.unwrap().state.messages, 0);
    assert!(receiver.hits().is_empty());
    let listed = s.h.api_get("/connections?connectionId=c0").await;
    assert_eq!(listed["connections"][0]["errors"][0]["type"], "auth", "{listed}");
}

/// `GET /connections/{id}` answers fresh credentials, as Nango's does: an expired token
/// is refreshed first (once), `force_refresh` refreshes a fresh one, and a refusal is a
/// 424 that says so.
#[tokio::test]
async fn getting_a_connection_refreshes_its_expired_token_first() {
    let (s, expired, _) = expired_token_setup(None, None, |_| {}).await;
    let get = |query: &'static str| {
        let s = &s;
        async move {
            let path = format!("/connections/c0?provider_config_key=crm{query}");
            let response = s.h.request(Method::GET, &path).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let Credentials::OAuth2 { access_token: old, .. } = &expired else {
        unreachable!()
    };
    let (status, first) = get("").await;
    assert_eq!(status, 200, "{first}");
    let token = first["credentials"]["access_token"].as_str().unwrap().to_string();
    assert_ne!(&token, old, "refreshed before the answer");
    assert_eq!(s.crm.refreshes(), 1);
    let stored = serde_json::to_value(s.stored_credentials().await).unwrap();
    assert_eq!(first["credentials"], stored, "and stored");
    let (_, again) = get("").await;
    assert_eq!(again["credentials"]["access_token"], token.as_str(), "fresh: kept");
    assert_eq!(s.crm.refreshes(), 1);
    let (_, forced) = get("&force_refresh=true").await;
    assert_ne!(forced["credentials"]["access_token"], token.as_str());
    assert_eq!(s.crm.refreshes(), 2);

    s.store_credentials(&expired_oauth2("gone", "refresh-revoked")).await;
    let (status, refused) = get("").await;
    assert_eq!(status, 424, "{refused}");
    assert_eq!(refused["error"]["code"], "refresh_token_external_error");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("invalid_grant"), "{message}");
    let listed = s.h.api_get("/connections?connectionId=c0").await;
    assert_eq!(listed["connections"][0]["errors"][0]["type"], "auth", "{listed}");
}

/// A token unused for a day is refreshed by a worker, so that a provider that revokes
/// unused refresh tokens does not; a connection with nothing to refresh is looked at
/// once and then left alone.
#[tokio::test]
async fn workers_refresh_a_token_a_day_to_keep_it_alive() {
    let s = setup_on(
        None,
        &[("c0", json!({}), api_key()), ("c1", json!({}), api_key())],
        false,
        |config| {
            config.forwarding.notices_resend_after = Duration::from_millis(200);
        },
    )
    .await;
    let (access, refresh) = s.crm.issue_tokens(true);
    let valid = oauth2(&access, &refresh, chrono::Duration::hours(1));
    s.store_credentials(&valid).await;
    // As if both were stored a day ago (c1's API key as if from before the keep-alive).
    let url = &s.h.config.database_url;
    raw_execute(
        url,
        "UPDATE connections SET refresh_check_at = created_at WHERE credentials IS NOT NULL",
    )
    .await;
    eventually("c0's token to be refreshed", Duration::from_secs(10), || async {
        (s.stored_credentials().await != Some(valid.clone())).then_some(())
    })
    .await;
    assert_eq!(s.crm.refreshes(), 1);
    let checks = || async {
        raw_texts(url, "SELECT connection_id || ':' || COALESCE(refresh_check_at, 'never') FROM connections ORDER BY connection_id").await
    };
    let looked_at = eventually("c1 to be left alone", Duration::from_secs(10), || async {
        let checks = checks().await;
        (checks[1] == "c1:never").then_some(checks)
    })
    .await;
    let next: DateTime<Utc> = looked_at[0].trim_start_matches("c0:").parse().unwrap();
    assert!(
        next > Utc::now() + chrono::Duration::hours(23),
        "c0 next in a day: {next}"
    );
}

/// A run whose time runs out while the provider answers its refresh: the refresh token
/// is used up at the provider all the same, so what it answers is stored for the next run.
#[tokio::test]
async fn a_refresh_answered_after_its_run_gave_up_is_stored_for_the_next() {
    let (s, expired, fetch) = expired_token_setup(None, None, |config| {
        config.api.action_limits.cpu_budget = Duration::from_millis(500);
        config.api.action_limits.timeout = Duration::from_secs(1);
    })
    .await;
    let held = s.crm.hold_token();
    let (status, body) = s.trigger(fetch.clone(), &[]).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.to_string().contains("the run's time ran out"), "{body}");
    held.release();
    eventually("the refreshed token to be stored", Duration::from_secs(10), || async {
        (s.stored_credentials().await != Some(expired.clone())).then_some(())
    })
    .await;
    let (status, body) = s.trigger(fetch, &[]).await;
    assert_eq!((status, &body["email"]), (200, &json!("p1@crm.test")), "{body}");
    assert_eq!(s.crm.refreshes(), 1);
}

const OAUTH2_WAITS: &str = "hookyard_oauth2_refresh_waits_total";
const PROVIDER_READS_SHARED: &str = "hookyard_provider_reads_shared_total";

fn oauth2_refreshes(outcome: &str) -> String {
    format!("hookyard_oauth2_refreshes_total{{outcome=\"{outcome}\"}}")
}

/// Waits up to 10 s for the process's metric `name` to count at least once: `what` (the
/// wait's description) is what that tells.
async fn counted(what: &str, name: &str) {
    eventually(what, Duration::from_secs(10), || async {
        (metric(name).await >= 1.0).then_some(())
    })
    .await;
}

/// The process's metric `name` (with its labels, as rendered), 0 when not there.
async fn metric(name: &str) -> f64 {
    let text = hookyard_core::metrics::render(None).await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after_and_a_5xx_after_a_backoff() {
    let s = setup(&[("c0", json!({}), api_key())], true).await;
    s.crm.put_contact("p1", "p1@crm.test");
    s.crm.fail_next(1, 429, Some(1));
    s.crm.fail_next(1, 503, None);
    let started = Instant::now();
    let state = &s.run_at(Utc::now(), &["c0"]).await[0];
    assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"), "{:?}", state.last_error);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was waited for"
    );
    let statuses: Vec<u16> = s.crm.requests().iter().map(|(_, status)| *status).collect();
    assert_eq!(statuses, [429, 503, 200], "a 5xx is retried too");
    assert_eq!(live(&s.contacts("c0").await), ["p1"]);
}

/// GitHub names its limit's reset in every answer: a 5xx's retry waits the backoff, not
/// until the reset (which, an hour away, would be no retry at all).
#[tokio::test]
async fn a_5xx_naming_the_limits_reset_is_retried_after_the_backoff() {
    let s = setup(&[("c0", json!({}), api_key())], true).await;
    s.rate_limits_as_github().await;
    s.crm.budget_as_github(100, Duration::from_secs(3600));
    s.crm.put_contact("p1", "p1@crm.test");
    s.crm.fail_next(1, 502, None);
    let state = &s.run_at(Utc::now(), &["c0"]).await[0];
    assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"), "{:?}", state.last_error);
    let statuses: Vec<u16> = s.crm.requests().iter().map(|(_, status)| *status).collect();
    assert_eq!(statuses, [502, 200]);
    assert_eq!(live(&s.contacts("c0").await), ["p1"]);
}

#[tokio::test]
async fn two_reconcilers_queue_exactly_one_run_per_slot() {
    two_reconcilers(None).await;
}

#[tokio::test]
async fn two_reconcilers_queue_exactly_one_run_per_slot_on_postgres() {
    let db = PgDatabase::create().await;
    two_reconcilers(Some(&db.url)).await;
}

/// Also runs one exec and a trigger end to end, on either back end.
async fn two_reconcilers(database_url: Option<&str>) {
    let s = setup_on(
        database_url,
        &[("c0", json!({}), api_key()), ("c1", json!({}), api_key())],
        true,
        |_| {},
    )
    .await;
    s.crm.put_contact("p1", "p1@crm.test");
    let other = Reconciler::new(s.h.store.clone(), s.h.bus.jetstream.clone());
    let start = Utc::now();
    let mut scheduled = 0;
    for slot in 0..3 {
        let at = start + chrono::Duration::hours(slot) + chrono::Duration::seconds(slot);
        let (a, b) = tokio::join!(s.reconciler.tick(at), other.tick(at));
        let (again_a, again_b) = tokio::join!(s.reconciler.tick(at), other.tick(at));
        scheduled += a.unwrap().scheduled + b.unwrap().scheduled;
        scheduled += again_a.unwrap().scheduled + again_b.unwrap().scheduled;
    }
    assert_eq!(scheduled, 6, "two connections × three slots, claimed once each");
    assert_eq!(s.exec_jobs().await, 6, "and queued once each");
    // The worker ran them, one at a time per connection.
    for connection in ["c0", "c1"] {
        s.finished_after(connection, start - chrono::Duration::seconds(1)).await;
        assert_eq!(live(&s.contacts(connection).await), ["p1"]);
    }
    let (status, _) = s
        .post("/sync/trigger", json!({"syncs": ["contacts"], "provider_config_key": "crm", "connection_id": "c1", "opts": {"reset": true}}))
        .await;
    assert_eq!(status, 200);
    let ticks = tokio::join!(s.reconciler.tick(Utc::now()), other.tick(Utc::now()));
    assert_eq!(
        ticks.0.unwrap().triggered + ticks.1.unwrap().triggered,
        1,
        "a trigger is claimed once"
    );
    assert_eq!(s.exec_jobs().await, 7, "and queued once");
}

/// An exec run waiting on its provider leaves its thread's turn to another: with one exec
/// thread, one connection's run ends while the other's first page is held.
#[tokio::test]
async fn an_exec_run_waiting_on_its_provider_leaves_its_turn_to_another() {
    let connections = [("c0", json!({}), api_key()), ("c1", json!({}), api_key())];
    let s = setup_on(None, &connections, true, |config| config.worker.exec_threads = 1).await;
    s.crm.put_contact("p1", "p1@crm.test");
    let held = s.crm.hold_page(0);
    let since = Utc::now();
    assert_eq!(s.reconciler.tick(Utc::now()).await.unwrap().scheduled, 2);
    held.reached().await;
    let waiting = eventually("the run not held to end", Duration::from_secs(30), || async {
        let states = s.states().await;
        let ended: Vec<&str> = states
            .iter()
            .filter(|state| ended_after(state, since))
            .map(|state| state.key.connection_id.as_str())
            .collect();
        match ended[..] {
            ["c0"] => Some("c1"),
            ["c1"] => Some("c0"),
            _ => None,
        }
    })
    .await;
    assert!(s.state(waiting).await.unwrap().running, "the held run is still on");
    held.release();
    s.finished_after(waiting, since).await;
    for connection in ["c0", "c1"] {
        assert_eq!(live(&s.contacts(connection).await), ["p1"]);
    }
}

/// Exec runs spread over the workers: with three workers running one exec run each,
/// three connections' runs are all in progress at once, though the jobs were queued
/// while one worker ran (it holds no job it cannot start yet, and the consumer does not
/// stop at one worker's share).
#[tokio::test]
async fn three_workers_run_three_exec_runs_at_once() {
    let connections = [
        ("c0", json!({}), api_key()),
        ("c1", json!({}), api_key()),
        ("c2", json!({}), api_key()),
    ];
    let s = setup_on(None, &connections, true, |config| {
        config.worker.exec_threads = 1;
        config.worker.exec_concurrent_runs = 1;
    })
    .await;
    // Each run waits for the next minute; the test ends once all three are on.
    let waits = "import { createSync } from 'nango';
export default createSync({
  frequency: 'every hour',
  models: { Contact: {} },
  exec: async () => { await new Promise((done) => setTimeout(done, 60000)); },
});";
    s.h.deploy(&[("crm/syncs/waits.js", waits.to_string())]).await;
    // The first worker starts one run, and leaves the other two jobs to workers that
    // come later.
    assert_eq!(s.reconciler.tick(Utc::now()).await.unwrap().scheduled, 3);
    s.running(1).await;
    s.h.start_all();
    s.h.start_all();
    s.running(3).await;
}

#[tokio::test]
async fn pause_stops_scheduled_runs_and_start_resumes_them() {
    // autoStart false: nothing runs until started.
    let s = setup(&[("c0", json!({}), api_key())], false).await;
    let now = Utc::now();
    assert_eq!(s.reconciler.tick(now).await.unwrap().scheduled, 0);
    let status = s.h.api_get("/sync/status?syncs=*&provider_config_key=crm").await;
    assert_eq!(status["syncs"][0]["status"], "STOPPED", "{status}");

    let body = json!({"syncs": ["contacts"], "provider_config_key": "crm"});
    assert_eq!(s.post("/sync/start", body.clone()).await.0, 200);
    s.run_at(now, &["c0"]).await;
    let status = s.h.api_get("/sync/status?syncs=contacts&provider_config_key=crm").await;
    let view = &status["syncs"][0];
    assert_eq!(view["status"], "SUCCESS", "{status}");
    assert_eq!(view["frequency"], "every hour");
    assert!(view["nextScheduledSyncAt"].is_string());

    assert_eq!(s.post("/sync/pause", body.clone()).await.0, 200);
    let status = s.h.api_get("/sync/status?syncs=contacts&provider_config_key=crm").await;
    assert_eq!(status["syncs"][0]["status"], "PAUSED");
    let jobs = s.exec_jobs().await;
    assert_eq!(s.reconciler.tick(hour_later(now)).await.unwrap().scheduled, 0);
    assert_eq!(s.exec_jobs().await, jobs, "a paused sync gets no runs");

    assert_eq!(s.post("/sync/start", body).await.0, 200);
    s.run_at(hour_later(now), &["c0"]).await;

    // Unknown syncs and integrations are named.
    let (status, error) = s
        .post(
            "/sync/trigger",
            json!({"syncs": ["nope"], "provider_config_key": "crm"}),
        )
        .await;
    assert_eq!(status, 404);
    assert!(error.to_string().contains("nope"), "{error}");
    let (status, _) = s
        .post(
            "/sync/pause",
            json!({"syncs": ["contacts"], "provider_config_key": "other"}),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn trigger_with_empty_cache_empties_the_model_before_the_run() {
    let s = setup(&[("c0", json!({}), api_key())], false).await;
    s.crm.put_contact("p1", "p1@crm.test");
    // A record the provider never had, as a stray webhook might leave.
    s.h.store
        .write_records(
            &hookyard_core::store::records::RecordScope {
                environment_id: s.h.environment.id,
                integration: "crm".parse().unwrap(),
                connection_id: "c0".into(),
                model: "Contact".into(),
            },
            hookyard_core::store::records::WriteKind::Save,
            vec![("ghost".into(), json!({"id": "ghost"}))],
            1,
            None,
        )
        .await
        .unwrap();
    let (status, body) = s
        .post(
            "/sync/trigger",
            json!({"syncs": ["contacts"], "provider_config_key": "crm", "connection_id": "c0", "opts": {"emptyCache": true}}),
        )
        .await;
    assert_eq!((status, &body["count"]), (200, &json!(1)), "{body}");
    let states = s.run_at(Utc::now(), &["c0"]).await;
    assert_eq!(states[0].last_outcome.as_deref(), Some("SUCCESS"));
    let contacts = s.contacts("c0").await;
    assert_eq!(
        contacts.iter().map(|(id, _, _)| id.as_str()).collect::<Vec<_>>(),
        ["p1"],
        "the ghost is gone, not merely marked deleted"
    );
}

const REGISTER: &str = r#"
import { createOnEvent } from 'nango';
export default createOnEvent({
  event: 'post-connection-creation',
  exec: async (nango) => {
    const response = await nango.post({ endpoint: '/webhooks', data: { url: await nango.getWebhookURL() } });
    const { unique_key, provider, webhook_url } = await nango.getIntegration({ include: ['webhook'] });
    const credentials = await nango.getIntegration({ include: ['credentials'] }).then(() => 'served', (e) => e.message);
    await nango.updateMetadata({ subscriptionId: response.data.id, integration: { unique_key, provider, webhook_url, credentials } });
    await nango.log(`registered ${response.data.id}`);
  },
});
"#;

const UNREGISTER: &str = r#"
import { createOnEvent } from 'nango';
export default createOnEvent({
  event: 'pre-connection-deletion',
  exec: async (nango) => {
    const { subscriptionId } = await nango.getMetadata();
    if (subscriptionId === 'stuck') throw new Error('cannot unregister');
    await nango.delete({ endpoint: `/webhooks/${subscriptionId}` });
  },
});
"#;

#[tokio::test]
async fn event_functions_register_on_creation_and_unregister_before_deletion() {
    let s = setup_on(None, &[], true, |config| {
        config.ingest.public_url = Some("https://hooks.example/in/".into());
    })
    .await;
    s.h.deploy(&[
        ("crm/syncs/contacts.js", CONTACTS.replace("AUTO_START", "true")),
        ("crm/on-events/register.js", REGISTER.to_string()),
        ("crm/on-events/unregister.js", UNREGISTER.to_string()),
    ])
    .await;
    let create = |id: &str| json!({"provider_config_key": "crm", "connection_id": id, "credentials": {"type": "API_KEY", "apiKey": API_KEY}});
    let (status, body) = s.post("/connections", create("c-new")).await;
    assert_eq!(status, 201, "{body}");

    // Post-creation ran with the connection's context: it called the provider as the
    // connection and kept the subscription id in its metadata.
    let metadata = eventually(
        "the post-creation function's metadata",
        Duration::from_secs(20),
        || async {
            let connection = s.h.api_get("/connections/c-new?provider_config_key=crm").await;
            connection["metadata"]["subscriptionId"].as_str().map(str::to_string)
        },
    )
    .await;
    // It registered this environment's webhook URL for the integration.
    let subscriptions = s.crm.subscriptions();
    let webhook_url = format!("https://hooks.example/in/webhook/{}/crm", s.h.environment.webhook_id);
    assert_eq!(subscriptions.get(&metadata), Some(&webhook_url));
    // And read its integration, Nango's getIntegration: the webhook URL included on
    // request, the integration's OAuth client secret never.
    let connection = s.h.api_get("/connections/c-new?provider_config_key=crm").await;
    let provider = s.h.api_get("/integrations/crm").await["data"]["provider"].clone();
    assert_eq!(
        connection["metadata"]["integration"],
        json!({
            "unique_key": "crm",
            "provider": provider,
            "webhook_url": webhook_url,
            "credentials": "getIntegration: include 'credentials' is not served: functions are not given the \
                            integration's OAuth client secret (getToken gives the connection's token)",
        })
    );
    // Its run was owed from the creation's commit, and is settled now.
    eventually(
        "the post-creation run to be settled",
        Duration::from_secs(10),
        || async { owed_events(&s).await.is_empty().then_some(()) },
    )
    .await;

    // Pre-deletion runs before the deletion answers, while the connection still exists.
    assert_eq!(s.delete_connection("c-new").await, 200);
    assert!(
        s.crm.subscriptions().is_empty(),
        "unregistered before the deletion answered"
    );

    // A failing pre-deletion function is logged and the deletion goes ahead.
    let (status, _) = s.post("/connections", create("c-stuck")).await;
    assert_eq!(status, 201);
    // Its function has ended (it keeps the subscription id after registering it).
    eventually("the second registration", Duration::from_secs(20), || async {
        let settled = owed_events(&s).await.is_empty();
        (settled && s.crm.subscriptions().len() == 1).then_some(())
    })
    .await;
    s.h.store
        .set_connection_metadata(
            s.h.environment.id,
            &"crm".parse().unwrap(),
            &["c-stuck".to_string()],
            json!({"subscriptionId": "stuck"}).as_object().unwrap(),
            hookyard_core::store::MetadataWrite::Merge,
        )
        .await
        .unwrap();
    assert_eq!(s.delete_connection("c-stuck").await, 200);
    let gone =
        s.h.request(Method::GET, "/connections/c-stuck?provider_config_key=crm")
            .send()
            .await
            .unwrap();
    assert_eq!(gone.status(), 404);
    assert_eq!(
        s.crm.subscriptions().len(),
        1,
        "its subscription stayed: the function failed"
    );
}

/// A deletion's function does not wait behind a creation's function waiting on its
/// provider: the API's event functions leave their turn to others while they wait.
#[tokio::test]
async fn a_deletion_does_not_wait_behind_a_creation_function_waiting_on_its_provider() {
    let s = setup(&[("c0", json!({}), api_key())], true).await;
    let fetch = "import { createOnEvent } from 'nango';
export default createOnEvent({
  event: 'post-connection-creation',
  exec: async (nango) => { await nango.get({ endpoint: '/contacts/p1' }); },
});";
    let farewell = "import { createOnEvent } from 'nango';
export default createOnEvent({
  event: 'pre-connection-deletion',
  exec: async (nango) => { await nango.post({ endpoint: '/webhooks', data: { url: `bye ${nango.connectionId}` } }); },
});";
    s.h.deploy(&[
        ("crm/syncs/contacts.js", CONTACTS.replace("AUTO_START", "true")),
        ("crm/on-events/fetch.js", fetch.to_string()),
        ("crm/on-events/farewell.js", farewell.to_string()),
    ])
    .await;
    s.crm.put_contact("p1", "p1@crm.test");
    let held = s.crm.hold_page(0);
    let create = json!({"provider_config_key": "crm", "connection_id": "c-new", "credentials": {"type": "API_KEY", "apiKey": API_KEY}});
    assert_eq!(s.post("/connections", create).await.0, 201);
    held.reached().await;
    let deleted = tokio::time::timeout(Duration::from_secs(10), s.delete_connection("c0"))
        .await
        .expect("the deletion to answer while the creation's function waits");
    assert_eq!(deleted, 200);
    let farewells: Vec<String> = s.crm.subscriptions().into_values().collect();
    assert_eq!(farewells, ["bye c0"], "its function ran before it answered");
    held.release();
    eventually("the creation's run to be settled", Duration::from_secs(10), || async {
        owed_events(&s).await.is_empty().then_some(())
    })
    .await;
}

/// Subscribes the connection to a URL at the fake CRM and answers the subscription;
/// refuses `refuse` with an `ActionError`.
const SUBSCRIBE: &str = r#"
import { createAction } from 'nango';
import * as z from 'zod';
export default createAction({
  input: z.object({ url: z.string() }),
  output: z.object({ id: z.string(), connection: z.string() }),
  exec: async (nango, input) => {
    if (input.url === 'refuse') throw new nango.ActionError({ message: 'not that one', url: input.url });
    const response = await nango.post({ endpoint: '/webhooks', data: { url: input.url } });
    return { id: response.data.id, connection: nango.connectionId };
  },
});
"#;

/// Deletes a subscription, not catching the provider's refusal.
const UNSUBSCRIBE: &str = r#"
import { createAction } from 'nango';
export default createAction({
  exec: async (nango, input) => {
    await nango.delete({ endpoint: `/webhooks/${input.id}` });
  },
});
"#;

const SPIN: &str = r#"
import { createAction } from 'nango';
export default createAction({ exec: async () => { for (;;) {} } });
"#;

/// An action that triggers another (`input.next`, `subscribe` by default).
const CHAIN: &str = r#"
import { createAction } from 'nango';
export default createAction({
  exec: (nango, input) => nango.triggerAction('crm', nango.connectionId, input?.next ?? 'subscribe', { url: 'https://app.example/chained', next: 'subscribe' }),
});
"#;

const WAIT: &str = r#"
import { createAction } from 'nango';
export default createAction({ exec: () => new Promise((resolve) => setTimeout(resolve, 3600000)) });
"#;

impl Setup {
    /// `POST /action/trigger` for connection `c0` of `crm` with `headers` added.
    async fn trigger(&self, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut request = self.h.request(Method::POST, "/action/trigger").json(&body);
        for (name, value) in [("Connection-Id", "c0"), ("Provider-Config-Key", "crm")]
            .iter()
            .filter(|(name, _)| !headers.iter().any(|(given, _)| given == name))
            .chain(headers.iter().filter(|(_, value)| !value.is_empty()))
        {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let retry_after = response.headers().get("retry-after").is_some();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert!(status != 503 || retry_after, "a 503 says when to retry");
        (status, body)
    }
}

#[tokio::test]
async fn actions_run_for_a_connection_and_answer_what_they_return() {
    hookyard_core::metrics::install();
    let actions = [
        ("crm/actions/subscribe.js", SUBSCRIBE),
        ("crm/actions/unsubscribe.js", UNSUBSCRIBE),
        ("crm/actions/spin.js", SPIN),
        ("crm/actions/wait.js", WAIT),
        ("crm/actions/chain.js", CHAIN),
    ];
    let s = setup_configured(&actions, |config| {
        config.api.action_threads = 1;
        config.api.action_concurrent_runs = 1;
        config.api.action_limits.cpu_budget = Duration::from_millis(300);
        config.api.action_limits.timeout = Duration::from_secs(1);
    })
    .await;
    let listed = s.h.api_get("/functions").await;
    let kinds: Vec<(&str, &str)> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap(), f["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("chain", "action"),
            ("contacts", "sync"),
            ("spin", "action"),
            ("subscribe", "action"),
            ("unsubscribe", "action"),
            ("wait", "action")
        ]
    );
    let subscribe = |url: Value| json!({"action_name": "subscribe", "input": {"url": url}});

    // It ran as the connection, called the provider, and answered its output.
    let (status, body) = s.trigger(subscribe(json!("https://app.example/a")), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["connection"], "c0");
    let id = body["id"].as_str().expect("the subscription id").to_string();
    assert_eq!(
        s.crm.subscriptions().get(&id).map(String::as_str),
        Some("https://app.example/a")
    );

    // Input its schema refuses is not run.
    let (status, body) = s.trigger(subscribe(json!(5)), &[]).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_action_input");
    assert_eq!(body["error"]["payload"]["issues"][0]["path"], json!(["url"]));
    assert_eq!(s.crm.subscriptions().len(), 1);

    // Nango's ActionError: its payload, for the caller.
    let (status, body) = s.trigger(subscribe(json!("refuse")), &[]).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "action_script_runtime_error");
    assert_eq!(body["error"]["message"], "ActionError: not that one");
    assert_eq!(
        body["error"]["payload"],
        json!({"message": "not that one", "url": "refuse"})
    );

    // A provider call it let through: 424 with the provider's status.
    let unsubscribe = |id: &str| json!({"action_name": "unsubscribe", "input": {"id": id}});
    let (status, body) = s.trigger(unsubscribe("nope"), &[]).await;
    assert_eq!(status, 424, "{body}");
    assert_eq!(body["error"]["code"], "script_http_error");
    assert_eq!(body["error"]["payload"]["status"], 404);
    // Returning nothing answers null.
    let (status, body) = s.trigger(unsubscribe(&id), &[]).await;
    assert_eq!((status, &body), (200, &Value::Null));
    assert!(s.crm.subscriptions().is_empty());

    // One that never ends is stopped at its limit; the next runs.
    let (status, body) = s.trigger(json!({"action_name": "spin"}), &[]).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "action_script_failure");
    assert!(
        body["error"]["message"].as_str().unwrap().starts_with("timeout: "),
        "{body}"
    );
    let (status, _) = s.trigger(subscribe(json!("https://app.example/b")), &[]).await;
    assert_eq!(status, 200);
    // An action triggers another, and answers what that one answered; one level only
    // (the inner one runs on threads whose actions trigger none).
    let (status, body) = s.trigger(json!({"action_name": "chain"}), &[]).await;
    assert_eq!((status, &body["connection"]), (200, &json!("c0")), "{body}");
    let chained = body["id"].as_str().expect("the inner action's subscription");
    assert_eq!(
        s.crm.subscriptions().get(chained).map(String::as_str),
        Some("https://app.example/chained")
    );
    let (status, body) = s
        .trigger(json!({"action_name": "chain", "input": {"next": "chain"}}), &[])
        .await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().starts_with(
            "thrown: Error: triggerAction(chain): thrown: Error: triggerAction(subscribe): an action triggered by another cannot trigger a third"
        ),
        "{body}"
    );

    // What is not there, or not asked for properly, is said.
    for (body, headers, expected, says) in [
        (
            json!({"action_name": "nope"}),
            vec![],
            404,
            "integration crm has no action named \"nope\" (its actions: chain, spin, subscribe, unsubscribe, wait)",
        ),
        (
            json!({"action_name": "contacts"}),
            vec![],
            404,
            "crm's contacts is a sync or event function, not an action (createAction)",
        ),
        (
            json!({"action_name": "spin"}),
            vec![("Connection-Id", "c9")],
            404,
            "connection c9 of integration crm does not exist",
        ),
        (
            json!({"action_name": "spin"}),
            vec![("Connection-Id", "")],
            400,
            "Connection-Id: header is required",
        ),
        (
            json!({"action_name": "spin"}),
            vec![("X-Async", "maybe")],
            400,
            "X-Async: must be true or false",
        ),
        (
            json!({"action_name": "spin"}),
            vec![("X-Max-Retries", "1")],
            400,
            "X-Max-Retries: only with X-Async: true",
        ),
        (json!({"input": {}}), vec![], 400, "body: missing field `action_name`"),
    ] {
        let (status, answer) = s.trigger(body.clone(), &headers).await;
        assert_eq!(status, expected, "{body} {headers:?}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(says), "{body} {headers:?}: {message}");
    }

    // Actions are never scheduled.
    let states = s.states().await;
    assert!(states.iter().all(|state| state.key.sync == "contacts"), "{states:?}");

    // A busy thread with enough runs waiting for it: 503, not an ever longer queue. Five
    // callers that hang up (their runs go on, each waiting out its 1 s timeout on a
    // timer) still hold the room: the sixth finds none.
    let impatient = hookyard_core::outbound::build_client(
        hookyard_core::outbound::http_builder().timeout(Duration::from_millis(300)),
    )
    .unwrap();
    let hang_ups = (0..5).map(|_| {
        impatient
            .post(format!("{}/action/trigger", s.h.api))
            .bearer_auth(&s.h.environment.secret_key)
            .header("Connection-Id", "c0")
            .header("Provider-Config-Key", "crm")
            .json(&json!({"action_name": "wait"}))
            .send()
    });
    for gone in futures::future::join_all(hang_ups).await {
        assert!(gone.unwrap_err().is_timeout());
    }
    let (status, body) = s.trigger(json!({"action_name": "wait"}), &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("every action thread is busy"));

    // Counted as executions of their kind: the five that ran through (a chained pair
    // among them), and the eleven that failed (refused input, and the inner run of the
    // chain too deep, among them); what was answered 404, 400 or 503 never ran.
    let metrics = eventually("the five runs to end", Duration::from_secs(20), || async {
        let metrics = hookyard_core::metrics::handle().render();
        metrics
            .contains(r#"hookyard_executions_total{kind="action",status="failed"} 11"#)
            .then_some(metrics)
    })
    .await;
    for (status, count) in [("ok", 5), ("failed", 11)] {
        let line = format!("hookyard_executions_total{{kind=\"action\",status=\"{status}\"}} {count}");
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
}

/// Fetches the contact `input.id` from the provider.
const LOOKUP: &str = r#"
import { createAction } from 'nango';
export default createAction({
  exec: async (nango, input) => (await nango.get({ endpoint: `/contacts/${input.id}` })).data,
});
"#;

/// An action waiting on its provider leaves its thread's turn to another: with one action
/// thread, a second caller is answered while the first's call is held, then the first.
#[tokio::test]
async fn an_action_waiting_on_its_provider_leaves_its_turn_to_another() {
    let actions = [
        ("crm/actions/lookup.js", LOOKUP),
        ("crm/actions/subscribe.js", SUBSCRIBE),
    ];
    let s = setup_configured(&actions, |config| config.api.action_threads = 1).await;
    s.crm.put_contact("p1", "one@example.com");
    let held = s.crm.hold_page(0);
    let lookup = json!({"action_name": "lookup", "input": {"id": "p1"}});
    let first = s.trigger(lookup, &[]);
    tokio::pin!(first);
    tokio::select! {
        _ = &mut first => panic!("the held call answered"),
        _ = held.reached() => {}
    }
    let subscribe = json!({"action_name": "subscribe", "input": {"url": "https://app.example/a"}});
    let second = tokio::select! {
        _ = &mut first => panic!("the held call answered"),
        second = tokio::time::timeout(Duration::from_secs(10), s.trigger(subscribe, &[])) => second,
    };
    let (status, body) = second.expect("the second action to run while the first waits");
    assert_eq!(status, 200, "{body}");
    held.release();
    let (status, body) = first.await;
    assert_eq!((status, &body["email"]), (200, &json!("one@example.com")), "{body}");
}

/// An action that fails until its attempt `input.succeedOn` (counted in the
/// connection's metadata), then answers how many it took.
const FLAKY: &str = r#"
import { createAction } from 'nango';
export default createAction({
  exec: async (nango, input) => {
    const tries = ((await nango.getMetadata()).tries || 0) + 1;
    await nango.updateMetadata({ tries });
    if (tries < input.succeedOn) throw new nango.ActionError({ message: 'not yet', tries });
    return { tries };
  },
});
"#;

impl Setup {
    /// `GET /action/{id}`: its status and body.
    async fn action_result(&self, id: &str) -> (u16, Value) {
        let response = self
            .h
            .request(Method::GET, &format!("/action/{id}"))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Triggers `body` with `X-Async: true` and `headers`; the run's id.
    async fn trigger_async(&self, body: Value, headers: &[(&str, &str)]) -> String {
        let headers: Vec<(&str, &str)> = [("X-Async", "true")]
            .into_iter()
            .chain(headers.iter().copied())
            .collect();
        let (status, answer) = self.trigger(body, &headers).await;
        assert_eq!(status, 202, "{answer}");
        let id = answer["id"].as_str().expect("an id").to_string();
        assert_eq!(answer["statusUrl"], format!("/action/{id}"));
        id
    }

    /// `GET /action/{id}` once the run has finished.
    async fn finished_action(&self, id: &str) -> (u16, Value) {
        eventually("the asynchronous action to finish", Duration::from_secs(30), || async {
            let (status, body) = self.action_result(id).await;
            (body["error"]["code"] != "action_pending").then_some((status, body))
        })
        .await
    }
}

#[tokio::test]
async fn asynchronous_actions_are_queued_run_by_a_worker_retried_and_announced() {
    let actions = [("crm/actions/flaky.js", FLAKY), ("crm/actions/wait.js", WAIT)];
    let s = setup_configured(&actions, |config| {
        config.api.action_limits.timeout = Duration::from_secs(2);
        config.api.action_limits.cpu_budget = Duration::from_secs(1);
        config.api.async_retry_delay = Duration::from_millis(50);
        config.forwarding.notices_resend_after = Duration::from_millis(500);
    })
    .await;
    let receiver = Receiver::start(&[]).await;
    s.forward_to(&receiver.url).await;

    // Queued, then run by a worker: not finished while it runs (it waits out its 2 s
    // timeout), then its failure.
    let waiting = s.trigger_async(json!({"action_name": "wait"}), &[]).await;
    let (status, body) = s.action_result(&waiting).await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("action_pending")),
        "{body}"
    );
    let (status, body) = s.finished_action(&waiting).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "action_script_failure");
    assert!(
        body["error"]["message"].as_str().unwrap().starts_with("timeout: "),
        "{body}"
    );

    // Retried while X-Max-Retries allows: the third attempt succeeds.
    let flaky = |succeed_on: u32| json!({"action_name": "flaky", "input": {"succeedOn": succeed_on}});
    let succeeds = s.trigger_async(flaky(3), &[("X-Max-Retries", "2")]).await;
    let (status, body) = s.finished_action(&succeeds).await;
    assert_eq!((status, &body), (200, &json!({"tries": 3})));
    // Without enough retries: the last attempt's error, ActionError's payload included.
    let fails = s.trigger_async(flaky(10), &[("X-Max-Retries", "1")]).await;
    let (status, body) = s.finished_action(&fails).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"]["code"], "action_script_runtime_error");
    assert_eq!(body["error"]["payload"], json!({"message": "not yet", "tries": 5}));
    let run = s.h.store.action_run(s.h.environment.id, &fails).await.unwrap();
    assert_eq!((run.attempts, run.request.max_retries), (2, 1));

    // Listed newest first, with how each ended (no input or output); by status; a page
    // at a time.
    let ids = |page: &Value| -> Vec<String> {
        let runs = page["data"].as_array().unwrap_or_else(|| panic!("{page}"));
        runs.iter().map(|run| run["id"].as_str().unwrap().to_string()).collect()
    };
    let listed = s.h.api_get("/action/runs").await;
    assert_eq!(ids(&listed), [fails.clone(), succeeds.clone(), waiting.clone()]);
    let last = &listed["data"][0];
    assert_eq!(
        (
            &last["status"],
            &last["attempts"],
            &last["max_retries"],
            &last["action_name"]
        ),
        (&json!("failed"), &json!(2), &json!(1), &json!("flaky"))
    );
    assert_eq!(last["error"]["code"], "action_script_runtime_error");
    assert!(last.get("input").is_none() && last.get("run_after").is_none(), "{last}");
    let failed = s.h.api_get("/action/runs?status=failed").await;
    assert_eq!(ids(&failed), [fails.clone(), waiting.clone()]);
    let page = s.h.api_get("/action/runs?limit=2").await;
    assert_eq!(ids(&page), [fails.clone(), succeeds.clone()]);
    let cursor = page["next_cursor"].as_str().expect("a cursor after a full page");
    let rest = s.h.api_get(&format!("/action/runs?limit=2&cursor={cursor}")).await;
    assert_eq!(
        (ids(&rest), &rest["next_cursor"]),
        (vec![waiting.clone()], &Value::Null)
    );
    let refused = s.h.api_get("/action/runs?status=queued").await;
    assert_eq!(refused["error"]["code"], "invalid_request", "{refused}");

    // Each finished run is announced to the app, Nango's way.
    let hits = receiver.wait_hits(3).await;
    let mut announced: Vec<String> = hits
        .iter()
        .map(|hit| {
            let body = hit.json();
            assert_eq!(body["type"], "async_action", "{body}");
            assert_eq!(
                (&body["connectionId"], &body["providerConfigKey"]),
                (&json!("c0"), &json!("crm"))
            );
            let id = body["payload"]["id"].as_str().unwrap().to_string();
            assert_eq!(body["payload"]["statusUrl"], format!("/action/{id}"));
            id
        })
        .collect();
    announced.sort();
    let mut expected = vec![waiting.clone(), succeeds.clone(), fails.clone()];
    expected.sort();
    assert_eq!(announced, expected);

    // Each attempt is in the operation log, and so is a synchronous run.
    let (status, body) = s.trigger(flaky(1), &[]).await;
    assert_eq!((status, &body), (200, &json!({"tries": 6})));
    let logged = eventually("the runs in the operation log", Duration::from_secs(10), || async {
        let page = s.h.api_get("/logs/actions?action=flaky").await;
        let runs = page["data"].as_array().cloned().unwrap_or_default();
        (runs.len() == 6).then_some(runs)
    })
    .await;
    // (The worker and the API log through writers of their own: sorted, not in order.)
    let mut seen: Vec<(String, Option<i64>, String, String)> = logged
        .iter()
        .map(|run| {
            let origin = match run["run_id"].as_str() {
                Some(id) if id == succeeds => "succeeds",
                Some(id) if id == fails => "fails",
                _ => run["origin"].as_str().unwrap(),
            };
            let text = |value: &Value| value.as_str().unwrap_or("-").to_string();
            (
                origin.to_string(),
                run["attempt"].as_i64(),
                text(&run["status"]),
                text(&run["error"]["code"]),
            )
        })
        .collect();
    seen.sort();
    let failure = "action_script_runtime_error";
    let mut expected: Vec<(String, Option<i64>, String, String)> = [
        ("succeeds", Some(1), "failed", failure),
        ("succeeds", Some(2), "failed", failure),
        ("succeeds", Some(3), "succeeded", "-"),
        ("fails", Some(1), "failed", failure),
        ("fails", Some(2), "failed", failure),
        ("api", None, "succeeded", "-"),
    ]
    .into_iter()
    .map(|(origin, attempt, status, code)| (origin.into(), attempt, status.into(), code.into()))
    .collect();
    expected.sort();
    assert_eq!(seen, expected);
    let failed = s.h.api_get("/logs/actions?status=failed&action=wait").await;
    assert_eq!(failed["data"][0]["error"]["code"], "action_script_failure", "{failed}");

    // A run whose worker finished it but did not announce it (it died first) is
    // announced by a worker's sweep. (Queued an hour ahead, so that no worker takes it.)
    use hookyard_core::store::action_runs::{ActionOutcome, NewActionRun};
    let later = Utc::now() + chrono::Duration::hours(1);
    let left = NewActionRun {
        environment_id: s.h.environment.id,
        environment: s.h.environment.name.clone(),
        integration: "crm".parse().unwrap(),
        connection_id: "c0".into(),
        action_name: "flaky".into(),
        input: json!({}),
        max_retries: 0,
    };
    let left = s.h.store.queue_action_run(&left, later).await.unwrap();
    let claimed =
        s.h.store
            .claim_action_runs(later, Duration::from_secs(60), 1)
            .await
            .unwrap();
    assert_eq!(claimed[0].id, left.id);
    let done = ActionOutcome::Succeeded(None);
    assert!(s
        .h
        .store
        .finish_action_run(&left.id, 1, &done, Utc::now())
        .await
        .unwrap());
    let hits = receiver.wait_hits(4).await;
    assert_eq!(hits[3].json()["payload"]["id"], left.id);
    assert_eq!(s.action_result(&left.id).await, (200, Value::Null));

    // What cannot be queued is said at once.
    for (body, headers, expected, says) in [
        (
            json!({"action_name": "nope"}),
            vec![("X-Async", "true")],
            404,
            "integration crm has no action named \"nope\"",
        ),
        (
            flaky(1),
            vec![("X-Async", "true"), ("Connection-Id", "c9")],
            404,
            "connection c9 of integration crm does not exist",
        ),
        (
            flaky(1),
            vec![("X-Async", "true"), ("X-Max-Retries", "6")],
            400,
            "X-Max-Retries: must be a number from 0 to 5",
        ),
    ] {
        let (status, answer) = s.trigger(body.clone(), &headers).await;
        assert_eq!(status, expected, "{body} {headers:?}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.starts_with(says), "{body} {headers:?}: {message}");
    }
    let (status, body) = s.action_result("nope").await;
    assert_eq!((status, &body["error"]["code"]), (404, &json!("not_found")), "{body}");
}

/// Answers which version of it ran.
const VERSIONED: &str = r#"
import { createAction } from 'nango';
export default createAction({ exec: async () => ({ version: VERSION }) });
"#;

#[tokio::test]
async fn a_redeployed_action_runs_its_new_code_and_a_removed_one_is_gone() {
    let s = setup_with(&[("crm/actions/versioned.js", &VERSIONED.replace("VERSION", "1"))]).await;
    let versioned = json!({"action_name": "versioned"});
    assert_eq!(s.trigger(versioned.clone(), &[]).await, (200, json!({"version": 1})));
    assert_eq!(s.trigger(versioned.clone(), &[]).await, (200, json!({"version": 1})));
    let contacts = CONTACTS.replace("AUTO_START", "false");
    s.h.deploy(&[
        ("crm/syncs/contacts.js", contacts.clone()),
        ("crm/actions/versioned.js", VERSIONED.replace("VERSION", "2")),
    ])
    .await;
    assert_eq!(s.trigger(versioned.clone(), &[]).await, (200, json!({"version": 2})));
    s.h.deploy(&[("crm/syncs/contacts.js", contacts)]).await;
    let (status, body) = s.trigger(versioned, &[]).await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn an_environment_can_turn_the_async_action_webhook_off() {
    let s = setup_with(&[("crm/actions/flaky.js", FLAKY)]).await;
    let receiver = Receiver::start(&[]).await;
    let body = s
        .put_forwarding(json!({"urls": [receiver.url], "async_action_webhooks": false}))
        .await;
    assert_eq!(body["data"]["async_action_webhooks"], false, "{body}");
    let id = s
        .trigger_async(json!({"action_name": "flaky", "input": {"succeedOn": 1}}), &[])
        .await;
    assert_eq!(s.finished_action(&id).await, (200, json!({"tries": 1})));
    // Once the worker has dealt with its announcement, nothing was queued for it.
    eventually("the run's announcement settled", Duration::from_secs(10), || async {
        let run = s.h.store.action_run(s.h.environment.id, &id).await.unwrap();
        run.notified.then_some(())
    })
    .await;
    let mut forwards = s.h.bus.jetstream.get_stream(FWD_STREAM).await.unwrap();
    assert_eq!(forwards.info().await.unwrap().state.messages, 0);
    assert!(receiver.hits().is_empty());
}

/// A sync whose exec runs the `subscribe` action through `nango.triggerAction`, once as
/// it succeeds and once as it refuses, and saves what it saw.
const RELAY: &str = r#"
import { createSync } from 'nango';
export default createSync({
  frequency: 'every hour',
  autoStart: false,
  models: { Relayed: {} },
  exec: async (nango) => {
    const out = await nango.triggerAction('crm', nango.connectionId, 'subscribe', { url: 'https://app.example/relay' });
    const refused = await nango.triggerAction('crm', nango.connectionId, 'subscribe', { url: 'refuse' })
      .then(() => 'ran', (e) => e.message);
    await nango.batchSave([{ id: out.id, connection: out.connection, refused }], 'Relayed');
  },
});
"#;

#[tokio::test]
async fn an_exec_run_triggers_an_action_and_sees_its_output_or_its_failure() {
    let s = setup_with(&[("crm/syncs/relay.js", RELAY), ("crm/actions/subscribe.js", SUBSCRIBE)]).await;
    let since = Utc::now();
    let trigger = json!({"syncs": ["relay"], "provider_config_key": "crm", "connection_id": "c0"});
    assert_eq!(s.post("/sync/trigger", trigger).await.0, 200);
    assert_eq!(s.reconciler.tick(Utc::now()).await.unwrap().triggered, 1);
    let state = eventually("the relay run to finish", Duration::from_secs(30), || async {
        let states = s.states().await;
        states
            .into_iter()
            .find(|state| state.key.sync == "relay")
            .filter(|state| ended_after(state, since))
    })
    .await;
    assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"), "{state:?}");
    let relayed = s.h.records("c0", "Relayed").await;
    assert_eq!(relayed.len(), 1, "{relayed:?}");
    let id = relayed[0]["id"].as_str().unwrap();
    assert_eq!(
        s.crm.subscriptions().get(id).map(String::as_str),
        Some("https://app.example/relay"),
        "the action ran, for this connection"
    );
    assert_eq!(relayed[0]["connection"], "c0");
    assert_eq!(
        relayed[0]["refused"],
        "triggerAction(subscribe): thrown: ActionError: not that one"
    );
    // Both runs are in the operation log, as the function's.
    let logged = eventually("the runs in the operation log", Duration::from_secs(10), || async {
        let page = s.h.api_get("/logs/actions?action=subscribe").await;
        let runs = page["data"].as_array().cloned().unwrap_or_default();
        (runs.len() == 2).then_some(runs)
    })
    .await;
    let seen: Vec<(&Value, &Value, &Value)> = logged
        .iter()
        .map(|r| (&r["origin"], &r["status"], &r["connection_id"]))
        .collect();
    assert_eq!(
        seen,
        [
            (&json!("function"), &json!("failed"), &json!("c0")),
            (&json!("function"), &json!("succeeded"), &json!("c0"))
        ],
        "newest first"
    );
}

/// Takes the lock `input.key`, twice, and says what it got; a bad key is refused.
const LOCKER: &str = r#"
import { createAction } from 'nango';
export default createAction({
  exec: async (nango, input) => {
    const taken = await nango.tryAcquireLock({ key: input.key, ttlMs: 60000 });
    const again = taken ? await nango.tryAcquireLock({ key: input.key, ttlMs: 60000 }) : null;
    const bad = await nango.tryAcquireLock({ key: '', ttlMs: 1000 }).then(() => 'taken', (e) => e.message);
    return { taken, again, bad };
  },
});
"#;

#[tokio::test]
async fn a_lock_is_one_runs_until_it_ends() {
    let s = setup_with(&[("crm/actions/locker.js", LOCKER)]).await;
    let (store, environment) = (&s.h.store, s.h.environment.id);
    let minute = Duration::from_secs(60);
    let other = |take: bool| async move {
        match take {
            true => {
                store
                    .try_acquire_lock(environment, "ledger", "someone", Utc::now(), minute)
                    .await
            }
            false => store.release_lock(environment, "ledger", "someone").await,
        }
        .unwrap()
    };
    let locker = json!({"action_name": "locker", "input": {"key": "ledger"}});

    // Held by another run: refused.
    assert!(other(true).await);
    let (status, body) = s.trigger(locker.clone(), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((&body["taken"], &body["again"]), (&json!(false), &Value::Null));
    assert_eq!(
        body["bad"],
        "tryAcquireLock: key must be a string of 1 to 255 characters"
    );

    // Free: taken, and taken again by the same run.
    assert!(other(false).await);
    let (status, body) = s.trigger(locker, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!((&body["taken"], &body["again"]), (&json!(true), &json!(true)));
    // Released as the run ended, a minute before its time.
    assert!(other(true).await, "the run's lock went with it");
}

/// Asks for a full resync of `input.sync` for its connection.
const RESYNC: &str = r#"
import { createAction } from 'nango';
export default createAction({
  exec: (nango, input) => nango.triggerSync('crm', nango.connectionId, input.sync, true),
});
"#;

#[tokio::test]
async fn an_action_asks_for_a_sync_run_which_the_reconciler_queues() {
    let s = setup_with(&[("crm/actions/resync.js", RESYNC)]).await;
    let resync = |sync: &str| json!({"action_name": "resync", "input": {"sync": sync}});
    let (status, body) = s.trigger(resync("nope"), &[]).await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("triggerSync(nope): no sync with an exec of that name is deployed for integration crm"),
        "{body}"
    );
    assert_eq!(s.reconciler.tick(Utc::now()).await.unwrap().triggered, 0);

    let since = Utc::now();
    let (status, body) = s.trigger(resync("contacts"), &[]).await;
    assert_eq!((status, &body), (200, &Value::Null));
    assert_eq!(
        s.reconciler.tick(Utc::now()).await.unwrap().triggered,
        1,
        "queued as a trigger"
    );
    let state = s.finished_after("c0", since).await;
    assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"));
}

/// Every owed connection event, claimed or not.
async fn owed_events(s: &Setup) -> Vec<String> {
    let far = Utc::now() + chrono::Duration::days(1);
    let owed = s.h.store.unclaimed_events(far, 100).await.unwrap();
    owed.into_iter().map(|o| o.connection_id).collect()
}

#[tokio::test]
async fn a_post_creation_run_its_api_did_not_finish_is_run_by_the_sweep() {
    let s = setup(&[], true).await;
    s.h.deploy(&[
        ("crm/syncs/contacts.js", CONTACTS.replace("AUTO_START", "true")),
        ("crm/on-events/register.js", REGISTER.to_string()),
    ])
    .await;
    // Connections created through an API that then died: one whose claim ran out, one
    // still claimed (its API may be running it).
    let owe = |id: &'static str, claimed_until| {
        let s = &s;
        async move {
            s.h.store
                .create_connection_owing(
                    &s.h.environment,
                    &connection(id, json!({}), api_key()),
                    POST_CREATION,
                    claimed_until,
                )
                .await
                .unwrap()
        }
    };
    owe("c-orphan", Utc::now() - chrono::Duration::seconds(1)).await;
    owe("c-claimed", Utc::now() + chrono::Duration::hours(1)).await;

    let shutdown = tokio_util::sync::CancellationToken::new();
    let api = hookyard_api::Api::new(s.h.store.clone(), &s.h.config).unwrap();
    let sweep = tokio::spawn(api.owed_event_sweep(shutdown.clone()));
    let subscription = eventually("the orphan's registration", Duration::from_secs(20), || async {
        let connection = s.h.api_get("/connections/c-orphan?provider_config_key=crm").await;
        connection["metadata"]["subscriptionId"].as_str().map(str::to_string)
    })
    .await;
    eventually("the orphan's run to be settled", Duration::from_secs(10), || async {
        (owed_events(&s).await == ["c-claimed"]).then_some(())
    })
    .await;
    shutdown.cancel();
    sweep.await.unwrap();
    let subscriptions = s.crm.subscriptions();
    let webhook_url = s.h.environment.webhook_url(&s.h.config.webhook_base_url(), "crm");
    assert_eq!(
        subscriptions.values().collect::<Vec<_>>(),
        [&webhook_url],
        "the orphan registered once; the claimed one left to its API"
    );
    assert!(subscriptions.contains_key(&subscription));
}

#[tokio::test]
async fn the_fake_crm_signs_webhooks_that_go_through_ingest_and_the_router_to_the_records() {
    let h = harness_with(None, 0, |_| {}).await;
    h.add_signed_integration("crmhooks", "whsec-test").await;
    // Deployed while the worker runs: the first webhook after the deploy answered meets
    // the new sync (the worker looks for a new deploy before each group).
    h.start_all();
    h.deploy(&[("crmhooks/syncs/contacts.js", CONTACTS.replace("AUTO_START", "true"))])
        .await;
    let s = Setup {
        crm: FakeCrm::start().await,
        reconciler: Reconciler::new(h.store.clone(), h.bus.jetstream.clone()),
        h,
    };
    let url = format!("{}/crmhooks?connection_id=c0", s.h.start_edge().await);

    let body = json!({"type": "contact.updated", "contact": {"id": "p9", "email": "p9@crm.test"}});
    assert_eq!(FakeCrm::send_webhook(&url, "whsec-test", &body).await, 202);
    assert_eq!(FakeCrm::send_webhook(&url, "not-the-secret", &body).await, 401);
    let records = eventually("the signed webhook's record", Duration::from_secs(20), || async {
        let response =
            s.h.request(Method::GET, "/records?model=Contact")
                .header("Connection-Id", "c0")
                .header("Provider-Config-Key", "crmhooks")
                .send()
                .await
                .ok()?;
        let body: Value = response.json().await.ok()?;
        let records = body["records"].as_array()?.clone();
        (!records.is_empty()).then_some(records)
    })
    .await;
    assert_eq!(records.len(), 1, "the badly signed copy was refused");
    assert_eq!(records[0]["email"], "p9@crm.test");
}

#[tokio::test]
async fn override_lets_exec_win_over_a_webhook_that_came_in_before_its_write() {
    let s = setup(&[("c0", json!({}), api_key())], true).await;
    s.h.deploy(&[(
        "crm/syncs/contacts.js",
        CONTACTS
            .replace("AUTO_START", "true")
            .replace(
                "await nango.trackDeletesStart('Contact');",
                "await nango.setMergingStrategy({ strategy: 'override' }, 'Contact');",
            )
            .replace("await nango.trackDeletesEnd('Contact');", ""),
    )])
    .await;
    s.crm.put_contact("p1", "from-exec@crm.test");
    let (held, since) = s.webhook_during_a_held_run("from-webhook@crm.test").await;
    held.release();
    let state = s.finished_after("c0", since).await;
    assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"), "{:?}", state.last_error);
    assert_eq!(
        s.contacts("c0").await[0].1,
        "from-exec@crm.test",
        "with override, the run's write (made after the webhook came in) wins"
    );
}

const CHECKPOINTED: &str = r#"
import { createSync } from 'nango';
export default createSync({
  frequency: 'every hour',
  autoStart: false,
  models: { Run: {} },
  exec: async (nango) => {
    const checkpoint = (await nango.getCheckpoint()) ?? { runs: 0 };
    const runs = checkpoint.runs + 1;
    await nango.batchSave([{ id: `run-${runs}`, runs }], 'Run');
    await nango.saveCheckpoint({ runs });
  },
});
"#;

#[tokio::test]
async fn checkpoints_carry_over_between_runs_and_reset_forgets_them() {
    let s = setup(&[("c0", json!({}), api_key())], false).await;
    s.h.deploy(&[("crm/syncs/counted.js", CHECKPOINTED.to_string())]).await;
    let trigger = |reset: bool| json!({"syncs": ["counted"], "provider_config_key": "crm", "connection_id": "c0", "opts": {"reset": reset}});
    for reset in [false, false, true] {
        assert_eq!(s.post("/sync/trigger", trigger(reset)).await.0, 200);
        s.run_at(Utc::now(), &["c0"]).await;
    }
    let mut runs: Vec<String> =
        s.h.records("c0", "Run")
            .await
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
    runs.sort();
    assert_eq!(
        runs,
        ["run-1", "run-2"],
        "the third run started again from no checkpoint"
    );
    let key = hookyard_core::store::syncs::SyncKey {
        environment_id: s.h.environment.id,
        integration: "crm".parse().unwrap(),
        sync: "counted".into(),
        connection_id: "c0".into(),
    };
    assert_eq!(s.h.store.checkpoint(&key).await.unwrap(), Some(json!({"runs": 1})));
}

/// Reads its token and the cache as Nango's exec does, keeping what it saw in metadata.
const READS: &str = r#"
import { createSync } from 'nango';
export default createSync({
  frequency: 'every hour',
  autoStart: false,
  models: { Contact: {} },
  exec: async (nango) => {
    const before = await nango.getRecordsByIds(['a', 2], 'Contact');
    const many = Array.from({ length: 150 }, (_, i) => ({ id: `x${i}`, n: i }));
    await nango.batchSave([{ id: 'a', n: 1 }, { id: '2', n: 2 }, { id: 'gone', n: 3 }, ...many], 'Contact');
    await nango.batchDelete([{ id: 'gone' }], 'Contact');
    const after = await nango.getRecordsByIds(['a', 2, 'gone', 'missing'], 'Contact');
    const all = await nango.getRecordsByIds(many.map((r) => r.id), 'Contact');
    await nango.updateMetadata({
      variables: await nango.getEnvironmentVariables(),
      token: await nango.getToken().catch((e) => ({ error: e.message })),
      before: before.size,
      after: [...after.entries()].map(([id, r]) => [id, typeof id, r.n, r._nango_metadata.last_action]),
      all: all.size,
    });
  },
});
"#;

#[tokio::test]
async fn exec_reads_its_token_and_the_records_cache_as_nangos_does() {
    let s = setup(&[("c-key", json!({}), api_key())], false).await;
    let (expired, refresh) = s.crm.issue_tokens(true);
    let oauth = expired_oauth2(&expired, &refresh);
    s.h.store
        .create_connection(&s.h.environment, &connection("c-oauth", json!({}), oauth))
        .await
        .unwrap();
    let without = NewConnection {
        credentials: None,
        ..connection("c-none", json!({}), api_key())
    };
    s.h.store.create_connection(&s.h.environment, &without).await.unwrap();
    s.h.deploy(&[("crm/syncs/reads.js", READS.to_string())]).await;
    let variable = hookyard_core::store::EnvironmentVariable {
        name: "TEAM_ID".into(),
        value: "team-1".into(),
    };
    s.h.store
        .set_environment_variables(s.h.environment.id, &[variable])
        .await
        .unwrap();
    for id in ["c-key", "c-oauth", "c-none"] {
        let trigger = json!({"syncs": ["reads"], "provider_config_key": "crm", "connection_id": id});
        assert_eq!(s.post("/sync/trigger", trigger).await.0, 200);
    }
    for state in s.run_at(Utc::now(), &["c-key", "c-oauth", "c-none"]).await {
        assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"), "{:?}", state.last_error);
    }
    let key = s.metadata("c-key").await;
    assert_eq!(key["token"], json!({"type": "API_KEY", "apiKey": API_KEY}));
    assert_eq!(key["variables"], json!([{"name": "TEAM_ID", "value": "team-1"}]));
    assert_eq!(key["before"], 0);
    // Keyed by the ids as given (2 stays a number); deleted and missing ones are not there.
    assert_eq!(
        key["after"],
        json!([["a", "string", 1, "ADDED"], [2, "number", 2, "ADDED"]])
    );
    assert_eq!(key["all"], 150, "more ids than one call takes");
    // The expired OAuth2 token was refreshed before it was handed out.
    let token = s.metadata("c-oauth").await["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("access-") && token != expired, "{token}");
    assert_eq!(s.crm.refreshes(), 1);
    // A connection without credentials has no token to give: the call says so.
    assert_eq!(
        s.metadata("c-none").await["token"],
        json!({"error": "connection c-none has no credentials"})
    );
}

/// Keeps the `lastSyncDate` each run saw in the connection's metadata; fails when told.
const INCREMENTAL: &str = r#"
import { createSync } from 'nango';
export default createSync({
  frequency: 'every hour',
  autoStart: false,
  syncType: 'incremental',
  models: { Contact: {} },
  exec: async (nango) => {
    const meta = await nango.getMetadata();
    const since = nango.lastSyncDate;
    if (since !== undefined && !(since instanceof Date)) throw new Error('not a Date');
    await nango.updateMetadata({ seen: [...(meta.seen ?? []), since?.toISOString() ?? null], fail: false });
    if (meta.fail) throw new Error('failing as told');
  },
});
"#;

#[tokio::test]
async fn last_sync_date_is_when_the_last_successful_run_started() {
    let s = setup(&[("c0", json!({}), api_key())], false).await;
    s.h.deploy(&[("crm/syncs/incremental.js", INCREMENTAL.to_string())])
        .await;
    let run = |reset: bool, fail: bool| {
        let s = &s;
        async move {
            if fail {
                s.h.store
                    .set_connection_metadata(
                        s.h.environment.id,
                        &"crm".parse().unwrap(),
                        &["c0".to_string()],
                        json!({"fail": true}).as_object().unwrap(),
                        hookyard_core::store::MetadataWrite::Merge,
                    )
                    .await
                    .unwrap();
            }
            let trigger = json!({"syncs": ["incremental"], "provider_config_key": "crm", "connection_id": "c0", "opts": {"reset": reset}});
            assert_eq!(s.post("/sync/trigger", trigger).await.0, 200);
            let state = s.run_at(Utc::now(), &["c0"]).await.remove(0);
            assert_eq!(
                state.last_outcome.as_deref(),
                Some(if fail { "ERROR" } else { "SUCCESS" })
            );
            state
                .last_started_at
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        }
    };
    let first = run(false, false).await;
    let second = run(false, false).await;
    run(false, true).await;
    run(false, false).await;
    run(true, false).await;
    assert_eq!(
        s.metadata("c0").await["seen"],
        json!([null, first, second, second, null]),
        "none at first, then the start of the last success (not of the failed run), none after a reset"
    );
}

/// Nango's older delete tracking: `trackDeletes: true` on the sync, no calls in exec.
const TRACKED: &str = r#"
import { createSync } from 'nango';
export default createSync({
  frequency: 'every hour',
  autoStart: false,
  syncType: 'SYNC_TYPE',
  trackDeletes: true,
  models: { MODEL: {} },
  exec: async (nango) => {
    const config = { endpoint: '/cursor/contacts', params: { limit: 2 },
      paginate: { type: 'cursor', cursor_path_in_response: 'next_cursor', cursor_name_in_request: 'cursor', response_path: 'results' } };
    for await (const page of nango.paginate(config)) {
      await nango.batchSave(page.map((c) => ({ id: c.id, email: c.email })), 'MODEL');
    }
  },
});
"#;

#[tokio::test]
async fn track_deletes_on_a_full_sync_deletes_what_a_run_did_not_save() {
    let s = setup(&[("c0", json!({}), api_key())], false).await;
    let tracked = |sync_type: &str, model: &str| TRACKED.replace("SYNC_TYPE", sync_type).replace("MODEL", model);
    s.h.deploy(&[
        ("crm/syncs/full.js", tracked("full", "Contact")),
        ("crm/syncs/incremental.js", tracked("incremental", "Lead")),
    ])
    .await;
    for n in 1..=3 {
        s.crm.put_contact(&format!("p{n}"), &format!("p{n}@crm.test"));
    }
    let run = || async {
        for sync in ["full", "incremental"] {
            let trigger = json!({"syncs": [sync], "provider_config_key": "crm", "connection_id": "c0"});
            assert_eq!(s.post("/sync/trigger", trigger).await.0, 200);
        }
        let since = Utc::now();
        let tick = s.reconciler.tick(Utc::now()).await.unwrap();
        assert_eq!(tick.triggered, 2);
        eventually("both runs to finish", Duration::from_secs(30), || async {
            let states = s.states().await;
            let done = states.iter().filter(|state| ended_after(state, since)).count();
            (done == 2).then_some(states)
        })
        .await
    };
    run().await;
    s.crm.remove_contact("p2");
    for state in run().await {
        assert_eq!(state.last_outcome.as_deref(), Some("SUCCESS"), "{:?}", state.last_error);
    }
    let s = &s;
    let records = |model: &'static str| async move {
        let mut live: Vec<String> =
            s.h.records("c0", model)
                .await
                .iter()
                .filter(|r| r["_nango_metadata"]["deleted_at"].is_null())
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect();
        live.sort();
        live
    };
    assert_eq!(records("Contact").await, ["p1", "p3"], "the full sync deleted p2");
    assert_eq!(
        records("Lead").await,
        ["p1", "p2", "p3"],
        "as in Nango, an incremental sync's trackDeletes deletes nothing"
    );
}

#[tokio::test]
async fn a_message_on_hooks_exec_that_is_no_job_is_kept_as_a_dead_letter() {
    let s = setup(&[("c0", json!({}), api_key())], true).await;
    s.h.bus
        .jetstream
        .publish("hooks.exec.dev.crm.c0", "not a job".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let letters = eventually("the dead letter", Duration::from_secs(20), || async {
        let letters = s.h.store.dead_letters("dev", &Default::default(), 10).await.ok()?;
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0].letter;
    assert_eq!(
        (letter.consumer.as_str(), letter.error_kind.as_str()),
        ("exec", "invalid_message")
    );
    assert_eq!(
        (letter.integration.as_str(), letter.payload.as_str()),
        ("crm", "not a job")
    );
    // A run still goes through afterwards.
    s.crm.put_contact("p1", "p1@crm.test");
    s.run_at(Utc::now(), &["c0"]).await;
    assert_eq!(live(&s.contacts("c0").await), ["p1"]);
}

/// Exec runs notify what they changed (`INITIAL`, then `INCREMENTAL`), and a run that
/// fails what it wrote before failing.
#[tokio::test]
async fn exec_runs_that_change_records_send_sync_notifications() {
    let s = setup(&[("c0", json!({"retries": 0}), api_key())], true).await;
    let receiver = Receiver::start(&[]).await;
    let notification = |n: usize| {
        let receiver = receiver.clone();
        async move { receiver.wait_hits(n).await[n - 1].json() }
    };
    s.forward_to(&receiver.url).await;

    s.crm.put_contact("p1", "p1@crm.test");
    s.crm.put_contact("p2", "p2@crm.test");
    let now = Utc::now();
    s.run_at(now, &["c0"]).await;
    let first = notification(1).await;
    assert_eq!(
        (&first["type"], &first["syncName"], &first["model"], &first["syncType"]),
        (&json!("sync"), &json!("contacts"), &json!("Contact"), &json!("INITIAL")),
        "{first}"
    );
    assert_eq!(
        first["responseResults"],
        json!({"added": 2, "updated": 0, "deleted": 0})
    );

    s.crm.put_contact("p3", "p3@crm.test");
    s.run_at(hour_later(now), &["c0"]).await;
    let second = notification(2).await;
    assert_eq!(second["syncType"], "INCREMENTAL");
    assert_eq!(
        second["responseResults"],
        json!({"added": 1, "updated": 0, "deleted": 0})
    );
    assert_eq!((&second["success"], &second["error"]), (&json!(true), &Value::Null));

    // A run that fails on its second page is notified of what its first page changed.
    s.crm.put_contact("p1", "p1@changed.test");
    let held = s.crm.hold_page(0);
    let since = Utc::now();
    let later = hour_later(hour_later(now));
    assert_eq!(s.reconciler.tick(later).await.unwrap().scheduled, 1);
    held.reached().await;
    s.crm.fail_next(1, 500, None);
    held.release();
    let state = s.finished_after("c0", since).await;
    assert_eq!(state.last_outcome.as_deref(), Some("ERROR"));
    let third = notification(3).await;
    assert_eq!(
        (&third["success"], &third["responseResults"]),
        (&json!(false), &json!({"added": 0, "updated": 1, "deleted": 0})),
        "{third}"
    );
    assert!(
        third["error"]["description"].as_str().unwrap().contains("answered 500"),
        "{third}"
    );
}

/// A run whose notice the sweep sent early (its heartbeat could not reach the database
/// for a whole lease, so it looked dead) still sends its final notification: the early
/// one, of what it had written, does not take the final one's identity.
#[tokio::test]
async fn a_run_that_looked_dead_still_sends_its_final_notification() {
    let s = setup_on(None, &[("c0", json!({"retries": 0}), api_key())], true, |config| {
        config.forwarding.notices_resend_after = Duration::from_millis(200);
    })
    .await;
    let receiver = Receiver::start(&[]).await;
    s.forward_to(&receiver.url).await;
    for n in 1..=4 {
        s.crm.put_contact(&format!("p{n}"), &format!("p{n}@crm.test"));
    }
    // Two contacts a page: the run writes the first and waits for the second.
    let held = s.crm.hold_page(1);
    let since = Utc::now();
    assert_eq!(s.reconciler.tick(Utc::now()).await.unwrap().scheduled, 1);
    held.reached().await;
    // Its hold lapses as if no heartbeat had reached the database.
    raw_execute(
        &s.h.config.database_url,
        "UPDATE sync_notices SET held_until = created_at WHERE held_until IS NOT NULL",
    )
    .await;
    let early = receiver.wait_hits(1).await[0].json();
    assert_eq!(
        (&early["success"], &early["responseResults"]),
        (&json!(false), &json!({"added": 2, "updated": 0, "deleted": 0})),
        "{early}"
    );
    assert_eq!(early["error"]["description"], UNFINISHED, "{early}");

    held.release();
    s.finished_after("c0", since).await;
    let last = receiver.wait_hits(2).await[1].json();
    assert_eq!(
        (&last["success"], &last["responseResults"]),
        (&json!(true), &json!({"added": 4, "updated": 0, "deleted": 0})),
        "{last}"
    );
}

/// Every worker's metrics say how many asynchronous runs are due and not taken (the
/// backlog, which `HOOKS_CONN`'s lag does not show) and how many run.
#[tokio::test]
async fn the_asynchronous_backlog_is_in_the_worker_metrics() {
    let s = setup_configured(&[("crm/actions/wait.js", WAIT)], |config| {
        config.api.action_threads = 2;
        config.api.action_concurrent_runs = 2;
        config.api.action_limits.timeout = Duration::from_secs(20);
        config.api.action_limits.cpu_budget = Duration::from_secs(1);
    })
    .await;
    for _ in 0..5 {
        s.trigger_async(json!({"action_name": "wait"}), &[]).await;
    }
    // Two action threads: two run (each until its timeout), three wait for them.
    eventually("the gauges to read the backlog", Duration::from_secs(15), || async {
        let counts = (
            metric("hookyard_async_actions_waiting").await,
            metric("hookyard_async_actions_running").await,
        );
        (counts == (3.0, 2.0)).then_some(())
    })
    .await;
}

/// A sync whose onWebhook fills a thin event in from the provider's API, keeping the
/// email the cache had before.
const THIN: &str = r#"
import { createSync } from 'nango';
export default createSync({
  models: { Contact: {} },
  webhookSubscriptions: ['contact.changed'],
  onWebhook: async (nango, payload) => {
    const cached = await nango.getRecordsByIds([payload.objectId], 'Contact');
    const { data } = await nango.get({ endpoint: `/contacts/${payload.objectId}` });
    const previous = cached.get(payload.objectId)?.email ?? null;
    await nango.batchSave([{ id: data.id, email: data.email, previous }], 'Contact');
  },
});
"#;

/// onWebhook reads the records cache and calls the provider's API with the connection's
/// credentials, as exec does; a provider that does not answer fails the run when the
/// run's time is up (not when the call's own timeout would), and the retry applies the
/// event.
#[tokio::test]
async fn on_webhook_reads_the_cache_and_fetches_what_a_thin_event_names_and_gives_up_on_a_provider_that_hangs() {
    // One thread: a run left waiting on the provider would hold every later one.
    let s = setup_configured(&[("crm/syncs/thin.js", THIN)], |config| {
        config.worker.js_threads = 1;
        config.worker.concurrent_runs = 1;
    })
    .await;
    let stored = |id: &'static str, email: &'static str| {
        let s = &s;
        move || s.has_contact("c0", id, Some(email))
    };
    // The provider changes a contact and says so; the worker fetches it.
    let (s, stored) = (&s, &stored);
    let changed = |id: &'static str, email: &'static str| async move {
        s.crm.put_contact(id, email);
        s.thin_event(id).await;
        eventually("the fetched contact", Duration::from_secs(20), stored(id, email)).await;
    };
    changed("p7", "seven@example.com").await;
    changed("p7", "seven@new.example.com").await;
    let records = s.h.records("c0", "Contact").await;
    let p7 = records.iter().find(|r| r["id"] == "p7").unwrap();
    assert_eq!(p7["previous"], "seven@example.com", "read from the cache: {p7}");

    let held = s.crm.hold_page(0);
    s.crm.put_contact("p8", "eight@example.com");
    s.thin_event("p8").await;
    held.reached().await;
    // Written by the retry while the first call is still unanswered: the run that made
    // it gave up (its timeout is 1 s, a provider call's own 30 s).
    eventually(
        "the retry's write",
        Duration::from_secs(20),
        stored("p8", "eight@example.com"),
    )
    .await;
    let asked: Vec<(String, u16)> = s
        .crm
        .requests()
        .into_iter()
        .filter(|(path, _)| path == "/contacts/p8")
        .collect();
    assert_eq!(asked.len(), 2, "{asked:?}");
    held.release();
}

/// A provider's rate limit on a connection: its first 429 pauses the connection's calls
/// in the worker, so an event that comes meanwhile is not sent to be refused again, and
/// the runs that cannot wait the limit out (its `Retry-After` is longer than their time)
/// end at once and are retried once it ends, not on the retry schedule, which would
/// have spent their attempts inside the limit and dead-lettered them.
#[tokio::test]
async fn a_429_pauses_its_connections_calls_and_their_events_are_retried_when_the_limit_ends() {
    rate_limited_events(false).await;
}

/// The same with GitHub's answer to a spent limit: a 403 with nothing remaining until
/// its reset, which the integration's `api.rate_limit` names (as GitHub's provider file
/// does).
#[tokio::test]
async fn a_403_with_nothing_remaining_is_a_rate_limit_until_its_reset_where_the_provider_says_so() {
    rate_limited_events(true).await;
}

async fn rate_limited_events(as_github: bool) {
    let s = setup_with(&[("crm/syncs/thin.js", THIN)]).await;
    let refused_with = if as_github { 403 } else { 429 };
    if as_github {
        s.rate_limits_as_github().await;
    }
    let refused = || {
        s.crm
            .requests()
            .into_iter()
            .filter(|(_, status)| *status == refused_with)
            .count()
    };
    // Longer than a run's 1 s and than the whole retry schedule (100 ms, 300 ms), with
    // room for the second event to come while it lasts.
    let window = Duration::from_secs(5);
    if as_github {
        s.crm.limit_as_github_for(window);
    } else {
        s.crm.limit_for(window);
    }
    s.first_refused_second_held(refused).await;
    let shown = &s.h.api_get("/connections?connectionId=c0").await["connections"][0];
    assert!(shown["rate_limited_until"].is_string(), "shown while it holds: {shown}");
    for (id, email) in [("p1", "one@example.com"), ("p2", "two@example.com")] {
        eventually(
            "the contact fetched once the limit ended",
            Duration::from_secs(20),
            || s.has_contact("c0", id, Some(email)),
        )
        .await;
    }
    assert_eq!(
        refused(),
        1,
        "nothing was sent inside the limit after its first refusal: {:?}",
        s.crm.requests()
    );
    assert_eq!(rate_limits("limited").await, 1.0);
    let letters = s.h.store.dead_letters("dev", &Default::default(), 10).await.unwrap();
    assert!(letters.is_empty(), "no event ran out of attempts");
    let crm = "crm".parse().unwrap();
    let connection =
        s.h.store
            .existing_connection(s.h.environment.id, &crm, "c0")
            .await
            .unwrap();
    assert!(
        connection.rate_limited_until.is_some(),
        "recorded for the other processes"
    );
    let shown = &s.h.api_get("/connections?connectionId=c0").await["connections"][0];
    assert_eq!(
        shown["rate_limited_until"],
        Value::Null,
        "not shown once it ended: {shown}"
    );
}

/// An answer that spends the provider's limit (GitHub's last call of the hour: a 200 with
/// nothing remaining) pauses the connection until its reset: the next event's call waits
/// for it instead of being refused.
#[tokio::test]
async fn an_answer_with_nothing_remaining_pauses_the_connection_until_its_reset_without_a_refusal() {
    let s = setup_with(&[("crm/syncs/thin.js", THIN)]).await;
    s.rate_limits_as_github().await;
    // One call left, then refusals until the reset (2 s and a part on).
    s.crm.budget_as_github(1, Duration::from_secs(2));
    s.crm.put_contact("p1", "one@example.com");
    s.crm.put_contact("p2", "two@example.com");
    s.thin_event("p1").await;
    for (id, email) in [("p1", "one@example.com"), ("p2", "two@example.com")] {
        eventually("the contact fetched", Duration::from_secs(20), || {
            s.has_contact("c0", id, Some(email))
        })
        .await;
        if id == "p1" {
            // Sent while the limit still holds: the fake would refuse its call.
            s.thin_event("p2").await;
        }
    }
    let requests = s.crm.requests();
    assert!(
        requests.iter().all(|(_, status)| *status == 200),
        "no call was sent into the spent limit: {requests:?}"
    );
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(rate_limits("spent").await, 1.0);
    assert_eq!(rate_limits("limited").await, 0.0);
}

/// onWebhook that fetches the contact a thin event names after a moment's work, so that
/// every event of a burst has come before any fetch is sent.
const FETCH_AFTER_A_MOMENT: &str = r#"
import { createSync } from 'nango';
export default createSync({
  models: { Contact: {} },
  webhookSubscriptions: ['contact.changed'],
  onWebhook: async (nango, payload) => {
    await new Promise((resolve) => setTimeout(resolve, 300));
    const { data } = await nango.get({ endpoint: `/contacts/${payload.objectId}` });
    await nango.batchSave([{ id: data.id, email: data.email }], 'Contact');
  },
});
"#;

/// Runs that wait on the provider as long as a test needs: the provider's answer, not
/// the run's time limit, ends them.
fn patient(config: &mut Config) {
    config.worker.limits.timeout = Duration::from_secs(30);
    config.worker.ack_wait = Duration::from_secs(65);
    config.worker.hold_back_slow_syncs = false;
}

/// `count` thin events for `c0` about contacts `{prefix}{i}` (each put at the
/// provider), of `event_type`.
async fn thin_events(
    s: &Setup,
    prefix: &str,
    count: usize,
    event_type: &'static str,
) -> Vec<(u64, &'static str, &'static str, Value)> {
    let mut events = Vec::new();
    for i in 0..count {
        let id = format!("{prefix}{i}");
        s.crm.put_contact(&id, &format!("{id}@example.com"));
        events.push(s.thin(&id, event_type).await);
    }
    events
}

/// Three workers on the functions' consumer, and a burst whose runs wait on a provider
/// that does not answer: each runs its share at once (two groups of one event here),
/// rather than the first holding, unstarted, what the two others could run.
#[tokio::test]
async fn three_workers_share_a_burst_of_events() {
    let s = prepare_configured(&[("crm/syncs/thin.js", THIN)], |config| {
        config.worker.batch = 1;
        patient(config);
    })
    .await;
    let gate = s.crm.hold_contacts();
    let events = thin_events(&s, "p", 12, "contact.changed").await;
    s.h.publish(events).await;
    let gate = &gate;
    let held = |what: &'static str, count: usize| {
        eventually(what, Duration::from_secs(5), move || {
            let waiting = gate.waiting();
            async move { (waiting == count).then_some(()) }
        })
    };
    s.h.start_worker();
    held("the first worker's two runs at the provider", 2).await;
    s.h.start_worker();
    s.h.start_worker();
    held("three workers' two runs each at the provider", 6).await;
    gate.release();
    s.h.drained().await;
    assert_eq!(s.contacts("c0").await.len(), 12, "{:?}", s.contacts("c0").await);
}

/// A sync that saves what a `contact.touched` event names at once.
const TOUCHED: &str = r#"
import { createSync } from 'nango';
export default createSync({
  models: { Touched: {} },
  webhookSubscriptions: ['contact.touched'],
  onWebhook: async (nango, payload) => {
    await nango.batchSave([{ id: payload.objectId }], 'Touched');
  },
});
"#;

/// Groups of one event whose run hangs on the provider and one that ends at once: each
/// group commits the quick one and leaves the other running as a straggler while the
/// next group starts. The stragglers count against what the worker holds, so it stops
/// taking events at its bound (three groups' worth) and the rest wait in the stream
/// for another worker; before, a worker took every event of the backlog this way.
#[tokio::test]
async fn a_worker_whose_runs_hang_stops_taking_events_at_its_bound() {
    let s = prepare_configured(
        &[("crm/syncs/thin.js", THIN), ("crm/syncs/touched.js", TOUCHED)],
        |config| {
            config.worker.batch = 2;
            patient(config);
        },
    )
    .await;
    let gate = s.crm.hold_contacts();
    let hanging = thin_events(&s, "h", 10, "contact.changed").await;
    let quick = thin_events(&s, "q", 10, "contact.touched").await;
    s.h.publish(hanging.into_iter().zip(quick).flat_map(|(h, q)| [h, q]))
        .await;
    s.h.start_worker();
    // Every place (six events) taken by a hanging run, four of them at least started.
    eventually("runs hanging at the provider", Duration::from_secs(10), || async {
        (gate.waiting() >= 4).then_some(())
    })
    .await;
    // Taking more would be a pull (about 25 ms a group): a second gives it ample time.
    // What the worker holds stays within its share, and the rest stays in the stream.
    let stream = s.h.bus.jetstream.get_stream(CONN_STREAM).await.unwrap();
    // Three groups of two, and a pull on its way.
    let share = Share {
        concurrency: 3 * 2,
        batch: 2,
    }
    .holds();
    let watched = tokio::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(1) {
        let info = stream.consumer_info(hookyard_worker::CONSUMER).await.unwrap();
        assert!(
            info.num_ack_pending <= share && info.num_pending > 0,
            "the worker holds {} events ({} left in the stream), more than its {share}",
            info.num_ack_pending,
            info.num_pending
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gate.waiting() <= 6, "{} runs at the provider", gate.waiting());
    gate.release();
    s.h.drained().await;
    assert_eq!(s.contacts("c0").await.len(), 10);
    assert_eq!(s.h.records("c0", "Touched").await.len(), 10);
}

/// A burst of thin events about one contact (HubSpot's batch of property changes): the
/// runs fetching it at once share one request, sent after every one of them came.
#[tokio::test]
async fn identical_reads_of_a_burst_share_one_request() {
    let s = setup_configured(&[("crm/syncs/thin.js", FETCH_AFTER_A_MOMENT)], |config| {
        config.worker.js_threads = 2;
        config.worker.hold_back_slow_syncs = false;
    })
    .await;
    s.crm.put_contact("p1", "one@example.com");
    let held = s.crm.hold_page(0);
    let event = json!({"type": "contact.changed", "objectId": "p1"});
    let (first, second) = (s.raw_sequence().await, s.raw_sequence().await);
    s.h.publish([
        (first, "c0", "contact.changed", event.clone()),
        (second, "c0", "contact.changed", event),
    ])
    .await;
    tokio::time::timeout(Duration::from_secs(10), held.reached())
        .await
        .expect("the first fetch to reach the provider");
    counted("the second run to join the first's fetch", PROVIDER_READS_SHARED).await;
    held.release();
    s.h.drained().await;
    assert_eq!(s.crm.requests(), [("/contacts/p1".to_string(), 200)], "one request");
    assert!(
        s.has_contact("c0", "p1", Some("one@example.com")).await.is_some(),
        "{:?}",
        s.contacts("c0").await
    );
    assert_eq!(metric(PROVIDER_READS_SHARED).await, 1.0);
    let runs = metric("hookyard_executions_total{kind=\"on_webhook\",status=\"ok\"}").await;
    assert_eq!(runs, 2.0, "both events ran");

    // An event that comes while a fetch is on its way does not take that fetch's answer,
    // which may be older than the change it tells of: it sends its own.
    let held = s.crm.hold_page(0);
    let send = || async {
        let seq = s.raw_sequence().await;
        let event = json!({"type": "contact.changed", "objectId": "p1"});
        s.h.publish([(seq, "c0", "contact.changed", event)]).await;
    };
    send().await;
    tokio::time::timeout(Duration::from_secs(10), held.reached())
        .await
        .expect("the third fetch to reach the provider");
    send().await;
    eventually(
        "the fourth event's own fetch, answered while the third's is held",
        Duration::from_secs(10),
        || async { (s.crm.requests().len() == 3).then_some(()) },
    )
    .await;
    held.release();
    s.h.drained().await;
    assert_eq!(s.crm.requests().len(), 3);
    assert_eq!(metric(PROVIDER_READS_SHARED).await, 1.0, "not shared");
}

/// One JS thread fetches for several events at once: a run waiting on the provider leaves
/// the thread's turn to the next event's run (`worker.concurrent_runs`).
#[tokio::test]
async fn one_js_thread_fetches_for_several_events_at_once() {
    let s = setup_configured(&[("crm/syncs/thin.js", THIN)], |config| {
        config.worker.js_threads = 1;
    })
    .await;
    let held = s.first_held_second_sent().await;
    eventually(
        "the second event's fetch, sent while the first's is held",
        Duration::from_secs(10),
        || async {
            let requests = s.crm.requests();
            requests.iter().any(|(path, _)| path == "/contacts/p2").then_some(())
        },
    )
    .await;
    held.release();
    s.stored(&["p1", "p2"]).await;
}

/// An integration that bounds a connection's calls in flight (`api.max_concurrent_calls`,
/// as GitHub asks for one at a time): with threads to spare, a second event's fetch
/// waits for the first's to end.
#[tokio::test]
async fn a_connections_calls_in_flight_keep_to_its_integrations_bound() {
    let s = setup_configured(&[("crm/syncs/thin.js", THIN)], |config| {
        config.worker.js_threads = 1;
    })
    .await;
    s.set_api("max_concurrent_calls", json!(1)).await;
    let held = s.first_held_second_sent().await;
    counted(
        "the second fetch to wait for the first's",
        "hookyard_provider_calls_queued_total",
    )
    .await;
    assert_eq!(s.crm.requests().len(), 1, "{:?}", s.crm.requests());
    held.release();
    s.stored(&["p1", "p2"]).await;
    assert_eq!(s.crm.requests().len(), 2);
}

/// At a trickle of events, the thread that went idle last runs the next one, so a worker
/// of many threads loads its sync once, not once per thread (some 3 MB each with zod).
#[tokio::test]
async fn a_trickle_of_events_loads_its_sync_once() {
    let s = setup_configured(&[("crm/syncs/thin.js", THIN)], |config| {
        config.worker.js_threads = 1;
        config.worker.concurrent_runs = 8;
    })
    .await;
    for n in 0..6 {
        let id = format!("p{n}");
        s.crm.put_contact(&id, "someone@example.com");
        s.thin_event(&id).await;
        eventually("the contact stored", Duration::from_secs(10), || {
            s.has_contact("c0", &id, None)
        })
        .await;
    }
    assert_eq!(metric("hookyard_js_syncs_loaded").await, 1.0);
}

/// A burst whose runs never wait goes through the threads that hold the turns: on one JS
/// thread, the sync is loaded once however many threads the worker has.
#[tokio::test]
async fn a_burst_that_never_waits_loads_its_sync_once() {
    const SAVES: &str = r#"
import { createSync } from 'nango';
export default createSync({
  models: { Contact: {} },
  webhookSubscriptions: ['contact.changed'],
  onWebhook: async (nango, payload) => {
    await nango.batchSave([{ id: payload.objectId, email: `${payload.objectId}@example.com` }], 'Contact');
  },
});
"#;
    let s = setup_configured(&[("crm/syncs/saves.js", SAVES)], |config| {
        config.worker.js_threads = 1;
        config.worker.concurrent_runs = 8;
    })
    .await;
    let mut events = Vec::new();
    for n in 0..60 {
        let seq = s.raw_sequence().await;
        events.push((
            seq,
            "c0",
            "contact.changed",
            json!({"type": "contact.changed", "objectId": format!("p{n}")}),
        ));
    }
    s.h.publish(events).await;
    s.h.drained().await;
    assert_eq!(s.contacts("c0").await.len(), 60);
    assert_eq!(metric("hookyard_js_syncs_loaded").await, 1.0);
}

/// A worker told to stop does not wait for the runs waiting for a limited connection's
/// turn (up to a minute each, past Kubernetes' grace): it leaves them unrun, not failed,
/// and the next worker runs them once the limit ends.
#[tokio::test]
async fn a_stopping_worker_leaves_the_runs_waiting_for_a_turn_to_the_next_one() {
    let s = prepare_configured(&[("crm/syncs/thin.js", THIN)], |_| {}).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = hookyard_worker::Worker::new(s.h.store.clone(), &s.h.bus, &s.h.config).unwrap();
    let first = tokio::spawn(std::sync::Arc::new(worker).run(stop.clone()));
    let refused = || s.crm.requests().iter().filter(|(_, status)| *status == 429).count();
    s.crm.limit_for(Duration::from_secs(10));
    s.first_refused_second_held(refused).await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(4), first)
        .await
        .expect("the worker stops without waiting for the turn")
        .unwrap()
        .unwrap();
    assert_eq!(s.crm.requests().len(), 1, "the waiting run was not run");

    s.h.start_all();
    for id in ["p1", "p2"] {
        eventually("the contact stored by the next worker", Duration::from_secs(30), || {
            s.has_contact("c0", id, None)
        })
        .await;
    }
    assert_eq!(refused(), 1);
    let letters = s.h.store.dead_letters("dev", &Default::default(), 10).await.unwrap();
    assert!(letters.is_empty(), "{letters:?}");
    let failed = metric("hookyard_executions_total{kind=\"on_webhook\",status=\"failed\"}").await;
    assert_eq!(failed, 1.0, "the refused run failed; the one left unrun did not");
}

/// A rate limit another process met (a worker elsewhere) is read with the connection:
/// this worker's run does not call the provider until it ends, then applies the event.
#[tokio::test]
async fn a_rate_limit_another_process_recorded_holds_this_workers_calls_too() {
    let s = setup_with(&[("crm/syncs/thin.js", THIN)]).await;
    s.crm.put_contact("p1", "one@example.com");
    let crm = "crm".parse().unwrap();
    let until = Utc::now() + chrono::Duration::seconds(3);
    s.h.store
        .rate_limit_connection(s.h.environment.id, &crm, "c0", until)
        .await
        .unwrap();
    s.thin_event("p1").await;
    counted("the run to wait its turn, unsent", &rate_limit_outcome("held")).await;
    eventually(
        "the contact fetched once the limit ended",
        Duration::from_secs(20),
        || s.has_contact("c0", "p1", None),
    )
    .await;
    assert!(Utc::now() >= until, "not before the limit ended");
    let statuses: Vec<u16> = s.crm.requests().iter().map(|(_, status)| *status).collect();
    assert_eq!(statuses, [200], "one call, after the limit");
}

/// Once a connection's provider limited it, its webhook runs take turns: a burst for it
/// waits in memory for the pause to end instead of each run waiting it out on a JS
/// thread, so the same sync's events for another connection (another credential, not
/// limited) are not held back meanwhile.
#[tokio::test]
async fn a_limited_connections_burst_waits_its_turn_without_holding_back_other_connections() {
    let s = setup_configured(&[("crm/syncs/thin.js", THIN)], |config| {
        // Two threads: runs waiting out the pause on them would hold the rest back.
        config.worker.js_threads = 2;
        config.worker.concurrent_runs = 2;
        config.worker.hold_back_slow_syncs = false;
        config.worker.limits.timeout = Duration::from_secs(8);
        config.worker.ack_wait = Duration::from_secs(30);
    })
    .await;
    // c1 calls with an OAuth2 token: the limit, on c0's API key, is not its.
    let (token, refresh) = s.crm.issue_tokens(true);
    let credentials = oauth2(&token, &refresh, chrono::Duration::hours(1));
    s.h.store
        .create_connection(&s.h.environment, &connection("c1", json!({}), credentials))
        .await
        .unwrap();
    let send = |connection: &'static str, contact: &'static str| {
        let s = &s;
        async move {
            s.crm.put_contact(contact, &format!("{contact}@example.com"));
            let event = json!({"type": "contact.changed", "objectId": contact});
            let seq = s.raw_sequence().await;
            s.h.publish([(seq, connection, "contact.changed", event)]).await;
        }
    };
    let stored = |connection: &'static str, contact: &'static str| {
        let s = &s;
        move || s.has_contact(connection, contact, None)
    };
    let window = Duration::from_secs(5);
    let limit_ends = Instant::now() + window;
    s.crm.limit_for(window);
    // The first event meets the limit; its run waits it out (its time is 8 s) on a thread.
    send("c0", "p0").await;
    eventually(
        "the provider to refuse c0's first call",
        Duration::from_secs(10),
        || async { (s.crm.requests().iter().any(|(_, status)| *status == 429)).then_some(()) },
    )
    .await;
    // A burst for c0, then an event for c1: c1's is applied while c0's limit holds.
    for contact in ["p1", "p2", "p3", "p4"] {
        send("c0", contact).await;
    }
    send("c1", "q1").await;
    eventually("c1's event", Duration::from_secs(10), stored("c1", "q1")).await;
    assert!(
        Instant::now() < limit_ends,
        "c1's event waited for c0's limit to end: c0's runs held the JS threads"
    );
    for contact in ["p0", "p1", "p2", "p3", "p4"] {
        eventually(
            "c0's events once the limit ended",
            Duration::from_secs(30),
            stored("c0", contact),
        )
        .await;
    }
    let refused = s.crm.requests().iter().filter(|(_, status)| *status == 429).count();
    assert_eq!(refused, 1, "the burst waited its turn, unsent: {:?}", s.crm.requests());
    let letters = s.h.store.dead_letters("dev", &Default::default(), 10).await.unwrap();
    assert!(letters.is_empty());
}

/// A 429 whose `Retry-After` is longer than the run has left ends the call at once with
/// the provider's answer, rather than holding the run (and its JS thread) until its time
/// is up; the connection's next run meanwhile fails without a call.
#[tokio::test]
async fn a_rate_limit_longer_than_the_run_fails_it_at_once_with_the_providers_answer() {
    let s = setup_configured(&[("crm/actions/fetch.js", FETCH)], |config| {
        config.api.action_limits.cpu_budget = Duration::from_millis(500);
        config.api.action_limits.timeout = Duration::from_secs(5);
    })
    .await;
    s.crm.put_contact("p1", "one@example.com");
    s.crm.limit_for(Duration::from_secs(30));
    let fetch = json!({"action_name": "fetch", "input": {"id": "p1"}});
    let (status, body) = s.trigger(fetch.clone(), &[]).await;
    assert_eq!(
        (status, &body["error"]["payload"]["status"]),
        (424, &json!(429)),
        "the provider's answer, not the run's timeout: {body}"
    );
    let (status, body) = s.trigger(fetch, &[]).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.to_string().contains("rate limited"), "{body}");
    assert_eq!(
        s.crm.requests().len(),
        1,
        "the second run sent nothing: {:?}",
        s.crm.requests()
    );
}

/// An asynchronous action refused by a rate limit is retried once the limit ends, not
/// after `api.async_retry_delay`, which would spend its one retry inside the limit.
#[tokio::test]
async fn an_asynchronous_action_refused_by_a_rate_limit_is_retried_when_it_ends() {
    let s = setup_configured(&[("crm/actions/fetch.js", FETCH)], |config| {
        config.api.action_limits.cpu_budget = Duration::from_millis(500);
        config.api.action_limits.timeout = Duration::from_secs(1);
        config.api.async_retry_delay = Duration::from_millis(50);
    })
    .await;
    s.crm.put_contact("p1", "one@example.com");
    s.crm.limit_for(Duration::from_secs(3));
    let fetch = json!({"action_name": "fetch", "input": {"id": "p1"}});
    let id = s.trigger_async(fetch, &[("X-Max-Retries", "1")]).await;
    let (status, body) = s.finished_action(&id).await;
    assert_eq!((status, &body["email"]), (200, &json!("one@example.com")), "{body}");
    let statuses: Vec<u16> = s.crm.requests().iter().map(|(_, status)| *status).collect();
    assert_eq!(statuses, [429, 200]);
}

/// Nango's `retryOn`: a call retries the statuses it names, as it does 5xx; without it a
/// 404 is the function's to handle.
#[tokio::test]
async fn a_call_retries_the_statuses_its_retry_on_names() {
    const FETCH_RETRYING: &str = r#"
import { createAction } from 'nango';
export default createAction({
  exec: async (nango, input) =>
    (await nango.get({ endpoint: `/contacts/${input.id}`, retryOn: input.retryOn })).data,
});
"#;
    let s = setup_with(&[("crm/actions/fetch.js", FETCH_RETRYING)]).await;
    s.crm.put_contact("p1", "one@example.com");
    let fetch = |retry_on: Value| json!({"action_name": "fetch", "input": {"id": "p1", "retryOn": retry_on}});
    // Not readable everywhere yet: the first read answers 404.
    s.crm.fail_next(1, 404, None);
    let (status, body) = s.trigger(fetch(json!([404])), &[]).await;
    assert_eq!((status, &body["email"]), (200, &json!("one@example.com")), "{body}");
    s.crm.fail_next(1, 404, None);
    let (status, body) = s.trigger(fetch(Value::Null), &[]).await;
    assert_eq!(
        (status, &body["error"]["payload"]["status"]),
        (424, &json!(404)),
        "{body}"
    );
    let statuses: Vec<u16> = s.crm.requests().iter().map(|(_, status)| *status).collect();
    assert_eq!(statuses, [404, 200, 404]);
}

async fn rate_limits(outcome: &str) -> f64 {
    metric(&rate_limit_outcome(outcome)).await
}

/// The rate-limit metric's series for `outcome`.
fn rate_limit_outcome(outcome: &str) -> String {
    format!("hookyard_provider_rate_limits_total{{outcome=\"{outcome}\"}}")
}
