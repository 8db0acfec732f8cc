//! `hookyard dev`'s own nats-server: started under the data folder, started again when
//! it stops by itself (the clients reconnect to the same port), and stopped last, once
//! the services have drained.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hookyard_core::embedded_nats::{server_bin, ConfigFile, EmbeddedNats, ServerSpec};
use hookyard_core::Config;
use tokio_util::sync::CancellationToken;

use crate::dev::Error;

/// How long a start may take before dev gives up on it.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// A server that stops this many times within [`RESTART_WINDOW`] is given up on.
const ENDS_TO_GIVE_UP: usize = 3;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// How long the server has to write its state and exit at dev's stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The running server and what it takes to start it again.
pub struct DevNats {
    server: EmbeddedNats,
    launch: Launch,
    pub url: String,
}

/// A server's settings, owned, so that a start can run on a blocking thread.
#[derive(Clone)]
struct Launch {
    bin: PathBuf,
    port: u16,
    data: PathBuf,
    max_payload_mb: usize,
}

impl Launch {
    fn start(&self) -> Result<EmbeddedNats, Error> {
        let spec = ServerSpec {
            bin: &self.bin,
            port: self.port,
            store_dir: &self.data.join("nats"),
            config: ConfigFile::Written {
                path: &self.data.join("nats.conf"),
                max_payload_mb: self.max_payload_mb,
            },
            cluster: None,
            monitor_port: None,
            // Ctrl-C goes to dev alone, which stops the server after draining.
            own_process_group: true,
        };
        let server = EmbeddedNats::start(&spec, START_TIMEOUT)?;
        if let Some(pid) = server.pid() {
            if let Err(error) = std::fs::write(self.pid_file(), pid.to_string()) {
                tracing::warn!(%error, "cannot record the nats-server pid");
            }
        }
        Ok(server)
    }

    fn pid_file(&self) -> PathBuf {
        self.data.join("nats.pid")
    }
}

impl DevNats {
    /// A server under the data folder, on a free loopback port, once an earlier dev's
    /// server left running (dev was killed) is stopped.
    pub fn start(config: &Config) -> Result<DevNats, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let launch = Launch {
            bin: server_bin(),
            port,
            data: config.data_dir.clone(),
            max_payload_mb: (config.ingest.max_body_bytes >> 20) + 2,
        };
        stop_stale_nats(&launch.pid_file());
        Ok(DevNats {
            server: launch.start()?,
            launch,
            url: format!("nats://127.0.0.1:{port}"),
        })
    }

    /// Keeps the server running until `shutdown`, then hands it back to be stopped
    /// last. A server that ends by itself (killed, crashed) is started again on the same
    /// port and store; one that ends [`ENDS_TO_GIVE_UP`] times within [`RESTART_WINDOW`],
    /// or cannot be started, stops dev with the error.
    pub async fn supervise(mut self, shutdown: CancellationToken) -> Result<DevNats, Error> {
        let mut ends = VecDeque::new();
        loop {
            let (status, last_lines) = tokio::select! {
                ended = self.server.ended() => ended,
                _ = shutdown.cancelled() => return Ok(self),
            };
            let status = status.map_or_else(|| "exit status unknown".to_string(), |s| s.to_string());
            let now = Instant::now();
            ends.push_back(now);
            ends.retain(|at| now.duration_since(*at) < RESTART_WINDOW);
            if ends.len() >= ENDS_TO_GIVE_UP {
                return Err(format!(
                    "the nats-server stopped {} times within {RESTART_WINDOW:?} ({status}); its last lines:\n{last_lines}",
                    ends.len()
                )
                .into());
            }
            tracing::error!(%status, %last_lines, "the nats-server stopped by itself; starting it again");
            let launch = self.launch.clone();
            self.server = tokio::task::spawn_blocking(move || launch.start())
                .await
                .map_err(|e| format!("starting the nats-server again: {e}"))?
                .map_err(|e| format!("the nats-server stopped ({status}) and does not start again: {e}"))?;
            tracing::info!(url = %self.url, "nats-server started again");
        }
    }

    /// Stops the server, letting it write its state first.
    pub async fn stop(mut self) {
        self.server.stop(STOP_GRACE).await;
        let _ = std::fs::remove_file(self.launch.pid_file());
    }
}

/// A `hookyard dev` that was killed (SIGKILL, a crash) leaves its nats-server running
/// and holding the JetStream store; stop it before starting a new one.
fn stop_stale_nats(pid_file: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    let is_nats = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| String::from_utf8_lossy(&cmdline).contains("nats-server"))
        .unwrap_or(false);
    if !is_nats {
        return;
    }
    tracing::warn!(pid, "stopping the nats-server left behind by an earlier hookyard dev");
    let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
    // Wait (bounded) for it to release the store.
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}
