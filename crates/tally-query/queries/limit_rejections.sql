-- Rejections by hard limits: per customer × plan × feature × UTC day of one period, the
-- events decided `limit_reached` and their quantity.
-- $1, $2: the period's first day and the next period's first day (YYYY-MM-DD).
-- `plan` is the plan whose limit refused them.
SELECT
    customer,
    plan,
    feature,
    "date" AS day,
    COUNT(*) AS events,
    SUM(quantity) AS quantity
FROM events
WHERE "date" >= $1
  AND "date" < $2
  AND decision = 'limit_reached'
GROUP BY customer, plan, feature, "date"
ORDER BY customer, plan, feature, day
