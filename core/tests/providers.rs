//! The provider catalog against the providers' own published test vectors, and round
//! trips over each provider's sample payloads: a good signature passes; a tampered body,
//! a wrong secret and an old timestamp fail; handshakes are answered byte for byte;
//! batches split and route as the provider documents.

use chrono::{DateTime, Utc};
use hookyard_core::providers::events::events;
use hookyard_core::providers::handshake::{answer, HandshakeRefused};
use hookyard_core::providers::signature::{sign, HeaderFormat, SignatureSpec, TimeUnit, VerifyError};
use hookyard_core::providers::{Catalog, Inbound, Provider, Route, RoutingTarget};
use serde_json::{json, Value};

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../providers/samples");

fn sample(path: &str) -> Vec<u8> {
    std::fs::read(format!("{SAMPLES}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn provider(name: &str) -> Provider {
    let catalog = Catalog::embedded().unwrap();
    (**catalog.get(name).unwrap_or_else(|| panic!("no provider {name}"))).clone()
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_lowercase(), v.to_string())).collect()
}

fn at(seconds: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(seconds, 0).unwrap()
}

fn spec(name: &str) -> SignatureSpec {
    provider(name).signature.expect("signs")
}

// ---- published vectors ----

#[test]
fn github_docs_vector() {
    let h = headers(&[(
        "X-Hub-Signature-256",
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
    )]);
    let request = Inbound::new("POST", None, &h, None, b"Hello, World!");
    spec("github")
        .verify(&request, "It's a Secret to Everybody", &[], Utc::now())
        .unwrap();
    let wrong = spec("github").verify(&request, "It's a Secret to Nobody", &[], Utc::now());
    assert_eq!(wrong, Err(VerifyError::Mismatch));
}

#[test]
fn slack_docs_vector() {
    let body = sample("slack/slash_command.form-urlencoded.txt");
    let h = headers(&[
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-Slack-Request-Timestamp", "1531420618"),
        (
            "X-Slack-Signature",
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
        ),
    ]);
    let request = Inbound::new("POST", None, &h, None, &body);
    let secret = "8f742231b10e8888abcd99yyyzzz85a5";
    spec("slack")
        .verify(&request, secret, &[], at(1531420618 + 30))
        .unwrap();
    let stale = spec("slack").verify(&request, secret, &[], at(1531420618 + 3600));
    assert!(matches!(stale, Err(VerifyError::Stale(_))), "{stale:?}");
    // A slash command routes by its form field team_id.
    let found = events(&provider("slack"), &request);
    assert_eq!(
        found[0].route,
        Route::Values(
            RoutingTarget::ConnectionConfig("team_id".into()),
            vec!["T1DC2JH3J".into()]
        )
    );
    assert_eq!(found[0].event_type.as_deref(), Some("/webhook-collect"));
}

#[test]
fn standard_webhooks_library_vector() {
    let body = sample("standard-webhooks/test.payload.txt");
    let h = headers(&[
        ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
        ("webhook-timestamp", "1614265330"),
        (
            "webhook-signature",
            "v1,bm9ldHZhbGlk v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
    ]);
    let request = Inbound::new("POST", None, &h, None, &body);
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    // Two signatures in the header (rotation): the second matches.
    spec("standard-webhooks")
        .verify(&request, secret, &[], at(1614265330))
        .unwrap();
}

#[test]
fn hubspot_docs_v1_vector_and_v3_round_trip() {
    let body = sample("hubspot/batch.contact.creation.json");
    let v1: SignatureSpec =
        toml::from_str("algorithm = \"sha256\"\nheader = \"X-HubSpot-Signature\"\nsigned = \"{secret}{body}\"\n")
            .unwrap();
    let h = headers(&[(
        "X-HubSpot-Signature",
        "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de",
    )]);
    let request = Inbound::new("POST", None, &h, None, &body);
    v1.verify(&request, "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy", &[], Utc::now())
        .unwrap();
}

#[test]
fn twilio_docs_vector() {
    let body = sample("twilio/voice.gather.form-urlencoded.txt");
    let h = headers(&[
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("X-Twilio-Signature", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
    ]);
    let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
    let request = Inbound::new("POST", Some(url), &h, None, &body);
    spec("twilio").verify(&request, "12345", &[], Utc::now()).unwrap();
    let elsewhere = Inbound::new("POST", Some("https://mycompany.com/other"), &h, None, &body);
    assert_eq!(
        spec("twilio").verify(&elsewhere, "12345", &[], Utc::now()),
        Err(VerifyError::Mismatch)
    );
    let no_url = Inbound::new("POST", None, &h, None, &body);
    assert_eq!(
        spec("twilio").verify(&no_url, "12345", &[], Utc::now()),
        Err(VerifyError::NoUrl)
    );
}

#[test]
fn zoom_handshake_docs_example() {
    let body = sample("zoom/endpoint.url_validation.json");
    let h = headers(&[("Content-Type", "application/json")]);
    let request = Inbound::new("POST", None, &h, None, &body);
    let zoom = provider("zoom");
    let reply = answer(&zoom.handshakes, &request, Some("zoom-secret"), &json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        String::from_utf8(reply.body).unwrap(),
        r#"{"encryptedToken":"b17f0320a1322a509340a1a835b3d9edbc491f0b0790ed2d20d0604d39dfe922","plainToken":"qgg8vlvZRS6UYooatFL8Aw"}"#
    );
    let refused = answer(&zoom.handshakes, &request, None, &json!({})).unwrap();
    assert_eq!(refused, Err(HandshakeRefused::NoSecret));
}

// ---- round trips over the sample payloads ----

struct Case {
    provider: &'static str,
    sample: &'static str,
    content_type: &'static str,
}

const CASES: &[Case] = &[
    Case {
        provider: "github",
        sample: "github/installation.created.json",
        content_type: "application/json",
    },
    Case {
        provider: "slack",
        sample: "slack/event_callback.app_mention.json",
        content_type: "application/json",
    },
    Case {
        provider: "stripe",
        sample: "stripe/event.connect.ILLUSTRATIVE.json",
        content_type: "application/json",
    },
    Case {
        provider: "hubspot",
        sample: "hubspot/batch.contact.creation.json",
        content_type: "application/json",
    },
    Case {
        provider: "shopify",
        sample: "shopify/products.update.json",
        content_type: "application/json",
    },
    Case {
        provider: "linear",
        sample: "linear/comment.create.json",
        content_type: "application/json",
    },
    Case {
        provider: "zoom",
        sample: "zoom/meeting.started.json",
        content_type: "application/json",
    },
    Case {
        provider: "intercom",
        sample: "intercom/company.created.json",
        content_type: "application/json",
    },
    Case {
        provider: "jira",
        sample: "jira/issue_created.ILLUSTRATIVE.json",
        content_type: "application/json",
    },
    Case {
        provider: "zendesk",
        sample: "zendesk/user.group_membership_created.zendesk-go-fixture.json",
        content_type: "application/json",
    },
    Case {
        provider: "calendly",
        sample: "calendly/invitee.created.json",
        content_type: "application/json",
    },
    Case {
        provider: "attio",
        sample: "attio/record.updated.json",
        content_type: "application/json",
    },
    Case {
        provider: "airtable",
        sample: "airtable/notification.ping.json",
        content_type: "application/json",
    },
    Case {
        provider: "twilio",
        sample: "twilio/voice.gather.form-urlencoded.txt",
        content_type: "application/x-www-form-urlencoded",
    },
    Case {
        provider: "asana",
        sample: "github/ping.with-app_id.json",
        content_type: "application/json",
    },
    Case {
        provider: "meta",
        sample: "github/ping.with-app_id.json",
        content_type: "application/json",
    },
    Case {
        provider: "standard-webhooks",
        sample: "standard-webhooks/test.payload.txt",
        content_type: "application/json",
    },
    Case {
        provider: "generic-hmac",
        sample: "github/ping.with-app_id.json",
        content_type: "application/json",
    },
    Case {
        provider: "quickbooks",
        sample: "quickbooks/account.created.cloudevents.json",
        content_type: "application/json",
    },
    Case {
        provider: "notion",
        sample: "notion/page.created.ILLUSTRATIVE.json",
        content_type: "application/json",
    },
    Case {
        provider: "dropbox",
        sample: "dropbox/list_folder.json",
        content_type: "application/json",
    },
];

const NOW: i64 = 1_700_000_000;
const URL: &str = "https://hooks.example.com/webhook/0b7c/x?connection_id=c1";

/// The timestamp text the scheme expects at `seconds`, and the headers carrying it.
fn timestamp_text(spec: &SignatureSpec, seconds: i64) -> String {
    match spec.timestamp.as_ref().map(|t| t.unit) {
        Some(TimeUnit::Milliseconds) => (seconds * 1000).to_string(),
        Some(TimeUnit::Rfc3339) => at(seconds).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        _ => seconds.to_string(),
    }
}

/// A request to `case`'s provider signed with `secret` at `NOW` (or at the body's own
/// timestamp, for schemes that sign one inside the body); returns it with its clock.
fn signed_request(case: &Case, secret: &str, body: &[u8]) -> (Vec<(String, String)>, i64) {
    let spec = spec(case.provider);
    let mut h = headers(&[("Content-Type", case.content_type), ("webhook-id", "msg_1")]);
    let mut now = NOW;
    let timestamp = match &spec.timestamp {
        Some(ts) if ts.from.starts_with("body:") => {
            let json: Value = serde_json::from_slice(body).unwrap();
            let ms = json[ts.from.trim_start_matches("body:")]
                .as_i64()
                .expect("a body timestamp");
            now = ms / 1000;
            Some(ms.to_string())
        }
        Some(ts) => {
            let text = timestamp_text(&spec, NOW);
            if let Some(name) = ts.from.strip_prefix("header:") {
                h.push((name.to_lowercase(), text.clone()));
            }
            Some(text)
        }
        None => None,
    };
    let request = Inbound::new("POST", Some(URL), &h, None, body);
    let signature = sign(&spec, &request, secret, timestamp.as_deref()).unwrap();
    let value = match spec.format {
        HeaderFormat::Plain => format!("{}{signature}", spec.prefix),
        HeaderFormat::Keyed => format!("t={},{}={signature}", timestamp.unwrap(), spec.keyed_signature),
    };
    h.push((spec.header.to_lowercase(), value));
    (h, now)
}

#[test]
fn every_signing_provider_round_trips_and_rejects_tampering() {
    let secret = "c2VjcmV0LWtleS1mb3ItdGVzdHM="; // base64, so it also suits Airtable
    for case in CASES {
        let body = sample(case.sample);
        let spec = spec(case.provider);
        let key = if case.provider == "standard-webhooks" {
            format!("whsec_{secret}")
        } else {
            secret.to_string()
        };
        let (h, now) = signed_request(case, &key, &body);
        let good = Inbound::new("POST", Some(URL), &h, None, &body);
        spec.verify(&good, &key, &[], at(now))
            .unwrap_or_else(|e| panic!("{}: {e}", case.provider));

        let mut tampered_body = body.clone();
        tampered_body.extend_from_slice(b" ");
        let tampered = Inbound::new("POST", Some(URL), &h, None, &tampered_body);
        let err = spec.verify(&tampered, &key, &[], at(now));
        assert_eq!(err, Err(VerifyError::Mismatch), "{}: tampered body", case.provider);

        let wrong_key = if case.provider == "standard-webhooks" {
            "whsec_b3RoZXI="
        } else {
            "b3RoZXI="
        };
        assert_eq!(
            spec.verify(&good, wrong_key, &[], at(now)),
            Err(VerifyError::Mismatch),
            "{}: wrong secret",
            case.provider
        );

        if let Some(ts) = &spec.timestamp {
            let later = now + ts.tolerance.as_secs() as i64 + 60;
            let stale = spec.verify(&good, &key, &[], at(later));
            assert!(
                matches!(stale, Err(VerifyError::Stale(_))),
                "{}: {stale:?}",
                case.provider
            );
        }
        let unsigned: Vec<_> = h
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case(&spec.header))
            .cloned()
            .collect();
        let missing = Inbound::new("POST", Some(URL), &unsigned, None, &body);
        assert!(
            matches!(spec.verify(&missing, &key, &[], at(now)), Err(VerifyError::Missing(_))),
            "{}",
            case.provider
        );
    }
}

#[test]
fn gitlab_compares_its_token_and_graph_its_client_state() {
    let h = headers(&[("X-Gitlab-Token", "t0ken")]);
    let request = Inbound::new("POST", None, &h, Some("connection_id=acme"), b"{}");
    spec("gitlab").verify(&request, "t0ken", &[], Utc::now()).unwrap();
    assert_eq!(
        spec("gitlab").verify(&request, "t0ken2", &[], Utc::now()),
        Err(VerifyError::Mismatch)
    );

    let body = sample("msgraph/change_notification.json");
    let json: Value = serde_json::from_slice(&body).unwrap();
    let state = json["value"][0]["clientState"].as_str().unwrap().to_string();
    let none: Vec<(String, String)> = vec![];
    let request = Inbound::new("POST", None, &none, None, &body);
    let elements: Vec<&Value> = json["value"].as_array().unwrap().iter().collect();
    spec("microsoft-graph")
        .verify(&request, &state, &elements, Utc::now())
        .unwrap();
    assert_eq!(
        spec("microsoft-graph").verify(&request, "other", &elements, Utc::now()),
        Err(VerifyError::Mismatch)
    );
}

// ---- handshakes ----

#[test]
fn handshakes_are_answered_byte_exactly() {
    let json_headers = headers(&[("Content-Type", "application/json")]);
    let slack_body = sample("slack/url_verification.json");
    let request = Inbound::new("POST", None, &json_headers, None, &slack_body);
    let reply = answer(&provider("slack").handshakes, &request, None, &json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(reply.body, b"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P");
    assert_eq!(reply.content_type.as_deref(), Some("text/plain"));

    let none: Vec<(String, String)> = vec![];
    let graph = Inbound::new(
        "POST",
        None,
        &none,
        Some("validationToken=Validation%3A%20Testing%20client%20application"),
        b"",
    );
    let reply = answer(&provider("microsoft-graph").handshakes, &graph, None, &json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(reply.body, b"Validation: Testing client application");

    let head = Inbound::new("HEAD", None, &none, None, b"");
    let reply = answer(&provider("intercom").handshakes, &head, None, &json!({}))
        .unwrap()
        .unwrap();
    assert_eq!((reply.status, reply.body.len()), (200, 0));

    let asana_headers = headers(&[(
        "X-Hook-Secret",
        "b537207f20cbfa02357cf448134da559e8bd39d61597dcd5631b8012eae53e81",
    )]);
    let asana = Inbound::new("POST", None, &asana_headers, None, b"");
    let reply = answer(&provider("asana").handshakes, &asana, None, &json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(
        reply.headers,
        vec![(
            "X-Hook-Secret".to_string(),
            "b537207f20cbfa02357cf448134da559e8bd39d61597dcd5631b8012eae53e81".to_string()
        )]
    );

    let meta = provider("meta");
    let query = "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=meatyhamhock";
    let get = Inbound::new("GET", None, &none, Some(query), b"");
    let reply = answer(&meta.handshakes, &get, None, &json!({"verify_token": "meatyhamhock"}))
        .unwrap()
        .unwrap();
    assert_eq!(reply.body, b"1158201444");
    let refused = answer(&meta.handshakes, &get, None, &json!({"verify_token": "other"})).unwrap();
    assert!(matches!(refused, Err(HandshakeRefused::WrongToken(_))));

    // Dropbox: GET ?challenge=…, the challenge back as text.
    let dropbox = Inbound::new("GET", None, &none, Some("challenge=8VGt2Ql7%2Bx0"), b"");
    let reply = answer(&provider("dropbox").handshakes, &dropbox, None, &json!({}))
        .unwrap()
        .unwrap();
    assert_eq!(
        (reply.body.as_slice(), reply.content_type.as_deref()),
        (&b"8VGt2Ql7+x0"[..], Some("text/plain"))
    );

    // An ordinary event is no handshake.
    let event_body = sample("slack/event_callback.app_mention.json");
    let event = Inbound::new("POST", None, &json_headers, None, &event_body);
    assert!(answer(&provider("slack").handshakes, &event, None, &json!({})).is_none());
}

// ---- events and routing ----

fn routes(
    provider_name: &str,
    h: &[(String, String)],
    query: Option<&str>,
    body: &[u8],
) -> Vec<(Option<String>, Route)> {
    let request = Inbound::new("POST", None, h, query, body);
    events(&provider(provider_name), &request)
        .into_iter()
        .map(|e| (e.event_type, e.route))
        .collect()
}

/// [`routes`] of a POST of the sample at `path`.
fn sample_routes(provider_name: &str, h: &[(String, String)], path: &str) -> Vec<(Option<String>, Route)> {
    routes(provider_name, h, None, &sample(path))
}

fn by_value(key: &str, values: &[&str]) -> Route {
    Route::Values(
        RoutingTarget::ConnectionConfig(key.into()),
        values.iter().map(|v| v.to_string()).collect(),
    )
}

#[test]
fn events_split_type_and_route_per_provider() {
    let json_headers = headers(&[("Content-Type", "application/json")]);
    let github_headers = headers(&[("X-GitHub-Event", "installation")]);
    assert_eq!(
        sample_routes("github", &github_headers, "github/installation.created.json"),
        vec![(
            Some("installation.created".into()),
            by_value("installation_id", &["957387"])
        )]
    );
    assert_eq!(
        routes(
            "github",
            &headers(&[("X-GitHub-Event", "ping")]),
            None,
            &sample("github/ping.with-app_id.json")
        ),
        vec![(Some("ping".into()), Route::Missing)],
        "a repository webhook names no installation"
    );

    // HubSpot: a two-portal batch is two events, each with its own portal.
    let batch = br#"[{"objectId":1,"portalId":11,"subscriptionType":"contact.propertyChange","occurredAt":5},
                     {"objectId":2,"portalId":22,"subscriptionType":"contact.creation","occurredAt":6}]"#;
    assert_eq!(
        routes("hubspot", &json_headers, None, batch),
        vec![
            (Some("contact.propertyChange".into()), by_value("portalId", &["11"])),
            (Some("contact.creation".into()), by_value("portalId", &["22"])),
        ]
    );

    // Slack: team id at the top (Events API) or nested (interactivity).
    let slack = sample("slack/event_callback.app_mention.json");
    let flat = routes("slack", &json_headers, None, &slack);
    assert_eq!(flat[0].0.as_deref(), Some("app_mention"));
    assert!(matches!(&flat[0].1, Route::Values(_, v) if v.len() == 1));
    let nested = b"payload=%7B%22type%22%3A%22block_actions%22%2C%22team%22%3A%7B%22id%22%3A%22T9TK3CUKW%22%7D%7D";
    let form = headers(&[("Content-Type", "application/x-www-form-urlencoded")]);
    assert_eq!(
        routes("slack", &form, None, nested),
        vec![(Some("block_actions".into()), by_value("team_id", &["T9TK3CUKW"]))]
    );

    // GitLab and Asana: the connection id is in the webhook URL's query.
    assert_eq!(
        routes(
            "gitlab",
            &json_headers,
            Some("connection_id=acme"),
            br#"{"object_kind":"push"}"#
        ),
        vec![(Some("push".into()), Route::ConnectionIds(vec!["acme".into()]))]
    );

    // Jira: the site is the origin of the issue's self URL.
    let jira = sample_routes("jira", &json_headers, "jira/issue_created.ILLUSTRATIVE.json");
    match &jira[0].1 {
        Route::Values(RoutingTarget::ConnectionConfig(key), values) => {
            assert_eq!(key, "site");
            assert!(
                values[0].starts_with("https://") && values[0].matches('/').count() == 2,
                "{values:?}"
            );
        }
        other => panic!("{other:?}"),
    }

    // Graph: value[] elements, each with its tenant; lifecycle events typed as such.
    let graph = sample_routes("microsoft-graph", &json_headers, "msgraph/change_notification.json");
    assert!(!graph.is_empty() && graph.iter().all(|(_, r)| matches!(r, Route::Values(..))));
    let lifecycle = sample_routes("microsoft-graph", &json_headers, "msgraph/lifecycle_notification.json");
    assert!(lifecycle[0].0.as_deref().is_some_and(|t| !t.is_empty()));

    // Attio: events[] with the workspace inside each; Airtable: by webhook id in metadata.
    let attio = sample_routes("attio", &json_headers, "attio/record.updated.json");
    assert!(attio
        .iter()
        .all(|(t, r)| t.as_deref() == Some("record.updated") && matches!(r, Route::Values(..))));
    assert_eq!(
        sample_routes("airtable", &json_headers, "airtable/notification.ping.json"),
        vec![(
            Some("ping".into()),
            Route::Values(
                RoutingTarget::Metadata("webhook_id".into()),
                vec!["ach00000000000000".into()]
            )
        )]
    );
    // QuickBooks: a CloudEvents array, each event with its company (realm).
    let cloudevents = br#"[{"type":"qbo.invoice.created.v1","intuitaccountid":"310687","intuitentityid":"95"},
                          {"type":"qbo.customer.updated.v1","intuitaccountid":"420798","intuitentityid":"7"}]"#;
    assert_eq!(
        routes("quickbooks", &json_headers, None, cloudevents),
        vec![
            (Some("qbo.invoice.created.v1".into()), by_value("realmId", &["310687"])),
            (Some("qbo.customer.updated.v1".into()), by_value("realmId", &["420798"])),
        ]
    );
    assert_eq!(
        sample_routes(
            "quickbooks",
            &json_headers,
            "quickbooks/account.created.cloudevents.json"
        ),
        vec![(Some("qbo.account.created.v1".into()), by_value("realmId", &["310687"]))]
    );
    // Notion: by workspace; Dropbox: every account the notification lists.
    assert_eq!(
        sample_routes("notion", &json_headers, "notion/page.created.ILLUSTRATIVE.json"),
        vec![(
            Some("page.created".into()),
            by_value("workspace_id", &["13950b26-c203-4f3b-b97d-93ec06319565"])
        )]
    );
    assert_eq!(
        sample_routes("dropbox", &json_headers, "dropbox/list_folder.json"),
        vec![(
            Some("file_change".into()),
            by_value(
                "account_id",
                &[
                    "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc",
                    "dbid:AAB1HP1t5Uq4XmSR9SUMRiv5B0JiNZfnd0Q"
                ]
            )
        )]
    );
    assert_eq!(routes("generic", &json_headers, None, b"not json")[0].1, Route::All);
}

#[test]
fn hubspot_orders_one_objects_events_creation_first_then_by_time() {
    let body = br#"[{"objectId":7,"subscriptionType":"contact.propertyChange","occurredAt":30,"portalId":1},
                    {"objectId":8,"subscriptionType":"contact.propertyChange","occurredAt":10,"portalId":1},
                    {"objectId":7,"subscriptionType":"contact.propertyChange","occurredAt":20,"portalId":1},
                    {"objectId":7,"subscriptionType":"contact.creation","occurredAt":40,"portalId":1}]"#;
    let h = headers(&[("Content-Type", "application/json")]);
    let request = Inbound::new("POST", None, &h, None, body);
    let order: Vec<(i64, i64)> = events(&provider("hubspot"), &request)
        .iter()
        .map(|e| {
            (
                e.payload["objectId"].as_i64().unwrap(),
                e.payload["occurredAt"].as_i64().unwrap(),
            )
        })
        .collect();
    // Object 7 keeps its places (0, 2, 3) with creation first; object 8 stays at 1.
    assert_eq!(order, vec![(7, 40), (8, 10), (7, 20), (7, 30)]);
}
