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
    pub fn new(args: ApiArgs) -> Result<Client, String> {
        Ok(Client {
            args,
            http: hookyard_core::outbound::http_client()?,
        })
    }

    /// `method path` with an optional JSON body; the answer's JSON, or what went wrong.
    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
        let url = format!("{}{path}", self.args.api_url.trim_end_matches('/'));
        let mut request = self.http.request(method, &url).bearer_auth(&self.args.secret_key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| CallError {
            message: format!("cannot reach the API at {url}: {e}"),
            transient: true,
        })?;
        let status = response.status();
        // A proxy in front of a stopped API, or the API with its database away.
        let transient = matches!(status.as_u16(), 502..=504);
        let body: Value = response.json().await.map_err(|e| CallError {
            message: format!("the API answered {status} without JSON: {e}"),
            transient,
        })?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            return Err(CallError {
                message: format!("refused ({status}): {message}"),
                transient,
            });
        }
        Ok(body)
    }

    pub async fn get(&self, path: &str) -> Result<Value, CallError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// A GET for a command that follows something for long (`logs --follow`, a
    /// replay's progress): an API that cannot be reached or answers 502–504 is waited
    /// for, which `say` tells once, and again when it answers, rather than ending the
    /// command. A refusal ends it.
    pub async fn get_waiting(&self, path: &str, say: &(dyn Fn(&str) + Sync)) -> Result<Value, String> {
        let mut waiting = false;
        loop {
            match self.get(path).await {
                Ok(answer) => {
                    if waiting {
                        say("the API answers again");
                    }
                    return Ok(answer);
                }
                Err(error) if error.transient => {
                    if !waiting {
                        say(&format!("{}; trying again every {}s", error.message, WAIT.as_secs()));
                        waiting = true;
                    }
                    tokio::time::sleep(WAIT).await;
                }
                Err(error) => return Err(error.message),
            }
        }
    }
}

/// How often [`Client::get_waiting`] asks an API that did not answer.
const WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a call failed; `transient` when waiting may help: the API could not be reached,
/// or answered 502, 503 or 504.
#[derive(Debug)]
pub struct CallError {
    pub message: String,
    pub transient: bool,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<CallError> for String {
    fn from(error: CallError) -> String {
        error.message
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
