//! HTTPS served by the coordinator itself (rustls on ring): devices and publishers reach it
//! with the fleet's CA; a client without that CA, plain HTTP, and a peer that never completes
//! its handshake get nowhere and hold up no one.

use flotilla_coordinator::config::Config;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::{Engine, Keys, http_client, start_with, tls_fixture};

const SECRET: &str = "enroll-secret-0123456789";

fn with_tls(c: &mut Config) {
    c.tls_cert = Some(tls_fixture("server.pem"));
    c.tls_key = Some(tls_fixture("server.key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_api_to_clients_that_trust_the_ca() {
    let s = start_with(Engine::Sqlite, with_tls).await;
    assert!(s.url.starts_with("https://127.0.0.1:"), "{}", s.url);

    // A peer that connects and never says a word does not hold up the others.
    let idle = tokio::net::TcpStream::connect(s.url.trim_start_matches("https://")).await.expect("connect");

    let keys = Keys::new(41);
    s.create_product("secure", &keys, SECRET).await;
    let token = s.enroll("secure", "dev-tls", "stable", SECRET, None).await;
    let resp = s.http.get(format!("{}/v1/updates/check", s.url)).bearer_auth(&token).send().await.expect("check");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    drop(idle);

    // The system roots alone do not vouch for the fleet's CA.
    let err = http_client(false).get(format!("{}/healthz", s.url)).send().await.expect_err("untrusted certificate");
    let chain = format!("{:?}", error_chain(&err));
    assert!(chain.contains("certificate") || chain.contains("Certificate"), "{chain}");

    // Plain HTTP to the TLS port gets no API answer.
    let plain = s.url.replace("https://", "http://");
    let answered = http_client(false).get(format!("{plain}/healthz")).send().await;
    assert!(answered.as_ref().map_or(true, |r| !r.status().is_success()), "plain HTTP answered: {answered:?}");

    // Enrolment over TLS carries the secret only to the holder of the key.
    let (status, body) = s
        .post(
            "/v1/devices/enroll",
            None,
            json!({ "device_id": "dev-tls-2", "product": "secure", "channel": "stable", "enrollment_secret": SECRET }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out
}

#[test]
fn a_key_that_does_not_fit_the_certificate_is_refused_at_start() {
    let other_key = tempfile::NamedTempFile::new().expect("tmp");
    // The CA's certificate with the server's key: a mismatch rustls catches.
    let err = flotilla_coordinator::tls::server_config(&tls_fixture("ca.pem"), &tls_fixture("server.key"))
        .expect_err("mismatched key");
    assert!(err.to_string().contains("does not fit the certificate"), "{err}");
    let err = flotilla_coordinator::tls::server_config(&tls_fixture("server.pem"), other_key.path())
        .expect_err("empty key file");
    assert!(err.to_string().contains("TLS key"), "{err}");
    let err = flotilla_coordinator::tls::server_config(other_key.path(), &tls_fixture("server.key"))
        .expect_err("empty certificate file");
    assert!(err.to_string().contains("no PEM certificate"), "{err}");

    let mut half = Config { tls_cert: Some(tls_fixture("server.pem")), ..Config::default() };
    assert!(half.validate().expect_err("cert without key").to_string().contains("tls_cert and tls_key go together"));
    half.tls_key = Some(tls_fixture("server.key"));
    half.validate().expect("both set");
}
