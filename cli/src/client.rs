//! The API client that `deploy`, `dlq`, `replay` and `logs` share: where the API is,
//! the environment's key, and API errors turned into one line for the user.

use serde_json::Value;

#[derive(clap::Args, Clone)]
pub struct ApiArgs {
    /// The API's address.
    #[arg(long, env = "HOOKYARD_API_URL", default_value = "http://127.0.0.1:3004")]
    pub api_url: String,
    /// The environment's secret key.
    #[arg(long, env = "HOOKYARD_SECRET_KEY", hide_env_values = true)]
    pub secret_key: String,
}

pub struct Client {
    args: ApiArgs,
    http: reqwest::Client,
}

impl Client {
    pub fn new(args: ApiArgs) -> Client {
        Client {
            args,
            http: reqwest::Client::new(),
        }
    }

    /// `method path` with an optional JSON body; the answer's JSON, or what went wrong.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.args.api_url.trim_end_matches('/'));
        let mut request = self.http.request(method, &url).bearer_auth(&self.args.secret_key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("cannot reach the API at {url}: {e}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("the API answered {status} without JSON: {e}"))?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            return Err(format!("refused ({status}): {message}"));
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.call(reqwest::Method::GET, path, None).await
    }
}

/// `?a=1&b=2` of the pairs whose value is set (values percent-encoded).
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        if let Some(value) = value {
            out.append_pair(name, value);
        }
    }
    let text = out.finish();
    if text.is_empty() {
        text
    } else {
        format!("?{text}")
    }
}
