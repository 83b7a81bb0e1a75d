-- New users per day (UTC)
-- The day of each user's first play in the lake.
WITH first_play AS (
  SELECT user_id, MIN(start_time) AS start_time
  FROM songplays
  GROUP BY user_id
)
SELECT make_date(t.year, t.month, t.day)  AS day,
       COUNT(*)                           AS new_users
FROM first_play f
JOIN time t ON f.start_time = t.start_time
GROUP BY t.year, t.month, t.day
ORDER BY day
