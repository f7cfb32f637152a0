-- Billing: billable usage per customer × plan × feature for one period (a calendar month).
-- $1, $2: the period's first day and the next period's first day (YYYY-MM-DD), which
-- prune the hive `date` partitions; $3: the period's name (YYYY-MM).
-- Only billable decisions count: `accepted` within the limit, `overage` past a soft one.
-- Each event is counted under the plan that decided it, so a plan change inside the
-- period gives one line per plan.
SELECT
    customer,
    plan,
    feature,
    $3 AS period,
    COUNT(*) AS events,
    SUM(quantity) AS quantity,
    SUM(CASE WHEN decision = 'accepted' THEN quantity ELSE 0 END) AS accepted,
    SUM(CASE WHEN decision = 'overage' THEN quantity ELSE 0 END) AS overage
FROM events
WHERE "date" >= $1
  AND "date" < $2
  AND decision IN ('accepted', 'overage')
GROUP BY customer, plan, feature
ORDER BY customer, plan, feature
