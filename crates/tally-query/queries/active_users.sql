-- Adoption: distinct users per feature per UTC day, ISO week (from Monday) and calendar
-- month, in a range of days: `grain` is `day`, `week` or `month` and `bucket` the first
-- day of the day, week or month. A user is a customer's `user_id` (the same id under two
-- customers is two users); events without one are not counted. Only use counts (events
-- decided `accepted` or `overage`), and only inside the range: a week or month that the
-- range cuts holds only the range's days.
-- $1: the range's first day; $2: the day after its last (YYYY-MM-DD).
SELECT feature, grain, bucket, COUNT(*) AS users
FROM (
    SELECT DISTINCT
        feature,
        'day' AS grain,
        CAST(date_trunc('day', event_time) AS DATE) AS bucket,
        customer,
        user_id
    FROM events
    WHERE "date" >= $1 AND "date" < $2
      AND decision IN ('accepted', 'overage') AND user_id IS NOT NULL
    UNION ALL
    SELECT DISTINCT
        feature,
        'week' AS grain,
        CAST(date_trunc('week', event_time) AS DATE) AS bucket,
        customer,
        user_id
    FROM events
    WHERE "date" >= $1 AND "date" < $2
      AND decision IN ('accepted', 'overage') AND user_id IS NOT NULL
    UNION ALL
    SELECT DISTINCT
        feature,
        'month' AS grain,
        CAST(date_trunc('month', event_time) AS DATE) AS bucket,
        customer,
        user_id
    FROM events
    WHERE "date" >= $1 AND "date" < $2
      AND decision IN ('accepted', 'overage') AND user_id IS NOT NULL
) AS users
GROUP BY feature, grain, bucket
ORDER BY feature, CASE grain WHEN 'day' THEN 1 WHEN 'week' THEN 2 ELSE 3 END, bucket
