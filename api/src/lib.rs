//! The control plane (`hookyard api`): integrations, connections and records over HTTP,
//! in Nango's shapes so its clients work against it.
//!
//! Every route but `/openapi.json`, `/healthz` and `/readyz` requires
//! `Authorization: Bearer <environment secret key>`; the key selects the environment.
//! The OpenAPI document is generated from the handlers' annotations, so it lists exactly
//! the routes that are served.

mod actions;
mod auth;
mod connections;
mod dead_letters;
mod environment_variables;
mod error;
mod events;
mod fields;
mod forwarding;
mod functions;
mod integrations;
mod logs;
mod records;
mod replays;
mod syncs;

use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router, ServiceExt as _};
use std::sync::Arc;

use hookyard_core::providers::{Catalog, CatalogError};
use hookyard_core::{Config, Store};
use hookyard_functions::runs::Actions;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::Layer as _;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Deprecated, OpenApi as Document, PathItem};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;

pub use error::ApiError;

#[derive(Clone)]
pub struct AppState {
    store: Store,
    /// The provider catalog, to check integration settings.
    catalog: Arc<Catalog>,
    /// `http(s)://host[:port]` of ingest, for the `webhook_url` of integrations.
    webhook_base_url: String,
    /// What a deploy's top-level code may use while its configuration is read.
    function_limits: hookyard_functions::Limits,
    /// Which forwarding destinations are allowed, checked as they are set.
    forwarding: hookyard_core::config::ForwardingConfig,
    /// Runs event functions when connections are created and deleted.
    events: Arc<events::Events>,
    /// Runs actions when triggered.
    actions: Arc<Actions>,
}

/// Nango's wrapper of single objects and lists.
#[derive(Serialize, ToSchema)]
pub struct Data<T> {
    data: T,
}

#[derive(Serialize, ToSchema)]
pub struct Success {
    success: bool,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "hookyard", description = "hookyard's control plane: integrations, connections, records and function deploys."),
    modifiers(&BearerAuth),
    security(("secret_key" = [])),
    tags((name = "integrations"), (name = "connections"), (name = "records"), (name = "functions"), (name = "forwarding"), (name = "environment variables"), (name = "syncs"), (name = "actions"), (name = "dead letters"), (name = "replay"), (name = "logs"))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "secret_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The environment's secret key"))
                    .build(),
            ),
        );
    }
}

/// Older clients' paths, served as the paths they map to (and listed, deprecated).
const PATH_ALIASES: &[(&str, &str)] = &[("/connection", "/connections")];

/// The API's routes and its OpenAPI document.
pub fn router(store: Store, config: &Config) -> Result<(Router, Document), CatalogError> {
    Api::new(store, config).map(|api| (api.router, api.document))
}

/// The API's routes and OpenAPI document, with the event functions they run, which
/// [`Api::owed_event_sweep`] shares.
pub struct Api {
    pub router: Router,
    pub document: Document,
    events: Arc<events::Events>,
}

impl Api {
    pub fn new(store: Store, config: &Config) -> Result<Api, CatalogError> {
        let catalog = Arc::new(Catalog::embedded()?);
        // Action runs are logged as they end, off the request's path.
        let oplog = hookyard_core::oplog::OpLog::start(store.clone(), &config.logs);
        let actions = Arc::new(Actions::new(store.clone(), catalog.clone(), config, Some(oplog)));
        let events = Arc::new(events::Events::new(
            store.clone(),
            catalog.clone(),
            config,
            actions.clone(),
        ));
        let (router, document) = routes(store, catalog, events.clone(), actions, config);
        Ok(Api {
            router,
            document,
            events,
        })
    }

    /// Runs the post-connection-creation event functions that an API left unrun (it
    /// stopped or died while they ran), now and every 15 s, until `shutdown`.
    /// `hookyard api` and `hookyard dev` run it beside the routes.
    pub fn owed_event_sweep(
        &self,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        events::sweep_loop(self.events.clone(), shutdown)
    }
}

fn routes(
    store: Store,
    catalog: Arc<Catalog>,
    events: Arc<events::Events>,
    actions: Arc<Actions>,
    config: &Config,
) -> (Router, Document) {
    let state = AppState {
        events,
        actions,
        store,
        catalog,
        webhook_base_url: config.webhook_base_url(),
        function_limits: config.worker.limits.clone(),
        forwarding: config.forwarding.clone(),
    };
    let (authenticated, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(integrations::routes())
        .merge(connections::routes())
        .merge(records::routes())
        .merge(functions::routes())
        .merge(forwarding::routes())
        .merge(environment_variables::routes())
        .merge(syncs::routes())
        .merge(actions::routes())
        .merge(dead_letters::routes())
        .merge(replays::routes())
        .merge(logs::routes())
        .split_for_parts();
    list_aliases(&mut document);
    let json = serde_json::to_value(&document).expect("the OpenAPI document serialises");
    let router = authenticated
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_environment,
        ))
        .route("/openapi.json", get(move || std::future::ready(Json(json.clone()))))
        .route("/healthz", get(|| async { Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .with_state(state);
    (router, document)
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    match state.store.ping().await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(error) => ApiError::from(error).into_response(),
    }
}

/// Adds each alias of [`PATH_ALIASES`] to the document as a deprecated copy.
fn list_aliases(document: &mut Document) {
    let aliases: Vec<(String, PathItem)> = document
        .paths
        .paths
        .iter()
        .filter_map(|(path, item)| {
            let (alias, target) = PATH_ALIASES.iter().find(|(_, target)| is_under(path, target))?;
            let mut item = item.clone();
            for operation in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                operation.deprecated = Some(Deprecated::True);
                operation.operation_id = operation.operation_id.take().map(|id| format!("{id}_singular"));
            }
            Some((format!("{alias}{}", &path[target.len()..]), item))
        })
        .collect();
    document.paths.paths.extend(aliases);
}

fn is_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Before routing: aliases become their targets, and a trailing slash is dropped
/// (`/records/` is `/records`).
fn canonical_uri(mut request: Request) -> Request {
    let path = request.uri().path();
    let mut canonical = path.to_string();
    if let Some((alias, target)) = PATH_ALIASES.iter().find(|(alias, _)| is_under(path, alias)) {
        canonical = format!("{target}{}", &path[alias.len()..]);
    }
    if canonical.len() > 1 && canonical.ends_with('/') {
        canonical.pop();
    }
    if canonical != path {
        let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
        if let Ok(uri) = format!("{canonical}{query}").parse::<Uri>() {
            *request.uri_mut() = uri;
        }
    }
    request
}

/// Serves the API on `listener` until `shutdown`, finishing requests in progress.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    let app = axum::middleware::map_request(|request: Request| async move { canonical_uri(request) }).layer(router);
    axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// `hookyard api`: open the store, serve until shutdown.
pub async fn run(config: &Config, shutdown: CancellationToken) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = Store::connect_with(&config.database_url, config.cipher()?, config.database_max_connections).await?;
    let api = Api::new(store, config)?;
    tokio::spawn(api.owed_event_sweep(shutdown.clone()));
    // The API holds no NATS connection: its metrics are its own counters only.
    hookyard_core::metrics::serve_configured(config, None, &shutdown);
    // Event functions and dry runs call providers.
    hookyard_core::outbound::log_proxies(&config.forwarding);
    let addr = config.api.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e} (set HOOKYARD_API__LISTEN to another address)"))?;
    tracing::info!(%addr, "api listening");
    serve(listener, api.router, shutdown).await?;
    tracing::info!("api stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(uri: &str) -> String {
        let request = Request::builder().uri(uri).body(axum::body::Body::empty()).unwrap();
        canonical_uri(request).uri().to_string()
    }

    #[test]
    fn aliases_and_trailing_slashes_map_to_canonical_paths() {
        assert_eq!(
            rewritten("/connection/abc?provider_config_key=k"),
            "/connections/abc?provider_config_key=k"
        );
        assert_eq!(rewritten("/connection"), "/connections");
        assert_eq!(rewritten("/records/?model=M"), "/records?model=M");
        assert_eq!(rewritten("/connectionsx"), "/connectionsx");
        assert_eq!(rewritten("/connections/metadata"), "/connections/metadata");
        assert_eq!(rewritten("/"), "/");
    }
}
