-- Free vs paid users
-- Users by their current level (the level of their latest event).
SELECT u.level,
       COUNT(*)                                              AS users,
       ROUND(100.0 * COUNT(*) / FIRST(total.users), 1)       AS pct
FROM users u
CROSS JOIN (SELECT COUNT(*) AS users FROM users) total
GROUP BY u.level
ORDER BY u.level
