-- Plays matched to a known song
-- A play without a match keeps null song_id and artist_id (the song is not in song_data).
SELECT COUNT(*)                                                       AS plays,
       COUNT(song_id)                                                 AS matched,
       ROUND(100.0 * COUNT(song_id) / NULLIF(COUNT(*), 0), 2)         AS pct_matched
FROM songplays
