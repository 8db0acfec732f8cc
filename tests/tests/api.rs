//! The control-plane API over HTTP, against a real store: every route, its error
//! answers, secrets at rest and environment isolation. Run on SQLite and on Postgres.

mod common;

use std::collections::BTreeSet;

use hookyard_core::store::records::{RecordScope, WriteKind};
use hookyard_core::store::Environment;
use hookyard_core::{Config, Store};
use hookyard_testkit::{raw_texts, test_cipher, PgDatabase, SqliteFile};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use common::assert_error;

struct Api {
    base: String,
    url: String,
    store: Store,
    dev: Environment,
    prod: Environment,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(database_url: &str) -> Api {
    let store = Store::connect(database_url, test_cipher()).await.unwrap();
    let dev = store.ensure_environment(&"dev".parse().unwrap()).await.unwrap();
    let prod = store.ensure_environment(&"prod".parse().unwrap()).await.unwrap();
    let mut config = Config::default();
    config.ingest.public_url = Some("https://hooks.example.com/".into());
    let (router, _) = hookyard_api::router(store.clone(), &config).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(hookyard_api::serve(listener, router, shutdown.clone()));
    Api {
        base,
        url: database_url.to_string(),
        store,
        dev,
        prod,
        http: hookyard_core::outbound::http_client().unwrap(),
        shutdown,
    }
}

impl Api {
    /// A request as the `dev` environment.
    fn dev(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.as_env(&self.dev, method, path)
    }

    fn as_env(&self, env: &Environment, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&env.secret_key)
    }

    async fn ok(&self, request: reqwest::RequestBuilder, status: StatusCode) -> Value {
        let response = request.send().await.unwrap();
        let got = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(got, status, "{body}");
        body
    }
}

async fn every_route(database_url: &str) {
    let api = start(database_url).await;
    authentication(&api).await;
    integrations(&api).await;
    connections(&api).await;
    metadata(&api).await;
    records(&api).await;
    isolation(&api).await;
    deletes(&api).await;
    environment_variables(&api).await;
}

/// Replaced as a whole, read back by name, each environment's its own; a bad list
/// changes nothing and says which variable is wrong.
async fn environment_variables(api: &Api) {
    let path = "/environment-variables";
    let empty = api.ok(api.dev(Method::GET, path), StatusCode::OK).await;
    assert_eq!(empty, json!({"data": []}));
    let set = json!({"variables": [{"name": "TEAM_ID", "value": "t-1"}, {"name": "API_TOKEN", "value": "s3cret"}]});
    let answered = api.ok(api.dev(Method::PUT, path).json(&set), StatusCode::OK).await;
    let expected = json!({"data": [{"name": "API_TOKEN", "value": "s3cret"}, {"name": "TEAM_ID", "value": "t-1"}]});
    assert_eq!(answered, expected);
    assert_eq!(api.ok(api.dev(Method::GET, path), StatusCode::OK).await, expected);
    let prod = api.ok(api.as_env(&api.prod, Method::GET, path), StatusCode::OK).await;
    assert_eq!(prod, json!({"data": []}), "another environment's are its own");
    for (bad, problem) in [
        (
            json!({"variables": [{"name": "1ST", "value": "x"}]}),
            "\"1ST\" is not a name",
        ),
        (
            json!({"variables": [{"name": "A-B", "value": "x"}]}),
            "\"A-B\" is not a name",
        ),
        (
            json!({"variables": [{"name": "A", "value": "x"}, {"name": "A", "value": "y"}]}),
            "A is given twice",
        ),
        (
            json!({"variables": [{"name": "A", "value": "x".repeat(40_000)}]}),
            "A: the value is over",
        ),
        (json!({"variables": [{"name": "A"}]}), "value"),
    ] {
        let response = api.dev(Method::PUT, path).json(&bad).send().await.unwrap();
        assert_bad_field(response, problem).await;
    }
    assert_eq!(
        api.ok(api.dev(Method::GET, path), StatusCode::OK).await,
        expected,
        "unchanged"
    );
    let cleared = api
        .ok(
            api.dev(Method::PUT, path).json(&json!({"variables": []})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(cleared, json!({"data": []}));
}

#[tokio::test]
async fn every_route_on_sqlite() {
    let file = SqliteFile::create();
    every_route(&file.url).await;
}

#[tokio::test]
async fn every_route_on_postgres() {
    let db = PgDatabase::create().await;
    every_route(&db.url).await;
}

/// The document's routes, with a placeholder in each path parameter.
async fn documented_routes(api: &Api) -> Vec<(Method, String)> {
    let doc: Value = api
        .http
        .get(format!("{}/openapi.json", api.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{unique_key}", "x").replace("{connection_id}", "x");
        for method in item.as_object().unwrap().keys() {
            routes.push((method.to_uppercase().parse().unwrap(), concrete.clone()));
        }
    }
    routes
}

async fn authentication(api: &Api) {
    let routes = documented_routes(api).await;
    assert!(routes.len() >= 18, "{routes:?}");
    for (method, path) in routes {
        let url = format!("{}{path}", api.base);
        let none = api.http.request(method.clone(), &url).send().await.unwrap();
        assert_error(none, 401, "unauthorized").await;
        let wrong = api
            .http
            .request(method.clone(), &url)
            .bearer_auth("sk_wrong")
            .send()
            .await
            .unwrap();
        assert_error(wrong, 401, "unauthorized").await;
        let scheme = api
            .http
            .request(method, &url)
            .header("authorization", format!("Basic {}", api.dev.secret_key))
            .send()
            .await
            .unwrap();
        assert_error(scheme, 401, "unauthorized").await;
    }
    // The document, health and readiness need no key.
    for path in ["/openapi.json", "/healthz", "/readyz"] {
        let response = api.http.get(format!("{}{path}", api.base)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let unknown = api.dev(Method::GET, "/nowhere").send().await.unwrap();
    assert_error(unknown, 404, "not_found").await;
}

async fn integrations(api: &Api) {
    let created = api
        .ok(
            api.dev(Method::POST, "/integrations").json(&json!({
                "unique_key": "github", "provider": "github", "display_name": "GitHub",
                "webhook_secret": "s3cret", "a_field_from_the_future": [1]
            })),
            StatusCode::OK,
        )
        .await;
    let data = &created["data"];
    assert_eq!(data["unique_key"], "github");
    assert_eq!(data["display_name"], "GitHub");
    assert_eq!(data["has_webhook_secret"], true);
    assert_eq!(data["forward_webhooks"], true);
    assert!(
        data.get("webhook_secret").is_none(),
        "secrets are never returned: {data}"
    );
    assert_eq!(
        data["webhook_url"],
        format!("https://hooks.example.com/webhook/{}/github", api.dev.webhook_id)
    );
    api.ok(
        api.dev(Method::POST, "/integrations")
            .json(&json!({"unique_key": "hubspot", "provider": "hubspot"})),
        StatusCode::OK,
    )
    .await;

    let duplicate = api
        .dev(Method::POST, "/integrations")
        .json(&json!({"unique_key": "github", "provider": "github"}))
        .send()
        .await
        .unwrap();
    assert_error(duplicate, 409, "conflict").await;
    for (body, field) in [
        (json!({"unique_key": "git.hub", "provider": "github"}), "unique_key"),
        (json!({"unique_key": "x"}), "provider"),
        (json!({"unique_key": "x", "provider": ""}), "provider"),
        (json!({"unique_key": 5, "provider": "github"}), "unique_key"),
        (
            json!({"unique_key": "x", "provider": "p", "forward_webhooks": "yes"}),
            "forward_webhooks",
        ),
        // A catalog name written otherwise would be taken for a custom provider.
        (
            json!({"unique_key": "x", "provider": "GitHub"}),
            "provider: \"GitHub\" is not in the catalog; did you mean \"github\"?",
        ),
        (
            json!({"unique_key": "x", "provider": "microsoft_graph"}),
            "did you mean \"microsoft-graph\"?",
        ),
        // A secret nothing would check: every webhook would pass for verified.
        (
            json!({"unique_key": "x", "provider": "gitub", "webhook_secret": "s3cret"}),
            "webhook_secret: provider \"gitub\", which is not in the catalog (did you mean \"github\"?), verifies no signature",
        ),
        (
            json!({"unique_key": "x", "provider": "generic", "webhook_secret": "s3cret"}),
            "webhook_secret: provider \"generic\" verifies no signature",
        ),
    ] {
        let response = api.dev(Method::POST, "/integrations").json(&body).send().await.unwrap();
        assert_bad_field(response, field).await;
    }
    // A custom provider's own name is fine, and so is its secret once it says how the
    // provider signs; taking that away again with the secret kept is refused.
    api.ok(
        api.dev(Method::POST, "/integrations")
            .json(&json!({"unique_key": "plain", "provider": "acme-plain"})),
        StatusCode::OK,
    )
    .await;
    let unchecked = api
        .dev(Method::PATCH, "/integrations/plain")
        .json(&json!({"webhook_secret": "s3cret"}))
        .send()
        .await
        .unwrap();
    assert_bad_field(
        unchecked,
        "webhook_secret: provider \"acme-plain\", which is not in the catalog,",
    )
    .await;
    let signing = json!({"signature": {"algorithm": "hmac-sha256", "header": "X-Plain-Signature"}});
    api.ok(
        api.dev(Method::PATCH, "/integrations/plain")
            .json(&json!({"webhook_secret": "s3cret", "settings": signing})),
        StatusCode::OK,
    )
    .await;
    let unsigned = api
        .dev(Method::PATCH, "/integrations/plain")
        .json(&json!({"settings": {}}))
        .send()
        .await
        .unwrap();
    assert_bad_field(unsigned, "webhook_secret").await;
    api.ok(api.dev(Method::DELETE, "/integrations/plain"), StatusCode::OK)
        .await;
    let not_json = api
        .dev(Method::POST, "/integrations")
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_error(not_json, 400, "invalid_request").await;

    let list = api.ok(api.dev(Method::GET, "/integrations"), StatusCode::OK).await;
    let keys: Vec<_> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["unique_key"].clone())
        .collect();
    assert_eq!(keys, [json!("github"), json!("hubspot")]);

    let got = api
        .ok(api.dev(Method::GET, "/integrations/github"), StatusCode::OK)
        .await;
    assert_eq!(got["data"], created["data"]);
    assert_error(
        api.dev(Method::GET, "/integrations/nope").send().await.unwrap(),
        404,
        "not_found",
    )
    .await;

    let patched = api
        .ok(
            api.dev(Method::PATCH, "/integrations/github")
                .json(&json!({"display_name": null, "forward_webhooks": false, "unknown": 1})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(patched["data"]["display_name"], Value::Null);
    assert_eq!(patched["data"]["forward_webhooks"], false);
    assert_eq!(
        patched["data"]["has_webhook_secret"], true,
        "an absent field is left alone"
    );
    let cleared = api
        .ok(
            api.dev(Method::PATCH, "/integrations/github")
                .json(&json!({"webhook_secret": null})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(cleared["data"]["has_webhook_secret"], false);
    // A custom integration declares its signature and routing in settings, checked now.
    let custom = json!({
        "signature": {"algorithm": "hmac-sha256", "header": "X-Acme-Signature", "prefix": "sha256="},
        "routing": {"by": "value", "source": ["body:account"], "match": "connection_config.account"}
    });
    let made = api
        .ok(
            api.dev(Method::POST, "/integrations")
                .json(&json!({"unique_key": "acme", "provider": "acme-crm", "settings": custom})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(made["data"]["settings"], custom);
    for settings in [
        json!({"routing": {"by": "value"}}),
        json!({"signature": {"algorithm": "md5"}}),
        json!([1]),
    ] {
        let bad = api
            .dev(Method::PATCH, "/integrations/acme")
            .json(&json!({"settings": settings}))
            .send()
            .await
            .unwrap();
        assert_bad_field(bad, "settings").await;
    }
    let cleared = api
        .ok(
            api.dev(Method::PATCH, "/integrations/acme")
                .json(&json!({"settings": {}})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(cleared["data"]["settings"], json!({}));
    // The OAuth2 client secret exec refreshes tokens with is sealed, never returned, and
    // refused in settings (which are not sealed).
    let api_settings = json!({"api": {"base_url": "https://api.acme.test", "token_url": "https://acme.test/token", "client_id": "acme-app"}});
    let with_secret = api
        .ok(
            api.dev(Method::PATCH, "/integrations/acme")
                .json(&json!({"settings": api_settings, "oauth_client_secret": "client-s3cret"})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(with_secret["data"]["has_oauth_client_secret"], true);
    assert!(!with_secret.to_string().contains("client-s3cret"), "{with_secret}");
    let stored = raw_texts(
        &api.url,
        "SELECT oauth_client_secret FROM integrations WHERE unique_key = 'acme'",
    )
    .await;
    assert!(
        stored[0].starts_with("v1:") && !stored[0].contains("client-s3cret"),
        "{stored:?}"
    );
    let integration = api
        .store
        .integration(api.dev.id, &"acme".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(integration.oauth_client_secret.as_deref(), Some("client-s3cret"));
    let in_settings = api
        .dev(Method::PATCH, "/integrations/acme")
        .json(&json!({"settings": {"api": {"client_secret": "plain"}}}))
        .send()
        .await
        .unwrap();
    let body: Value = in_settings.json().await.unwrap();
    assert!(
        body.to_string().contains("oauth_client_secret"),
        "the error says where it goes: {body}"
    );
    let bad_api = api
        .dev(Method::PATCH, "/integrations/acme")
        .json(&json!({"settings": {"api": {"base_url": 7}}}))
        .send()
        .await
        .unwrap();
    assert_bad_field(bad_api, "settings").await;
    let cleared = api
        .ok(
            api.dev(Method::PATCH, "/integrations/acme")
                .json(&json!({"oauth_client_secret": null})),
            StatusCode::OK,
        )
        .await;
    assert_eq!(cleared["data"]["has_oauth_client_secret"], false);
    api.ok(api.dev(Method::DELETE, "/integrations/acme"), StatusCode::OK)
        .await;

    let rename = api
        .dev(Method::PATCH, "/integrations/github")
        .json(&json!({"unique_key": "gh"}))
        .send()
        .await
        .unwrap();
    assert_bad_field(rename, "unique_key").await;
    let missing = api
        .dev(Method::PATCH, "/integrations/nope")
        .json(&json!({"provider": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(missing, 404, "not_found").await;
}

async fn assert_bad_field(response: reqwest::Response, field: &str) {
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(field), "{field} not named in {message:?}");
}

async fn connections(api: &Api) {
    let created = api
        .ok(
            api.dev(Method::POST, "/connections").json(&json!({
                "provider_config_key": "github",
                "connection_id": "acme",
                "connection_config": {"installation_id": 42},
                "metadata": {"plan": "pro"},
                "credentials": {"type": "API_KEY", "apiKey": "key_live_123"},
                "tags": {"team": "core"},
            })),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(created["connection_id"], "acme");
    assert_eq!(created["provider"], "github");
    assert_eq!(created["connection_config"], json!({"installation_id": 42}));
    assert!(created.get("credentials").is_none(), "{created}");
    let generated = api
        .ok(
            api.dev(Method::POST, "/connection")
                .json(&json!({"provider_config_key": "hubspot"})),
            StatusCode::CREATED,
        )
        .await;
    assert_eq!(
        generated["connection_id"].as_str().unwrap().len(),
        36,
        "a UUID when none is given"
    );
    for id in ["beta-1", "beta-2"] {
        api.ok(
            api.dev(Method::POST, "/connections")
                .json(&json!({"provider_config_key": "github", "connection_id": id})),
            StatusCode::CREATED,
        )
        .await;
    }

    // The credentials are sealed at rest.
    let raw = raw_texts(
        &api.url,
        "SELECT credentials FROM connections WHERE credentials IS NOT NULL",
    )
    .await;
    assert_eq!(raw.len(), 1);
    assert!(
        raw[0].starts_with("v1:") && !raw[0].contains("key_live_123"),
        "{}",
        raw[0]
    );

    let unknown = api
        .dev(Method::POST, "/connections")
        .json(&json!({"provider_config_key": "nope"}))
        .send()
        .await
        .unwrap();
    assert_error(unknown, 404, "not_found").await;
    for (body, field) in [
        (json!({"connection_id": "x"}), "provider_config_key"),
        (
            json!({"provider_config_key": "github", "connection_config": [1]}),
            "connection_config",
        ),
        (json!({"provider_config_key": "github", "metadata": "x"}), "metadata"),
        (json!({"provider_config_key": "github", "tags": {"a": 1}}), "tags.a"),
        (
            json!({"provider_config_key": "github", "connection_id": ""}),
            "connection_id",
        ),
        (
            json!({"provider_config_key": "github", "credentials": {"type": "MAGIC"}}),
            "credentials",
        ),
        (
            json!({"provider_config_key": "github", "credentials": {"type": "BASIC"}}),
            "credentials",
        ),
        (
            json!({"provider_config_key": "github",
                   "credentials": {"type": "OAUTH2", "access_token": "t", "expires_at": "soon"}}),
            "credentials.expires_at: \"soon\" is not an RFC 3339 time",
        ),
    ] {
        let response = api.dev(Method::POST, "/connections").json(&body).send().await.unwrap();
        assert_bad_field(response, field).await;
    }

    let ids = |body: &Value| -> Vec<String> {
        body["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["connection_id"].as_str().unwrap().to_string())
            .collect()
    };
    let all = api.ok(api.dev(Method::GET, "/connections"), StatusCode::OK).await;
    assert_eq!(all["connections"].as_array().unwrap().len(), 4);
    assert!(
        all["connections"][0].get("credentials").is_none(),
        "lists carry no credentials"
    );
    let of_github = api
        .ok(
            api.dev(Method::GET, "/connections?integrationId=github"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(ids(&of_github), ["acme", "beta-1", "beta-2"]);
    let searched = api
        .ok(api.dev(Method::GET, "/connections?search=BETA&limit=1"), StatusCode::OK)
        .await;
    assert_eq!(ids(&searched), ["beta-1"]);
    assert_eq!(searched["next_page"], 1);
    let second = api
        .ok(
            api.dev(Method::GET, "/connections?search=beta&limit=1&page=1"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(ids(&second), ["beta-2"]);
    assert_eq!(second["next_page"], Value::Null);
    let by_id = api
        .ok(api.dev(Method::GET, "/connections?connectionId=acme"), StatusCode::OK)
        .await;
    assert_eq!(ids(&by_id), ["acme"]);
    assert_bad_field(
        api.dev(Method::GET, "/connections?limit=0").send().await.unwrap(),
        "limit",
    )
    .await;
    assert_bad_field(
        api.dev(Method::GET, "/connections?page=-1").send().await.unwrap(),
        "page",
    )
    .await;

    let one = api
        .ok(
            api.dev(Method::GET, "/connections/acme?provider_config_key=github"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(one["credentials"], json!({"type": "API_KEY", "apiKey": "key_live_123"}));
    assert_eq!(one["tags"], json!({"team": "core"}));
    let singular = api
        .ok(
            api.dev(Method::GET, "/connection/acme?provider_config_key=github"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(singular, one);

    // An id that exists: the fields given replace the stored ones (Nango's import is an
    // upsert); routing's identifiers and the tags, not given, stay.
    let changed = api
        .ok(
            api.dev(Method::POST, "/connections").json(&json!({
                "provider_config_key": "github",
                "connection_id": "acme",
                "metadata": {"plan": "team"},
                "credentials": {"type": "OAUTH2", "access_token": "tok_new", "refresh_token": "rt_new"},
            })),
            StatusCode::OK,
        )
        .await;
    assert_eq!(
        (&changed["id"], &changed["created_at"]),
        (&created["id"], &created["created_at"]),
        "the same connection"
    );
    assert_eq!(changed["connection_config"], json!({"installation_id": 42}));
    assert_eq!(changed["metadata"], json!({"plan": "team"}));
    assert_eq!(changed["tags"], json!({"team": "core"}));
    let read = api
        .ok(
            api.dev(Method::GET, "/connections/acme?provider_config_key=github"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(read["credentials"]["access_token"], "tok_new", "{read}");
    assert_eq!(read["errors"], json!([]));
    assert_bad_field(
        api.dev(Method::GET, "/connections/acme").send().await.unwrap(),
        "provider_config_key",
    )
    .await;
    let missing = api
        .dev(Method::GET, "/connections/ghost?provider_config_key=github")
        .send()
        .await
        .unwrap();
    assert_error(missing, 404, "not_found").await;
}

async fn metadata(api: &Api) {
    let get_metadata = |id: &'static str| async move {
        api.ok(
            api.dev(Method::GET, &format!("/connections/{id}?provider_config_key=github")),
            StatusCode::OK,
        )
        .await["metadata"]
            .clone()
    };
    let replaced = api
        .ok(
            api.dev(Method::POST, "/connections/metadata").json(&json!({
                "connection_id": "acme", "provider_config_key": "github", "metadata": {"region": "eu"}
            })),
            StatusCode::OK,
        )
        .await;
    assert_eq!(replaced["metadata"], json!({"region": "eu"}));
    assert_eq!(
        get_metadata("acme").await,
        json!({"region": "eu"}),
        "replaced, plan is gone"
    );
    api.ok(
        api.dev(Method::PATCH, "/connection/metadata").json(&json!({
            "connection_id": ["acme", "beta-1"], "provider_config_key": "github", "metadata": {"seats": 5}
        })),
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        get_metadata("acme").await,
        json!({"region": "eu", "seats": 5}),
        "merged"
    );
    assert_eq!(get_metadata("beta-1").await, json!({"seats": 5}));

    let with_unknown = api
        .dev(Method::PATCH, "/connections/metadata")
        .json(&json!({"connection_id": ["beta-2", "ghost"], "provider_config_key": "github", "metadata": {"x": 1}}))
        .send()
        .await
        .unwrap();
    assert_error(with_unknown, 404, "not_found").await;
    assert_eq!(get_metadata("beta-2").await, json!({}), "all or nothing");
    for (body, field) in [
        (
            json!({"connection_id": "acme", "provider_config_key": "github", "metadata": [1]}),
            "metadata",
        ),
        (
            json!({"connection_id": [], "provider_config_key": "github", "metadata": {}}),
            "connection_id",
        ),
        (json!({"connection_id": "acme", "metadata": {}}), "provider_config_key"),
    ] {
        let response = api
            .dev(Method::POST, "/connections/metadata")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_bad_field(response, field).await;
    }
}

async fn records(api: &Api) {
    let scope = RecordScope {
        environment_id: api.dev.id,
        integration: "github".parse().unwrap(),
        connection_id: "acme".into(),
        model: "Issue".into(),
    };
    let items: Vec<(String, Value)> = (1..=5)
        .map(|i| {
            (
                i.to_string(),
                json!({"id": i.to_string(), "title": format!("issue {i}")}),
            )
        })
        .collect();
    api.store
        .write_records(&scope, WriteKind::Save, items, 10, None)
        .await
        .unwrap();
    api.store
        .write_records(
            &scope,
            WriteKind::Delete,
            vec![("2".into(), json!({"id": "2"}))],
            11,
            None,
        )
        .await
        .unwrap();
    api.store
        .write_records(
            &scope,
            WriteKind::Update,
            vec![("3".into(), json!({"state": "closed"}))],
            12,
            None,
        )
        .await
        .unwrap();

    let records_request = |query: &str| {
        api.dev(Method::GET, &format!("/records{query}"))
            .header("Connection-Id", "acme")
            .header("Provider-Config-Key", "github")
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(c) => format!("?model=Issue&limit=2&cursor={c}"),
            None => "?model=Issue&limit=2".to_string(),
        };
        let page = api.ok(records_request(&query), StatusCode::OK).await;
        for record in page["records"].as_array().unwrap() {
            seen.push(record["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["1", "4", "5", "2", "3"],
        "in the order they last changed, none skipped or repeated"
    );

    let page = api
        .ok(records_request("/?model=Issue&filter=DELETED,updated"), StatusCode::OK)
        .await;
    let list = page["records"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let deleted = &list[0];
    assert_eq!(deleted["title"], "issue 2", "a tombstone keeps the last payload");
    assert_eq!(deleted["_nango_metadata"]["last_action"], "DELETED");
    assert!(deleted["_nango_metadata"]["deleted_at"].is_string());
    let updated = &list[1];
    assert_eq!(updated["state"], "closed");
    assert_eq!(updated["_nango_metadata"]["last_action"], "UPDATED");
    for key in ["first_seen_at", "last_modified_at", "cursor"] {
        assert!(updated["_nango_metadata"][key].is_string(), "{key}: {updated}");
    }
    let by_ids = api
        .ok(records_request("?model=Issue&ids=1&ids=5"), StatusCode::OK)
        .await;
    let got: BTreeSet<_> = by_ids["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].to_string())
        .collect();
    assert_eq!(got, BTreeSet::from(["\"1\"".to_string(), "\"5\"".to_string()]));
    let other_model = api.ok(records_request("?model=Nothing"), StatusCode::OK).await;
    assert_eq!(other_model, json!({"records": [], "next_cursor": null}));

    for (query, field) in [
        ("?limit=5", "model"),
        ("?model=Issue&cursor=garbage", "cursor"),
        ("?model=Issue&limit=10001", "limit"),
        ("?model=Issue&filter=removed", "filter"),
        ("?model=Issue&modified_after=yesterday", "modified_after"),
    ] {
        assert_bad_field(records_request(query).send().await.unwrap(), field).await;
    }
    let no_header = api
        .dev(Method::GET, "/records?model=Issue")
        .header("Provider-Config-Key", "github");
    assert_bad_field(no_header.send().await.unwrap(), "Connection-Id").await;
    let unknown = api
        .dev(Method::GET, "/records?model=Issue")
        .header("Connection-Id", "ghost")
        .header("Provider-Config-Key", "github")
        .send()
        .await
        .unwrap();
    assert_error(unknown, 404, "not_found").await;
}

/// `prod` holds the same integration and connection ids as `dev`, and sees none of dev's.
async fn isolation(api: &Api) {
    let prod = |method: Method, path: &str| api.as_env(&api.prod, method, path);
    let empty = api.ok(prod(Method::GET, "/integrations"), StatusCode::OK).await;
    assert_eq!(empty["data"], json!([]));
    assert_error(
        prod(Method::GET, "/integrations/github").send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    api.ok(
        prod(Method::POST, "/integrations").json(&json!({"unique_key": "github", "provider": "github"})),
        StatusCode::OK,
    )
    .await;
    let none = api.ok(prod(Method::GET, "/connections"), StatusCode::OK).await;
    assert_eq!(none["connections"], json!([]));
    let theirs = prod(Method::GET, "/connections/acme?provider_config_key=github")
        .send()
        .await
        .unwrap();
    assert_error(theirs, 404, "not_found").await;
    let write = prod(Method::POST, "/connections/metadata")
        .json(&json!({"connection_id": "acme", "provider_config_key": "github", "metadata": {"stolen": true}}))
        .send()
        .await
        .unwrap();
    assert_error(write, 404, "not_found").await;
    let records = prod(Method::GET, "/records?model=Issue")
        .header("Connection-Id", "acme")
        .header("Provider-Config-Key", "github")
        .send()
        .await
        .unwrap();
    assert_error(records, 404, "not_found").await;
    // prod's own connection of the same id is a different one, with no records.
    api.ok(
        prod(Method::POST, "/connections").json(&json!({"provider_config_key": "github", "connection_id": "acme"})),
        StatusCode::CREATED,
    )
    .await;
    let own = prod(Method::GET, "/records?model=Issue")
        .header("Connection-Id", "acme")
        .header("Provider-Config-Key", "github");
    assert_eq!(api.ok(own, StatusCode::OK).await["records"], json!([]));
    let dev_meta = api
        .ok(
            api.dev(Method::GET, "/connections/acme?provider_config_key=github"),
            StatusCode::OK,
        )
        .await;
    assert!(dev_meta["metadata"].get("stolen").is_none());
}

async fn deletes(api: &Api) {
    let no_key = api.dev(Method::DELETE, "/connections/acme").send().await.unwrap();
    assert_bad_field(no_key, "provider_config_key").await;
    let done = api
        .ok(
            api.dev(Method::DELETE, "/connections/acme?provider_config_key=github"),
            StatusCode::OK,
        )
        .await;
    assert_eq!(done, json!({"success": true}));
    let again = api
        .dev(Method::DELETE, "/connection/acme?provider_config_key=github")
        .send()
        .await
        .unwrap();
    assert_error(again, 404, "not_found").await;
    let gone = api
        .dev(Method::GET, "/connections/acme?provider_config_key=github")
        .send()
        .await
        .unwrap();
    assert_error(gone, 404, "not_found").await;
    let listed = api
        .ok(
            api.dev(Method::GET, "/connections?integrationId=github"),
            StatusCode::OK,
        )
        .await;
    assert!(!listed.to_string().contains("\"acme\""), "{listed}");

    let done = api
        .ok(api.dev(Method::DELETE, "/integrations/hubspot"), StatusCode::OK)
        .await;
    assert_eq!(done, json!({"success": true}));
    assert_error(
        api.dev(Method::DELETE, "/integrations/hubspot").send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn openapi_document_is_valid_and_lists_every_route() {
    let file = SqliteFile::create();
    let api = start(&file.url).await;
    let text = api
        .http
        .get(format!("{}/openapi.json", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let spec = oas3::from_json(&text).expect("a valid OpenAPI 3.1 document");
    assert!(spec.openapi.starts_with("3."), "{}", spec.openapi);
    let doc: Value = serde_json::from_str(&text).unwrap();
    let mut listed = BTreeSet::new();
    let mut operation_ids = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            listed.insert(format!("{} {path}", method.to_uppercase()));
            let id = operation["operationId"].as_str().expect("an operationId").to_string();
            assert!(operation_ids.insert(id.clone()), "operationId {id} repeats");
        }
    }
    let expected: BTreeSet<String> = [
        "GET /integrations",
        "POST /integrations",
        "GET /integrations/{unique_key}",
        "PATCH /integrations/{unique_key}",
        "DELETE /integrations/{unique_key}",
        "GET /connections",
        "POST /connections",
        "GET /connections/{connection_id}",
        "DELETE /connections/{connection_id}",
        "POST /connections/metadata",
        "PATCH /connections/metadata",
        "GET /connection",
        "POST /connection",
        "GET /connection/{connection_id}",
        "DELETE /connection/{connection_id}",
        "POST /connection/metadata",
        "PATCH /connection/metadata",
        "GET /records",
        "GET /functions",
        "POST /functions/deploy",
        "GET /forwarding",
        "PUT /forwarding",
        "GET /connections/{connection_id}/forwarding",
        "PUT /connections/{connection_id}/forwarding",
        "GET /connection/{connection_id}/forwarding",
        "PUT /connection/{connection_id}/forwarding",
        "GET /environment-variables",
        "PUT /environment-variables",
        "POST /sync/trigger",
        "POST /sync/pause",
        "POST /sync/start",
        "GET /sync/status",
        "GET /dead-letters",
        "DELETE /dead-letters",
        "GET /dead-letters/{id}",
        "DELETE /dead-letters/{id}",
        "POST /dead-letters/redrive",
        "POST /replay",
        "GET /replay",
        "GET /replay/{id}",
        "POST /replay/{id}/cancel",
        "GET /logs",
        "GET /logs/{id}",
        "GET /logs/actions",
        "POST /action/trigger",
        "GET /action/{id}",
        "GET /action/runs",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(listed, expected);
    // Every schema reference resolves.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = reference.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling reference to {name}");
    }
    assert_eq!(doc["components"]["securitySchemes"]["secret_key"]["scheme"], "bearer");
}

#[tokio::test]
async fn postgres_down_is_a_503_with_retry_after() {
    let db = PgDatabase::create().await;
    let api = start(&db.url).await;
    api.ok(api.dev(Method::GET, "/integrations"), StatusCode::OK).await;
    db.drop_now().await;
    let response = api.dev(Method::GET, "/integrations").send().await.unwrap();
    assert_error(response, 503, "unavailable").await;
    let ready = api.http.get(format!("{}/readyz", api.base)).send().await.unwrap();
    assert_error(ready, 503, "unavailable").await;
}
