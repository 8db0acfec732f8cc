use sqlx::{Connection, Executor, PgConnection};

/// The server the harness creates databases on: `$HOOKYARD_TEST_POSTGRES_URL`, else the
/// local one with trust auth.
fn admin_url() -> String {
    std::env::var("HOOKYARD_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A freshly created, empty Postgres database, dropped (with its connections) afterwards.
pub struct PgDatabase {
    pub name: String,
    pub url: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        let admin = admin_url();
        let name = format!("hookyard_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("cannot reach Postgres at {admin}: {e} (pg_ctlcluster 15 main start)"));
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("CREATE DATABASE");
        // The same server and parameters (`?sslmode=…`), another database.
        let (address, query) = admin.split_once('?').map_or((admin.as_str(), ""), |(a, q)| (a, q));
        let base = address.rsplit_once('/').map_or(address, |(base, _)| base);
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        PgDatabase {
            url: format!("{base}/{name}{query}"),
            name,
        }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // Drop may run inside a runtime (or while panicking): do the async work on a
        // thread of its own with a runtime of its own.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    if let Ok(mut conn) = PgConnection::connect(&admin_url()).await {
                        let _ = conn
                            .execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

impl PgDatabase {
    /// Drops the database now, while clients may still be connected: Postgres "down"
    /// as far as they are concerned.
    pub async fn drop_now(&self) {
        let mut conn = PgConnection::connect(&admin_url()).await.expect("admin connection");
        conn.execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
            .await
            .expect("DROP DATABASE");
    }
}

impl PgDatabase {
    /// Cuts every client off and refuses new connections until [`PgDatabase::reopen`]:
    /// Postgres down for a while, as its clients see it.
    pub async fn close_for_now(&self) {
        let mut conn = PgConnection::connect(&admin_url()).await.expect("admin connection");
        for sql in [
            format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", self.name),
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                self.name
            ),
        ] {
            conn.execute(sql.as_str()).await.expect(&sql);
        }
    }

    pub async fn reopen(&self) {
        let mut conn = PgConnection::connect(&admin_url()).await.expect("admin connection");
        let sql = format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name);
        conn.execute(sql.as_str()).await.expect(&sql);
    }
}
