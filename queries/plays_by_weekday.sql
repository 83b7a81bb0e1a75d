-- Plays by weekday (UTC)
-- ISO weekday: 1 = Monday ... 7 = Sunday.
WITH by_day AS (
  SELECT t.weekday, COUNT(*) AS plays
  FROM songplays sp
  JOIN time t ON sp.start_time = t.start_time
  GROUP BY t.weekday
)
SELECT CAST(d.id AS INT)                                                AS weekday,
       element_at(array('Mon', 'Tue', 'Wed', 'Thu', 'Fri', 'Sat', 'Sun'), CAST(d.id AS INT)) AS day,
       COALESCE(b.plays, 0)                                            AS plays,
       ROUND(100.0 * COALESCE(b.plays, 0) / NULLIF(total.plays, 0), 1)  AS pct
FROM range(1, 8) d
LEFT JOIN by_day b ON b.weekday = d.id
CROSS JOIN (SELECT SUM(plays) AS plays FROM by_day) total
ORDER BY weekday
