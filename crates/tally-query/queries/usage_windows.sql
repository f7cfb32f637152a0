-- Usage windows: per customer × plan × feature × usage window of one period (a calendar
-- month), the quantity counted and the quantity a hard limit refused.
-- $1, $2: the period's first day and the next period's first day (YYYY-MM-DD), which
-- prune the hive `date` partitions; $3: the window, `hour`, `day` or `month` (the
-- granularity of `date_trunc`, in UTC).
-- Counted means decided `accepted` (within the limit) or `overage` (past a soft one);
-- refused means decided `limit_reached` (a hard limit). Each event is counted under the
-- plan that decided it, as billing does.
SELECT
    customer,
    plan,
    feature,
    date_trunc($3, event_time) AS window_start,
    SUM(CASE WHEN decision IN ('accepted', 'overage') THEN 1 ELSE 0 END) AS events,
    SUM(CASE WHEN decision = 'accepted' THEN quantity ELSE 0 END) AS accepted,
    SUM(CASE WHEN decision = 'overage' THEN quantity ELSE 0 END) AS overage,
    SUM(CASE WHEN decision = 'limit_reached' THEN 1 ELSE 0 END) AS refused_events,
    SUM(CASE WHEN decision = 'limit_reached' THEN quantity ELSE 0 END) AS refused
FROM events
WHERE "date" >= $1
  AND "date" < $2
  AND decision IN ('accepted', 'overage', 'limit_reached')
GROUP BY customer, plan, feature, date_trunc($3, event_time)
ORDER BY customer, plan, feature, window_start
