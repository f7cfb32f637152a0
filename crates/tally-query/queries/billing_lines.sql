-- Billing of a calendar month read from monthly rollups alone: the billing lines written
-- beside them, merged in order (`billed_lines`: customer, plan, feature, events,
-- quantity, accepted, overage), as columns of billing.sql. $1: the period's name.
SELECT
    customer,
    plan,
    feature,
    $1 AS period,
    CAST(events AS BIGINT) AS events,
    quantity,
    accepted,
    overage
FROM billed_lines
