-- Most played songs
-- Plays matched to a known song (same title, artist name and duration), by song.
SELECT s.title,
       a.name                      AS artist,
       COUNT(*)                    AS plays,
       COUNT(DISTINCT sp.user_id)  AS listeners
FROM songplays sp
JOIN songs s        ON sp.song_id = s.song_id
LEFT JOIN artists a ON sp.artist_id = a.artist_id
GROUP BY s.song_id, s.title, a.name
ORDER BY plays DESC, s.title, s.song_id
LIMIT 10
