//! A fake CRM provider for end-to-end tests: contacts listed in the three pagination
//! styles exec functions use, API-key and OAuth2 auth (tokens that expire, refreshed at
//! `/oauth/token`), injected 429s and 500s, a page that can be held back while a test
//! does something else, and webhooks signed like a real provider's.
//!
//! - `GET /cursor/contacts?cursor=&limit=` (also `/contacts`) → `{"results": [...], "next_cursor": "…"|null}`
//! - `GET /link/contacts?page=&limit=` → `{"data": [...]}` and `Link: <…>; rel="next"`
//! - `GET /offset/contacts?offset=&limit=` → `{"items": [...]}`
//! - `GET /contacts/{id}` → the contact, or 404 (held as page 0, or all by `hold_contacts`)
//! - `POST /webhooks` `{"url"}` → `{"id"}`, `DELETE /webhooks/{id}`: webhook subscriptions
//! - `POST /oauth/token` (`grant_type=refresh_token`) → `{"access_token", "refresh_token", "expires_in"}`;
//!   each refresh token is good once (rotated, as many providers do)

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::{Notify, Semaphore};

/// How `nango.paginate` walks `/contacts`: the integration's `settings.api.paginate`.
pub fn cursor_pagination() -> Value {
    json!({"type": "cursor", "cursor_path_in_response": "next_cursor", "cursor_name_in_request": "cursor", "response_path": "results"})
}

/// The API key the fake accepts (as `X-API-Key`).
pub const API_KEY: &str = "crm-test-api-key";
pub const CLIENT_ID: &str = "crm-client";
pub const CLIENT_SECRET: &str = "crm-client-secret";

#[derive(Default)]
struct Fake {
    contacts: BTreeMap<String, Value>,
    /// Access token → still valid.
    tokens: HashMap<String, bool>,
    refresh_tokens: HashMap<String, bool>,
    refreshes: u32,
    /// Every request to the token URL, answered or refused.
    token_requests: u32,
    /// Answers to give before any real one: (status, Retry-After seconds).
    faults: VecDeque<(u16, Option<u64>)>,
    /// A rate limit: every request before this is refused (`limit_for`, `limit_as_github_for`).
    limited_until: Option<Instant>,
    /// GitHub's way of refusing them: 403, nothing remaining until this reset (epoch
    /// seconds). Otherwise 429 with `Retry-After`.
    github_reset: Option<u64>,
    /// GitHub's budget (`budget_as_github`): the calls answered before the limit refuses,
    /// each with what remains.
    budget: u32,
    /// Every answered list request, with its status.
    requests: Vec<(String, u16)>,
    /// A request held until released.
    hold: Option<(Hold, Arc<Notify>, Arc<Notify>)>,
    /// Where every request for one contact waits, once set.
    contacts_gate: Option<Arc<Gate>>,
    issued: u32,
    /// Webhook subscriptions: id → URL.
    subscriptions: BTreeMap<String, String>,
}

/// The running fake; stopped when dropped.
pub struct FakeCrm {
    pub url: String,
    state: Arc<Mutex<Fake>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeCrm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

type Shared = Arc<Mutex<Fake>>;

impl FakeCrm {
    pub async fn start() -> FakeCrm {
        let state: Shared = Arc::default();
        let app = Router::new()
            .route("/cursor/contacts", get(cursor_page))
            .route("/contacts", get(cursor_page))
            .route("/contacts/{id}", get(one_contact))
            .route("/link/contacts", get(link_page))
            .route("/offset/contacts", get(offset_page))
            .route("/oauth/token", post(token))
            .route("/webhooks", post(subscribe))
            .route("/webhooks/{id}", axum::routing::delete(unsubscribe))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("bound"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeCrm { url, state, server }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Fake) -> T) -> T {
        f(&mut self.state.lock().expect("fake CRM state"))
    }

    /// Adds or replaces a contact (the provider's side of a change).
    pub fn put_contact(&self, id: &str, email: &str) {
        self.with(|f| {
            f.contacts
                .insert(id.to_string(), json!({"id": id, "email": email, "first_name": id}))
        });
    }

    pub fn remove_contact(&self, id: &str) {
        self.with(|f| f.contacts.remove(id));
    }

    /// An OAuth2 access token that is valid (or already expired), and a refresh token.
    pub fn issue_tokens(&self, valid: bool) -> (String, String) {
        self.with(|f| {
            f.issued += 1;
            let (access, refresh) = (format!("access-{}", f.issued), format!("refresh-{}", f.issued));
            f.tokens.insert(access.clone(), valid);
            f.refresh_tokens.insert(refresh.clone(), true);
            (access, refresh)
        })
    }

    /// Token refreshes answered so far.
    pub fn refreshes(&self) -> u32 {
        self.with(|f| f.refreshes)
    }

    /// Requests to the token URL so far, refused ones included.
    pub fn token_requests(&self) -> u32 {
        self.with(|f| f.token_requests)
    }

    /// The next `count` list requests answer `status` (with `Retry-After` when given).
    pub fn fail_next(&self, count: usize, status: u16, retry_after: Option<u64>) {
        self.with(|f| f.faults.extend(std::iter::repeat_n((status, retry_after), count)));
    }

    /// A rate limit, as a provider's: for `window` from now, every request with the API
    /// key (the limit is per credential) is answered 429 with the seconds left as
    /// `Retry-After`.
    pub fn limit_for(&self, window: Duration) {
        self.with(|f| {
            f.limited_until = Some(Instant::now() + window);
            f.github_reset = None;
        });
    }

    /// A rate limit (on the API key) answered as GitHub does: 403 with `x-ratelimit-remaining: 0` and
    /// `x-ratelimit-reset` (epoch seconds), until the whole second `window` from now
    /// reaches.
    pub fn limit_as_github_for(&self, window: Duration) {
        self.budget_as_github(0, window);
    }

    /// GitHub's limit with `calls` left in it: those are answered, each with
    /// `x-ratelimit-remaining` (down to `0`) and `x-ratelimit-reset`; after them the
    /// API key's requests are refused as `limit_as_github_for` says, until the reset.
    pub fn budget_as_github(&self, calls: u32, window: Duration) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970");
        let reset = (now + window).as_secs() + 1;
        let until = Instant::now() + (Duration::from_secs(reset) - now);
        self.with(|f| {
            f.limited_until = Some(until);
            f.github_reset = Some(reset);
            f.budget = calls;
        });
    }

    /// Every list request answered so far, as `(path?query, status)`.
    pub fn requests(&self) -> Vec<(String, u16)> {
        self.with(|f| f.requests.clone())
    }

    /// Holds list page `page` (0-based) until [`Held::release`]; `reached` resolves when a
    /// request for it arrives.
    pub fn hold_page(&self, page: usize) -> Held {
        self.hold(Hold::Page(page))
    }

    /// Holds the answer to the next token refresh (its refresh token already used up)
    /// until [`Held::release`].
    pub fn hold_token(&self) -> Held {
        self.hold(Hold::Token)
    }

    fn hold(&self, what: Hold) -> Held {
        let (reached, release) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        self.with(|f| f.hold = Some((what, reached.clone(), release.clone())));
        Held { reached, release }
    }

    /// Holds every request for one contact (`GET /contacts/{id}`) from now on, until
    /// [`Gate::release`].
    pub fn hold_contacts(&self) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            waiting: AtomicUsize::new(0),
            shut: Semaphore::new(0),
        });
        self.with(|f| f.contacts_gate = Some(gate.clone()));
        gate
    }

    /// The webhook subscriptions: id → URL.
    pub fn subscriptions(&self) -> BTreeMap<String, String> {
        self.with(|f| f.subscriptions.clone())
    }

    /// Signs `body` like the generic HMAC provider (`X-Signature`: hex HMAC-SHA256).
    pub fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Sends a webhook as the provider does: `body` as JSON, signed with `secret` in
    /// `X-Signature`; the receiver's status.
    pub async fn send_webhook(url: &str, secret: &str, body: &Value) -> u16 {
        let body = body.to_string();
        hookyard_core::outbound::http_client()
            .unwrap()
            .post(url)
            .header("content-type", "application/json")
            .header("x-signature", FakeCrm::sign(secret, body.as_bytes()))
            .body(body)
            .send()
            .await
            .expect("the receiver answers")
            .status()
            .as_u16()
    }
}

pub struct Held {
    reached: Arc<Notify>,
    release: Arc<Notify>,
}

/// Requests held by [`FakeCrm::hold_contacts`].
pub struct Gate {
    waiting: AtomicUsize,
    /// No permits: a request waits for it to close.
    shut: Semaphore,
}

impl Gate {
    /// Requests held now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Lets the held requests, and every later one, through.
    pub fn release(&self) {
        self.shut.close();
    }

    async fn pass(&self) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _ = self.shut.acquire().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Which request [`FakeCrm::hold_page`] or [`FakeCrm::hold_token`] holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    Page(usize),
    Token,
}

/// The hold set for `what`, taken (it holds one request).
fn take_hold(fake: &mut Fake, what: Hold) -> Option<(Arc<Notify>, Arc<Notify>)> {
    match &fake.hold {
        Some((held, reached, release)) if *held == what => {
            let hold = (reached.clone(), release.clone());
            fake.hold = None;
            Some(hold)
        }
        _ => None,
    }
}

/// Tells the test the held request arrived, and waits for its release.
async fn wait_if_held(hold: Option<(Arc<Notify>, Arc<Notify>)>) {
    if let Some((reached, release)) = hold {
        reached.notify_one();
        release.notified().await;
    }
}

impl Held {
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    pub fn release(&self) {
        self.release.notify_one();
    }
}

/// A header to answer with.
type Header = (&'static str, String);

/// Auth, injected faults, the rate limit and the hold, before a page is served: the
/// headers to answer it with (a budget's remaining calls), or the refusal.
async fn gate(state: &Shared, headers: &HeaderMap, page: usize, path: String) -> Result<Vec<Header>, Response> {
    let (status, hold) = {
        let mut fake = state.lock().expect("fake CRM state");
        let authorised = match headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
            Some(key) => key == API_KEY,
            None => headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|token| fake.tokens.get(token) == Some(&true)),
        };
        // A provider's limit is per credential: the API key's here.
        let window = fake
            .limited_until
            .and_then(|until| until.checked_duration_since(Instant::now()))
            .filter(|_| headers.contains_key("x-api-key"));
        let mut answer_headers = Vec::new();
        if let (Some(_), Some(reset), true) = (window, fake.github_reset, fake.budget > 0) {
            fake.budget -= 1;
            answer_headers = vec![
                ("x-ratelimit-remaining", fake.budget.to_string()),
                ("x-ratelimit-reset", reset.to_string()),
            ];
        }
        let limited = window
            .filter(|_| answer_headers.is_empty())
            .map(|left| match fake.github_reset {
                Some(reset) => (
                    403,
                    vec![
                        ("x-ratelimit-remaining", "0".to_string()),
                        ("x-ratelimit-reset", reset.to_string()),
                    ],
                ),
                None => (
                    429,
                    vec![("retry-after", (left.as_secs_f64().ceil() as u64).to_string())],
                ),
            });
        let fault = if authorised {
            limited.or_else(|| {
                let (status, retry_after) = fake.faults.pop_front()?;
                let headers = retry_after.map(|seconds| ("retry-after", seconds.to_string()));
                // A budget's headers come with every answer, as GitHub's do.
                Some((status, headers.into_iter().chain(answer_headers.clone()).collect()))
            })
        } else {
            None
        };
        let status = match (authorised, fault) {
            (false, _) => Err((401, Vec::new())),
            (true, Some(fault)) => Err(fault),
            (true, None) => Ok(answer_headers),
        };
        fake.requests
            .push((path, status.as_ref().map_or_else(|(s, _)| *s, |_| 200)));
        let hold = if status.is_ok() {
            take_hold(&mut fake, Hold::Page(page))
        } else {
            None
        };
        (status, hold)
    };
    wait_if_held(hold).await;
    status.map_err(|(code, headers)| {
        let refused = (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            axum::Json(json!({"error": "injected"})),
        );
        with_headers(headers, refused)
    })
}

fn with_headers(headers: Vec<Header>, answer: impl IntoResponse) -> Response {
    let mut response = answer.into_response();
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name, value.parse().expect("a header value"));
    }
    response
}

fn slice(state: &Shared, from: usize, limit: usize) -> (Vec<Value>, bool) {
    let fake = state.lock().expect("fake CRM state");
    let all: Vec<Value> = fake.contacts.values().cloned().collect();
    let page: Vec<Value> = all.iter().skip(from).take(limit).cloned().collect();
    (page, from + limit < all.len())
}

fn number(query: &HashMap<String, String>, name: &str, default: usize) -> usize {
    query.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn cursor_page(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let from = number(&query, "cursor", 0);
    let limit = number(&query, "limit", 2);
    let answer_headers = match gate(
        &state,
        &headers,
        from / limit.max(1),
        format!("/cursor/contacts?cursor={from}"),
    )
    .await
    {
        Ok(answer_headers) => answer_headers,
        Err(refused) => return refused,
    };
    let (results, more) = slice(&state, from, limit);
    let next = more.then(|| (from + limit).to_string());
    with_headers(
        answer_headers,
        axum::Json(json!({"results": results, "next_cursor": next})),
    )
}

async fn one_contact(
    State(state): State<Shared>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let answer_headers = match gate(&state, &headers, 0, format!("/contacts/{id}")).await {
        Ok(answer_headers) => answer_headers,
        Err(refused) => return refused,
    };
    let gate = state.lock().expect("fake CRM state").contacts_gate.clone();
    if let Some(gate) = gate {
        gate.pass().await;
    }
    let contact = state.lock().expect("fake CRM state").contacts.get(&id).cloned();
    match contact {
        Some(contact) => with_headers(answer_headers, axum::Json(contact)),
        None => with_headers(
            answer_headers,
            (StatusCode::NOT_FOUND, axum::Json(json!({"error": "no such contact"}))),
        ),
    }
}

async fn link_page(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let page = number(&query, "page", 0);
    let limit = number(&query, "limit", 2);
    let answer_headers = match gate(&state, &headers, page, format!("/link/contacts?page={page}")).await {
        Ok(answer_headers) => answer_headers,
        Err(refused) => return refused,
    };
    let (data, more) = slice(&state, page * limit, limit);
    let mut response = with_headers(answer_headers, axum::Json(json!({"data": data})));
    if more {
        let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
        let link = format!(
            "<http://{host}/link/contacts?page={}&limit={limit}>; rel=\"next\"",
            page + 1
        );
        response
            .headers_mut()
            .insert("link", link.parse().expect("a header value"));
    }
    response
}

async fn offset_page(
    State(state): State<Shared>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let offset = number(&query, "offset", 0);
    let limit = number(&query, "limit", 2);
    let answer_headers = match gate(
        &state,
        &headers,
        offset / limit.max(1),
        format!("/offset/contacts?offset={offset}"),
    )
    .await
    {
        Ok(answer_headers) => answer_headers,
        Err(refused) => return refused,
    };
    let (items, _) = slice(&state, offset, limit);
    with_headers(answer_headers, axum::Json(json!({"items": items})))
}

async fn token(State(state): State<Shared>, body: String) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes()).into_owned().collect();
    let (answer, hold) = {
        let mut fake = state.lock().expect("fake CRM state");
        fake.token_requests += 1;
        (rotate(&mut fake, &form), take_hold(&mut fake, Hold::Token))
    };
    // The refresh token is used up whether or not the answer reaches the caller.
    wait_if_held(hold).await;
    answer
}

/// A refresh: the refresh token traded for a new pair, and used up.
fn rotate(fake: &mut Fake, form: &HashMap<String, String>) -> Response {
    let client_ok = form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET);
    let refresh = form.get("refresh_token").cloned().unwrap_or_default();
    if form.get("grant_type").map(String::as_str) != Some("refresh_token")
        || !client_ok
        || fake.refresh_tokens.get(&refresh) != Some(&true)
    {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": "invalid_grant"}))).into_response();
    }
    fake.refreshes += 1;
    fake.issued += 1;
    let (access, next_refresh) = (format!("access-{}", fake.issued), format!("refresh-{}", fake.issued));
    fake.tokens.insert(access.clone(), true);
    fake.refresh_tokens.insert(refresh, false);
    fake.refresh_tokens.insert(next_refresh.clone(), true);
    axum::Json(
        json!({"access_token": access, "refresh_token": next_refresh, "expires_in": 3600, "token_type": "bearer"}),
    )
    .into_response()
}

fn api_key_ok(headers: &HeaderMap) -> bool {
    headers.get("x-api-key").and_then(|v| v.to_str().ok()) == Some(API_KEY)
}

async fn subscribe(State(state): State<Shared>, headers: HeaderMap, axum::Json(body): axum::Json<Value>) -> Response {
    if !api_key_ok(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut fake = state.lock().expect("fake CRM state");
    let id = format!("sub-{}", fake.subscriptions.len() + 1);
    let url = body["url"].as_str().unwrap_or_default().to_string();
    fake.subscriptions.insert(id.clone(), url);
    (StatusCode::CREATED, axum::Json(json!({"id": id}))).into_response()
}

async fn unsubscribe(
    State(state): State<Shared>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if !api_key_ok(&headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match state.lock().expect("fake CRM state").subscriptions.remove(&id) {
        Some(_) => StatusCode::NO_CONTENT.into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
