//! End to end: a broker on loopback and Connector processes made with
//! `backbone-connector init` and run with `serve`, driven through their
//! REST APIs, with a webhook receiver that checks every signature.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Broker, Connector, Receiver, eventually};

fn webhook_env(receiver: &Receiver) -> Vec<(&'static str, String)> {
    vec![
        (
            "BACKBONE_CONNECTOR__WEBHOOKS__ENDPOINTS",
            format!(
                "[{{ url = \"{}\", secret = \"{}\" }}]",
                receiver.url, receiver.secret
            ),
        ),
        (
            "BACKBONE_CONNECTOR__WEBHOOKS__INITIAL_BACKOFF",
            "100ms".into(),
        ),
        ("BACKBONE_CONNECTOR__WEBHOOKS__MAX_BACKOFF", "400ms".into()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connectors_exchange_messages_relationships_files_and_tokens() {
    let broker = Broker::start().await;
    let receiver = Receiver::start().await;
    let a = Connector::start(&broker, &[]).await;
    let b = Connector::start(&broker, &webhook_env(&receiver)).await;
    let (a_address, b_address) = (a.address().await, b.address().await);

    // Every route but /health needs a key.
    let response = a
        .api
        .http
        .get(a.api.url("/api/v1/messages"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let response = a
        .api
        .http
        .get(a.api.url("/api/v1/messages"))
        .bearer_auth("bbk_wrong")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 401);

    // A relationship: B's template, A's request with an introduction, B accepts.
    let template = b
        .api
        .post_ok(
            "/api/v1/relationships/templates",
            &json!({ "ttl_secs": 3600 }),
            201,
        )
        .await;
    let reference = template["reference"].as_str().expect("reference");
    assert!(reference.starts_with("bbt1:"), "{template}");
    let requested = a
        .api
        .post_ok(
            "/api/v1/relationships/requests",
            &json!({ "reference": reference, "message": "ACME Corp, order desk" }),
            201,
        )
        .await;
    assert_eq!(requested["peer"], b_address.as_str());
    assert_eq!(requested["state"], "pending");
    let request_event = eventually("B's webhook hears of the request", || async {
        receiver
            .distinct()
            .into_iter()
            .find(|event| event["kind"] == "relationship.changed")
    })
    .await;
    assert_eq!(request_event["peer"], a_address.as_str());
    assert_eq!(request_event["data"]["intro"], "ACME Corp, order desk");
    assert_eq!(request_event["data"]["relationship"]["state"], "pending");
    let accepted = b
        .api
        .post_ok(
            &format!("/api/v1/relationships/{a_address}/accept"),
            &json!({}),
            200,
        )
        .await;
    assert_eq!(accepted["state"], "active");
    eventually("A sees the relationship active", || async {
        let listed = a.api.get("/api/v1/relationships").await;
        listed["relationships"]
            .as_array()
            .expect("list")
            .iter()
            .any(|r| r["peer"] == b_address.as_str() && r["state"] == "active")
            .then_some(())
    })
    .await;

    // A message through A's API arrives at B, is listed there and reaches
    // B's webhook receiver, signed.
    let sent = a
        .api
        .post_ok(
            "/api/v1/messages",
            &json!({ "recipients": [b_address], "text": "invoice 4711 is due" }),
            201,
        )
        .await;
    assert_eq!(sent["stored"][0]["address"], b_address.as_str());
    assert_eq!(sent["message"]["direction"], "out");
    let received = eventually("B lists the message", || async {
        b.api
            .messages(&format!("peer={a_address}"))
            .await
            .into_iter()
            .find(|m| m["text"] == "invoice 4711 is due")
    })
    .await;
    assert_eq!(received["direction"], "in");
    assert_eq!(received["sender"], a_address.as_str());
    assert_eq!(received["message_id"], sent["message"]["message_id"]);
    let one = b
        .api
        .get(&format!("/api/v1/messages/{}", received["id"]))
        .await;
    assert_eq!(one, received);
    let hooked = eventually("B's webhook gets the message", || async {
        receiver
            .distinct()
            .into_iter()
            .find(|event| event["kind"] == "message.received")
    })
    .await;
    assert_eq!(hooked["data"]["text"], "invoice 4711 is due");
    assert_eq!(receiver.bad_signatures(), 0);
    // A lists what it sent.
    let a_sent = a.api.messages("direction=out").await;
    assert_eq!(a_sent.len(), 1);

    // Bytes with a media type, to two recipients at once.
    let c = Connector::start(&broker, &[]).await;
    let c_address = c.address().await;
    let edi = "AAFVTkEreno6MyeSCg==";
    let sent = a
        .api
        .post_ok(
            "/api/v1/messages",
            &json!({
                "recipients": [b_address, c_address],
                "content_base64": edi,
                "content_type": "application/edifact",
            }),
            201,
        )
        .await;
    assert_eq!(
        sent["stored"].as_array().expect("stored").len(),
        2,
        "{sent}"
    );
    for (name, connector) in [("B", &b), ("C", &c)] {
        let got = eventually(&format!("{name} gets the bytes"), || async {
            connector
                .api
                .messages("direction=in")
                .await
                .into_iter()
                .find(|m| m["content_type"] == "application/edifact")
        })
        .await;
        assert_eq!(got["content_base64"], edi);
        assert_eq!(got["text"], Value::Null);
        assert_eq!(got["recipients"], json!([b_address, c_address]));
    }

    // A file of several MiB: uploaded to A, attached, downloaded by B.
    let file: Vec<u8> = (0..5 * 1024 * 1024 + 123)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let response = a
        .api
        .request(reqwest::Method::POST, "/api/v1/files?name=report.bin")
        .body(file.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), 201);
    let uploaded: Value = response.json().await.expect("JSON");
    assert_eq!(uploaded["size"], file.len() as u64);
    let file_id = uploaded["id"].as_str().expect("id").to_owned();
    let response = a
        .api
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/files/{file_id}/content"),
        )
        .send()
        .await
        .expect("download own");
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.expect("bytes") == file);
    a.api
        .post_ok(
            "/api/v1/messages",
            &json!({
                "recipients": [b_address],
                "text": "the report",
                "attachments": [file_id],
            }),
            201,
        )
        .await;
    let with_file = eventually("B gets the message with the file", || async {
        b.api
            .messages("direction=in")
            .await
            .into_iter()
            .find(|m| m["text"] == "the report")
    })
    .await;
    assert_eq!(with_file["attachments"][0]["name"], "report.bin");
    let response = b
        .api
        .request(
            reqwest::Method::GET,
            &format!("/api/v1/messages/{}/attachments/0", with_file["id"]),
        )
        .send()
        .await
        .expect("download attachment");
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.expect("bytes") == file);

    // A token: created by A, fetched by B by reference.
    let token = a
        .api
        .post_ok(
            "/api/v1/tokens",
            &json!({ "content_text": "onboarding code 12345", "ttl_secs": 600 }),
            201,
        )
        .await;
    let fetched = b
        .api
        .post_ok(
            "/api/v1/tokens/fetch",
            &json!({ "reference": token["reference"] }),
            200,
        )
        .await;
    assert_eq!(fetched["text"], "onboarding code 12345");
    let listed = a.api.get("/api/v1/tokens").await;
    assert_eq!(listed.as_array().expect("tokens").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_typed_problem_and_stores_nothing() {
    let broker = Broker::start().await;
    let a = Connector::start(&broker, &[]).await;
    let b = Connector::start(&broker, &[]).await;
    let b_address = b.address().await;
    let problem = |status: u16, body: &Value, slug: &str| {
        assert_eq!(
            body["type"],
            format!("urn:backbone:connector:problem:{slug}"),
            "{status}: {body}"
        );
        assert_eq!(body["status"], status);
        assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    };

    // Malformed JSON.
    let response = a
        .api
        .request(reqwest::Method::POST, "/api/v1/messages")
        .header("content-type", "application/json")
        .body("{\"recipients\": [")
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    problem(
        400,
        &response.json().await.expect("JSON"),
        "invalid-request",
    );

    // Unknown fields, no recipients, both text and bytes, a bad address.
    for body in [
        json!({ "recipients": [b_address], "text": "x", "colour": "red" }),
        json!({ "recipients": [], "text": "x" }),
        json!({ "recipients": [b_address], "text": "x", "content_base64": "eA==" }),
        json!({ "recipients": ["not-an-address"], "text": "x" }),
        json!({ "recipients": [b_address], "content_base64": "***" }),
        json!({ "recipients": [b_address], "text": "x", "ttl_secs": 0 }),
    ] {
        let (status, answer) = a.api.post("/api/v1/messages", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        problem(400, &answer, "invalid-request");
    }

    // A well-formed address no identity has.
    let nobody = backbone_protocol::Keypair::generate().address().to_string();
    let (status, answer) = a
        .api
        .post(
            "/api/v1/messages",
            &json!({ "recipients": [nobody], "text": "x" }),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    problem(404, &answer, "unknown-address");

    // An attachment that is not a file of this Connector.
    let (status, answer) = a
        .api
        .post(
            "/api/v1/messages",
            &json!({ "recipients": [b_address], "text": "x", "attachments": ["00"] }),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    problem(404, &answer, "not-found");

    // A body over the JSON limit (1 MiB by default). The server answers
    // before reading it all and closes that connection, so the request goes
    // on a client of its own, whose pool no later request shares.
    let huge = "x".repeat(2 * 1024 * 1024);
    let response = reqwest::Client::new()
        .post(a.api.url("/api/v1/messages"))
        .bearer_auth(&a.api.key)
        .json(&json!({ "recipients": [b_address], "text": huge }))
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 413);
    problem(413, &response.json().await.expect("JSON"), "too-large");

    // Bad references.
    for (path, body) in [
        ("/api/v1/tokens/fetch", json!({ "reference": "bbt1:zz" })),
        ("/api/v1/files/fetch", json!({ "reference": "bbf1:nope" })),
        (
            "/api/v1/relationships/requests",
            json!({ "reference": "garbage" }),
        ),
    ] {
        let (status, answer) = a.api.post(path, &body).await;
        assert_eq!(status, 400, "{path}: {answer}");
        problem(400, &answer, "bad-reference");
    }

    // Out-of-range numbers.
    for query in [
        "since_ms=9223372036854775808",
        "until_ms=18446744073709551615",
        "limit=0",
    ] {
        let response = a
            .api
            .request(reqwest::Method::GET, &format!("/api/v1/messages?{query}"))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 400, "{query}");
    }
    let (status, answer) = a
        .api
        .post(
            "/api/v1/messages",
            &json!({ "recipients": [b_address], "text": "x", "ttl_secs": 1u64 << 40 }),
        )
        .await;
    assert_eq!(status, 400, "{answer}");

    // A method a path does not have.
    let response = a
        .api
        .request(reqwest::Method::DELETE, "/api/v1/messages")
        .send()
        .await
        .expect("DELETE");
    assert_eq!(response.status(), 405);
    problem(
        405,
        &response.json().await.expect("JSON"),
        "method-not-allowed",
    );

    // Unknown records and routes.
    let response = a
        .api
        .request(reqwest::Method::GET, "/api/v1/messages/999")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 404);
    let response = a
        .api
        .request(reqwest::Method::GET, "/api/v1/nothing-here")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 404);

    // Nothing of the above was stored or sent.
    assert!(a.api.messages("").await.is_empty());
    assert!(b.api.messages("").await.is_empty());
    assert!(
        a.api
            .get("/api/v1/tokens")
            .await
            .as_array()
            .expect("tokens")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_connector_catches_up_and_a_failing_webhook_gets_everything_after_it_recovers() {
    let broker = Broker::start().await;
    let receiver = Receiver::start().await;
    let a = Connector::start(&broker, &[]).await;
    let mut b = Connector::start(&broker, &webhook_env(&receiver)).await;
    let b_address = b.address().await;

    // B is killed (no clean shutdown) while messages arrive.
    b.kill();
    for i in 0..20 {
        a.api
            .post_ok(
                "/api/v1/messages",
                &json!({ "recipients": [b_address], "text": format!("while away {i}") }),
                201,
            )
            .await;
    }
    b.spawn().await;
    let listed = eventually("B catches up with all 20", || async {
        let listed = b.api.messages("direction=in").await;
        (listed.len() >= 20).then_some(listed)
    })
    .await;
    // Each stored once, in order.
    let texts: Vec<String> = listed
        .iter()
        .map(|m| m["text"].as_str().expect("text").to_owned())
        .collect();
    let expected: Vec<String> = (0..20).map(|i| format!("while away {i}")).collect();
    assert_eq!(texts, expected);

    // The receiver fails for a while; messages keep coming.
    eventually("the first 20 are delivered", || async {
        (receiver.distinct().len() >= 20).then_some(())
    })
    .await;
    receiver.set_failing(true);
    for i in 0..10 {
        a.api
            .post_ok(
                "/api/v1/messages",
                &json!({ "recipients": [b_address], "text": format!("while failing {i}") }),
                201,
            )
            .await;
    }
    eventually("attempts are refused", || async {
        (receiver.refused() >= 3).then_some(())
    })
    .await;
    // B is killed again while deliveries are pending: the outbox survives.
    b.kill();
    receiver.set_failing(false);
    b.spawn().await;
    let events = eventually("every event is delivered after recovery", || async {
        let distinct = receiver.distinct();
        (distinct.len() >= 30).then_some(distinct)
    })
    .await;
    assert_eq!(events.len(), 30, "no event twice under different ids");
    // In order per peer (all from A here): the texts in sending order.
    let texts: Vec<String> = events
        .iter()
        .map(|e| e["data"]["text"].as_str().expect("text").to_owned())
        .collect();
    let expected: Vec<String> = (0..20)
        .map(|i| format!("while away {i}"))
        .chain((0..10).map(|i| format!("while failing {i}")))
        .collect();
    assert_eq!(texts, expected);
    assert_eq!(receiver.bad_signatures(), 0);
    assert_eq!(b.api.messages("direction=in").await.len(), 30);
    // Nothing is left pending.
    let pending = b.api.get("/api/v1/webhooks/deliveries?state=pending").await;
    assert_eq!(pending.as_array().expect("list").len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_that_fail_past_max_age_are_listed_and_retried_through_the_api() {
    let broker = Broker::start().await;
    let receiver = Receiver::start().await;
    receiver.set_failing(true);
    let a = Connector::start(&broker, &[]).await;
    let mut env = webhook_env(&receiver);
    env.push(("BACKBONE_CONNECTOR__WEBHOOKS__MAX_AGE", "1s".into()));
    let b = Connector::start(&broker, &env).await;
    let b_address = b.address().await;
    for i in 0..3 {
        a.api
            .post_ok(
                "/api/v1/messages",
                &json!({ "recipients": [b_address], "text": format!("m{i}") }),
                201,
            )
            .await;
    }
    let failed = eventually("all three deliveries fail", || async {
        let failed = b.api.get("/api/v1/webhooks/deliveries?state=failed").await;
        let failed = failed.as_array().expect("list").clone();
        (failed.len() == 3).then_some(failed)
    })
    .await;
    assert!(failed.iter().all(|d| d["attempts"].as_u64() >= Some(1)));
    assert!(failed.iter().all(|d| d["last_error"].as_str().is_some()));
    receiver.set_failing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.distinct().is_empty(),
        "failed ones wait for a retry"
    );
    for delivery in failed.iter().rev() {
        let retried = b
            .api
            .post_ok(
                &format!("/api/v1/webhooks/deliveries/{}/retry", delivery["id"]),
                &json!({}),
                200,
            )
            .await;
        assert_eq!(retried["state"], "pending");
    }
    eventually("the retried deliveries arrive", || async {
        (receiver.distinct().len() == 3).then_some(())
    })
    .await;
    let (status, answer) = b
        .api
        .post("/api/v1/webhooks/deliveries/9999/retry", &json!({}))
        .await;
    assert_eq!(status, 404, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_replays_from_last_event_id_and_then_follows() {
    let broker = Broker::start().await;
    let a = Connector::start(&broker, &[]).await;
    let b = Connector::start(&broker, &[]).await;
    let b_address = b.address().await;
    a.api
        .post_ok(
            "/api/v1/messages",
            &json!({ "recipients": [b_address], "text": "first" }),
            201,
        )
        .await;
    let first = eventually("B records the first", || async {
        let page = b.api.get("/api/v1/events").await;
        page["events"].as_array().expect("events").first().cloned()
    })
    .await;
    // A stream from position 0 gets the first event at once, then the next live.
    let response = b
        .api
        .request(reqwest::Method::GET, "/api/v1/events/stream")
        .header("last-event-id", "0")
        .send()
        .await
        .expect("stream");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response;
    let mut text = String::new();
    let mut sent_second = false;
    let deadline = tokio::time::Instant::now() + support::PATIENCE;
    while text.matches("event: message.received").count() < 2 {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("the stream goes on")
            .expect("chunk")
            .expect("not ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
        if !sent_second && text.contains(&format!("id: {}", first["position"])) {
            sent_second = true;
            a.api
                .post_ok(
                    "/api/v1/messages",
                    &json!({ "recipients": [b_address], "text": "second" }),
                    201,
                )
                .await;
        }
    }
    assert!(text.contains("\"first\""), "{text}");
    assert!(text.contains("\"second\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_is_acknowledged_only_after_the_local_commit() {
    let broker = Broker::start().await;
    let a = Connector::start(&broker, &[]).await;
    let mut b = Connector::start(&broker, &[]).await;
    let b_address = b.address().await;
    let send = |text: &'static str| {
        let api = &a.api;
        let b_address = b_address.clone();
        async move {
            api.post_ok(
                "/api/v1/messages",
                &json!({ "recipients": [b_address], "text": text }),
                201,
            )
            .await;
        }
    };
    send("before").await;
    eventually("B records the first", || async {
        (b.api.messages("").await.len() == 1).then_some(())
    })
    .await;

    // The test holds SQLite's write lock, so B cannot commit what comes
    // next; B must not acknowledge it either.
    let db_path = b.data_dir().join("connector.db");
    let locker = rusqlite::Connection::open(&db_path).expect("open B's database");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    send("held").await;
    // B's first commit gives up after SQLite's busy timeout (5 s): from then
    // on /health says receiving is stuck.
    let health = eventually("B reports that it cannot record", || async {
        let response = b.api.http.get(b.api.url("/health")).send().await.ok()?;
        let status = response.status();
        let body: Value = response.json().await.ok()?;
        (status == 503).then_some(body)
    })
    .await;
    assert!(
        health["receive_error"]
            .as_str()
            .is_some_and(|error| error.contains("recording")),
        "{health}"
    );
    b.kill();
    locker.execute_batch("ROLLBACK").expect("release");
    drop(locker);

    b.spawn().await;
    let texts = eventually("B has the held message after the restart", || async {
        let texts: Vec<String> = b
            .api
            .messages("")
            .await
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default().to_owned())
            .collect();
        (texts.len() == 2).then_some(texts)
    })
    .await;
    assert_eq!(texts, ["before", "held"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_that_does_not_open_is_kept_with_an_event_not_dropped() {
    let broker = Broker::start().await;
    let b = Connector::start(&broker, &[]).await;
    let b_address: backbone_protocol::Address = b.address().await.parse().expect("address");
    // A misbehaving client sends B bytes that are no envelope at all.
    let mut connect = backbone_client::ConnectConfig::new(
        broker.broker.quic_addr.to_string(),
        backbone_client::Trust::CaFile(broker.broker.cert_path.clone()),
    );
    connect.server_name = Some("localhost".into());
    let mallory = backbone_client::Client::connect(backbone_client::ClientOptions::primary(
        connect,
        backbone_protocol::Keypair::generate(),
        backbone_client::envelope::EncryptionKeypair::generate(),
    ))
    .await
    .expect("connect");
    mallory
        .send_envelope(
            &[b_address],
            b"not an envelope".to_vec(),
            Duration::from_secs(600),
        )
        .await
        .expect("stored");
    let event = eventually("B records an unreadable event", || async {
        let page = b.api.get("/api/v1/events").await;
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .find(|event| event["kind"] == "message.unreadable")
            .cloned()
    })
    .await;
    assert_eq!(event["data"]["sender"], mallory.address().to_string());
    assert!(
        event["data"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty())
    );
    assert!(b.api.messages("").await.is_empty(), "not a message");
    // Still healthy: one bad envelope does not stop receiving.
    let response = b
        .api
        .http
        .get(b.api.url("/health"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawn_template_refuses_requests() {
    let broker = Broker::start().await;
    let a = Connector::start(&broker, &[]).await;
    let b = Connector::start(&broker, &[]).await;
    let template = b
        .api
        .post_ok(
            "/api/v1/relationships/templates",
            &json!({ "ttl_secs": 3600 }),
            201,
        )
        .await;
    let id = template["id"].as_str().expect("id").to_owned();
    let withdraw = |expected: u16| {
        let api = &b.api;
        let id = id.clone();
        async move {
            let response = api
                .request(
                    reqwest::Method::DELETE,
                    &format!("/api/v1/relationships/templates/{id}"),
                )
                .send()
                .await
                .expect("DELETE");
            assert_eq!(response.status(), expected);
        }
    };
    withdraw(204).await;
    let listed = b.api.get("/api/v1/relationships/templates").await;
    assert!(listed.as_array().expect("list").is_empty(), "{listed}");
    let (status, answer) = a
        .api
        .post(
            "/api/v1/relationships/requests",
            &json!({ "reference": template["reference"], "message": "hello" }),
        )
        .await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(
        answer["type"],
        "urn:backbone:connector:problem:backbone-not-found"
    );
    withdraw(404).await;
}
