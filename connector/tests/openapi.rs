//! The OpenAPI document: valid OpenAPI 3 (checked with
//! `openapi-spec-validator` from PyPI, installed by this test into a
//! virtual environment under the target directory), served as generated,
//! and the same routes as the router serves. Routes are registered only
//! through `utoipa_axum::routes!` in `api::api_router`, which documents each
//! one it routes; the tests check the list against the one written here and
//! that every documented path is routed (answered by its handler's method
//! router, not the fallback).

mod support;

use std::path::PathBuf;
use std::process::Command;

use backbone_connector::api::openapi_document;
use support::{Broker, Connector};

/// A virtual environment with `openapi-spec-validator`, made once per
/// target directory.
fn validator() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("openapi-venv");
    let python = venv.join("bin/python");
    let ready = venv.join("ready");
    if !ready.exists() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv (python3 with venv is needed)");
        assert!(status.success(), "making the virtual environment failed");
        let status = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openapi-spec-validator==0.7.2",
            ])
            .status()
            .expect("pip");
        assert!(
            status.success(),
            "installing openapi-spec-validator from PyPI failed"
        );
        std::fs::write(&ready, b"").expect("mark ready");
    }
    python
}

fn validate(document: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, document).expect("write");
    let output = Command::new(validator())
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .expect("run the validator");
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

#[test]
fn the_document_is_valid_openapi_3_and_the_validator_catches_a_broken_one() {
    let document = openapi_document().to_pretty_json().expect("JSON");
    assert!(document.contains("\"openapi\": \"3."), "OpenAPI 3");
    validate(&document).expect("the generated document is valid");
    // The check itself works: a dangling reference is refused.
    let broken = document.replacen(
        "#/components/schemas/Problem",
        "#/components/schemas/Nowhere",
        1,
    );
    assert_ne!(broken, document);
    assert!(validate(&broken).is_err(), "a broken document is refused");
}

#[test]
fn every_route_is_documented() {
    let document = openapi_document();
    let mut paths: Vec<(String, String)> = Vec::new();
    for (path, item) in &document.paths.paths {
        let methods = [
            ("get", item.get.is_some()),
            ("post", item.post.is_some()),
            ("put", item.put.is_some()),
            ("delete", item.delete.is_some()),
        ];
        for (method, present) in methods {
            if present {
                paths.push((method.to_owned(), path.clone()));
            }
        }
    }
    paths.sort();
    let mut expected: Vec<(String, String)> = [
        ("get", "/health"),
        ("get", "/metrics"),
        ("get", "/api/v1/openapi.json"),
        ("get", "/api/v1/identity"),
        ("get", "/api/v1/messages"),
        ("post", "/api/v1/messages"),
        ("get", "/api/v1/messages/{id}"),
        ("get", "/api/v1/messages/{id}/attachments/{index}"),
        ("get", "/api/v1/relationships"),
        ("put", "/api/v1/relationships/policy"),
        ("get", "/api/v1/relationships/templates"),
        ("post", "/api/v1/relationships/templates"),
        ("delete", "/api/v1/relationships/templates/{id}"),
        ("post", "/api/v1/relationships/requests"),
        ("post", "/api/v1/relationships/{peer}/{decision}"),
        ("get", "/api/v1/tokens"),
        ("post", "/api/v1/tokens"),
        ("post", "/api/v1/tokens/fetch"),
        ("delete", "/api/v1/tokens/{id}"),
        ("get", "/api/v1/files"),
        ("post", "/api/v1/files"),
        ("get", "/api/v1/files/{id}"),
        ("delete", "/api/v1/files/{id}"),
        ("get", "/api/v1/files/{id}/content"),
        ("post", "/api/v1/files/fetch"),
        ("get", "/api/v1/events"),
        ("get", "/api/v1/events/stream"),
        ("get", "/api/v1/webhooks/deliveries"),
        ("post", "/api/v1/webhooks/deliveries/{id}/retry"),
    ]
    .iter()
    .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
    .collect();
    expected.sort();
    assert_eq!(paths, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_connector_serves_the_document_and_metrics() {
    let broker = Broker::start().await;
    let connector = Connector::start(&broker, &[]).await;
    let served = connector.api.get("/api/v1/openapi.json").await;
    let generated: serde_json::Value =
        serde_json::to_value(openapi_document()).expect("the document as JSON");
    assert_eq!(served, generated);
    // Every route in the document answers something other than "no such
    // route" (404 with the not-found problem and no body of its own).
    for path in openapi_document().paths.paths.keys() {
        let concrete = path
            .replace("{id}", "1")
            .replace("{index}", "0")
            .replace("{peer}", &connector.address().await)
            .replace("{decision}", "accept");
        let response = connector
            .api
            .request(reqwest::Method::OPTIONS, &concrete)
            .send()
            .await
            .expect("OPTIONS");
        // axum answers 405 for a known path with another method.
        assert_eq!(response.status(), 405, "{concrete} is routed");
    }
    // Metrics need the key too, and name the Connector's counters.
    let response = connector
        .api
        .http
        .get(connector.api.url("/metrics"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 401);
    let response = connector
        .api
        .request(reqwest::Method::GET, "/metrics")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("text");
    assert!(text.contains("connector_api_errors_total"), "{text}");
}
