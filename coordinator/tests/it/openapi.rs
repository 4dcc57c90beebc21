//! The OpenAPI document covers every route the router registers, and is what the server serves.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::StatusCode;
use serde_json::Value;

use crate::support::{Engine, start};

/// The router's source: routes are read from it, so a new route without documentation fails here.
const ROUTER_SOURCE: &str = include_str!("../../src/api/mod.rs");
const DOCUMENT: &str = include_str!("../../openapi.json");
const METHODS: [&str; 6] = ["get", "post", "put", "delete", "head", "patch"];

/// Every `.route("path", method(handler).method(handler)…)` in the router: path → methods.
fn registered_routes() -> BTreeMap<String, BTreeSet<String>> {
    let mut routes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (at, _) in ROUTER_SOURCE.match_indices(".route(\"") {
        let rest = &ROUTER_SOURCE[at + ".route(\"".len()..];
        let (path, rest) = rest.split_once('"').expect("closing quote of a route path");
        // The method router runs to the `)` that closes `.route(`.
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find_map(|(i, c)| {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                (depth == 0).then_some(i)
            })
            .expect("closing parenthesis of .route(");
        let handlers = &rest[..end];
        let methods = routes.entry(path.to_owned()).or_default();
        for m in METHODS {
            let call = format!("{m}(");
            for (i, _) in handlers.match_indices(&call) {
                // `get(`, `.get(` — not `get_chunk(` or `x_get(`.
                let before = handlers[..i].chars().next_back();
                if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == ':')) {
                    methods.insert(m.to_owned());
                }
            }
        }
        assert!(!methods.is_empty(), "no method found for route {path}: {handlers}");
    }
    routes
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let routes = registered_routes();
    assert!(routes.len() >= 25, "the router parse found only {} routes: {routes:?}", routes.len());
    assert!(routes["/v1/chunks/{id}"].contains("head"), "{routes:?}");
    let doc: Value = serde_json::from_str(DOCUMENT).expect("openapi.json is JSON");
    let paths = doc["paths"].as_object().expect("paths");
    let mut problems = Vec::new();
    for (path, methods) in &routes {
        let Some(item) = paths.get(path) else {
            problems.push(format!("{path} is not documented"));
            continue;
        };
        for m in methods {
            match item.get(m) {
                Some(op) if op["responses"].as_object().is_some_and(|r| !r.is_empty()) => {}
                Some(_) => problems.push(format!("{} {path} documents no responses", m.to_uppercase())),
                None => problems.push(format!("{} {path} is not documented", m.to_uppercase())),
            }
        }
        for documented in item.as_object().expect("path item").keys().filter(|k| METHODS.contains(&k.as_str())) {
            if !methods.contains(documented) {
                problems.push(format!("{} {path} is documented but not routed", documented.to_uppercase()));
            }
        }
    }
    for path in paths.keys() {
        if !routes.contains_key(path) {
            problems.push(format!("{path} is documented but not routed"));
        }
    }
    assert!(problems.is_empty(), "openapi.json and src/api/mod.rs disagree:\n{}", problems.join("\n"));
}

#[test]
fn references_resolve_and_bearer_is_the_scheme() {
    let doc: Value = serde_json::from_str(DOCUMENT).expect("JSON");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["type"], "http");
    // Every $ref points at something that exists.
    fn walk(v: &Value, doc: &Value, bad: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    let target = r.strip_prefix('#').map(|p| doc.pointer(p));
                    if !matches!(target, Some(Some(_))) {
                        bad.push(r.clone());
                    }
                }
                m.values().for_each(|v| walk(v, doc, bad));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, doc, bad)),
            _ => {}
        }
    }
    let mut bad = Vec::new();
    walk(&doc, &doc, &mut bad);
    assert!(bad.is_empty(), "unresolved $refs: {bad:?}");
    // Error answers share one shape.
    let error = &doc["components"]["schemas"]["Error"]["properties"]["error"]["required"];
    assert_eq!(error, &serde_json::json!(["code", "message"]));
}

async fn served_document_is_openapi_3_1(engine: Engine) {
    let s = start(engine).await;
    let resp = s.http.get(format!("{}/v1/openapi.json", s.url)).send().await.expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let doc: Value = resp.json().await.expect("the served document parses as JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.1.")), "{}", doc["openapi"]);
    assert_eq!(doc, serde_json::from_str::<Value>(DOCUMENT).expect("JSON"));
    // An error answer has the documented shape.
    let (status, body) = s.get("/v1/releases/999999", Some(&s.admin)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string(), "{body}");
}

crate::both_engines!(served_document_is_openapi_3_1);
