//! Steady traffic through the fleet while faults happen: recipients on every
//! node, each entering through a node that is not its home (so every
//! connection and reconnection follows a redirect), and senders homed on
//! every node, each sending to one recipient per node on every tick.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backbone_client::{Backoff, Client, ClientOptions, ConnectConfig, Status, Trust};
use backbone_protocol::{Address, ErrorCode};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::check::{Ledger, PayloadId, Verdict};
use super::docker::{DockerFleet, Log, MOVED_SLOTS, NODES, client_addr};
use crate::support::Identity;

/// Recipients homed on each node.
const RECIPIENTS_PER_NODE: usize = 3;
/// Senders homed on each node.
const SENDERS_PER_NODE: usize = 2;
/// How often each sender sends: 6 senders × 5 sends/s = 30 sends/s, each
/// to three recipients, about 90 copies per second in all.
const SEND_INTERVAL: Duration = Duration::from_millis(200);
/// Above the broker's `fleet.forward_timeout` (5 s), so a forward to a
/// silent node is answered with `ShardUnavailable` rather than a client
/// timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(8);
/// Nothing expires during a test.
const TTL: Duration = Duration::from_secs(3600);
/// Retry delay after a send that got no answer at all.
const NO_ANSWER_RETRY: Duration = Duration::from_secs(1);
/// A drain is over once every acknowledged copy arrived and nothing new
/// arrived for this long (so late duplicates are seen too).
const DRAIN_QUIET: Duration = Duration::from_secs(3);
/// How often a client's connection status is sampled.
const STATUS_POLL: Duration = Duration::from_millis(50);

/// Payloads start with this, then the run's nonce, the sender and its counter.
const MAGIC: &[u8; 8] = b"bbfleet1";

fn encode(run: u64, id: PayloadId) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    bytes.extend_from_slice(&run.to_be_bytes());
    bytes.extend_from_slice(&id.sender.to_be_bytes());
    bytes.extend_from_slice(&id.counter.to_be_bytes());
    bytes
}

/// The payload id in `bytes`, if they are a payload of run `run`.
fn decode(run: u64, bytes: &[u8]) -> Option<PayloadId> {
    let rest = bytes.strip_prefix(MAGIC.as_slice())?;
    let (nonce, rest) = rest.split_first_chunk::<8>()?;
    let (sender, rest) = rest.split_first_chunk::<4>()?;
    let counter: [u8; 8] = rest.try_into().ok()?;
    (u64::from_be_bytes(*nonce) == run).then(|| PayloadId {
        sender: u32::from_be_bytes(*sender),
        counter: u64::from_be_bytes(counter),
    })
}

/// What became of one copy, as its sender saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored: the broker promised delivery.
    Acked,
    /// Failed with the retryable `ShardUnavailable`: the owner is unreachable.
    Unavailable,
    /// Failed with another retryable code.
    Retryable(u16),
    /// The whole send got no answer (timeout, connection lost); retried.
    NoAnswer,
    /// Failed for a reason retrying cannot fix (code 0: a client-side error).
    Rejected(u16),
    /// The ack named the recipient neither as stored nor as failed.
    Missing,
}

/// One copy's outcome, when the sender learned it.
#[derive(Clone, Copy, Debug)]
pub struct SendEvent {
    /// When the send returned.
    pub at: Instant,
    /// The sender's home node.
    pub sender_home: usize,
    /// The recipient's home node.
    pub recipient_home: usize,
    /// What happened.
    pub outcome: Outcome,
}

#[derive(Default)]
struct Record {
    ledger: Ledger,
    events: Vec<SendEvent>,
    retries: u64,
    skipped_ticks: u64,
    reconnects: u64,
    longest_reconnect: Duration,
    /// When a client noticed its connection was gone, and its home node.
    connections_lost: Vec<(Instant, usize)>,
    /// Clients that gave up for good, with the reason.
    stopped: Vec<String>,
}

/// Running traffic; [`Traffic::finish`] stops it and returns the [`Summary`].
pub struct Traffic {
    record: Arc<Mutex<Record>>,
    stop: watch::Sender<bool>,
    senders: Vec<JoinHandle<()>>,
    /// Receiving tasks and status watchers, aborted after the drain.
    background: Vec<JoinHandle<()>>,
}

/// The recipients, as senders address them.
struct Recipients {
    addresses: Vec<Address>,
    homes: Vec<usize>,
    /// Recipient indices per home node.
    by_node: Vec<Vec<usize>>,
}

fn options(fleet: &DockerFleet, identity: &Identity, entry: usize) -> ClientOptions {
    let mut connect = ConnectConfig::new(client_addr(entry), Trust::CaFile(fleet.ca_path()));
    // A node that is down swallows the QUIC handshake; give up on it soon
    // and try again rather than wait the default 10 s.
    connect.connect_timeout = Duration::from_secs(3);
    let mut options = ClientOptions::primary(
        connect,
        identity.signing.clone(),
        identity.encryption.clone(),
    );
    options.request_timeout = REQUEST_TIMEOUT;
    // Reconnect within a second once a node is back (the default backs off
    // to 10 s, which would only make the test slower).
    options.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    options
}

/// A fresh identity whose mailbox lives on node `home`.
fn identity_on(fleet: &DockerFleet, home: usize) -> Identity {
    loop {
        let identity = Identity::new();
        if fleet.home_of(&identity.address()) == home {
            return identity;
        }
    }
}

/// The `k`-th identity homed on `home`. On node-c the first is in the slots
/// the growth step moves to node-d and the second is not, so a grown fleet
/// always moves some live mailboxes and keeps some.
fn identity_for(fleet: &DockerFleet, home: usize, k: usize) -> Identity {
    if home != 2 || k > 1 {
        return identity_on(fleet, home);
    }
    loop {
        let identity = identity_on(fleet, home);
        let slot = backbone_protocol::fleet::slot_of(&identity.address());
        if MOVED_SLOTS.contains(&slot) == (k == 0) {
            return identity;
        }
    }
}

async fn connect(fleet: &DockerFleet, identity: &Identity, entry: usize) -> Arc<Client> {
    let client = Client::connect(options(fleet, identity, entry))
        .await
        .unwrap_or_else(|error| panic!("connecting through {}: {error}", NODES[entry]));
    client.publish_card().await.expect("publishes its card");
    Arc::new(client)
}

/// Samples a client's connection status and logs and records its changes,
/// so a slow drain can be told apart from a lost message. A connection that
/// died silently still reads `Connected` until QUIC's idle timeout says
/// otherwise; the `Reconnecting` line shows when the client noticed.
async fn watch_status(
    who: String,
    home: usize,
    client: Arc<Client>,
    record: Arc<Mutex<Record>>,
    log: Log,
) {
    let mut last = Status::Connected;
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(STATUS_POLL).await;
        let status = client.status();
        if status == last {
            continue;
        }
        let now = Instant::now();
        match &status {
            Status::Reconnecting => {
                log.line(&format!("{who}: connection lost, reconnecting"));
                since = now;
                let mut record = record.lock().expect("record lock");
                record.connections_lost.push((now, home));
            }
            Status::Connected => {
                let took = now - since;
                log.line(&format!("{who}: connected again after {took:.1?}"));
                let mut record = record.lock().expect("record lock");
                record.reconnects += 1;
                record.longest_reconnect = record.longest_reconnect.max(took);
            }
            Status::Stopped(reason) => {
                log.line(&format!("{who}: stopped for good: {reason}"));
                record
                    .lock()
                    .expect("record lock")
                    .stopped
                    .push(format!("{who}: {reason}"));
            }
        }
        last = status;
    }
}

impl Traffic {
    /// Connects every recipient and sender and starts sending.
    pub async fn start(fleet: &DockerFleet) -> Traffic {
        let run: u64 = rand::random();
        let record = Arc::new(Mutex::new(Record::default()));
        let mut recipients = Recipients {
            addresses: Vec::new(),
            homes: Vec::new(),
            by_node: vec![Vec::new(); NODES.len()],
        };
        let mut background = Vec::new();
        for (home, home_name) in NODES.iter().enumerate() {
            for k in 0..RECIPIENTS_PER_NODE {
                let identity = identity_for(fleet, home, k);
                // Through each of the other two nodes in turn, never home.
                let entry = (home + 1 + k % (NODES.len() - 1)) % NODES.len();
                let client = connect(fleet, &identity, entry).await;
                let index = recipients.addresses.len();
                recipients.addresses.push(identity.address());
                recipients.homes.push(home);
                recipients.by_node[home].push(index);
                background.push(tokio::spawn(watch_status(
                    format!("recipient {index} (home {home_name}, via {})", NODES[entry]),
                    home,
                    client.clone(),
                    record.clone(),
                    fleet.logger(),
                )));
                background.push(tokio::spawn(receive(index, client, record.clone(), run)));
            }
        }
        let recipients = Arc::new(recipients);
        let (stop, stopped) = watch::channel(false);
        let mut sender_tasks = Vec::new();
        for (home, home_name) in NODES.iter().enumerate() {
            for k in 0..SENDERS_PER_NODE {
                let identity = identity_for(fleet, home, k);
                let client = connect(fleet, &identity, home).await;
                let index = sender_tasks.len() as u32;
                background.push(tokio::spawn(watch_status(
                    format!("sender {index} (home {home_name})"),
                    home,
                    client.clone(),
                    record.clone(),
                    fleet.logger(),
                )));
                let sender = Sender {
                    index,
                    home,
                    client,
                    recipients: recipients.clone(),
                    record: record.clone(),
                    run,
                };
                sender_tasks.push(tokio::spawn(sender.run(stopped.clone())));
            }
        }
        fleet.log(&format!(
            "traffic: {} recipients (each entering through another node than its home), {} senders",
            recipients.addresses.len(),
            sender_tasks.len()
        ));
        Traffic {
            record,
            stop,
            senders: sender_tasks,
            background,
        }
    }

    /// When the first copy to a recipient homed on `recipient_home` from a
    /// sender homed elsewhere (so forwarded over a link) ended with
    /// `outcome`, among those learned at or after `since`.
    pub fn first_forwarded_since(
        &self,
        since: Instant,
        recipient_home: usize,
        outcome: Outcome,
    ) -> Option<Instant> {
        self.record
            .lock()
            .expect("record lock")
            .events
            .iter()
            .filter(|e| {
                e.at >= since
                    && e.recipient_home == recipient_home
                    && e.sender_home != recipient_home
                    && e.outcome == outcome
            })
            .map(|e| e.at)
            .min()
    }

    /// Stops the senders (each finishes the send it is in), waits until the
    /// recipients have everything acknowledged and nothing new arrives for
    /// a few seconds (at most `drain_limit`), and returns what happened.
    pub async fn finish(self, fleet: &DockerFleet, drain_limit: Duration) -> Summary {
        let _ = self.stop.send(true);
        for sender in self.senders {
            tokio::time::timeout(REQUEST_TIMEOUT * 2, sender)
                .await
                .expect("a sender stops within two request timeouts")
                .expect("sender task");
        }
        fleet.log("traffic: senders stopped; draining");
        let started = Instant::now();
        let mut last_count = u64::MAX;
        let mut last_change = started;
        let drained = loop {
            let (count, all_delivered) = {
                let record = self.record.lock().expect("record lock");
                (
                    record.ledger.delivery_count(),
                    record.ledger.all_acked_delivered(),
                )
            };
            let now = Instant::now();
            if count != last_count {
                last_count = count;
                last_change = now;
            }
            if all_delivered && now - last_change >= DRAIN_QUIET {
                break true;
            }
            if now - started >= drain_limit {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for task in &self.background {
            task.abort();
        }
        let record = std::mem::take(&mut *self.record.lock().expect("record lock"));
        fleet.log(&format!(
            "traffic: drain {} after {:.1?}",
            if drained { "complete" } else { "gave up" },
            started.elapsed()
        ));
        Summary {
            verdict: record.ledger.verdict(),
            events: record.events,
            retries: record.retries,
            skipped_ticks: record.skipped_ticks,
            reconnects: record.reconnects,
            longest_reconnect: record.longest_reconnect,
            connections_lost: record.connections_lost,
            stopped: record.stopped,
        }
    }
}

/// Receives, records and acks until aborted.
async fn receive(index: usize, client: Arc<Client>, record: Arc<Mutex<Record>>, run: u64) {
    while let Some(delivery) = client.next_delivery().await {
        {
            let mut record = record.lock().expect("record lock");
            match decode(run, &delivery.envelope) {
                Some(id) => record.ledger.delivered((id, index)),
                None => record.ledger.undecodable(),
            }
        }
        // Acks are cumulative and only move the cursor; a lost one means a
        // redelivery, which the client filters by sequence number.
        let _ = client.ack(delivery.seq).await;
    }
}

struct Sender {
    index: u32,
    home: usize,
    client: Arc<Client>,
    recipients: Arc<Recipients>,
    record: Arc<Mutex<Record>>,
    run: u64,
}

impl Sender {
    /// Every tick: one new copy for the next recipient of each node, plus
    /// the recipients whose earlier copy failed and whose retry is due, all
    /// under one fresh payload id.
    async fn run(self, stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SEND_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Senders start at different recipients to spread the load.
        let mut cursor = self.index as usize;
        let mut counter = 0u64;
        let mut owed: Vec<(usize, Instant)> = Vec::new();
        loop {
            tick.tick().await;
            if *stop.borrow() {
                return;
            }
            // A request made while reconnecting would wait in the client's
            // queue and go out after its caller gave up; skip the tick.
            if self.client.status() != Status::Connected {
                self.record.lock().expect("record lock").skipped_ticks += 1;
                continue;
            }
            let mut targets: Vec<usize> = self
                .recipients
                .by_node
                .iter()
                .map(|on_node| on_node[cursor % on_node.len()])
                .collect();
            cursor += 1;
            let now = Instant::now();
            let mut retries = 0;
            owed.retain(|&(recipient, due)| {
                if due > now {
                    return true;
                }
                // A recipient already in this send gets its new copy here.
                if !targets.contains(&recipient) {
                    targets.push(recipient);
                }
                retries += 1;
                false
            });
            counter += 1;
            let id = PayloadId {
                sender: self.index,
                counter,
            };
            {
                let mut record = self.record.lock().expect("record lock");
                record.retries += retries;
                for &target in &targets {
                    record.ledger.sent((id, target));
                }
            }
            let addresses: Vec<Address> = targets
                .iter()
                .map(|&t| self.recipients.addresses[t])
                .collect();
            let result = self
                .client
                .send_envelope(&addresses, encode(self.run, id), TTL)
                .await;
            let at = Instant::now();
            let outcomes: Vec<(usize, Outcome, Option<Duration>)> = match &result {
                Ok(ack) => targets
                    .iter()
                    .zip(&addresses)
                    .map(|(&target, address)| {
                        if ack.stored.iter().any(|s| s.address == *address) {
                            return (target, Outcome::Acked, None);
                        }
                        let Some(failed) = ack.failed.iter().find(|f| f.address == *address) else {
                            return (target, Outcome::Missing, None);
                        };
                        let after =
                            Duration::from_millis(failed.retry_after_ms.map_or(1000, u64::from));
                        match ErrorCode::from_u16(failed.code) {
                            Some(ErrorCode::ShardUnavailable) => {
                                (target, Outcome::Unavailable, Some(after))
                            }
                            Some(code) if code.is_retryable() => {
                                (target, Outcome::Retryable(failed.code), Some(after))
                            }
                            _ => (target, Outcome::Rejected(failed.code), None),
                        }
                    })
                    .collect(),
                Err(error) if error.is_retryable() => targets
                    .iter()
                    .map(|&t| (t, Outcome::NoAnswer, Some(NO_ANSWER_RETRY)))
                    .collect(),
                Err(error) => {
                    let code = error.code().map_or(0, |code| code as u16);
                    targets
                        .iter()
                        .map(|&t| (t, Outcome::Rejected(code), None))
                        .collect()
                }
            };
            let mut record = self.record.lock().expect("record lock");
            for (target, outcome, retry_after) in outcomes {
                if outcome == Outcome::Acked {
                    record.ledger.acked((id, target));
                }
                if let Some(after) = retry_after {
                    owed.push((target, at + after));
                }
                record.events.push(SendEvent {
                    at,
                    sender_home: self.home,
                    recipient_home: self.recipients.homes[target],
                    outcome,
                });
            }
        }
    }
}

/// What one test's traffic did.
pub struct Summary {
    /// The checker's counts.
    pub verdict: Verdict,
    /// Every copy's outcome at its sender.
    pub events: Vec<SendEvent>,
    /// Copies that were retries of failed ones (each with a new payload id).
    pub retries: u64,
    /// Sender ticks skipped because the sender was reconnecting.
    pub skipped_ticks: u64,
    /// Reconnections of all clients, senders and recipients.
    pub reconnects: u64,
    /// The longest a client took from noticing a lost connection to being
    /// connected again.
    pub longest_reconnect: Duration,
    /// When a client noticed its connection was gone, and its home node.
    pub connections_lost: Vec<(Instant, usize)>,
    /// Clients that gave up for good.
    pub stopped: Vec<String>,
}

impl Summary {
    /// Outcomes learned in `[from, to)` that satisfy `filter`.
    pub fn count_between(
        &self,
        from: Instant,
        to: Instant,
        filter: impl Fn(&SendEvent) -> bool,
    ) -> usize {
        self.events
            .iter()
            .filter(|e| e.at >= from && e.at < to && filter(e))
            .count()
    }

    /// Outcomes since `from` that satisfy `filter`.
    pub fn count_since(&self, from: Instant, filter: impl Fn(&SendEvent) -> bool) -> usize {
        self.events
            .iter()
            .filter(|e| e.at >= from && filter(e))
            .count()
    }

    /// How long after `since` the clients homed on `home` noticed that their
    /// connection was gone: the first and the last of them, if any did.
    pub fn lost_connection_noticed(
        &self,
        home: usize,
        since: Instant,
    ) -> Option<(Duration, Duration)> {
        let delays: Vec<Duration> = self
            .connections_lost
            .iter()
            .filter(|&&(at, h)| h == home && at >= since)
            .map(|&(at, _)| at - since)
            .collect();
        Some((*delays.iter().min()?, *delays.iter().max()?))
    }

    /// The senders' view in one line: how many copies ended which way.
    pub fn outcomes(&self) -> String {
        let count =
            |f: &dyn Fn(Outcome) -> bool| self.events.iter().filter(|e| f(e.outcome)).count();
        format!(
            "acked={} shard_unavailable={} other_retryable={} no_answer={} rejected={} missing={} \
             retries={} skipped_ticks={}; clients reconnected {} times (longest {:.1?})",
            count(&|o| o == Outcome::Acked),
            count(&|o| o == Outcome::Unavailable),
            count(&|o| matches!(o, Outcome::Retryable(_))),
            count(&|o| o == Outcome::NoAnswer),
            count(&|o| matches!(o, Outcome::Rejected(_))),
            count(&|o| o == Outcome::Missing),
            self.retries,
            self.skipped_ticks,
            self.reconnects,
            self.longest_reconnect,
        )
    }

    /// Everything that fails the test: the checker's failures, any copy
    /// the broker refused for good or left out of its ack (the senders only
    /// ever make valid sends, so either is a broker bug), and any client
    /// that stopped reconnecting.
    pub fn failures(&self) -> Vec<String> {
        let mut failures = self.verdict.failures();
        if !self.stopped.is_empty() {
            failures.push(format!("clients gave up: {:?}", self.stopped));
        }
        let odd: Vec<_> = self
            .events
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Rejected(_) | Outcome::Missing))
            .take(5)
            .collect();
        if !odd.is_empty() {
            failures.push(format!("sends refused for good or unanswered: {odd:?}"));
        }
        failures
    }

    /// Prints the counts (always shown, see [`super::docker::report`]) and
    /// panics if anything failed.
    pub fn report_and_check(&self, test: &str) {
        super::docker::report(&format!("{test}: {}", self.verdict.summary()));
        super::docker::report(&format!("{test}: senders saw {}", self.outcomes()));
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "{test} failed:\n{}",
            failures.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_other_runs_do_not_decode() {
        let id = PayloadId {
            sender: 7,
            counter: 1 << 40,
        };
        let bytes = encode(42, id);
        assert_eq!(decode(42, &bytes), Some(id));
        assert_eq!(decode(43, &bytes), None);
        assert_eq!(decode(42, &bytes[..bytes.len() - 1]), None);
        assert_eq!(decode(42, b"something else entirely"), None);
    }
}
