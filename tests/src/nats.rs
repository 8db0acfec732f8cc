use std::process::Command;
use std::time::Duration;

use hookyard_core::embedded_nats::{server_bin, EmbeddedNats, ServerSpec};

pub use hookyard_core::embedded_nats::server_bin as nats_server_bin;

/// A JetStream-enabled `nats-server` on a free loopback port with its own store.
pub struct NatsServer {
    pub port: u16,
    pub url: String,
    bin: std::path::PathBuf,
    max_payload_mb: usize,
    dir: tempfile::TempDir,
    process: Option<EmbeddedNats>,
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
        let port = crate::free_port();
        let mut server = NatsServer {
            port,
            url: format!("nats://127.0.0.1:{port}"),
            bin: bin.to_path_buf(),
            dir: tempfile::tempdir().expect("temporary folder"),
            max_payload_mb,
            process: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let spec = ServerSpec {
            bin: &self.bin,
            port: self.port,
            store_dir: &self.dir.path().join("js"),
            config_file: &self.dir.path().join("nats.conf"),
            max_payload_mb: self.max_payload_mb,
        };
        let process = EmbeddedNats::start(&spec, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
        self.process = Some(process);
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
