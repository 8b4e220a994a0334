//! Architecture Invariants, enforced.
//!
//! - **Architecture Invariant:** `backbone-protocol` is sans-IO. Its resolved
//!   dependency tree contains no async runtime, network stack, storage engine
//!   or actor framework, so it builds anywhere (fuzzers, other runtimes,
//!   WebAssembly) and its tests need no sockets.
//! - **Architecture Invariant:** exactly one module names the serialization
//!   library (`protocol/src/codec.rs`) and exactly one names the storage
//!   engine (`broker/src/store/sled_store.rs`), so replacing either is a
//!   one-file change.
//! - **Architecture Invariant:** in the broker, only `lib.rs` and `main.rs`
//!   reach into `server.rs`, which wires the broker together; services take
//!   the shared state from `shared/`, and nothing below the sessions (the
//!   command table, the shared state, the store, mailboxes, the fleet,
//!   routing) imports `session/`.
//! - **Architecture Invariant:** the lossy test filesystem
//!   (`backbone-lossyfs`) depends on no other crate of the workspace, and no
//!   crate of the workspace depends on it except in its tests.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Crates that must never appear among `backbone-protocol`'s normal dependencies.
const FORBIDDEN_PROTOCOL_DEPENDENCIES: &[&str] =
    &["tokio", "quinn", "quinn-proto", "sled", "ractor", "mio"];

/// The crate directories whose Rust sources the name checks walk.
const CRATE_DIRS: &[&str] = &[
    "protocol", "broker", "client", "loadtest", "benches", "fuzz", "lossyfs",
];

/// The one file allowed to name the serialization library.
const SERIALIZATION_MODULE: &str = "protocol/src/codec.rs";

/// The one file allowed to name the storage engine's paths.
const STORAGE_MODULE: &str = "broker/src/store/sled_store.rs";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cargo metadata` with the cargo that runs this test.
fn cargo_metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(workspace_root().join("Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// The package names reachable from `root_name` over normal (not dev, not
/// build) dependency edges of the resolved graph.
fn normal_dependency_closure(metadata: &Value, root_name: &str) -> BTreeSet<String> {
    let packages = metadata["packages"]
        .as_array()
        .expect("packages is an array");
    let name_of: HashMap<&str, &str> = packages
        .iter()
        .filter_map(|package| Some((package["id"].as_str()?, package["name"].as_str()?)))
        .collect();
    let workspace_members: BTreeSet<&str> = metadata["workspace_members"]
        .as_array()
        .expect("workspace_members is an array")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let root_id = workspace_members
        .iter()
        .copied()
        .find(|id| name_of.get(id) == Some(&root_name))
        .unwrap_or_else(|| panic!("{root_name} is a workspace member"));

    let nodes = metadata["resolve"]["nodes"]
        .as_array()
        .expect("resolve graph is present");
    let edges: HashMap<&str, Vec<&str>> = nodes
        .iter()
        .filter_map(|node| {
            let id = node["id"].as_str()?;
            let normal = node["deps"]
                .as_array()?
                .iter()
                .filter(|dep| {
                    // `kind` is null for a normal dependency, "dev" or "build" otherwise.
                    dep["dep_kinds"]
                        .as_array()
                        .is_some_and(|kinds| kinds.iter().any(|kind| kind["kind"].is_null()))
                })
                .filter_map(|dep| dep["pkg"].as_str())
                .collect();
            Some((id, normal))
        })
        .collect();

    let mut seen = BTreeSet::new();
    let mut stack = vec![root_id];
    while let Some(id) = stack.pop() {
        if !seen.insert(id) {
            continue;
        }
        stack.extend(edges.get(id).into_iter().flatten().copied());
    }
    seen.remove(root_id);
    seen.iter()
        .map(|id| name_of.get(id).copied().unwrap_or(id).to_owned())
        .collect()
}

#[test]
fn protocol_depends_on_no_runtime_network_storage_or_actor_crate() {
    let metadata = cargo_metadata();
    let closure = normal_dependency_closure(&metadata, "backbone-protocol");
    assert!(
        closure.contains("blake3"),
        "the walk sees real dependencies: {closure:?}"
    );
    let forbidden: Vec<&str> = FORBIDDEN_PROTOCOL_DEPENDENCIES
        .iter()
        .copied()
        .filter(|name| closure.contains(*name))
        .collect();
    assert!(
        forbidden.is_empty(),
        "backbone-protocol must stay sans-IO, but its dependency tree contains {forbidden:?}"
    );
}

#[test]
fn the_lossy_filesystem_stands_apart_from_the_workspace() {
    let metadata = cargo_metadata();
    let own = normal_dependency_closure(&metadata, "backbone-lossyfs");
    assert!(
        own.contains("fuser"),
        "the walk sees real dependencies: {own:?}"
    );
    let workspace: Vec<&String> = own
        .iter()
        .filter(|name| name.starts_with("backbone-"))
        .collect();
    assert!(
        workspace.is_empty(),
        "backbone-lossyfs depends on workspace crates: {workspace:?}"
    );
    for member in [
        "backbone-protocol",
        "backbone-broker",
        "backbone-client",
        "backbone-loadtest",
    ] {
        assert!(
            !normal_dependency_closure(&metadata, member).contains("backbone-lossyfs"),
            "{member} depends on backbone-lossyfs outside its tests"
        );
    }
}

/// Every `.rs` file under the crate directories, skipping build output,
/// relative to the workspace root with `/` separators.
fn rust_sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() {
                if name != "target" && !name.to_string_lossy().starts_with('.') {
                    walk(&path, root, out);
                }
            } else if path.extension().is_some_and(|extension| extension == "rs") {
                let relative = path
                    .strip_prefix(root)
                    .expect("walked paths are under the root")
                    .components()
                    .map(|part| part.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                out.push((relative, text));
            }
        }
    }
    let root = workspace_root()
        .canonicalize()
        .expect("workspace root exists");
    let mut out = Vec::new();
    for dir in CRATE_DIRS {
        walk(&root.join(dir), &root, &mut out);
    }
    out.sort();
    out
}

/// Files among `sources` that contain `needle`.
fn files_naming<'a>(sources: &'a [(String, String)], needle: &str) -> Vec<&'a str> {
    sources
        .iter()
        .filter(|(_, text)| text.contains(needle))
        .map(|(path, _)| path.as_str())
        .collect()
}

#[test]
fn only_the_codec_names_the_serialization_library() {
    // Spelled in two halves so that this file does not name it itself.
    let needle = ["bin", "code"].concat();
    let sources = rust_sources();
    assert!(
        sources.iter().any(|(path, _)| path == SERIALIZATION_MODULE),
        "the walk finds {SERIALIZATION_MODULE}"
    );
    assert_eq!(
        files_naming(&sources, &needle),
        vec![SERIALIZATION_MODULE],
        "only {SERIALIZATION_MODULE} may name the serialization library"
    );
}

#[test]
fn only_the_sled_store_names_sled_paths() {
    let needle = ["sled", "::"].concat();
    let sources = rust_sources();
    let offenders: Vec<&str> = files_naming(&sources, &needle)
        .into_iter()
        .filter(|path| *path != STORAGE_MODULE)
        .collect();
    assert!(
        offenders.is_empty(),
        "only {STORAGE_MODULE} may name the storage engine: {offenders:?}"
    );
}

/// Broker files (under `broker/src/`) that name `needle`, but for `allowed`.
fn broker_files_naming<'a>(
    sources: &'a [(String, String)],
    needle: &str,
    allowed: &[&str],
) -> Vec<&'a str> {
    files_naming(sources, needle)
        .into_iter()
        .filter(|path| path.starts_with("broker/src/") && !allowed.contains(path))
        .collect()
}

#[test]
fn no_broker_service_imports_the_wiring() {
    let sources = rust_sources();
    let offenders = broker_files_naming(
        &sources,
        "crate::server::",
        &["broker/src/server.rs", "broker/src/lib.rs"],
    );
    assert!(
        offenders.is_empty(),
        "server.rs only wires the broker together; take the shared state from \
         crate::shared instead: {offenders:?}"
    );
}

#[test]
fn nothing_below_the_sessions_imports_them() {
    let sources = rust_sources();
    let below = [
        "broker/src/cmd/",
        "broker/src/shared/",
        "broker/src/store/",
        "broker/src/mailbox/",
        "broker/src/fleet/",
        "broker/src/route.rs",
    ];
    assert!(
        sources
            .iter()
            .any(|(path, _)| path.starts_with("broker/src/cmd/")),
        "the walk finds the command table"
    );
    let offenders: Vec<&str> = broker_files_naming(&sources, "crate::session", &[])
        .into_iter()
        .filter(|path| below.iter().any(|prefix| path.starts_with(prefix)))
        .collect();
    assert!(
        offenders.is_empty(),
        "the command table and the services below it must not import session/: {offenders:?}"
    );
}
