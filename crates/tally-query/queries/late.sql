-- Late usage: events of one period (by their own time) decided `late`, because they
-- arrived after their counter had moved on to a later period. Not billed; listed with
-- the period's invoices for review. Parameters as in billing.sql.
SELECT
    customer,
    plan,
    feature,
    $3 AS period,
    COUNT(*) AS events,
    SUM(quantity) AS quantity
FROM events
WHERE "date" >= $1
  AND "date" < $2
  AND decision = 'late'
GROUP BY customer, plan, feature
ORDER BY customer, plan, feature
