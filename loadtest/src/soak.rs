//! `soak`: a long mixed load, then checks that the broker's resources stayed
//! flat.
//!
//! Three kinds of traffic run together for `--duration`:
//!
//! - **Steady sends** at `--rate` from always-connected senders to
//!   always-connected mailboxes, which ack everything. Most carry `--ttl`;
//!   `--short-ttl-fraction` of them carry a TTL drawn from
//!   `--short-ttl-min..=--short-ttl-max`. Nobody deletes them, so every one
//!   ends in the broker's expiry sweep.
//! - **Churn**: connections that each take one of `--churn-identities`,
//!   authenticate, send a few short-TTL envelopes to other churn identities
//!   (which are mostly offline), receive what waited for them, ack and delete
//!   it, and disconnect.
//! - **Expiry**: a consequence of the two above; the live set stops growing
//!   once the longest TTL has passed, which is why the warm-up must be at
//!   least that long.
//!
//! Verification stays exact because only envelopes that cannot legitimately
//! go missing are owed: long-TTL steady sends to mailboxes that are connected
//! throughout. A short-TTL envelope may expire before its push, and a churn
//! identity may be offline until its envelopes expire; those are counted, not
//! owed.
//!
//! The broker is sampled every `--sample-every`: resident memory, open file
//! descriptors and threads from /proc, live tokio tasks from its `/metrics`,
//! disk use of its data directory, and the harness's own count of live data.
//! Averages over the first window after warm-up and the last window are
//! compared against the thresholds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use backbone_client::{Client, ClientOptions};
use backbone_protocol::bytes::EncryptionKey;
use backbone_protocol::{Address, Keypair};
use bytes::Bytes;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::broker::{Target, disk_usage, open_fds, proc_sample, scrape};
use crate::report::{BrokerUsage, Percentiles, RunResult, SoakCheck, SoakFigures, SoakSample};
use crate::scenarios::{Party, connect_all, new_histogram, progress, spawn_receiver};
use crate::{Cli, SoakArgs};

/// Payload header: delivery key, send time in ns since the run epoch, and the
/// harness's expiry time in Unix ms (for the live-data ledger).
const HEADER: usize = 24;
/// Churn keys set the top bit, so they never equal a steady key.
const CHURN_KEY: u64 = 1 << 63;

/// Envelope bytes of live copies, by the second in which they expire.
///
/// An envelope's expiry is counted from just before it was sent and rounded
/// up to the next whole second, so the ledger holds it live for up to a
/// second longer than the broker does.
#[derive(Default)]
struct Ledger {
    buckets: Mutex<BTreeMap<u64, u64>>,
}

impl Ledger {
    fn bucket(expires_ms: u64) -> u64 {
        expires_ms.div_ceil(1000)
    }

    fn add(&self, expires_ms: u64, bytes: u64) {
        *self
            .buckets
            .lock()
            .expect("ledger lock")
            .entry(Self::bucket(expires_ms))
            .or_default() += bytes;
    }

    /// A confirmed delete; a copy whose bucket already expired is not live anyway.
    fn remove(&self, expires_ms: u64, bytes: u64) {
        if let Some(live) = self
            .buckets
            .lock()
            .expect("ledger lock")
            .get_mut(&Self::bucket(expires_ms))
        {
            *live = live.saturating_sub(bytes);
        }
    }

    /// Live bytes at `now_ms`; forgets expired buckets.
    fn live(&self, now_ms: u64) -> u64 {
        let mut buckets = self.buckets.lock().expect("ledger lock");
        let now_s = now_ms / 1000;
        *buckets = buckets.split_off(&(now_s + 1));
        buckets.values().sum()
    }
}

/// What every sending task shares.
struct Plan {
    opaque: bool,
    size: usize,
    epoch: Instant,
    deadline: Instant,
    ledger: Ledger,
    /// Always-connected recipients: address and encryption key.
    mailboxes: Vec<(Address, EncryptionKey)>,
    /// Churn identities: address and encryption key.
    churners: Vec<(Address, EncryptionKey)>,
    ttl_secs: u32,
    short_fraction: f64,
    short_secs: (u32, u32),
    acked: AtomicU64,
    churn_connections: AtomicU64,
}

impl Plan {
    /// Builds the payload, seals it unless opaque, sends it to one recipient
    /// and enters an acknowledged copy in the ledger. Returns whether it was
    /// stored, or the error's name.
    async fn send(
        &self,
        client: &Client,
        signing: &Keypair,
        to: (Address, EncryptionKey),
        ttl_secs: u32,
        key: u64,
        filler: &[u8],
    ) -> Result<(), String> {
        let mut payload = filler.to_vec();
        let expires_ms = backbone_protocol::unix_millis_now() + u64::from(ttl_secs) * 1000;
        payload[..8].copy_from_slice(&key.to_le_bytes());
        payload[8..16].copy_from_slice(&(self.epoch.elapsed().as_nanos() as u64).to_le_bytes());
        payload[16..24].copy_from_slice(&expires_ms.to_le_bytes());
        let envelope = if self.opaque {
            payload
        } else {
            backbone_client::envelope::seal(
                signing,
                &[to],
                &payload,
                backbone_protocol::unix_millis_now(),
            )
            .map_err(|error| error.to_string())?
        };
        let bytes = envelope.len() as u64;
        let ttl = Duration::from_secs(u64::from(ttl_secs));
        let ack = client
            .send_envelope(&[to.0], envelope, ttl)
            .await
            .map_err(|error| {
                error
                    .code()
                    .map(|c| c.name().to_owned())
                    .unwrap_or_else(|| error.to_string())
            })?;
        if let Some(failed) = ack.failed.first() {
            return Err(backbone_protocol::ErrorCode::from_u16(failed.code)
                .map(|c| c.name())
                .unwrap_or("unknown")
                .to_owned());
        }
        self.ledger.add(expires_ms, bytes);
        Ok(())
    }

    fn short_ttl(&self, rng: &mut impl Rng) -> u32 {
        rng.random_range(self.short_secs.0..=self.short_secs.1)
    }
}

#[derive(Default)]
struct LaneResult {
    sends: u64,
    acked: u64,
    /// (mailbox index, key) of acknowledged long-TTL sends: owed.
    long: Vec<(usize, u64)>,
    /// (mailbox index, key) of acknowledged short-TTL sends: counted.
    short: Vec<(usize, u64)>,
    send_ack: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    per_second: Vec<u64>,
}

async fn steady_lane(
    plan: Arc<Plan>,
    client: Arc<Client>,
    signing: Keypair,
    sender: usize,
    lane: usize,
    period: Duration,
) -> LaneResult {
    let mut result = LaneResult {
        send_ack: Some(new_histogram()),
        ..LaneResult::default()
    };
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut filler = vec![0u8; plan.size.max(HEADER)];
    rng.fill(&mut filler[..]);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counter = 0u64;
    loop {
        ticker.tick().await;
        if Instant::now() >= plan.deadline {
            break;
        }
        let index = rng.random_range(0..plan.mailboxes.len());
        let short = rng.random_bool(plan.short_fraction);
        let ttl_secs = if short {
            plan.short_ttl(&mut rng)
        } else {
            plan.ttl_secs
        };
        // Key: sender (20 bits) | lane (12 bits) | counter (32 bits), as in `steady`.
        let key = ((sender as u64) << 44) | ((lane as u64) << 32) | counter;
        counter += 1;
        result.sends += 1;
        let started = Instant::now();
        let sent = plan
            .send(
                &client,
                &signing,
                plan.mailboxes[index],
                ttl_secs,
                key,
                &filler,
            )
            .await;
        match sent {
            Ok(()) => {
                if let Some(h) = &mut result.send_ack {
                    let _ = h.record((started.elapsed().as_micros() as u64).max(1));
                }
                result.acked += 1;
                plan.acked.fetch_add(1, Ordering::Relaxed);
                if short {
                    result.short.push((index, key));
                } else {
                    result.long.push((index, key));
                }
                let second = plan.epoch.elapsed().as_secs() as usize;
                if result.per_second.len() <= second {
                    result.per_second.resize(second + 1, 0);
                }
                result.per_second[second] += 1;
            }
            Err(name) => *result.errors.entry(name).or_default() += 1,
        }
    }
    result
}

#[derive(Default)]
struct ChurnResult {
    connect_failures: u64,
    sends_acked: u64,
    received: u64,
    deleted: u64,
    errors: BTreeMap<String, u64>,
}

/// One churn worker: visits its share of the churn identities in turn.
async fn churn_worker(
    plan: Arc<Plan>,
    target_connect: Vec<backbone_client::ConnectConfig>,
    identities: Vec<(usize, Keypair, backbone_client::envelope::EncryptionKeypair)>,
    period: Duration,
    sends: usize,
    linger: Duration,
) -> ChurnResult {
    let mut result = ChurnResult::default();
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut filler = vec![0u8; plan.size.max(HEADER)];
    rng.fill(&mut filler[..]);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut counter = 0u64;
    for visit in 0.. {
        ticker.tick().await;
        if Instant::now() >= plan.deadline || identities.is_empty() {
            break;
        }
        let (me, signing, encryption) = &identities[visit % identities.len()];
        let config = target_connect[visit % target_connect.len()].clone();
        let options = ClientOptions::primary(config, signing.clone(), encryption.clone());
        let client =
            match tokio::time::timeout(Duration::from_secs(10), Client::connect(options)).await {
                Ok(Ok(client)) => client,
                Ok(Err(error)) => {
                    result.connect_failures += 1;
                    *result.errors.entry(error.to_string()).or_default() += 1;
                    continue;
                }
                Err(_) => {
                    result.connect_failures += 1;
                    *result
                        .errors
                        .entry("churn connect timeout".into())
                        .or_default() += 1;
                    continue;
                }
            };
        plan.churn_connections.fetch_add(1, Ordering::Relaxed);
        for _ in 0..sends {
            let mut other = rng.random_range(0..plan.churners.len() - 1);
            if other >= *me {
                other += 1;
            }
            let key = CHURN_KEY | counter;
            counter += 1;
            let ttl_secs = plan.short_ttl(&mut rng);
            match plan
                .send(
                    &client,
                    signing,
                    plan.churners[other],
                    ttl_secs,
                    key,
                    &filler,
                )
                .await
            {
                Ok(()) => result.sends_acked += 1,
                Err(name) => *result.errors.entry(name).or_default() += 1,
            }
        }
        // Receive what waited while this identity was offline.
        let until = tokio::time::Instant::now() + linger;
        let mut received: Vec<(u64, u64, u64)> = Vec::new();
        while let Ok(Some(delivery)) =
            tokio::time::timeout_at(until, next_delivery(&client, plan.opaque)).await
        {
            received.push(delivery);
        }
        if let Some(last) = received.iter().map(|(seq, _, _)| *seq).max() {
            result.received += received.len() as u64;
            let _ = client.ack(last).await;
            let seqs = received.iter().map(|(seq, _, _)| *seq).collect();
            match client.delete(seqs).await {
                Ok(()) => {
                    result.deleted += received.len() as u64;
                    for (_, bytes, expires_ms) in &received {
                        plan.ledger.remove(*expires_ms, *bytes);
                    }
                }
                Err(error) => *result.errors.entry(error.to_string()).or_default() += 1,
            }
        }
        // Dropping the client closes its connection: the disconnect.
        drop(client);
    }
    result
}

/// The next delivery's seq, envelope length, and the expiry the sender
/// entered in the ledger (0 when the envelope could not be opened).
async fn next_delivery(client: &Client, opaque: bool) -> Option<(u64, u64, u64)> {
    let (seq, bytes, payload) = if opaque {
        let delivery = client.next_delivery().await?;
        let bytes = delivery.envelope.len() as u64;
        (delivery.seq, bytes, delivery.envelope)
    } else {
        match client.next_message().await? {
            Ok(message) => (
                message.delivery.seq,
                message.delivery.envelope.len() as u64,
                Bytes::from(message.opened.plaintext),
            ),
            Err((delivery, _)) => (delivery.seq, delivery.envelope.len() as u64, Bytes::new()),
        }
    };
    let expires_ms = payload
        .get(16..24)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    Some((seq, bytes, expires_ms))
}

/// Where to sample the broker.
struct Probe {
    pid: u32,
    metrics: String,
    data_dir: PathBuf,
}

impl Probe {
    fn sample(&self, t_s: f64, live_bytes: u64, acked: u64) -> Option<SoakSample> {
        let process = proc_sample(self.pid)?;
        let fds = open_fds(self.pid)?;
        let series = scrape(&self.metrics).ok();
        let series_value =
            |name: &str| series.as_ref().and_then(|s| s.get(name)).map(|v| *v as u64);
        Some(SoakSample {
            t_s,
            rss_bytes: process.rss_bytes,
            fds,
            threads: process.threads,
            tasks: series_value("backbone_tokio_tasks"),
            connections: series_value("backbone_connections"),
            disk_bytes: disk_usage(&self.data_dir),
            live_bytes,
            acked,
        })
    }
}

/// Thresholds of the checks.
pub(crate) struct Limits {
    pub(crate) max_rss_growth_pct: f64,
    pub(crate) max_task_growth_pct: f64,
    pub(crate) max_fd_spread: u64,
    pub(crate) max_disk_factor: f64,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, count) = values.fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    (count > 0).then(|| sum / count as f64)
}

fn growth_pct(first: f64, last: f64) -> f64 {
    if first > 0.0 {
        (last - first) / first * 100.0
    } else {
        0.0
    }
}

/// Judges the samples: the first window starts at `warmup_s`, the last ends
/// at `end_s`, both `window_s` long.
pub(crate) fn analyse(
    samples: Vec<SoakSample>,
    warmup_s: f64,
    window_s: f64,
    end_s: f64,
    lost: u64,
    limits: &Limits,
) -> anyhow::Result<SoakFigures> {
    let first: Vec<&SoakSample> = samples
        .iter()
        .filter(|s| s.t_s >= warmup_s && s.t_s < warmup_s + window_s)
        .collect();
    let last: Vec<&SoakSample> = samples
        .iter()
        .filter(|s| s.t_s > end_s - window_s && s.t_s <= end_s)
        .collect();
    let after: Vec<&SoakSample> = samples.iter().filter(|s| s.t_s >= warmup_s).collect();
    anyhow::ensure!(
        !first.is_empty() && !last.is_empty(),
        "no samples in the first or last window: sample more often than --window"
    );
    let window_mean = |window: &[&SoakSample], f: &dyn Fn(&SoakSample) -> Option<f64>| {
        mean(window.iter().filter_map(|s| f(s))).unwrap_or(0.0)
    };
    let rss = |s: &SoakSample| Some(s.rss_bytes as f64);
    let tasks = |s: &SoakSample| s.tasks.map(|t| t as f64);
    let disk = |s: &SoakSample| Some(s.disk_bytes as f64);
    let live = |s: &SoakSample| Some(s.live_bytes as f64);
    let (rss_first, rss_last) = (window_mean(&first, &rss), window_mean(&last, &rss));
    let (tasks_first, tasks_last) = (window_mean(&first, &tasks), window_mean(&last, &tasks));
    let disk_first = window_mean(&first, &disk);
    let (disk_last, live_last) = (window_mean(&last, &disk), window_mean(&last, &live));
    let range = |f: &dyn Fn(&SoakSample) -> Option<u64>| {
        let values = after.iter().filter_map(|s| f(s));
        let min = values.clone().min().unwrap_or(0);
        (min, values.max().unwrap_or(0))
    };
    let (tasks_min, tasks_max) = range(&|s| s.tasks);
    let (fds_min, fds_max) = range(&|s| Some(s.fds));
    let (threads_min, threads_max) = range(&|s| Some(s.threads));
    let (_, disk_max) = range(&|s| Some(s.disk_bytes));
    let rss_growth = growth_pct(rss_first, rss_last);
    let task_growth = growth_pct(tasks_first, tasks_last);
    let disk_factor = if live_last > 0.0 {
        disk_last / live_last
    } else {
        f64::INFINITY
    };
    let checks = vec![
        SoakCheck {
            name: "RSS growth".into(),
            measured: format!("{rss_growth:.2} %"),
            limit: format!("< {} %", limits.max_rss_growth_pct),
            pass: rss_growth < limits.max_rss_growth_pct,
        },
        SoakCheck {
            name: "task growth".into(),
            measured: format!("{task_growth:.2} %"),
            limit: format!("≤ {} %", limits.max_task_growth_pct),
            pass: tasks_first > 0.0 && task_growth <= limits.max_task_growth_pct,
        },
        SoakCheck {
            name: "fd spread".into(),
            measured: format!("{}", fds_max - fds_min),
            limit: format!("≤ {}", limits.max_fd_spread),
            pass: fds_max - fds_min <= limits.max_fd_spread,
        },
        SoakCheck {
            name: "disk factor".into(),
            measured: format!("{disk_factor:.2}×"),
            limit: format!("≤ {}×", limits.max_disk_factor),
            pass: disk_factor <= limits.max_disk_factor,
        },
        SoakCheck {
            name: "lost".into(),
            measured: lost.to_string(),
            limit: "0".into(),
            pass: lost == 0,
        },
    ];
    Ok(SoakFigures {
        warmup_s,
        window_s,
        rss_first_window_bytes: rss_first as u64,
        rss_last_window_bytes: rss_last as u64,
        rss_growth_pct: rss_growth,
        tasks_first_window: tasks_first,
        tasks_last_window: tasks_last,
        task_growth_pct: task_growth,
        tasks_min,
        tasks_max,
        fds_min,
        fds_max,
        threads_min,
        threads_max,
        disk_first_window_bytes: disk_first as u64,
        disk_last_window_bytes: disk_last as u64,
        disk_max_bytes: disk_max,
        live_last_window_bytes: live_last as u64,
        disk_factor,
        checks,
        samples,
        ..SoakFigures::default()
    })
}

fn whole_secs(duration: Duration, name: &str) -> anyhow::Result<u32> {
    anyhow::ensure!(
        duration >= Duration::from_secs(1) && duration.subsec_nanos() == 0,
        "{name} must be a whole number of seconds, at least 1s"
    );
    u32::try_from(duration.as_secs()).with_context(|| format!("{name} is too long"))
}

/// Runs the soak.
pub async fn run(cli: &Cli, target: &Target, args: SoakArgs) -> anyhow::Result<RunResult> {
    let probe = Probe {
        pid: target
            .pid
            .context("soak samples the broker process: use --spawn-broker")?,
        metrics: target
            .metrics
            .clone()
            .context("soak reads the broker's /metrics: use --spawn-broker")?,
        data_dir: target
            .data_dir()
            .context("soak measures the broker's data directory: use --spawn-broker")?
            .to_owned(),
    };
    anyhow::ensure!(
        args.mailboxes > 0 && args.senders > 0 && args.inflight > 0 && args.rate > 0,
        "mailboxes, senders, inflight and rate must be positive"
    );
    let ttl_secs = whole_secs(args.ttl, "--ttl")?;
    let short_secs = (
        whole_secs(args.short_ttl_min, "--short-ttl-min")?,
        whole_secs(args.short_ttl_max, "--short-ttl-max")?,
    );
    anyhow::ensure!(
        short_secs.0 <= short_secs.1,
        "--short-ttl-min must not exceed --short-ttl-max"
    );
    anyhow::ensure!(
        args.ttl.max(args.short_ttl_max) <= args.warmup,
        "--warmup must be at least the longest TTL, so that the live data has \
         reached its steady size when measuring starts"
    );
    anyhow::ensure!(
        args.warmup + args.window * 2 <= args.duration,
        "--duration must hold the warm-up and two distinct windows"
    );
    anyhow::ensure!(
        !args.sample_every.is_zero() && args.sample_every <= args.window,
        "--sample-every must be positive and at most --window"
    );
    anyhow::ensure!(
        args.churn_rate == 0.0 || (args.churn_identities >= 2 && args.churn_workers > 0),
        "churn needs at least two identities and one worker"
    );
    let scenario = format!(
        "soak duration={:?} warmup={:?} mailboxes={} senders={} rate={} size={} ttl={:?} \
         short-ttl={}..{}s×{} churn={}/s",
        args.duration,
        args.warmup,
        args.mailboxes,
        args.senders,
        args.rate,
        args.size,
        args.ttl,
        short_secs.0,
        short_secs.1,
        args.short_ttl_fraction,
        args.churn_rate
    );
    let opaque = cli.opaque;
    let recipients: Vec<Party> = (0..args.mailboxes).map(|_| Party::new()).collect();
    let senders: Vec<Party> = (0..args.senders).map(|_| Party::new()).collect();
    let churners: Vec<Party> = (0..args.churn_identities).map(|_| Party::new()).collect();
    let keys = |parties: &[Party]| {
        parties
            .iter()
            .map(|p| (p.signing.address(), p.encryption.public()))
            .collect::<Vec<_>>()
    };
    let recipient_clients =
        connect_all(cli, target, &recipients, false, "connecting mailboxes").await?;
    let sender_clients = connect_all(cli, target, &senders, false, "connecting senders").await?;

    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let receivers: Vec<_> = recipient_clients
        .iter()
        .map(|c| spawn_receiver(c.clone(), opaque, epoch, delivered.clone(), stop.clone()))
        .collect();

    let started = Instant::now();
    let plan = Arc::new(Plan {
        opaque,
        size: args.size,
        epoch,
        deadline: started + args.duration,
        ledger: Ledger::default(),
        mailboxes: keys(&recipients),
        churners: keys(&churners),
        ttl_secs,
        short_fraction: args.short_ttl_fraction.clamp(0.0, 1.0),
        short_secs,
        acked: AtomicU64::new(0),
        churn_connections: AtomicU64::new(0),
    });
    let before = target.sample();
    let lanes = args.senders * args.inflight;
    let period = Duration::from_secs_f64(lanes as f64 / args.rate as f64);
    let mut lane_tasks = tokio::task::JoinSet::new();
    for (sender, client) in sender_clients.iter().enumerate() {
        for lane in 0..args.inflight {
            lane_tasks.spawn(steady_lane(
                plan.clone(),
                client.clone(),
                senders[sender].signing.clone(),
                sender,
                lane,
                period,
            ));
        }
    }
    let mut churn_tasks = tokio::task::JoinSet::new();
    if args.churn_rate > 0.0 {
        let workers = args.churn_workers;
        let connect: Vec<_> = (0..target.endpoints.len())
            .map(|i| target.connect_config(i))
            .collect();
        for worker in 0..workers {
            // Each identity belongs to one worker, so it is never online twice.
            let identities = (worker..churners.len())
                .step_by(workers)
                .map(|i| {
                    (
                        i,
                        churners[i].signing.clone(),
                        churners[i].encryption.clone(),
                    )
                })
                .collect();
            churn_tasks.spawn(churn_worker(
                plan.clone(),
                connect.clone(),
                identities,
                Duration::from_secs_f64(workers as f64 / args.churn_rate),
                args.churn_sends,
                args.churn_linger,
            ));
        }
    }

    // Sample until the deadline, off the runtime's worker threads (scraping
    // and walking the data directory block).
    let bar = progress(cli, "soaking");
    let probe = Arc::new(probe);
    let mut samples = Vec::new();
    let mut next = started;
    while next < plan.deadline {
        tokio::time::sleep_until(next.into()).await;
        let t_s = started.elapsed().as_secs_f64();
        let live = plan.ledger.live(backbone_protocol::unix_millis_now());
        let acked = plan.acked.load(Ordering::Relaxed);
        let sampling = probe.clone();
        if let Some(sample) =
            tokio::task::spawn_blocking(move || sampling.sample(t_s, live, acked)).await?
        {
            bar.set_message(format!(
                "{:.0}/{:.0} s{}: acked {}, RSS {} MiB, tasks {}, fds {}, live {} MiB, disk {} MiB",
                t_s,
                args.duration.as_secs_f64(),
                if t_s < args.warmup.as_secs_f64() {
                    " (warm-up)"
                } else {
                    ""
                },
                acked,
                sample.rss_bytes >> 20,
                sample.tasks.map_or("-".into(), |t| t.to_string()),
                sample.fds,
                sample.live_bytes >> 20,
                sample.disk_bytes >> 20
            ));
            samples.push(sample);
        }
        next += args.sample_every;
    }
    let end_s = started.elapsed().as_secs_f64();
    bar.set_message("stopping senders and churn");

    let mut merged = LaneResult {
        send_ack: Some(new_histogram()),
        ..LaneResult::default()
    };
    while let Some(joined) = lane_tasks.join_next().await {
        let result = joined?;
        merged.sends += result.sends;
        merged.acked += result.acked;
        merged.long.extend(result.long);
        merged.short.extend(result.short);
        if let (Some(total), Some(part)) = (&mut merged.send_ack, &result.send_ack) {
            total.add(part)?;
        }
        for (name, count) in result.errors {
            *merged.errors.entry(name).or_default() += count;
        }
        if merged.per_second.len() < result.per_second.len() {
            merged.per_second.resize(result.per_second.len(), 0);
        }
        for (slot, count) in merged.per_second.iter_mut().zip(result.per_second) {
            *slot += count;
        }
    }
    let mut churn = ChurnResult::default();
    while let Some(joined) = churn_tasks.join_next().await {
        let result = joined?;
        churn.connect_failures += result.connect_failures;
        churn.sends_acked += result.sends_acked;
        churn.received += result.received;
        churn.deleted += result.deleted;
        for (name, count) in result.errors {
            *merged.errors.entry(format!("churn: {name}")).or_default() += count;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = target.sample();

    // Drain: every owed (long-TTL) delivery, or give up after a quiet period.
    bar.set_message("draining owed deliveries");
    let mut last_progress = (delivered.load(Ordering::Relaxed), Instant::now());
    let all_acked = merged.acked;
    while delivered.load(Ordering::Relaxed) < all_acked {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now != last_progress.0 {
            last_progress = (now, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(15) {
            break;
        }
    }
    bar.finish_and_clear();
    let _ = stop_tx.send(true);
    let mut push = new_histogram();
    let mut received = Vec::with_capacity(receivers.len());
    let mut duplicates = 0;
    for handle in receivers {
        let result = handle.await?;
        push.add(&result.push)?;
        duplicates += result.duplicates;
        received.push(result.received);
    }
    let arrived = |list: &[(usize, u64)]| {
        list.iter()
            .filter(|(index, key)| received[*index].contains(key))
            .count() as u64
    };
    let owed = merged.long.len() as u64;
    let delivered_owed = arrived(&merged.long);
    let short_delivered = arrived(&merged.short);
    let lost = owed - delivered_owed;

    let limits = Limits {
        max_rss_growth_pct: args.max_rss_growth,
        max_task_growth_pct: args.max_task_growth,
        max_fd_spread: args.max_fd_spread,
        max_disk_factor: args.max_disk_factor,
    };
    let mut figures = analyse(
        samples,
        args.warmup.as_secs_f64(),
        args.window.as_secs_f64(),
        end_s,
        lost,
        &limits,
    )?;
    let series = scrape(&probe.metrics).ok();
    let counter = |name: &str| series.as_ref().and_then(|s| s.get(name)).map(|v| *v as u64);
    figures.broker_expired = counter("backbone_envelopes_expired_total");
    figures.broker_deleted = counter("backbone_envelopes_deleted_total");
    figures.short_ttl_acked = merged.short.len() as u64;
    figures.short_ttl_delivered = short_delivered;
    figures.short_ttl_undelivered = merged.short.len() as u64 - short_delivered;
    figures.churn_connections = plan.churn_connections.load(Ordering::Relaxed);
    figures.churn_connect_failures = churn.connect_failures;
    figures.churn_sends_acked = churn.sends_acked;
    figures.churn_received = churn.received;
    figures.churn_deleted = churn.deleted;

    let broker = match (before, after) {
        (Some(before), Some(after)) => Some(BrokerUsage {
            cpu_seconds: after.cpu_seconds - before.cpu_seconds,
            cpu_us_per_message: Some(
                (after.cpu_seconds - before.cpu_seconds) * 1e6
                    / (merged.acked + churn.sends_acked).max(1) as f64,
            ),
            rss_start_bytes: before.rss_bytes,
            rss_end_bytes: after.rss_bytes,
        }),
        _ => None,
    };
    Ok(RunResult {
        scenario,
        opaque,
        seconds,
        sends: merged.sends,
        acked: merged.acked,
        expected_deliveries: owed,
        delivered: delivered_owed,
        lost,
        duplicates,
        acked_per_s: merged.acked as f64 / seconds,
        send_ack: merged
            .send_ack
            .as_ref()
            .map(Percentiles::of)
            .unwrap_or_default(),
        push: Percentiles::of(&push),
        errors: merged.errors,
        acked_per_second: merged.per_second,
        broker,
        soak: Some(figures),
        ..RunResult::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, rss_mib: u64, fds: u64, tasks: u64) -> SoakSample {
        SoakSample {
            t_s,
            rss_bytes: rss_mib << 20,
            fds,
            threads: 4,
            tasks: Some(tasks),
            connections: Some(10),
            disk_bytes: 30 << 20,
            live_bytes: 10 << 20,
            acked: 0,
        }
    }

    const LIMITS: Limits = Limits {
        max_rss_growth_pct: 5.0,
        max_task_growth_pct: 5.0,
        max_fd_spread: 4,
        max_disk_factor: 4.0,
    };

    fn check<'a>(figures: &'a SoakFigures, name: &str) -> &'a SoakCheck {
        figures
            .checks
            .iter()
            .find(|c| c.name == name)
            .expect("check present")
    }

    #[test]
    fn warm_up_growth_is_ignored_and_windows_are_averaged() {
        // Memory ramps from 10 to 100 MiB during the 10 s warm-up, then
        // wobbles between 100 and 104 MiB.
        let mut samples: Vec<SoakSample> = (0..10)
            .map(|t| sample(t as f64, 10 + 10 * t, 20, 300))
            .collect();
        samples.extend((10..=40).map(|t| sample(t as f64, 100 + (t % 2) * 4, 20, 300)));
        let figures = analyse(samples, 10.0, 10.0, 40.0, 0, &LIMITS).expect("analysed");
        assert!((figures.rss_first_window_bytes as f64 / (1 << 20) as f64 - 102.0).abs() < 0.5);
        assert!(
            figures.rss_growth_pct.abs() < 1.0,
            "{}",
            figures.rss_growth_pct
        );
        assert!(
            figures.checks.iter().all(|c| c.pass),
            "{:?}",
            figures.checks
        );
        assert_eq!(figures.disk_factor, 3.0);
    }

    #[test]
    fn a_steady_climb_fails_memory_tasks_and_descriptors() {
        let samples: Vec<SoakSample> = (0..=60)
            .map(|t| sample(t as f64, 100 + t / 2, 20 + t / 5, 300 + 2 * t))
            .collect();
        let figures = analyse(samples, 10.0, 10.0, 60.0, 0, &LIMITS).expect("analysed");
        assert!(!check(&figures, "RSS growth").pass, "{:?}", figures.checks);
        assert!(!check(&figures, "task growth").pass, "{:?}", figures.checks);
        assert!(!check(&figures, "fd spread").pass, "{:?}", figures.checks);
        assert!(check(&figures, "disk factor").pass);
        assert_eq!((figures.fds_min, figures.fds_max), (22, 32));
    }

    #[test]
    fn losses_and_missing_task_samples_fail() {
        let samples: Vec<SoakSample> = (0..=30)
            .map(|t| SoakSample {
                tasks: None,
                ..sample(t as f64, 100, 20, 0)
            })
            .collect();
        let figures = analyse(samples, 10.0, 10.0, 30.0, 3, &LIMITS).expect("analysed");
        assert!(!check(&figures, "lost").pass);
        assert!(!check(&figures, "task growth").pass);
    }

    #[test]
    fn empty_windows_are_an_error() {
        let samples = vec![sample(0.0, 100, 20, 300), sample(30.0, 100, 20, 300)];
        assert!(analyse(samples, 10.0, 5.0, 30.0, 0, &LIMITS).is_err());
    }

    #[test]
    fn the_ledger_forgets_expired_and_deleted_bytes() {
        let ledger = Ledger::default();
        ledger.add(10_500, 100); // expires in second 11
        ledger.add(20_000, 50); // exactly at second 20
        ledger.add(30_001, 7);
        assert_eq!(ledger.live(10_999), 157);
        assert_eq!(ledger.live(11_000), 57);
        ledger.remove(30_001, 7);
        assert_eq!(ledger.live(19_999), 50);
        assert_eq!(ledger.live(20_000), 0);
        // Deleting a copy that already expired changes nothing.
        ledger.remove(10_500, 100);
        assert_eq!(ledger.live(20_000), 0);
    }
}
