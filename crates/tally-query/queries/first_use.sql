-- Adoption: per customer × feature, the first time the customer used the feature
-- (`first_use`: its earliest event decided `accepted` or `overage`; null if none) and
-- the customer's first event of any feature (`customer_first_event`: any decision but
-- `unknown_customer` and `metered`, which come before the customer was defined), both over the whole
-- lake up to the end of a range.
-- `usage`: the lake's usage up to the range's end from the rollups (monthly ones for
-- whole months), one row per rollup group, `first_time` its earliest event.
SELECT
    customer,
    feature,
    first_use,
    MIN(first_event) OVER (PARTITION BY customer) AS customer_first_event
FROM (
    SELECT
        customer,
        feature,
        MIN(CASE WHEN decision IN ('accepted', 'overage') THEN first_time END) AS first_use,
        MIN(CASE WHEN decision NOT IN ('unknown_customer', 'metered') THEN first_time END) AS first_event
    FROM usage
    GROUP BY customer, feature
) AS per_feature
ORDER BY customer, feature
