//! Records write throughput: batches of 1, 100 and 1000 records, on Postgres and SQLite,
//! each batch one `write_records` call (one transaction).

use std::time::Instant;

use hookyard_core::secrets::{random_bytes, Cipher};
use hookyard_core::store::records::{RecordScope, WriteKind};
use hookyard_core::Store;
use hookyard_testkit::{PgDatabase, SqliteFile};
use serde_json::json;

pub async fn run(batches: &[usize], records_per_size: usize) -> anyhow::Result<()> {
    let pg = PgDatabase::create().await;
    let sqlite = SqliteFile::create();
    println!("records write benchmark: {records_per_size} records per batch size, one writer, new ids (inserts) then the same ids changed (updates)\n");
    println!(
        "{:<10} {:>6} {:>14} {:>14}",
        "backend", "batch", "insert rec/s", "update rec/s"
    );
    for (name, url) in [("postgres", pg.url.as_str()), ("sqlite", sqlite.url.as_str())] {
        let store = Store::connect(url, Cipher::from_bytes(random_bytes())).await?;
        let env = store.ensure_environment(&"bench".parse()?).await?;
        for &batch in batches {
            let scope = RecordScope {
                environment_id: env.id,
                integration: "crm".parse()?,
                connection_id: format!("conn-{batch}"),
                model: "Contact".into(),
            };
            let total = records_per_size.max(batch);
            let mut rates = Vec::new();
            for pass in 0..2i64 {
                let started = Instant::now();
                let mut version = pass * 1_000_000;
                for chunk_start in (0..total).step_by(batch) {
                    let records = (chunk_start..(chunk_start + batch).min(total))
                        .map(|i| {
                            let payload = json!({"id": format!("c{i}"), "email": format!("user{i}@example.com"), "pass": pass, "tags": ["a", "b"]});
                            (format!("c{i}"), payload)
                        })
                        .collect();
                    version += 1;
                    store
                        .write_records(&scope, WriteKind::Save, records, version, None)
                        .await?;
                }
                rates.push(total as f64 / started.elapsed().as_secs_f64());
            }
            println!("{name:<10} {batch:>6} {:>14.0} {:>14.0}", rates[0], rates[1]);
        }
    }
    Ok(())
}
