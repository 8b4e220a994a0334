//! What the fault loops share (`crash_loop.rs`: SIGKILL; `power_loss.rs`:
//! SIGKILL and a power cut): the real broker restarted over and over on one
//! data directory, the load (senders, connected and offline recipients), the
//! ledger it fills, and the drain and verdict at the end.
//!
//! A test crate that includes this module declares `check`
//! (`fleet_docker/check.rs`), `process` and `support` beside it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backbone_client::{Client, ClientOptions, ConnectConfig, Trust};
use backbone_protocol::Address;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::check::{Ledger, PayloadId, Verdict};
use crate::process::{BrokerProcess, free_udp_port, spawn_broker};
use crate::support::Identity;

const SENDERS: usize = 3;
const RECIPIENTS: usize = 4;
/// Pause between two sends of one sender.
const SEND_EVERY: Duration = Duration::from_millis(5);
/// Marks this run's payloads: 8 bytes of run id, then sender and counter.
const PAYLOAD_LEN: usize = 8 + 4 + 8;

fn encode(run: u64, id: PayloadId) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(PAYLOAD_LEN);
    bytes.extend_from_slice(&run.to_le_bytes());
    bytes.extend_from_slice(&id.sender.to_le_bytes());
    bytes.extend_from_slice(&id.counter.to_le_bytes());
    bytes
}

fn decode(run: u64, bytes: &[u8]) -> Option<PayloadId> {
    if bytes.len() != PAYLOAD_LEN || bytes[..8] != run.to_le_bytes() {
        return None;
    }
    Some(PayloadId {
        sender: u32::from_le_bytes(bytes[8..12].try_into().ok()?),
        counter: u64::from_le_bytes(bytes[12..20].try_into().ok()?),
    })
}

/// The client options of the loop's clients (quick keep-alive and backoff).
pub fn options(port: u16, ca: &Path, identity: &Identity) -> ClientOptions {
    let mut connect = ConnectConfig::new(format!("127.0.0.1:{port}"), Trust::CaFile(ca.into()));
    connect.server_name = Some("localhost".into());
    connect.connect_timeout = Duration::from_secs(2);
    // A client learns that its broker died from the next broker's stateless
    // reset, which answers its next packet: with the default 10 s keep-alive
    // a quiet recipient could still sit on a dead connection when the drain
    // below stops waiting, and its undelivered envelopes would count as lost.
    connect.keep_alive = Duration::from_secs(1);
    let mut options = ClientOptions::primary(
        connect,
        identity.signing.clone(),
        identity.encryption.clone(),
    );
    options.request_timeout = Duration::from_secs(3);
    // Likewise the default backoff grows to 10 s after a few failed
    // reconnects (a broker that is down, or killed while starting).
    options.backoff.max = Duration::from_secs(1);
    options
}

/// The number of cycles: `variable` from the environment (the long runs'
/// scripts set it), else `default`.
pub fn cycles(variable: &str, default: u32) -> u32 {
    std::env::var(variable)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// The broker of a fault loop: run after run on the same data directory and
/// port, each run logging to its own file in `logs`.
pub struct Broker {
    data: PathBuf,
    logs: PathBuf,
    port: u16,
    env: Vec<(String, String)>,
    runs: u32,
    process: BrokerProcess,
}

impl Broker {
    /// Starts the first run with `env` (every later run gets the same) and
    /// waits until it listens.
    pub fn start(data: &Path, logs: &Path, env: &[(&str, &str)]) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        let port = free_udp_port();
        let process = Self::spawn(data, logs, port, &env, 0);
        process.wait_listening();
        Self {
            data: data.to_owned(),
            logs: logs.to_owned(),
            port,
            env,
            runs: 1,
            process,
        }
    }

    fn spawn(
        data: &Path,
        logs: &Path,
        port: u16,
        env: &[(String, String)],
        run: u32,
    ) -> BrokerProcess {
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        let log = logs.join(format!("broker-{run}.log"));
        spawn_broker(data, port, log, "127.0.0.1:0", "info", &env)
    }

    /// The port every run listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA file clients trust (the broker made it on its first start).
    pub fn ca(&self) -> PathBuf {
        self.data.join("tls/cert.pem")
    }

    /// SIGKILL, and reap the process.
    pub fn kill_9(&mut self) {
        self.process.kill_9();
    }

    /// Starts the next run without waiting for it.
    pub fn restart(&mut self) {
        self.process = Self::spawn(&self.data, &self.logs, self.port, &self.env, self.runs);
        self.runs += 1;
    }

    /// Waits until the current run listens.
    pub fn wait_listening(&self) {
        self.process.wait_listening();
    }
}

/// The load of a fault loop: senders that send without pause to every
/// recipient, each attempt with its own payload id, and the recipients.
/// Even recipients stay connected (pushes, reconnects after each fault); odd
/// ones connect only at the end and read everything from the store, so a
/// write that never became durable shows as a loss there.
pub struct Load {
    run: u64,
    port: u16,
    ca: PathBuf,
    ledger: Arc<Mutex<Ledger>>,
    recipients: Vec<Identity>,
    addresses: Vec<Address>,
    stop: watch::Sender<bool>,
    senders: Vec<JoinHandle<()>>,
    receivers: Vec<JoinHandle<()>>,
    /// Receiving clients that stopped for good (their reconnects gave up),
    /// and why: the receiving side then loses everything after it.
    stopped_clients: Arc<Mutex<Vec<String>>>,
}

/// What a fault loop ends with.
pub struct Outcome {
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Receiving clients that gave up reconnecting, and why.
    pub stopped_clients: Vec<String>,
    /// One line per lost copy the verdict names as an example: the
    /// recipient and the payload's bytes, which sit unencrypted in the
    /// store's files if they were ever written there.
    pub lost_payloads: Vec<String>,
}

impl Outcome {
    /// Everything that fails the run: the checker's failures, and clients
    /// that stopped (everything after them would count as lost).
    pub fn failures(&self) -> Vec<String> {
        let mut failures = self.verdict.failures();
        if !self.stopped_clients.is_empty() {
            failures.push(format!(
                "receiving clients stopped reconnecting for good, so everything after was lost: {:?}",
                self.stopped_clients
            ));
        }
        failures
    }

    /// Fails the test unless the run kept every promise, and acknowledged
    /// enough for that to mean something.
    pub fn assert_every_promise_kept(&self) {
        assert!(
            self.verdict.acked > 100,
            "too little was acknowledged: {:?}",
            self.verdict
        );
        let failures = self.failures();
        assert!(failures.is_empty(), "{failures:?}");
    }

    /// Prints `title: counts`, the lost payloads if any, and last a line
    /// `lost N` that scripts read.
    pub fn print(&self, title: &str) {
        for line in &self.lost_payloads {
            println!("{line}");
        }
        for client in &self.stopped_clients {
            println!("stopped: {client}");
        }
        println!("{title}: {}", self.verdict.summary());
        println!("lost {}", self.verdict.lost);
    }
}

impl Load {
    /// Connects the even recipients and starts the senders.
    pub async fn start(broker: &Broker) -> Self {
        let (port, ca) = (broker.port(), broker.ca());
        let recipients: Vec<Identity> = (0..RECIPIENTS).map(|_| Identity::new()).collect();
        let addresses: Vec<Address> = recipients.iter().map(Identity::address).collect();
        let (stop, stopped) = watch::channel(false);
        let mut load = Self {
            run: rand::random(),
            port,
            ca,
            ledger: Arc::new(Mutex::new(Ledger::default())),
            recipients,
            addresses,
            stop,
            senders: Vec::new(),
            receivers: Vec::new(),
            stopped_clients: Arc::new(Mutex::new(Vec::new())),
        };
        for index in (0..RECIPIENTS).step_by(2) {
            load.connect_recipient(index).await;
        }
        for sender in 0..SENDERS as u32 {
            let client = Client::connect(options(port, &load.ca, &Identity::new()))
                .await
                .expect("sender connects");
            load.senders.push(tokio::spawn(send(
                client,
                sender,
                load.run,
                load.ledger.clone(),
                load.addresses.clone(),
                stopped.clone(),
            )));
        }
        load
    }

    async fn connect_recipient(&mut self, index: usize) {
        let client = Client::connect(options(self.port, &self.ca, &self.recipients[index]))
            .await
            .expect("recipient connects");
        let (ledger, stopped_clients, run) =
            (self.ledger.clone(), self.stopped_clients.clone(), self.run);
        self.receivers.push(tokio::spawn(async move {
            while let Some(delivery) = client.next_delivery().await {
                match decode(run, &delivery.envelope) {
                    Some(id) => ledger.lock().expect("ledger").delivered((id, index)),
                    None => ledger.lock().expect("ledger").undecodable(),
                }
                let _ = client.ack(delivery.seq).await;
            }
            stopped_clients
                .lock()
                .expect("stopped")
                .push(format!("recipient {index}: {:?}", client.status()));
        }));
    }

    /// Copies the broker acknowledged so far.
    pub fn acked(&self) -> usize {
        self.ledger.lock().expect("ledger").verdict().acked
    }

    /// Returns right after the next acknowledgement (or after 5 s): a fault
    /// injected then lands inside the window where a sabotaged broker has
    /// acknowledged but not yet written.
    pub async fn next_ack(&self) {
        let acked = self.acked();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.acked() == acked && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops the senders, connects the offline recipients, waits until
    /// everything acknowledged arrived or nothing arrives any more, and
    /// returns the verdict.
    pub async fn finish(mut self) -> Outcome {
        let _ = self.stop.send(true);
        for sender in std::mem::take(&mut self.senders) {
            let _ = tokio::time::timeout(Duration::from_secs(10), sender).await;
        }
        for index in (1..RECIPIENTS).step_by(2) {
            self.connect_recipient(index).await;
        }
        self.drain().await;
        for receiver in &self.receivers {
            receiver.abort();
        }
        let verdict = self.ledger.lock().expect("ledger").verdict();
        let lost_payloads = verdict
            .lost_examples
            .iter()
            .map(|(id, recipient)| {
                format!(
                    "lost: {id:?} to recipient {recipient} ({}), payload {}",
                    self.addresses[*recipient],
                    hex::encode(encode(self.run, *id))
                )
            })
            .collect();
        let stopped_clients = self.stopped_clients.lock().expect("stopped").clone();
        Outcome {
            verdict,
            stopped_clients,
            lost_payloads,
        }
    }

    async fn drain(&self) {
        let started = Instant::now();
        let mut last_count = (0, Instant::now());
        loop {
            let (done, count) = {
                let ledger = self.ledger.lock().expect("ledger");
                (ledger.all_acked_delivered(), ledger.delivery_count())
            };
            if count != last_count.0 {
                last_count = (count, Instant::now());
            }
            // Done: everything acknowledged arrived and 2 s passed quietly; or
            // nothing arrived for 8 s (what is missing then is lost); or 60 s.
            let quiet = last_count.1.elapsed();
            if (done && quiet > Duration::from_secs(2))
                || quiet > Duration::from_secs(8)
                || started.elapsed() > Duration::from_secs(60)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One sender: a fresh payload id per attempt, recorded as sent before the
/// send and as acknowledged for each recipient the broker stored it for.
async fn send(
    client: Client,
    sender: u32,
    run: u64,
    ledger: Arc<Mutex<Ledger>>,
    addresses: Vec<Address>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut counter = 0u64;
    while !*stopped.borrow_and_update() {
        counter += 1;
        let id = PayloadId { sender, counter };
        {
            let mut ledger = ledger.lock().expect("ledger");
            for recipient in 0..addresses.len() {
                ledger.sent((id, recipient));
            }
        }
        if let Ok(ack) = client
            .send_envelope(&addresses, encode(run, id), Duration::from_secs(3600))
            .await
        {
            let mut ledger = ledger.lock().expect("ledger");
            for stored in ack.stored {
                let recipient = addresses
                    .iter()
                    .position(|a| *a == stored.address)
                    .expect("a recipient of this send");
                ledger.acked((id, recipient));
            }
        }
        tokio::time::sleep(SEND_EVERY).await;
    }
}
