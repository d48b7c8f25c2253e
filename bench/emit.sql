BEGIN;
INSERT INTO orders(customer, amount) VALUES ('c' || :client_id, 42.5);
SELECT outbox.emit('order', 'o-' || :client_id, 'OrderCreated', '{"customer":"c1","amount":42.5,"lines":[{"sku":"A-1","qty":2},{"sku":"B-7","qty":1}],"note":"abcdefghijklmnopqrstuvwxyz0123456789"}');
COMMIT;
