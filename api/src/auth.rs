//! `Authorization: Bearer <environment secret key>` on every route: the key selects the
//! environment, which handlers receive as `Extension<Environment>`.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use crate::error::ApiError;
use crate::AppState;

pub async fn require_environment(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request.headers().get(AUTHORIZATION).ok_or_else(|| {
        ApiError::unauthorized("missing Authorization header; send `Authorization: Bearer <secret key>`")
    })?;
    let key = header
        .to_str()
        .ok()
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
        .filter(|key| !key.is_empty())
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <secret key>`"))?;
    let environment = state
        .store
        .environment_by_secret_key(key)
        .await?
        .ok_or_else(|| ApiError::unauthorized("the secret key is not valid for any environment"))?;
    request.extensions_mut().insert(environment);
    Ok(next.run(request).await)
}
