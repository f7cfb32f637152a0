-- Adoption: per customer × feature in a range of days, the events and quantity used, and
-- the events refused because the customer is not entitled to the feature.
-- `usage`: the range's usage from the rollups (monthly ones for the months it covers
-- whole), one row per rollup group, `events` the events it stands for.
-- Used means decided `accepted` or `overage`: the customer got the feature. Other
-- decisions are not use; `not_entitled` is counted apart (`not_entitled`), as a sign of
-- interest in a feature the customer does not have.
SELECT
    customer,
    feature,
    CAST(SUM(CASE WHEN decision IN ('accepted', 'overage') THEN events ELSE 0 END) AS BIGINT)
        AS events,
    SUM(CASE WHEN decision IN ('accepted', 'overage') THEN quantity ELSE 0 END) AS quantity,
    CAST(SUM(CASE WHEN decision = 'not_entitled' THEN events ELSE 0 END) AS BIGINT)
        AS not_entitled
FROM usage
WHERE decision IN ('accepted', 'overage', 'not_entitled')
GROUP BY customer, feature
ORDER BY customer, feature
