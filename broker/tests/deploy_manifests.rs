//! The deployment files under `deploy/` checked against the code, so they
//! cannot drift from it:
//!
//! - every Kubernetes manifest passes `kubernetes-validate` in strict mode
//!   (unknown fields rejected), installed from PyPI into a virtualenv under
//!   the target directory on first use (the first run needs PyPI; without
//!   python3 and its venv module it fails, saying what to install);
//! - the manifests agree with the broker: the ConfigMap's TOML loads as a
//!   [`Config`] (with the image's and the pod's environment applied), its
//!   fleet map loads and names exactly the StatefulSet's pods, and the
//!   Services, container ports and probes use the ports that config listens
//!   on;
//! - the systemd unit carries the sandboxing directives, starts an existing
//!   `backbone` subcommand with arguments it accepts, keeps the data
//!   directory in its state directory, and passes `systemd-analyze verify`
//!   where that tool exists.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use backbone_broker::Config;
use backbone_broker::fleet::FleetMap;
use serde_json::Value;

/// The validator's version, pinned so that a new release cannot change the
/// verdict on unchanged manifests.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
/// The oldest Kubernetes the manifests are meant for, and the newest the
/// pinned validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the broker crate sits in the workspace")
        .to_owned()
}

fn kubernetes_dir() -> PathBuf {
    repo().join("deploy/kubernetes")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn run(command: &mut Command) -> Result<Output, String> {
    command
        .output()
        .map_err(|error| format!("cannot run {command:?}: {error}"))
}

// ---------------------------------------------------------------------------
// The Python virtualenv with kubernetes-validate (and PyYAML, its dependency).

/// The virtualenv, made once per target directory and reused after that.
/// Panics with what is missing when it cannot be made: a check that cannot
/// run must not pass.
fn venv() -> &'static Path {
    static VENV: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match VENV.get_or_init(make_venv) {
        Ok(path) => path,
        Err(message) => panic!("cannot check the Kubernetes manifests: {message}"),
    }
}

fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin/python")
}

/// Whether `venv` holds the pinned validator.
fn venv_is_ready(venv: &Path) -> bool {
    let python = venv_python(venv);
    python.exists()
        && Command::new(&python)
            .args([
                "-c",
                "import yaml, kubernetes_validate.version as v; print(v.__version__)",
            ])
            .output()
            .is_ok_and(|output| {
                output.status.success()
                    && String::from_utf8_lossy(&output.stdout).trim() == KUBERNETES_VALIDATE_VERSION
            })
}

fn make_venv() -> Result<PathBuf, String> {
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = target.join("deploy-venv");
    if venv_is_ready(&venv) {
        return Ok(venv);
    }
    // Built under a name of its own and renamed into place, so a test
    // process running at the same time never sees half a virtualenv. The
    // venv is used only through `bin/python -m ...`, which keeps working
    // after the rename (only the console scripts' first lines name the
    // path it was made at).
    let building = target.join(format!("deploy-venv.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(target).map_err(|error| format!("{}: {error}", target.display()))?;
    create_venv(&building)?;
    let requirement = format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}");
    let pip = run(Command::new(venv_python(&building)).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        &requirement,
    ]))?;
    if !pip.status.success() {
        let _ = std::fs::remove_dir_all(&building);
        return Err(format!(
            "`pip install {requirement}` failed (it needs PyPI):\n{}",
            text(&pip)
        ));
    }
    if venv.exists() && !venv_is_ready(&venv) {
        let _ = std::fs::remove_dir_all(&venv);
    }
    if std::fs::rename(&building, &venv).is_err() {
        // Another test process put its own in place first.
        let _ = std::fs::remove_dir_all(&building);
    }
    if venv_is_ready(&venv) {
        Ok(venv)
    } else {
        Err(format!(
            "{} does not hold {requirement} after installing it",
            venv.display()
        ))
    }
}

/// `python3 -m venv`, installing Debian's python3-venv first when it is
/// missing and this runs as root.
fn create_venv(dir: &Path) -> Result<(), String> {
    let attempt = |python: &str| -> Result<(), String> {
        let _ = std::fs::remove_dir_all(dir);
        let output = run(Command::new(python).args(["-m", "venv"]).arg(dir))?;
        if output.status.success() && venv_python(dir).exists() {
            Ok(())
        } else {
            Err(format!(
                "`{python} -m venv` failed: {}",
                text(&output).trim()
            ))
        }
    };
    let first = match attempt("python3") {
        Ok(()) => return Ok(()),
        Err(error) => error,
    };
    let root = run(Command::new("id").arg("-u"))
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0");
    if !root {
        return Err(format!(
            "{first}\ninstall python3 with its venv module (Debian: apt-get install python3-venv) and run the tests again"
        ));
    }
    eprintln!("deploy_manifests: {first}; installing python3-venv with apt-get");
    let apt = |args: &[&str]| {
        run(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive"))
    };
    let update = apt(&["update", "-qq"])?;
    let install = apt(&["install", "-y", "-qq", "python3-venv"])?;
    if !update.status.success() || !install.status.success() {
        return Err(format!(
            "{first}\n`apt-get install python3-venv` failed:\n{}{}",
            text(&update),
            text(&install)
        ));
    }
    // A python3 on PATH that is not Debian's (pyenv, for one) is not the
    // one the package completed.
    attempt("python3").or_else(|_| attempt("/usr/bin/python3"))
}

// ---------------------------------------------------------------------------
// The manifests.

/// Every YAML file of `deploy/kubernetes` except the kustomization.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kubernetes_dir())
        .expect("deploy/kubernetes exists")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.extension().is_some_and(|ext| ext == "yaml")
                && path
                    .file_name()
                    .is_some_and(|name| name != "kustomization.yaml")
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/kubernetes");
    files
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// Whether a manifest is a template for the operator to fill in, never applied as it is.
fn is_example(path: &Path) -> bool {
    file_name(path).ends_with(".example.yaml")
}

/// The YAML documents of each file, read with PyYAML from the virtualenv
/// (the same parser kubernetes-validate uses) and handed over as JSON.
fn parse_yaml(files: &[PathBuf]) -> BTreeMap<String, Vec<Value>> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        json.dump({p: [d for d in yaml.safe_load_all(open(p)) if d is not None] for p in sys.argv[1:]}, sys.stdout)";
    let output = run(Command::new(venv_python(venv()))
        .args(["-c", SCRIPT])
        .args(files))
    .expect("python runs");
    assert!(output.status.success(), "YAML parse: {}", text(&output));
    let by_path: BTreeMap<String, Vec<Value>> =
        serde_json::from_slice(&output.stdout).expect("the script prints JSON");
    by_path
        .into_iter()
        .map(|(path, documents)| (file_name(Path::new(&path)), documents))
        .collect()
}

/// `pointer` in `value`, or a panic naming what is missing.
fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("{} has no {pointer}", describe(value)))
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{} {pointer} is not a string", describe(value)))
}

fn u64_at(value: &Value, pointer: &str) -> u64 {
    at(value, pointer)
        .as_u64()
        .unwrap_or_else(|| panic!("{} {pointer} is not a number", describe(value)))
}

fn array_at<'a>(value: &'a Value, pointer: &str) -> &'a Vec<Value> {
    at(value, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{} {pointer} is not a list", describe(value)))
}

fn describe(value: &Value) -> String {
    match (
        value.pointer("/kind").and_then(Value::as_str),
        value.pointer("/metadata/name").and_then(Value::as_str),
    ) {
        (Some(kind), Some(name)) => format!("{kind} {name}"),
        _ => format!("{value}"),
    }
}

/// The objects that `kubectl apply -k deploy/kubernetes` creates, and the examples.
struct Manifests {
    applied: Vec<Value>,
    examples: Vec<Value>,
}

impl Manifests {
    fn load() -> Manifests {
        let files = manifest_files();
        let documents = parse_yaml(&files);
        let kustomization = parse_yaml(&[kubernetes_dir().join("kustomization.yaml")])
            .into_values()
            .next()
            .and_then(|documents| documents.into_iter().next())
            .expect("kustomization.yaml holds a document");
        let listed: BTreeSet<String> = array_at(&kustomization, "/resources")
            .iter()
            .map(|resource| resource.as_str().expect("a file name").to_owned())
            .collect();
        let mut applied = Vec::new();
        let mut examples = Vec::new();
        for path in &files {
            let name = file_name(path);
            if is_example(path) {
                assert!(
                    !listed.contains(&name),
                    "kustomization.yaml lists {name}: applying it would replace the real object with a placeholder"
                );
                examples.extend(documents[&name].iter().cloned());
            } else {
                assert!(
                    listed.contains(&name),
                    "kustomization.yaml does not list {name}"
                );
                applied.extend(documents[&name].iter().cloned());
            }
        }
        let present: BTreeSet<String> = files.iter().map(|path| file_name(path)).collect();
        for name in &listed {
            assert!(
                present.contains(name),
                "kustomization.yaml lists {name}, which is not in deploy/kubernetes"
            );
        }
        Manifests { applied, examples }
    }

    fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
        objects
            .iter()
            .filter(|object| object.pointer("/kind").and_then(Value::as_str) == Some(kind))
            .collect()
    }

    fn one(&self, kind: &str) -> &Value {
        let found = Self::find(&self.applied, kind);
        assert_eq!(found.len(), 1, "expected exactly one {kind}");
        found[0]
    }
}

#[test]
fn every_kubernetes_manifest_passes_kubernetes_validate_in_strict_mode() {
    let files = manifest_files();
    let documents: usize = parse_yaml(&files).values().map(Vec::len).sum();
    let mut command = Command::new(venv_python(venv()));
    command.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        command.args(["--kubernetes-version", version]);
    }
    let output = run(command.args(&files)).expect("kubernetes-validate runs");
    let report = text(&output);
    // An unknown kind or apiVersion is only a WARN with exit code 0 (no
    // schema to check it against), so every resource must have passed.
    let passed = report
        .lines()
        .filter(|line| line.starts_with("INFO ") && line.contains(" passed for resource "))
        .count();
    let problems: Vec<&str> = report
        .lines()
        .filter(|line| !line.starts_with("INFO "))
        .collect();
    assert!(
        output.status.success() && problems.is_empty(),
        "kubernetes-validate:\n{report}"
    );
    assert_eq!(
        passed,
        documents * KUBERNETES_VERSIONS.len(),
        "every resource must pass for every version:\n{report}"
    );
}

/// The `ENV` instructions of docker/Dockerfile: the image's environment,
/// which the pods inherit.
fn image_environment() -> HashMap<String, String> {
    let dockerfile = std::fs::read_to_string(repo().join("docker/Dockerfile")).expect("Dockerfile");
    let joined = dockerfile.replace("\\\n", " ");
    let mut environment = HashMap::new();
    for line in joined.lines() {
        let Some(rest) = line.trim_start().strip_prefix("ENV ") else {
            continue;
        };
        for word in rest.split_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or_else(|| {
                panic!("Dockerfile: ENV {word:?}: only the KEY=VALUE form is understood here")
            });
            environment.insert(key.to_owned(), value.to_owned());
        }
    }
    environment
}

/// The tag docker/build-image.sh gives the image by default.
fn built_image_tag() -> String {
    let script =
        std::fs::read_to_string(repo().join("docker/build-image.sh")).expect("build-image.sh");
    let start = script
        .find("${BACKBONE_IMAGE:-")
        .expect("build-image.sh defaults BACKBONE_IMAGE")
        + "${BACKBONE_IMAGE:-".len();
    let end = script[start..].find('}').expect("closing brace") + start;
    script[start..end].to_owned()
}

/// `backbone <args> --help` succeeds only if the subcommand and every flag
/// in `args` exist (clap reports an unknown one before reaching `--help`).
fn assert_backbone_accepts(args: &[String], origin: &str) {
    let output = run(Command::new(env!("CARGO_BIN_EXE_backbone"))
        .args(args)
        .arg("--help"))
    .expect("backbone runs");
    assert!(
        output.status.success(),
        "{origin}: `backbone {}` is not a valid command line:\n{}",
        args.join(" "),
        text(&output)
    );
}

fn named<'a>(list: &'a [Value], name: &str, what: &str) -> &'a Value {
    list.iter()
        .find(|item| item.pointer("/name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no {what} named {name}"))
}

/// The container port a Service or probe port refers to: a number or a port name.
fn container_port(container: &Value, reference: &Value) -> (u64, String) {
    let ports = array_at(container, "/ports");
    let port = match reference {
        Value::String(name) => named(ports, name, "container port"),
        Value::Number(number) => ports
            .iter()
            .find(|port| port.pointer("/containerPort").and_then(Value::as_u64) == number.as_u64())
            .unwrap_or_else(|| panic!("no container port {number}")),
        other => panic!("a port reference must be a name or a number, not {other}"),
    };
    (
        u64_at(port, "/containerPort"),
        port.pointer("/protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_owned(),
    )
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container
        .pointer("/env")
        .and_then(Value::as_array)
        .and_then(|env| {
            env.iter()
                .find(|var| var.pointer("/name").and_then(Value::as_str) == Some(name))
        })
}

fn mount_path(container: &Value, volume: &str) -> Option<String> {
    container
        .pointer("/volumeMounts")
        .and_then(Value::as_array)
        .and_then(|mounts| {
            mounts
                .iter()
                .find(|mount| mount.pointer("/name").and_then(Value::as_str) == Some(volume))
        })
        .map(|mount| str_at(mount, "/mountPath").to_owned())
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .expect("a selector is a map")
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value))
}

/// What the consistency tests share, read once: the manifests, the broker's
/// effective config in each pod, and the fleet map.
struct Deployment {
    manifests: Manifests,
    /// `(pod name, the config its broker runs with)`, for every replica.
    pods: Vec<(String, Config)>,
    map: FleetMap,
}

impl Deployment {
    fn get() -> &'static Deployment {
        static DEPLOYMENT: OnceLock<Deployment> = OnceLock::new();
        DEPLOYMENT.get_or_init(Deployment::load)
    }

    fn load() -> Deployment {
        let manifests = Manifests::load();
        let statefulset = manifests.one("StatefulSet");
        let broker = &array_at(statefulset, "/spec/template/spec/containers")[0];
        let configmap = manifests.one("ConfigMap");
        let config_mount = mount_path(broker, "config").expect("the ConfigMap is mounted");
        // The ConfigMap's file the broker reads: a key under its mount.
        let data_file = |path: &Path, what: &str| -> String {
            let key = path
                .strip_prefix(&config_mount)
                .unwrap_or_else(|_| panic!("{what} {path:?} is not under {config_mount}"));
            str_at(configmap, &format!("/data/{}", key.to_string_lossy())).to_owned()
        };
        let args = broker_args(broker);
        let config_flag = args
            .iter()
            .position(|arg| arg == "--config")
            .expect("the container passes --config");
        let dir = tempfile::tempdir().expect("tempdir");
        let config_file = dir.path().join("backbone.toml");
        let config_text = data_file(Path::new(&args[config_flag + 1]), "--config");
        std::fs::write(&config_file, config_text).expect("write");

        let replicas = u64_at(statefulset, "/spec/replicas");
        let base = str_at(statefulset, "/metadata/name");
        let mut pods = Vec::new();
        for pod in (0..replicas).map(|i| format!("{base}-{i}")) {
            // The pod's environment: the image's, then the container's.
            let mut environment = image_environment();
            for var in array_at(broker, "/env") {
                let name = str_at(var, "/name");
                let value = match var.pointer("/value") {
                    Some(value) => value.as_str().expect("a string value").to_owned(),
                    None if name == "BACKBONE__FLEET__NODE" => {
                        assert_eq!(
                            str_at(var, "/valueFrom/fieldRef/fieldPath"),
                            "metadata.name",
                            "the node name is the pod's name"
                        );
                        pod.clone()
                    }
                    None => panic!("{name}: only BACKBONE__FLEET__NODE comes from elsewhere"),
                };
                environment.insert(name.to_owned(), value);
            }
            let config = Config::load(Some(&config_file), environment)
                .unwrap_or_else(|error| panic!("the broker in {pod} would not start: {error}"));
            assert_eq!(config.fleet.node.as_deref(), Some(pod.as_str()));
            // Nothing the image or the pod sets may silently replace what
            // the ConfigMap says: the file alone (with the node's name, which
            // a fleet config needs) must give the same config.
            let node = [("BACKBONE__FLEET__NODE".to_owned(), pod.clone())];
            let file_alone = Config::load(Some(&config_file), node)
                .unwrap_or_else(|error| panic!("the ConfigMap's config does not load: {error}"));
            let overridden = differing_keys(&config, &file_alone);
            assert!(
                overridden.is_empty(),
                "in {pod}, the image's or the pod's environment overrides the ConfigMap: {overridden:?}"
            );
            pods.push((pod, config));
        }
        let config = &pods.first().expect("at least one replica").1;
        let fleet_file = config.fleet.file.as_ref().expect("fleet.file is set");
        let map_file = dir.path().join("fleet.toml");
        std::fs::write(&map_file, data_file(fleet_file, "fleet.file")).expect("write");
        let map = FleetMap::load(&map_file)
            .unwrap_or_else(|error| panic!("the ConfigMap's fleet map does not load: {error}"));
        Deployment {
            manifests,
            pods,
            map,
        }
    }

    /// The config every pod shares, apart from `fleet.node`.
    fn config(&self) -> &Config {
        &self.pods[0].1
    }

    fn statefulset(&self) -> &Value {
        self.manifests.one("StatefulSet")
    }

    fn pod(&self) -> &Value {
        at(self.statefulset(), "/spec/template/spec")
    }

    fn pod_labels(&self) -> &Value {
        at(self.statefulset(), "/spec/template/metadata/labels")
    }

    fn broker(&self) -> &Value {
        let containers = array_at(self.pod(), "/containers");
        assert_eq!(containers.len(), 1, "one broker container per pod");
        &containers[0]
    }

    fn init_containers(&self) -> &[Value] {
        array_at(self.pod(), "/initContainers")
    }

    fn ports(&self) -> (u64, u64, u64) {
        let config = self.config();
        let metrics = config
            .metrics
            .listen
            .expect("the probes need metrics.listen");
        (
            u64::from(config.server.listen.port()),
            u64::from(config.fleet.listen.port()),
            u64::from(metrics.port()),
        )
    }
}

/// The keys whose values differ, as `section.key: running value (the file's value)`.
fn differing_keys(running: &Config, file: &Config) -> Vec<String> {
    let running = toml::to_string(running).expect("serializes");
    let file = toml::to_string(file).expect("serializes");
    let mut section = "";
    let mut differing = Vec::new();
    for (ours, theirs) in running.lines().zip(file.lines()) {
        if ours.starts_with('[') {
            section = ours;
        } else if ours != theirs {
            differing.push(format!("{section} {ours} (ConfigMap: {theirs})"));
        }
    }
    differing
}

fn broker_args(container: &Value) -> Vec<String> {
    array_at(container, "/args")
        .iter()
        .map(|arg| arg.as_str().expect("a string argument").to_owned())
        .collect()
}

#[test]
fn every_pod_runs_the_configmaps_config_under_its_own_node_name() {
    let deployment = Deployment::get();
    let config = deployment.config();
    assert_backbone_accepts(&broker_args(deployment.broker()), "statefulset.yaml");
    for (pod, config) in &deployment.pods {
        assert!(
            deployment.map.node(pod).is_some(),
            "{pod} is not in the map"
        );
        assert_eq!(config.fleet.node.as_deref(), Some(pod.as_str()));
    }
    let metrics = config.metrics.listen.expect("metrics.listen");
    for (key, address) in [
        ("server.listen", config.server.listen),
        ("fleet.listen", config.fleet.listen),
        ("metrics.listen", metrics),
    ] {
        assert!(
            address.ip().is_unspecified(),
            "{key} = {address}: the Services and the kubelet reach the pod on its own address"
        );
    }
    let grace = u64_at(deployment.pod(), "/terminationGracePeriodSeconds");
    assert!(
        grace > config.server.shutdown_grace.as_secs(),
        "terminationGracePeriodSeconds ({grace}) must exceed server.shutdown_grace"
    );
}

#[test]
fn the_fleet_map_names_the_statefulsets_pods_at_their_dns_names() {
    let deployment = Deployment::get();
    let statefulset = deployment.statefulset();
    let namespace = str_at(deployment.manifests.one("Namespace"), "/metadata/name");
    for object in &deployment.manifests.applied {
        if str_at(object, "/kind") != "Namespace" {
            assert_eq!(
                object
                    .pointer("/metadata/namespace")
                    .and_then(Value::as_str),
                Some(namespace),
                "{} must be in the namespace {namespace}, which the map's addresses name",
                describe(object)
            );
        }
    }
    let names: Vec<&str> = deployment
        .map
        .nodes()
        .iter()
        .map(|node| node.name.as_str())
        .collect();
    let pods: Vec<&str> = deployment
        .pods
        .iter()
        .map(|(pod, _)| pod.as_str())
        .collect();
    assert_eq!(
        names, pods,
        "the fleet map's nodes must be the StatefulSet's pods (spec.replicas)"
    );
    let (quic, peer, _) = deployment.ports();
    let headless = str_at(statefulset, "/spec/serviceName");
    for node in deployment.map.nodes() {
        let host = format!("{}.{headless}.{namespace}.svc", node.name);
        assert_eq!(node.peer, format!("{host}:{peer}"), "{}", node.name);
        assert_eq!(node.public, format!("{host}:{quic}"), "{}", node.name);
    }
}

#[test]
fn services_container_ports_and_probes_use_the_configured_ports() {
    let deployment = Deployment::get();
    let broker = deployment.broker();
    let (quic, peer, metrics) = deployment.ports();
    for (name, port, protocol) in [
        ("quic", quic, "UDP"),
        ("peer", peer, "UDP"),
        ("metrics", metrics, "TCP"),
    ] {
        assert_eq!(
            container_port(broker, &Value::from(name)),
            (port, protocol.to_owned()),
            "container port {name}"
        );
    }
    assert_eq!(
        array_at(broker, "/ports").len(),
        3,
        "only quic, peer and metrics"
    );

    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let get = at(broker, &format!("/{probe}/httpGet"));
        assert_eq!(str_at(get, "/path"), "/health", "{probe}");
        assert_eq!(
            container_port(broker, at(get, "/port")).0,
            metrics,
            "{probe} must use metrics.listen's port"
        );
    }

    // What each Service port reaches in the broker container.
    let targets = |service: &Value| -> Vec<(u64, String)> {
        array_at(service, "/spec/ports")
            .iter()
            .map(|port| {
                let target = container_port(
                    broker,
                    port.pointer("/targetPort").unwrap_or(at(port, "/port")),
                );
                let protocol = port.pointer("/protocol").and_then(Value::as_str);
                assert_eq!(
                    protocol.unwrap_or("TCP"),
                    target.1,
                    "{} port {port}",
                    describe(service)
                );
                target
            })
            .collect()
    };
    let pod_labels = deployment.pod_labels();
    let headless_name = str_at(deployment.statefulset(), "/spec/serviceName");
    let services = Manifests::find(&deployment.manifests.applied, "Service");
    assert_eq!(
        services.len(),
        2,
        "the headless Service and the clients' Service"
    );
    for service in services {
        assert!(
            labels_match(at(service, "/spec/selector"), pod_labels),
            "{} does not select the broker pods",
            describe(service)
        );
        if str_at(service, "/metadata/name") == headless_name {
            assert_eq!(str_at(service, "/spec/clusterIP"), "None");
            assert_eq!(
                at(service, "/spec/publishNotReadyAddresses"),
                &Value::Bool(true),
                "nodes dial peers that are not ready yet"
            );
            assert!(
                targets(service).contains(&(peer, "UDP".to_owned())),
                "the headless Service carries the peer port"
            );
        } else {
            assert_eq!(
                targets(service),
                [(quic, "UDP".to_owned())],
                "the clients' Service reaches server.listen only"
            );
        }
    }
    let statefulset = deployment.statefulset();
    assert!(
        labels_match(at(statefulset, "/spec/selector/matchLabels"), pod_labels),
        "the StatefulSet's selector does not match its pods"
    );
    let budget = deployment.manifests.one("PodDisruptionBudget");
    assert!(labels_match(
        at(budget, "/spec/selector/matchLabels"),
        pod_labels
    ));
}

#[test]
fn each_pod_keeps_its_data_on_its_claim_and_only_its_own_key() {
    let deployment = Deployment::get();
    let config = deployment.config();
    let broker = deployment.broker();
    let claims = array_at(deployment.statefulset(), "/spec/volumeClaimTemplates");
    let claim = str_at(&claims[0], "/metadata/name");
    assert_eq!(
        mount_path(broker, claim).map(PathBuf::from).as_ref(),
        Some(&config.server.data_dir),
        "server.data_dir must be the volume claim {claim}"
    );
    assert_eq!(
        str_at(
            named(array_at(deployment.pod(), "/volumes"), "config", "volume"),
            "/configMap/name"
        ),
        str_at(deployment.manifests.one("ConfigMap"), "/metadata/name")
    );

    // The broker container mounts an emptyDir at fleet.pki_dir, never the
    // Secret that holds every node's key.
    let pki_dir = config.fleet.pki_dir.as_ref().expect("fleet.pki_dir");
    let volumes = array_at(deployment.pod(), "/volumes");
    let secret_volume = volumes
        .iter()
        .find(|volume| volume.pointer("/secret").is_some())
        .expect("a Secret volume");
    let secret_volume_name = str_at(secret_volume, "/name");
    assert_eq!(
        mount_path(broker, secret_volume_name),
        None,
        "the broker container must not mount the Secret with every node's key"
    );
    let pki_volume = volumes
        .iter()
        .find(|volume| {
            mount_path(broker, str_at(volume, "/name"))
                .map(PathBuf::from)
                .as_ref()
                == Some(pki_dir)
        })
        .unwrap_or_else(|| panic!("no volume is mounted at fleet.pki_dir {pki_dir:?}"));
    assert!(pki_volume.pointer("/emptyDir").is_some());

    // The init container copies this pod's files from the Secret into it.
    let init = deployment.init_containers();
    assert_eq!(init.len(), 1, "one init container, copying the PKI");
    let copier = &init[0];
    let secret_mount = mount_path(copier, secret_volume_name).expect("init mounts the Secret");
    assert_eq!(
        mount_path(copier, str_at(pki_volume, "/name"))
            .map(PathBuf::from)
            .as_ref(),
        Some(pki_dir)
    );
    assert_eq!(
        str_at(
            env_value(copier, "NODE").expect("NODE"),
            "/valueFrom/fieldRef/fieldPath"
        ),
        "metadata.name"
    );
    let script = array_at(copier, "/command")
        .iter()
        .map(|part| part.as_str().expect("a string"))
        .collect::<Vec<_>>()
        .join(" ");
    for needed in [
        "ca.pem",
        "$NODE.pem",
        "$NODE.key",
        secret_mount.as_str(),
        &pki_dir.to_string_lossy(),
    ] {
        assert!(
            script.contains(needed),
            "the init container's script does not mention {needed}"
        );
    }

    // The Secret template holds what the nodes load, and never the CA key.
    let secret = Manifests::find(&deployment.manifests.examples, "Secret")
        .into_iter()
        .find(|secret| {
            str_at(secret, "/metadata/name") == str_at(secret_volume, "/secret/secretName")
        })
        .expect("fleet-pki-secret.example.yaml shows the Secret the pods mount");
    let keys: BTreeSet<String> = at(secret, "/stringData")
        .as_object()
        .expect("stringData is a map")
        .keys()
        .cloned()
        .collect();
    let mut expected: BTreeSet<String> = ["ca.pem".to_owned()].into();
    for (pod, _) in &deployment.pods {
        expected.insert(format!("{pod}.pem"));
        expected.insert(format!("{pod}.key"));
    }
    assert_eq!(keys, expected, "the Secret's files");
}

#[test]
fn the_pods_are_sandboxed_sized_and_run_the_built_image() {
    let deployment = Deployment::get();
    let pod = deployment.pod();
    assert_eq!(
        pod.pointer("/securityContext/runAsNonRoot"),
        Some(&Value::Bool(true))
    );
    let uid = u64_at(pod, "/securityContext/runAsUser");
    assert_ne!(uid, 0);
    // The image's user has exactly that uid and gid (docker/Dockerfile).
    let dockerfile = std::fs::read_to_string(repo().join("docker/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains(&format!("useradd --system --uid {uid} --gid {uid} "))
            && dockerfile.contains(&format!("groupadd --system --gid {uid} backbone")),
        "the pods run as uid {uid}, which docker/Dockerfile's backbone user must have"
    );
    assert_eq!(u64_at(pod, "/securityContext/runAsGroup"), uid);
    // Service links would add BACKBONE_* variables next to the broker's own.
    assert_eq!(
        pod.pointer("/enableServiceLinks"),
        Some(&Value::Bool(false))
    );
    assert_eq!(
        pod.pointer("/automountServiceAccountToken"),
        Some(&Value::Bool(false))
    );
    let tag = built_image_tag();
    for container in std::iter::once(deployment.broker()).chain(deployment.init_containers()) {
        let name = str_at(container, "/name");
        assert_eq!(
            str_at(container, "/image"),
            tag,
            "{name}: docker/build-image.sh builds {tag}"
        );
        let security = at(container, "/securityContext");
        for (key, value) in [
            ("/readOnlyRootFilesystem", true),
            ("/allowPrivilegeEscalation", false),
        ] {
            assert_eq!(
                security.pointer(key),
                Some(&Value::Bool(value)),
                "{name}: securityContext{key}"
            );
        }
        for pointer in [
            "/resources/requests/cpu",
            "/resources/requests/memory",
            "/resources/limits/memory",
        ] {
            at(container, pointer);
        }
    }
}

// ---------------------------------------------------------------------------
// The systemd unit.

const UNIT: &str = "deploy/systemd/backbone.service";

/// `(section, key, value)` for every directive; with `commented`, also the
/// lines commented out with a single `#` and no space (examples to enable).
fn unit_directives(unit: &str, commented: bool) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut directives = Vec::new();
    for line in unit.lines() {
        let line = line.trim();
        let line = match line.strip_prefix('#') {
            Some(example) if commented && !example.starts_with([' ', '#']) => example,
            _ => line,
        };
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{UNIT}: not a directive: {line}"));
        directives.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    directives
}

/// The variables of `Environment=` lines, with `%S` as systemd expands it
/// for a system service.
fn unit_environment(directives: &[(String, String, String)]) -> Vec<(String, String)> {
    directives
        .iter()
        .filter(|(section, key, _)| section == "Service" && key == "Environment")
        .flat_map(|(_, _, value)| value.split_whitespace())
        .map(|assignment| {
            let (name, value) = assignment
                .split_once('=')
                .unwrap_or_else(|| panic!("{UNIT}: Environment={assignment}"));
            (name.to_owned(), value.replace("%S", "/var/lib"))
        })
        .collect()
}

#[test]
fn the_systemd_unit_is_sandboxed_and_runs_the_broker() {
    let unit = std::fs::read_to_string(repo().join(UNIT)).expect("the unit exists");
    let directives = unit_directives(&unit, false);
    let service = |key: &str| -> Vec<&str> {
        directives
            .iter()
            .filter(|(section, k, _)| section == "Service" && k == key)
            .map(|(_, _, value)| value.as_str())
            .collect()
    };
    let single = |key: &str| -> &str {
        match service(key).as_slice() {
            [value] => value,
            other => panic!("{UNIT}: expected one {key}=, found {other:?}"),
        }
    };

    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("StateDirectory", "backbone"),
    ] {
        assert_eq!(single(key), value, "{UNIT}: {key}");
    }
    for key in [
        "LimitNOFILE",
        "RestrictAddressFamilies",
        "SystemCallFilter",
        "CapabilityBoundingSet",
    ] {
        assert!(!service(key).is_empty(), "{UNIT}: {key}= is required");
    }
    let families = service("RestrictAddressFamilies").join(" ");
    for family in ["AF_INET", "AF_INET6"] {
        assert!(
            families.split_whitespace().any(|f| f == family),
            "{UNIT}: QUIC and the metrics need {family}"
        );
    }

    // ExecStart runs an existing subcommand of the backbone binary.
    let exec: Vec<String> = single("ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(
        exec[0].ends_with("/backbone"),
        "{UNIT}: ExecStart must run the backbone binary, not {}",
        exec[0]
    );
    assert_eq!(exec.get(1).map(String::as_str), Some("serve"));
    assert_backbone_accepts(&exec[1..], UNIT);

    // The data directory is the state directory, whatever a config file says
    // (the environment wins over the file); every variable is a real key.
    let environment = unit_environment(&directives);
    let config = Config::load(None, environment.clone())
        .unwrap_or_else(|error| panic!("{UNIT}: the environment does not load: {error}"));
    assert_eq!(
        config.server.data_dir,
        Path::new("/var/lib").join(single("StateDirectory")),
        "{UNIT}: the data directory must be the StateDirectory, the only writable place"
    );
    let stop = humantime_seconds(single("TimeoutStopSec"));
    assert!(
        stop > config.server.shutdown_grace.as_secs(),
        "{UNIT}: TimeoutStopSec must exceed server.shutdown_grace"
    );

    // The commented-out examples load too once enabled: the config path the
    // broker reads through BACKBONE_CONFIG, and a fleet node's keys.
    let examples = unit_environment(&unit_directives(&unit, true));
    assert!(
        examples.iter().any(
            |(name, value)| name == "BACKBONE_CONFIG" && value == "/etc/backbone/backbone.toml"
        ),
        "{UNIT}: the example config path"
    );
    let example_config = Config::load(
        None,
        examples
            .into_iter()
            .filter(|(name, _)| name != "BACKBONE_CONFIG"),
    )
    .unwrap_or_else(|error| panic!("{UNIT}: the commented examples do not load: {error}"));
    assert!(example_config.fleet.file.is_some());

    systemd_analyze(&unit);
}

/// A systemd time span such as `30s` or `2min`, in seconds (the forms
/// humantime reads; a bare number is seconds for systemd).
fn humantime_seconds(value: &str) -> u64 {
    value.parse().unwrap_or_else(|_| {
        humantime_serde::re::humantime::parse_duration(value)
            .unwrap_or_else(|error| panic!("{UNIT}: cannot read the time {value}: {error}"))
            .as_secs()
    })
}

/// `systemd-analyze verify`, and the offline security score, on a copy of
/// the unit whose ExecStart names the binary this test built (verify
/// requires the executable to exist). Skipped, saying why, without
/// systemd-analyze: installing systemd only for this is not worth it.
fn systemd_analyze(unit: &str) {
    if run(Command::new("systemd-analyze").arg("--version")).is_err() {
        eprintln!(
            "deploy_manifests: SKIPPED `systemd-analyze verify` of {UNIT}: systemd-analyze is not installed (Debian package systemd); the unit's directives were checked above"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("backbone.service");
    let exec_start = unit_directives(unit, false)
        .into_iter()
        .find(|(_, key, _)| key == "ExecStart")
        .map(|(_, _, value)| value)
        .expect("ExecStart");
    let binary = exec_start.split_whitespace().next().expect("a binary");
    std::fs::write(
        &copy,
        unit.replace(
            &format!("ExecStart={binary}"),
            &format!("ExecStart={}", env!("CARGO_BIN_EXE_backbone")),
        ),
    )
    .expect("write");
    let verify = run(Command::new("systemd-analyze").arg("verify").arg(&copy)).expect("runs");
    // Unknown keys and bad values are only warnings with exit code 0.
    let report = text(&verify);
    assert!(
        verify.status.success() && !report.contains("backbone.service"),
        "systemd-analyze verify {UNIT}:\n{report}"
    );
    // An exposure level of at most 2.0 on systemd's scale of 10 ("OK"); the
    // threshold is given in tenths.
    let security = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=20"])
        .arg(&copy))
    .expect("runs");
    assert!(
        security.status.success(),
        "systemd-analyze security {UNIT}: exposure above 2.0:\n{}",
        text(&security)
    );
}
