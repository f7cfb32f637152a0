-- Adoption: distinct users per feature per bucket of one grain in a range of days: `$3`
-- is `day` (UTC), `week` (ISO, from Monday) or `month` (calendar), and `bucket` the first
-- day of the day, week or month. A user is a customer's `user_id` (the same id under two
-- customers is two users); events without one are not counted. Only use counts (events
-- decided `accepted` or `overage`), and only inside the range: a week or month that the
-- range cuts holds only the range's days. Run once per grain, one after the other: each
-- distinct set is large, and three at once would share the memory pool and spill.
-- $1: the range's first day; $2: the day after its last (YYYY-MM-DD); $3: the grain.
SELECT feature, $3 AS grain, bucket, COUNT(*) AS users
FROM (
    SELECT DISTINCT
        feature,
        CAST(date_trunc($3, event_time) AS DATE) AS bucket,
        customer,
        user_id
    FROM events
    WHERE "date" >= $1 AND "date" < $2
      AND decision IN ('accepted', 'overage') AND user_id IS NOT NULL
) AS users
GROUP BY feature, bucket
ORDER BY feature, bucket
