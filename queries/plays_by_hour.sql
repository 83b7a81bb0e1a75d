-- Plays by hour of day (UTC)
-- Every hour 0-23, with its share of all plays.
WITH by_hour AS (
  SELECT t.hour, COUNT(*) AS plays
  FROM songplays sp
  JOIN time t ON sp.start_time = t.start_time
  GROUP BY t.hour
)
SELECT CAST(h.id AS INT)                                                AS hour,
       COALESCE(b.plays, 0)                                            AS plays,
       ROUND(100.0 * COALESCE(b.plays, 0) / NULLIF(total.plays, 0), 1)  AS pct
FROM range(24) h
LEFT JOIN by_hour b ON b.hour = h.id
CROSS JOIN (SELECT SUM(plays) AS plays FROM by_hour) total
ORDER BY hour
