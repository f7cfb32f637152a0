-- Billing lines computed apart for parts of the usage, merged into one bill: the table
-- below holds the rows of billing.sql over each part, and a line that two parts share is
-- added up. Billing from raw events runs billing.sql over each worker partition's files
-- and this over their answers together.
SELECT
    customer,
    plan,
    feature,
    period,
    CAST(SUM(events) AS BIGINT) AS events,
    SUM(quantity) AS quantity,
    COALESCE(SUM(accepted), 0) AS accepted,
    COALESCE(SUM(overage), 0) AS overage
FROM billed_parts
GROUP BY customer, plan, feature, period
ORDER BY customer, plan, feature
