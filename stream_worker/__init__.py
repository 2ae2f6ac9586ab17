"""The stream worker: bus events -> live session state and item counters -> online store,
and -> the Parquet event log; the ranking servers' serve records -> the Parquet serve
log. One process per worker (`inkling worker`); run several.

Modules: `state` (the pure update rules and the cross-device session rule), `online`
(Feast's Redis records, resolved from the registry), `logfiles` (the worker's event
log files), `ownership` (leases, heartbeats), `worker` (the loop), `settings`, `app`
(the composition root: `run_worker`, `serve_worker`), `bench` (measurements),
`kafka_source` (the same worker on a Kafka topic, with Kafka's consumer group in place of
the leases below; see its docstring).

Reading
    Partitions are the bus's streams (`inkling/events/bus.py`), read through the consumer
    group `inkling-workers`, the worker id as consumer name. A micro-batch closes at
    `batch_max_events` entries or `batch_max_wait_ms` (5 ms) after its first entry;
    under load it grows by itself with what arrived while the previous one was applied.
    One thread reads, applies and commits in order, so nothing races a commit of the
    same worker; the Parquet log is written on a second thread (below).

Idempotence (at-least-once delivery, effects exactly once)
    Each partition has two watermarks in Redis, the last stream entry id whose
    effects are committed:

    - online (`inkling:worker:applied:<p>`): set in the same script as everything a
      micro-batch changes (one Lua script, atomic like MULTI/EXEC, one round trip): the session states (`inkling:worker:state:<key>`), the
      session rows and item counters in Feast's online records, and the dead letters.
      An entry at or below it is never applied again.
    - log (`inkling:worker:logged:<p>`, never above the online one): a partition's
      events are buffered and written to the Parquet log every `log_flush_s` (5 s) or
      `log_max_events`, one file per UTC date named by partition, first and last entry
      id and worker (`date=<d>/stream-p<p>-<first>-<last>-<worker>.parquet`, written
      under `_staging/` and moved into place). Before writing, the file names go into
      `inkling:worker:inflight:<p>` (only while the worker holds the lease); the
      script that advances the log watermark deletes that record and acknowledges the
      entries, only while the worker holds the lease and the watermark is where the
      flush started.

    The log thread takes one buffer at a time, at most one per partition in flight, so
    a flush (tens of ms on a loaded machine) never holds up a micro-batch. The main
    thread takes in each outcome before that partition's next flush, and waits for a
    partition's flush before it re-reads the partition's watermarks or deletes its
    files in flight (after an error, or when it takes or gives up the partition).

    Entries are acknowledged (XACK) only once both watermarks passed them, so every
    entry above the log watermark is still pending on the bus. After a crash the next
    owner deletes the files still recorded in flight (a flush that never committed),
    then re-reads the pending entries: at or below the log watermark it only
    acknowledges; at or below the online watermark it only logs again; above it it
    applies. So a SIGKILL at any point loses nothing and counts nothing twice; the
    integration test kills a worker between writing Parquet files and committing them.
    Writing the log once per partition every few seconds rather than per 50 ms batch
    keeps the files fewer and larger for the Spark jobs (4 partitions busy all day: 80
    files a second, ~7 million a day, per 50 ms batch; ~70,000 a day every 5 s, still
    worth compacting); the bus holds the entries meanwhile (they count as pending in
    its lag, which the ingest caps at `max_lag`).

    Fencing: every commit checks that the partition's lease and watermark still hold
    the worker's id and the value it read, inside the commit's script, before it writes
    anything; if another worker took the partition, nothing is written and the worker
    drops the partition. A worker that
    stalls past its lease between recording its files and writing them, and is then
    killed before its commit fails, can leave one orphan file (the next owner deleted
    the record before the file existed); nothing else can duplicate a logged event.

    Limits of the guarantee: the online state, watermarks and records are in Redis; a
    Redis that loses acknowledged writes (appendfsync everysec and a Redis crash) can
    make a replay log up to that second again. A script does not roll back the writes
    before a command that fails (e.g. WRONGTYPE on a worker key someone overwrote); the
    worker then stops with the error rather than continue. Duplicate event ids within
    the bus's dedupe window are refused by the ingest side (`EventBus.append`); the
    worker drops a repeated id within one micro-batch.

Redis Cluster
    With `online_store = redis_cluster` the client is a cluster client and every key of a
    partition (stream, lease, watermarks, in-flight set, session states, dead letters)
    carries the partition's hash tag `{p<n>}` (`inkling.events.bus.partition_tag`), so
    the lease-fenced scripts above still run in one slot. Feast's rows and the item
    counters lie in any slot, so a micro-batch is processed per partition and commits in
    two steps (`stream_worker.cluster_commit`): first one-key scripts that apply each row,
    counter and bandit write only when it is newer, by stream entry id, than what the key
    already got from that partition (a per-partition applied mark kept with the key);
    then the fenced commit of the partition's own keys. A crash between the steps
    replays the entries and the marks make the first step a no-op. Reads go per
    partition (a multi-stream XREADGROUP would cross slots) without BLOCK, with a wait
    of at most 5 ms when nothing arrived. What a failover can lose: README, "Redis
    Cluster: the bus and the stream worker".

Ownership
    Workers heartbeat into a sorted set (`inkling:worker:members`, expiry as score) and
    hold one lease per partition (`inkling:worker:lease:<p>`: SET NX PX
    `lease_ttl_ms`, renewed every `rebalance_interval_ms` by compare-and-PEXPIRE). A
    worker takes free partitions up to ceil(partitions / live workers) and gives up
    the excess at once (after flushing its log buffer), so a new worker gets its share
    within a rebalance interval. A stopped worker (SIGTERM: finish the batch, flush,
    release) hands its partitions over immediately; a crashed one after `lease_ttl_ms`.
    On taking a partition the worker reads its watermarks, deletes files in flight,
    claims the earlier owners' pending entries once idle `claim_min_idle_ms` (XPENDING
    + XCLAIM JUSTID) and processes its own pending entries (XREADGROUP from 0) before
    any new one, so entries are applied in stream order. An entry delivered
    `max_deliveries` times without being acknowledged (a worker-crashing event) is
    dead-lettered.

Session state and the cross-device rule
    The rules equal `batch.features.session_features` (the integration test compares
    the online rows with the Spark job over the worker's own log). Events with a user
    id update the user's current visit, which is written under every session id the
    visit has seen; see `stream_worker.state` for the rule and where the online rows
    differ from the batch job's (sessions of one user within `session_gap_s` of each
    other share one state online).

Item counters
    `item_stream_features` (push source `item_stream_push`): views (`item_view`) and
    clicks per item over the current minute and the 4 before it, bucketed by event
    time (never later than the receive time). Buckets are hash fields incremented by
    Lua inside the same commit script (so a replay below the watermark adds
    nothing), which also writes the window's sums to the online row; rows of items
    with events in their window are recomputed every `counter_refresh_s`, so counts
    age out; the view's 5-minute TTL ends a row nobody refreshes.

Serve records
    The same streams carry one serve record per ranking answer (`inkling.events.bus`).
    They change no online state: a worker checks each (`inkling.events.servelog.
    record_problem`; a bad one is dead-lettered like a poison event) and buffers it with
    the partition's events. The log flush writes them to the serve log
    (`<data_dir>/serves/date=<d>/stream-p<p>-<first>-<last>-<worker>.parquet`, by the
    date served), under the same in-flight record, watermark and acknowledgement as the
    event log files, so a SIGKILL loses none and logs none twice (the integration test
    kills a worker between writing and committing both kinds of file).

Poison events
    Undecodable payloads, unknown event types, a missing timestamp, session or item,
    a payload whose event_id differs from the entry's, anything `inkling.events.schema`
    rejects: XADD to `inkling:events:dead` with the entry's fields, `reason`, `source`
    and `source_id`, inside the batch's transaction; the entry is acknowledged and the
    partition goes on.

Writing the online store
    Rows are encoded in bulk with `inkling.feature_store.feast_codec` into Feast's exact Redis
    records, for the views the registry says the push sources feed, and queued in the
    commit transaction; the integration test checks them byte for byte against
    `FeatureStore.push(..., to=PushMode.ONLINE)`. 500 session rows take 11-18 ms this
    way against 45-74 ms through `push` (median of 5, three runs), and `push` cannot
    join the transaction.

Measured
    `python -m bench.stream --events 50000 --rates 1000,5000 --seconds 20` (one
    worker process, 4 partitions, default settings; producer, probe, Redis and worker
    on this project's 2 shared cores; every event a new session, the worst case for
    the state cache), XADD to session row visible, p50 / p95 / p99 ms:

    | | 1,000/s | 5,000/s | applied online |
    | --- | --- | --- | --- |
    | before (50 ms batches, log on the loop, no GC freeze; 10 s per rate) | 49 / 84 / 269 | 141 / 430 / 490 | 23.8k/s |
    | with the log thread (ba39dfb) | 11 / 18 / 22 | 27 / 57 / 99 | 20.2k/s |

    Where the tail came from, found with a timeline of every micro-batch (the age of
    its oldest event at commit) beside the log flushes, trims and gen-2 collections,
    during `inkling bench freshness` at 5,000 events/s:
    - full garbage collections walking the start-up heap (165-240 ms): frozen;
    - log flushes on the loop (45-110 ms each, four at once): a log thread, flushes
      spread out, the buffer held as columns (gen-2 pauses then fell to 2-8 ms);
    - the 50 ms batch wait: 5 ms;
    - an exact trim of a minute of entries in one script, which stopped Redis: a
      bounded trim every second;
    - counter refreshes in six back-to-back scripts every 15 s: spread out;
    - both servers' item snapshot builds every 30 s, each SCANning the whole keyspace
      (the bus's dedupe keys included) 200 keys at a time: 2,000 at a time; later the
      bus's one dedupe key per event gave way to 8 sorted sets (21b8d7c), and the p99
      at 10,000 events/s fell from 177-537 ms to 72-124 ms (README, "Streaming");
    - CPU: about 95 us per event in-process (30,000 events over 2,000 sessions,
      py-spy for where), 63-80 after committing through one script packed by
      hiredis, encoding timestamps without Arrow and skipping type checks on cached
      states. What is left is spread thin: the Arrow validation of each batch
      (13 %), encoding rows (12 %), reading (9 %), decoding (6 %).
"""
