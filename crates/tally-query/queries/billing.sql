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
    SUM(CASE WHEN decision = 'accepted' THEN quantity ELSE 0 END) AS accepted,
    SUM(CASE WHEN decision = 'overage' THEN quantity ELSE 0 END) AS overage
FROM billed_events
WHERE decision IN ('accepted', 'overage')
GROUP BY customer, plan, feature
ORDER BY customer, plan, feature
