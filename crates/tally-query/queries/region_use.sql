-- Adoption: per feature × region (null: the event named none) in a range of days, the
-- events and quantity used (decided `accepted` or `overage`).
-- `usage`: the range's usage from the rollups (monthly ones for the months it covers
-- whole), one row per rollup group, `events` the events it stands for.
SELECT
    feature,
    region,
    CAST(SUM(events) AS BIGINT) AS events,
    SUM(quantity) AS quantity
FROM usage
WHERE decision IN ('accepted', 'overage')
GROUP BY feature, region
ORDER BY feature, region NULLS LAST
