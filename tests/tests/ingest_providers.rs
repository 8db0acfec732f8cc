//! ingest with the provider catalog, over HTTP against real NATS: signatures fail
//! closed (401, nothing published), webhooks of a signing provider without a secret are
//! marked unverified, and handshakes are answered synchronously and never published.

mod common;

use hookyard_core::providers::signature::sign;
use hookyard_core::providers::{Catalog, Inbound, Verification};
use hookyard_core::store::NewIntegration;
use serde_json::json;

use common::{assert_error, start_ingest_with, Running};

fn integration(key: &str, provider: &str, secret: Option<&str>) -> NewIntegration {
    NewIntegration {
        webhook_secret: secret.map(String::from),
        ..NewIntegration::new(key.parse().unwrap(), provider)
    }
}

async fn start() -> Running {
    let mut custom = integration("custom", "acme-crm", Some("custom-secret"));
    custom.settings =
        json!({"signature": {"algorithm": "hmac-sha256", "header": "X-Acme-Signature", "prefix": "sha256="}});
    let mut meta = integration("meta", "meta", Some("app-secret"));
    meta.settings = json!({"verify_token": "meatyhamhock"});
    start_ingest_with(
        None,
        |config| config.ingest.public_url = Some("https://hooks.example.com".into()),
        vec![
            integration("github", "github", Some("It's a Secret to Everybody")),
            integration("github-open", "github", None),
            integration("slack", "slack", Some("slack-secret")),
            integration("zoom", "zoom", Some("zoom-secret")),
            integration("twilio", "twilio", Some("12345")),
            integration("intercom", "intercom", None),
            integration("dropbox", "dropbox", Some("app-secret")),
            meta,
            custom,
        ],
    )
    .await
}

/// The GitHub docs' vector: "Hello, World!" under "It's a Secret to Everybody".
const GITHUB_SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

#[tokio::test]
async fn signatures_fail_closed_and_unsigned_secrets_are_marked() {
    let ingest = start().await;
    let post = |integration: &str, signature: Option<&str>, body: &'static str| {
        let mut request = ingest
            .http
            .post(ingest.webhook_url(integration))
            .header("x-github-event", "ping")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        request.send()
    };

    let good = post("github", Some(GITHUB_SIGNATURE), "Hello, World!").await.unwrap();
    assert_eq!(good.status(), 202);
    assert_eq!(ingest.raw_envelope(1).await.verification, Verification::Verified);

    for (signature, body) in [
        (Some(GITHUB_SIGNATURE), "Hello, World?"),
        (Some("sha256=00"), "Hello, World!"),
        (None, "Hello, World!"),
    ] {
        let refused = post("github", signature, body).await.unwrap();
        assert_error(refused, 401, "bad_signature").await;
    }
    assert_eq!(ingest.raw_count().await, 1, "nothing refused was published");

    // A provider that signs, an integration with no secret: accepted, marked unverified.
    let open = post("github-open", None, "Hello, World!").await.unwrap();
    assert_eq!(open.status(), 202);
    assert_eq!(ingest.raw_envelope(2).await.verification, Verification::Unverified);
    // A provider that does not sign.
    let demo = ingest.post("demo", b"{}").await;
    assert_eq!(demo.status(), 202);
    assert_eq!(ingest.raw_envelope(3).await.verification, Verification::Unsigned);
}

#[tokio::test]
async fn a_signed_url_is_the_public_address_as_called() {
    let ingest = start().await;
    let path = format!("/webhook/{}/twilio/voice?foo=1", ingest.environment.webhook_id);
    let body = "CallSid=CA1&From=%2B14158675309";
    let headers = vec![(
        "content-type".to_string(),
        "application/x-www-form-urlencoded".to_string(),
    )];
    let public = format!("https://hooks.example.com{path}");
    let request = Inbound::new("POST", Some(&public), &headers, None, body.as_bytes());
    let twilio = Catalog::embedded().unwrap().get("twilio").unwrap().clone();
    let signature = sign(twilio.signature.as_ref().unwrap(), &request, "12345", None).unwrap();
    let send = |signature: String| {
        ingest
            .http
            .post(format!("{}{path}", ingest.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-twilio-signature", signature)
            .body(body)
            .send()
    };
    assert_eq!(send(signature).await.unwrap().status(), 202);
    assert_error(send("AAAA".into()).await.unwrap(), 401, "bad_signature").await;
}

#[tokio::test]
async fn handshakes_are_answered_synchronously_and_not_published() {
    let ingest = start().await;
    let slack = ingest
        .http
        .post(ingest.webhook_url("slack"))
        .header("content-type", "application/json")
        .body(r#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(slack.status(), 200);
    assert_eq!(slack.headers()["content-type"], "text/plain");
    assert_eq!(slack.headers()["x-content-type-options"], "nosniff");
    assert_eq!(
        slack.text().await.unwrap(),
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );

    let zoom: serde_json::Value = ingest
        .http
        .post(ingest.webhook_url("zoom"))
        .header("content-type", "application/json")
        .body(r#"{"payload":{"plainToken":"qgg8vlvZRS6UYooatFL8Aw"},"event_ts":1654503849680,"event":"endpoint.url_validation"}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        zoom,
        json!({"plainToken": "qgg8vlvZRS6UYooatFL8Aw",
               "encryptedToken": "b17f0320a1322a509340a1a835b3d9edbc491f0b0790ed2d20d0604d39dfe922"})
    );

    let meta_url = |token: &str| {
        format!(
            "{}?hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={token}",
            ingest.webhook_url("meta")
        )
    };
    let meta = ingest.http.get(meta_url("meatyhamhock")).send().await.unwrap();
    assert_eq!(meta.status(), 200);
    assert_eq!(meta.headers()["x-content-type-options"], "nosniff");
    assert_eq!(meta.text().await.unwrap(), "1158201444");
    let wrong = ingest.http.get(meta_url("guess")).send().await.unwrap();
    assert_error(wrong, 403, "handshake_refused").await;

    let dropbox = ingest
        .http
        .get(format!("{}?challenge=8VGt2Ql7", ingest.webhook_url("dropbox")))
        .send()
        .await
        .unwrap();
    assert_eq!(dropbox.status(), 200);
    assert_eq!(dropbox.headers()["x-content-type-options"], "nosniff");
    assert_eq!(dropbox.text().await.unwrap(), "8VGt2Ql7");

    let head = ingest.http.head(ingest.webhook_url("intercom")).send().await.unwrap();
    assert_eq!(head.status(), 200);

    assert_eq!(ingest.raw_count().await, 0, "handshakes are not events");
}

#[tokio::test]
async fn a_custom_integration_verifies_by_its_settings() {
    let ingest = start().await;
    let body = r#"{"account":"a1"}"#;
    let headers = vec![];
    let request = Inbound::new("POST", None, &headers, None, body.as_bytes());
    let spec: hookyard_core::providers::SignatureSpec =
        serde_json::from_value(json!({"algorithm": "hmac-sha256", "header": "X-Acme-Signature"})).unwrap();
    let signature = sign(&spec, &request, "custom-secret", None).unwrap();
    let send = |signature: String| {
        ingest
            .http
            .post(ingest.webhook_url("custom"))
            .header("x-acme-signature", format!("sha256={signature}"))
            .body(body)
            .send()
    };
    assert_eq!(send(signature).await.unwrap().status(), 202);
    assert_eq!(ingest.raw_envelope(1).await.verification, Verification::Verified);
    assert_error(send("00".into()).await.unwrap(), 401, "bad_signature").await;
}
