-- Billing: billable usage per customer × plan × feature over the usage a billing run
-- covers (`billed_events`: the period's rollup rows or events, already narrowed to the
-- calendar month or to each customer's own billing month; `events` is how many events a
-- row stands for). $1: the period's name.
-- Only billable decisions count: `accepted` within the limit, `overage` past a soft one.
-- Each event is counted under the plan that decided it, so a plan change inside the
-- period gives one line per plan.
SELECT
    customer,
    plan,
    feature,
    $1 AS period,
    CAST(SUM(events) AS BIGINT) AS events,
    SUM(quantity) AS quantity,
    -- Each quantity times 1 or 0 (exact: quantities are finite and not negative) rather
    -- than a CASE: the same sums, and a quarter less work over raw events.
    SUM(quantity * CAST(decision = 'accepted' AS DOUBLE)) AS accepted,
    SUM(quantity * CAST(decision = 'overage' AS DOUBLE)) AS overage
FROM billed_events
WHERE decision IN ('accepted', 'overage')
GROUP BY customer, plan, feature
ORDER BY customer, plan, feature
