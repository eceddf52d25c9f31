//! The OpenAPI document of this API, generated from the handlers' `#[utoipa::path]`
//! annotations and the request and response types. The agent serves it at
//! `GET /v1/openapi.json`; the repository keeps it as `openapi.json`, so that a diff shows
//! every change to the API (`tests/openapi.rs` fails when the two differ, and
//! `UPDATE_OPENAPI=1 cargo test --test openapi` or `hvnode openapi` writes it anew).
//!
//! What holds for every operation is added here once rather than on each handler: the error
//! envelope as the `default` response, and the bearer token as the global security
//! requirement (the public routes opt out with `security(())`). Answers whose type is
//! built ad hoc (`serde_json::json!`) or lives outside the modules that derive schemas are
//! described by the types at the end of this file.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Components, ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use uuid::Uuid;

use super::error::ErrorBody;
use super::{console, networks, node, snapshots, status, tasks, vms};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hvnode node API",
        description = "The API that a VPS platform's control plane calls on every hypervisor \
            (the contract is `node-api.md`). Every answer is an envelope: \
            `{\"success\": true, \"data\": …, \"message\"?: …}` or \
            `{\"success\": false, \"error\", \"error_code\", \"message\"}`, including 404 for an \
            unknown route and 405 for a wrong method. Every route but `/v1/health` and the \
            console page, files and WebSocket (which the console ticket authenticates) needs \
            `Authorization: Bearer <token>`.",
        license(name = "Apache-2.0"),
    ),
    paths(
        node::health,
        node::node_info,
        node::templates,
        openapi_json,
        vms::vm_create,
        vms::vm_list,
        vms::vm_get,
        vms::vm_deployment,
        vms::vm_delete,
        vms::vm_start,
        vms::vm_stop,
        vms::vm_restart,
        vms::vm_reset,
        vms::vm_suspend,
        vms::vm_resume,
        vms::vm_reinstall,
        vms::vm_resize,
        snapshots::snapshot_list,
        snapshots::snapshot_create,
        snapshots::snapshot_rollback,
        snapshots::snapshot_delete,
        networks::ip_list,
        networks::ip_add,
        networks::ip_remove,
        networks::ip_move,
        networks::network_list,
        networks::subnets,
        networks::network_create,
        networks::network_delete,
        networks::network_attach,
        networks::network_detach,
        status::vm_status,
        status::vm_status_stream,
        status::metrics,
        console::console_create,
        console::console_page,
        console::console_asset,
        console::console_ws,
        tasks::task_list,
        tasks::task_get,
    ),
    components(schemas(ErrorBody)),
    modifiers(&Conventions),
    security(("bearer" = [])),
    tags(
        (name = "node", description = "The agent and its host"),
        (name = "vms", description = "VPS lifecycle: create, read, power, reinstall, resize, delete"),
        (name = "snapshots", description = "Disk (and memory) snapshots of a VPS"),
        (name = "ips", description = "The addresses of a VPS"),
        (name = "private-networks", description = "Isolated L2 segments between VPSs"),
        (name = "status", description = "Live status and metrics"),
        (name = "console", description = "noVNC and serial consoles, by ticket"),
        (name = "tasks", description = "The long operations the agent runs"),
    ),
)]
struct ApiDoc;

/// The document, as a value.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as pretty JSON, the form checked in as `openapi.json`. Maps are ordered
/// (paths, schemas and properties by name), so the text is stable.
pub fn json() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("an OpenAPI document always serializes");
    text.push('\n');
    text
}

/// This document. Like every route but the contract's public ones, it needs the token.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "node",
    responses((status = 200, description = "This OpenAPI document (not in the envelope)",
        content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> Response {
    static JSON: OnceLock<String> = OnceLock::new();
    (
        [(header::CONTENT_TYPE, "application/json")],
        JSON.get_or_init(json).as_str(),
    )
        .into_response()
}

/// What every operation shares.
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Components::new);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token whose SHA-256 is in the agent's `api.token_sha256`. \
                         Missing: 401 `NO_API_KEY`; wrong: 401 `INVALID_API_KEY`.",
                    ))
                    .build(),
            ),
        );
        components.responses.insert(
            "Error".into(),
            ResponseBuilder::new()
                .description("An error, in the envelope; `error_code` says which")
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                        .build(),
                )
                .into(),
        );
        refer_to_data_schemas(components);
        for item in doc.paths.paths.values_mut() {
            for op in operations(item) {
                op.responses
                    .responses
                    .entry("default".into())
                    .or_insert_with(|| Ref::from_response_name("Error").into());
                if let Some(body) = op.request_body.as_mut() {
                    unwrap_optional_body(body);
                }
            }
        }
    }
}

/// utoipa inlines `T` into each `Envelope<T>`; a reference to `T`'s own schema says the same
/// once.
fn refer_to_data_schemas(components: &mut Components) {
    let names: Vec<String> = components.schemas.keys().cloned().collect();
    for (name, schema) in components.schemas.iter_mut() {
        let Some(data) = name.strip_prefix("Envelope_") else {
            continue;
        };
        if !names.iter().any(|n| n == data) {
            continue;
        }
        if let RefOr::T(Schema::Object(envelope)) = schema {
            envelope
                .properties
                .insert("data".into(), Ref::from_schema_name(data).into());
        }
    }
}

fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.options,
        &mut item.head,
        &mut item.patch,
        &mut item.trace,
    ]
    .into_iter()
    .filter_map(Option::as_mut)
}

/// utoipa writes a body declared `Option<T>` as "`null` or T"; ours means "empty or T"
/// (the body is then not required), and `null` is not accepted.
fn unwrap_optional_body(body: &mut RequestBody) {
    for content in body.content.values_mut() {
        let Some(RefOr::T(Schema::OneOf(one_of))) = &content.schema else {
            continue;
        };
        let rest: Vec<_> = one_of.items.iter().filter(|s| !is_null(s)).collect();
        if let [only] = rest[..] {
            content.schema = Some(only.clone());
        }
    }
}

fn is_null(schema: &RefOr<Schema>) -> bool {
    let null = SchemaType::Type(Type::Null);
    matches!(schema, RefOr::T(Schema::Object(o)) if o.schema_type == null)
}

/// `success` of a success envelope.
pub(super) fn always_true() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([true]))
        .build()
}

/// `success` of an error envelope.
pub(super) fn always_false() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Boolean)
        .enum_values(Some([false]))
        .build()
}

// Path parameters.

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct VpsId {
    /// The VPS id. Any other text names no VPS (`VPS_NOT_FOUND`).
    pub id: Uuid,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct VpsSnapshot {
    /// The VPS id.
    pub id: Uuid,
    /// The snapshot's name.
    #[param(pattern = "^[A-Za-z0-9_]{1,40}$")]
    pub name: String,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct VpsAddress {
    /// The VPS id.
    pub id: Uuid,
    /// One of the VPS's addresses.
    #[param(example = "203.0.113.20")]
    pub address: String,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct NetworkId {
    /// The private network's id.
    pub id: Uuid,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct NetworkMember {
    /// The private network's id.
    pub id: Uuid,
    /// The membership's id (`membership_id` of the attach).
    pub membership_id: Uuid,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
pub struct TaskId {
    /// The task id.
    pub id: Uuid,
}

// Strings with a fixed set of values.

// Answers built with `serde_json::json!`.

/// `DELETE /v1/vms/{id}/ips/{address}`.
#[derive(Serialize, ToSchema)]
pub struct IpRemoved {
    pub deleted: bool,
    pub vps_id: Uuid,
    /// As given in the path.
    pub address: String,
}

/// `DELETE /v1/private-networks/{id}`.
#[derive(Serialize, ToSchema)]
pub struct NetworkDeleted {
    pub deleted: bool,
    pub id: Uuid,
}

/// `DELETE /v1/private-networks/{id}/members/{membership_id}`.
#[derive(Serialize, ToSchema)]
pub struct MemberDetached {
    pub deleted: bool,
    pub membership_id: Uuid,
}

/// `GET /v1/tasks`.
#[derive(Serialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<crate::vm::model::TaskView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::PartialSchema;

    /// The keys a value serializes to, sorted.
    fn keys<T: Serialize>(value: &T) -> Vec<String> {
        let json = serde_json::to_value(value).expect("serializes");
        let mut keys: Vec<String> = json
            .as_object()
            .expect("an object")
            .keys()
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    /// The property names of a schema, sorted.
    fn properties<T: PartialSchema>() -> Vec<String> {
        let RefOr::T(Schema::Object(object)) = T::schema() else {
            panic!("not an object schema");
        };
        object.properties.keys().cloned().collect()
    }

    #[test]
    fn schemas_have_the_fields_their_types_serialize() {
        assert_eq!(
            keys(&crate::node::CpuFigures::default()),
            properties::<crate::node::CpuFigures>()
        );
        assert_eq!(
            keys(&crate::node::MemoryFigures::default()),
            properties::<crate::node::MemoryFigures>()
        );
        assert_eq!(
            keys(&crate::node::FsUsage::default()),
            properties::<crate::node::FsUsage>()
        );
        assert_eq!(
            keys(&crate::vm::InstanceCounts::default()),
            properties::<crate::vm::InstanceCounts>()
        );
        assert_eq!(
            keys(&crate::vm::Reconciliation::default()),
            properties::<crate::vm::Reconciliation>()
        );
        assert_eq!(
            keys(&crate::network::Applied::default()),
            properties::<crate::network::Applied>()
        );
    }

    #[test]
    fn an_optional_body_is_empty_or_the_type_never_null() {
        let doc = document();
        let op = doc.paths.paths["/v1/vms/{id}/ips"]
            .post
            .as_ref()
            .expect("documented");
        let body = op.request_body.as_ref().expect("has a body");

        let schema = serde_json::to_value(&body.content["application/json"].schema).unwrap();

        assert_eq!(
            schema,
            serde_json::json!({"$ref": "#/components/schemas/AddIpRequest"})
        );
        assert!(body.required.is_none());
    }
}
