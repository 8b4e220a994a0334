//! The scenarios. Each builds real clients, measures, and verifies delivery.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use backbone_client::envelope::EncryptionKeypair;
use backbone_client::{Client, ClientError, ClientOptions};
use backbone_protocol::{Address, Keypair};
use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use tokio::sync::{Semaphore, watch};

use crate::broker::Target;
use crate::report::{
    BrokerUsage, ConnectFigures, GeneratorUsage, IdleFigures, Percentiles, RunResult,
};
use crate::{Cli, Scenario, SteadyArgs};

const TTL: Duration = Duration::from_secs(3600);
/// Payload header: delivery key (u64) and send time in ns since the run epoch (u64).
pub(crate) const HEADER: usize = 16;

/// Runs the chosen scenario.
pub async fn run(cli: &Cli, target: &Target) -> anyhow::Result<RunResult> {
    match cli.scenario.clone() {
        Scenario::Steady(args) => steady(cli, target, args, None).await,
        Scenario::Fanout(args) => {
            let steady_args = SteadyArgs {
                mailboxes: args.recipients,
                senders: 1,
                size: args.size,
                rate: 0,
                inflight: args.inflight,
                fanout: args.recipients,
                duration: args.duration,
            };
            steady(cli, target, steady_args, None).await
        }
        Scenario::OfflineCatchup(args) => {
            let steady_args = SteadyArgs {
                mailboxes: args.mailboxes,
                senders: args.senders,
                size: args.size,
                rate: 0,
                inflight: 8,
                fanout: 1,
                duration: Duration::ZERO,
            };
            let offline = (args.mailboxes as f64 * args.offline_fraction.clamp(0.0, 1.0)) as usize;
            steady(cli, target, steady_args, Some((offline, args.per_mailbox))).await
        }
        Scenario::ConnectStorm(args) => connect_storm(cli, target, args).await,
        Scenario::IdleMailboxes(args) => idle_mailboxes(cli, target, args).await,
        Scenario::Soak(args) => crate::soak::run(cli, target, args).await,
    }
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}

pub(crate) struct Party {
    pub(crate) signing: Keypair,
    pub(crate) encryption: EncryptionKeypair,
}

impl Party {
    pub(crate) fn new() -> Self {
        Self {
            signing: Keypair::generate(),
            encryption: EncryptionKeypair::generate(),
        }
    }
}

pub(crate) fn progress(cli: &Cli, message: &str) -> ProgressBar {
    if cli.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .expect("static template"),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

pub(crate) async fn connect_all(
    cli: &Cli,
    target: &Target,
    parties: &[Party],
    publish: bool,
    label: &str,
) -> anyhow::Result<Vec<Arc<Client>>> {
    let bar = progress(cli, label);
    let limit = Arc::new(Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, party) in parties.iter().enumerate() {
        let permit = limit.clone().acquire_owned().await?;
        let (signing, encryption) = (party.signing.clone(), party.encryption.clone());
        let config = target.connect_config(index);
        tasks.spawn(async move {
            let _permit = permit;
            let client =
                Client::connect(ClientOptions::primary(config, signing, encryption)).await?;
            if publish {
                client.publish_card().await?;
            }
            Ok::<_, ClientError>((index, Arc::new(client)))
        });
    }
    let mut clients: Vec<Option<Arc<Client>>> = vec![None; parties.len()];
    while let Some(joined) = tasks.join_next().await {
        let (index, client) = joined?.context("connecting a client")?;
        clients[index] = Some(client);
        bar.set_message(format!(
            "{label}: {}/{}",
            clients.iter().flatten().count(),
            parties.len()
        ));
    }
    bar.finish_and_clear();
    Ok(clients
        .into_iter()
        .map(|c| c.expect("every client connected"))
        .collect())
}

pub(crate) struct ReceiverResult {
    pub(crate) received: HashSet<u64>,
    pub(crate) duplicates: u64,
    pub(crate) push: Histogram<u64>,
}

/// Receives until `stop`, acking everything, recording arrival latency.
pub(crate) fn spawn_receiver(
    client: Arc<Client>,
    opaque: bool,
    epoch: Instant,
    delivered: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<ReceiverResult> {
    tokio::spawn(async move {
        let mut result = ReceiverResult {
            received: HashSet::new(),
            duplicates: 0,
            push: new_histogram(),
        };
        loop {
            let payload = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                payload = next_payload(&client, opaque) => payload,
            };
            let Some((seq, payload)) = payload else { break };
            let _ = client.ack(seq).await;
            let Some(payload) = payload else { continue };
            if payload.len() < HEADER {
                continue;
            }
            let key = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
            let sent_ns = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
            let now_ns = epoch.elapsed().as_nanos() as u64;
            let _ = result
                .push
                .record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
            if result.received.insert(key) {
                delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                result.duplicates += 1;
            }
        }
        result
    })
}

/// The next delivery's seq and payload (`None` payload when it could not be opened).
async fn next_payload(client: &Client, opaque: bool) -> Option<(u64, Option<Bytes>)> {
    if opaque {
        let delivery = client.next_delivery().await?;
        Some((delivery.seq, Some(delivery.envelope)))
    } else {
        match client.next_message().await? {
            Ok(message) => Some((
                message.delivery.seq,
                Some(Bytes::from(message.opened.plaintext)),
            )),
            Err((delivery, _)) => Some((delivery.seq, None)),
        }
    }
}

#[derive(Default)]
struct SenderResult {
    sends: u64,
    acked: u64,
    expected: Vec<(usize, u64)>,
    send_ack: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    per_second: Vec<u64>,
}

struct SendPlan {
    sender: usize,
    recipients: Arc<Vec<Address>>,
    size: usize,
    fanout: usize,
    opaque: bool,
    epoch: Instant,
    deadline: Option<Instant>,
    /// Fixed work instead of a deadline: (mailbox index, count) pairs.
    fixed: Option<Vec<usize>>,
    /// At a fixed rate: the lane's period, and when its first send is due
    /// (see [`lane_phase`]).
    interval: Option<(Duration, Duration)>,
    acked: Arc<AtomicU64>,
}

/// When lane `lane` of `lanes` first sends, each sending once per `period`:
/// the lanes' sends are spread evenly over the period, so the broker sees
/// one send every `period / lanes` instead of a burst from every lane at
/// once (which would measure the burst's queueing, not the latency at the
/// rate asked for).
fn lane_phase(period: Duration, lane: usize, lanes: usize) -> Duration {
    period.mul_f64(lane as f64 / lanes.max(1) as f64)
}

async fn send_loop(client: Arc<Client>, plan: SendPlan, lane: usize) -> SenderResult {
    let mut result = SenderResult {
        send_ack: Some(new_histogram()),
        ..SenderResult::default()
    };
    let mut counter = 0u64;
    let mut rng = rand::rngs::StdRng::from_os_rng();
    let mut filler = vec![0u8; plan.size.max(HEADER)];
    rng.fill(&mut filler[..]);
    let mut fixed = plan.fixed.clone().map(|v| v.into_iter());
    let mut ticker = plan.interval.map(|(period, phase)| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    // Reused for every send: the generator's own allocations per message
    // were a tenth of its profile (glibc's malloc and free).
    let mut targets: Vec<usize> = Vec::with_capacity(plan.fanout);
    let mut addresses: Vec<Address> = Vec::with_capacity(plan.fanout);
    loop {
        targets.clear();
        match &mut fixed {
            Some(iter) => match iter.next() {
                Some(index) => targets.push(index),
                None => break,
            },
            None => {
                if plan.deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let fanout = plan.fanout.min(plan.recipients.len());
                if fanout == 1 {
                    targets.push(rng.random_range(0..plan.recipients.len()));
                } else {
                    targets.extend(rand::seq::index::sample(
                        &mut rng,
                        plan.recipients.len(),
                        fanout,
                    ));
                }
            }
        }
        if let Some(ticker) = &mut ticker {
            ticker.tick().await;
        }
        // Key: sender (20 bits) | lane (12 bits) | counter (32 bits).
        let key = ((plan.sender as u64) << 44) | ((lane as u64) << 32) | counter;
        counter += 1;
        let mut payload = filler.clone();
        payload[..8].copy_from_slice(&key.to_le_bytes());
        let started = Instant::now();
        payload[8..16].copy_from_slice(&(plan.epoch.elapsed().as_nanos() as u64).to_le_bytes());
        addresses.clear();
        addresses.extend(targets.iter().map(|i| plan.recipients[*i]));
        result.sends += 1;
        let outcome = if plan.opaque {
            client.send_envelope(&addresses, payload, TTL).await
        } else {
            client.send(&addresses, &payload, TTL).await
        };
        match outcome {
            Ok(ack) => {
                let micros = started.elapsed().as_micros() as u64;
                if let Some(h) = &mut result.send_ack {
                    let _ = h.record(micros.max(1));
                }
                for failed in &ack.failed {
                    let name = backbone_protocol::ErrorCode::from_u16(failed.code)
                        .map(|c| c.name())
                        .unwrap_or("unknown");
                    *result.errors.entry(name.to_owned()).or_default() += 1;
                }
                // A handful of recipients: a scan is cheaper than a set.
                for &index in &targets {
                    let recipient = plan.recipients[index];
                    if ack.stored.iter().any(|stored| stored.address == recipient) {
                        result.expected.push((index, key));
                    }
                }
                if ack.failed.is_empty() {
                    result.acked += 1;
                    plan.acked.fetch_add(1, Ordering::Relaxed);
                    let second = plan.epoch.elapsed().as_secs() as usize;
                    if result.per_second.len() <= second {
                        result.per_second.resize(second + 1, 0);
                    }
                    result.per_second[second] += 1;
                }
            }
            Err(error) => {
                let name = error
                    .code()
                    .map(|c| c.name().to_owned())
                    .unwrap_or_else(|| error.to_string());
                *result.errors.entry(name).or_default() += 1;
            }
        }
    }
    result
}

async fn steady(
    cli: &Cli,
    target: &Target,
    args: SteadyArgs,
    catchup: Option<(usize, usize)>,
) -> anyhow::Result<RunResult> {
    anyhow::ensure!(
        args.mailboxes > 0 && args.senders > 0 && args.inflight > 0,
        "mailboxes, senders and inflight must be positive"
    );
    anyhow::ensure!(
        args.fanout >= 1 && args.fanout <= args.mailboxes,
        "fanout must be between 1 and mailboxes"
    );
    let scenario = match &cli.scenario {
        Scenario::Steady(_) => format!(
            "steady mailboxes={} senders={} size={} rate={} inflight={} fanout={} duration={:?}",
            args.mailboxes,
            args.senders,
            args.size,
            args.rate,
            args.inflight,
            args.fanout,
            args.duration
        ),
        Scenario::Fanout(_) => format!(
            "fanout recipients={} size={} duration={:?}",
            args.mailboxes, args.size, args.duration
        ),
        _ => format!(
            "offline-catchup mailboxes={} senders={} size={}",
            args.mailboxes, args.senders, args.size
        ),
    };
    let opaque = cli.opaque;
    let recipients: Vec<Party> = (0..args.mailboxes).map(|_| Party::new()).collect();
    let addresses = Arc::new(
        recipients
            .iter()
            .map(|p| p.signing.address())
            .collect::<Vec<_>>(),
    );
    let mut recipient_clients =
        connect_all(cli, target, &recipients, !opaque, "connecting mailboxes").await?;
    let senders: Vec<Party> = (0..args.senders).map(|_| Party::new()).collect();
    let sender_clients = connect_all(cli, target, &senders, false, "connecting senders").await?;

    let offline = catchup.map(|(offline, _)| offline).unwrap_or(0);
    // Offline recipients disconnect now and come back after the sends.
    recipient_clients.truncate(args.mailboxes - offline);

    let epoch = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop) = watch::channel(false);
    let mut receivers: Vec<(usize, tokio::task::JoinHandle<ReceiverResult>)> = recipient_clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                i,
                spawn_receiver(c.clone(), opaque, epoch, delivered.clone(), stop.clone()),
            )
        })
        .collect();

    let before = target.sample();
    let generator_before = crate::broker::proc_sample(std::process::id());
    let started = Instant::now();
    let deadline = catchup.is_none().then(|| started + args.duration);
    let lanes = args.senders * args.inflight;
    let interval =
        (args.rate > 0).then(|| Duration::from_secs_f64(lanes as f64 / args.rate as f64));
    let mut tasks = tokio::task::JoinSet::new();
    for (sender, client) in sender_clients.iter().enumerate() {
        for lane in 0..args.inflight {
            let global_lane = sender * args.inflight + lane;
            let fixed = catchup.map(|(_, per_mailbox)| {
                // Spread every (mailbox, message) pair over the lanes.
                (0..args.mailboxes * per_mailbox)
                    .filter(|n| n % lanes == global_lane)
                    .map(|n| n % args.mailboxes)
                    .collect()
            });
            let plan = SendPlan {
                sender,
                recipients: addresses.clone(),
                size: args.size,
                fanout: args.fanout,
                opaque,
                epoch,
                deadline,
                fixed,
                interval: interval.map(|period| (period, lane_phase(period, global_lane, lanes))),
                acked: acked.clone(),
            };
            tasks.spawn(send_loop(client.clone(), plan, lane));
        }
    }
    let bar = progress(cli, "sending");
    let ticker = {
        let (bar, acked, delivered) = (bar.clone(), acked.clone(), delivered.clone());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = acked.load(Ordering::Relaxed);
                bar.set_message(format!(
                    "acked {now} ({} /s), delivered {}",
                    now - last,
                    delivered.load(Ordering::Relaxed)
                ));
                last = now;
            }
        })
    };
    let mut merged = SenderResult {
        send_ack: Some(new_histogram()),
        ..SenderResult::default()
    };
    while let Some(joined) = tasks.join_next().await {
        let result = joined?;
        merged.sends += result.sends;
        merged.acked += result.acked;
        merged.expected.extend(result.expected);
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
    let seconds = started.elapsed().as_secs_f64();
    let after = target.sample();
    let generator_after = crate::broker::proc_sample(std::process::id());

    if offline > 0 {
        bar.set_message("offline mailboxes reconnecting and draining");
        let returning = &recipients[args.mailboxes - offline..];
        let clients = connect_all(
            cli,
            target,
            returning,
            false,
            "reconnecting offline mailboxes",
        )
        .await?;
        for (offset, client) in clients.into_iter().enumerate() {
            let index = args.mailboxes - offline + offset;
            receivers.push((
                index,
                spawn_receiver(client, opaque, epoch, delivered.clone(), stop.clone()),
            ));
        }
    }
    // Drain: wait until every owed delivery arrived, or give up after a quiet period.
    let owed = merged.expected.len() as u64;
    let mut last_progress = (delivered.load(Ordering::Relaxed), Instant::now());
    while delivered.load(Ordering::Relaxed) < owed {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now != last_progress.0 {
            last_progress = (now, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(15) {
            break;
        }
    }
    ticker.abort();
    bar.finish_and_clear();
    let _ = stop_tx.send(true);

    let mut push = new_histogram();
    let mut received: HashMap<usize, HashSet<u64>> = HashMap::new();
    let mut duplicates = 0;
    for (index, handle) in receivers {
        let result = handle.await?;
        push.add(&result.push)?;
        duplicates += result.duplicates;
        received.insert(index, result.received);
    }
    let delivered_owed = merged
        .expected
        .iter()
        .filter(|(index, key)| received.get(index).is_some_and(|set| set.contains(key)))
        .count() as u64;
    let broker = match (before, after) {
        (Some(before), Some(after)) => Some(BrokerUsage {
            cpu_seconds: after.cpu_seconds - before.cpu_seconds,
            cpu_us_per_message: Some(
                (after.cpu_seconds - before.cpu_seconds) * 1e6 / merged.acked.max(1) as f64,
            ),
            rss_start_bytes: before.rss_bytes,
            rss_end_bytes: after.rss_bytes,
        }),
        _ => None,
    };
    let generator = match (generator_before, generator_after) {
        (Some(before), Some(after)) => Some(GeneratorUsage {
            cpu_seconds: after.cpu_seconds - before.cpu_seconds,
            cpu_us_per_message: (after.cpu_seconds - before.cpu_seconds) * 1e6
                / merged.acked.max(1) as f64,
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
        lost: owed - delivered_owed,
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
        generator,
        connect: None,
        idle: None,
        soak: None,
    })
}

async fn connect_storm(
    cli: &Cli,
    target: &Target,
    args: crate::StormArgs,
) -> anyhow::Result<RunResult> {
    // Clients have their keys before they connect (a storm is clients
    // coming back, after a restart or a network outage): generate them
    // before the clock starts, so the rate is the rate of handshakes and
    // authentications, not of the load generator's key generation.
    let parties: Vec<Party> = (0..args.connections).map(|_| Party::new()).collect();
    let before = target.sample();
    let bar = progress(cli, "connecting");
    let limit = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, party) in parties.into_iter().enumerate() {
        let permit = limit.clone().acquire_owned().await?;
        let config = target.connect_config(index);
        tasks.spawn(async move {
            let _permit = permit;
            let begun = Instant::now();
            let options =
                ClientOptions::primary(config, party.signing.clone(), party.encryption.clone());
            let client = Client::connect(options).await;
            (client, begun.elapsed())
        });
    }
    let mut handshake = new_histogram();
    let mut clients = Vec::with_capacity(args.connections);
    let mut errors = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (client, took) = joined?;
        match client {
            Ok(client) => {
                let _ = handshake.record((took.as_micros() as u64).max(1));
                clients.push(client);
                if clients.len() % 100 == 0 {
                    bar.set_message(format!(
                        "authenticated {}/{}",
                        clients.len(),
                        args.connections
                    ));
                }
            }
            Err(error) => *errors.entry(error.to_string()).or_insert(0u64) += 1,
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.set_message("holding idle connections");
    tokio::time::sleep(args.hold).await;
    let after = target.sample();
    bar.finish_and_clear();
    let connected = clients.len() as u64;
    let per_connection = match (before, after) {
        (Some(b), Some(a)) if connected > 0 => {
            Some((a.rss_bytes.saturating_sub(b.rss_bytes)) as f64 / connected as f64)
        }
        _ => None,
    };
    let broker = match (before, after) {
        (Some(b), Some(a)) => Some(BrokerUsage {
            cpu_seconds: a.cpu_seconds - b.cpu_seconds,
            cpu_us_per_message: None,
            rss_start_bytes: b.rss_bytes,
            rss_end_bytes: a.rss_bytes,
        }),
        _ => None,
    };
    let cpu_per_connection = broker
        .as_ref()
        .filter(|_| connected > 0)
        .map(|usage| usage.cpu_seconds * 1e6 / connected as f64);
    Ok(RunResult {
        scenario: format!(
            "connect-storm connections={} concurrency={}",
            args.connections, args.concurrency
        ),
        opaque: true,
        seconds,
        errors,
        broker,
        generator: None,
        connect: Some(ConnectFigures {
            connections: connected,
            rate_per_s: connected as f64 / seconds,
            handshake: Percentiles::of(&handshake),
            broker_bytes_per_connection: per_connection,
            broker_cpu_us_per_connection: cpu_per_connection,
        }),
        ..RunResult::default()
    })
}

async fn idle_mailboxes(
    cli: &Cli,
    target: &Target,
    args: crate::IdleArgs,
) -> anyhow::Result<RunResult> {
    let metrics = target
        .metrics
        .clone()
        .context("idle-mailboxes reads the broker's /health: use --spawn-broker")?;
    anyhow::ensure!(
        args.mailboxes > 0 && args.senders > 0,
        "mailboxes and senders must be positive"
    );
    let addresses: Arc<Vec<Address>> = Arc::new(
        (0..args.mailboxes)
            .map(|_| Address(rand::random()))
            .collect(),
    );
    let senders: Vec<Party> = (0..args.senders).map(|_| Party::new()).collect();
    let clients = connect_all(cli, target, &senders, false, "connecting senders").await?;
    let bar = progress(cli, "storing one envelope per mailbox");
    let epoch = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let lanes = args.senders * 8;
    let mut tasks = tokio::task::JoinSet::new();
    for (sender, client) in clients.iter().enumerate() {
        for lane in 0..8 {
            let global_lane = sender * 8 + lane;
            let plan = SendPlan {
                sender,
                recipients: addresses.clone(),
                size: args.size,
                fanout: 1,
                opaque: true,
                epoch,
                deadline: None,
                fixed: Some(
                    (0..args.mailboxes)
                        .filter(|n| n % lanes == global_lane)
                        .collect(),
                ),
                interval: None,
                acked: acked.clone(),
            };
            tasks.spawn(send_loop(client.clone(), plan, lane));
        }
    }
    let mut errors = BTreeMap::new();
    let mut stored = 0u64;
    while let Some(joined) = tasks.join_next().await {
        let result = joined?;
        stored += result.acked;
        for (name, count) in result.errors {
            *errors.entry(name).or_default() += count;
        }
    }
    let seconds = epoch.elapsed().as_secs_f64();
    let actors_after_sends = crate::broker::mailbox_actors(&metrics)?;
    bar.set_message("waiting past the mailbox idle timeout");
    tokio::time::sleep(args.settle).await;
    let actors_after_settle = crate::broker::mailbox_actors(&metrics)?;
    bar.finish_and_clear();
    Ok(RunResult {
        scenario: format!(
            "idle-mailboxes mailboxes={} senders={} settle={:?}",
            args.mailboxes, args.senders, args.settle
        ),
        opaque: true,
        seconds,
        sends: args.mailboxes as u64,
        acked: stored,
        acked_per_s: stored as f64 / seconds,
        errors,
        idle: Some(IdleFigures {
            mailboxes: stored,
            actors_after_sends,
            actors_after_settle,
            rss_after_settle_bytes: target.sample().map(|s| s.rss_bytes),
        }),
        ..RunResult::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_lanes_send_evenly_spread_over_their_period() {
        let period = Duration::from_millis(40);
        let phases: Vec<_> = (0..80).map(|lane| lane_phase(period, lane, 80)).collect();
        assert_eq!(phases[0], Duration::ZERO);
        // One send every 0.5 ms, the last half a step before the next period.
        for pair in phases.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_micros(500));
        }
        assert_eq!(phases[79], Duration::from_micros(39_500));
        assert_eq!(lane_phase(period, 0, 0), Duration::ZERO);
    }
}
