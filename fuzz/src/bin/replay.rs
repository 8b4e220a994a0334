//! A fuzz driver that needs neither nightly nor cargo-fuzz.
//!
//! It runs the same target bodies as the libFuzzer binaries, first over every
//! file of the given corpus paths (by default the committed seeds in
//! `fuzz/seeds/<target>/` and libFuzzer's working corpus `fuzz/corpus/<target>/`,
//! where they exist), then over inputs it makes for the given number of
//! seconds: random bytes, and random mutations of the targets' valid seed
//! inputs and of the corpus. It is not coverage guided, so it finds less than
//! libFuzzer per second, but it needs nothing beyond the workspace's own
//! build: the fallback where the coverage-guided build (`scripts/fuzz`) is
//! not available.
//!
//! ```text
//! cargo run --release --manifest-path fuzz/Cargo.toml --bin replay -- \
//!     [all|TARGET] [--seconds N] [--seed S] [--write-seeds] [PATH ...]
//! ```
//!
//! `--write-seeds` writes the targets' seed inputs (from the `*_seeds`
//! functions of the library) to `fuzz/seeds/<target>/` and exits: how the
//! committed seed corpus was started, and how to add a new target's seeds
//! before `scripts/fuzz merge` minimizes them with what libFuzzer found.
//!
//! On a panic the offending input is written to
//! `fuzz/artifacts/<target>/crash-<hash>` (replayable with this driver or a
//! libFuzzer binary) and the driver exits with status 1.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// One fuzz target: its name, body and valid seed inputs.
struct Target {
    name: &'static str,
    run: fn(&[u8]),
    seeds: fn() -> Vec<Vec<u8>>,
}

const TARGETS: &[Target] = &[
    Target {
        name: "decode_frame",
        run: backbone_fuzz::decode_frame_target,
        seeds: backbone_fuzz::decode_frame_seeds,
    },
    Target {
        name: "verify_card_and_auth",
        run: backbone_fuzz::verify_card_and_auth_target,
        seeds: backbone_fuzz::verify_card_and_auth_seeds,
    },
    Target {
        name: "auth_handshake",
        run: backbone_fuzz::auth_handshake_target,
        seeds: backbone_fuzz::auth_handshake_seeds,
    },
    Target {
        name: "decode_peer_frame",
        run: backbone_fuzz::decode_peer_frame_target,
        seeds: backbone_fuzz::decode_peer_frame_seeds,
    },
    Target {
        name: "open_envelope",
        run: backbone_fuzz::open_envelope_target,
        seeds: backbone_fuzz::open_envelope_seeds,
    },
    Target {
        name: "frame_buffer",
        run: backbone_fuzz::frame_buffer::frame_buffer_target,
        seeds: backbone_fuzz::frame_buffer::frame_buffer_seeds,
    },
    Target {
        name: "references",
        run: backbone_fuzz::references::references_target,
        seeds: backbone_fuzz::references::references_seeds,
    },
    Target {
        name: "key_file",
        run: backbone_fuzz::key_file::key_file_target,
        seeds: backbone_fuzz::key_file::key_file_seeds,
    },
    Target {
        name: "stored_records",
        run: backbone_fuzz::stored_records::stored_records_target,
        seeds: backbone_fuzz::stored_records::stored_records_seeds,
    },
    Target {
        name: "store_ops",
        run: backbone_fuzz::store_ops::store_ops_target,
        seeds: backbone_fuzz::store_ops::store_ops_seeds,
    },
    Target {
        name: "file_token_logic",
        run: backbone_fuzz::file_token_logic::file_token_logic_target,
        seeds: backbone_fuzz::file_token_logic::file_token_logic_seeds,
    },
    Target {
        name: "session",
        run: backbone_fuzz::session::session_target,
        seeds: backbone_fuzz::session::session_seeds,
    },
];

/// Command-line options.
struct Options {
    targets: Vec<&'static Target>,
    seconds: u64,
    seed: u64,
    paths: Vec<PathBuf>,
    /// Write the seeds to `fuzz/seeds/<target>/` instead of fuzzing.
    write_seeds: bool,
}

const USAGE: &str = "usage: replay [all|TARGET] [--seconds N] [--seed S] [--write-seeds] \
                     [CORPUS_PATH ...]\n\
                     targets: decode_frame verify_card_and_auth auth_handshake decode_peer_frame \
                     open_envelope frame_buffer references key_file stored_records store_ops \
                     file_token_logic session";

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        targets: TARGETS.iter().collect(),
        seconds: 10,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1),
        paths: Vec::new(),
        write_seeds: false,
    };
    let mut args = std::env::args().skip(1);
    let mut first = true;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().ok_or("--seconds needs a value")?;
                options.seconds = value
                    .parse()
                    .map_err(|_| format!("bad --seconds {value}"))?;
            }
            "--seed" => {
                let value = args.next().ok_or("--seed needs a value")?;
                options.seed = value.parse().map_err(|_| format!("bad --seed {value}"))?;
            }
            "--write-seeds" => options.write_seeds = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            "all" if first => {}
            name if first && TARGETS.iter().any(|target| target.name == name) => {
                options.targets = TARGETS
                    .iter()
                    .filter(|target| target.name == name)
                    .collect();
            }
            path if Path::new(path).exists() => options.paths.push(PathBuf::from(path)),
            other => {
                return Err(format!(
                    "{other} is neither a target nor an existing path\n{USAGE}"
                ));
            }
        }
        first = false;
    }
    Ok(options)
}

/// xorshift64*: a small deterministic generator, so a run is reproducible
/// from its printed seed without extra dependencies.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..bound` (`bound` > 0).
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Values that tend to hit boundaries when written over lengths and counts.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    4,
    8,
    31,
    32,
    127,
    128,
    255,
    256,
    4096,
    65_535,
    1 << 24,
    u32::MAX as u64,
    u64::MAX,
];

/// Changes `input` in one to four random ways.
fn mutate(rng: &mut Rng, input: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        match rng.below(8) {
            0 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let at = rng.below(input.len());
                input[at] = rng.byte();
            }
            2 => {
                let at = rng.below(input.len() + 1);
                let count = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..count).map(|_| rng.byte()).collect();
                input.splice(at..at, bytes);
            }
            3 if !input.is_empty() => {
                let start = rng.below(input.len());
                let end = (start + 1 + rng.below(16)).min(input.len());
                input.drain(start..end);
            }
            4 if !input.is_empty() => input.truncate(rng.below(input.len())),
            5 => {
                // Overwrite 1, 2, 4 or 8 bytes, little- or big-endian, with a boundary value.
                let width = 1 << rng.below(4);
                if input.len() >= width {
                    let at = rng.below(input.len() - width + 1);
                    let value = INTERESTING[rng.below(INTERESTING.len())];
                    let bytes = if rng.below(2) == 0 {
                        value.to_le_bytes()
                    } else {
                        value.to_be_bytes()
                    };
                    let source = if rng.below(2) == 0 {
                        &bytes[..width]
                    } else {
                        &bytes[8 - width..]
                    };
                    input[at..at + width].copy_from_slice(source);
                }
            }
            6 if !pool.is_empty() => {
                // Splice in a piece of another input.
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let start = rng.below(other.len());
                    let end = start + 1 + rng.below(other.len() - start);
                    let at = rng.below(input.len() + 1);
                    input.splice(at..at, other[start..end].iter().copied());
                }
            }
            _ if input.len() >= 2 => {
                // Duplicate a chunk in place.
                let start = rng.below(input.len());
                let end = (start + 1 + rng.below(32)).min(input.len());
                let chunk = input[start..end].to_vec();
                input.splice(end..end, chunk);
            }
            _ => input.push(rng.byte()),
        }
    }
}

/// Files under `path`, or `path` itself when it is a file.
fn corpus_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| entry.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Writes a crashing input where cargo-fuzz would, and says how to replay it.
fn save_crash(target: &Target, input: &[u8]) {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("artifacts")
        .join(target.name);
    let hash: u64 = input.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3)
    });
    let path = directory.join(format!("crash-{hash:016x}"));
    match std::fs::create_dir_all(&directory).and_then(|()| std::fs::write(&path, input)) {
        Ok(()) => eprintln!(
            "{}: panicking input saved to {}; replay with\n  \
             cargo run --release --manifest-path fuzz/Cargo.toml --bin replay -- {} {}",
            target.name,
            path.display(),
            target.name,
            path.display()
        ),
        Err(error) => eprintln!("{}: could not save the input ({error})", target.name),
    }
    eprintln!("input ({} bytes): {}", input.len(), hex(input));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Runs one input; on a panic saves it and reports failure.
fn run_one(target: &Target, input: &[u8]) -> bool {
    let outcome = std::panic::catch_unwind(|| (target.run)(input));
    if outcome.is_err() {
        save_crash(target, input);
    }
    outcome.is_ok()
}

/// Runs `target` over its corpus, then over generated inputs until `deadline`.
fn fuzz(target: &Target, options: &Options, deadline: Instant) -> bool {
    let mut paths = options.paths.clone();
    if paths.is_empty() {
        for directory in ["seeds", "corpus"] {
            let default = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(directory)
                .join(target.name);
            if default.is_dir() {
                paths.push(default);
            }
        }
    }
    let mut pool = (target.seeds)();
    for path in &paths {
        for file in corpus_files(path) {
            match std::fs::read(&file) {
                Ok(bytes) => pool.push(bytes),
                Err(error) => eprintln!("skipping {}: {error}", file.display()),
            }
        }
    }
    for input in &pool {
        if !run_one(target, input) {
            return false;
        }
    }

    let mut rng = Rng::new(options.seed ^ target.name.len() as u64);
    let mut executions: u64 = pool.len() as u64;
    while Instant::now() < deadline {
        // Check the clock every thousand inputs; an input takes microseconds.
        for _ in 0..1000 {
            let input = if rng.below(8) == 0 {
                let len = rng.below(512);
                (0..len).map(|_| rng.byte()).collect()
            } else {
                let mut input = pool[rng.below(pool.len())].clone();
                mutate(&mut rng, &mut input, &pool);
                input
            };
            if !run_one(target, &input) {
                return false;
            }
            executions += 1;
        }
    }
    println!(
        "{}: {executions} inputs ({} from the corpus and seeds), no failure",
        target.name,
        pool.len()
    );
    true
}

/// Writes each target's seeds to `fuzz/seeds/<target>/seed-<n>`.
fn write_seeds(targets: &[&Target]) -> ExitCode {
    for target in targets {
        let directory = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target.name);
        let seeds = (target.seeds)();
        let written = std::fs::create_dir_all(&directory).and_then(|()| {
            seeds.iter().enumerate().try_for_each(|(index, seed)| {
                std::fs::write(directory.join(format!("seed-{index:02}")), seed)
            })
        });
        if let Err(error) = written {
            eprintln!("{}: could not write the seeds ({error})", target.name);
            return ExitCode::FAILURE;
        }
        println!(
            "{}: {} seeds written to {}",
            target.name,
            seeds.len(),
            directory.display()
        );
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    if options.write_seeds {
        return write_seeds(&options.targets);
    }
    // Panics are reported once, with the input, by `run_one`.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    println!(
        "replay: seed {} ({} s per target)",
        options.seed, options.seconds
    );
    for target in &options.targets {
        let deadline = Instant::now() + Duration::from_secs(options.seconds);
        if !fuzz(target, &options, deadline) {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
