-- Most played artists
-- Plays matched to a known song, by the song's artist.
SELECT a.name                      AS artist,
       COUNT(*)                    AS plays,
       COUNT(DISTINCT sp.song_id)  AS songs,
       COUNT(DISTINCT sp.user_id)  AS listeners
FROM songplays sp
JOIN artists a ON sp.artist_id = a.artist_id
GROUP BY a.artist_id, a.name
ORDER BY plays DESC, a.name, a.artist_id
LIMIT 10
