-- Billing: usage per customer × feature for one period (a calendar month).
-- $1, $2: the period's first day and the next period's first day (YYYY-MM-DD), which
-- prune the hive `date` partitions; $3: the period's name (YYYY-MM).
-- Only billable decisions count.
SELECT
    customer,
    feature,
    $3 AS period,
    COUNT(*) AS events,
    SUM(quantity) AS quantity
FROM events
WHERE "date" >= $1
  AND "date" < $2
  AND decision IN ('accepted', 'overage')
GROUP BY customer, feature
ORDER BY customer, feature
