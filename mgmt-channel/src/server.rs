//! The HTTP face of the daemon: routes, request parsing, the caller's
//! access and the audit log. Each handler parses its body strictly, then
//! runs the [`Daemon`] operation on a blocking thread (operations talk to
//! cards and VMMs synchronously).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi};

use crate::auth::{check_bearer, Access, AuditLog, AuditRecord, Caller, Token};
use crate::daemon::Daemon;
use crate::error::{ApiError, ErrorBody, ErrorKind};
use crate::model::*;

/// What every handler shares.
#[derive(Clone)]
pub struct App {
    pub daemon: Arc<Daemon>,
    pub audit: Arc<AuditLog>,
    pub tokens: Arc<Vec<Token>>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body())).into_response();
        response.extensions_mut().insert(self.kind);
        response
    }
}

/// A JSON body parsed strictly: a malformed body, an unknown field, a
/// missing one or a value of the wrong type is a 400 naming the field.
pub struct Strict<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Strict<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        parse_body(&bytes).map(Strict)
    }
}

pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            let message = format!("body: {inner}");
            // serde names an unknown or missing field in its message.
            let field = field_in_message(&message);
            let mut err = ApiError::bad_request(message);
            err.field = field;
            err
        } else {
            ApiError::bad_request(format!("`{path}`: {inner}")).with_field(&path)
        }
    })?;
    de.end()
        .map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
    Ok(value)
}

/// The first `name` quoted in backticks in one of serde's messages.
fn field_in_message(message: &str) -> Option<String> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(message[start..start + len].to_string())
}

/// Runs an operation of the daemon on a blocking thread.
async fn blocking<T: Send + 'static>(
    app: &App,
    op: impl FnOnce(&Daemon) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let daemon = app.daemon.clone();
    tokio::task::spawn_blocking(move || op(&daemon))
        .await
        .map_err(|e| ApiError::internal(format!("operation failed: {e}")))?
}

fn created<T: Serialize>(value: T) -> Response {
    (StatusCode::CREATED, Json(value)).into_response()
}

fn no_content() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

// ------------------------------------------------------------------ volumes

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = CreateVolume,
    responses((status = 201, body = Volume), (status = "4XX", body = ErrorBody)))]
async fn create_volume(
    State(app): State<App>,
    Strict(req): Strict<CreateVolume>,
) -> Result<Response, ApiError> {
    Ok(created(
        blocking(&app, move |d| d.create_volume(req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", responses((status = 200, body = Vec<Volume>)))]
async fn list_volumes(State(app): State<App>) -> Result<Json<Vec<Volume>>, ApiError> {
    Ok(Json(app.daemon.volumes()?))
}

#[utoipa::path(get, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path)),
    responses((status = 200, body = Volume), (status = 404, body = ErrorBody)))]
async fn describe_volume(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(app.daemon.volume(&id)?))
}

#[utoipa::path(patch, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path)),
    request_body = ModifyVolume,
    responses((status = 200, body = Volume), (status = "4XX", body = ErrorBody)))]
async fn modify_volume(
    State(app): State<App>,
    Path(id): Path<String>,
    Strict(req): Strict<ModifyVolume>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(
        blocking(&app, move |d| d.modify_volume(&id, req)).await?,
    ))
}

#[utoipa::path(delete, path = "/v1/volumes/{id}", tag = "volumes", params(("id" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn delete_volume(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(&app, move |d| d.delete_volume(&id)).await?;
    Ok(no_content())
}

#[utoipa::path(post, path = "/v1/volumes/{id}/attach", tag = "volumes", params(("id" = String, Path)),
    request_body = AttachVolume,
    responses((status = 200, body = Volume), (status = "4XX", body = ErrorBody)))]
async fn attach_volume(
    State(app): State<App>,
    Path(id): Path<String>,
    Strict(req): Strict<AttachVolume>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(
        blocking(&app, move |d| d.attach_volume(&id, req)).await?,
    ))
}

/// An empty object: the detach takes no arguments.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[utoipa::path(post, path = "/v1/volumes/{id}/detach", tag = "volumes", params(("id" = String, Path)),
    request_body = Empty,
    responses((status = 200, body = Volume), (status = "4XX", body = ErrorBody)))]
async fn detach_volume(
    State(app): State<App>,
    Path(id): Path<String>,
    Strict(_): Strict<Empty>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(blocking(&app, move |d| d.detach_volume(&id)).await?))
}

// --------------------------------------------------------------- namespaces

#[utoipa::path(post, path = "/v1/namespaces", tag = "namespaces", request_body = CreateNamespace,
    responses((status = 201, body = Namespace), (status = "4XX", body = ErrorBody)))]
async fn create_namespace(
    State(app): State<App>,
    Strict(req): Strict<CreateNamespace>,
) -> Result<Response, ApiError> {
    Ok(created(
        blocking(&app, move |d| d.create_namespace(req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/namespaces", tag = "namespaces", responses((status = 200, body = Vec<Namespace>)))]
async fn list_namespaces(State(app): State<App>) -> Result<Json<Vec<Namespace>>, ApiError> {
    Ok(Json(app.daemon.namespaces()?))
}

#[utoipa::path(get, path = "/v1/namespaces/{id}", tag = "namespaces", params(("id" = String, Path)),
    responses((status = 200, body = Namespace), (status = 404, body = ErrorBody)))]
async fn describe_namespace(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Namespace>, ApiError> {
    Ok(Json(app.daemon.namespace(&id)?))
}

#[utoipa::path(delete, path = "/v1/namespaces/{id}", tag = "namespaces", params(("id" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn delete_namespace(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(&app, move |d| d.delete_namespace(&id)).await?;
    Ok(no_content())
}

// ------------------------------------------------------------------ subnets

#[utoipa::path(post, path = "/v1/subnets", tag = "network", request_body = CreateSubnet,
    responses((status = 201, body = Subnet), (status = "4XX", body = ErrorBody)))]
async fn create_subnet(
    State(app): State<App>,
    Strict(req): Strict<CreateSubnet>,
) -> Result<Response, ApiError> {
    Ok(created(
        blocking(&app, move |d| d.create_subnet(req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/subnets", tag = "network", responses((status = 200, body = Vec<Subnet>)))]
async fn list_subnets(State(app): State<App>) -> Result<Json<Vec<Subnet>>, ApiError> {
    Ok(Json(app.daemon.subnets()?))
}

#[utoipa::path(get, path = "/v1/subnets/{id}", tag = "network", params(("id" = String, Path)),
    responses((status = 200, body = Subnet), (status = 404, body = ErrorBody)))]
async fn describe_subnet(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Subnet>, ApiError> {
    Ok(Json(app.daemon.subnet(&id)?))
}

#[utoipa::path(delete, path = "/v1/subnets/{id}", tag = "network", params(("id" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn delete_subnet(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(&app, move |d| d.delete_subnet(&id)).await?;
    Ok(no_content())
}

// ---------------------------------------------------------- security groups

#[utoipa::path(post, path = "/v1/security-groups", tag = "network", request_body = CreateSecurityGroup,
    responses((status = 201, body = SecurityGroup), (status = "4XX", body = ErrorBody)))]
async fn create_security_group(
    State(app): State<App>,
    Strict(req): Strict<CreateSecurityGroup>,
) -> Result<Response, ApiError> {
    Ok(created(
        blocking(&app, move |d| d.create_security_group(req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/security-groups", tag = "network", responses((status = 200, body = Vec<SecurityGroup>)))]
async fn list_security_groups(
    State(app): State<App>,
) -> Result<Json<Vec<SecurityGroup>>, ApiError> {
    Ok(Json(app.daemon.security_groups()?))
}

#[utoipa::path(get, path = "/v1/security-groups/{id}", tag = "network", params(("id" = String, Path)),
    responses((status = 200, body = SecurityGroup), (status = 404, body = ErrorBody)))]
async fn describe_security_group(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<SecurityGroup>, ApiError> {
    Ok(Json(app.daemon.security_group(&id)?))
}

#[utoipa::path(put, path = "/v1/security-groups/{id}/rules", tag = "network", params(("id" = String, Path)),
    request_body = SetRules,
    responses((status = 200, body = SecurityGroup), (status = "4XX", body = ErrorBody)))]
async fn set_rules(
    State(app): State<App>,
    Path(id): Path<String>,
    Strict(req): Strict<SetRules>,
) -> Result<Json<SecurityGroup>, ApiError> {
    Ok(Json(blocking(&app, move |d| d.set_rules(&id, req)).await?))
}

#[utoipa::path(delete, path = "/v1/security-groups/{id}", tag = "network", params(("id" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn delete_security_group(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(&app, move |d| d.delete_security_group(&id)).await?;
    Ok(no_content())
}

// --------------------------------------------------------------------- ENIs

#[utoipa::path(post, path = "/v1/enis", tag = "network", request_body = CreateEni,
    responses((status = 201, body = Eni), (status = "4XX", body = ErrorBody)))]
async fn create_eni(
    State(app): State<App>,
    Strict(req): Strict<CreateEni>,
) -> Result<Response, ApiError> {
    Ok(created(blocking(&app, move |d| d.create_eni(req)).await?))
}

#[utoipa::path(get, path = "/v1/enis", tag = "network", responses((status = 200, body = Vec<Eni>)))]
async fn list_enis(State(app): State<App>) -> Result<Json<Vec<Eni>>, ApiError> {
    Ok(Json(app.daemon.enis()?))
}

#[utoipa::path(get, path = "/v1/enis/{id}", tag = "network", params(("id" = String, Path)),
    responses((status = 200, body = Eni), (status = 404, body = ErrorBody)))]
async fn describe_eni(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Eni>, ApiError> {
    Ok(Json(app.daemon.eni(&id)?))
}

#[utoipa::path(patch, path = "/v1/enis/{id}", tag = "network", params(("id" = String, Path)),
    request_body = ModifyEni,
    responses((status = 200, body = Eni), (status = "4XX", body = ErrorBody)))]
async fn modify_eni(
    State(app): State<App>,
    Path(id): Path<String>,
    Strict(req): Strict<ModifyEni>,
) -> Result<Json<Eni>, ApiError> {
    Ok(Json(blocking(&app, move |d| d.modify_eni(&id, req)).await?))
}

#[utoipa::path(delete, path = "/v1/enis/{id}", tag = "network", params(("id" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn delete_eni(State(app): State<App>, Path(id): Path<String>) -> Result<Response, ApiError> {
    blocking(&app, move |d| d.delete_eni(&id)).await?;
    Ok(no_content())
}

// ---------------------------------------------------------------- instances

#[utoipa::path(post, path = "/v1/instances", tag = "instances", request_body = RunInstance,
    responses((status = 201, body = Instance), (status = "4XX", body = ErrorBody)))]
async fn run_instance(
    State(app): State<App>,
    Strict(req): Strict<RunInstance>,
) -> Result<Response, ApiError> {
    Ok(created(blocking(&app, move |d| d.run_instance(req)).await?))
}

#[utoipa::path(post, path = "/v1/instances/register", tag = "instances", request_body = RegisterInstance,
    responses((status = 201, body = Instance), (status = "4XX", body = ErrorBody)))]
async fn register_instance(
    State(app): State<App>,
    Strict(req): Strict<RegisterInstance>,
) -> Result<Response, ApiError> {
    Ok(created(
        blocking(&app, move |d| d.register_instance(req)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/instances", tag = "instances", responses((status = 200, body = Vec<Instance>)))]
async fn list_instances(State(app): State<App>) -> Result<Json<Vec<Instance>>, ApiError> {
    Ok(Json(app.daemon.instances()?))
}

#[utoipa::path(get, path = "/v1/instances/{id}", tag = "instances", params(("id" = String, Path)),
    responses((status = 200, body = Instance), (status = 404, body = ErrorBody)))]
async fn describe_instance(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Json<Instance>, ApiError> {
    Ok(Json(app.daemon.instance(&id)?))
}

#[utoipa::path(delete, path = "/v1/instances/{id}", tag = "instances", params(("id" = String, Path)),
    responses((status = 204), (status = "4XX", body = ErrorBody)))]
async fn delete_instance(
    State(app): State<App>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    blocking(&app, move |d| d.delete_instance(&id)).await?;
    Ok(no_content())
}

// ----------------------------------------------------------- cards, events

#[utoipa::path(get, path = "/v1/cards", tag = "cards", responses((status = 200, body = Vec<Card>)))]
async fn list_cards(State(app): State<App>) -> Json<Vec<Card>> {
    Json(app.daemon.cards())
}

#[utoipa::path(get, path = "/v1/cards/{name}/metrics", tag = "cards", params(("name" = String, Path)),
    responses((status = 200, body = CardMetrics), (status = "4XX", body = ErrorBody)))]
async fn card_metrics(
    State(app): State<App>,
    Path(name): Path<String>,
) -> Result<Json<CardMetrics>, ApiError> {
    Ok(Json(blocking(&app, move |d| d.card_metrics(&name)).await?))
}

// ------------------------------------------------------------------ firmware

#[utoipa::path(get, path = "/v1/firmware", tag = "firmware",
    responses((status = 200, body = Firmware)))]
async fn firmware(State(app): State<App>) -> Json<Firmware> {
    Json(app.daemon.firmware())
}

/// Verifies the image (a tampered binary or an unknown signer is a 422
/// naming it, and nothing changes), then restarts the cards on it one at
/// a time, each healthy before the next. Answers when every card is done.
#[utoipa::path(post, path = "/v1/firmware/update", tag = "firmware", request_body = UpdateFirmware,
    responses((status = 200, body = FirmwareUpdated), (status = "4XX", body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn update_firmware(
    State(app): State<App>,
    Strict(req): Strict<UpdateFirmware>,
) -> Result<Json<FirmwareUpdated>, ApiError> {
    Ok(Json(blocking(&app, move |d| d.update_firmware(req)).await?))
}

#[utoipa::path(get, path = "/v1/firmware/boot-log", tag = "firmware",
    responses((status = 200, body = BootLog)))]
async fn boot_log(State(app): State<App>) -> Result<Json<BootLog>, ApiError> {
    Ok(Json(blocking(&app, |d| d.boot_log()).await?))
}

/// `GET /v1/events` filters.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    /// Only events after this `seq`.
    #[serde(default)]
    pub since: Option<i64>,
    /// Only events about this resource or card.
    #[serde(default)]
    pub resource: Option<String>,
    /// At most this many (the newest); 1 to 1000, default 100.
    #[serde(default)]
    pub limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventQuery),
    responses((status = 200, body = Vec<Event>), (status = "4XX", body = ErrorBody)))]
async fn list_events(
    State(app): State<App>,
    query: Result<Query<EventQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to 1000, got {limit}"),
        ));
    }
    Ok(Json(app.daemon.events(
        q.since.unwrap_or(0),
        q.resource.as_deref(),
        limit,
    )?))
}

// -------------------------------------------------------------------- router

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cardsim mgmt-channel",
        description = "The control plane of cardsim's cards: the verified card image they run, volumes, instance-store namespaces, subnets, security groups, ENIs and instances. Errors are `{\"error\": {\"code\", \"message\", \"field\"?}}`; a refused request changes nothing."
    ),
    paths(
        create_volume,
        list_volumes,
        describe_volume,
        modify_volume,
        delete_volume,
        attach_volume,
        detach_volume,
        create_namespace,
        list_namespaces,
        describe_namespace,
        delete_namespace,
        create_subnet,
        list_subnets,
        describe_subnet,
        delete_subnet,
        create_security_group,
        list_security_groups,
        describe_security_group,
        set_rules,
        delete_security_group,
        create_eni,
        list_enis,
        describe_eni,
        modify_eni,
        delete_eni,
        run_instance,
        register_instance,
        list_instances,
        describe_instance,
        delete_instance,
        list_cards,
        card_metrics,
        list_events,
        firmware,
        update_firmware,
        boot_log,
    ),
    components(schemas(ErrorBody, Rule))
)]
pub struct ApiDoc;

/// The OpenAPI document, as checked in at `mgmt-channel/openapi.json`.
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    // The crate's version would make the document drift on every release.
    doc.info.version = "1".into();
    let mut text = doc.to_pretty_json().unwrap_or_default();
    text.push('\n');
    text
}

pub fn router(app: App) -> Router<()> {
    Router::new()
        .route("/v1/volumes", post(create_volume).get(list_volumes))
        .route(
            "/v1/volumes/{id}",
            get(describe_volume)
                .patch(modify_volume)
                .delete(delete_volume),
        )
        .route("/v1/volumes/{id}/attach", post(attach_volume))
        .route("/v1/volumes/{id}/detach", post(detach_volume))
        .route(
            "/v1/namespaces",
            post(create_namespace).get(list_namespaces),
        )
        .route(
            "/v1/namespaces/{id}",
            get(describe_namespace).delete(delete_namespace),
        )
        .route("/v1/subnets", post(create_subnet).get(list_subnets))
        .route(
            "/v1/subnets/{id}",
            get(describe_subnet).delete(delete_subnet),
        )
        .route(
            "/v1/security-groups",
            post(create_security_group).get(list_security_groups),
        )
        .route(
            "/v1/security-groups/{id}",
            get(describe_security_group).delete(delete_security_group),
        )
        .route(
            "/v1/security-groups/{id}/rules",
            axum::routing::put(set_rules),
        )
        .route("/v1/enis", post(create_eni).get(list_enis))
        .route(
            "/v1/enis/{id}",
            get(describe_eni).patch(modify_eni).delete(delete_eni),
        )
        .route("/v1/instances", post(run_instance).get(list_instances))
        .route("/v1/instances/register", post(register_instance))
        .route(
            "/v1/instances/{id}",
            get(describe_instance).delete(delete_instance),
        )
        .route("/v1/cards", get(list_cards))
        .route("/v1/cards/{name}/metrics", get(card_metrics))
        .route("/v1/events", get(list_events))
        .route("/v1/firmware", get(firmware))
        .route("/v1/firmware/update", post(update_firmware))
        .route("/v1/firmware/boot-log", get(boot_log))
        .fallback(|| async { ApiError::new(ErrorKind::NotFound, "no such path") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(ErrorKind::BadRequest, "method not allowed on this path")
        })
        .with_state(app)
}

// ---------------------------------------------------------- callers, audit

/// The peer of a unix-socket connection.
#[derive(Debug, Clone, Copy)]
pub struct UnixPeer {
    pub uid: Option<u32>,
}

impl Connected<axum::serve::IncomingStream<'_, tokio::net::UnixListener>> for UnixPeer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        UnixPeer {
            uid: stream.io().peer_cred().ok().map(|c| c.uid()),
        }
    }
}

/// On the unix socket, the caller is the peer's uid.
pub async fn unix_caller(mut req: Request, next: Next) -> Response {
    let uid = req
        .extensions()
        .get::<ConnectInfo<UnixPeer>>()
        .and_then(|c| c.0.uid);
    let name = match uid {
        Some(uid) => format!("uid:{uid}"),
        None => "uid:unknown".into(),
    };
    req.extensions_mut().insert(Caller {
        name,
        access: Access::Write,
    });
    next.run(req).await
}

/// On TCP, the caller is the bearer token's name; without one, 401.
pub async fn tcp_caller(State(app): State<App>, mut req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    let Some(token) = check_bearer(&app.tokens, header) else {
        let call = format!("{} {}", req.method(), req.uri().path());
        let error = ApiError::new(ErrorKind::Unauthorized, "a valid bearer token is required");
        if is_mutating(req.method()) {
            audit(&app, "anonymous", call, &error);
        }
        return error.into_response();
    };
    req.extensions_mut().insert(Caller {
        name: format!("token:{}", token.name),
        access: token.access,
    });
    next.run(req).await
}

fn is_mutating(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn audit(app: &App, caller: &str, call: String, error: &ApiError) {
    app.audit.record(&AuditRecord {
        time_ms: now_ms(),
        caller,
        call,
        status: error.kind.status(),
        result: error.kind.code(),
    });
}

/// Refuses a mutating call from a read-only caller, and writes every
/// mutating call to the audit log with its result.
pub async fn guard(State(app): State<App>, req: Request, next: Next) -> Response {
    let caller = req.extensions().get::<Caller>().cloned().unwrap_or(Caller {
        name: "unknown".into(),
        access: Access::Read,
    });
    let method = req.method().clone();
    if !is_mutating(&method) {
        return next.run(req).await;
    }
    let call = format!("{method} {}", req.uri().path());
    if caller.access != Access::Write {
        let error = ApiError::new(
            ErrorKind::Forbidden,
            format!("{} may describe but not change anything", caller.name),
        );
        audit(&app, &caller.name, call, &error);
        return error.into_response();
    }
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let result = response
        .extensions()
        .get::<ErrorKind>()
        .map(|k| k.code())
        .unwrap_or(if status < 400 { "ok" } else { "error" });
    app.audit.record(&AuditRecord {
        time_ms: now_ms(),
        caller: &caller.name,
        call,
        status,
        result,
    });
    response
}

/// The router for the unix socket.
pub fn unix_router(app: App) -> Router<()> {
    router(app.clone())
        .layer(middleware::from_fn_with_state(app, guard))
        .layer(middleware::from_fn(unix_caller))
}

/// The router for the TCP listener.
pub fn tcp_router(app: App) -> Router<()> {
    router(app.clone())
        .layer(middleware::from_fn_with_state(app.clone(), guard))
        .layer(middleware::from_fn_with_state(app, tcp_caller))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_name_the_field() {
        let e =
            parse_body::<CreateVolume>(br#"{"size_bytes": 1, "volume_type": "gp3", "colour": 1}"#)
                .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert_eq!(e.field.as_deref(), Some("colour"), "{e}");
        let e = parse_body::<CreateVolume>(br#"{"size_bytes": "big", "volume_type": "gp3"}"#)
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("size_bytes"), "{e}");
        let e =
            parse_body::<CreateVolume>(br#"{"size_bytes": 1, "volume_type": "gp9"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("volume_type"), "{e}");
        let e = parse_body::<CreateVolume>(br#"{"volume_type": "gp3"}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("size_bytes"), "{e}");
        let e = parse_body::<CreateVolume>(br#"{"size_bytes": 1, "#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        let e = parse_body::<CreateVolume>(br#"{"size_bytes": 1, "volume_type": "gp3"} x"#)
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
    }

    #[test]
    fn openapi_document_is_checked_in() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        let current = openapi_json();
        assert!(
            checked_in == current,
            "mgmt-channel/openapi.json is not the document the code generates: \
             run `cargo run -p mgmt-channel --bin mgmt-channel -- --print-openapi > mgmt-channel/openapi.json`"
        );
    }
}
