-- Adoption: per customer × feature in a range of days, the events and quantity used, and
-- the events refused because the customer is not entitled to the feature.
-- $1: the range's first day; $2: the day after its last (YYYY-MM-DD).
-- Used means decided `accepted` or `overage`: the customer got the feature. Other
-- decisions are not use; `not_entitled` is counted apart (`not_entitled`), as a sign of
-- interest in a feature the customer does not have.
SELECT
    customer,
    feature,
    SUM(CASE WHEN decision IN ('accepted', 'overage') THEN 1 ELSE 0 END) AS events,
    SUM(CASE WHEN decision IN ('accepted', 'overage') THEN quantity ELSE 0 END) AS quantity,
    SUM(CASE WHEN decision = 'not_entitled' THEN 1 ELSE 0 END) AS not_entitled
FROM events
WHERE "date" >= $1
  AND "date" < $2
  AND decision IN ('accepted', 'overage', 'not_entitled')
GROUP BY customer, feature
ORDER BY customer, feature
