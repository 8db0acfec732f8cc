//! An HTTP receiver on loopback standing in for a customer's app: it records every
//! request and answers from a script (then 200).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};

use crate::eventually;

/// One request the receiver got.
#[derive(Clone, Debug)]
pub struct Hit {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Hit {
    /// The header's value, or "" when absent.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

#[derive(Clone)]
pub struct Receiver {
    /// Where it listens: `http://127.0.0.1:{port}/hook`.
    pub url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    /// Answers its requests with `script`'s (status, `Retry-After`) in turn, then 200.
    pub async fn start(script: &[(u16, Option<&'static str>)]) -> Receiver {
        let hits = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.iter().copied().collect::<VecDeque<_>>()));
        let (h, s) = (hits.clone(), script.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (hits, script) = (h.clone(), s.clone());
                async move {
                    hits.lock().unwrap().push(Hit {
                        at: Instant::now(),
                        headers,
                        body: body.to_vec(),
                    });
                    let (status, retry_after) = script.lock().unwrap().pop_front().unwrap_or((200, None));
                    let mut response = axum::response::Response::new(axum::body::Body::empty());
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    if let Some(value) = retry_after {
                        response.headers_mut().insert("retry-after", value.parse().unwrap());
                    }
                    response
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, hits }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().unwrap().clone()
    }

    /// The hits once there are at least `count`.
    pub async fn wait_hits(&self, count: usize) -> Vec<Hit> {
        eventually(
            &format!("{count} requests at the receiver"),
            Duration::from_secs(60),
            || async {
                let hits = self.hits();
                (hits.len() >= count).then_some(hits)
            },
        )
        .await
    }
}
