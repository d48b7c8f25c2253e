-- One event per transaction carrying its emit time (Unix µs) for outbox-latency.
\set k random(1, 1000)
BEGIN;
SELECT outbox.emit('latency', 'agg-' || :k, 'Tick', jsonb_build_object('t', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, 'pad', repeat('x', 150)));
COMMIT;
