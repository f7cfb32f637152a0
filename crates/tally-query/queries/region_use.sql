-- Adoption: per feature × region (null: the event named none) in a range of days, the
-- events and quantity used (decided `accepted` or `overage`).
-- $1: the range's first day; $2: the day after its last (YYYY-MM-DD).
SELECT
    feature,
    region,
    COUNT(*) AS events,
    SUM(quantity) AS quantity
FROM events
WHERE "date" >= $1
  AND "date" < $2
  AND decision IN ('accepted', 'overage')
GROUP BY feature, region
ORDER BY feature, region NULLS LAST
