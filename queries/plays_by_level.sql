-- Free vs paid plays
-- Plays by the level the user had when playing, and how many users played at that level.
SELECT sp.level,
       COUNT(*)                                              AS plays,
       ROUND(100.0 * COUNT(*) / FIRST(total.plays), 1)       AS pct,
       COUNT(DISTINCT sp.user_id)                            AS listeners
FROM songplays sp
CROSS JOIN (SELECT COUNT(*) AS plays FROM songplays) total
GROUP BY sp.level
ORDER BY sp.level
