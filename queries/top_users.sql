-- Most active users
-- Users by number of plays; name and level are the user's latest (the users table).
SELECT sp.user_id,
       u.first_name,
       u.last_name,
       u.level,
       COUNT(*)                       AS plays,
       COUNT(DISTINCT sp.session_id)  AS sessions
FROM songplays sp
LEFT JOIN users u ON sp.user_id = u.user_id
GROUP BY sp.user_id, u.first_name, u.last_name, u.level
ORDER BY plays DESC, sp.user_id
LIMIT 10
