-- Billing: billable usage per customer × plan × feature over the usage a billing run
-- covers (`billed_events`: the period's rollup rows or events, already narrowed to the
-- calendar month or to each customer's own billing month; `events` is how many events a
-- row stands for). $1: the period's name.
-- Only billable decisions count: `accepted` within the limit, `overage` past a soft one,
-- the decision codes 0 and 1 (`decision_code`, as the lake stores it; see the lake
-- schema). Each event is counted under the plan that decided it, so a plan change inside
-- the period gives one line per plan.
-- Every row is grouped and the billable ones are picked out by each sum's FILTER rather
-- than by a WHERE: the same lines, without the copy of the kept rows that a WHERE makes
-- DataFusion do (the faster form over raw events, BENCHMARKS.md). A group with no
-- billable row is no line.
SELECT customer, plan, feature, period, events, quantity, accepted, overage
FROM (
    SELECT
        customer,
        plan,
        feature,
        $1 AS period,
        CAST(SUM(events) FILTER (WHERE decision_code < 2) AS BIGINT) AS events,
        SUM(quantity) FILTER (WHERE decision_code < 2) AS quantity,
        COALESCE(SUM(quantity) FILTER (WHERE decision_code = 0), 0) AS accepted,
        COALESCE(SUM(quantity) FILTER (WHERE decision_code = 1), 0) AS overage
    FROM billed_events
    GROUP BY customer, plan, feature
) AS lines
WHERE events > 0
ORDER BY customer, plan, feature
