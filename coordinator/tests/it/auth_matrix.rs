//! Every endpoint × every kind of caller: nobody, a device, another product's publisher, the
//! product's publisher, the product's site cache (read-only), an admin.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{Engine, Keys, image, release, start};

const SECRET: &str = "enroll-secret-0123456789";

#[derive(Debug, Clone, Copy)]
enum Who {
    Nobody,
    Device,
    OtherPublisher,
    Publisher,
    Cache,
    Admin,
}

async fn authorization_matrix(engine: Engine) {
    let s = start(engine).await;
    let keys = Keys::new(8);
    let api = s.create_product("mine", &keys, SECRET).await;
    let other_api = s.create_product("theirs", &Keys::new(9), SECRET).await;
    let device = s.enroll("mine", "m-1", "stable", SECRET, None).await;
    let id = release(&s, &api, &keys, "mine", "1.0.0", 1, &image(4, 20_000), json!({ "percent": 100 })).await;
    let cache = |product: &str| {
        let body = json!({ "scope": "cache", "product": product, "label": format!("cache-{product}") });
        let (s, admin) = (&s, s.admin.clone());
        async move {
            let (status, body) = s.post("/v1/tokens", Some(&admin), body).await;
            assert_eq!(status, StatusCode::CREATED, "{body}");
            body["token"].as_str().expect("token").to_owned()
        }
    };
    let cache_token = cache("mine").await;
    let token = |w: Who| match w {
        Who::Nobody => None,
        Who::Device => Some(device.clone()),
        Who::OtherPublisher => Some(other_api.clone()),
        Who::Publisher => Some(api.clone()),
        Who::Cache => Some(cache_token.clone()),
        Who::Admin => Some(s.admin.clone()),
    };
    use Who::*;
    // (method, path, body, who is allowed). Allowed callers must not get 401/403; the
    // others must get exactly 401 (no token) or 403.
    let cases: Vec<(Method, String, serde_json::Value, Vec<Who>)> = vec![
        (Method::GET, "/v1/updates/check".into(), json!(null), vec![Device]),
        (Method::POST, "/v1/devices/events".into(), json!({ "events": [] }), vec![Device]),
        (Method::POST, "/v1/chunks/missing".into(), json!({ "ids": [] }), vec![OtherPublisher, Publisher, Admin]),
        (Method::GET, "/v1/releases?product=mine".into(), json!(null), vec![Publisher, Cache, Admin]),
        (Method::GET, format!("/v1/releases/{id}"), json!(null), vec![Publisher, Cache, Admin]),
        (Method::GET, format!("/v1/releases/{id}/stats"), json!(null), vec![Publisher, Admin]),
        (Method::POST, format!("/v1/releases/{id}/pause"), json!({}), vec![Publisher, Admin]),
        (Method::POST, format!("/v1/releases/{id}/resume"), json!({}), vec![Publisher, Admin]),
        (Method::POST, format!("/v1/releases/{id}/advance"), json!({}), vec![Publisher, Admin]),
        (Method::POST, format!("/v1/releases/{id}/percentage"), json!({ "percent": 50 }), vec![Publisher, Admin]),
        (Method::POST, format!("/v1/releases/{id}/halt"), json!({}), vec![Publisher, Admin]),
        (Method::POST, format!("/v1/releases/{id}/rollback"), json!({ "manifest": "{}" }), vec![Publisher, Admin]),
        (Method::DELETE, format!("/v1/releases/{id}"), json!(null), vec![Publisher, Admin]),
        (Method::POST, "/v1/releases".into(), json!({ "product": "mine", "manifest": "{}" }), vec![Publisher, Admin]),
        (Method::GET, "/v1/devices?product=mine".into(), json!(null), vec![Publisher, Admin]),
        (
            Method::PUT,
            "/v1/products/mine/stages".into(),
            json!({ "stages": [{ "percent": 100 }] }),
            vec![Publisher, Admin],
        ),
        (Method::POST, "/v1/products".into(), json!({ "name": "x", "trust_root": "{}" }), vec![Admin]),
        (Method::GET, "/v1/products".into(), json!(null), vec![Admin]),
        (
            Method::POST,
            "/v1/tokens".into(),
            json!({ "scope": "publish", "product": "mine", "label": "ci" }),
            vec![Admin],
        ),
        (Method::GET, "/v1/audit".into(), json!(null), vec![Admin]),
        (Method::POST, "/v1/auth/refresh".into(), json!(null), vec![OtherPublisher, Publisher, Cache, Admin]),
    ];
    for (method, path, body, allowed) in &cases {
        for who in [Nobody, Device, OtherPublisher, Publisher, Cache, Admin] {
            let body = if body.is_null() { None } else { Some(body.clone()) };
            let (status, resp) = s.req(method.clone(), path, token(who).as_deref(), body).await;
            let is_allowed = allowed.iter().any(|a| std::mem::discriminant(a) == std::mem::discriminant(&who));
            if is_allowed {
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{who:?} {method} {path} → {status}: {resp}"
                );
            } else {
                let expected = if matches!(who, Nobody) { StatusCode::UNAUTHORIZED } else { StatusCode::FORBIDDEN };
                // A device token on publisher routes, and publisher tokens on device routes,
                // are refused: 401 for the check (it only knows device tokens), else 403.
                let ok = status == expected || (path == "/v1/updates/check" && status == StatusCode::UNAUTHORIZED);
                assert!(ok, "{who:?} {method} {path} → {status} (expected {expected}): {resp}");
            }
        }
    }
    // Content is public, like a CDN: addressed by hash, useless without a signed manifest.
    let (status, _) = s.get("/v1/chunks/0000000000000000000000000000000000000000000000000000000000000000", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A cache token reads its own product only, and needs a product to be made.
    let (status, _) = s.get("/v1/releases?product=theirs", Some(&cache_token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // (The matrix archived the release: ask for archived ones too.)
    let (status, body) = s.get("/v1/releases?include_archived=true", Some(&cache_token)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["releases"][0]["id"], id, "{body}");
    let (status, body) = s.post("/v1/tokens", Some(&s.admin), json!({ "scope": "cache", "label": "no-product" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let other_cache = cache("theirs").await;
    let (status, _) = s.get(&format!("/v1/releases/{id}"), Some(&other_cache)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A device only ever sees its own product: there is no parameter to ask for another.
    let (status, _) = s.get("/v1/updates/check?product=theirs", Some(&device)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

async fn api_key_exchange_and_refresh(engine: Engine) {
    let s = start(engine).await;
    let api = s.create_product("keys", &Keys::new(10), SECRET).await;
    let (status, body) = s.post("/v1/auth/token", None, json!({ "api_key": api })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let session = body["token"].as_str().expect("token").to_owned();
    assert_eq!(body["expires_in"], 3600);
    let (status, _) = s.get("/v1/releases", Some(&session)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = s.post("/v1/auth/refresh", Some(&session), json!(null)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let fresh = body["token"].as_str().expect("token").to_owned();
    assert_eq!(
        s.get("/v1/releases", Some(&session)).await.0,
        StatusCode::UNAUTHORIZED,
        "the refreshed token is revoked"
    );
    assert_eq!(s.get("/v1/releases", Some(&fresh)).await.0, StatusCode::OK);
    // Expired tokens are refused with a message that says what to do.
    sqlx::query("UPDATE tokens SET expires_at = 1 WHERE expires_at IS NOT NULL")
        .execute(&s.state.db.pool)
        .await
        .expect("expire");
    let (status, body) = s.get("/v1/releases", Some(&fresh)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().expect("msg").contains("expired"));
    let (status, _) = s.post("/v1/auth/token", None, json!({ "api_key": "flt_wrong" })).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

crate::both_engines!(authorization_matrix, api_key_exchange_and_refresh);
