//! `ingest status`: the shards of a stream and the workers reading them.

use clap::Args;

use ingest::lease::{identity, status};

use super::{ConfigFile, DatabaseArgs};

/// Show the shards of a stream with their owners, checkpoints and lag, and the
/// workers with their heartbeats, as the lease table has them now.
///
/// Reads the database only (no AWS access): the stream is found by its name
/// or ARN among the streams consumers have registered. An owner is shown only while its
/// lease is unexpired; "behind" is Kinesis's MillisBehindLatest at the last
/// commit, and "committed" how long ago the checkpoint last moved.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The Kinesis stream: a name, or an ARN.
    #[arg(long, env = "INGEST_STREAM")]
    stream: String,
    #[command(flatten)]
    database: DatabaseArgs,
}

pub async fn run(args: StatusArgs, file: ConfigFile) -> anyhow::Result<()> {
    let database = args.database.validate(file.database)?;
    let client = ingest::db::connect(&database).await?;
    // A name or an ARN: the newest stream by that name or ARN.
    let lease_key = identity::resolve(&client, &args.stream).await?;
    let shards = status::shards(&client, &lease_key).await?;
    let workers = status::workers(&client, &lease_key).await?;

    let open = shards.iter().filter(|s| !s.ended).count();
    println!(
        "stream {}: {} shards ({open} open, {} ended), {} live workers",
        args.stream,
        shards.len(),
        shards.len() - open,
        workers
            .iter()
            .filter(|w| w.seconds_since_heartbeat < 60.0)
            .count()
    );
    if lease_key != args.stream {
        println!("lease key {lease_key}");
    }
    for old_key in identity::kept_aside(&client, &lease_key).await? {
        println!("kept aside: the leases of an older stream of the same name, {old_key}");
    }
    if shards.is_empty() {
        println!("no shards in the lease table: no consumer has started on this stream yet");
        return Ok(());
    }
    println!();
    let mut table = vec![row(&[
        "SHARD",
        "OWNER",
        "LEASE",
        "CHECKPOINT",
        "PARENTS",
        "ENDED",
        "BEHIND",
        "COMMITTED",
    ])];
    for shard in &shards {
        table.push(vec![
            shard.shard_id.clone(),
            shard.owner.clone().unwrap_or_else(|| "-".into()),
            shard.lease_counter.to_string(),
            shard.checkpoint.as_deref().map_or("-".into(), abbreviate),
            if shard.parent_shard_ids.is_empty() {
                "-".into()
            } else {
                shard.parent_shard_ids.join(",")
            },
            if shard.ended {
                "yes".into()
            } else {
                "no".into()
            },
            shard
                .millis_behind_latest
                .map_or("-".into(), |ms| format!("{ms} ms")),
            if shard.checkpoint.is_some() {
                ago(shard.seconds_since_commit)
            } else {
                "-".into()
            },
        ]);
    }
    print_table(&table);
    println!();
    if workers.is_empty() {
        println!("no worker has sent a heartbeat in the last hour");
        return Ok(());
    }
    let mut table = vec![row(&["WORKER", "HEARTBEAT", "STARTED", "LEASES"])];
    for worker in &workers {
        table.push(vec![
            worker.worker_id.clone(),
            ago(worker.seconds_since_heartbeat),
            ago(worker.seconds_since_start),
            worker.leases.to_string(),
        ]);
    }
    print_table(&table);
    Ok(())
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Sequence numbers are 56 digits: the first and last few tell them apart.
fn abbreviate(sequence: &str) -> String {
    if sequence.len() <= 20 {
        sequence.to_string()
    } else {
        format!("{}…{}", &sequence[..8], &sequence[sequence.len() - 8..])
    }
}

fn ago(seconds: f64) -> String {
    match seconds {
        s if s < 120.0 => format!("{s:.0} s ago"),
        s if s < 7_200.0 => format!("{:.0} min ago", s / 60.0),
        s => format!("{:.1} h ago", s / 3_600.0),
    }
}

fn print_table(rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|column| {
            rows.iter()
                .map(|r| r[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
}
