//! `/environment-variables`: what functions read with `nango.getEnvironmentVariables()`
//! (Nango's are set in its dashboard). Replaced as a whole; sealed at rest.

use axum::extract::State;
use axum::{Extension, Json};
use hookyard_core::store::{Environment, EnvironmentVariable};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Body, ErrorBody};
use crate::{AppState, Data};

/// How many an environment may have, and how long a name and a value may be.
const MAX_VARIABLES: usize = 100;
const MAX_NAME: usize = 255;
const MAX_VALUE: usize = 32 * 1024;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list, replace))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Variable {
    /// Letters, digits and `_`, not starting with a digit (`LINEAR_TEAM_ID`).
    name: String,
    value: String,
}

#[derive(Deserialize, ToSchema)]
pub struct VariablesRequest {
    /// All of the environment's variables: those left out are removed.
    variables: Vec<Variable>,
}

fn views(variables: Vec<EnvironmentVariable>) -> Vec<Variable> {
    variables
        .into_iter()
        .map(|v| Variable {
            name: v.name,
            value: v.value,
        })
        .collect()
}

/// Each variable checked; the first problem names it.
fn checked(request: VariablesRequest) -> Result<Vec<EnvironmentVariable>, ApiError> {
    if request.variables.len() > MAX_VARIABLES {
        return Err(ApiError::invalid("variables", format!("at most {MAX_VARIABLES}")));
    }
    let mut names = std::collections::HashSet::new();
    let mut variables = Vec::with_capacity(request.variables.len());
    for Variable { name, value } in request.variables {
        let mut chars = name.chars();
        let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !well_formed || name.len() > MAX_NAME {
            return Err(ApiError::invalid(
                "variables",
                format!("{name:?} is not a name: letters, digits and _, not starting with a digit, at most {MAX_NAME}"),
            ));
        }
        if value.len() > MAX_VALUE {
            return Err(ApiError::invalid(
                "variables",
                format!("{name}: the value is over {MAX_VALUE} bytes"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(ApiError::invalid("variables", format!("{name} is given twice")));
        }
        variables.push(EnvironmentVariable { name, value });
    }
    Ok(variables)
}

/// The environment's variables, by name.
#[utoipa::path(get, operation_id = "list_environment_variables", path = "/environment-variables",
    tag = "environment variables",
    responses((status = 200, body = Data<Vec<Variable>>), (status = 401, body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
) -> Result<Json<Data<Vec<Variable>>>, ApiError> {
    let variables = state.store.environment_variables(environment.id).await?;
    Ok(Json(Data { data: views(variables) }))
}

/// Replace the environment's variables (an empty list removes them all). exec sees the
/// new ones at once, onWebhook within a second (the worker's cache).
#[utoipa::path(put, operation_id = "set_environment_variables", path = "/environment-variables",
    tag = "environment variables", request_body = VariablesRequest,
    responses((status = 200, body = Data<Vec<Variable>>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
async fn replace(
    State(state): State<AppState>,
    Extension(environment): Extension<Environment>,
    Body(request): Body<VariablesRequest>,
) -> Result<Json<Data<Vec<Variable>>>, ApiError> {
    let mut variables = checked(request)?;
    state
        .store
        .set_environment_variables(environment.id, &variables)
        .await?;
    variables.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(Data { data: views(variables) }))
}
