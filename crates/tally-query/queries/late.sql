-- Late usage: events of the period (by their own time, see billing.sql for
-- `billed_events`) decided `late`, because they arrived after their counter had moved on
-- to a later period. Not billed; listed with the period's invoices for review.
-- $1: the period's name.
SELECT
    customer,
    plan,
    feature,
    $1 AS period,
    CAST(SUM(events) AS BIGINT) AS events,
    SUM(quantity) AS quantity
FROM billed_events
WHERE decision = 'late'
GROUP BY customer, plan, feature
ORDER BY customer, plan, feature
