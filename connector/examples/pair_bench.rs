//! The Connector's benchmark: REST send at Connector A → webhook at
//! Connector B, on loopback, with real processes (a broker and two
//! Connectors made with `init` and run with `serve`) and a webhook receiver
//! in this process that checks every signature.
//!
//! ```sh
//! cargo build --release -p backbone-broker -p backbone-connector --bins --examples
//! ./target/release/examples/pair_bench --rate 200 --duration 30s   # open loop
//! ./target/release/examples/pair_bench --rate 0 --concurrency 32   # closed loop
//! ```
//!
//! It prints the end-to-end latency (the POST's start at A to the webhook's
//! arrival from B), the POST's own latency, the throughput, the messages
//! lost, the CPU each process spent per message, and where the time goes:
//! A's send until the broker stored the envelope, the broker's store until
//! B committed it, and B's commit until the webhook arrived (from the
//! millisecond timestamps the event carries). Figures go in
//! `docs/benchmarks.md`.

#![allow(missing_docs)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "REST send at one Connector to webhook at another, on loopback")]
struct Args {
    /// Messages per second offered (open loop); 0 for a closed loop.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Messages in flight in a closed loop (each sender sends its next
    /// message once the webhook of its last one arrived).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to send.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Sent first and not counted.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Message size in bytes (text).
    #[arg(long, default_value_t = 256)]
    size: usize,
}

const SECRET: &str = "pair bench webhook secret";

/// What the receiver saw of one message.
struct Arrival {
    at: Instant,
    wall_ms: u64,
    stored_at_ms: u64,
    recorded_at_ms: u64,
}

#[derive(Default)]
struct Shared {
    /// Woken on every arrival (closed-loop senders wait for theirs).
    arrived: tokio::sync::Notify,
    /// Sends refused, by the first line of the answer.
    refused: Mutex<HashMap<String, u64>>,
    arrivals: Mutex<HashMap<u64, Arrival>>,
    bad_signatures: Mutex<u64>,
}

struct Process {
    child: Child,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the example's directory")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: cargo build --release -p backbone-broker -p backbone-connector",
            path.display()
        );
    }
    Ok(path)
}

fn start_broker() -> anyhow::Result<(Process, String, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut child = Command::new(binary("backbone")?)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .env("BACKBONE__METRICS__LISTEN", "127.0.0.1:0")
        // The benchmark measures the pair's capacity, not the broker's
        // per-identity send limit (1,000 envelope copies a second).
        .env("BACKBONE__LIMITS__SEND_RATE", "0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut cert = None;
    for line in lines.by_ref() {
        let line = line?;
        if let Some(path) = line.strip_prefix("certificate: ") {
            cert = Some(PathBuf::from(path.trim()));
        }
        if line.starts_with("metrics: ") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let cert = cert.context("the broker printed no certificate path")?;
    Ok((
        Process {
            child,
            _dir: Some(dir),
        },
        format!("127.0.0.1:{port}"),
        cert,
    ))
}

/// A Connector, `init`ed and serving; returns the process, its API base URL and key.
fn start_connector(
    server: &str,
    cert: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<(Process, String, String)> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("connector.toml");
    let output = Command::new(binary("backbone-connector")?)
        .arg("init")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&config)
        .args(["--server", server])
        .arg("--ca")
        .arg(cert)
        .output()?;
    if !output.status.success() {
        bail!("init: {}", String::from_utf8_lossy(&output.stderr));
    }
    let key = String::from_utf8(output.stdout)?.trim().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(binary("backbone-connector")?)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env(
            "BACKBONE_CONNECTOR__API__LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok((
        Process {
            child,
            _dir: Some(dir),
        },
        format!("http://127.0.0.1:{port}"),
        key,
    ))
}

async fn wait_healthy(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(response) = http.get(format!("{base}/health")).send().await
            && response.status() == 200
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{base} did not become healthy")
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let at = Instant::now();
    let wall_ms = backbone_protocol::unix_millis_now();
    let signature = headers
        .get("backbone-signature")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    if !backbone_connector::webhook::verify(
        SECRET,
        signature,
        &body,
        wall_ms / 1000,
        Duration::from_secs(300),
    ) {
        *shared.bad_signatures.lock().expect("lock") += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let data = &event["data"];
    let Some(index) = data["text"]
        .as_str()
        .and_then(|text| text.split_whitespace().nth(1))
        .and_then(|n| n.parse::<u64>().ok())
    else {
        return StatusCode::NO_CONTENT;
    };
    shared
        .arrivals
        .lock()
        .expect("lock")
        .entry(index)
        .or_insert(Arrival {
            at,
            wall_ms,
            stored_at_ms: data["stored_at_ms"].as_u64().unwrap_or(0),
            recorded_at_ms: data["recorded_at_ms"].as_u64().unwrap_or(0),
        });
    shared.arrived.notify_waiters();
    StatusCode::NO_CONTENT
}

/// One send: (index, when it started, its wall clock, the POST's latency).
type Sent = (u64, Instant, u64, Duration);

async fn send_one(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    to: &str,
    index: u64,
    padding: &str,
) -> anyhow::Result<Sent> {
    let started = Instant::now();
    let wall = backbone_protocol::unix_millis_now();
    let response = http
        .post(format!("{base}/api/v1/messages"))
        .bearer_auth(key)
        .json(&json!({ "recipients": [to], "text": format!("bench {index} {padding}") }))
        .send()
        .await?;
    let status = response.status();
    if status != 201 {
        bail!("send {index}: {status}: {}", response.text().await?);
    }
    Ok((index, started, wall, started.elapsed()))
}

fn refuse(shared: &Shared, error: &anyhow::Error) {
    let text = format!("{error:#}");
    let kind = text.split(": ").nth(1).unwrap_or(&text).to_owned();
    *shared
        .refused
        .lock()
        .expect("lock")
        .entry(kind)
        .or_default() += 1;
}

fn quantiles(histogram: &Histogram<u64>) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.9) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
        histogram.max() as f64 / 1000.0
    )
}

fn median(values: &mut [i64]) -> i64 {
    if values.is_empty() {
        return 0;
    }
    values.sort_unstable();
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build()?;

    let shared = Arc::new(Shared::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let (broker, server, cert) = start_broker()?;
    let (a, a_base, a_key) = start_connector(&server, &cert, &[])?;
    let (b, b_base, b_key) = start_connector(
        &server,
        &cert,
        &[(
            "BACKBONE_CONNECTOR__WEBHOOKS__ENDPOINTS",
            format!("[{{ url = \"{hook}\", secret = \"{SECRET}\" }}]"),
        )],
    )?;
    wait_healthy(&http, &a_base).await?;
    wait_healthy(&http, &b_base).await?;
    let identity: Value = http
        .get(format!("{b_base}/api/v1/identity"))
        .bearer_auth(&b_key)
        .send()
        .await?
        .json()
        .await?;
    let to = identity["address"].as_str().context("address")?.to_owned();
    let padding = "x".repeat(args.size.saturating_sub(16));

    let sent: Arc<Mutex<Vec<Sent>>> = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let warmup_end = Instant::now() + args.warmup;
    let end = warmup_end + args.duration;
    let pids = [
        ("broker", broker.child.id()),
        ("connector A", a.child.id()),
        ("connector B", b.child.id()),
        ("bench (client + receiver)", std::process::id()),
    ];
    let mut cpu_start = None;
    let mut counted_from = 0;

    let mut tasks = tokio::task::JoinSet::new();
    if args.rate == 0 {
        for _ in 0..args.concurrency {
            let shared = shared.clone();
            let (http, a_base, a_key, to, padding, sent, next) = (
                http.clone(),
                a_base.clone(),
                a_key.clone(),
                to.clone(),
                padding.clone(),
                sent.clone(),
                next.clone(),
            );
            tasks.spawn(async move {
                while Instant::now() < end {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match send_one(&http, &a_base, &a_key, &to, index, &padding).await {
                        Ok(one) => sent.lock().expect("lock").push(one),
                        Err(error) => {
                            refuse(&shared, &error);
                            continue;
                        }
                    }
                    // The loop closes over the webhook: the next send
                    // waits until this one came out at B.
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        let arrived = shared.arrived.notified();
                        if shared.arrivals.lock().expect("lock").contains_key(&index)
                            || Instant::now() > deadline
                        {
                            break;
                        }
                        let _ = tokio::time::timeout(Duration::from_millis(100), arrived).await;
                    }
                }
            });
        }
    } else {
        let period = Duration::from_secs_f64(1.0 / f64::from(args.rate));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while Instant::now() < end {
            ticks.tick().await;
            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let shared = shared.clone();
            let (http, a_base, a_key, to, padding, sent) = (
                http.clone(),
                a_base.clone(),
                a_key.clone(),
                to.clone(),
                padding.clone(),
                sent.clone(),
            );
            tasks.spawn(async move {
                match send_one(&http, &a_base, &a_key, &to, index, &padding).await {
                    Ok(one) => sent.lock().expect("lock").push(one),
                    Err(error) => refuse(&shared, &error),
                }
            });
            if cpu_start.is_none() && Instant::now() >= warmup_end {
                counted_from = index;
                cpu_start = Some(pids.map(|(_, pid)| cpu_seconds(pid)));
            }
        }
    }
    if args.rate == 0 {
        tokio::time::sleep_until(warmup_end.into()).await;
        counted_from = next.load(std::sync::atomic::Ordering::Relaxed);
        cpu_start = Some(pids.map(|(_, pid)| cpu_seconds(pid)));
    }
    while tasks.join_next().await.is_some() {}
    let sent_until = next.load(std::sync::atomic::Ordering::Relaxed);
    // Let the last webhooks arrive.
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let arrived = shared.arrivals.lock().expect("lock").len() as u64;
        let ok = sent.lock().expect("lock").len() as u64;
        if arrived >= ok || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_end = pids.map(|(_, pid)| cpu_seconds(pid));

    let sent = sent.lock().expect("lock");
    let arrivals = shared.arrivals.lock().expect("lock");
    let mut end_to_end = Histogram::<u64>::new(3)?;
    let mut post = Histogram::<u64>::new(3)?;
    let (mut to_stored, mut to_recorded, mut to_webhook) = (Vec::new(), Vec::new(), Vec::new());
    let (mut counted, mut lost) = (0u64, 0u64);
    let mut first_arrival: Option<Instant> = None;
    let mut last_arrival: Option<Instant> = None;
    for (index, started, wall, latency) in sent.iter() {
        if *index < counted_from {
            continue;
        }
        counted += 1;
        post.record(latency.as_micros() as u64)?;
        match arrivals.get(index) {
            Some(arrival) => {
                end_to_end.record(arrival.at.duration_since(*started).as_micros() as u64)?;
                to_stored.push(arrival.stored_at_ms as i64 - *wall as i64);
                to_recorded.push(arrival.recorded_at_ms as i64 - arrival.stored_at_ms as i64);
                to_webhook.push(arrival.wall_ms as i64 - arrival.recorded_at_ms as i64);
                first_arrival = Some(first_arrival.map_or(arrival.at, |f| f.min(arrival.at)));
                last_arrival = Some(last_arrival.map_or(arrival.at, |l| l.max(arrival.at)));
            }
            None => lost += 1,
        }
    }
    let window = match (first_arrival, last_arrival) {
        (Some(first), Some(last)) if last > first => last.duration_since(first).as_secs_f64(),
        _ => args.duration.as_secs_f64(),
    };
    let delivered = counted - lost;
    println!(
        "mode: {}; message {} bytes; counted {counted} sends (of {sent_until}) after a {:?} warm-up",
        if args.rate == 0 {
            format!(
                "closed loop over the webhook, {} in flight",
                args.concurrency
            )
        } else {
            format!("open loop, {} msgs/s offered", args.rate)
        },
        args.size,
        args.warmup
    );
    println!(
        "throughput: {:.0} msgs/s delivered by webhook; lost {lost}; bad signatures {}",
        delivered as f64 / window,
        shared.bad_signatures.lock().expect("lock")
    );
    for (kind, count) in shared.refused.lock().expect("lock").iter() {
        println!("refused sends: {count} x {kind}");
    }
    println!("REST send at A -> webhook at B: {}", quantiles(&end_to_end));
    println!("POST /api/v1/messages at A:     {}", quantiles(&post));
    println!(
        "where the time goes (medians, ms clocks): A's send -> broker stored {} ms; \
         stored -> B committed {} ms; B committed -> webhook received {} ms",
        median(&mut to_stored),
        median(&mut to_recorded),
        median(&mut to_webhook)
    );
    if let Some(cpu_start) = cpu_start {
        for (i, (name, _)) in pids.iter().enumerate() {
            let seconds = cpu_end[i] - cpu_start[i];
            println!(
                "CPU {name}: {:.0} us per message",
                seconds * 1e6 / delivered.max(1) as f64
            );
        }
    }
    drop((a, b, broker));
    Ok(())
}
