//! `ingest consume` under faults, end to end: resharding while records flow,
//! the database going away, a lease taken by another worker, a worker killed
//! while it writes. Real processes, the stack's Kinesis emulator and
//! PostgreSQL; each test has a stream and a database of its own, and checks
//! rows and per-device sums (values 1, 2, 3...), so that one lost or doubled
//! record shows.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ingest::source::kinesis::{Fetched, KinesisSource, ReaderOptions, Record, StartPosition};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use tests::consumer::{
    ConsumerProcess, create_stream, expected_per_device, per_device, record, records,
    wait_for_count,
};
use tests::proxy::{TcpProxy, host_port};
use tests::{TestDb, base_ts};

/// Generous bound for a test's records to land; a bound, not a speed target.
const LAND_WITHIN: Duration = Duration::from_secs(120);
/// Bound for a lease or checkpoint change to show in the lease table.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);
const SAMPLES: &str = "SELECT count(*) FROM telemetry.samples";
/// The consumer's batch transactions that wait on a lock: in their COPY
/// (behind a table lock the test holds), or in their checkpoint update
/// (behind a lease renewal that waits on another waiting batch's row).
const BATCHES_WAITING: &str = "SELECT count(*) FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock'
      AND (query LIKE 'COPY telemetry.samples%' OR query LIKE '%SET checkpoint%')";

/// Polls `query` (one bigint, with `params`) until it returns at least
/// `expected` or `within` passes; returns the last value.
async fn wait_for(
    client: &Client,
    query: &str,
    params: &[&(dyn ToSql + Sync)],
    expected: i64,
    within: Duration,
) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let value: i64 = client
            .query_one(query, params)
            .await
            .expect("the polled query runs")
            .get(0);
        if value >= expected || Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(client: &Client) -> i64 {
    client.query_one(SAMPLES, &[]).await.unwrap().get(0)
}

/// Waits for `all` to land, lets any duplicate that would come show up,
/// then checks rows and per-device sums.
async fn assert_exactly(client: &Client, all: &[(String, Bytes)], what: &str) {
    let landed = wait_for_count(client, SAMPLES, all.len() as i64, LAND_WITHIN).await;
    assert_eq!(
        landed,
        all.len() as i64,
        "{what}: rows in telemetry.samples"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(client).await,
        all.len() as i64,
        "{what}: rows after a pause"
    );
    assert_eq!(
        per_device(client).await,
        expected_per_device(all),
        "{what}: rows and sums per device"
    );
}

/// Lease rows of `stream`: shard -> (owner, ended, checkpoint).
async fn leases(
    client: &Client,
    stream: &str,
) -> HashMap<String, (Option<String>, bool, Option<String>)> {
    client
        .query(
            "SELECT shard_id, owner, ended, checkpoint FROM ingest.shard_leases WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1)",
            &[&stream],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect()
}

/// Waits until `worker` holds exactly `count` unexpired, unended leases of `stream`.
async fn wait_for_leases(client: &Client, stream: &str, worker: &str, count: i64) {
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let held: i64 = client
            .query_one(
                "SELECT count(*) FROM ingest.shard_leases
                 WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND owner = $2 AND NOT ended AND expires_at > now()",
                &[&stream, &worker],
            )
            .await
            .unwrap()
            .get(0);
        if held == count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{worker} holds {held} leases of {stream}, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After a test passed: kills its workers, deletes its stream (the
/// emulator's account has a shard limit) and drops its database.
async fn clean_up(
    workers: impl IntoIterator<Item = ConsumerProcess>,
    source: &KinesisSource,
    db: TestDb,
) {
    workers.into_iter().for_each(drop);
    source
        .delete_stream()
        .await
        .expect("the test's stream is deleted");
    db.drop().await;
}

/// Puts waves of records from `devices` devices, one wave every `every`,
/// until stopped or `limit` records are put. Record `i` (from 0) is device
/// `dev-{i % devices}` at `base_ts() + i` ms with value `i + 1`: one device's
/// records are put in time order, and sums show a lost or doubled one.
struct Producer {
    stop: Arc<AtomicBool>,
    put: Arc<AtomicUsize>,
    task: JoinHandle<Vec<(String, Bytes)>>,
}

impl Producer {
    fn start(
        source: KinesisSource,
        devices: usize,
        wave: usize,
        every: Duration,
        limit: usize,
    ) -> Producer {
        let stop = Arc::new(AtomicBool::new(false));
        let put = Arc::new(AtomicUsize::new(0));
        let (stopped, counter) = (stop.clone(), put.clone());
        let task = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while all.len() < limit && !stopped.load(Ordering::SeqCst) {
                ticks.tick().await;
                let first = all.len();
                let batch: Vec<_> = (first..(first + wave).min(limit))
                    .map(|i| {
                        record(
                            &format!("dev-{}", i % devices),
                            base_ts() + i as i64,
                            (i + 1) as f64,
                        )
                    })
                    .collect();
                tokio::time::timeout(Duration::from_secs(60), source.put_records(&batch))
                    .await
                    .expect("a wave is put within 60 s")
                    .expect("a wave is put");
                all.extend(batch);
                counter.store(all.len(), Ordering::SeqCst);
            }
            all
        });
        Producer { stop, put, task }
    }

    /// Records accepted by Kinesis so far.
    fn put_so_far(&self) -> usize {
        self.put.load(Ordering::SeqCst)
    }

    fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Stops after the wave being put; returns every record put, in order.
    async fn stop(self) -> Vec<(String, Bytes)> {
        self.stop.store(true, Ordering::SeqCst);
        self.finish().await
    }

    /// Waits until the limit is reached; returns every record put, in order.
    async fn finish(self) -> Vec<(String, Bytes)> {
        match self.task.await {
            Ok(all) => all,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
}

/// Every record of `shards`, read from TRIM_HORIZON by the test itself, until
/// `total` are read: which shard each record went to, and its sequence number.
async fn read_back(
    source: &KinesisSource,
    shards: &[String],
    total: usize,
) -> HashMap<String, Vec<Record>> {
    let mut by_shard = HashMap::new();
    let mut read = 0;
    for shard in shards {
        let mut reader = source
            .shard_reader(shard, StartPosition::TrimHorizon, ReaderOptions::default())
            .await;
        let mut records = Vec::new();
        // Everything was put before: an empty shard answers nothing for a while.
        while let Ok(fetched) = tokio::time::timeout(Duration::from_secs(3), reader.next()).await {
            match fetched.expect("the test's own reader reads") {
                Fetched::Records { records: more, .. } => records.extend(more),
                Fetched::EndOfShard => break,
            }
        }
        read += records.len();
        by_shard.insert(shard.clone(), records);
    }
    assert_eq!(read, total, "records read back from {shards:?}");
    by_shard
}

/// Compares two Kinesis sequence numbers (decimal, up to 128+ bits) as numbers.
fn sequence_le(a: &str, b: &str) -> bool {
    (a.len(), a) <= (b.len(), b)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_split_and_a_merge_during_a_run_lose_and_double_nothing() {
    let db = TestDb::migrated("faults_reshard").await;
    let client = db.client().await;
    let (stream, source) = create_stream("reshard", 2).await;
    // A small GetRecords limit (at most 500 records a second per shard)
    // keeps the readers behind the producer (1,500 a second), so that the
    // parents still hold unread records when their children appear: a child
    // read too early would then commit a device's later records first.
    let mut workers: Vec<ConsumerProcess> = ["w1", "w2"]
        .iter()
        .map(|w| ConsumerProcess::start(&db.url, &stream, w, &["--records-per-call", "100"]))
        .collect();
    let producer = Producer::start(
        source.clone(),
        80,
        150,
        Duration::from_millis(100),
        usize::MAX,
    );
    let deadline = Instant::now() + LAND_WITHIN;
    loop {
        let landed = count(&client).await;
        let behind = producer.put_so_far() as i64 - landed;
        if landed >= 1_000 && behind >= 2_000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{landed} rows landed, {behind} behind: not yet 1,000 and 2,000"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Split the lower shard while records flow into it.
    let before = source.list_shards().await.unwrap();
    assert_eq!(before.len(), 2, "{before:?}");
    let parent = before
        .iter()
        .find(|s| s.starting_hash_key == 0)
        .expect("a shard starting at hash key 0")
        .shard_id
        .clone();
    source.split_shard(&parent).await.expect("the split");
    let children_read = wait_for(
        &client,
        "SELECT count(*) FROM ingest.shard_leases
         WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND $2 = ANY (parent_shard_ids) AND checkpoint IS NOT NULL",
        &[&stream, &parent],
        2,
        LAND_WITHIN,
    )
    .await;
    assert_eq!(children_read, 2, "both children of {parent} were read");

    // Merge two adjacent open shards: the upper child and the other original.
    let mut open: Vec<_> = source
        .list_shards()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.is_open())
        .collect();
    open.sort_by_key(|s| s.starting_hash_key);
    assert_eq!(open.len(), 3, "{open:?}");
    let (lower, upper) = open
        .windows(2)
        .rev()
        .find(|pair| pair[0].ending_hash_key.checked_add(1) == Some(pair[1].starting_hash_key))
        .map(|pair| (pair[0].shard_id.clone(), pair[1].shard_id.clone()))
        .expect("two adjacent open shards");
    source
        .merge_shards(&lower, &upper)
        .await
        .expect("the merge");
    let merged_read = wait_for(
        &client,
        "SELECT count(*) FROM ingest.shard_leases
         WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND parent_shard_ids @> ARRAY[$2, $3] AND checkpoint IS NOT NULL",
        &[&stream, &lower, &upper],
        1,
        LAND_WITHIN,
    )
    .await;
    assert_eq!(merged_read, 1, "the child of {lower} and {upper} was read");

    tokio::time::sleep(Duration::from_secs(1)).await;
    let put = producer.stop().await;
    assert_exactly(&client, &put, "after a split and a merge").await;

    // Every closed shard was read to its end and marked so; every child was read.
    let shards = source.list_shards().await.unwrap();
    let table = leases(&client, &stream).await;
    assert_eq!(
        table.len(),
        5,
        "2 shards, 2 split children, 1 merge child: {table:?}"
    );
    for shard in &shards {
        let (_, ended, checkpoint) = &table[&shard.shard_id];
        if !shard.is_open() {
            assert!(
                ended,
                "closed shard {} is not ended: {table:?}",
                shard.shard_id
            );
        }
        if !shard.parent_shard_ids.is_empty() {
            assert!(
                checkpoint.is_some(),
                "child {} has no checkpoint: {table:?}",
                shard.shard_id
            );
        }
    }
    assert_eq!(
        shards.iter().filter(|s| !s.is_open()).count(),
        3,
        "{shards:?}"
    );

    // Per-device order: a device's later samples never commit in an earlier
    // transaction than its earlier ones (xids are assigned in order, and a
    // batch gets its xid after the batches it must follow committed).
    let inversions = client
        .query(
            "SELECT device, time, tx, before FROM (
                 SELECT n.device, s.time, s.xmin::text::bigint AS tx,
                        lag(s.xmin::text::bigint) OVER (PARTITION BY s.series_id ORDER BY s.time) AS before
                 FROM telemetry.samples s JOIN telemetry.series n USING (series_id)) o
             WHERE tx < before ORDER BY device, time LIMIT 10",
            &[],
        )
        .await
        .unwrap();
    let shown: Vec<(String, i64, i64)> = inversions
        .iter()
        .map(|r| (r.get(0), r.get(2), r.get(3)))
        .collect();
    assert!(
        shown.is_empty(),
        "a device's later record committed before its earlier one: (device, xid, previous xid) {shown:?}"
    );
    let transactions: i64 = client
        .query_one(
            "SELECT count(DISTINCT xmin::text) FROM telemetry.samples",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        transactions >= 10,
        "only {transactions} batch transactions: the order check means little"
    );

    for worker in &mut workers {
        assert!(worker.is_running(), "{} exited", worker.worker_id);
    }
    clean_up(workers, &source, db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_going_away_and_coming_back_loses_nothing() {
    let db = TestDb::migrated("faults_database_away").await;
    let client = db.client().await;
    let (stream, source) = create_stream("database-away", 2).await;
    let proxy = TcpProxy::start(&host_port(&db.url)).await;
    let mut worker = ConsumerProcess::start(&proxy.url_via(&db.url), &stream, "w1", &[]);
    let producer = Producer::start(
        source.clone(),
        50,
        200,
        Duration::from_millis(100),
        usize::MAX,
    );
    let landed = wait_for_count(&client, SAMPLES, 500, LAND_WITHIN).await;
    assert!(landed >= 500, "only {landed} rows before the cut");

    // Hold the consumer's batches mid-transaction (their COPY waits for a
    // table lock the test takes), so that the cut breaks open transactions,
    // not only idle connections.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE telemetry.samples IN SHARE MODE")
        .await
        .unwrap();
    let held = wait_for(&client, BATCHES_WAITING, &[], 2, SETTLE_WITHIN).await;
    assert_eq!(held, 2, "both writers' batches wait, mid-transaction");
    let at_cut = count(&client).await;
    let accepted_before = proxy.accepted();
    proxy.cut().await;
    assert!(
        proxy.reset() >= 2,
        "both writers' open transactions were cut: {} connections reset",
        proxy.reset()
    );
    // The blocked transactions go on, find their client gone, and roll back.
    lock.rollback().await.unwrap();
    let put_at_cut = producer.put_so_far();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        count(&client).await,
        at_cut,
        "rows landed while the proxy (the consumer's only way to the database) was cut"
    );
    assert!(
        producer.put_so_far() > put_at_cut,
        "records were put while the database was away"
    );
    assert!(
        worker.is_running(),
        "the consumer exited while the database was away"
    );
    proxy.restore().await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let put = producer.stop().await;
    assert_exactly(&client, &put, "after the database came back").await;
    assert!(
        proxy.accepted() > accepted_before,
        "the consumer did not connect again"
    );
    assert!(worker.is_running(), "the consumer exited");
    clean_up([worker], &source, db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_that_stops_answering_mid_batch_for_longer_than_the_lease_ttl_loses_nothing() {
    let db = TestDb::migrated("faults_database_stall").await;
    let client = db.client().await;
    let (stream, source) = create_stream("database-stall", 2).await;
    let proxy = TcpProxy::start(&host_port(&db.url)).await;
    let mut worker = ConsumerProcess::start(&proxy.url_via(&db.url), &stream, "w1", &[]);
    let producer = Producer::start(
        source.clone(),
        50,
        200,
        Duration::from_millis(100),
        usize::MAX,
    );
    let landed = wait_for_count(&client, SAMPLES, 500, LAND_WITHIN).await;
    assert!(landed >= 500, "only {landed} rows before the stall");

    // The next batch's checkpoint update is held inside its transaction: the server
    // waits idle in it past idle_in_transaction_session_timeout (a third of
    // the 3 s lease TTL) and ends the session, as on a real stall.
    proxy.stall_at(b"SET checkpoint = coalesce");
    let deadline = Instant::now() + SETTLE_WITHIN;
    while !proxy.is_stalled() {
        assert!(Instant::now() < deadline, "no batch moved its checkpoints");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    proxy.resume();

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        worker.is_running(),
        "the worker exited after the stall: its session ended by the server is not retried"
    );
    let put = producer.stop().await;
    assert_exactly(&client, &put, "after the stall").await;
    assert!(worker.is_running(), "the consumer exited");
    clean_up([worker], &source, db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_whose_lease_is_taken_cannot_commit_for_it() {
    let db = TestDb::migrated("faults_stolen_lease").await;
    let client = db.client().await;
    let (stream, source) = create_stream("stolen-lease", 2).await;
    let mut worker = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    wait_for_leases(&client, &stream, "w1", 2).await;

    let first = records(40, 1_000, base_ts());
    source.put_records(&first).await.unwrap();
    assert_exactly(&client, &first, "first wave").await;
    let stolen = "shardId-000000000000".to_string();
    let kept = "shardId-000000000001".to_string();

    // Lock the stolen shard's lease row, as a worker taking it over does,
    // put more records, and wait until w1's commit for that shard is in
    // flight (waiting on the row), so that the fence, not only the lease
    // renewal, is what stops it.
    let mut intruder = db.client().await;
    let steal = intruder.transaction().await.unwrap();
    let row = steal
        .query_one(
            "SELECT checkpoint, (ctid::text::point)[0]::int, (ctid::text::point)[1]::int
             FROM ingest.shard_leases WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND shard_id = $2 FOR UPDATE",
            &[&stream, &stolen],
        )
        .await
        .unwrap();
    let checkpoint_at_steal: String = row.get::<_, Option<String>>(0).expect("a checkpoint");
    let (page, tuple): (i32, i32) = (row.get(1), row.get(2));
    let second = records(40, 1_000, base_ts() + 10_000_000);
    source.put_records(&second).await.unwrap();
    let waiting = wait_for(
        &client,
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
         WHERE l.locktype = 'tuple' AND l.relation = 'ingest.shard_leases'::regclass
           AND l.page = $1::int AND l.tuple::int = $2::int AND a.query LIKE '%SET checkpoint%'",
        &[&page, &tuple],
        1,
        SETTLE_WITHIN,
    )
    .await;
    assert_eq!(
        waiting, 1,
        "w1's commit for {stolen} is waiting on its lease row"
    );
    steal
        .execute(
            "UPDATE ingest.shard_leases
             SET owner = 'intruder', lease_counter = lease_counter + 1,
                 expires_at = now() + interval '1 hour'
             WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND shard_id = $2",
            &[&stream, &stolen],
        )
        .await
        .unwrap();
    steal.commit().await.unwrap();

    // Which records went to which shard, as Kinesis says.
    let all: Vec<_> = first.iter().chain(&second).cloned().collect();
    let by_shard = read_back(&source, &[stolen.clone(), kept.clone()], all.len()).await;
    assert!(
        !by_shard[&stolen].is_empty() && !by_shard[&kept].is_empty(),
        "both shards got records"
    );
    let key = |r: &Record| (r.partition_key.clone(), r.data.clone());
    // Of the stolen shard, only what was committed before the steal; of the other, everything.
    let allowed: Vec<(String, Bytes)> = by_shard[&stolen]
        .iter()
        .filter(|r| sequence_le(&r.sequence_number, &checkpoint_at_steal))
        .chain(&by_shard[&kept])
        .map(key)
        .collect();
    assert!(
        allowed.len() < all.len(),
        "records of {stolen} came after its checkpoint"
    );
    assert_exactly(&client, &allowed, "while the lease is taken").await;
    // Another lease round and batch age later, still nothing for the stolen shard.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&client).await, allowed.len() as i64);
    let table = leases(&client, &stream).await;
    assert_eq!(
        table[&stolen],
        (
            Some("intruder".to_string()),
            false,
            Some(checkpoint_at_steal)
        ),
        "the stolen shard's lease and checkpoint"
    );
    assert_eq!(table[&kept].0.as_deref(), Some("w1"));

    // The intruder lets go: w1 takes the lease again and resumes after the checkpoint.
    client
        .execute(
            "UPDATE ingest.shard_leases SET owner = NULL, expires_at = NULL
             WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND shard_id = $2",
            &[&stream, &stolen],
        )
        .await
        .unwrap();
    assert_exactly(&client, &all, "after the lease came back").await;
    let last = by_shard[&stolen].last().unwrap().sequence_number.clone();
    let table = leases(&client, &stream).await;
    assert_eq!(table[&stolen], (Some("w1".to_string()), false, Some(last)));
    assert!(worker.is_running(), "w1 exited");
    clean_up([worker], &source, db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_killed_mid_batch_loses_and_doubles_nothing() {
    let db = TestDb::migrated("faults_kill_mid_batch").await;
    let client = db.client().await;
    let (stream, source) = create_stream("kill-mid-batch", 4).await;
    // At most 500 records a second per shard (a small GetRecords limit):
    // the workers stay behind the producer (4,000 a second), so that they
    // always have batches to write, and rows lag what was put.
    let slow = ["--records-per-call", "100"];
    let mut workers: Vec<ConsumerProcess> = ["w1", "w2"]
        .iter()
        .map(|w| ConsumerProcess::start(&db.url, &stream, w, &slow))
        .collect();
    wait_for_leases(&client, &stream, "w1", 2).await;
    wait_for_leases(&client, &stream, "w2", 2).await;

    let producer = Producer::start(source.clone(), 60, 400, Duration::from_millis(100), 24_000);
    // Wait until the run is in full swing: a quarter put, 20% to 80% of it landed.
    let deadline = Instant::now() + LAND_WITHIN;
    loop {
        assert!(
            producer.is_running(),
            "the producer finished before the rows were between 20% and 80% of it"
        );
        let put = producer.put_so_far() as i64;
        let landed = count(&client).await;
        if put >= 6_000 && landed * 5 >= put && landed * 5 <= put * 4 {
            break;
        }
        assert!(Instant::now() < deadline, "{landed} of {put} landed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mid-batch for sure: hold the writers' batches in their transactions
    // (a table lock stops their COPY) until all four of the two workers wait.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE telemetry.samples IN SHARE MODE")
        .await
        .unwrap();
    let waiting = wait_for(&client, BATCHES_WAITING, &[], 4, SETTLE_WITHIN).await;
    assert_eq!(waiting, 4, "batches in flight: two writers in each worker");
    let put = producer.put_so_far() as i64;
    let landed = count(&client).await;
    assert!(
        producer.is_running() && landed * 5 >= put && landed * 5 <= put * 4,
        "at the kill, the producer runs and 20% to 80% of what was put landed: {landed} of {put}"
    );
    workers[0].kill();
    lock.rollback().await.unwrap();
    workers[0] = ConsumerProcess::start(&db.url, &stream, "w1", &slow);

    let all = producer.finish().await;
    assert!(all.len() as i64 > put, "records were put after the kill");
    assert_exactly(&client, &all, "after a kill mid-run").await;
    for worker in &mut workers {
        assert!(worker.is_running(), "{} exited", worker.worker_id);
    }
    clean_up(workers, &source, db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lease_lost_and_taken_back_while_its_rows_wait_loses_and_doubles_nothing() {
    let db = TestDb::migrated("faults_lease_back").await;
    let client = db.client().await;
    let (stream, source) = create_stream("lease-back", 1).await;
    let shard = "shardId-000000000000";
    let mut worker = ConsumerProcess::start(&db.url, &stream, "w1", &[]);
    wait_for_leases(&client, &stream, "w1", 1).await;
    let first = records(10, 200, base_ts());
    source.put_records(&first).await.unwrap();
    assert_exactly(&client, &first, "first wave").await;

    // New devices: w1's writer must create their series first, and waits
    // there on a lock the test holds, with a chunk read under the lease.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute("LOCK TABLE telemetry.series IN SHARE MODE")
        .await
        .unwrap();
    let second: Vec<_> = (0..200)
        .map(|i| {
            record(
                &format!("new-{}", i % 10),
                base_ts() + 10_000_000 + i,
                (i + 1) as f64,
            )
        })
        .collect();
    source.put_records(&second).await.unwrap();
    let waiting = wait_for(
        &client,
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND query LIKE '%INSERT INTO telemetry.series%'",
        &[],
        1,
        SETTLE_WITHIN,
    )
    .await;
    assert_eq!(waiting, 1, "w1's writer waits to create the new series");

    // Meanwhile another worker takes the lease and lets it go; w1 takes it
    // again and reads the same records under its new lease.
    let counter: i64 = client
        .query_one(
            "UPDATE ingest.shard_leases
             SET owner = NULL, expires_at = NULL, lease_counter = lease_counter + 1
             WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND shard_id = $2 RETURNING lease_counter",
            &[&stream, &shard],
        )
        .await
        .unwrap()
        .get(0);
    let back = wait_for(
        &client,
        "SELECT count(*) FROM ingest.shard_leases
         WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1) AND shard_id = $2 AND owner = 'w1' AND lease_counter > $3",
        &[&stream, &shard, &counter],
        1,
        SETTLE_WITHIN,
    )
    .await;
    assert_eq!(back, 1, "w1 took the lease again");
    // Time for the new lease's reader to read the records again and queue them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    lock.rollback().await.unwrap();

    let third = records(10, 200, base_ts() + 20_000_000);
    source.put_records(&third).await.unwrap();
    let all: Vec<_> = first.iter().chain(&second).chain(&third).cloned().collect();
    assert_exactly(&client, &all, "after the lease came back").await;
    assert!(worker.is_running(), "w1 exited");
    clean_up([worker], &source, db).await;
}

/// Lease rows of `stream`: shard -> lease counter. The stream has some.
async fn lease_counters(client: &Client, stream: &str) -> HashMap<String, i64> {
    let counters: HashMap<String, i64> = client
        .query(
            "SELECT shard_id, lease_counter FROM ingest.shard_leases
             WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1)",
            &[&stream],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(!counters.is_empty(), "no lease rows for stream {stream}");
    counters
}

/// The shards of `stream` whose lease is not w1's or has expired. The
/// stream has lease rows, so that an empty answer means something.
async fn lapsed_leases(client: &Client, stream: &str) -> Vec<String> {
    lease_counters(client, stream).await;
    client
        .query(
            "SELECT shard_id FROM ingest.shard_leases
             WHERE stream IN (SELECT lease_key FROM ingest.streams WHERE name = $1)
               AND (owner IS DISTINCT FROM 'w1' OR expires_at <= now())",
            &[&stream],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits until the proxy made `count` connections silent.
async fn wait_for_blackholed(proxy: &TcpProxy, count: u64) {
    let deadline = Instant::now() + SETTLE_WITHIN;
    while proxy.blackholed() < count {
        assert!(
            Instant::now() < deadline,
            "no batch COMMIT went through the proxy within {SETTLE_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_gone_silent_before_commit_stalls_neither_other_shards_nor_renewals() {
    let db = TestDb::migrated("faults_silent_commit").await;
    let client = db.client().await;
    let (stream, source) = create_stream("silent-commit", 4).await;
    let proxy = TcpProxy::start(&host_port(&db.url)).await;
    let mut worker =
        ConsumerProcess::start(&proxy.url_via(&db.url), &stream, "w1", &["--writers", "2"]);
    wait_for_leases(&client, &stream, "w1", 4).await;
    let producer = Producer::start(source.clone(), 40, 40, Duration::from_millis(100), 10_000);
    let landed = wait_for_count(&client, SAMPLES, 400, LAND_WITHIN).await;
    assert!(landed >= 400, "only {landed} rows before the fault");
    let counters = lease_counters(&client, &stream).await;

    // The next COMMIT a writer sends never reaches the server, and the
    // writer hears nothing either: its backend sits idle in a transaction
    // that holds its shards' lease rows.
    proxy.blackhole_at(b"COMMIT", false);
    wait_for_blackholed(&proxy, 1).await;
    let at_fault: HashMap<String, Option<String>> = leases(&client, &stream)
        .await
        .into_iter()
        .map(|(shard, (_, _, checkpoint))| (shard, checkpoint))
        .collect();

    // For four lease times: every lease stays w1's, unexpired, under the
    // counter it had (renewal neither waits on the stuck rows nor stops).
    let watch_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < watch_until {
        assert_eq!(
            lapsed_leases(&client, &stream).await,
            Vec::<String>::new(),
            "leases lapsed or moved while one connection was silent"
        );
        assert_eq!(
            lease_counters(&client, &stream).await,
            counters,
            "lease counters"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The other writer's shards kept committing meanwhile.
    let moved = leases(&client, &stream)
        .await
        .into_iter()
        .filter(|(shard, (_, _, checkpoint))| at_fault[shard] != *checkpoint)
        .count();
    assert!(
        moved >= 1,
        "no shard committed while one writer's connection was silent"
    );
    assert!(worker.is_running(), "w1 exited");

    // The silent writer gives its connection up and writes its batch again:
    // nothing lost, nothing doubled, no lease moved.
    let put = producer.finish().await;
    assert_exactly(&client, &put, "after the silent connection").await;
    assert_eq!(
        lease_counters(&client, &stream).await,
        counters,
        "lease counters at the end"
    );
    assert!(worker.is_running(), "w1 exited");
    clean_up([worker], &source, db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_whose_answer_is_lost_keeps_its_shards_read_under_the_same_leases() {
    let db = TestDb::migrated("faults_lost_commit_answer").await;
    let client = db.client().await;
    let (stream, source) = create_stream("lost-commit-answer", 2).await;
    let proxy = TcpProxy::start(&host_port(&db.url)).await;
    let mut worker =
        ConsumerProcess::start(&proxy.url_via(&db.url), &stream, "w1", &["--writers", "1"]);
    wait_for_leases(&client, &stream, "w1", 2).await;
    let producer = Producer::start(source.clone(), 40, 40, Duration::from_millis(100), 4_000);
    let landed = wait_for_count(&client, SAMPLES, 400, LAND_WITHIN).await;
    assert!(landed >= 400, "only {landed} rows before the fault");
    let counters = lease_counters(&client, &stream).await;

    // The server gets the next COMMIT and carries it out; the writer never
    // hears, gives the connection up and sends the same batch again.
    proxy.blackhole_at(b"COMMIT", true);
    wait_for_blackholed(&proxy, 1).await;
    let put = producer.finish().await;
    assert_exactly(&client, &put, "after the lost answer").await;
    // The retry found its batch committed, not its leases lost: the shards
    // were read on without a pause for the leases to lapse and be taken again.
    assert_eq!(
        lease_counters(&client, &stream).await,
        counters,
        "lease counters"
    );
    assert_eq!(
        lapsed_leases(&client, &stream).await,
        Vec::<String>::new(),
        "leases lapsed or moved"
    );
    assert!(worker.is_running(), "w1 exited");
    clean_up([worker], &source, db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shard_list_that_never_answers_costs_no_lease() {
    let db = TestDb::migrated("faults_list_shards_hangs").await;
    let client = db.client().await;
    let (stream, source) = create_stream("list-shards-hangs", 2).await;
    let kinesis = std::env::var("AWS_ENDPOINT_URL_KINESIS").expect("the stack's Kinesis");
    let proxy = TcpProxy::start(&host_port(&kinesis)).await;
    let via = proxy.url_via(&kinesis);
    let mut worker = ConsumerProcess::start_with_env(
        &db.url,
        &stream,
        "w1",
        &[],
        &[("AWS_ENDPOINT_URL_KINESIS", &via)],
    );
    wait_for_leases(&client, &stream, "w1", 2).await;
    let counters = lease_counters(&client, &stream).await;
    let producer = Producer::start(source.clone(), 20, 20, Duration::from_millis(100), 3_000);

    // The next ListShards (every --shard-sync-interval, 2 s here) goes out
    // and no answer ever comes: worse than a throttled one retried with backoff.
    proxy.blackhole_at(b"Kinesis_20131202.ListShards", false);
    wait_for_blackholed(&proxy, 1).await;
    let watch_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < watch_until {
        assert_eq!(
            lapsed_leases(&client, &stream).await,
            Vec::<String>::new(),
            "leases lapsed or moved while ListShards hung"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let put = producer.finish().await;
    assert_exactly(&client, &put, "while ListShards hung").await;
    assert_eq!(
        lease_counters(&client, &stream).await,
        counters,
        "lease counters"
    );
    assert!(worker.is_running(), "w1 exited");
    clean_up([worker], &source, db).await;
}

/// A worker's log, read for a line holding `text` within `within`.
async fn wait_for_log(log: &std::path::Path, text: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let written = std::fs::read_to_string(log).unwrap_or_default();
        if written.contains(text) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the worker's log within {within:?}:\n{written}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a worker with nothing in flight may take to exit on SIGTERM,
/// as the README documents: up to 5 s to release its leases, and slack for
/// a loaded machine.
const IDLE_EXIT_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_the_database_is_away_stops_a_worker_with_nothing_in_flight() {
    let db = TestDb::migrated("faults_sigterm_idle").await;
    let client = db.client().await;
    let (stream, source) = create_stream("sigterm-idle", 1).await;
    let proxy = TcpProxy::start(&host_port(&db.url)).await;
    let scratch = std::env::temp_dir().join(format!("sigterm-idle-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();

    // Started while the database cannot be reached: it waits for it.
    proxy.cut().await;
    let log = scratch.join("w1.log");
    let mut waiting =
        ConsumerProcess::start_logged(&proxy.url_via(&db.url), &stream, "w1", &[], &log);
    wait_for_log(&log, "database unreachable; retrying", SETTLE_WITHIN).await;
    let status = waiting.terminate(IDLE_EXIT_WITHIN);
    assert!(
        status.success(),
        "{status}: {}",
        std::fs::read_to_string(&log).unwrap()
    );

    // Running, everything committed, then the database goes away.
    proxy.restore().await;
    let log = scratch.join("w2.log");
    let mut running =
        ConsumerProcess::start_logged(&proxy.url_via(&db.url), &stream, "w2", &[], &log);
    let put = records(10, 100, base_ts());
    source.put_records(&put).await.unwrap();
    assert_exactly(&client, &put, "before the database went away").await;
    proxy.cut().await;
    wait_for_log(&log, "lease round failed", SETTLE_WITHIN).await;
    let status = running.terminate(IDLE_EXIT_WITHIN);
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {written}");
    assert!(
        written.contains("could not release the leases"),
        "the worker said nothing of its leases: {written}"
    );
    std::fs::remove_dir_all(&scratch).ok();
    clean_up([waiting, running], &source, db).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_batch_in_flight_and_the_database_away_gives_up_after_the_grace() {
    let db = TestDb::migrated("faults_sigterm_in_flight").await;
    let client = db.client().await;
    let (stream, source) = create_stream("sigterm-in-flight", 2).await;
    let proxy = TcpProxy::start(&host_port(&db.url)).await;
    let scratch = std::env::temp_dir().join(format!("sigterm-in-flight-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let log = scratch.join("w1.log");
    let grace = Duration::from_secs(3);
    let mut w1 = ConsumerProcess::start_logged(
        &proxy.url_via(&db.url),
        &stream,
        "w1",
        &["--shutdown-grace", "3s"],
        &log,
    );
    let first = records(10, 200, base_ts());
    source.put_records(&first).await.unwrap();
    assert_exactly(&client, &first, "before the database went away").await;

    // The database goes away, then more records come: w1 reads them and
    // holds a batch it cannot commit.
    proxy.cut().await;
    let second = records(10, 300, base_ts() + 1_000);
    source.put_records(&second).await.unwrap();
    wait_for_log(&log, "database unreachable; retrying", SETTLE_WITHIN).await;
    let stopping = Instant::now();
    let status = w1.terminate(grace + IDLE_EXIT_WITHIN);
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(
        !status.success(),
        "w1 gave its batch up but said it stopped well: {written}"
    );
    assert!(
        stopping.elapsed() >= grace,
        "w1 exited {:?} after SIGTERM, before its grace of {grace:?} was over: {written}",
        stopping.elapsed()
    );
    let errors: Vec<&str> = written
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert!(
        errors.len() == 1 && errors[0].contains("shutdown grace period"),
        "one error line naming the grace period: {written}"
    );

    // The next owner reads the batch again from the checkpoint.
    proxy.restore().await;
    let w2 = ConsumerProcess::start(&db.url, &stream, "w2", &[]);
    let mut all = first;
    all.extend(second);
    assert_exactly(&client, &all, "after w2 took over").await;
    std::fs::remove_dir_all(&scratch).ok();
    clean_up([w1, w2], &source, db).await;
}
