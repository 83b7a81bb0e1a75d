-- Free vs paid plays per day (UTC)
-- Daily plays split by the level the user had when playing.
SELECT make_date(t.year, t.month, t.day)                   AS day,
       SUM(CASE WHEN sp.level = 'free' THEN 1 ELSE 0 END)  AS free,
       SUM(CASE WHEN sp.level = 'paid' THEN 1 ELSE 0 END)  AS paid,
       COUNT(*)                                            AS plays
FROM songplays sp
JOIN time t ON sp.start_time = t.start_time
GROUP BY t.year, t.month, t.day
ORDER BY day
