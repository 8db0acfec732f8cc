use std::process::Command;
use std::time::Duration;

use hookyard_core::embedded_nats::{server_bin, ClusterNode, ConfigFile, EmbeddedNats, ServerSpec};

pub use hookyard_core::embedded_nats::server_bin as nats_server_bin;

/// A JetStream-enabled `nats-server` on a free loopback port with its own store.
pub struct NatsServer {
    pub port: u16,
    pub url: String,
    /// Its monitoring port (`/healthz`, `/jsz`), for a node of a cluster.
    pub monitor_port: Option<u16>,
    host: String,
    cluster: Option<Membership>,
    bin: std::path::PathBuf,
    max_payload_mb: usize,
    dir: tempfile::TempDir,
    process: Option<EmbeddedNats>,
}

/// A node's place in a cluster.
struct Membership {
    /// `n1`, `n2`, …: what JetStream names as a stream's leader.
    name: String,
    route_port: u16,
    monitor_port: u16,
    /// The other nodes' route addresses.
    routes: Vec<String>,
}

/// Servers clustered on 127.0.0.1, 127.0.0.2, …, each with its own JetStream store, run
/// on the configuration hookyard ships (`deploy/nats/nats.conf`) with the command line
/// setting each node's addresses as deployments do; a node can be killed and started
/// again.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes; returns once each accepts clients (JetStream elects its
    /// leaders a little later: wait for a stream operation to succeed).
    pub fn start(size: usize) -> NatsCluster {
        let hosts: Vec<String> = (1..=size).map(|i| format!("127.0.0.{i}")).collect();
        let ports: Vec<[u16; 3]> = hosts.iter().map(|host| crate::free_ports(host)).collect();
        let routes: Vec<String> = hosts
            .iter()
            .zip(&ports)
            .map(|(host, [_, route, _])| format!("{host}:{route}"))
            .collect();
        let nodes = hosts
            .iter()
            .zip(&ports)
            .enumerate()
            .map(|(i, (host, &[port, route_port, monitor_port]))| {
                let others = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, r)| r.clone());
                let membership = Membership {
                    name: format!("n{}", i + 1),
                    route_port,
                    monitor_port,
                    routes: others.collect(),
                };
                NatsServer::started(&server_bin(), host, port, 16, Some(membership))
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Every node's client URL, comma separated (as `HOOKYARD_NATS_URL` takes them).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| n.url.as_str()).collect::<Vec<_>>().join(",")
    }

    /// The node named `name`.
    pub fn node(&mut self, name: &str) -> &mut NatsServer {
        self.nodes
            .iter_mut()
            .find(|n| n.name() == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }
}

/// The deployment files hookyard ships (`deploy/`).
pub fn deploy_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

impl NatsServer {
    /// Starts the server (`max_payload` 16 MiB: webhook bodies go up to 10 MiB by
    /// default); returns once it accepts clients.
    pub fn start() -> NatsServer {
        Self::start_with(&server_bin())
    }

    /// As [`NatsServer::start`], with a given binary (to test against an old server).
    pub fn start_with(bin: &std::path::Path) -> NatsServer {
        Self::start_custom(bin, 16)
    }

    /// A server whose `max_payload` is `mb` MiB.
    pub fn start_with_max_payload(mb: usize) -> NatsServer {
        Self::start_custom(&server_bin(), mb)
    }

    fn start_custom(bin: &std::path::Path, max_payload_mb: usize) -> NatsServer {
        Self::started(bin, "127.0.0.1", crate::free_port(), max_payload_mb, None)
    }

    fn started(
        bin: &std::path::Path,
        host: &str,
        port: u16,
        max_payload_mb: usize,
        cluster: Option<Membership>,
    ) -> NatsServer {
        let mut server = NatsServer {
            port,
            url: format!("nats://{host}:{port}"),
            monitor_port: cluster.as_ref().map(|c| c.monitor_port),
            host: host.into(),
            cluster,
            bin: bin.to_path_buf(),
            dir: tempfile::tempdir().expect("temporary folder"),
            max_payload_mb,
            process: None,
        };
        server.spawn();
        server
    }

    /// Its monitoring endpoint (`http://host:port`), for a node of a cluster.
    pub fn monitor_url(&self) -> Option<String> {
        self.monitor_port.map(|port| format!("http://{}:{port}", self.host))
    }

    /// The server's name in a cluster (`n1`, `n2`, …); empty for a single server.
    pub fn name(&self) -> &str {
        self.cluster.as_ref().map_or("", |c| c.name.as_str())
    }

    fn spawn(&mut self) {
        let written = self.dir.path().join("nats.conf");
        let shipped = deploy_dir().join("nats/nats.conf");
        let spec = ServerSpec {
            bin: &self.bin,
            port: self.port,
            store_dir: &self.dir.path().join("js"),
            config: match self.cluster {
                Some(_) => ConfigFile::Given(&shipped),
                None => ConfigFile::Written {
                    path: &written,
                    max_payload_mb: self.max_payload_mb,
                },
            },
            monitor_port: self.monitor_port,
            cluster: self.cluster.as_ref().map(|c| ClusterNode {
                name: &c.name,
                host: &self.host,
                cluster_port: c.route_port,
                routes: &c.routes,
            }),
            own_process_group: false,
        };
        let process = EmbeddedNats::start(&spec, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
        self.process = Some(process);
    }

    /// Publishes one message from a plain TCP connection, its header block (the
    /// `NATS/1.0` line, each header, the blank line) on the wire exactly as given: what
    /// another NATS client may send and async-nats would not build. Returns once the
    /// server has read it (its answer to the PING that follows).
    pub async fn publish_raw(&self, subject: &str, header_block: &[u8], payload: &[u8]) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .expect("connect to nats-server");
        let mut tcp = BufReader::new(tcp);
        let mut line = String::new();
        tcp.read_line(&mut line).await.expect("the server's INFO");
        assert!(line.starts_with("INFO"), "expected INFO, got {line:?}");
        let mut out = format!(
            "CONNECT {{\"verbose\":false,\"headers\":true,\"protocol\":1}}\r\nHPUB {subject} {} {}\r\n",
            header_block.len(),
            header_block.len() + payload.len()
        )
        .into_bytes();
        out.extend_from_slice(header_block);
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\nPING\r\n");
        tcp.get_mut().write_all(&out).await.expect("write to nats-server");
        loop {
            line.clear();
            tcp.read_line(&mut line).await.expect("the server's answer");
            assert!(
                !line.starts_with("-ERR") && !line.is_empty(),
                "the server refused: {line:?}"
            );
            if line.starts_with("PONG") {
                return;
            }
        }
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    pub fn stop(&mut self) {
        self.process = None;
    }

    /// Starts the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts the server again on the same port with an empty store: a server whose
    /// storage was lost (a container restarted without its volume).
    pub fn restart_empty(&mut self) {
        self.stop();
        let store = self.dir.path().join("js");
        std::fs::remove_dir_all(&store).unwrap_or_else(|e| panic!("removing {}: {e}", store.display()));
        self.spawn();
    }

    /// Starts the server again on the same port with its store, less the durable
    /// consumer `consumer` of `stream`: a consumer gone with no word to its clients.
    pub fn restart_without_consumer(&mut self, stream: &str, consumer: &str) {
        self.stop();
        let account = self.dir.path().join("js").join("jetstream").join("$G");
        let kept = account.join("streams").join(stream).join("obs").join(consumer);
        std::fs::remove_dir_all(&kept).unwrap_or_else(|e| panic!("removing {}: {e}", kept.display()));
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered. Returns
    /// once every thread of it is stopped: `kill` returns when the signal is sent, and a
    /// thread busy on the other core could still answer one more message.
    pub fn pause(&self) {
        self.signal("-STOP");
        let tasks = format!("/proc/{}/task", self.pid());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stopped = std::fs::read_dir(&tasks).expect("the server's threads").all(|task| {
                let stat = std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            });
            if stopped {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "nats-server did not stop");
            std::thread::yield_now();
        }
    }

    /// Undoes [`NatsServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn pid(&self) -> u32 {
        self.process
            .as_ref()
            .and_then(EmbeddedNats::pid)
            .expect("server is running")
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} failed");
    }
}
