//! Property tests over the provider engine with arbitrary requests: signature parsing,
//! handshake detection, batch splitting and routing-path extraction never panic, for
//! every provider in the catalog, whatever the headers, query and body.
//!
//! `PROPTEST_CASES` sets the number of generated requests per property (default 256,
//! each run against all 21 providers).

use chrono::Utc;
use hookyard_core::providers::events::events;
use hookyard_core::providers::extract::{at_path, Source, Template};
use hookyard_core::providers::handshake::answer;
use hookyard_core::providers::{Catalog, Inbound};
use proptest::prelude::*;
use serde_json::json;

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("x-hub-signature-256".to_string()),
        Just("x-slack-signature".to_string()),
        Just("x-slack-request-timestamp".to_string()),
        Just("stripe-signature".to_string()),
        Just("webhook-signature".to_string()),
        Just("webhook-timestamp".to_string()),
        Just("webhook-id".to_string()),
        Just("x-hubspot-signature-v3".to_string()),
        Just("x-hubspot-request-timestamp".to_string()),
        Just("x-zendesk-webhook-signature-timestamp".to_string()),
        Just("calendly-webhook-signature".to_string()),
        Just("x-hook-secret".to_string()),
        Just("content-type".to_string()),
        "[a-z-]{1,20}",
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "t=[0-9]{0,12},v1=[0-9a-f]{0,64}",
        "(sha256=|v0=|v1,)?[0-9a-zA-Z+/=]{0,90}",
        "[0-9]{0,20}",
        Just("application/x-www-form-urlencoded".to_string()),
        Just("application/json".to_string()),
        any::<String>(),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        Just(br#"[{"portalId":1,"objectId":2,"subscriptionType":"contact.creation","occurredAt":3}]"#.to_vec()),
        Just(br#"{"value":[{"clientState":"x","tenantId":"t"}],"events":[]}"#.to_vec()),
        Just(b"payload=%7B%22team%22%3A%7B%22id%22%3A1%7D%7D&team_id=T".to_vec()),
        Just(br#"{"type":"url_verification","challenge":"c","event":"endpoint.url_validation","payload":{"plainToken":"p"}}"#.to_vec()),
        "[{}\\[\\]\":,a-z0-9 ]{0,200}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #[test]
    fn arbitrary_requests_never_panic(
        headers in proptest::collection::vec((header_name(), header_value()), 0..8),
        query in proptest::option::of("[a-zA-Z0-9_.=&%+-]{0,80}"),
        body in body(),
        method in prop_oneof![Just("POST"), Just("GET"), Just("HEAD")],
        secret in prop_oneof![Just("s3cret".to_string()), Just("whsec_c2VjcmV0".to_string()), any::<String>()],
    ) {
        let catalog = Catalog::embedded().unwrap();
        let names: Vec<String> = catalog.names().map(String::from).collect();
        for name in names {
            let provider = catalog.get(&name).unwrap();
            let request = Inbound::new(method, Some("https://h.example/webhook/x/y?a=1"), &headers, query.as_deref(), &body);
            let _ = provider.verify(&request, Some(&secret), Utc::now());
            let _ = provider.verify(&request, None, Utc::now());
            let _ = answer(&provider.handshakes, &request, Some(&secret), &json!({"verify_token": "t"}));
            for event in events(provider, &request) {
                let _ = serde_json::to_vec(&event.payload).unwrap();
            }
        }
    }

    #[test]
    fn arbitrary_rules_and_paths_never_panic(text in any::<String>(), path in "[a-z0-9.$]{0,30}") {
        let _ = text.parse::<Source>();
        let _ = Template::try_from(text.clone());
        let value = json!({"a": [{"b": 1}, "c"], "0": {"1": null}});
        let _ = at_path(&value, &path);
        let _ = at_path(&value, &text);
    }
}
