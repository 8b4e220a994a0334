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

/// The load generator's own CPU use (this process, from
/// `/proc/self/stat`): the client library's cost, next to the broker's.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GeneratorUsage {
    /// CPU seconds this process used during the measured phase.
    pub cpu_seconds: f64,
    /// CPU microseconds per acknowledged message.
    pub cpu_us_per_message: f64,
}

/// Broker-side resource use, from /proc.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BrokerUsage {
    /// CPU seconds the broker used during the measured phase.
    pub cpu_seconds: f64,
    /// CPU microseconds per acknowledged message (`None` where no message
    /// was sent).
    pub cpu_us_per_message: Option<f64>,
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
    /// Broker CPU microseconds per authenticated connection (handshake,
    /// authentication, and holding it idle until measured).
    pub broker_cpu_us_per_connection: Option<f64>,
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

/// One sample of the broker during a soak.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SoakSample {
    /// Seconds since the load started.
    pub t_s: f64,
    /// Resident memory (VmRSS).
    pub rss_bytes: u64,
    /// Open file descriptors (/proc/PID/fd).
    pub fds: u64,
    /// Operating-system threads.
    pub threads: u64,
    /// Live tokio tasks (`backbone_tokio_tasks`), when the scrape answered.
    pub tasks: Option<u64>,
    /// Open QUIC connections (`backbone_connections`), when the scrape answered.
    pub connections: Option<u64>,
    /// Bytes the data directory occupies on disk.
    pub disk_bytes: u64,
    /// Live data: see [`SoakFigures::live_last_window_bytes`].
    pub live_bytes: u64,
    /// Steady sends acknowledged so far.
    pub acked: u64,
}

/// One pass/fail judgement of a soak.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SoakCheck {
    /// What is checked.
    pub name: String,
    /// The measured value, with its unit.
    pub measured: String,
    /// The threshold, with its unit.
    pub limit: String,
    /// Whether the measured value is within the threshold.
    pub pass: bool,
}

/// The soak figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SoakFigures {
    /// Load before the first measured window, in seconds.
    pub warmup_s: f64,
    /// Length of the first and last windows, in seconds.
    pub window_s: f64,
    /// Average resident memory in the first window after warm-up.
    pub rss_first_window_bytes: u64,
    /// Average resident memory in the last window.
    pub rss_last_window_bytes: u64,
    /// (last − first) / first, in percent.
    pub rss_growth_pct: f64,
    /// Average live tokio tasks in the first window after warm-up.
    pub tasks_first_window: f64,
    /// Average live tokio tasks in the last window.
    pub tasks_last_window: f64,
    /// (last − first) / first, in percent.
    pub task_growth_pct: f64,
    /// Fewest live tasks sampled after warm-up.
    pub tasks_min: u64,
    /// Most live tasks sampled after warm-up.
    pub tasks_max: u64,
    /// Fewest open file descriptors sampled after warm-up.
    pub fds_min: u64,
    /// Most open file descriptors sampled after warm-up.
    pub fds_max: u64,
    /// Fewest threads sampled after warm-up.
    pub threads_min: u64,
    /// Most threads sampled after warm-up.
    pub threads_max: u64,
    /// Average disk use of the data directory in the first window after warm-up.
    pub disk_first_window_bytes: u64,
    /// Average disk use of the data directory in the last window.
    pub disk_last_window_bytes: u64,
    /// Largest disk use sampled after warm-up.
    pub disk_max_bytes: u64,
    /// Average live data in the last window: the envelope bytes of every
    /// acknowledged copy whose TTL (counted from the moment of sending,
    /// rounded up to the next second) has not run out and which its
    /// recipient has not deleted. Acknowledged deliveries stay live: the
    /// broker keeps an envelope until it expires or is deleted, whatever
    /// its devices acknowledged.
    pub live_last_window_bytes: u64,
    /// disk_last_window_bytes / live_last_window_bytes.
    pub disk_factor: f64,
    /// Steady sends acknowledged with a short TTL (not counted as owed).
    pub short_ttl_acked: u64,
    /// Of those, delivered to their always-connected recipient.
    pub short_ttl_delivered: u64,
    /// Of those, expired before they reached their recipient.
    pub short_ttl_undelivered: u64,
    /// Churn connections opened and authenticated.
    pub churn_connections: u64,
    /// Churn connections that failed to connect or authenticate.
    pub churn_connect_failures: u64,
    /// Churn sends acknowledged.
    pub churn_sends_acked: u64,
    /// Envelopes churn connections received (sent to them while they were offline).
    pub churn_received: u64,
    /// Envelopes churn connections deleted after receiving them.
    pub churn_deleted: u64,
    /// `backbone_envelopes_expired_total` at the end.
    pub broker_expired: Option<u64>,
    /// `backbone_envelopes_deleted_total` at the end.
    pub broker_deleted: Option<u64>,
    /// The judgements; the run fails if any fails.
    pub checks: Vec<SoakCheck>,
    /// Every sample.
    pub samples: Vec<SoakSample>,
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
    /// The load generator's CPU, for scenarios that send messages.
    pub generator: Option<GeneratorUsage>,
    /// Connect-storm figures.
    pub connect: Option<ConnectFigures>,
    /// Idle-mailboxes figures.
    pub idle: Option<IdleFigures>,
    /// Soak figures.
    pub soak: Option<SoakFigures>,
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
                "broker memory   {:.1} KiB ({:.0} bytes) per idle connection",
                bytes / 1024.0,
                bytes
            );
        }
        if let Some(cpu) = connect.broker_cpu_us_per_connection {
            println!("broker CPU      {cpu:.0} µs per connection");
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
        let per_message = broker
            .cpu_us_per_message
            .map(|us| format!(", {us:.1} µs CPU per message"))
            .unwrap_or_default();
        println!(
            "broker          {:.2} CPU-s{per_message}, RSS {} → {} MiB",
            broker.cpu_seconds,
            broker.rss_start_bytes / (1 << 20),
            broker.rss_end_bytes / (1 << 20)
        );
    }
    if let Some(generator) = &result.generator {
        println!(
            "load generator  {:.2} CPU-s, {:.1} µs CPU per message",
            generator.cpu_seconds, generator.cpu_us_per_message
        );
    }
    if let Some(soak) = &result.soak {
        print_soak(soak);
    }
    if !result.errors.is_empty() {
        println!("errors          {:?}", result.errors);
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn print_soak(soak: &SoakFigures) {
    println!(
        "short TTLs      {} acknowledged, {} delivered, {} expired before delivery (not owed)",
        soak.short_ttl_acked, soak.short_ttl_delivered, soak.short_ttl_undelivered
    );
    println!(
        "churn           {} connections ({} failed), {} sends acknowledged, {} received, {} deleted",
        soak.churn_connections,
        soak.churn_connect_failures,
        soak.churn_sends_acked,
        soak.churn_received,
        soak.churn_deleted
    );
    if let (Some(expired), Some(deleted)) = (soak.broker_expired, soak.broker_deleted) {
        println!("broker removed  {expired} expired, {deleted} deleted envelopes");
    }
    println!();
    println!(
        "{:>7} {:>9} {:>5} {:>7} {:>6} {:>6} {:>9} {:>9}",
        "t (s)", "RSS MiB", "fds", "threads", "tasks", "conns", "disk MiB", "live MiB"
    );
    let step = soak.samples.len().div_ceil(20).max(1);
    let last = soak.samples.len().saturating_sub(1);
    for (index, sample) in soak.samples.iter().enumerate() {
        if index % step != 0 && index != last {
            continue;
        }
        let show = |value: Option<u64>| value.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "{:>7.0} {:>9.1} {:>5} {:>7} {:>6} {:>6} {:>9.1} {:>9.1}",
            sample.t_s,
            mib(sample.rss_bytes),
            sample.fds,
            sample.threads,
            show(sample.tasks),
            show(sample.connections),
            mib(sample.disk_bytes),
            mib(sample.live_bytes)
        );
    }
    println!();
    println!(
        "after the {:.0} s warm-up (windows of {:.0} s): RSS {:.1} → {:.1} MiB, tasks {:.0} → {:.0} \
         (min {} max {}), fds {}–{}, threads {}–{}, disk {:.1} MiB for {:.1} MiB live",
        soak.warmup_s,
        soak.window_s,
        mib(soak.rss_first_window_bytes),
        mib(soak.rss_last_window_bytes),
        soak.tasks_first_window,
        soak.tasks_last_window,
        soak.tasks_min,
        soak.tasks_max,
        soak.fds_min,
        soak.fds_max,
        soak.threads_min,
        soak.threads_max,
        mib(soak.disk_last_window_bytes),
        mib(soak.live_last_window_bytes)
    );
    println!("{:<14} {:>14} {:>14}  result", "check", "measured", "limit");
    for check in &soak.checks {
        println!(
            "{:<14} {:>14} {:>14}  {}",
            check.name,
            check.measured,
            check.limit,
            if check.pass { "pass" } else { "FAIL" }
        );
    }
}

fn print_latency(name: &str, p: &Percentiles) {
    println!(
        "{name:<15} p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs  (n={})",
        p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us, p.count
    );
}
