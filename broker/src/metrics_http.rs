//! `/metrics` (Prometheus text format) and `/health` (JSON) over plain HTTP/1.1.
//!
//! Two read-only GET endpoints do not justify an HTTP framework; requests are
//! bounded in size and time, and every response closes the connection.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_process::Collector;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::shared::Shared;
use crate::telemetry;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(telemetry::SECONDS_BUCKETS)
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Suffix("_bytes".into()),
                    telemetry::BYTES_BUCKETS,
                )
            })
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Suffix("_envelopes".into()),
                    telemetry::COUNT_BUCKETS,
                )
            })
            .expect("static bucket lists are non-empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program);
        // then this endpoint serves an empty registry rather than failing.
        let _ = metrics::set_global_recorder(recorder);
        telemetry::describe();
        process_collector().describe();
        handle
    })
}

/// Binds `addr` and serves until shutdown; returns the bound address.
pub async fn serve(addr: SocketAddr, shared: Arc<Shared>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let handle = handle();
    let mut shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let Ok((stream, _)) = accepted else { continue };
            let shared = shared.clone();
            tokio::spawn(async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), respond(stream, &shared, handle))
                        .await;
            });
        }
    });
    Ok(bound)
}

async fn respond(
    mut stream: TcpStream,
    shared: &Shared,
    handle: &PrometheusHandle,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            let store = shared.directory.clone();
            if let Ok(Ok(bytes)) = tokio::task::spawn_blocking(move || store.size_on_disk()).await {
                metrics::gauge!("backbone_store_bytes").set(bytes as f64);
            }
            record_process_gauges();
            record_scrape_gauges(shared);
            ("200 OK", "text/plain; version=0.0.4", handle.render())
        }
        ("GET", "/health") => {
            let status = if *shared.shutdown.borrow() {
                "shutting-down"
            } else {
                "ok"
            };
            let body = serde_json::json!({
                "status": status,
                "server_id": hex::encode(shared.server_id.as_bytes()),
                "mailbox_actors": shared.registry.active(),
                "fleet": shared.fleet.health(),
            })
            .to_string()
                + "\n";
            let code = if status == "ok" {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (code, "application/json", body)
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        ),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(header.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Samples what an operator alerts on and nothing else updates: the data
/// directory's file system, and handoffs that have not finished.
fn record_scrape_gauges(shared: &Shared) {
    // Linux and other Unixes; elsewhere the gauges are absent.
    if let Ok(fs) = rustix::fs::statvfs(&shared.config.server.data_dir) {
        let block = fs.f_frsize;
        metrics::gauge!("backbone_data_dir_size_bytes").set((fs.f_blocks * block) as f64);
        metrics::gauge!("backbone_data_dir_available_bytes").set((fs.f_bavail * block) as f64);
    }
    metrics::gauge!("backbone_fleet_handoffs_unfinished")
        .set(shared.fleet.unfinished_handoffs() as f64);
}

/// The standard process metrics (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`,
/// `process_start_time_seconds`, ...).
fn process_collector() -> &'static Collector {
    static COLLECTOR: OnceLock<Collector> = OnceLock::new();
    COLLECTOR.get_or_init(Collector::default)
}

/// Samples the gauges a leak would move: the process metrics and live tokio
/// tasks. They are read when scraped, like `backbone_store_bytes`, so an
/// idle broker pays nothing for them.
fn record_process_gauges() {
    process_collector().collect();
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    metrics::gauge!("backbone_tokio_tasks").set(tasks as f64);
}
