-- emit.sql written like raw_logical_message.sql: every argument a literal (pgbench puts the
-- client id into 'o-:client_id'), so emit ÷ raw compares like with like. emit.sql builds the key
-- with || at run time, as table_outbox.sql does; that operator alone costs ~50k instructions.
BEGIN;
INSERT INTO orders(customer, amount) VALUES ('c' || :client_id, 42.5);
SELECT outbox.emit('order', 'o-:client_id', 'OrderCreated', '{"customer":"c1","amount":42.5,"lines":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}],"note":"abcdefghijklmnopqrstuvwxyz0123456789"}');
COMMIT;
