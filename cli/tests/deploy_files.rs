//! `hookyard config` and `keygen`, and the deployment files (`deploy/`) checked against the binary
//! they run: every hookyard container of `deploy/compose.yaml` and of the Kubernetes
//! manifests runs a command hookyard has, on settings `hookyard config` accepts (the
//! mounted `hookyard.toml` and the container's variables, as the service would load
//! them), listening where its published ports, probes and Services point; the NATS nodes
//! run `deploy/nats/nats.conf` as a cluster of `streams.replicas` nodes that hookyard's
//! `nats_url` reaches; KEDA's triggers name the workers' consumers. (No container is run:
//! the cluster itself is `tests/tests/cluster.rs`'s, on the same `nats.conf`.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use hookyard_core::store::dead_letters::EXEC_CONSUMER;
use hookyard_core::streams::{CONN_STREAM, EXEC_STREAM, FUNCTIONS_CONSUMER};
use yaml_rust2::yaml::Hash;
use yaml_rust2::{Yaml, YamlLoader};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_docs(file: &str) -> Vec<Yaml> {
    let path = deploy_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn text(yaml: &Yaml) -> String {
    match yaml {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn texts(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|items| items.iter().map(text).collect())
        .unwrap_or_default()
}

/// Compose's merge keys (`<<: *anchor`) applied: yaml-rust2 resolves the anchors, not
/// the merges.
fn merged(yaml: &Yaml) -> Yaml {
    match yaml {
        Yaml::Hash(hash) => {
            let mut out = Hash::new();
            if let Some(Yaml::Hash(base)) = hash.get(&Yaml::String("<<".into())).map(merged) {
                out.extend(base);
            }
            for (key, value) in hash {
                if key.as_str() != Some("<<") {
                    out.insert(key.clone(), merged(value));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(items) => Yaml::Array(items.iter().map(merged).collect()),
        other => other.clone(),
    }
}

/// A hookyard container as a deployment file describes it.
#[derive(Debug)]
struct Container {
    origin: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// Container path → the file of `deploy/` mounted there.
    files: BTreeMap<String, PathBuf>,
    /// The ports other things reach it on: published (Compose), or probed and targeted by
    /// Services (Kubernetes).
    reached_on: Vec<(String, u16)>,
}

/// What `hookyard config` printed for the container.
struct Settings(toml::Value);

impl Settings {
    fn get(&self, path: &str) -> &toml::Value {
        path.split('.')
            .try_fold(&self.0, |value, key| value.get(key))
            .unwrap_or_else(|| panic!("{path} is not in the printed configuration"))
    }

    fn port(&self, path: &str) -> u16 {
        let listen: std::net::SocketAddr = self.get(path).as_str().unwrap().parse().unwrap();
        assert!(
            listen.ip().is_unspecified(),
            "{path} is {listen}: unreachable from outside its container"
        );
        listen.port()
    }
}

/// A key `hookyard keygen` made: what a deployment's secret holds.
fn keygen() -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_hookyard"))
        .arg("keygen")
        .output()
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

#[test]
fn keygen_prints_fresh_usable_keys() {
    let (a, b) = (keygen(), keygen());
    assert_ne!(a, b);
    hookyard_core::secrets::Cipher::from_text(&a).expect("a usable key");
}

impl Container {
    /// Runs `hookyard config` with the container's variables only, its config file read
    /// from where the deployment mounts it from; the settings it printed.
    fn settings(&self) -> Settings {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hookyard"));
        command.arg("config").env_clear().current_dir(std::env::temp_dir());
        for (key, value) in &self.env {
            let value = match key.as_str() {
                "HOOKYARD_CONFIG" => self
                    .files
                    .get(value)
                    .unwrap_or_else(|| panic!("{}: HOOKYARD_CONFIG {value} is not mounted", self.origin))
                    .display()
                    .to_string(),
                _ => value.clone(),
            };
            command.env(key, value);
        }
        let output = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{}: hookyard config refused its settings: {stderr}",
            self.origin
        );
        assert!(stderr.is_empty(), "{}: hookyard config warned: {stderr}", self.origin);
        let printed = String::from_utf8(output.stdout).unwrap();
        Settings(
            printed
                .parse()
                .unwrap_or_else(|e| panic!("{}: printed TOML: {e}\n{printed}", self.origin)),
        )
    }

    /// The command is one hookyard has (its `--help` answers).
    fn check_command(&self) {
        let output = Command::new(env!("CARGO_BIN_EXE_hookyard"))
            .args(&self.args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}: hookyard has no command {:?}",
            self.origin,
            self.args
        );
    }

    /// The ports it is reached on are ports its settings listen on, and the service's
    /// own port is reached.
    fn check_ports(&self, settings: &Settings) {
        let metrics = settings.port("telemetry.metrics_listen");
        let own = match self.args[0].as_str() {
            "ingest" => Some(settings.port("ingest.listen")),
            "api" => Some(settings.port("api.listen")),
            _ => None,
        };
        for (what, port) in &self.reached_on {
            assert!(
                Some(*port) == own || *port == metrics,
                "{}: {what} reaches port {port}, where it does not listen ({own:?}, metrics {metrics})",
                self.origin
            );
        }
        if let Some(own) = own {
            assert!(
                self.reached_on.iter().any(|(_, port)| *port == own),
                "{}: nothing reaches its port {own}",
                self.origin
            );
        }
    }
}

/// Settings every hookyard container of a deployment must agree on.
fn check_common(settings: &Settings, origin: &str, nats_nodes: usize, nats_host: &str) {
    let replicas = settings.get("streams.replicas").as_integer().unwrap();
    assert_eq!(
        replicas as usize, nats_nodes,
        "{origin}: streams.replicas against the NATS nodes"
    );
    let database = settings.get("database_url").as_str().unwrap();
    assert!(database.starts_with("postgres://"), "{origin}: database_url {database}");
    assert!(
        !database.contains("secret"),
        "{origin}: the password is printed: {database}"
    );
    let nats = settings.get("nats_url").as_str().unwrap();
    assert_eq!(nats, format!("nats://{nats_host}:4222"), "{origin}: nats_url");
    assert_eq!(settings.get("encryption_key").as_str(), Some("(hidden)"), "{origin}");
}

/// What a Kubernetes secret, or the operator's shell for Compose, gives.
fn secret_stand_ins() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("HOOKYARD_ENCRYPTION_KEY".into(), keygen()),
        (
            "HOOKYARD_DATABASE_URL".into(),
            "postgres://hookyard:secret@db.example.com:5432/hookyard".into(),
        ),
    ])
}

/// Compose's `${VAR:?message}`: the operator's variable.
fn interpolated(value: &str, given: &BTreeMap<String, String>) -> String {
    match value.strip_prefix("${").and_then(|v| v.split_once(":?")) {
        Some((name, _)) => given
            .get(name)
            .unwrap_or_else(|| panic!("compose.yaml asks for {name}"))
            .clone(),
        None => value.to_string(),
    }
}

#[test]
fn config_prints_the_settings_a_service_would_run_with_and_hides_its_secrets() {
    let key = keygen();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hookyard.toml"), "[ingest]\npublish_timeout = \"3s\"\n").unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hookyard"));
        command.arg("config").env_clear().current_dir(dir.path());
        command.envs(env.iter().copied());
        command.output().unwrap()
    };
    let output = run(&[
        ("HOOKYARD_ENCRYPTION_KEY", &key),
        ("HOOKYARD_DATABASE_URL", "postgres://hookyard:s3cret@db/hookyard"),
        ("HOOKYARD_STREAMS__REPLICAS", "3"),
        ("HOOKYARD_FORWARDING__PROXY", "http://egress:pr0xy@proxy.internal:3128"),
    ]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed = String::from_utf8(output.stdout).unwrap();
    let settings = Settings(printed.parse().unwrap());
    // The file (in the working folder), the variables over it, the defaults under both.
    assert_eq!(settings.get("ingest.publish_timeout").as_str(), Some("3s"));
    assert_eq!(settings.get("streams.replicas").as_integer(), Some(3));
    assert_eq!(
        settings.get("ingest.max_body_bytes").as_integer(),
        Some(10 * 1024 * 1024)
    );
    assert_eq!(
        settings.get("database_url").as_str(),
        Some("postgres://hookyard:(hidden)@db/hookyard")
    );
    assert_eq!(
        settings.get("forwarding.proxy").as_str(),
        Some("http://egress:(hidden)@proxy.internal:3128")
    );
    for secret in ["s3cret", "pr0xy", &key] {
        assert!(!printed.contains(secret), "{printed}");
    }

    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!said.contains("warning"), "{said}");
    assert!(
        said.contains("calls out to https:// destinations go through http://egress:(hidden)@proxy.internal:3128 (forwarding.proxy)"),
        "{said}"
    );
    // Valid but not meant: said, and printed all the same.
    let unreachable = run(&[
        ("HOOKYARD_ENCRYPTION_KEY", &key),
        ("HOOKYARD_INGEST__LISTEN", "0.0.0.0:3003"),
    ]);
    assert!(unreachable.status.success());
    let said = String::from_utf8_lossy(&unreachable.stderr);
    assert!(said.contains("warning: ingest.public_url is not set"), "{said}");

    // What a service would refuse, it refuses: status 2, naming the problem.
    let typo = run(&[
        ("HOOKYARD_ENCRYPTION_KEY", &key),
        ("HOOKYARD_INGEST__LISTN", "0.0.0.0:3003"),
    ]);
    assert_eq!(typo.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&typo.stderr).contains("HOOKYARD_INGEST__LISTN"));
    // Which proxy calls out take, and from where, is said.
    let proxied = run(&[
        ("HOOKYARD_ENCRYPTION_KEY", &key),
        ("HTTPS_PROXY", "http://egress:pr0xy@proxy.internal:3128"),
        ("NO_PROXY", ".internal"),
    ]);
    assert!(proxied.status.success());
    let said = String::from_utf8_lossy(&proxied.stderr);
    for line in [
        "calls out to https:// destinations go through http://egress:(hidden)@proxy.internal:3128 (HTTPS_PROXY)",
        "calls out to http:// destinations go direct",
        "except to .internal (NO_PROXY)",
    ] {
        assert!(said.contains(line), "{said}");
    }
    assert!(!said.contains("pr0xy"), "{said}");
    // The environment's proxy is checked too (calls out would use it).
    let socks = run(&[
        ("HOOKYARD_ENCRYPTION_KEY", &key),
        ("HTTPS_PROXY", "socks5://proxy.internal:1080"),
    ]);
    assert_eq!(socks.status.code(), Some(2));
    let said = String::from_utf8_lossy(&socks.stderr);
    assert!(
        said.contains("HTTPS_PROXY \"socks5://proxy.internal:1080\" is not an http"),
        "{said}"
    );
    let keyless = run(&[]);
    assert_eq!(keyless.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&keyless.stderr).contains("HOOKYARD_ENCRYPTION_KEY"));
}

#[test]
fn compose_runs_each_service_on_settings_hookyard_accepts() {
    let compose = merged(&yaml_docs("compose.yaml")[0]);
    let services = compose["services"].as_hash().expect("services");
    let given = secret_stand_ins();
    let nats_nodes: Vec<(&str, &Yaml)> = services
        .iter()
        .filter(|(_, s)| s["image"].as_str().is_some_and(|i| i.starts_with("nats:")))
        .map(|(name, s)| (name.as_str().unwrap(), s))
        .collect();
    let names: Vec<&str> = nats_nodes.iter().map(|(name, _)| *name).collect();
    assert!(names.len() >= 3, "{names:?}");
    for (name, node) in &nats_nodes {
        let args = texts(&node["command"]);
        let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
        assert_eq!(after("-c").as_deref(), Some("/etc/nats/nats.conf"), "{name}");
        assert!(texts(&node["volumes"]).contains(&"./nats/nats.conf:/etc/nats/nats.conf:ro".into()));
        assert_eq!(after("--name").as_deref(), Some(*name));
        let routes = after("--routes").unwrap();
        for other in &names {
            assert!(
                routes.contains(&format!("nats://{other}:6222")),
                "{name}'s routes miss {other}"
            );
        }
        assert_eq!(after("--store_dir").as_deref(), Some("/data"), "{name}");
        assert!(
            texts(&node["volumes"]).iter().any(|v| v.ends_with(":/data")),
            "{name}: no volume"
        );
        let aliases = texts(&node["networks"]["default"]["aliases"]);
        assert_eq!(aliases, ["nats"], "{name}: hookyard's nats_url names the alias");
    }

    let mut checked = Vec::new();
    let mut connections = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if !service["image"].as_str().is_some_and(|i| i.starts_with("hookyard")) {
            continue;
        }
        let env = service["environment"]
            .as_hash()
            .expect("environment")
            .iter()
            .map(|(k, v)| (text(k), interpolated(&text(v), &given)))
            .collect();
        let files = texts(&service["volumes"])
            .iter()
            .filter_map(|volume| {
                let mut parts = volume.split(':');
                let (from, to) = (parts.next()?, parts.next()?);
                Some((to.to_string(), deploy_dir().join(from)))
            })
            .collect();
        let reached_on = texts(&service["ports"])
            .iter()
            .map(|p| {
                (
                    "a published port".to_string(),
                    p.rsplit(':').next().unwrap().parse().unwrap(),
                )
            })
            .collect();
        let container = Container {
            origin: format!("compose.yaml: {name}"),
            args: texts(&service["command"]),
            env,
            files,
            reached_on,
        };
        container.check_command();
        let settings = container.settings();
        check_common(&settings, &container.origin, nats_nodes.len(), "nats");
        let database = settings.get("database_url").as_str().unwrap();
        let host = url::Url::parse(database).unwrap().host_str().unwrap().to_string();
        assert!(
            services.contains_key(&Yaml::String(host.clone())),
            "{name}: no service {host}"
        );
        container.check_ports(&settings);
        let replicas = service["deploy"]["replicas"].as_i64().unwrap_or(1);
        connections += replicas * settings.get("database_max_connections").as_integer().unwrap();
        checked.push(container.args[0].clone());
    }
    checked.sort();
    assert_eq!(checked, ["api", "ingest", "reconciler", "router", "worker"]);
    // The postgres service keeps its default max_connections: 100, 3 of them reserved.
    assert!(
        connections <= 97,
        "the services may open {connections} Postgres connections"
    );
}

/// `kustomization.yaml`'s generated ConfigMaps: name → (key → file of `deploy/`).
fn config_maps(kustomization: &Yaml) -> BTreeMap<String, BTreeMap<String, PathBuf>> {
    let generators = kustomization["configMapGenerator"]
        .as_vec()
        .expect("configMapGenerator");
    generators
        .iter()
        .map(|generator| {
            let files = texts(&generator["files"])
                .iter()
                .map(|entry| {
                    let (key, file) = entry
                        .split_once('=')
                        .unwrap_or((entry.rsplit('/').next().unwrap(), entry));
                    let path = deploy_dir().join(file);
                    assert!(path.exists(), "{} does not exist", path.display());
                    (key.to_string(), path)
                })
                .collect();
            (text(&generator["name"]), files)
        })
        .collect()
}

/// A pod's files: mount path/key → file of `deploy/`, through its ConfigMap volumes.
fn mounted(
    pod: &Yaml,
    container: &Yaml,
    maps: &BTreeMap<String, BTreeMap<String, PathBuf>>,
) -> BTreeMap<String, PathBuf> {
    let mut files = BTreeMap::new();
    for mount in container["volumeMounts"].as_vec().into_iter().flatten() {
        // Not in the pod's volumes: a StatefulSet's claim.
        let volume = pod["volumes"]
            .as_vec()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == mount["name"]);
        let Some(map) = volume.and_then(|v| v["configMap"]["name"].as_str()) else {
            continue;
        };
        let map = maps
            .get(map)
            .unwrap_or_else(|| panic!("no ConfigMap {map} is generated"));
        for (key, file) in map {
            files.insert(format!("{}/{key}", text(&mount["mountPath"])), file.clone());
        }
    }
    files
}

/// A named container port's number.
fn port_number(container: &Yaml, port: &Yaml) -> u16 {
    if let Some(number) = port.as_i64() {
        return number as u16;
    }
    let ports = container["ports"].as_vec().expect("ports");
    let found = ports.iter().find(|p| p["name"] == *port);
    found.unwrap_or_else(|| panic!("no port named {port:?}"))["containerPort"]
        .as_i64()
        .unwrap() as u16
}

fn labels_match(selector: &Yaml, labels: &Yaml) -> bool {
    selector
        .as_hash()
        .is_some_and(|s| s.iter().all(|(k, v)| labels[k.as_str().unwrap()] == *v))
}

#[test]
fn kubernetes_runs_each_service_on_settings_hookyard_accepts() {
    let kustomization = yaml_docs("kustomization.yaml").remove(0);
    let namespace = text(&kustomization["namespace"]);
    let maps = config_maps(&kustomization);
    let docs: Vec<Yaml> = texts(&kustomization["resources"])
        .iter()
        .flat_map(|file| yaml_docs(file))
        .collect();
    let of_kind = |kind: &'static str| docs.iter().filter(move |d| d["kind"].as_str() == Some(kind));
    let services: Vec<&Yaml> = of_kind("Service").collect();

    // The NATS cluster.
    let nats = of_kind("StatefulSet")
        .find(|s| s["metadata"]["name"].as_str() == Some("nats"))
        .expect("nats");
    let replicas = nats["spec"]["replicas"].as_i64().unwrap() as usize;
    let headless = text(&nats["spec"]["serviceName"]);
    let pod = &nats["spec"]["template"]["spec"];
    let server = &pod["containers"][0];
    let args = texts(&server["args"]);
    let after = |flag: &str| args.iter().position(|a| a == flag).map(|i| args[i + 1].clone());
    let conf = after("-c").expect("-c");
    assert_eq!(
        mounted(pod, server, &maps).get(&conf),
        Some(&deploy_dir().join("nats/nats.conf"))
    );
    let routes = after("--routes").unwrap();
    for i in 0..replicas {
        assert!(
            routes.contains(&format!("nats://nats-{i}.{headless}:6222")),
            "routes miss node {i}"
        );
    }
    let data = after("--store_dir").unwrap();
    assert!(server["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .any(|m| m["mountPath"].as_str() == Some(&data)));
    let nats_service = |port: i64| {
        services.iter().any(|s| {
            s["metadata"]["name"].as_str() == Some("nats")
                && labels_match(&s["spec"]["selector"], &nats["spec"]["template"]["metadata"]["labels"])
                && s["spec"]["ports"]
                    .as_vec()
                    .unwrap()
                    .iter()
                    .any(|p| p["port"].as_i64() == Some(port))
        })
    };
    assert!(
        nats_service(4222) && nats_service(8222),
        "no nats Service for clients and monitoring"
    );

    // hookyard's services.
    let given = secret_stand_ins();
    let mut checked = Vec::new();
    for deployment in of_kind("Deployment") {
        let name = text(&deployment["metadata"]["name"]);
        let pod = &deployment["spec"]["template"]["spec"];
        let container = pod["containers"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|c| c["name"].as_str() == Some("hookyard"))
            .unwrap_or_else(|| panic!("{name}: no hookyard container"));
        let mut env: BTreeMap<String, String> = container["env"]
            .as_vec()
            .into_iter()
            .flatten()
            .map(|e| (text(&e["name"]), text(&e["value"])))
            .collect();
        for from in container["envFrom"].as_vec().into_iter().flatten() {
            assert_eq!(from["secretRef"]["name"].as_str(), Some("hookyard"), "{name}");
            env.extend(given.clone());
        }
        let labels = &deployment["spec"]["template"]["metadata"]["labels"];
        let mut reached_on = Vec::new();
        for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
            let get = &container[probe]["httpGet"];
            if get.is_badvalue() {
                continue;
            }
            let path = text(&get["path"]);
            assert!(
                ["/healthz", "/readyz"].contains(&path.as_str()),
                "{name}: {probe} {path}"
            );
            reached_on.push((format!("{probe} {path}"), port_number(container, &get["port"])));
        }
        for service in services.iter().filter(|s| labels_match(&s["spec"]["selector"], labels)) {
            for port in service["spec"]["ports"].as_vec().unwrap() {
                let what = format!("Service {}", text(&service["metadata"]["name"]));
                reached_on.push((what, port_number(container, &port["targetPort"])));
            }
        }
        let container = Container {
            origin: format!("kubernetes: {name}"),
            args: texts(&container["args"]),
            env,
            files: mounted(pod, container, &maps),
            reached_on,
        };
        container.check_command();
        let settings = container.settings();
        check_common(&settings, &container.origin, replicas, "nats");
        container.check_ports(&settings);
        checked.push(container.args[0].clone());
    }
    checked.sort();
    assert_eq!(checked, ["api", "ingest", "reconciler", "router", "worker"]);

    // KEDA scales the workers on their consumers, read from the nats Service's monitoring.
    let keda = yaml_docs("kubernetes/keda.yaml").remove(0);
    let target = text(&keda["spec"]["scaleTargetRef"]["name"]);
    let worker = of_kind("Deployment").find(|d| text(&d["metadata"]["name"]) == target);
    let worker = worker.unwrap_or_else(|| panic!("KEDA scales {target}, which is not deployed"));
    assert_eq!(
        texts(&worker["spec"]["template"]["spec"]["containers"][0]["args"]),
        ["worker"]
    );
    let mut scaled_on = Vec::new();
    for trigger in keda["spec"]["triggers"].as_vec().unwrap() {
        let meta = &trigger["metadata"];
        assert_eq!(
            text(&meta["natsServerMonitoringEndpoint"]),
            format!("nats.{namespace}.svc.cluster.local:8222")
        );
        assert_eq!(text(&meta["account"]), "$G", "hookyard's NATS has no accounts");
        text(&meta["lagThreshold"]).parse::<u64>().expect("lagThreshold");
        scaled_on.push((text(&meta["stream"]), text(&meta["consumer"])));
    }
    let expected = [(CONN_STREAM, FUNCTIONS_CONSUMER), (EXEC_STREAM, EXEC_CONSUMER)].map(|(s, c)| (s.into(), c.into()));
    assert_eq!(scaled_on, expected);
}

/// No Docker engine runs the build here; this holds the Dockerfile to the names and
/// versions it depends on.
#[test]
fn the_dockerfile_builds_this_binary_and_runs_it_as_the_manifests_expect() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_hookyard"))
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    assert!(dockerfile.contains(&format!("cargo build --release --locked -p {}", env!("CARGO_PKG_NAME"))));
    assert!(dockerfile.contains(&format!("target/release/{bin} /usr/local/bin/{bin}")));
    assert!(dockerfile.contains(&format!("ENTRYPOINT [\"{bin}\"]")));
    // The roots calls out verify https destinations against.
    assert!(dockerfile.contains("ca-certificates"));
    let rust = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("FROM rust:"))
        .and_then(|tag| tag.split('-').next())
        .expect("a rust build stage");
    let version = |v: &str| v.split('.').map(|n| n.parse::<u32>().unwrap()).collect::<Vec<_>>();
    assert!(
        version(rust) >= version(env!("CARGO_PKG_RUST_VERSION")),
        "rust:{rust} is older than the workspace's rust-version"
    );
    let ignored = std::fs::read_to_string(deploy_dir().join("Dockerfile.dockerignore")).unwrap();
    assert!(
        ignored.lines().any(|l| l == "target"),
        "the build context would carry target/"
    );

    // The image's user is the one the pods run as.
    let uid = dockerfile
        .split("--uid ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a user of its own");
    for deployment in yaml_docs("kubernetes/hookyard.yaml")
        .iter()
        .filter(|d| d["kind"].as_str() == Some("Deployment"))
    {
        let context = &deployment["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(
            text(&context["runAsUser"]),
            uid,
            "{}",
            text(&deployment["metadata"]["name"])
        );
    }
}

/// Runs a schema checker `scripts/test` installs (PyPI); its output on failure.
fn schema_check(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .current_dir(deploy_dir())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (scripts/test installs it: ensure_deploy_validators)"));
    assert!(
        output.status.success(),
        "{program} refused the files:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The manifests against Kubernetes' own schemas (strict: an unknown field, such as a
/// misspelt probe, is an error; 1.30, the oldest with the preStop sleep on by default),
/// and the Compose file against the Compose specification's.
#[test]
fn the_deployment_files_follow_the_kubernetes_and_compose_schemas() {
    let kustomization = yaml_docs("kustomization.yaml").remove(0);
    let resources = texts(&kustomization["resources"]);
    let mut args = vec!["--strict", "--quiet", "-k", "1.30.0"];
    args.extend(resources.iter().map(String::as_str));
    schema_check("kubernetes-validate", &args);
    schema_check(
        "check-jsonschema",
        &["--builtin-schema", "vendor.compose-spec", "compose.yaml"],
    );
}
