//! Results: what is measured, and how it is printed.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Maximum.
    pub max_us: u64,
}

impl Percentiles {
    /// Summarises a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        Self {
            count: histogram.len(),
            p50_us: histogram.value_at_quantile(0.5),
            p90_us: histogram.value_at_quantile(0.9),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
        }
    }
}

/// Broker-side resource use, from /proc.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BrokerUsage {
    /// CPU seconds the broker used during the measured phase.
    pub cpu_seconds: f64,
    /// CPU microseconds per acknowledged message.
    pub cpu_us_per_message: f64,
    /// Resident memory at the start of the measured phase.
    pub rss_start_bytes: u64,
    /// Resident memory at the end.
    pub rss_end_bytes: u64,
}

/// The connect-storm figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnectFigures {
    /// Connections authenticated.
    pub connections: u64,
    /// Authenticated connections per second.
    pub rate_per_s: f64,
    /// Handshake + auth latency.
    pub handshake: Percentiles,
    /// Broker memory growth per idle authenticated connection.
    pub broker_bytes_per_connection: Option<f64>,
}

/// The idle-mailboxes figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IdleFigures {
    /// Mailboxes holding a stored envelope.
    pub mailboxes: u64,
    /// Live mailbox actors right after the last send.
    pub actors_after_sends: u64,
    /// Live mailbox actors after the settle time.
    pub actors_after_settle: u64,
    /// Broker resident memory after the settle time.
    pub rss_after_settle_bytes: Option<u64>,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunResult {
    /// Scenario name and its parameters.
    pub scenario: String,
    /// Opaque payloads (true) or end-to-end encrypted (false).
    pub opaque: bool,
    /// Length of the measured phase in seconds.
    pub seconds: f64,
    /// Sends attempted.
    pub sends: u64,
    /// Sends acknowledged (durable for every recipient).
    pub acked: u64,
    /// Deliveries owed: acknowledged sends × their recipients.
    pub expected_deliveries: u64,
    /// Owed deliveries that arrived.
    pub delivered: u64,
    /// Owed deliveries that never arrived.
    pub lost: u64,
    /// Deliveries that arrived more than once to the same recipient.
    pub duplicates: u64,
    /// Acknowledged sends per second.
    pub acked_per_s: f64,
    /// Send → SendAck latency.
    pub send_ack: Percentiles,
    /// Send → push arrival latency at the recipient.
    pub push: Percentiles,
    /// Errors by code name.
    pub errors: BTreeMap<String, u64>,
    /// Acknowledged sends in each second of the run.
    pub acked_per_second: Vec<u64>,
    /// Broker CPU and memory, when it runs on this machine.
    pub broker: Option<BrokerUsage>,
    /// Connect-storm figures.
    pub connect: Option<ConnectFigures>,
    /// Idle-mailboxes figures.
    pub idle: Option<IdleFigures>,
}

/// Prints the human table.
pub fn print(result: &RunResult) {
    println!();
    println!("scenario        {}", result.scenario);
    println!(
        "payloads        {}",
        if result.opaque {
            "opaque"
        } else {
            "end-to-end encrypted"
        }
    );
    if let Some(connect) = &result.connect {
        println!("connections     {}", connect.connections);
        println!("auth rate       {:.0} connections/s", connect.rate_per_s);
        print_latency("handshake+auth", &connect.handshake);
        if let Some(bytes) = connect.broker_bytes_per_connection {
            println!(
                "broker memory   {:.1} KiB per idle connection",
                bytes / 1024.0
            );
        }
    } else if result.idle.is_some() {
        println!("duration        {:.1} s of sends", result.seconds);
        println!(
            "throughput      {:.0} acknowledged sends/s",
            result.acked_per_s
        );
    } else {
        println!("duration        {:.1} s", result.seconds);
        println!(
            "sends           {} attempted, {} acknowledged",
            result.sends, result.acked
        );
        println!(
            "throughput      {:.0} acknowledged sends/s",
            result.acked_per_s
        );
        println!(
            "deliveries      {} owed, {} delivered, lost {}, duplicates {}",
            result.expected_deliveries, result.delivered, result.lost, result.duplicates
        );
        print_latency("send→ack", &result.send_ack);
        print_latency("send→push", &result.push);
    }
    if let Some(idle) = &result.idle {
        println!("mailboxes       {} holding an envelope", idle.mailboxes);
        println!(
            "mailbox actors  {} after the sends, {} after settling",
            idle.actors_after_sends, idle.actors_after_settle
        );
        if let Some(rss) = idle.rss_after_settle_bytes {
            println!("broker RSS      {} MiB after settling", rss / (1 << 20));
        }
    }
    if let Some(broker) = &result.broker {
        println!(
            "broker          {:.2} CPU-s, {:.1} µs CPU per message, RSS {} → {} MiB",
            broker.cpu_seconds,
            broker.cpu_us_per_message,
            broker.rss_start_bytes / (1 << 20),
            broker.rss_end_bytes / (1 << 20)
        );
    }
    if !result.errors.is_empty() {
        println!("errors          {:?}", result.errors);
    }
}

fn print_latency(name: &str, p: &Percentiles) {
    println!(
        "{name:<15} p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs  (n={})",
        p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us, p.count
    );
}
